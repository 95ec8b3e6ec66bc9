"""The NATS JetStream bus against a real server: each test on its own streams, removed afterwards.

The server is shared and outlives runs, so every test uses a random prefix (its streams, consumers
and lease bucket are named with it). Without a reachable server the tests are skipped, unless
``SAGALINE_REQUIRE_SERVICES=1``, where they fail. Services keep their state in SQLite stores in
outbox mode, one file per service, as a broker bus requires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
import servers
from nats.js.errors import NotFoundError

from sagaline.backends.nats import UNKNOWN_TYPE, BusUnavailable, MessageTooLarge, NatsBus
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.deploy import open_bus
from sagaline.handling import Context, Runtime, Service, System
from sagaline.messages import MAX_MESSAGE_BYTES
from sagaline.orders import SERVICE_NAMES, build_system
from sagaline.orders.demo import DEMO_STOCK, demo_orders
from sagaline.orders.inventory import set_stock
from sagaline.orders.read import ORDER_VIEW
from sagaline.ports import Batch, BrokerBus, ConsumerSpec, Outcome, RetryPolicy
from sagaline.testing.conformance import (
    FAST_RETRY,
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherCommand,
    ConformanceOtherEvent,
    Harness,
    drive,
    padded,
    queue_service,
    record,
    subscriber,
)
from sagaline.testing.conformance.harness import both, dead_lettered, handled_all, run_until


def recorded(store: SqliteDatabase, service: str) -> dict[str, list[int]]:
    """What ``service`` recorded in ``store`` (see the conformance suites' ``record``), read
    without awaiting: the stores here are SQLite files."""
    return {row["key"]: row["seqs"] for row in store.sync.query_documents(f"bus.{service}")}


NATS_URL = os.environ.get("SAGALINE_NATS_URL", "nats://127.0.0.1:4222")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 1.0):
            return True
    except OSError:
        return False


class NatsKit:
    """One test's buses and stores: its own prefix on the shared server, its own files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.buses: list[NatsBus] = []
        self.stores: dict[str, SqliteDatabase] = {}

    async def bus(
        self, *, lease_seconds: float = 2.0, ack_wait: float = 2.0, url: str = NATS_URL
    ) -> NatsBus:
        """An open bus on this test's prefix (short leases, so that take-overs are quick)."""
        bus = NatsBus(url, prefix=self.prefix, lease_seconds=lease_seconds, ack_wait=ack_wait)
        await bus.open()
        self.buses.append(bus)
        return bus

    def store(self, name: str) -> SqliteDatabase:
        """The outbox-mode store of service ``name``."""
        if name not in self.stores:
            url = f"sqlite:///{self.directory}/{name}.db"
            self.stores[name] = SqliteDatabase(url, outbox=True)
        return self.stores[name]

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        """Run ``scenario`` in its own event loop; close the buses and stores it opened."""

        async def main() -> None:
            try:
                await scenario()
            finally:
                for bus in self.buses:
                    if not bus.connection.is_closed:
                        await bus.close()
                for store in self.stores.values():
                    await store.close()

        asyncio.run(main())

    async def remove(self) -> None:
        """Delete this test's streams and lease bucket from the server."""
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        for stream in (f"{self.prefix}_commands", f"{self.prefix}_events"):
            with suppress(NotFoundError):
                await js.delete_stream(stream)
        with suppress(NotFoundError):
            await js.delete_key_value(self.prefix)
        await nc.close()


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[NatsKit]:
    if not _reachable(NATS_URL):
        message = f"no NATS server at {NATS_URL}"
        if os.environ.get("SAGALINE_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    kit = NatsKit(tmp_path)
    try:
        yield kit
    finally:
        asyncio.run(kit.remove())


async def run(
    bus: NatsBus,
    system: System,
    stores: Mapping[str, SqliteDatabase],
    done: Callable[[], bool],
    *,
    member: str = "nats-test",
    timeout: float = 30.0,
) -> list[Runtime]:
    """Run each named service on its store with ``bus`` until ``done()``."""
    runtimes = [
        Runtime(store, system, [name], bus=bus, member=f"{member}-{name}", poll_interval=0.05)
        for name, store in stores.items()
    ]
    await asyncio.gather(*(runtime.run_until(done, timeout=timeout) for runtime in runtimes))
    return runtimes


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds (fails the test after ``timeout`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def unsettled(bus: NatsBus, spec: ConsumerSpec) -> int:
    """Messages of a consumer not yet delivered, or delivered and not settled."""
    kind = "q" if spec.source == "queue" else "s"
    stream = bus.command_stream if spec.source == "queue" else bus.event_stream
    total = 0
    for partition in range(bus.partitions):
        info = await bus.jetstream.consumer_info(stream, f"{kind}-{spec.name}-{partition}")
        total += info.num_pending + info.num_ack_pending
    return total


async def claim_all(
    bus: NatsBus, spec: ConsumerSpec, member: str, count: int, *, settle: bool, timeout: float = 20
) -> list[Batch]:
    """Claim until ``count`` deliveries came; acknowledge them when ``settle``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    batches: list[Batch] = []
    while sum(len(batch.deliveries) for batch in batches) < count:
        assert loop.time() < deadline, "the deliveries did not come"
        batch = await bus.claim(spec, member, 100)
        if not batch.deliveries:
            await asyncio.sleep(0.05)
            continue
        if settle:
            await bus.complete(batch, [(Outcome.ACK, None)] * len(batch.deliveries))
        batches.append(batch)
    return batches


async def expect_unsettled(
    bus: NatsBus, spec: ConsumerSpec, expected: int, timeout: float = 10.0
) -> None:
    """Wait until the server counts ``expected`` unsettled messages of a consumer: an ack is
    sent without waiting, and the server applies it to the consumer a moment later."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (found := await unsettled(bus, spec)) != expected:
        assert loop.time() < deadline, f"{found} unsettled, expected {expected}"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------- the port


def test_it_implements_the_broker_bus_port(kit: NatsKit) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        assert isinstance(bus, BrokerBus)

    kit.run(scenario)


def test_prepare_is_idempotent_and_safe_from_several_processes(kit: NatsKit) -> None:
    async def scenario() -> None:
        first, second = await kit.bus(), await kit.bus()
        system = System(
            [queue_service("alpha", ConformanceCommand), subscriber("watcher", ConformanceEvent)]
        )
        specs = [spec for service in system.services.values() for spec in service.consumers()]
        await asyncio.gather(
            first.prepare(specs, system.routes), second.prepare(specs, system.routes)
        )
        await first.prepare(specs, system.routes)
        names = [info.name async for info in _consumers(first, first.command_stream)]
        assert sorted(names) == sorted(f"q-alpha-{p}" for p in range(first.partitions))
        info = await first.jetstream.consumer_info(first.event_stream, "s-watcher-0")
        assert info.config.max_deliver == FAST_RETRY.delivery_limit

    kit.run(scenario)


async def _consumers(bus: NatsBus, stream: str) -> Any:
    for info in await bus.jetstream.consumers_info(stream):
        yield info


# ------------------------------------------------------------------------------------ queues


def test_commands_wait_in_their_queues_consumer_and_leave_the_stream_once_acknowledged(
    kit: NatsKit,
) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        system = System(
            [
                queue_service("alpha", ConformanceCommand),
                queue_service("beta", ConformanceOtherCommand),
            ]
        )
        alpha, beta = kit.store("alpha"), kit.store("beta")
        await system.submit_many(
            bus,
            [ConformanceCommand(key="K-1", seq=i) for i in range(3)]
            + [ConformanceOtherCommand(key="K-1", seq=10 + i) for i in range(2)],
        )
        await run(bus, system, {"alpha": alpha}, lambda: recorded(alpha, "alpha") != {})
        [alpha_queue] = system.services["alpha"].consumers()
        [beta_queue] = system.services["beta"].consumers()
        await expect_unsettled(bus, alpha_queue, 0)
        await expect_unsettled(bus, beta_queue, 2)

        await run(bus, system, {"beta": beta}, lambda: recorded(beta, "beta") != {})
        await expect_unsettled(bus, beta_queue, 0)
        # A work queue: what was acknowledged is gone from the stream.
        assert (await bus.jetstream.stream_info(bus.command_stream)).state.messages == 0

    kit.run(scenario)


def test_a_command_without_a_route_is_refused(kit: NatsKit) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        envelope = System([queue_service("alpha", ConformanceCommand)])._accept(
            ConformanceCommand(key="K-1", seq=1)
        )
        with pytest.raises(Exception, match="no service handles ConformanceCommand"):
            await bus.publish([envelope], {})

    kit.run(scenario)


def test_a_message_the_worker_dead_letters_is_settled_on_the_server(kit: NatsKit) -> None:
    """The worker dead-letters it in the store and acknowledges it: the server holds nothing of
    it any more (it will not deliver it again)."""
    policy = RetryPolicy(max_attempts=2, initial_delay=0.01)

    async def handler(ctx: Context, command: ConformanceCommand) -> None:
        raise RuntimeError("poison-boom")

    async def scenario() -> None:
        bus = await kit.bus()
        service = Service("alpha", retry=policy)
        service.handles(ConformanceCommand)(handler)
        system = System([service])
        store = kit.store("alpha")
        poison = await system.submit(bus, ConformanceCommand(key="K-poison", seq=0))
        await run(bus, system, {"alpha": store}, lambda: bool(store.sync.dead_letters()))
        [dead] = store.sync.dead_letters()
        assert (dead.envelope.message_id, dead.attempts) == (poison.message_id, 2)
        [queue] = service.consumers()
        await expect_unsettled(bus, queue, 0)
        assert (await bus.jetstream.stream_info(bus.command_stream)).state.messages == 0

    kit.run(scenario)


def test_a_message_without_sagaline_headers_is_dead_lettered(kit: NatsKit) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        system = System(
            [queue_service("alpha", ConformanceCommand), subscriber("watcher", ConformanceEvent)]
        )
        alpha, watcher = kit.store("alpha"), kit.store("watcher")
        specs = [spec for service in system.services.values() for spec in service.consumers()]
        await bus.prepare(specs, system.routes)
        part = bus.partition_of("K-1")
        command = b'{"commandType":"ConformanceCommand","key":"K-1","seq":5}'
        event = b'{"eventType":"ConformanceEvent","key":"K-1","seq":6}'
        await bus.jetstream.publish(f"{bus.prefix}.cmd.alpha.{part}", command)
        await bus.jetstream.publish(f"{bus.prefix}.evt.ConformanceEvent.{part}", event)
        await system.submit(bus, ConformanceCommand(key="K-1", seq=7))
        await system.submit(bus, ConformanceEvent(key="K-1", seq=8))

        def done() -> bool:
            return (
                recorded(alpha, "alpha") == {"K-1": [7]}
                and recorded(watcher, "watcher") == {"K-1": [8]}
                and len(alpha.sync.dead_letters()) == 1
                and len(watcher.sync.dead_letters()) == 1
            )

        await run(bus, system, {"alpha": alpha, "watcher": watcher}, done)
        for store, body in ((alpha, command), (watcher, event)):
            [dead] = store.sync.dead_letters()
            assert dead.envelope.message_type == UNKNOWN_TYPE
            assert dead.envelope.body == body
            assert "unknown" in dead.reason

    kit.run(scenario)


def test_a_message_published_twice_is_stored_once(kit: NatsKit) -> None:
    """The server's duplicate window (the message id as ``Nats-Msg-Id``) keeps one copy."""

    async def scenario() -> None:
        bus = await kit.bus()
        system = System([queue_service("alpha", ConformanceCommand)])
        first = await system.submit(bus, ConformanceCommand(key="K-1", seq=1), message_id="order-1")
        await system.submit(bus, ConformanceCommand(key="K-1", seq=1), message_id="order-1")
        await bus.publish([first], system.routes)  # the relay publishing after a crash
        assert (await bus.jetstream.stream_info(bus.command_stream)).state.messages == 1

    kit.run(scenario)


def test_a_publish_without_a_connection_raises_and_publishes_nothing(kit: NatsKit) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        system = System([queue_service("alpha", ConformanceCommand)])
        await bus.prepare([], system.routes)
        await bus.connection.close()
        with pytest.raises(BusUnavailable):
            await system.submit(bus, ConformanceCommand(key="K-1", seq=1))
        other = await kit.bus()
        assert (await other.jetstream.stream_info(other.command_stream)).state.messages == 0

    kit.run(scenario)


class TcpProxy:
    """A TCP relay to the NATS server that a test can cut, refuse and let through again."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 4222)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


def test_consumers_go_on_after_a_reconnect_and_a_publish_while_disconnected_raises(
    kit: NatsKit,
) -> None:
    async def scenario() -> None:
        proxy = TcpProxy(NATS_URL)
        await proxy.start()
        bus = await kit.bus(url=proxy.url)
        direct = await kit.bus()
        system = System([queue_service("alpha", ConformanceCommand)])
        store = kit.store("alpha")
        runtime = Runtime(store, system, bus=bus, member="m1", poll_interval=0.05)

        def handled(count: int) -> Callable[[], bool]:
            return lambda: len(recorded(store, "alpha").get("K-1", [])) >= count

        running = asyncio.create_task(runtime.run_until(handled(20), timeout=60))
        await system.submit_many(bus, [ConformanceCommand(key="K-1", seq=i) for i in range(10)])
        await wait_until(handled(10))

        await proxy.stop()
        await wait_until(lambda: not bus.connection.is_connected)
        with pytest.raises(BusUnavailable):
            await system.submit(bus, ConformanceCommand(key="K-1", seq=99))
        # Meanwhile other processes go on publishing.
        await system.submit_many(
            direct, [ConformanceCommand(key="K-1", seq=i) for i in range(10, 20)]
        )
        await proxy.start()
        await running
        assert recorded(store, "alpha") == {"K-1": list(range(20))}

    kit.run(scenario)


def test_the_password_of_the_url_is_in_no_log_record_nor_error(
    kit: NatsKit, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        proxy = TcpProxy(NATS_URL)
        await proxy.start()
        url = proxy.url.replace("nats://", "nats://app:s3cret@")
        shown = proxy.url.replace("nats://", "nats://app:***@")
        bus = await kit.bus(url=url)
        system = System([queue_service("alpha", ConformanceCommand)])
        await proxy.stop()
        await wait_until(lambda: not bus.connection.is_connected)
        with pytest.raises(BusUnavailable) as disconnected:
            await system.submit(bus, ConformanceCommand(key="K-1", seq=1))
        await proxy.start()
        await wait_until(lambda: bus.connection.is_connected)
        await wait_until(lambda: any("reconnected" in r.getMessage() for r in caplog.records))
        assert shown in str(disconnected.value)
        assert "s3cret" not in str(disconnected.value)
        assert "s3cret" not in repr(bus)

        # A server that cannot be reached: open() gives up after its connect timeout.
        await proxy.stop()
        unreachable = NatsBus(url, prefix=kit.prefix, connect_timeout=1.0)
        with pytest.raises(BusUnavailable) as refused:
            await unreachable.open()
        assert str(refused.value).startswith(f"NATS at {shown} is unreachable: ")
        assert "s3cret" not in str(refused.value)

    with caplog.at_level(logging.DEBUG, logger="sagaline"):
        kit.run(scenario)
    logged = [record.getMessage() for record in caplog.records]
    assert any("disconnected from nats://app:***@" in message for message in logged), logged
    assert not [message for message in logged if "s3cret" in message]


# ---------------------------------------------------------------------------- members


def test_a_dead_members_messages_are_delivered_to_another_member(kit: NatsKit) -> None:
    async def scenario() -> None:
        dying, survivor = await kit.bus(), await kit.bus()
        service = queue_service("alpha", ConformanceCommand)
        [spec] = service.consumers()
        system = System([service])
        await dying.prepare([spec], system.routes)
        sent = await system.submit_many(
            dying, [ConformanceCommand(key=f"K-{i % 3}", seq=i) for i in range(9)]
        )
        loop = asyncio.get_running_loop()
        taken = await claim_all(dying, spec, "m1", 9, settle=False)
        assert {d.envelope.message_id for b in taken for d in b.deliveries} == {
            e.message_id for e in sent
        }
        died_at = loop.time()
        await dying.connection.close()  # no ack, no leave: the process died

        again = await claim_all(survivor, spec, "m2", 9, settle=True)
        deliveries = [d for batch in again for d in batch.deliveries]
        assert loop.time() - died_at >= survivor.ack_wait * 0.9
        assert sorted(d.envelope.message_id for d in deliveries) == sorted(
            e.message_id for e in sent
        )
        assert all(d.attempt == 2 for d in deliveries)
        # Delivered again in key order (the worker sets apart what might have killed the first).
        seqs: dict[str, list[int]] = {}
        for delivery in deliveries:
            message = delivery.envelope.decode()
            seqs.setdefault(delivery.ordering_key, []).append(message.seq)  # type: ignore[attr-defined]
        assert seqs == {f"K-{k}": list(range(k, 9, 3)) for k in range(3)}
        await expect_unsettled(survivor, spec, 0)

    kit.run(scenario)


def test_a_batch_never_completed_is_handed_out_again(kit: NatsKit) -> None:
    """The worker's transaction failed: it claims again without completing the batch and gets
    it again at once, in order, each attempt counted, ahead of what came after it."""

    async def scenario() -> None:
        bus = await kit.bus(ack_wait=600)
        service = queue_service("alpha", ConformanceCommand)
        [spec] = service.consumers()
        system = System([service])
        await bus.prepare([spec], system.routes)
        sent = await system.submit_many(
            bus, [ConformanceCommand(key="K-1", seq=i) for i in range(3)]
        )
        [first] = await claim_all(bus, spec, "m1", 3, settle=False)
        assert [d.attempt for d in first.deliveries] == [1, 1, 1]
        await system.submit(bus, ConformanceCommand(key="K-1", seq=3))
        again = [d for b in await claim_all(bus, spec, "m1", 4, settle=True) for d in b.deliveries]
        assert [d.envelope.message_id for d in again[:3]] == [e.message_id for e in sent]
        assert [d.attempt for d in again] == [2, 2, 2, 1]
        await expect_unsettled(bus, spec, 0)

    kit.run(scenario)


async def pull_directly(bus: NatsBus, stream: str, consumer: str) -> int:
    """How many messages a pull of the consumer's own gets from the server now."""
    nc = bus.connection
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            json.dumps({"batch": 100, "no_wait": True}).encode(),
            reply=inbox,
        )
        received = 0
        while True:
            msg = await subscription.next_msg(timeout=5)
            if not msg.reply:
                return received  # a status: nothing more
            received += 1
    finally:
        await subscription.unsubscribe()


def test_a_batch_handled_for_longer_than_the_ack_deadline_is_not_delivered_again(
    kit: NatsKit,
) -> None:
    """The member keeps the deliveries it handed out alive while they are handled: after four
    ack deadlines the server still has nothing to deliver again."""

    async def scenario() -> None:
        bus = await kit.bus(ack_wait=1.0)
        service = queue_service("alpha", ConformanceCommand)
        [spec] = service.consumers()
        system = System([service])
        await bus.prepare([spec], system.routes)
        await system.submit(bus, ConformanceCommand(key="K-1", seq=1))
        [batch] = await claim_all(bus, spec, "m1", 1, settle=False)
        consumer = f"q-alpha-{bus.partition_of('K-1')}"
        await asyncio.sleep(4 * bus.ack_wait)  # the batch is being handled all this time
        assert await pull_directly(bus, bus.command_stream, consumer) == 0
        await bus.complete(batch, [(Outcome.ACK, None)])
        await expect_unsettled(bus, spec, 0)
        info = await bus.jetstream.consumer_info(bus.command_stream, consumer)
        assert info.num_redelivered == 0

    kit.run(scenario)


def test_two_members_compete_without_handling_anything_twice(kit: NatsKit) -> None:
    calls: Counter[str] = Counter()

    async def counting(ctx: Context, command: ConformanceCommand) -> None:
        calls[ctx.envelope.message_id] += 1
        await record(ctx, command)

    async def scenario() -> None:
        first, second = await kit.bus(), await kit.bus()
        service = Service("alpha", retry=FAST_RETRY)
        service.handles(ConformanceCommand)(counting)
        [spec] = service.consumers()
        system = System([service])
        store = kit.store("alpha")
        keys = [f"K-{k}" for k in range(24)]
        expected = {key: list(range(20)) for key in keys}

        def done() -> bool:
            return recorded(store, "alpha") == expected

        runtimes = [
            Runtime(store, system, bus=bus, member=member, poll_interval=0.05)
            for bus, member in ((first, "m1"), (second, "m2"))
        ]
        running = asyncio.gather(*(r.run_until(done, timeout=60) for r in runtimes))

        def shared() -> bool:
            mine, theirs = first.partitions_held(spec, "m1"), second.partitions_held(spec, "m2")
            return bool(mine) and bool(theirs) and not set(mine) & set(theirs)

        await wait_until(shared)
        for seq in range(20):
            await system.submit_many(first, [ConformanceCommand(key=key, seq=seq) for key in keys])
        await running
        assert recorded(store, "alpha") == expected
        assert set(calls.values()) == {1}
        assert all(runtime.handled > 0 for runtime in runtimes)

    kit.run(scenario)


def test_a_stopped_member_hands_its_partitions_over_at_once(kit: NatsKit) -> None:
    async def scenario() -> None:
        bus = await kit.bus(lease_seconds=30.0)
        system = System([subscriber("watcher", ConformanceEvent)])
        store = kit.store("watcher")
        await system.submit(bus, ConformanceEvent(key="K-1", seq=0))
        await run(
            bus, system, {"watcher": store}, lambda: bool(recorded(store, "watcher")), member="a"
        )
        await system.submit(bus, ConformanceEvent(key="K-1", seq=1))
        # A new member id; with 30-second leases it must not wait for the old ones to expire.
        await run(
            bus,
            system,
            {"watcher": store},
            lambda: recorded(store, "watcher") == {"K-1": [0, 1]},
            member="b",
            timeout=5,
        )

    kit.run(scenario)


# ------------------------------------------------------------------------------------ events


def test_a_subscriber_of_one_type_is_sent_nothing_else(kit: NatsKit) -> None:
    """Its consumers filter on that type's subjects, so the server never delivers other types
    (before NATS 2.10 a consumer has one filter; a subscriber of several types gets every type
    and acknowledges the others itself)."""

    async def scenario() -> None:
        bus = await kit.bus()
        only = subscriber("only", ConformanceOtherEvent).consumers()[0]
        both = subscriber("both", ConformanceEvent, ConformanceOtherEvent).consumers()[0]
        await bus.prepare([only, both], {})
        system = System([subscriber("only", ConformanceOtherEvent)])
        events: list[Any] = [ConformanceEvent(key=f"K-{i}", seq=i) for i in range(20)]
        events += [
            ConformanceOtherEvent(key="K-1", seq=100),
            ConformanceOtherEvent(key="K-2", seq=101),
        ]
        await system.submit_many(bus, events)
        assert await unsettled(bus, only) == 2
        assert await unsettled(bus, both) == 22

    kit.run(scenario)


def test_the_log_is_in_publish_order_and_a_replay_ends_where_it_ended_when_it_began(
    kit: NatsKit,
) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        system = System([subscriber("early", ConformanceEvent)])
        envelopes = await system.submit_many(
            bus, [ConformanceEvent(key=f"K-{i % 4}", seq=i) for i in range(25)]
        )
        # One stream: the order published across keys too.
        log = [e async for e in bus.replay(0)]
        assert [e.envelope.message_id for e in log] == [e.message_id for e in envelopes]
        assert [e.envelope.body for e in log] == [e.body for e in envelopes]
        assert [e.envelope.correlation_id for e in log] == [e.correlation_id for e in envelopes]
        positions = [e.position for e in log]

        # The replay ends where the log ended when it began.
        replay = bus.replay(0)
        head = await anext(replay)
        await system.submit_many(bus, [ConformanceEvent(key="K-late", seq=i) for i in range(3)])
        rest = [e async for e in replay]
        assert [head.position] + [e.position for e in rest] == positions

        # A subscriber that joins late still receives the retained events from the start.
        store = kit.store("early")
        await run(
            bus,
            system,
            {"early": store},
            lambda: sum(len(v) for v in recorded(store, "early").values()) == 28,
        )

    kit.run(scenario)


# ------------------------------------------------------------------------------------- sizes


def test_a_message_over_the_servers_max_payload_is_refused_before_anything_is_sent(
    kit: NatsKit,
) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        system = System([queue_service("alpha", ConformanceCommand)])
        limit = bus.max_payload
        if limit >= MAX_MESSAGE_BYTES + 4096:
            pytest.skip(f"the server's max_payload ({limit}) holds sagaline's largest message")
        # A default server (max_payload 1 MiB): sagaline's largest body does not fit next to its
        # headers. Refused before anything is sent, with both sizes named.
        with pytest.raises(MessageTooLarge) as refused:
            await system.submit(bus, padded(ConformanceCommand, "K-big", MAX_MESSAGE_BYTES))
        assert str(limit) in str(refused.value) and "max_payload" in str(refused.value)
        assert (await bus.jetstream.stream_info(bus.command_stream)).state.messages == 0

    kit.run(scenario)


# ------------------------------------------------------------------------------- backstop


def test_a_message_the_server_gives_up_on_is_handed_over_for_the_dead_letters(
    kit: NatsKit,
) -> None:
    async def scenario() -> None:
        bus = await kit.bus(ack_wait=0.3)
        policy = RetryPolicy(max_attempts=1, initial_delay=0.01)
        service = queue_service("alpha", ConformanceCommand, retry=policy)
        [spec] = service.consumers()
        system = System([service])
        await bus.prepare([spec], system.routes)
        sent = await system.submit(bus, ConformanceCommand(key="K-1", seq=1))
        # Every delivery the server makes (max_deliver), none settled: a consumer that dies
        # every time, even while recording the dead letter, and is restarted under its name.
        attempts = []
        while True:
            [batch] = await claim_all(bus, spec, "m1", 1, settle=False)
            [delivery] = batch.deliveries
            assert delivery.envelope.message_id == sent.message_id
            attempts.append(delivery.attempt)
            if delivery.attempt > policy.delivery_limit:
                break
            dead, bus = bus, await kit.bus(ack_wait=0.3)
            await dead.connection.close()  # no ack, no leave
        assert attempts == list(range(1, policy.delivery_limit + 2))
        await bus.complete(batch, [(Outcome.DEAD, "given up")])
        assert (await bus.jetstream.stream_info(bus.command_stream)).state.messages == 0

    kit.run(scenario)


@pytest.fixture
def nats_url() -> Iterator[str]:
    """A stream and subject prefix of this test's own on the NATS server."""
    yield from servers.nats_prefix()


def test_a_message_the_broker_refuses_is_set_aside_and_the_outbox_goes_on(
    nats_url: str, tmp_path: Path
) -> None:
    """NATS refuses a body that passes sagaline's 1 MiB limit but not the server's
    max_payload: the relay dead-letters it (consumer ``outbox``) instead of blocking."""

    store = SqliteDatabase(f"sqlite:///{tmp_path}/store.db", outbox=True)
    harness = Harness(store, open_bus(nats_url))

    async def relay(ctx: Context, command: ConformanceCommand) -> None:
        size = MAX_MESSAGE_BYTES - 100 if command.seq == 0 else 100
        ctx.publish(padded(ConformanceEvent, command.key, size))
        await record(ctx, command)

    async def scenario() -> None:
        await harness.open()
        service = Service("alpha", retry=FAST_RETRY)
        service.handles(ConformanceCommand)(relay)
        system = System([service, subscriber("watcher", ConformanceEvent)])
        await harness.prepare(system)
        await system.submit_many(
            harness.entry,
            [ConformanceCommand(key="K-1", seq=0), ConformanceCommand(key="K-2", seq=1)],
        )
        await run_until(
            harness,
            system,
            both(
                handled_all(harness, "watcher", {"K-2": [0]}),
                dead_lettered(harness),
            ),
        )
        [dead] = await harness.dead_letters()
        assert dead.consumer == "outbox"
        assert dead.envelope.message_type == "ConformanceEvent"
        assert "max_payload" in dead.reason
        assert await harness.recorded("alpha") == {"K-1": [0], "K-2": [1]}
        assert store.sync.outbox_pending() == 0

    drive(scenario)


# ------------------------------------------------------------------------------ order flow


def test_the_order_flow_runs_on_nats(kit: NatsKit) -> None:
    async def scenario() -> None:
        bus = await kit.bus()
        system = build_system()
        stores = {name: kit.store(name) for name in SERVICE_NAMES}
        async with stores["inventory"].transaction() as tx:
            for product_id, quantity in DEMO_STOCK.items():
                await set_stock(tx, product_id, quantity)
        for order in demo_orders():
            await system.submit(bus, order)
        wanted = {"ORD-12345": "CONFIRMED", "ORD-12346": "CANCELLED", "ORD-12347": "CANCELLED"}

        def statuses() -> dict[str, str]:
            rows = stores["read"].sync.query_documents(ORDER_VIEW)
            return {row["orderId"]: row["status"] for row in rows}

        def done() -> bool:
            sagas = stores["orchestrator"].sync.list_sagas()
            return (
                statuses() == wanted
                and len(sagas) == 3
                and all(saga.status in ("COMPLETED", "COMPENSATED") for saga in sagas)
            )

        await run(bus, system, stores, done, timeout=60)
        sagas = {
            saga.data.get("orderId", saga.saga_id): saga.status
            for saga in stores["orchestrator"].sync.list_sagas()
        }
        assert sorted(sagas.values()) == ["COMPENSATED", "COMPENSATED", "COMPLETED"]
        for store in stores.values():
            assert not store.sync.dead_letters()

    kit.run(scenario)
