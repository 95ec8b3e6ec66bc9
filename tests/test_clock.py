"""The one clock: a fake clock's sleepers wake when it is moved, a worker backs off on its clock,
a runtime counts its waits on its clock, one clock given to a deployment reaches its stores and
its bus, and messages made under a harness's stamps take their ids and timestamps from them."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
import servers

from sagaline import Command, Deployment, Envelope, utc_now, utc_timestamp
from sagaline.clock import SYSTEM_CLOCK, FakeClock
from sagaline.errors import InvalidMessage, StoreUnavailable
from sagaline.handling import Service, System, Worker
from sagaline.messages import MessageStamps, message_id_problem, new_message_id, stamping
from sagaline.ports import Backend, Batch, ConsumerSpec


class ClockedCommand(Command, kw_only=True, frozen=True):
    """A command of these tests."""

    correlation: ClassVar[str] = "key"

    key: str


def _service() -> Service:
    service = Service("alpha")

    @service.handles(ClockedCommand)
    async def handle(ctx: Any, command: ClockedCommand) -> None:
        return None

    return service


async def _turns(count: int = 20) -> None:
    """Let the event loop run every ready task a few times over (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------- the fake clock


def test_a_sleeper_on_the_fake_clock_wakes_only_once_the_clock_reaches_its_deadline() -> None:
    async def scenario() -> None:
        clock = FakeClock(start=1000.0)
        woke: list[str] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append(name)

        tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("late", 10.0), ("soon", 5.0))]
        await _turns()
        assert clock.sleeping == 2
        assert clock.next_wake() == 1005.0

        clock.advance(4.0)
        await _turns()
        assert woke == []
        clock.advance(1.0)
        await _turns()
        assert woke == ["soon"]
        clock.set(1100.0)
        await _turns()
        assert woke == ["soon", "late"]
        assert clock.sleeping == 0 and clock.next_wake() is None
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_cancelled_sleeper_leaves_the_fake_clock() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        task = asyncio.create_task(clock.sleep(60.0))
        await _turns()
        assert clock.sleeping == 1
        task.cancel()
        await _turns()
        assert clock.sleeping == 0
        clock.advance(120.0)  # nothing left to wake, nothing raised
        assert task.cancelled()

    asyncio.run(scenario())


def test_the_system_clock_sleeps_for_real() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await SYSTEM_CLOCK.sleep(0.01)
        assert loop.time() - started >= 0.01

    asyncio.run(scenario())


# ------------------------------------------------------------------------- waits on the clock


class _DownStore:
    """A store that is down: every claim raises StoreUnavailable."""

    def __init__(self) -> None:
        self.claims = 0

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        self.claims += 1
        raise StoreUnavailable("the store is down")

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        return None


def test_a_worker_backs_off_a_store_outage_on_its_clock() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = _DownStore()
        service = _service()
        [spec] = service.consumers()
        worker = Worker(
            cast(Backend, store), System([service]), service, spec, member="m", clock=clock
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await _turns()
        # One claim, then a backoff of 0.1 s on the clock, however long the loop runs.
        assert store.claims == 1
        assert clock.sleeping == 1
        assert clock.next_wake() == pytest.approx(clock.time() + 0.1)

        clock.advance(0.1)
        await _turns()
        assert store.claims == 2
        # The backoff doubles.
        assert clock.next_wake() == pytest.approx(clock.time() + 0.2)

        # Stopping does not wait out the backoff.
        stop.set()
        await asyncio.wait_for(running, 5)
        assert store.claims == 2

    asyncio.run(scenario())


def test_a_runtime_counts_its_timeout_on_its_clock(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        deployment = Deployment(f"sqlite:///{tmp_path}/one.db", services=["alpha"], clock=clock)
        [runtime] = deployment.runtimes(System([_service()]))
        assert runtime.clock is clock
        waiting = asyncio.create_task(runtime.run_until(lambda: False, check_every=1.0, timeout=30))
        for _ in range(31):
            await _turns()
            assert not waiting.done()
            clock.advance(1.0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiting, 5)
        await deployment.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- deployments and their stores


def test_a_deployment_s_clock_reaches_its_stores_bus_and_workers(tmp_path: Path) -> None:
    clock = FakeClock()
    deployment = Deployment(
        f"sqlite:///{tmp_path}/{{service}}.db",
        f"sqlite:///{tmp_path}/bus.db",
        services=["alpha", "beta"],
        clock=clock,
    )
    stores: list[Any] = [*deployment.distinct_stores(), deployment.bus]
    assert len(stores) == 3
    assert all(store.clock is clock for store in stores)
    runtimes = deployment.runtimes(System([_service(), Service("beta")]), ["alpha"])
    assert [worker.clock for runtime in runtimes for worker in runtime.workers] == [clock]
    asyncio.run(deployment.close())

    plain = Deployment(f"sqlite:///{tmp_path}/plain.db", services=["alpha"])
    assert cast(Any, plain.store("alpha")).clock is SYSTEM_CLOCK
    asyncio.run(plain.close())


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from servers.postgres_database()


def test_a_deployment_s_clock_reaches_its_postgresql_stores(postgres_url: str) -> None:
    clock = FakeClock()
    deployment = Deployment(postgres_url, services=["alpha", "beta"], clock=clock)
    assert [cast(Any, store).clock for store in deployment.distinct_stores()] == [clock, clock]

    async def scenario() -> None:
        store = deployment.store("alpha")
        await deployment.open()
        system = System([_service()])
        sent = await system.submit(store, ClockedCommand(key="K-1"))
        [runtime] = deployment.runtimes(system, ["alpha"])
        assert await runtime.workers[0].run_once()
        # The store stamped what it wrote by the deployment's clock.
        [(consumer, at)] = (await store.handled_by([sent.message_id]))[sent.message_id]
        assert consumer == "alpha"
        assert at == utc_timestamp(clock.time())
        await deployment.close()

    asyncio.run(scenario())


# -------------------------------------------------------------------------------- stamps


def test_messages_take_ids_and_timestamps_from_the_stamps_in_force() -> None:
    def made(seed: int) -> list[tuple[str, str, datetime]]:
        clock = FakeClock(start=1_800_000_000.25)
        stamps = MessageStamps(clock, random.Random(seed))
        with stamping(stamps):
            made = []
            for _ in range(3):
                envelope = Envelope.wrap(ClockedCommand(key="K-1"))
                made.append((envelope.message_id, envelope.timestamp, utc_now()))
                clock.advance(0.5)
            return made

    first, again, other = made(1), made(1), made(2)
    assert first == again
    assert [m[0] for m in other] != [m[0] for m in first]
    assert [m[1] for m in first] == [
        "2027-01-15T08:00:00.250000Z",
        "2027-01-15T08:00:00.750000Z",
        "2027-01-15T08:00:01.250000Z",
    ]
    assert first[0][2] == datetime(2027, 1, 15, 8, 0, 0, 250000, tzinfo=UTC)
    assert len({m[0] for m in first}) == 3
    assert all(message_id_problem(m[0]) is None for m in first)
    # Outside the block, the machine's clock and randomness again.
    assert new_message_id() not in {m[0] for m in first}
    assert abs(utc_now().timestamp() - time.time()) < 60


def test_stamps_may_give_ids_of_one_s_own_if_they_are_valid() -> None:
    counter = iter(range(1, 100))
    stamps = MessageStamps(ids=lambda: f"trip-{next(counter)}")
    with stamping(stamps):
        assert [new_message_id() for _ in range(2)] == ["trip-1", "trip-2"]
    with stamping(MessageStamps(ids=lambda: "not an id")), pytest.raises(InvalidMessage):
        new_message_id()
