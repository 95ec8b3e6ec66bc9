"""The conformance suite of a backend that is store and bus in one database (the Backend port).

What every bus does on the message path is :class:`~.bus_port.BusPortConformance`'s, run on
such a backend too; this suite checks what only a bus in the store's database shows: the commands
each queue holds and a row per command (its queue, deliveries and outcome), claims leased to a
member and settled in the store's transaction, members sharing partitions through their leases,
and the bus's events in the store's own log, read in order from any position.

A backend joins by subclassing :class:`BusConformance` and providing the ``make_backend``
fixture: a factory that opens the backend (store and bus) on the test's own storage, with an
optional lease duration (``make_backend(lease_seconds=0.3)``) and clock
(``make_backend(clock=FakeClock())``, see :mod:`.timing`), and closes what it opened when the
test ends.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import pytest

from sagaline.handling import Condition, Context, Runtime, Service, System
from sagaline.ports import Batch, Bus, Outcome, RetryPolicy
from sagaline.testing.conformance.adapters import InspectableBackend
from sagaline.testing.conformance.messages import (
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherCommand,
)
from sagaline.testing.conformance.services import queue_service, record, recorded, subscriber
from sagaline.testing.conformance.timing import ClockConformance, OpenBackend

__all__ = ["BusConformance", "OpenBackend", "idle", "run"]


def idle(db: InspectableBackend, subscribers: Iterable[str] = ()) -> Callable[[], Awaitable[bool]]:
    """No command pending and every named subscriber caught up with the log."""
    subscribers = set(subscribers)

    async def done() -> bool:
        lag = await db.subscription_lag()
        return (
            not await db.pending_counts()
            and set(lag) >= subscribers
            and not any(lag[name] for name in subscribers)
        )

    return done


async def run(
    db: InspectableBackend,
    system: System,
    done: Condition,
    services: list[str] | None = None,
    timeout: float = 20,
) -> Runtime:
    """Run ``system``'s services (or those named) on ``db`` until ``done``."""
    runtime = Runtime(db, system, services, member="bus-test", poll_interval=0.05)
    await runtime.run_until(done, timeout=timeout)
    return runtime


async def commands_of(db: InspectableBackend, key: str) -> list[dict[str, Any]]:
    """The commands of ``key`` the backend knows, in the order they were sent."""
    rows = [r for r in await db.trace_rows(key) if r["kind"] == "command"]
    return sorted(rows, key=lambda r: r["sequence"])


class BusConformance(ClockConformance):
    """What a store and bus in one database must show. Subclass it and provide ``make_backend``."""

    @pytest.fixture
    def make_backend(self, *args: Any, **kwargs: Any) -> OpenBackend | Iterator[OpenBackend]:
        """Opens the backend on the test's own storage (``lease_seconds=`` shortens leases,
        ``clock=`` is the clock it reads them from)."""
        raise NotImplementedError("a backend's test class provides make_backend")

    @pytest.fixture
    def backend(self, make_backend: OpenBackend) -> InspectableBackend:
        """The test's backend."""
        return make_backend()

    def test_it_implements_the_bus_port(self, backend: InspectableBackend) -> None:
        assert isinstance(backend, Bus)

    def test_each_queue_holds_its_commands_until_its_service_takes_them(
        self, backend: InspectableBackend
    ) -> None:
        async def scenario() -> None:
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    queue_service("beta", ConformanceOtherCommand),
                ]
            )
            assert system.route("ConformanceCommand") == "alpha"
            assert system.route("ConformanceOtherCommand") == "beta"
            await system.submit_many(
                backend,
                [ConformanceCommand(key="K-1", seq=i) for i in range(3)]
                + [ConformanceOtherCommand(key="K-1", seq=10 + i) for i in range(2)],
            )
            assert await backend.pending_counts() == {"alpha": 3, "beta": 2}

            async def alpha_done() -> bool:
                return "alpha" not in await backend.pending_counts()

            await run(backend, system, alpha_done, ["alpha"])
            assert await recorded(backend, "alpha") == {"K-1": [0, 1, 2]}
            assert await recorded(backend, "beta") == {}
            assert await backend.pending_counts() == {"beta": 2}

            await run(backend, system, idle(backend), ["beta"])
            assert await recorded(backend, "alpha") == {"K-1": [0, 1, 2]}
            assert await recorded(backend, "beta") == {"K-1": [10, 11]}
            assert {r["queue"] for r in await commands_of(backend, "K-1")} == {"alpha", "beta"}

        asyncio.run(scenario())

    def test_a_command_row_keeps_its_queue_deliveries_and_outcome(
        self, backend: InspectableBackend
    ) -> None:
        policy = RetryPolicy(max_attempts=3, initial_delay=0.01, multiplier=2.0, max_delay=0.05)
        calls: Counter[tuple[str, int]] = Counter()

        async def handler(ctx: Context, command: ConformanceCommand) -> None:
            calls[command.key, command.seq] += 1
            await record(ctx, command)  # rolled back with its unit when it fails
            if command.key == "K-dead":
                raise RuntimeError("poison-boom: cannot handle this one")
            if command.seq == 1 and calls[command.key, command.seq] <= 2:
                raise RuntimeError("transient failure")

        async def scenario() -> None:
            service = Service("alpha", retry=policy)
            service.handles(ConformanceCommand)(handler)
            system = System([service, queue_service("beta", ConformanceOtherCommand)])
            await system.submit_many(
                backend,
                [
                    ConformanceCommand(key="K-dead", seq=0),
                    ConformanceCommand(key="K-1", seq=0),
                    ConformanceCommand(key="K-1", seq=1),
                    ConformanceOtherCommand(key="K-1", seq=10),
                ],
            )
            await run(backend, system, idle(backend))
            assert await recorded(backend, "alpha") == {"K-1": [0, 1]}
            assert await recorded(backend, "beta") == {"K-1": [10]}
            [dead] = await commands_of(backend, "K-dead")
            assert (dead["queue"], dead["outcome"]) == ("alpha", "dead")
            assert dead["deliveries"] == policy.max_attempts
            rows = {(r["queue"], r["body"]["seq"]): r for r in await commands_of(backend, "K-1")}
            assert set(rows) == {("alpha", 0), ("alpha", 1), ("beta", 10)}
            assert {r["outcome"] for r in rows.values()} == {"handled"}
            assert rows["alpha", 1]["deliveries"] >= 2
            [letter] = await backend.dead_letters()
            assert letter.attempts == policy.max_attempts

        asyncio.run(scenario())

    def test_an_unsettled_command_is_delivered_again_when_its_lease_expires(
        self, make_backend: OpenBackend
    ) -> None:
        lease = 0.3

        async def scenario() -> None:
            db = make_backend(lease_seconds=lease)
            service = queue_service("alpha", ConformanceCommand)
            [spec] = service.consumers()
            system = System([service])
            sent = await system.submit(db, ConformanceCommand(key="K-1", seq=1))
            loop = asyncio.get_running_loop()

            first = await db.claim(spec, "member-1", 10)
            claimed_at = loop.time()
            [delivery] = first.deliveries
            assert (delivery.envelope.message_id, delivery.attempt) == (sent.message_id, 1)
            # member-1 never settles it (it died). While the lease holds, nobody gets it.
            early = await db.claim(spec, "member-2", 10)
            if loop.time() - claimed_at < lease * 0.8:
                assert early.deliveries == []

            deadline = loop.time() + 10 * lease + 5
            again: Batch | None = None
            while loop.time() < deadline:
                batch = await db.claim(spec, "member-2", 10)
                if batch.deliveries:
                    again = batch
                    break
                await asyncio.sleep(lease / 6)
            assert again is not None, "the command was not delivered again after its lease"
            assert loop.time() - claimed_at >= lease * 0.9
            [redelivery] = again.deliveries
            assert redelivery.envelope.message_id == sent.message_id
            assert redelivery.envelope.body == sent.body
            assert redelivery.attempt == 2
            async with db.transaction() as tx:
                await db.settle(tx, again, [(Outcome.ACK, None)])
            assert await db.pending_counts() == {}
            assert (await db.claim(spec, "member-1", 10)).deliveries == []

        asyncio.run(scenario())

    # ----------------------------------------------------------------- events

    def test_two_members_of_a_subscriber_share_its_partitions(
        self, backend: InspectableBackend
    ) -> None:
        async def scenario() -> None:
            service = subscriber("shared", ConformanceEvent)
            [spec] = service.consumers()
            system = System([service])
            loop = asyncio.get_running_loop()
            received: dict[str, list[str]] = {"m1": [], "m2": []}

            async def drain(member: str) -> set[Any]:
                """Claim and acknowledge until this member has nothing; its ordering keys."""
                keys: set[Any] = set()
                while True:
                    batch = await backend.claim(spec, member, 50)
                    if not batch.deliveries and batch.cursor is None:
                        return keys
                    async with backend.transaction() as tx:
                        await backend.settle(
                            tx, batch, [(Outcome.ACK, None)] * len(batch.deliveries)
                        )
                    for delivery in batch.deliveries:
                        received[member].append(delivery.envelope.message_id)
                        keys.add(delivery.ordering_key)

            published: list[str] = []
            deadline = loop.time() + 20
            wave = 0
            shared = False
            while not shared and loop.time() < deadline:
                envelopes = await system.submit_many(
                    backend, [ConformanceEvent(key=f"K-{wave}-{i}", seq=i) for i in range(16)]
                )
                published += [e.message_id for e in envelopes]
                first, second = await drain("m1"), await drain("m2")
                # Shared once both members got part of one wave, from different partitions.
                shared = bool(first) and bool(second)
                if shared:
                    assert not first & second
                else:
                    await asyncio.sleep(0.1)
                wave += 1
            assert shared, "the second member never got a share of the partitions"
            await drain("m1")
            await drain("m2")
            everything = received["m1"] + received["m2"]
            assert Counter(everything) == Counter(published)
            assert received["m1"] and received["m2"]

        asyncio.run(scenario())

    def test_the_log_can_be_replayed_from_any_position(self, backend: InspectableBackend) -> None:
        async def scenario() -> None:
            system = System([subscriber("early", ConformanceEvent)])
            envelopes = await system.submit_many(
                backend, [ConformanceEvent(key=f"K-{i % 4}", seq=i) for i in range(25)]
            )
            log = await backend.read_log(0, 1000)
            assert [e.envelope.message_id for e in log] == [e.message_id for e in envelopes]
            positions = [e.position for e in log]
            assert positions == sorted(set(positions))
            middle = positions[9]
            tail = await backend.read_log(middle, 1000)
            assert [e.envelope.message_id for e in tail] == [e.message_id for e in envelopes[10:]]
            assert [e.position for e in await backend.read_log(middle, 4)] == positions[10:14]
            streamed = [e async for e in backend.iter_log(middle, batch=4)]
            assert [e.position for e in streamed] == positions[10:]
            assert [e.envelope.body for e in streamed] == [e.body for e in envelopes[10:]]
            assert [e async for e in backend.iter_log(positions[-1], batch=4)] == []

            # A subscriber that joins late still receives the retained events from the start.
            await run(backend, system, idle(backend, {"early"}))
            late_system = System(
                [subscriber("early", ConformanceEvent), subscriber("late", ConformanceEvent)]
            )
            await run(backend, late_system, idle(backend, {"early", "late"}), ["late"])
            assert await recorded(backend, "late") == await recorded(backend, "early")
            assert sum(len(v) for v in (await recorded(backend, "late")).values()) == 25

        asyncio.run(scenario())

    # -------------------------------------------------------------- handover

    def test_a_stopped_member_hands_its_partitions_over_at_once(
        self, backend: InspectableBackend
    ) -> None:
        async def scenario() -> None:
            system = System([subscriber("watcher", ConformanceEvent)])
            await system.submit(backend, ConformanceEvent(key="K-1", seq=0))
            done = idle(backend, {"watcher"})
            await Runtime(backend, system, member="before-restart").run_until(done, timeout=20)
            await system.submit(backend, ConformanceEvent(key="K-1", seq=1))
            # The restarted process has a new member id; it must not wait out the old lease.
            await Runtime(backend, system, member="after-restart").run_until(done, timeout=3)
            assert await recorded(backend, "watcher") == {"K-1": [0, 1]}

        asyncio.run(scenario())
