"""The RabbitMQ bus against a real broker: each service with its own SQLite store in outbox mode.

The test run gets a virtual host of its own (deleted at the end) and each test a topology prefix
of its own. Without a reachable broker the tests are skipped, unless
``SAGALINE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aio_pika
import pytest
import servers

from sagaline.backends import open_bus
from sagaline.backends.rabbitmq import (
    BUNDLE_CONTENT_TYPE,
    POSITIONS_PER_OFFSET,
    BusUnavailable,
    RabbitBus,
    UnroutableMessage,
)
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.errors import ConfigurationError
from sagaline.handling import Context, Runtime, Service, System
from sagaline.handling.notices import MessageDeadLettered
from sagaline.messages import MAX_MESSAGE_BYTES, Envelope
from sagaline.observability import redact_url
from sagaline.orders import build_system
from sagaline.orders.demo import DEMO_STOCK, SEED_ORDER_JSON, demo_orders
from sagaline.orders.inventory import set_stock
from sagaline.ports import BrokerBus, ConsumerSpec, Outcome, RetryPolicy
from sagaline.testing.conformance import (
    FAST_RETRY,
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherCommand,
    hand_made,
    padded,
    queue_service,
    record,
    subscriber,
)


def recorded(store: SqliteDatabase, service: str) -> dict[str, list[int]]:
    """What ``service`` recorded in ``store`` (see the conformance suites' ``record``), read
    without awaiting: the stores here are SQLite files."""
    return {row["key"]: row["seqs"] for row in store.sync.query_documents(f"bus.{service}")}


@pytest.fixture(scope="session")
def rabbit_url() -> str:
    """The test run's own virtual host on the shared broker (each test adds a prefix of its own)."""
    return f"amqp://{servers.RABBITMQ_HOST}/{servers.session_vhost()}"


class Rig:
    """One test's buses (one topology prefix) and stores (one SQLite file per service)."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.directory = directory
        self.buses: list[RabbitBus] = []
        self.stores: dict[str, SqliteDatabase] = {}

    def bus(self, **options: Any) -> RabbitBus:
        """A bus (its own connection) on this test's topology."""
        bus = RabbitBus(self.url, prefix=self.prefix, **options)
        self.buses.append(bus)
        return bus

    def store(self, name: str) -> SqliteDatabase:
        """The outbox-mode store of a service (or of one instance of it)."""
        if name not in self.stores:
            self.stores[name] = SqliteDatabase(f"sqlite:///{self.directory}/{name}.db", outbox=True)
        return self.stores[name]

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        """Run ``scenario`` in a fresh event loop; close every bus and store afterwards."""

        async def main() -> None:
            try:
                await scenario()
            finally:
                consumers = [c for bus in self.buses for c in bus.prepared_consumers]
                for bus in self.buses:
                    await bus.close()
                # The test's queues go with it: each holds file handles in the broker.
                cleaner = RabbitBus(self.url, prefix=self.prefix)
                try:
                    await cleaner.delete_topology(consumers)
                finally:
                    await cleaner.close()
                for store in self.stores.values():
                    await store.close()

        asyncio.run(main())


@pytest.fixture
def rig(rabbit_url: str, tmp_path: Path) -> Rig:
    return Rig(rabbit_url, tmp_path)


def consumers_of(system: System) -> list[ConsumerSpec]:
    return [spec for service in system.services.values() for spec in service.consumers()]


async def run_services(
    bus: BrokerBus,
    system: System,
    stores: Mapping[str, SqliteDatabase],
    done: Callable[[], bool],
    *,
    member: str = "member-1",
    timeout: float = 30.0,
) -> list[Runtime]:
    """Run each named service in its own runtime on its own store, until ``done()``."""
    runtimes = [
        Runtime(store, system, [name], bus=bus, member=member, poll_interval=0.05)
        for name, store in stores.items()
    ]
    first, *others = runtimes
    tasks = [asyncio.create_task(runtime.run()) for runtime in others]
    try:
        await first.run_until(done, timeout=timeout)
    finally:
        for runtime in others:
            runtime.stop()
        await asyncio.gather(*tasks)
    return runtimes


def handled(store: SqliteDatabase, service: str) -> int:
    return sum(len(seqs) for seqs in recorded(store, service).values())


# -------------------------------------------------------------------------------- the port


def test_it_implements_the_broker_bus_port(rig: Rig) -> None:
    bus = rig.bus()
    assert isinstance(bus, BrokerBus)
    assert isinstance(open_bus(rig.url), RabbitBus)


def test_the_url_sets_the_prefix_and_the_bundle_size() -> None:
    bus = open_bus("amqp://guest:guest@127.0.0.1/vh?prefix=shop&bundle=1&heartbeat=30")
    assert isinstance(bus, RabbitBus)
    assert (bus.prefix, bus.bundle) == ("shop", 1)
    assert bus.url == "amqp://guest:guest@127.0.0.1/vh?heartbeat=30"  # the rest is the driver's
    assert cast(RabbitBus, open_bus("amqp://127.0.0.1/")).bundle == 100
    with pytest.raises(ConfigurationError, match="bundle='many'"):
        open_bus("amqp://127.0.0.1/?bundle=many")
    with pytest.raises(ConfigurationError, match="bundle 0"):
        open_bus("amqp://127.0.0.1/?bundle=0")
    with pytest.raises(ConfigurationError, match="bundle 1024"):
        RabbitBus("amqp://127.0.0.1/", bundle=1024)
    assert "guest:***@" in repr(bus) and ":guest@" not in repr(bus)


def test_publish_returns_once_confirmed_and_an_unroutable_command_is_an_error(rig: Rig) -> None:
    async def scenario() -> None:
        bus = rig.bus(bundle=1)  # every message an AMQP message of its own, to count them
        system = System([queue_service("alpha", ConformanceCommand)])
        [spec] = consumers_of(system)
        await bus.prepare([spec], system.routes)
        await system.submit_many(bus, [ConformanceCommand(key=f"K-{i}", seq=i) for i in range(40)])
        # No consumer yet: once publish returned, the broker holds every message.
        connection = await aio_pika.connect(rig.url)
        async with connection:
            channel = await connection.channel()
            counts = [
                (await channel.declare_queue(name, passive=True)).declaration_result.message_count
                for name in bus.queue_names(spec)
            ]
        assert sum(count or 0 for count in counts) == 40
        stray = hand_made("ConformanceOtherCommand", "K-1", b"{}")
        with pytest.raises(UnroutableMessage):
            await bus.publish([stray], {"ConformanceOtherCommand": "nobody"})

    rig.run(scenario)


# -------------------------------------------------------------------------------- commands


def test_a_message_the_worker_dead_letters_is_not_in_the_broker_dead_letters(rig: Rig) -> None:
    """The worker dead-letters it in the store and acknowledges it: nothing reaches the
    broker's dead-letter queue (that is for what kills its consumers, see below)."""
    policy = RetryPolicy(max_attempts=2, initial_delay=0.01)

    async def handler(ctx: Context, command: ConformanceCommand) -> None:
        raise RuntimeError("poison-boom")

    async def scenario() -> None:
        bus = rig.bus()
        service = Service("alpha", retry=policy)
        service.handles(ConformanceCommand)(handler)
        system = System([service])
        store = rig.store("alpha")
        await bus.prepare(consumers_of(system), system.routes)
        poison = await system.submit(bus, ConformanceCommand(key="K-poison", seq=0))
        await run_services(bus, system, {"alpha": store}, lambda: bool(store.sync.dead_letters()))
        [dead] = store.sync.dead_letters()
        assert (dead.envelope.message_id, dead.attempts) == (poison.message_id, 2)
        assert await bus.broker_dead_letters(service.consumers()[0]) == []

    rig.run(scenario)


def test_a_message_without_sagaline_metadata_is_dead_lettered(rig: Rig) -> None:
    async def scenario() -> None:
        bus = rig.bus()
        system = System([queue_service("alpha", ConformanceCommand)])
        [spec] = consumers_of(system)
        store = rig.store("alpha")
        await bus.prepare([spec], system.routes)
        body = b'{"commandType":"ConformanceCommand","key":"K-1","seq":0}'
        connection = await aio_pika.connect(rig.url)
        async with connection:
            channel = await connection.channel()
            # Published by another program: no message id, no type, no headers.
            await channel.default_exchange.publish(
                aio_pika.Message(body), routing_key=bus.queue_names(spec)[3]
            )
            await channel.default_exchange.publish(
                aio_pika.Message(b"\xff\xfe not even text", headers={"x-odd": [1, 2]}),
                routing_key=bus.queue_names(spec)[5],
            )
        await system.submit(bus, ConformanceCommand(key="K-1", seq=1))
        await run_services(
            bus,
            system,
            {"alpha": store},
            lambda: len(store.sync.dead_letters()) == 2 and handled(store, "alpha") == 1,
        )
        dead = store.sync.dead_letters()
        assert {d.envelope.message_type for d in dead} == {"unknown"}
        # Kept byte for byte, text or not.
        assert {d.envelope.body for d in dead} == {body, b"\xff\xfe not even text"}
        assert all("unknown" in d.reason for d in dead)
        assert recorded(store, "alpha") == {"K-1": [1]}

    rig.run(scenario)


def test_an_unsettled_delivery_comes_back_when_its_consumer_dies(rig: Rig) -> None:
    async def scenario() -> None:
        first_bus, second_bus = rig.bus(), rig.bus()
        service = queue_service("alpha", ConformanceCommand)
        [spec] = service.consumers()
        system = System([service])
        await first_bus.prepare([spec], system.routes)
        sent = await system.submit(first_bus, ConformanceCommand(key="K-1", seq=1))

        async def claim_one(bus: RabbitBus, member: str) -> Any:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while loop.time() < deadline:
                batch = await bus.claim(spec, member, 10)
                if batch.deliveries:
                    return batch
                await bus.wait_for_work(spec, 0.5)
            pytest.fail(f"{member} received nothing")

        first = await claim_one(first_bus, "member-1")
        [delivery] = first.deliveries
        assert (delivery.envelope.message_id, delivery.attempt) == (sent.message_id, 1)
        assert delivery.ordering_key == "K-1"
        # A standby member gets nothing while the active one holds the partition.
        assert (await second_bus.claim(spec, "member-2", 10)).deliveries == []
        await first_bus.close()  # dies without settling: its connection goes, unacknowledged

        again = await claim_one(second_bus, "member-2")
        [redelivery] = again.deliveries
        assert redelivery.envelope.message_id == sent.message_id
        assert redelivery.envelope.body == sent.body
        assert redelivery.envelope.timestamp == sent.timestamp
        assert redelivery.attempt == 2
        await second_bus.complete(again, [(Outcome.ACK, None)])
        await second_bus.leave(spec, "member-2")
        third = rig.bus()
        assert (await third.claim(spec, "member-3", 10)).deliveries == []

    rig.run(scenario)


async def claim_some(bus: RabbitBus, spec: ConsumerSpec, member: str, count: int = 1) -> Any:
    """Claim until a batch of ``count`` or more deliveries comes (waiting on the bus's wake-ups)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while loop.time() < deadline:
        batch = await bus.claim(spec, member, 100)
        if len(batch.deliveries) >= count:
            return batch
        if batch.deliveries:
            await bus.complete(batch, [(Outcome.SKIP, None)] * len(batch.deliveries))
            # What it holds is claimable at once: poll, letting the connection read meanwhile.
            await asyncio.sleep(0.01)
        await bus.wait_for_work(spec, 0.5)
    pytest.fail(f"{member} did not receive {count} deliveries")


def same_partition_keys(bus: RabbitBus, count: int) -> list[str]:
    """``count`` keys that all fall in partition 0."""
    keys = (f"K-{n}" for n in itertools.count())
    return list(itertools.islice((k for k in keys if bus.partition_of(k) == 0), count))


def test_a_batch_never_completed_is_handed_out_again(rig: Rig) -> None:
    async def scenario() -> None:
        bus = rig.bus()
        service = queue_service("alpha", ConformanceCommand)
        [spec] = service.consumers()
        system = System([service])
        await bus.prepare([spec], system.routes)
        sent = await system.submit_many(
            bus, [ConformanceCommand(key="K-1", seq=i) for i in range(3)]
        )
        first = await claim_some(bus, spec, "member-1", 3)
        assert [d.attempt for d in first.deliveries] == [1, 1, 1]
        # The worker's transaction failed: it claims again without completing the batch, and
        # gets it again, in order, each attempt counted, before anything else.
        await system.submit(bus, ConformanceCommand(key="K-1", seq=3))
        again = await claim_some(bus, spec, "member-1", 4)
        ids = [d.envelope.message_id for d in again.deliveries]
        assert ids[:3] == [e.message_id for e in sent]
        assert [d.attempt for d in again.deliveries] == [2, 2, 2, 1]

    rig.run(scenario)


async def past_the_delivery_limit(
    rig: Rig, setup: RabbitBus, spec: ConsumerSpec, messages: int
) -> list[int]:
    """Hand the ``messages`` (one AMQP message) to consumer after consumer, each dying before it
    settles them, until the broker has delivered them past its limit; the attempts seen. The
    broker dead-letters them a moment after the last consumer went away."""
    attempts: list[int] = []
    while len(attempts) <= spec.retry.delivery_limit:
        dying = rig.bus()
        batch = await claim_some(dying, spec, f"member-{len(attempts)}", messages)
        attempts.append(batch.deliveries[0].attempt)
        await dying.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not await setup.broker_dead_letters(spec):
        assert loop.time() < deadline, "the broker did not dead-letter the message"
        await asyncio.sleep(0.05)
    return attempts


@pytest.mark.parametrize("messages", [1, 3], ids=["alone", "bundled"])
def test_a_message_that_keeps_killing_its_consumer_ends_in_the_broker_dead_letters(
    rig: Rig, messages: int
) -> None:
    async def scenario() -> None:
        policy = RetryPolicy(max_attempts=1, initial_delay=0.01)
        service = queue_service("alpha", ConformanceCommand, retry=policy)
        [spec] = service.consumers()
        system = System([service])
        setup = rig.bus()
        await setup.prepare([spec], system.routes)
        # Keys of one partition, published at once: one AMQP message.
        keys = same_partition_keys(setup, messages)
        sent = await system.submit_many(setup, [ConformanceCommand(key=k, seq=1) for k in keys])
        # Each consumer takes it and dies before settling (no worker records a dead letter).
        attempts = await past_the_delivery_limit(rig, setup, spec, messages)
        assert attempts == list(range(1, policy.delivery_limit + 2))
        dead = await setup.broker_dead_letters(spec)
        # A bundle is dead-lettered whole, each of its messages listed.
        assert [d.envelope.message_id for d in dead] == [e.message_id for e in sent]
        assert [d.envelope.body for d in dead] == [e.body for e in sent]
        assert {d.reason for d in dead} == {"delivery_limit"}
        assert {d.queue for d in dead} <= set(setup.queue_names(spec))
        # Looking does not take them away.
        assert len(await setup.broker_dead_letters(spec)) == messages

    rig.run(scenario)


@pytest.mark.parametrize("fate", ["handled", "dead-lettered"])
def test_what_the_broker_dead_lettered_goes_to_the_worker_once_more(rig: Rig, fate: str) -> None:
    """A member consumes its consumer's dead-letter queue too: the message the broker gave up on
    is handed to the worker as one delivered before. It is handled, or, when it keeps failing,
    recorded as a dead letter in the store, with the notice a saga hears; either way it leaves
    the broker's dead letters."""
    policy = RetryPolicy(max_attempts=1, initial_delay=0.01)

    async def failing(ctx: Context, command: ConformanceCommand) -> None:
        raise RuntimeError("still broken")

    async def note(ctx: Context, notice: MessageDeadLettered) -> None:
        await ctx.tx.put_document("notices", notice.message_id, {"reason": notice.reason}, 0)

    watching = Service("watcher")
    watching.subscribes(MessageDeadLettered)(note)

    async def scenario() -> None:
        service = Service("alpha", retry=policy)
        service.handles(ConformanceCommand)(record if fate == "handled" else failing)
        [spec] = service.consumers()
        system = System([service, watching])
        setup = rig.bus()
        await setup.prepare(consumers_of(system), system.routes)
        [key] = same_partition_keys(setup, 1)
        sent = await system.submit(setup, ConformanceCommand(key=key, seq=1))
        await past_the_delivery_limit(rig, setup, spec, 1)

        store, watcher = rig.store("alpha"), rig.store("watcher")
        bus = rig.bus()
        if fate == "handled":
            await run_services(bus, system, {"alpha": store}, lambda: handled(store, "alpha") == 1)
            assert recorded(store, "alpha") == {key: [1]}
            assert store.sync.dead_letters() == []
        else:
            await run_services(
                bus,
                system,
                {"alpha": store, "watcher": watcher},
                lambda: bool(watcher.sync.query_documents("notices")),
            )
            [letter] = store.sync.dead_letters()
            assert letter.envelope.message_id == sent.message_id
            assert "still broken" in letter.reason
            # The notice names the message, for the saga whose command it was.
            [notice] = watcher.sync.query_documents("notices")
            assert "still broken" in notice["reason"]
            assert watcher.sync.get_document("notices", sent.message_id) is not None
        await bus.close()
        assert await setup.broker_dead_letters(spec) == []

    rig.run(scenario)


def test_two_members_compete_without_handling_twice_or_reordering(rig: Rig) -> None:
    async def slow_record(ctx: Context, command: ConformanceCommand) -> None:
        await asyncio.sleep(0.002)
        await record(ctx, command)

    async def scenario() -> None:
        service = Service("alpha", retry=FAST_RETRY)
        service.handles(ConformanceCommand)(slow_record)
        system = System([service])
        first_bus, second_bus = rig.bus(), rig.bus()
        # Each instance has a store of its own: nothing a duplicate did could be hidden.
        first_store, second_store = rig.store("alpha-1"), rig.store("alpha-2")
        await first_bus.prepare(consumers_of(system), system.routes)
        keys = [f"K-{k}" for k in range(20)]
        total = 20 * len(keys)
        await system.submit_many(
            first_bus, [ConformanceCommand(key=key, seq=seq) for seq in range(20) for key in keys]
        )
        # Small batches, so that the first instance is stopped with work left (the messages of a
        # partition travel in bundles; a batch takes whole bundles).
        first = Runtime(
            first_store, system, bus=first_bus, member="m1", poll_interval=0.05, batch_size=10
        )
        second = Runtime(
            second_store, system, bus=second_bus, member="m2", poll_interval=0.05, batch_size=10
        )
        first_run = asyncio.create_task(first.run())
        second_run = asyncio.create_task(
            second.run_until(
                lambda: handled(first_store, "alpha") + handled(second_store, "alpha") >= total,
                timeout=60,
            )
        )
        # The first instance goes away mid-way; the standby takes its partitions over.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while handled(first_store, "alpha") < total // 4 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        first.stop()
        await first_run
        await second_run
        mine, theirs = recorded(first_store, "alpha"), recorded(second_store, "alpha")
        assert mine and theirs
        for key in keys:
            assert mine.get(key, []) + theirs.get(key, []) == list(range(20))

    rig.run(scenario)


def test_instances_started_together_split_the_partitions_and_take_over_each_others(
    rig: Rig,
) -> None:
    """Instance 1 of 2 and instance 2 of 2 each consume their own half of the partitions first:
    each handles exactly the keys of its half. When one goes away the other, standing by on
    those partitions, takes them over; when it comes back, it gets them back. Per-key order holds
    throughout."""

    async def scenario() -> None:
        service = Service("alpha", retry=FAST_RETRY)
        service.handles(ConformanceCommand)(record)
        system = System([service])
        buses = [rig.bus(instance=(n, 2), share_delay=3.0) for n in (1, 2)]
        stores = [rig.store("alpha-1"), rig.store("alpha-2")]
        await buses[0].prepare(consumers_of(system), system.routes)
        keys = [f"K-{k}" for k in range(24)]
        homes = [buses[n].home_partitions() or frozenset() for n in (0, 1)]
        assert homes[0] | homes[1] == set(range(buses[0].partitions)) and not homes[0] & homes[1]
        runtimes = [
            Runtime(store, system, bus=bus, member=f"m{n}", poll_interval=0.05)
            for n, (store, bus) in enumerate(zip(stores, buses, strict=True))
        ]
        runs = [asyncio.create_task(runtime.run()) for runtime in runtimes]

        def total() -> int:
            return sum(handled(store, "alpha") for store in stores)

        async def until(done: Callable[[], bool]) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not done():
                assert loop.time() < deadline, "not handled in time"
                await asyncio.sleep(0.02)

        await system.submit_many(
            buses[0], [ConformanceCommand(key=key, seq=seq) for seq in range(5) for key in keys]
        )
        await until(lambda: total() == 5 * len(keys))
        for n in (0, 1):
            mine = recorded(stores[n], "alpha")
            assert {buses[n].partition_of(key) for key in mine} <= homes[n]
            assert all(seqs == list(range(5)) for seqs in mine.values())
        # Instance 2 goes away: instance 1 takes its partitions over.
        runtimes[1].stop()
        await runs[1]
        await system.submit_many(
            buses[0], [ConformanceCommand(key=key, seq=seq) for seq in range(5, 8) for key in keys]
        )
        await until(lambda: total() == 8 * len(keys))
        first, second = recorded(stores[0], "alpha"), recorded(stores[1], "alpha")
        for key in keys:
            if buses[0].partition_of(key) in homes[0]:
                assert (first.get(key), second.get(key)) == (list(range(8)), None)
            else:
                assert (second.get(key), first.get(key)) == (list(range(5)), [5, 6, 7])
        # Instance 2 comes back: instance 1 gives its partitions back. Rounds of one message per
        # key go on meanwhile until a round is handled by the home instances alone.
        buses[1] = rig.bus(instance=(2, 2), share_delay=3.0)
        runtimes[1] = Runtime(stores[1], system, bus=buses[1], member="m1", poll_interval=0.05)
        runs[1] = asyncio.create_task(runtimes[1].run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        seq = 8
        while True:
            assert loop.time() < deadline, "the partitions did not go back to their home instance"
            before = [recorded(store, "alpha") for store in stores]
            await system.submit_many(
                buses[0], [ConformanceCommand(key=key, seq=seq) for key in keys]
            )
            seq += 1
            await until(lambda: total() == seq * len(keys))  # noqa: B023
            after = [recorded(store, "alpha") for store in stores]
            moved = [
                {key for key in after[n] if len(after[n][key]) > len(before[n].get(key, []))}
                for n in (0, 1)
            ]
            if all({buses[0].partition_of(key) for key in moved[n]} <= homes[n] for n in (0, 1)):
                break
            await asyncio.sleep(0.2)
        for runtime, run in zip(runtimes, runs, strict=True):
            runtime.stop()
            await run
        by_first, by_second = recorded(stores[0], "alpha"), recorded(stores[1], "alpha")
        for key in keys:
            if buses[0].partition_of(key) in homes[0]:
                assert (by_first.get(key), by_second.get(key)) == (list(range(seq)), None)
            else:
                # 0-4 by instance 2, then instance 1 until it gave the partition back.
                home, borrower = by_second[key], by_first[key]
                assert home[:5] == list(range(5)) and borrower[:3] == [5, 6, 7]
                assert borrower == list(range(5, home[5])) and home[5:] == list(range(home[5], seq))

    rig.run(scenario)


# ---------------------------------------------------------------------------------- events


def test_the_stream_is_replayed_from_any_position_inside_a_bundle(rig: Rig) -> None:
    """The events of a partition travel bundled, one stream offset for several events: each
    event has a position of its own, and a replay starts after any of them."""

    async def scenario() -> None:
        bus = rig.bus()
        system = System([subscriber("early", ConformanceEvent)])
        await bus.prepare(consumers_of(system), system.routes)
        await system.submit_many(
            bus, [ConformanceEvent(key=f"K-{i % 4}", seq=i) for i in range(25)]
        )
        log = [stored async for stored in bus.replay(0)]
        positions = [e.position for e in log]
        assert positions == sorted(set(positions)) and positions[0] >= 1
        assert len(set(p // POSITIONS_PER_OFFSET for p in positions)) < len(positions)  # bundled
        for cut in range(len(log)):  # from any position, bundles' middles included
            tail = [stored async for stored in bus.replay(positions[cut])]
            assert [e.envelope.message_id for e in tail] == [
                e.envelope.message_id for e in log[cut + 1 :]
            ]
            assert [e.position for e in tail] == positions[cut + 1 :]

    rig.run(scenario)


# ---------------------------------------------------------------------------------- bundles


async def queue_depths(url: str, queues: list[str]) -> list[int]:
    """How many AMQP messages each queue holds ready (not counting unacknowledged ones)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        return [
            (await channel.declare_queue(name, passive=True)).declaration_result.message_count or 0
            for name in queues
        ]


def test_messages_of_one_route_travel_as_one_amqp_message(rig: Rig) -> None:
    async def scenario() -> None:
        bus = rig.bus(bundle=25)
        service = queue_service("alpha", ConformanceCommand, ConformanceOtherCommand)
        [spec] = service.consumers()
        system = System([service])
        store = rig.store("alpha")
        await bus.prepare([spec], system.routes)
        keys = same_partition_keys(bus, 5)
        # Two command types of one service share a route; each key's messages alternate.
        messages: list[Any] = [
            (ConformanceCommand if seq % 2 else ConformanceOtherCommand)(key=key, seq=seq)
            for seq in range(10)
            for key in keys
        ]
        await system.submit_many(bus, messages)
        assert await queue_depths(rig.url, bus.queue_names(spec)) == [2] + [0] * 7  # 25 + 25
        await run_services(bus, system, {"alpha": store}, lambda: handled(store, "alpha") == 50)
        assert recorded(store, "alpha") == {key: list(range(10)) for key in keys}
        assert not store.sync.dead_letters()
        await bus.close()
        # Both bundles were acknowledged: a new consumer gets nothing.
        assert await queue_depths(rig.url, bus.queue_names(spec)) == [0] * 8

    rig.run(scenario)


def test_a_bundle_is_acknowledged_only_once_every_message_of_it_is_settled(rig: Rig) -> None:
    async def scenario() -> None:
        first_bus = rig.bus()
        service = queue_service("alpha", ConformanceCommand)
        [spec] = service.consumers()
        system = System([service])
        await first_bus.prepare([spec], system.routes)
        keys = same_partition_keys(first_bus, 3)
        sent = await system.submit_many(
            first_bus, [ConformanceCommand(key=key, seq=1) for key in keys]
        )
        batch = await claim_some(first_bus, spec, "member-1", 3)
        assert [d.envelope.message_id for d in batch.deliveries] == [e.message_id for e in sent]
        # The middle one is retried later: the others are settled, the AMQP message is not.
        await first_bus.complete(
            batch, [(Outcome.ACK, None), (Outcome.RETRY, "later"), (Outcome.ACK, None)]
        )
        await first_bus.close()  # dies before the retry: the whole bundle comes back
        second_bus = rig.bus()
        again = await claim_some(second_bus, spec, "member-2", 3)
        assert [d.envelope.message_id for d in again.deliveries] == [e.message_id for e in sent]
        assert [d.attempt for d in again.deliveries] == [2, 2, 2]
        await second_bus.complete(again, [(Outcome.ACK, None)] * 3)
        await second_bus.close()
        third = rig.bus()
        assert (await third.claim(spec, "member-3", 10)).deliveries == []
        assert await queue_depths(rig.url, third.queue_names(spec)) == [0] * 8

    rig.run(scenario)


def test_a_bundle_that_cannot_be_unpacked_is_dead_lettered_and_the_queue_goes_on(
    rig: Rig,
) -> None:
    async def scenario() -> None:
        bus = rig.bus()
        system = System([queue_service("alpha", ConformanceCommand)])
        [spec] = consumers_of(system)
        store = rig.store("alpha")
        await bus.prepare([spec], system.routes)
        connection = await aio_pika.connect(rig.url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b"\x92 truncated", content_type=BUNDLE_CONTENT_TYPE, message_id="odd-1"
                ),
                routing_key=bus.queue_names(spec)[0],
            )
        keys = same_partition_keys(bus, 2)
        await system.submit_many(bus, [ConformanceCommand(key=key, seq=1) for key in keys])
        await run_services(
            bus,
            system,
            {"alpha": store},
            lambda: bool(store.sync.dead_letters()) and handled(store, "alpha") == 2,
        )
        [dead] = store.sync.dead_letters()
        assert dead.envelope.message_type == "unknown"
        assert dead.envelope.message_id == "odd-1"
        assert dead.envelope.body == b"\x92 truncated"
        assert "unknown" in dead.reason
        assert recorded(store, "alpha") == {key: [1] for key in keys}

    rig.run(scenario)


# ------------------------------------------------------------------------------------ sizes


def test_an_event_of_the_size_limit_is_replayed_whole_from_the_stream(rig: Rig) -> None:
    async def scenario() -> None:
        bus = rig.bus()
        system = System([subscriber("watcher", ConformanceEvent)])
        await bus.prepare(consumers_of(system), system.routes)
        sent = await system.submit(bus, padded(ConformanceEvent, "K-big", MAX_MESSAGE_BYTES - 10))
        [stored] = [e async for e in bus.replay(0)]
        assert stored.envelope.body == sent.body

    rig.run(scenario)


# ---------------------------------------------------------------------------- connection


def cut_connections(name: str) -> int:
    """Close, from the broker's side, every connection whose client calls itself ``name``."""
    listed = servers.rabbitmqctl(
        "list_connections", "-q", "--no-table-headers", "pid", "client_properties", check=True
    )
    pids = [line.split()[0] for line in listed.splitlines() if name in line]
    for pid in pids:
        servers.rabbitmqctl("close_connection", pid, "test cut", check=True)
    return len(pids)


def test_consuming_and_publishing_resume_after_the_connection_is_cut(rig: Rig) -> None:
    async def scenario() -> None:
        name = f"cut-{uuid.uuid4().hex[:8]}"
        bus = rig.bus(connection_name=name, reconnect_interval=0.2)
        system = System([queue_service("alpha", ConformanceCommand)])
        store = rig.store("alpha")
        await bus.prepare(consumers_of(system), system.routes)
        await system.submit_many(bus, [ConformanceCommand(key="K-1", seq=i) for i in range(5)])
        await run_services(bus, system, {"alpha": store}, lambda: handled(store, "alpha") == 5)
        runtime = Runtime(store, system, bus=bus, member="member-1", poll_interval=0.05)
        running = asyncio.create_task(
            runtime.run_until(lambda: handled(store, "alpha") == 10, timeout=60)
        )
        assert await asyncio.to_thread(cut_connections, name) == 1
        envelopes = [ConformanceCommand(key="K-1", seq=i) for i in range(5, 10)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # publishing fails while disconnected, then works again
            try:
                await system.submit_many(bus, envelopes)
                break
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await running
        assert recorded(store, "alpha") == {"K-1": list(range(10))}

    rig.run(scenario)


def test_deliveries_in_hand_when_the_connection_is_cut_come_again(rig: Rig) -> None:
    async def scenario() -> None:
        name = f"cut-{uuid.uuid4().hex[:8]}"
        bus = rig.bus(connection_name=name, reconnect_interval=0.2)
        service = queue_service("alpha", ConformanceCommand)
        [spec] = service.consumers()
        system = System([service])
        await bus.prepare([spec], system.routes)
        sent = await system.submit_many(
            bus, [ConformanceCommand(key="K-1", seq=i) for i in range(3)]
        )
        batch = await claim_some(bus, spec, "member-1", 3)
        assert await asyncio.to_thread(cut_connections, name) == 1
        # Completing after the cut acknowledges nothing (the broker took them back), quietly.
        await bus.complete(batch, [(Outcome.ACK, None)] * 3)
        again = await claim_some(bus, spec, "member-1", 3)
        assert [(d.envelope.message_id, d.attempt) for d in again.deliveries] == [
            (e.message_id, 2) for e in sent
        ]
        await bus.complete(again, [(Outcome.ACK, None)] * 3)

    rig.run(scenario)


def test_a_refused_connection_is_one_clear_line_without_the_password(
    rabbit_url: str, tmp_path: Path
) -> None:
    """A virtual host that does not exist and a wrong password: the bus raises BusUnavailable,
    and the command line prints why on one line and exits with status 1."""
    host = f"127.0.0.1:{urlsplit(rabbit_url).port or 5672}"
    user = urlsplit(rabbit_url).username
    vhost = f"sagaline-missing-{uuid.uuid4().hex[:8]}"
    missing = rabbit_url.replace(urlsplit(rabbit_url).path, f"/{vhost}")
    wrong = f"amqp://{user}:s3cret-{uuid.uuid4().hex[:6]}@{host}/"

    async def refused(url: str) -> str:
        bus = RabbitBus(url)
        with pytest.raises(BusUnavailable) as raised:
            await bus.open()
        await bus.close()
        return str(raised.value)

    assert asyncio.run(refused(missing)) == (
        f"RabbitMQ at {redact_url(missing)} refused the connection: virtual host {vhost!r}"
        " not found, or not open to this user (NOT_ALLOWED)"
    )
    denied = asyncio.run(refused(wrong))
    assert denied.startswith(f"RabbitMQ at amqp://{user}:***@{host}/ refused the connection: ")
    assert "ACCESS_REFUSED" in denied
    for url, reason in ((missing, f"virtual host {vhost!r} not found"), (wrong, "ACCESS_REFUSED")):
        for command in (["teardown", "--yes"], ["submit", "-"]):
            done = subprocess.run(
                [sys.executable, "-m", "sagaline", *command, "--bus", url],
                input=SEED_ORDER_JSON,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert done.returncode == 1, done.stderr
            assert done.stderr.startswith(f"error: RabbitMQ at {redact_url(url)} refused"), done
            assert reason in done.stderr
            assert done.stderr.count("\n") == 1, done.stderr
            assert "s3cret" not in done.stderr


# -------------------------------------------------------------------------------- the flow


def test_the_order_flow_runs_on_rabbitmq_with_a_store_per_service(rig: Rig) -> None:
    async def scenario() -> None:
        bus = rig.bus()
        system = build_system()
        stores = {name: rig.store(name) for name in system.services}
        await bus.prepare(consumers_of(system), system.routes)
        async with stores["inventory"].transaction() as tx:
            for product_id, quantity in DEMO_STOCK.items():
                await set_stock(tx, product_id, quantity)
        submitted: list[Envelope] = [await system.submit(bus, o) for o in demo_orders()]
        assert [e.correlation_id for e in submitted] == ["ORD-12345", "ORD-12346", "ORD-12347"]

        def statuses() -> dict[str, str]:
            return {
                row["orderId"]: row["status"]
                for row in stores["read"].sync.query_documents("read.order")
            }

        def settled() -> bool:
            sagas = stores["orchestrator"].sync.list_sagas()
            return (
                len(sagas) == 3
                and all(s.status in ("COMPLETED", "COMPENSATED") for s in sagas)
                and set(statuses().values()) <= {"CONFIRMED", "CANCELLED"}
                and len(statuses()) == 3
            )

        await run_services(bus, system, stores, settled, timeout=60)
        assert statuses() == {
            "ORD-12345": "CONFIRMED",
            "ORD-12346": "CANCELLED",
            "ORD-12347": "CANCELLED",
        }
        sagas = {s.saga_id: s.status for s in stores["orchestrator"].sync.list_sagas()}
        assert sorted(sagas.values()) == ["COMPENSATED", "COMPENSATED", "COMPLETED"]
        for store in stores.values():
            assert not store.sync.dead_letters()
        replayed = Counter([e.envelope.message_type async for e in bus.replay(0)])
        assert replayed["OrderCreatedEvent"] == 3
        assert replayed["OrderConfirmedEvent"] == 1
        assert replayed["OrderCancelledEvent"] == 2

    rig.run(scenario)
