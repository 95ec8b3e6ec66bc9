"""The Bus port's conformance suite for a backend that is store and bus in one database.

A backend joins by subclassing :class:`BusConformance` and providing the ``make_backend``
fixture: a factory that opens the backend (store and bus) on the test's own storage, with an
optional lease duration (``make_backend(lease_seconds=0.3)``), and closes what it opened when the
test ends.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

import pytest

from sagaline.errors import InvalidMessage
from sagaline.handling import Condition, Context, Runtime, Service, System
from sagaline.messages import MAX_MESSAGE_BYTES, encode_body
from sagaline.ports import Batch, Bus, Outcome, RetryPolicy
from sagaline.testing.conformance.adapters import InspectableBackend
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
    recorded,
    subscriber,
)

__all__ = ["BusConformance", "OpenBackend", "idle", "run"]


class OpenBackend(Protocol):
    """Opens the backend of the test (another handle on the same storage at each call)."""

    def __call__(self, *, lease_seconds: float | None = None) -> InspectableBackend: ...


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


class BusConformance:
    """Behaviour every Bus adapter must show. Subclass it and provide ``make_backend``."""

    @pytest.fixture
    def make_backend(self, *args: Any, **kwargs: Any) -> OpenBackend | Iterator[OpenBackend]:
        """Opens the backend on the test's own storage (``lease_seconds=`` shortens leases)."""
        raise NotImplementedError("a backend's test class provides make_backend")

    @pytest.fixture
    def backend(self, make_backend: OpenBackend) -> InspectableBackend:
        """The test's backend."""
        return make_backend()

    # ------------------------------------------------------------------ queues

    def test_it_implements_the_bus_port(self, backend: InspectableBackend) -> None:
        assert isinstance(backend, Bus)

    def test_commands_are_delivered_to_the_queue_they_are_routed_to(
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

    def test_commands_of_one_key_are_handled_in_order_despite_failures(
        self, backend: InspectableBackend
    ) -> None:
        calls: Counter[tuple[str, int]] = Counter()

        async def flaky(ctx: Context, command: ConformanceCommand) -> None:
            calls[command.key, command.seq] += 1
            # Every fourth message fails its first two tries, and its whole unit rolls back.
            if command.seq % 4 == 1 and calls[command.key, command.seq] <= 2:
                await record(ctx, command)
                raise RuntimeError(f"transient failure of {command.key}/{command.seq}")
            await record(ctx, command)

        async def scenario() -> None:
            service = Service("alpha", retry=FAST_RETRY)
            service.handles(ConformanceCommand)(flaky)
            system = System([service])
            keys = [f"K-{k}" for k in range(4)]
            await system.submit_many(
                backend, [ConformanceCommand(key=key, seq=seq) for seq in range(15) for key in keys]
            )
            await run(backend, system, idle(backend))
            assert await recorded(backend, "alpha") == {key: list(range(15)) for key in keys}
            for key in keys:
                deliveries = {
                    r["body"]["seq"]: r["deliveries"] for r in await commands_of(backend, key)
                }
                assert all(deliveries[seq] >= 2 for seq in range(1, 15, 4))
                assert {r["outcome"] for r in await commands_of(backend, key)} == {"handled"}
            assert not await backend.dead_letters()

        asyncio.run(scenario())

    def test_a_poison_command_is_retried_with_backoff_then_dead_lettered(
        self, backend: InspectableBackend
    ) -> None:
        policy = RetryPolicy(max_attempts=3, initial_delay=0.05, multiplier=2.0, max_delay=1.0)
        poison_calls: list[float] = []
        progress_when_handled: dict[tuple[str, int], int] = {}

        async def handler(ctx: Context, command: ConformanceCommand) -> None:
            if command.key == "K-poison" and command.seq == 0:
                poison_calls.append(asyncio.get_running_loop().time())
                raise RuntimeError("poison-boom: cannot handle this one")
            progress_when_handled[command.key, command.seq] = len(poison_calls)
            await record(ctx, command)

        async def scenario() -> None:
            service = Service("alpha", retry=policy)
            service.handles(ConformanceCommand)(handler)
            system = System([service])
            poison = await system.submit(backend, ConformanceCommand(key="K-poison", seq=0))
            await system.submit(backend, ConformanceCommand(key="K-poison", seq=1))
            await system.submit_many(
                backend,
                [ConformanceCommand(key=f"K-{k}", seq=s) for s in range(5) for k in range(3)],
            )
            await run(backend, system, idle(backend))

            [dead] = await backend.dead_letters()
            assert dead.consumer == "alpha"
            assert dead.envelope.message_id == poison.message_id
            assert dead.envelope.body == poison.body
            assert dead.attempts == policy.max_attempts
            assert "poison-boom: cannot handle this one" in dead.reason
            assert "RuntimeError" in dead.reason
            [row] = [r for r in await commands_of(backend, "K-poison") if r["body"]["seq"] == 0]
            assert (row["outcome"], row["deliveries"]) == ("dead", policy.max_attempts)

            # Backoff: the attempts were spread over at least the policy's delays.
            waited = policy.delay(1) + policy.delay(2)
            assert poison_calls[-1] - poison_calls[0] >= waited * 0.9
            # Other keys were not held up behind it; the poison's own key went on after it.
            handled = await recorded(backend, "alpha")
            assert handled == {**{f"K-{k}": list(range(5)) for k in range(3)}, "K-poison": [1]}
            others = [n for (key, _), n in progress_when_handled.items() if key != "K-poison"]
            assert max(others) < len(poison_calls)
            assert progress_when_handled["K-poison", 1] == len(poison_calls)

        asyncio.run(scenario())

    def test_an_invalid_command_body_is_dead_lettered_and_the_queue_goes_on(
        self, backend: InspectableBackend
    ) -> None:
        async def scenario() -> None:
            system = System([queue_service("alpha", ConformanceCommand)])
            bad = hand_made(
                "ConformanceCommand",
                "K-1",
                b'{"commandType":"ConformanceCommand","key":"K-1","seq":"one"}',
            )
            async with backend.transaction() as tx:
                await tx.emit([bad], system.routes)
            await system.submit_many(
                backend,
                [ConformanceCommand(key="K-1", seq=1), ConformanceCommand(key="K-2", seq=2)],
            )
            await run(backend, system, idle(backend))
            [dead] = await backend.dead_letters()
            assert dead.consumer == "alpha"
            assert dead.envelope.message_id == bad.message_id
            assert dead.envelope.body == bad.body
            assert "invalid" in dead.reason and "$.seq" in dead.reason
            assert await recorded(backend, "alpha") == {"K-1": [1], "K-2": [2]}

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

    def test_events_reach_every_subscriber_of_their_type(self, backend: InspectableBackend) -> None:
        async def scenario() -> None:
            system = System(
                [
                    subscriber("first", ConformanceEvent),
                    subscriber("second", ConformanceEvent, ConformanceOtherEvent),
                    subscriber("third", ConformanceOtherEvent),
                ]
            )
            events: list[Any] = [ConformanceEvent(key=f"K-{i % 3}", seq=i) for i in range(12)]
            events += [ConformanceOtherEvent(key="K-0", seq=100 + i) for i in range(2)]
            await system.submit_many(backend, events)
            await run(backend, system, idle(backend, {"first", "second", "third"}))
            expected = {f"K-{k}": list(range(k, 12, 3)) for k in range(3)}
            assert await recorded(backend, "first") == expected
            assert await recorded(backend, "second") == {**expected, "K-0": [0, 3, 6, 9, 100, 101]}
            assert await recorded(backend, "third") == {"K-0": [100, 101]}

        asyncio.run(scenario())

    def test_events_of_one_key_are_handled_in_order_despite_failures(
        self, backend: InspectableBackend
    ) -> None:
        calls: Counter[tuple[str, int]] = Counter()

        async def flaky(ctx: Context, event: ConformanceEvent) -> None:
            calls[event.key, event.seq] += 1
            await record(ctx, event)
            if event.seq % 5 == 2 and calls[event.key, event.seq] <= 2:
                raise RuntimeError("transient")

        async def scenario() -> None:
            service = Service("watcher", retry=FAST_RETRY)
            service.subscribes(ConformanceEvent)(flaky)
            system = System([service])
            keys = [f"K-{k}" for k in range(6)]
            await system.submit_many(
                backend, [ConformanceEvent(key=key, seq=seq) for seq in range(12) for key in keys]
            )
            await run(backend, system, idle(backend, {"watcher"}))
            assert await recorded(backend, "watcher") == {key: list(range(12)) for key in keys}
            assert all(calls[key, 2] >= 3 for key in keys)
            assert not await backend.dead_letters()

        asyncio.run(scenario())

    def test_a_poison_event_is_dead_lettered_and_the_subscriber_goes_on(
        self, backend: InspectableBackend
    ) -> None:
        policy = RetryPolicy(max_attempts=3, initial_delay=0.02, multiplier=2.0, max_delay=1.0)
        poison_calls = Counter[str]()

        async def handler(ctx: Context, event: ConformanceEvent) -> None:
            if event.key == "K-poison" and event.seq == 0:
                poison_calls[ctx.envelope.message_id] += 1
                raise ValueError("event-boom")
            await record(ctx, event)

        async def scenario() -> None:
            service = Service("watcher", retry=policy)
            service.subscribes(ConformanceEvent)(handler)
            system = System([service])
            poison = await system.submit(backend, ConformanceEvent(key="K-poison", seq=0))
            await system.submit_many(
                backend,
                [ConformanceEvent(key="K-poison", seq=1)]
                + [ConformanceEvent(key=f"K-{k}", seq=s) for s in range(4) for k in range(4)],
            )
            await run(backend, system, idle(backend, {"watcher"}))
            [dead] = await backend.dead_letters()
            assert (dead.consumer, dead.envelope.message_id) == ("watcher", poison.message_id)
            assert dead.attempts == policy.max_attempts
            assert "event-boom" in dead.reason and "ValueError" in dead.reason
            assert set(poison_calls) == {poison.message_id}
            assert await recorded(backend, "watcher") == {
                **{f"K-{k}": list(range(4)) for k in range(4)},
                "K-poison": [1],
            }

        asyncio.run(scenario())

    def test_an_invalid_event_body_is_dead_lettered_and_the_subscriber_goes_on(
        self, backend: InspectableBackend
    ) -> None:
        async def scenario() -> None:
            system = System([subscriber("watcher", ConformanceEvent)])
            bad = hand_made(
                "ConformanceEvent",
                "K-1",
                b'{"eventType":"ConformanceEvent","key":"K-1","seq":1,"x":2}',
            )
            await system.submit(backend, ConformanceEvent(key="K-1", seq=0))
            async with backend.transaction() as tx:
                await tx.emit([bad], system.routes)
            await system.submit(backend, ConformanceEvent(key="K-1", seq=2))
            await run(backend, system, idle(backend, {"watcher"}))
            [dead] = await backend.dead_letters()
            assert (dead.consumer, dead.envelope.message_id) == ("watcher", bad.message_id)
            assert "invalid" in dead.reason and "`x`" in dead.reason
            assert await recorded(backend, "watcher") == {"K-1": [0, 2]}

        asyncio.run(scenario())

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

    # ------------------------------------------------------------------ sizes

    def test_messages_up_to_the_size_limit_pass(self, backend: InspectableBackend) -> None:
        async def scenario() -> None:
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            command = padded(ConformanceCommand, "K-big", MAX_MESSAGE_BYTES)
            event = padded(ConformanceEvent, "K-big", MAX_MESSAGE_BYTES - 10)
            await system.submit(backend, command)
            await system.submit(backend, event)
            await run(backend, system, idle(backend, {"watcher"}))
            assert not await backend.dead_letters()
            alpha = await backend.get_document("bus.alpha", "K-big")
            watcher = await backend.get_document("bus.watcher", "K-big")
            assert alpha is not None and alpha.data["sizes"] == [len(command.payload)]
            assert watcher is not None and watcher.data["sizes"] == [len(event.payload)]

        asyncio.run(scenario())

    def test_oversize_messages_are_refused_or_dead_lettered(
        self, backend: InspectableBackend
    ) -> None:
        async def scenario() -> None:
            system = System([queue_service("alpha", ConformanceCommand)])
            with pytest.raises(InvalidMessage):
                await system.submit(
                    backend, padded(ConformanceCommand, "K-1", MAX_MESSAGE_BYTES + 1)
                )
            assert await backend.pending_counts() == {}

            huge = padded(ConformanceCommand, "K-1", MAX_MESSAGE_BYTES + 1)
            bad = hand_made("ConformanceCommand", "K-1", encode_body(huge))
            async with backend.transaction() as tx:
                await tx.emit([bad], system.routes)
            await system.submit(backend, ConformanceCommand(key="K-1", seq=7))
            await run(backend, system, idle(backend))
            [dead] = await backend.dead_letters()
            assert dead.envelope.message_id == bad.message_id
            assert str(MAX_MESSAGE_BYTES) in dead.reason
            assert await recorded(backend, "alpha") == {"K-1": [7]}

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
