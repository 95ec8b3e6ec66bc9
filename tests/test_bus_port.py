"""The bus port's conformance suite, run against every bus through the real message path.

Written once; each bus joins with a subclass that provides a :class:`Harness` factory: the bus in
the store's own database (SQLite, PostgreSQL), or a separate bus (a SQLite or PostgreSQL bus
database, RabbitMQ, NATS JetStream) with the services' store in outbox mode. Every test drives
real services (:class:`Runtime`) and waits for what a user relies on: the handled messages in the
store, the dead letters with their reason, the replayed log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import servers
from store_faults import StoreFaultConformance
from test_bus import (
    FAST_RETRY,
    BusTestCommand,
    BusTestEvent,
    BusTestOtherCommand,
    BusTestOtherEvent,
    hand_made,
    padded,
    queue_service,
    record,
    subscriber,
)

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.deploy import open_bus
from sagaline.errors import DuplicateMessageId, InvalidMessage, NotAcceptedFromClients
from sagaline.handling import Context, Runtime, Service, System
from sagaline.messages import MAX_MESSAGE_BYTES, Envelope, encode_body
from sagaline.ports import (
    DEAD_LETTER_BODY_BYTES,
    Backend,
    BrokerBus,
    DeadLetter,
    RetryPolicy,
    StoredEvent,
)


class Harness:
    """One store and one bus (the same object when the bus is in the store's database)."""

    def __init__(self, store: Backend, bus: BrokerBus | None) -> None:
        self.store = store
        self.bus = bus
        self.extra_buses: list[BrokerBus] = []
        _OPEN.append(self)

    @property
    def entry(self) -> Any:
        return self.bus if self.bus is not None else self.store

    @property
    def port(self) -> Any:
        """The object that claims and completes: the bus (or the store that is the bus)."""
        return self.bus if self.bus is not None else self.store

    async def open(self) -> None:
        await _open(self.store)
        if self.bus is not None:
            await _open(self.bus)

    async def close(self) -> None:
        if self.bus is not None and hasattr(self.bus, "delete_topology"):
            # What the test declared on a broker goes with it (it holds the broker's resources).
            with contextlib.suppress(Exception):
                await self.bus.delete_topology(
                    [c for b in self.extra_buses for c in getattr(b, "prepared_consumers", [])]
                )
        for bus in [*self.extra_buses, *([self.bus] if self.bus is not None else [])]:
            with contextlib.suppress(Exception):
                await bus.close()
        await self.store.close()

    async def prepare(self, system: System) -> None:
        consumers = [spec for service in system.services.values() for spec in service.consumers()]
        await cast(BrokerBus, self.port).prepare(consumers, system.routes)

    async def inject(self, envelopes: list[Envelope], system: System) -> None:
        """Put hand-made envelopes on the bus as they are, unchecked (what a broken or hostile
        producer could do)."""
        await self.prepare(system)
        await cast(BrokerBus, self.port).publish(envelopes, system.routes)

    def runtime(
        self, system: System, services: list[str] | None = None, member: str = "m"
    ) -> Runtime:
        return Runtime(
            self.store, system, services, bus=self.bus, member=member, poll_interval=0.05
        )

    def recorded(self, service: str) -> dict[str, list[int]]:
        rows = cast(Any, self.store).query_documents(f"bus.{service}")
        return {row["key"]: row["seqs"] for row in rows}

    def dead_letters(self) -> list[DeadLetter]:
        return list(cast(Any, self.store).dead_letters())

    async def replay(self, after: int = 0) -> list[StoredEvent]:
        return [stored async for stored in cast(BrokerBus, self.port).replay(after)]


def _sqlite_files(store: Backend) -> list[Path] | None:
    """The files of a SQLite store (main file and WAL), or None for another store."""
    if not isinstance(store, SqliteDatabase):
        return None
    return [Path(store.path), Path(store.path + "-wal")]


def _size(files: list[Path] | None) -> int:
    if files is None:
        return 0
    return sum(path.stat().st_size for path in files if path.exists())


#: Harnesses made by the running test; closed in the test's event loop when it ends.
_OPEN: list[Harness] = []


def drive(scenario: Callable[[], Any]) -> None:
    """Run a test's scenario, then close every harness it made, in the same event loop."""

    async def go() -> None:
        try:
            await scenario()
        finally:
            while _OPEN:
                with contextlib.suppress(Exception):
                    await _OPEN.pop().close()

    asyncio.run(go())


async def _open(resource: object) -> None:
    opener = getattr(resource, "open", None)
    if opener is not None:
        await opener()


MakeHarness = Callable[[], Harness]


async def run_until(
    harness: Harness,
    system: System,
    done: Callable[[], bool],
    services: list[str] | None = None,
    timeout: float = 30,
    member: str = "m",
) -> Runtime:
    await harness.prepare(system)
    runtime = harness.runtime(system, services, member)
    await runtime.run_until(done, timeout=timeout)
    return runtime


def handled_all(
    harness: Harness, service: str, expected: dict[str, list[int]]
) -> Callable[[], bool]:
    def done() -> bool:
        found = harness.recorded(service)
        return all(len(found.get(key, [])) >= len(seqs) for key, seqs in expected.items())

    return done


def both(*conditions: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: all(condition() for condition in conditions)


class BusPortConformance(StoreFaultConformance):
    """What every bus must do on the message path. Subclasses provide ``make_harness``."""

    #: True when the bus is a database (its queues and log are tables), False for a broker.
    bus_is_a_database = True

    @pytest.fixture
    def make_harness(self, tmp_path: Path) -> Iterator[MakeHarness]:
        raise NotImplementedError

    @pytest.fixture
    def harness(self, make_harness: MakeHarness) -> Harness:
        return make_harness()

    def test_commands_reach_the_queue_they_are_routed_to_in_order_per_key(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [queue_service("alpha", BusTestCommand), subscriber("watcher", BusTestEvent)]
            )
            await harness.prepare(system)
            keys = [f"K-{k}" for k in range(5)]
            await system.submit_many(
                harness.entry, [BusTestCommand(key=k, seq=s) for s in range(20) for k in keys]
            )
            expected = {key: list(range(20)) for key in keys}
            await run_until(harness, system, handled_all(harness, "alpha", expected))
            assert harness.recorded("alpha") == expected
            assert harness.recorded("watcher") == {}

        drive(scenario)

    def test_events_reach_every_subscriber_of_their_type(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    subscriber("first", BusTestEvent),
                    subscriber("second", BusTestEvent, BusTestOtherEvent),
                    subscriber("third", BusTestOtherEvent),
                ]
            )
            await harness.prepare(system)
            events: list[Any] = [BusTestEvent(key=f"K-{i % 3}", seq=i) for i in range(12)]
            events += [BusTestOtherEvent(key="K-0", seq=100 + i) for i in range(2)]
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
            assert harness.recorded("first") == expected
            assert harness.recorded("second") == second
            assert harness.recorded("third") == {"K-0": [100, 101]}

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
            kind: Any = BusTestCommand if source == "queue" else BusTestEvent
            if source == "queue":
                service.handles(BusTestCommand)(flaky)
            else:
                service.subscribes(BusTestEvent)(flaky)
            system = System([service])
            await harness.prepare(system)
            keys = [f"K-{k}" for k in range(4)]
            await system.submit_many(
                harness.entry, [kind(key=key, seq=seq) for seq in range(12) for key in keys]
            )
            expected = {key: list(range(12)) for key in keys}
            await run_until(harness, system, handled_all(harness, "alpha", expected))
            assert harness.recorded("alpha") == expected
            assert all(calls[key, 2] >= 3 for key in keys)
            assert not harness.dead_letters()

        drive(scenario)

    def test_a_poison_message_is_retried_with_backoff_then_dead_lettered(
        self, harness: Harness
    ) -> None:
        policy = RetryPolicy(max_attempts=3, initial_delay=0.1, multiplier=2.0, max_delay=1.0)
        poison_calls: list[float] = []

        async def handler(ctx: Context, command: BusTestCommand) -> None:
            if command.key == "K-poison" and command.seq == 0:
                poison_calls.append(asyncio.get_running_loop().time())
                raise RuntimeError("poison-boom: cannot handle this one")
            await record(ctx, command)

        async def scenario() -> None:
            await harness.open()
            service = Service("alpha", retry=policy)
            service.handles(BusTestCommand)(handler)
            system = System([service])
            await harness.prepare(system)
            poison = await system.submit(harness.entry, BusTestCommand(key="K-poison", seq=0))
            await system.submit_many(
                harness.entry,
                [BusTestCommand(key="K-poison", seq=1)]
                + [BusTestCommand(key=f"K-{k}", seq=s) for s in range(5) for k in range(3)],
            )
            expected = {**{f"K-{k}": list(range(5)) for k in range(3)}, "K-poison": [1]}
            await run_until(
                harness,
                system,
                both(handled_all(harness, "alpha", expected), lambda: bool(harness.dead_letters())),
            )
            [dead] = harness.dead_letters()
            assert (dead.consumer, dead.envelope.message_id) == ("alpha", poison.message_id)
            assert dead.envelope.body == poison.body
            assert dead.attempts == policy.max_attempts
            assert "poison-boom" in dead.reason and "RuntimeError" in dead.reason
            assert len(poison_calls) >= policy.max_attempts
            assert poison_calls[-1] - poison_calls[0] >= (policy.delay(1) + policy.delay(2)) * 0.9
            assert harness.recorded("alpha") == expected

        drive(scenario)

    @pytest.mark.parametrize("source", ["queue", "subscription"])
    def test_invalid_and_foreign_messages_are_dead_lettered_and_the_consumer_goes_on(
        self, harness: Harness, source: str
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            if source == "queue":
                system = System([queue_service("alpha", BusTestCommand)])
                kind: Any = BusTestCommand
                bad_body = b'{"commandType":"BusTestCommand","key":"K-1","seq":"one"}'
                type_name = "BusTestCommand"
            else:
                system = System([subscriber("alpha", BusTestEvent)])
                kind = BusTestEvent
                bad_body = b'{"eventType":"BusTestEvent","key":"K-1","seq":1,"x":2}'
                type_name = "BusTestEvent"
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
                    lambda: len(harness.dead_letters()) >= 3,
                ),
            )
            dead = {letter.envelope.message_id: letter for letter in harness.dead_letters()}
            assert set(dead) == {bad.message_id, not_json.message_id, repeated.message_id}
            assert "invalid" in dead[bad.message_id].reason
            assert dead[bad.message_id].envelope.body == bad.body
            assert "invalid" in dead[not_json.message_id].reason
            assert "'seq' appears twice" in dead[repeated.message_id].reason
            assert dead[repeated.message_id].envelope.body == repeated.body
            assert harness.recorded("alpha") == {"K-1": [1], "K-2": [2], "K-3": [5]}

        drive(scenario)

    def test_a_message_id_is_one_message_and_is_refused_for_another(self, harness: Harness) -> None:
        """A client's own message id makes its retry the same message. Another message under a
        used id is refused where the bus is a database, which can compare it with what it holds;
        a broker cannot, and its consumers take the first message under an id."""

        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", BusTestCommand),
                    queue_service("beta", BusTestOtherCommand),
                    subscriber("watcher", BusTestEvent),
                ]
            )
            await harness.prepare(system)
            entry = harness.entry
            command, event = BusTestCommand(key="K-1", seq=1), BusTestEvent(key="K-1", seq=1)
            for _ in range(2):  # the second time: a client's retry after a lost answer
                sent = await system.submit(entry, command, message_id="client:1")
                assert sent.message_id == "client:1"
                await system.submit(entry, event, message_id="client:2")
            others: list[tuple[Any, str]] = [
                (BusTestCommand(key="K-1", seq=2), "client:1"),  # another body
                (BusTestEvent(key="K-1", seq=2), "client:2"),
            ]
            # Two messages under one id in one call are refused on every bus.
            with pytest.raises(DuplicateMessageId):
                await system.submit_many(
                    entry,
                    [BusTestCommand(key="K-4", seq=1), BusTestCommand(key="K-4", seq=2)],
                    message_ids=["client:4", "client:4"],
                )
            if self.bus_is_a_database:
                # Another type too (on a broker it would reach another consumer, whose inbox
                # has not seen the id).
                others.append((BusTestOtherCommand(key="K-1", seq=1), "client:1"))
                for message, message_id in others:
                    with pytest.raises(DuplicateMessageId) as caught:
                        await system.submit(entry, message, message_id=message_id)
                    assert caught.value.message_id == message_id
                    assert message_id in str(caught.value)
                # Refused in a batch, it takes the batch with it: nothing is written.
                with pytest.raises(DuplicateMessageId):
                    await system.submit_many(
                        entry,
                        [BusTestCommand(key="K-3", seq=1), BusTestCommand(key="K-1", seq=3)],
                        message_ids=["client:3", "client:1"],
                    )
            else:
                for message, message_id in others:
                    await system.submit(entry, message, message_id=message_id)
            # Later messages of the same keys: handled after whatever came before them.
            await system.submit_many(
                entry, [BusTestCommand(key="K-1", seq=5), BusTestEvent(key="K-1", seq=5)]
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1, 5]}),
                    handled_all(harness, "watcher", {"K-1": [1, 5]}),
                ),
            )
            assert harness.recorded("alpha") == {"K-1": [1, 5]}
            assert harness.recorded("watcher") == {"K-1": [1, 5]}
            assert harness.recorded("beta") == {}

        drive(scenario)

    def test_a_message_whose_id_is_not_one_never_reaches_a_handler(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System([queue_service("alpha", BusTestCommand)])
            await harness.prepare(system)
            with pytest.raises(InvalidMessage) as caught:
                await system.submit(
                    harness.entry, BusTestCommand(key="K-1", seq=1), message_id="x" * 100_000
                )
            assert caught.value.field == "messageId"
            assert "100000 characters" in caught.value.reason
            body = encode_body(BusTestCommand(key="K-1", seq=1))
            too_long = replace(hand_made("BusTestCommand", "K-1", body), message_id="x" * 200)
            misshapen = replace(hand_made("BusTestCommand", "K-1", body), message_id="id 7/é")
            if self.bus_is_a_database:
                # A database bus is only written through sagaline, which checks every id.
                for envelope in (too_long, misshapen):
                    with pytest.raises(InvalidMessage):
                        await harness.inject([envelope], system)
            else:
                # Anyone may publish to a broker: its consumers check what it delivers.
                await harness.inject([too_long, misshapen], system)
            await system.submit(harness.entry, BusTestCommand(key="K-2", seq=2))
            expected_dead = 0 if self.bus_is_a_database else 2
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-2": [2]}),
                    lambda: len(harness.dead_letters()) >= expected_dead,
                ),
            )
            assert harness.recorded("alpha") == {"K-2": [2]}
            dead = harness.dead_letters()
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
                    queue_service("alpha", BusTestCommand),
                    queue_service("internal", BusTestOtherCommand),
                    subscriber("watcher", BusTestEvent),
                ],
                accepts=[BusTestCommand],
            )
            await harness.prepare(system)
            for message in (BusTestOtherCommand(key="K-1", seq=1), BusTestEvent(key="K-1", seq=1)):
                with pytest.raises(NotAcceptedFromClients) as caught:
                    await system.submit(harness.entry, message)
                assert message.type_name() in str(caught.value)
                assert "clients may submit BusTestCommand" in str(caught.value)
            # A client that puts them on the bus itself (straight onto a broker).
            command = hand_made(
                "BusTestOtherCommand",
                "K-1",
                encode_body(BusTestOtherCommand(key="K-1", seq=1)),
            )
            event = hand_made("BusTestEvent", "K-1", encode_body(BusTestEvent(key="K-1", seq=1)))
            await harness.inject([command, event], system)
            # Its own services may send them.
            await system.submit_internal(
                harness.entry,
                [BusTestOtherCommand(key="K-2", seq=2), BusTestEvent(key="K-2", seq=2)],
                source="alpha",
            )
            await system.submit(harness.entry, BusTestCommand(key="K-3", seq=3))
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-3": [3]}),
                    handled_all(harness, "internal", {"K-2": [2]}),
                    handled_all(harness, "watcher", {"K-2": [2]}),
                    lambda: len(harness.dead_letters()) >= 2,
                ),
            )
            assert harness.recorded("internal") == {"K-2": [2]}
            assert harness.recorded("watcher") == {"K-2": [2]}
            dead = {letter.envelope.message_id: letter for letter in harness.dead_letters()}
            assert set(dead) == {command.message_id, event.message_id}
            assert dead[command.message_id].reason == (
                "internal command BusTestOtherCommand not accepted from clients (source 'client')"
            )
            assert "internal event BusTestEvent not accepted" in dead[event.message_id].reason

        drive(scenario)

    def test_a_message_published_twice_is_handled_once(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [queue_service("alpha", BusTestCommand), subscriber("watcher", BusTestEvent)]
            )
            await harness.prepare(system)
            command = await system.submit(harness.entry, BusTestCommand(key="K-1", seq=1))
            event = await system.submit(harness.entry, BusTestEvent(key="K-1", seq=1))
            # The relay republishes after a crash between the broker's confirm and its mark.
            await cast(BrokerBus, harness.port).publish([command, event], system.routes)
            await system.submit_many(
                harness.entry, [BusTestCommand(key="K-1", seq=2), BusTestEvent(key="K-1", seq=2)]
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1, 2]}),
                    handled_all(harness, "watcher", {"K-1": [1, 2]}),
                ),
            )
            assert harness.recorded("alpha") == {"K-1": [1, 2]}
            assert harness.recorded("watcher") == {"K-1": [1, 2]}

        drive(scenario)

    def test_messages_up_to_the_size_limit_pass_and_bigger_ones_are_refused(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [queue_service("alpha", BusTestCommand), subscriber("watcher", BusTestEvent)]
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
                        harness.entry, padded(BusTestCommand, "K-x", MAX_MESSAGE_BYTES)
                    )
            command = padded(BusTestCommand, "K-big", limit)
            event = padded(BusTestEvent, "K-big", limit - 10)
            await system.submit(harness.entry, command)
            await system.submit(harness.entry, event)
            with pytest.raises(InvalidMessage, match=str(MAX_MESSAGE_BYTES)):
                await system.submit(
                    harness.entry, padded(BusTestCommand, "K-x", MAX_MESSAGE_BYTES + 1)
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
            assert store.get_document_sync("bus.alpha", "K-big").data["sizes"] == [
                len(command.payload)
            ]
            assert store.get_document_sync("bus.watcher", "K-big").data["sizes"] == [
                len(event.payload)
            ]
            assert not harness.dead_letters()

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
            system = System([queue_service("alpha", BusTestCommand)])
            size = 4 * MAX_MESSAGE_BYTES
            broker_limit = getattr(harness.bus, "max_payload", None)
            if broker_limit is not None and broker_limit - 2048 < size:
                size = broker_limit - 2048
            head = b'{"commandType":"BusTestCommand","key":"K-1","seq":"not a number","payload":"'
            body = head + b"x" * (size - len(head) - 2) + b'"}'
            assert len(body) == size
            big = hand_made("BusTestCommand", "K-1", body)
            store_files = _sqlite_files(harness.store) if harness.bus is not None else None
            before = _size(store_files)
            await harness.inject([big], system)
            await system.submit(harness.entry, BusTestCommand(key="K-1", seq=1))
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1]}),
                    lambda: bool(harness.dead_letters()),
                ),
            )
            [dead] = harness.dead_letters()
            assert dead.envelope.message_id == big.message_id
            assert dead.envelope.body == body[:DEAD_LETTER_BODY_BYTES]
            assert f"{size:,} bytes" in dead.reason
            assert hashlib.sha256(body).hexdigest() in dead.reason
            if size > MAX_MESSAGE_BYTES:
                assert str(MAX_MESSAGE_BYTES) in dead.reason
            assert harness.recorded("alpha") == {"K-1": [1]}
            if store_files is not None:
                # The service's own store (the bus is elsewhere) keeps the prefix, not the body.
                assert _size(store_files) - before < size // 4

        drive(scenario)

    def test_the_event_log_is_replayed_from_any_position(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System([subscriber("early", BusTestEvent)])
            await harness.prepare(system)
            envelopes = await system.submit_many(
                harness.entry, [BusTestEvent(key=f"K-{i % 4}", seq=i) for i in range(25)]
            )
            log = [e for e in await harness.replay(0) if e.envelope.message_type == "BusTestEvent"]
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
                [queue_service("alpha", BusTestCommand), subscriber("watcher", BusTestEvent)]
            )
            await first.prepare(system)
            command = await system.submit(first.entry, BusTestCommand(key="K-1", seq=1))
            event = await system.submit(first.entry, BusTestEvent(key="K-1", seq=1))
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
            harness.store.outbox = False  # type: ignore[attr-defined]


class TestSqliteBusPort(BusPortConformance):
    """Store and bus in one SQLite file."""

    @pytest.fixture
    def make_harness(self, tmp_path: Path) -> Iterator[MakeHarness]:
        made: list[Harness] = []

        def make() -> Harness:
            db = SqliteDatabase(f"sqlite:///{tmp_path}/one.db", lease_seconds=0.5)
            harness = Harness(db, None)
            made.append(harness)
            return harness

        yield make


class TestSeparateSqliteBusPort(BusPortConformance):
    """Each member's store in its own SQLite file (outbox mode), the bus in another."""

    @pytest.fixture
    def make_harness(self, tmp_path: Path) -> Iterator[MakeHarness]:
        made: list[Harness] = []

        def make() -> Harness:
            store = SqliteDatabase(f"sqlite:///{tmp_path}/store.db", outbox=True)
            bus = SqliteDatabase(f"sqlite:///{tmp_path}/bus.db", lease_seconds=0.5)
            harness = Harness(store, bus)
            made.append(harness)
            return harness

        yield make


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of this test's own on the PostgreSQL server."""
    yield from servers.postgres_database()


class TestPostgresBusPort(BusPortConformance):
    """Store and bus in one PostgreSQL database (the bus in a schema of its own)."""

    @pytest.fixture
    def make_harness(self, postgres_url: str) -> Iterator[MakeHarness]:
        from sagaline.backends.postgres import PostgresDatabase

        made: list[Harness] = []

        def make() -> Harness:
            db = PostgresDatabase(postgres_url, schema="svc", bus_schema="bus", lease_seconds=0.5)
            harness = Harness(db, None)
            made.append(harness)
            return harness

        yield make


class TestSeparatePostgresBusPort(BusPortConformance):
    """The store in a PostgreSQL schema (outbox mode), the bus in another database's schema."""

    @pytest.fixture
    def make_harness(self, postgres_url: str) -> Iterator[MakeHarness]:
        from sagaline.backends.postgres import PostgresDatabase

        made: list[Harness] = []

        def make() -> Harness:
            store = PostgresDatabase(postgres_url, schema="svc", outbox=True)
            bus = open_bus(postgres_url, lease_seconds=0.5)
            harness = Harness(store, bus)
            made.append(harness)
            return harness

        yield make


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A virtual host of this test's own on the RabbitMQ server."""
    yield from servers.rabbitmq_vhost()


class TestRabbitmqBusPort(BusPortConformance):
    """RabbitMQ: quorum queues with single active consumers per partition, a stream for replay."""

    bus_is_a_database = False

    @pytest.fixture
    def make_harness(self, rabbitmq_url: str, tmp_path: Path) -> Iterator[MakeHarness]:
        made: list[Harness] = []

        def make() -> Harness:
            store = SqliteDatabase(f"sqlite:///{tmp_path}/store-{len(made)}.db", outbox=True)
            harness = Harness(store, open_bus(rabbitmq_url))
            made.append(harness)
            return harness

        yield make


@pytest.fixture
def nats_url() -> Iterator[str]:
    """A stream and subject prefix of this test's own on the NATS server."""
    yield from servers.nats_prefix()


class TestNatsBusPort(BusPortConformance):
    """NATS JetStream: file streams, durable pull consumers per partition."""

    bus_is_a_database = False

    @pytest.fixture
    def make_harness(self, nats_url: str, tmp_path: Path) -> Iterator[MakeHarness]:
        made: list[Harness] = []

        def make() -> Harness:
            store = SqliteDatabase(f"sqlite:///{tmp_path}/store-{len(made)}.db", outbox=True)
            harness = Harness(store, open_bus(nats_url))
            made.append(harness)
            return harness

        yield make

    def test_a_message_the_broker_refuses_is_set_aside_and_the_outbox_goes_on(
        self, harness: Harness
    ) -> None:
        """NATS refuses a body that passes sagaline's 1 MiB limit but not the server's
        max_payload: the relay dead-letters it (consumer ``outbox``) instead of blocking."""

        async def relay(ctx: Context, command: BusTestCommand) -> None:
            size = MAX_MESSAGE_BYTES - 100 if command.seq == 0 else 100
            ctx.publish(padded(BusTestEvent, command.key, size))
            await record(ctx, command)

        async def scenario() -> None:
            await harness.open()
            service = Service("alpha", retry=FAST_RETRY)
            service.handles(BusTestCommand)(relay)
            system = System([service, subscriber("watcher", BusTestEvent)])
            await harness.prepare(system)
            await system.submit_many(
                harness.entry, [BusTestCommand(key="K-1", seq=0), BusTestCommand(key="K-2", seq=1)]
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "watcher", {"K-2": [0]}),
                    lambda: bool(harness.dead_letters()),
                ),
            )
            [dead] = harness.dead_letters()
            assert dead.consumer == "outbox"
            assert dead.envelope.message_type == "BusTestEvent"
            assert "max_payload" in dead.reason
            assert harness.recorded("alpha") == {"K-1": [0], "K-2": [1]}
            assert cast(Any, harness.store).outbox_pending() == 0

        drive(scenario)


class TestPostgresStoreBehindRabbitmq(StoreFaultConformance):
    """A PostgreSQL store (outbox mode) behind RabbitMQ: its faults, not the bus's whole suite."""

    @pytest.fixture
    def harness(self, postgres_url: str, rabbitmq_url: str) -> Harness:
        from sagaline.backends.postgres import PostgresDatabase

        store = PostgresDatabase(postgres_url, schema="svc", outbox=True)
        return Harness(store, open_bus(rabbitmq_url))


class TestPostgresStoreBehindNats(StoreFaultConformance):
    """A PostgreSQL store (outbox mode) behind NATS JetStream: its faults."""

    @pytest.fixture
    def harness(self, postgres_url: str, nats_url: str) -> Harness:
        from sagaline.backends.postgres import PostgresDatabase

        store = PostgresDatabase(postgres_url, schema="svc", outbox=True)
        return Harness(store, open_bus(nats_url))
