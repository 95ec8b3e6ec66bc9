"""The bus port's conformance suite, run against every bus through the real message path.

Written once; each bus joins with a subclass that provides a ``make_harness`` fixture (a factory
of :class:`~sagaline.testing.conformance.harness.Harness`): the bus in the store's own database,
or a separate bus (a bus database, a broker) with the services' store in outbox mode, and the
way to make its store fail (``store_outage``, see
:class:`~sagaline.testing.conformance.store_faults.StoreFaultConformance`). Every test drives real
services and waits for what a user relies on: the handled messages in the store, the dead letters
with their reason, the replayed log.

This module holds delivery (routing, order per key through retries, poison messages, copies,
replay, what a dead consumer held); :mod:`.screening` what a bus refuses or dead-letters, and
:mod:`.store_faults` the store's outages, both part of the suite.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from sagaline.handling import Context, Service, System
from sagaline.ports import RetryPolicy
from sagaline.testing.conformance.harness import (
    Harness,
    MakeHarness,
    both,
    dead_lettered,
    drive,
    handled_all,
    run_until,
)
from sagaline.testing.conformance.isolation import IsolationConformance
from sagaline.testing.conformance.messages import (
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherCommand,
    ConformanceOtherEvent,
)
from sagaline.testing.conformance.screening import ScreeningConformance
from sagaline.testing.conformance.services import (
    FAST_RETRY,
    queue_service,
    record,
    subscriber,
)
from sagaline.testing.conformance.store_faults import StoreFaultConformance

__all__ = ["BusPortConformance"]


class BusPortConformance(ScreeningConformance, IsolationConformance, StoreFaultConformance):
    """What every bus must do on the message path. Subclasses provide ``make_harness``.

    A broker's subclass sets ``bus_is_a_database = False``; one whose store can tell its size on
    disk overrides :meth:`store_bytes` (see :class:`.screening.ScreeningConformance`).
    """

    @pytest.fixture
    def make_harness(self, *args: Any, **kwargs: Any) -> MakeHarness | Iterator[MakeHarness]:
        """Makes a harness on the test's own storage; each call, another member of it."""
        raise NotImplementedError("a backend's test class provides make_harness")

    @pytest.fixture
    def harness(self, make_harness: MakeHarness) -> Harness:
        """The test's harness."""
        return make_harness()

    def test_commands_reach_the_queue_they_are_routed_to_in_order_per_key(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    queue_service("beta", ConformanceOtherCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            assert system.route("ConformanceCommand") == "alpha"
            assert system.route("ConformanceOtherCommand") == "beta"
            await harness.prepare(system)
            keys = [f"K-{k}" for k in range(5)]
            await system.submit_many(
                harness.entry,
                [ConformanceCommand(key=k, seq=s) for s in range(20) for k in keys]
                + [ConformanceOtherCommand(key="K-0", seq=100 + s) for s in range(2)],
            )
            expected = {key: list(range(20)) for key in keys}
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", expected),
                    handled_all(harness, "beta", {"K-0": [100, 101]}),
                ),
            )
            assert await harness.recorded("alpha") == expected
            assert await harness.recorded("beta") == {"K-0": [100, 101]}
            assert await harness.recorded("watcher") == {}

        drive(scenario)

    def test_events_reach_every_subscriber_of_their_type(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    subscriber("first", ConformanceEvent),
                    subscriber("second", ConformanceEvent, ConformanceOtherEvent),
                    subscriber("third", ConformanceOtherEvent),
                ]
            )
            await harness.prepare(system)
            events: list[Any] = [ConformanceEvent(key=f"K-{i % 3}", seq=i) for i in range(12)]
            events += [ConformanceOtherEvent(key="K-0", seq=100 + i) for i in range(2)]
            await system.submit_many(harness.entry, events)
            expected = {f"K-{k}": list(range(k, 12, 3)) for k in range(3)}
            second = {**expected, "K-0": [0, 3, 6, 9, 100, 101]}
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "first", expected),
                    handled_all(harness, "second", second),
                    handled_all(harness, "third", {"K-0": [100, 101]}),
                ),
            )
            assert await harness.recorded("first") == expected
            assert await harness.recorded("second") == second
            assert await harness.recorded("third") == {"K-0": [100, 101]}
            assert not await harness.dead_letters()

        drive(scenario)

    @pytest.mark.parametrize("source", ["queue", "subscription"])
    def test_order_per_key_holds_despite_failures(self, harness: Harness, source: str) -> None:
        calls: Counter[tuple[str, int]] = Counter()

        async def flaky(ctx: Context, message: Any) -> None:
            calls[message.key, message.seq] += 1
            await record(ctx, message)
            if message.seq % 5 == 2 and calls[message.key, message.seq] <= 2:
                raise RuntimeError("transient")

        async def scenario() -> None:
            await harness.open()
            service = Service("alpha", retry=FAST_RETRY)
            kind: Any = ConformanceCommand if source == "queue" else ConformanceEvent
            if source == "queue":
                service.handles(ConformanceCommand)(flaky)
            else:
                service.subscribes(ConformanceEvent)(flaky)
            system = System([service])
            await harness.prepare(system)
            keys = [f"K-{k}" for k in range(4)]
            await system.submit_many(
                harness.entry, [kind(key=key, seq=seq) for seq in range(12) for key in keys]
            )
            expected = {key: list(range(12)) for key in keys}
            await run_until(harness, system, handled_all(harness, "alpha", expected))
            assert await harness.recorded("alpha") == expected
            assert all(calls[key, 2] >= 3 for key in keys)
            assert not await harness.dead_letters()

        drive(scenario)

    @pytest.mark.parametrize("source", ["queue", "subscription"])
    def test_a_poison_message_is_retried_with_backoff_then_dead_lettered(
        self, harness: Harness, source: str
    ) -> None:
        policy = RetryPolicy(max_attempts=3, initial_delay=0.1, multiplier=2.0, max_delay=1.0)
        poison_calls: list[float] = []
        poison_ids: set[str] = set()
        progress_when_handled: dict[tuple[str, int], int] = {}

        async def handler(ctx: Context, message: Any) -> None:
            if message.key == "K-poison" and message.seq == 0:
                poison_calls.append(asyncio.get_running_loop().time())
                poison_ids.add(ctx.envelope.message_id)
                raise RuntimeError("poison-boom: cannot handle this one")
            progress_when_handled[message.key, message.seq] = len(poison_calls)
            await record(ctx, message)

        async def scenario() -> None:
            await harness.open()
            service = Service("alpha", retry=policy)
            kind: Any = ConformanceCommand if source == "queue" else ConformanceEvent
            if source == "queue":
                service.handles(ConformanceCommand)(handler)
            else:
                service.subscribes(ConformanceEvent)(handler)
            system = System([service])
            await harness.prepare(system)
            poison = await system.submit(harness.entry, kind(key="K-poison", seq=0))
            await system.submit_many(
                harness.entry,
                [kind(key="K-poison", seq=1)]
                + [kind(key=f"K-{k}", seq=s) for s in range(5) for k in range(3)],
            )
            expected = {**{f"K-{k}": list(range(5)) for k in range(3)}, "K-poison": [1]}
            await run_until(
                harness,
                system,
                both(handled_all(harness, "alpha", expected), dead_lettered(harness)),
            )
            [dead] = await harness.dead_letters()
            assert (dead.consumer, dead.envelope.message_id) == ("alpha", poison.message_id)
            assert dead.envelope.body == poison.body
            assert dead.attempts == policy.max_attempts
            assert "poison-boom" in dead.reason and "RuntimeError" in dead.reason
            assert len(poison_calls) >= policy.max_attempts
            assert poison_ids == {poison.message_id}  # each attempt, the same message
            assert poison_calls[-1] - poison_calls[0] >= (policy.delay(1) + policy.delay(2)) * 0.9
            assert await harness.recorded("alpha") == expected
            # The poison's own key went on after it.
            assert progress_when_handled["K-poison", 1] == len(poison_calls)
            if source == "queue":
                # Other keys were not held up behind it. (A database bus reads a subscription's
                # partition through one cursor: there the poison holds its partition's keys.)
                others = [n for (key, _), n in progress_when_handled.items() if key != "K-poison"]
                assert max(others) < len(poison_calls)

        drive(scenario)

    def test_a_message_published_twice_is_handled_once(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            await harness.prepare(system)
            command = await system.submit(harness.entry, ConformanceCommand(key="K-1", seq=1))
            event = await system.submit(harness.entry, ConformanceEvent(key="K-1", seq=1))
            # The relay republishes after a crash between the broker's confirm and its mark.
            await harness.port.publish([command, event], system.routes)
            await system.submit_many(
                harness.entry,
                [ConformanceCommand(key="K-1", seq=2), ConformanceEvent(key="K-1", seq=2)],
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1, 2]}),
                    handled_all(harness, "watcher", {"K-1": [1, 2]}),
                ),
            )
            assert await harness.recorded("alpha") == {"K-1": [1, 2]}
            assert await harness.recorded("watcher") == {"K-1": [1, 2]}

        drive(scenario)

    def test_the_event_log_is_replayed_from_any_position(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System([subscriber("early", ConformanceEvent)])
            await harness.prepare(system)
            envelopes = await system.submit_many(
                harness.entry, [ConformanceEvent(key=f"K-{i % 4}", seq=i) for i in range(25)]
            )
            log = [
                e for e in await harness.replay(0) if e.envelope.message_type == "ConformanceEvent"
            ]
            # Every event once, each key's in the order published (the order across keys is the
            # bus's: RabbitMQ's log holds bundles of a partition's events).
            assert sorted(e.envelope.message_id for e in log) == sorted(
                e.message_id for e in envelopes
            )
            for key in {e.correlation_id for e in envelopes}:
                assert [e.envelope.body for e in log if e.envelope.correlation_id == key] == [
                    e.body for e in envelopes if e.correlation_id == key
                ]
            positions = [e.position for e in log]
            assert positions == sorted(set(positions))
            tail = await harness.replay(positions[9])
            assert [e.envelope.message_id for e in tail] == [
                e.envelope.message_id for e in log[10:]
            ]
            assert await harness.replay(positions[-1]) == []

        drive(scenario)

    def test_what_a_dead_consumer_held_is_delivered_to_another(
        self, make_harness: MakeHarness
    ) -> None:
        async def scenario() -> None:
            first = make_harness()
            await first.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            await first.prepare(system)
            command = await system.submit(first.entry, ConformanceCommand(key="K-1", seq=1))
            event = await system.submit(first.entry, ConformanceEvent(key="K-1", seq=1))
            queue, subscription = (
                spec for service in system.services.values() for spec in service.consumers()
            )
            loop = asyncio.get_running_loop()
            held = []
            for spec, message in ((queue, command), (subscription, event)):
                deadline = loop.time() + 15
                while True:
                    batch = await first.port.claim(spec, "doomed", 10)
                    if batch.deliveries:
                        break
                    assert loop.time() < deadline, "nothing delivered to the first consumer"
                    await first.port.wait_for_work(spec, 0.1)
                [delivery] = batch.deliveries
                assert delivery.envelope.message_id == message.message_id
                assert delivery.attempt == 1
                held.append(batch)
            await self.kill(first)
            second = make_harness()
            await second.open()
            await run_until(
                second,
                system,
                both(
                    handled_all(second, "alpha", {"K-1": [1]}),
                    handled_all(second, "watcher", {"K-1": [1]}),
                ),
                member="survivor",
                timeout=60,
            )
            await second.close()

        drive(scenario)

    async def kill(self, harness: Harness) -> None:
        """End a member without settling what it holds, as a crash does: its connection goes
        away (a broker gives the unacknowledged messages back; a database bus's leases expire)."""
        if harness.bus is not None:
            await harness.bus.close()
            harness.bus = None
            # Alone now, the store writes to its own database's bus, as the crashed member did.
            harness.store.outbox = False
