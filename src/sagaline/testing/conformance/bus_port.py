"""The bus port's conformance suite, run against every bus through the real message path.

Written once; each bus joins with a subclass that provides a ``make_harness`` fixture (a factory
of :class:`~sagaline.testing.conformance.harness.Harness`): the bus in the store's own database,
or a separate bus (a bus database, a broker) with the services' store in outbox mode, and the
way to make its store fail (``store_outage``, see
:class:`~sagaline.testing.conformance.store_faults.StoreFaultConformance`). Every test drives real
services and waits for what a user relies on: the handled messages in the store, the dead letters
with their reason, the replayed log.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import pytest

from sagaline.errors import DuplicateMessageId, InvalidMessage, NotAcceptedFromClients
from sagaline.handling import Context, Service, System
from sagaline.messages import MAX_MESSAGE_BYTES, encode_body
from sagaline.ports import DEAD_LETTER_BODY_BYTES, BrokerBus, RetryPolicy
from sagaline.testing.conformance.harness import (
    Harness,
    MakeHarness,
    both,
    dead_lettered,
    drive,
    handled_all,
    run_until,
)
from sagaline.testing.conformance.messages import (
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherCommand,
    ConformanceOtherEvent,
    hand_made,
    padded,
)
from sagaline.testing.conformance.services import (
    FAST_RETRY,
    queue_service,
    record,
    subscriber,
)
from sagaline.testing.conformance.store_faults import StoreFaultConformance

__all__ = ["BusPortConformance"]


class BusPortConformance(StoreFaultConformance):
    """What every bus must do on the message path. Subclasses provide ``make_harness``."""

    #: True when the bus is a database (its queues and log are tables), False for a broker.
    bus_is_a_database = True

    @pytest.fixture
    def make_harness(self, *args: Any, **kwargs: Any) -> MakeHarness | Iterator[MakeHarness]:
        """Makes a harness on the test's own storage; each call, another member of it."""
        raise NotImplementedError("a backend's test class provides make_harness")

    @pytest.fixture
    def harness(self, make_harness: MakeHarness) -> Harness:
        """The test's harness."""
        return make_harness()

    def store_bytes(self, store: Any) -> int | None:
        """How many bytes ``store`` takes on disk, or None where that is not known: a backend
        that tells shows that a dead-lettered large message does not grow its store by its size."""
        return None

    def test_commands_reach_the_queue_they_are_routed_to_in_order_per_key(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            await harness.prepare(system)
            keys = [f"K-{k}" for k in range(5)]
            await system.submit_many(
                harness.entry, [ConformanceCommand(key=k, seq=s) for s in range(20) for k in keys]
            )
            expected = {key: list(range(20)) for key in keys}
            await run_until(harness, system, handled_all(harness, "alpha", expected))
            assert await harness.recorded("alpha") == expected
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

    def test_a_poison_message_is_retried_with_backoff_then_dead_lettered(
        self, harness: Harness
    ) -> None:
        policy = RetryPolicy(max_attempts=3, initial_delay=0.1, multiplier=2.0, max_delay=1.0)
        poison_calls: list[float] = []
        progress_when_handled: dict[tuple[str, int], int] = {}

        async def handler(ctx: Context, command: ConformanceCommand) -> None:
            if command.key == "K-poison" and command.seq == 0:
                poison_calls.append(asyncio.get_running_loop().time())
                raise RuntimeError("poison-boom: cannot handle this one")
            progress_when_handled[command.key, command.seq] = len(poison_calls)
            await record(ctx, command)

        async def scenario() -> None:
            await harness.open()
            service = Service("alpha", retry=policy)
            service.handles(ConformanceCommand)(handler)
            system = System([service])
            await harness.prepare(system)
            poison = await system.submit(harness.entry, ConformanceCommand(key="K-poison", seq=0))
            await system.submit_many(
                harness.entry,
                [ConformanceCommand(key="K-poison", seq=1)]
                + [ConformanceCommand(key=f"K-{k}", seq=s) for s in range(5) for k in range(3)],
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
            assert poison_calls[-1] - poison_calls[0] >= (policy.delay(1) + policy.delay(2)) * 0.9
            assert await harness.recorded("alpha") == expected
            # Other keys were not held up behind it; the poison's own key went on after it.
            others = [n for (key, _), n in progress_when_handled.items() if key != "K-poison"]
            assert max(others) < len(poison_calls)
            assert progress_when_handled["K-poison", 1] == len(poison_calls)

        drive(scenario)

    @pytest.mark.parametrize("source", ["queue", "subscription"])
    def test_invalid_and_foreign_messages_are_dead_lettered_and_the_consumer_goes_on(
        self, harness: Harness, source: str
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            if source == "queue":
                system = System([queue_service("alpha", ConformanceCommand)])
                kind: Any = ConformanceCommand
                bad_body = b'{"commandType":"ConformanceCommand","key":"K-1","seq":"one"}'
                type_name = "ConformanceCommand"
                problem = "$.seq"
            else:
                system = System([subscriber("alpha", ConformanceEvent)])
                kind = ConformanceEvent
                bad_body = b'{"eventType":"ConformanceEvent","key":"K-1","seq":1,"x":2}'
                type_name = "ConformanceEvent"
                problem = "unknown field `x`"
            bad = hand_made(type_name, "K-1", bad_body)
            not_json = hand_made(type_name, "K-2", b"\xff\xfe not json")
            # JSON keeps the last of a repeated key; another reader may keep the first.
            repeated = hand_made(
                type_name,
                "K-3",
                f'{{"{kind.discriminator}":"{type_name}","key":"K-3","seq":3,"seq":4}}'.encode(),
            )
            await harness.inject([bad, not_json, repeated], system)
            await system.submit_many(
                harness.entry,
                [kind(key="K-1", seq=1), kind(key="K-2", seq=2), kind(key="K-3", seq=5)],
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1], "K-2": [2], "K-3": [5]}),
                    dead_lettered(harness, 3),
                ),
            )
            dead = {letter.envelope.message_id: letter for letter in await harness.dead_letters()}
            assert set(dead) == {bad.message_id, not_json.message_id, repeated.message_id}
            assert {letter.consumer for letter in dead.values()} == {"alpha"}
            assert "invalid" in dead[bad.message_id].reason
            assert problem in dead[bad.message_id].reason
            assert dead[bad.message_id].envelope.body == bad.body
            assert "invalid" in dead[not_json.message_id].reason
            assert "'seq' appears twice" in dead[repeated.message_id].reason
            assert dead[repeated.message_id].envelope.body == repeated.body
            assert await harness.recorded("alpha") == {"K-1": [1], "K-2": [2], "K-3": [5]}

        drive(scenario)

    def test_a_message_id_is_one_message_and_is_refused_for_another(self, harness: Harness) -> None:
        """A client's own message id makes its retry the same message. Another message under a
        used id is refused where the bus is a database, which can compare it with what it holds;
        a broker cannot, and its consumers take the first message under an id."""

        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    queue_service("beta", ConformanceOtherCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            await harness.prepare(system)
            entry = harness.entry
            command, event = (
                ConformanceCommand(key="K-1", seq=1),
                ConformanceEvent(key="K-1", seq=1),
            )
            for _ in range(2):  # the second time: a client's retry after a lost answer
                sent = await system.submit(entry, command, message_id="client:1")
                assert sent.message_id == "client:1"
                await system.submit(entry, event, message_id="client:2")
            others: list[tuple[Any, str]] = [
                (ConformanceCommand(key="K-1", seq=2), "client:1"),  # another body
                (ConformanceEvent(key="K-1", seq=2), "client:2"),
            ]
            # Two messages under one id in one call are refused on every bus.
            with pytest.raises(DuplicateMessageId):
                await system.submit_many(
                    entry,
                    [ConformanceCommand(key="K-4", seq=1), ConformanceCommand(key="K-4", seq=2)],
                    message_ids=["client:4", "client:4"],
                )
            if self.bus_is_a_database:
                # Another type too (on a broker it would reach another consumer, whose inbox
                # has not seen the id).
                others.append((ConformanceOtherCommand(key="K-1", seq=1), "client:1"))
                for message, message_id in others:
                    with pytest.raises(DuplicateMessageId) as caught:
                        await system.submit(entry, message, message_id=message_id)
                    assert caught.value.message_id == message_id
                    assert message_id in str(caught.value)
                # Refused in a batch, it takes the batch with it: nothing is written.
                with pytest.raises(DuplicateMessageId):
                    await system.submit_many(
                        entry,
                        [
                            ConformanceCommand(key="K-3", seq=1),
                            ConformanceCommand(key="K-1", seq=3),
                        ],
                        message_ids=["client:3", "client:1"],
                    )
            else:
                for message, message_id in others:
                    await system.submit(entry, message, message_id=message_id)
            # Later messages of the same keys: handled after whatever came before them.
            await system.submit_many(
                entry, [ConformanceCommand(key="K-1", seq=5), ConformanceEvent(key="K-1", seq=5)]
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1, 5]}),
                    handled_all(harness, "watcher", {"K-1": [1, 5]}),
                ),
            )
            assert await harness.recorded("alpha") == {"K-1": [1, 5]}
            assert await harness.recorded("watcher") == {"K-1": [1, 5]}
            assert await harness.recorded("beta") == {}

        drive(scenario)

    def test_a_message_whose_id_is_not_one_never_reaches_a_handler(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System([queue_service("alpha", ConformanceCommand)])
            await harness.prepare(system)
            with pytest.raises(InvalidMessage) as caught:
                await system.submit(
                    harness.entry, ConformanceCommand(key="K-1", seq=1), message_id="x" * 100_000
                )
            assert caught.value.field == "messageId"
            assert "100000 characters" in caught.value.reason
            body = encode_body(ConformanceCommand(key="K-1", seq=1))
            too_long = replace(hand_made("ConformanceCommand", "K-1", body), message_id="x" * 200)
            misshapen = replace(hand_made("ConformanceCommand", "K-1", body), message_id="id 7/é")
            if self.bus_is_a_database:
                # A database bus is only written through sagaline, which checks every id.
                for envelope in (too_long, misshapen):
                    with pytest.raises(InvalidMessage):
                        await harness.inject([envelope], system)
            else:
                # Anyone may publish to a broker: its consumers check what it delivers.
                await harness.inject([too_long, misshapen], system)
            await system.submit(harness.entry, ConformanceCommand(key="K-2", seq=2))
            expected_dead = 0 if self.bus_is_a_database else 2
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-2": [2]}),
                    dead_lettered(harness, expected_dead),
                ),
            )
            assert await harness.recorded("alpha") == {"K-2": [2]}
            dead = await harness.dead_letters()
            assert len(dead) == expected_dead
            reasons = sorted(letter.reason for letter in dead)
            if dead:
                assert "200 characters is longer than the limit of 128" in reasons[0]
                assert "'id 7/é' may only hold ASCII letters" in reasons[1]
                for letter in dead:
                    assert letter.envelope.body == body
                    assert letter.envelope.message_id not in (too_long.message_id, "id 7/é")

        drive(scenario)

    def test_what_clients_may_not_submit_is_refused_and_dead_lettered_if_it_comes_anyway(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    queue_service("internal", ConformanceOtherCommand),
                    subscriber("watcher", ConformanceEvent),
                ],
                accepts=[ConformanceCommand],
            )
            await harness.prepare(system)
            for message in (
                ConformanceOtherCommand(key="K-1", seq=1),
                ConformanceEvent(key="K-1", seq=1),
            ):
                with pytest.raises(NotAcceptedFromClients) as caught:
                    await system.submit(harness.entry, message)
                assert message.type_name() in str(caught.value)
                assert "clients may submit ConformanceCommand" in str(caught.value)
            # A client that puts them on the bus itself (straight onto a broker).
            command = hand_made(
                "ConformanceOtherCommand",
                "K-1",
                encode_body(ConformanceOtherCommand(key="K-1", seq=1)),
            )
            event = hand_made(
                "ConformanceEvent", "K-1", encode_body(ConformanceEvent(key="K-1", seq=1))
            )
            await harness.inject([command, event], system)
            # Its own services may send them.
            await system.submit_internal(
                harness.entry,
                [ConformanceOtherCommand(key="K-2", seq=2), ConformanceEvent(key="K-2", seq=2)],
                source="alpha",
            )
            await system.submit(harness.entry, ConformanceCommand(key="K-3", seq=3))
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-3": [3]}),
                    handled_all(harness, "internal", {"K-2": [2]}),
                    handled_all(harness, "watcher", {"K-2": [2]}),
                    dead_lettered(harness, 2),
                ),
            )
            assert await harness.recorded("internal") == {"K-2": [2]}
            assert await harness.recorded("watcher") == {"K-2": [2]}
            dead = {letter.envelope.message_id: letter for letter in await harness.dead_letters()}
            assert set(dead) == {command.message_id, event.message_id}
            assert dead[command.message_id].reason == (
                "internal command ConformanceOtherCommand not accepted from clients"
                " (source 'client')"
            )
            assert "internal event ConformanceEvent not accepted" in dead[event.message_id].reason

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
            await cast(BrokerBus, harness.port).publish([command, event], system.routes)
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

    def test_messages_up_to_the_size_limit_pass_and_bigger_ones_are_refused(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            await harness.prepare(system)
            # sagaline's limit is 1 MiB of body. A broker may allow less: NATS counts headers in
            # its server's max_payload (1 MiB by default), and refuses the rest at publish.
            limit = MAX_MESSAGE_BYTES
            broker_limit = getattr(harness.bus, "max_payload", None)
            if broker_limit is not None and broker_limit - 2048 < limit:
                limit = broker_limit - 2048
                with pytest.raises(InvalidMessage, match="max_payload"):
                    await system.submit(
                        harness.entry, padded(ConformanceCommand, "K-x", MAX_MESSAGE_BYTES)
                    )
            command = padded(ConformanceCommand, "K-big", limit)
            event = padded(ConformanceEvent, "K-big", limit - 10)
            await system.submit(harness.entry, command)
            await system.submit(harness.entry, event)
            with pytest.raises(InvalidMessage, match=str(MAX_MESSAGE_BYTES)):
                await system.submit(
                    harness.entry, padded(ConformanceCommand, "K-x", MAX_MESSAGE_BYTES + 1)
                )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-big": [0]}),
                    handled_all(harness, "watcher", {"K-big": [0]}),
                ),
            )
            store = cast(Any, harness.store)
            alpha = await store.get_document("bus.alpha", "K-big")
            watcher = await store.get_document("bus.watcher", "K-big")
            assert alpha.data["sizes"] == [len(command.payload)]
            assert watcher.data["sizes"] == [len(event.payload)]
            assert not await harness.dead_letters()

        drive(scenario)

    def test_a_large_message_is_dead_lettered_as_a_bounded_prefix_with_its_size_and_hash(
        self, harness: Harness
    ) -> None:
        """A big message that cannot be handled is kept as a prefix, its size and its SHA-256:
        the store does not grow by the message. Over sagaline's limit where the bus carries it
        (4 MiB); NATS's server refuses more than its max_payload (1 MiB by default), so there
        the message is as big as it takes and invalid."""

        async def scenario() -> None:
            await harness.open()
            system = System([queue_service("alpha", ConformanceCommand)])
            size = 4 * MAX_MESSAGE_BYTES
            broker_limit = getattr(harness.bus, "max_payload", None)
            if broker_limit is not None and broker_limit - 2048 < size:
                size = broker_limit - 2048
            head = (
                b'{"commandType":"ConformanceCommand","key":"K-1","seq":"not a number","payload":"'
            )
            body = head + b"x" * (size - len(head) - 2) + b'"}'
            assert len(body) == size
            big = hand_made("ConformanceCommand", "K-1", body)
            # Only the service's own store counts (not a bus in its database).
            before = self.store_bytes(harness.store) if harness.bus is not None else None
            await harness.inject([big], system)
            await system.submit(harness.entry, ConformanceCommand(key="K-1", seq=1))
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1]}),
                    dead_lettered(harness),
                ),
            )
            [dead] = await harness.dead_letters()
            assert dead.envelope.message_id == big.message_id
            assert dead.envelope.body == body[:DEAD_LETTER_BODY_BYTES]
            assert f"{size:,} bytes" in dead.reason
            assert hashlib.sha256(body).hexdigest() in dead.reason
            if size > MAX_MESSAGE_BYTES:
                assert str(MAX_MESSAGE_BYTES) in dead.reason
            assert await harness.recorded("alpha") == {"K-1": [1]}
            after = self.store_bytes(harness.store)
            if before is not None and after is not None:
                # The service's own store (the bus is elsewhere) keeps the prefix, not the body.
                assert after - before < size // 4

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
            cast(Any, harness.store).outbox = False
