"""Step timeouts and saga deadlines through the real message path, on the test kit's clock: a step
whose service is down fails when its timeout or the saga's deadline passes and the saga
compensates; the service's late answer is compensated too. On SQLite, PostgreSQL, and PostgreSQL
with NATS; no test sleeps, the fake clock is moved instead.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import servers

from sagaline import Deployment
from sagaline.backends.postgres import PostgresDatabase
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.clock import FakeClock
from sagaline.handling import Runtime, System
from sagaline.orders import build_system
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.orders.payment import PAYMENTS
from sagaline.orders.provider import PaymentProvider
from sagaline.orders.read import ORDER_VIEW
from sagaline.ports import Backend, SagaRecord, StoreTransaction
from sagaline.saga import SagaStatus

ORDER = CreateOrderCommand(
    order_id="ORD-T1",
    customer_id="CUST-1",
    items=[OrderItem(product_id="PROD-A", quantity=2)],
    total_amount=Decimal("20.00"),
)
WITHOUT_PAYMENT = ("order", "inventory", "orchestrator", "read")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    yield from servers.postgres_database()


Opener = Callable[[FakeClock], Backend]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opened: list[Backend] = []

    def make(clock: FakeClock) -> Backend:
        db: Backend
        if request.param == "sqlite":
            db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db", clock=clock)
        else:
            url = request.getfixturevalue("pg_url")
            db = PostgresDatabase(url, schema=f"t_{uuid.uuid4().hex[:10]}", clock=clock)
        opened.append(db)
        return db

    yield make
    for db in opened:
        asyncio.run(db.close())


async def saga_of(db: Backend, order_id: str) -> SagaRecord | None:
    async with db.transaction() as tx:
        return await tx.get_saga(f"order:{order_id}")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    """Wait until ``check()`` holds (the workers run meanwhile); fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not so after {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def waiting_for_payment(db: Backend, order_id: str = "ORD-T1") -> bool:
    """Whether the saga of ``order_id`` sent ProcessPayment and waits for its answer."""
    saga = await saga_of(db, order_id)
    steps: dict[str, dict[str, Any]] = saga.data.get("_steps", {}) if saga else {}
    return bool(steps.get("process_payment", {}).get("s") == "running")


async def status_is(db: Backend, status: SagaStatus, order_id: str = "ORD-T1") -> bool:
    saga = await saga_of(db, order_id)
    return saga is not None and saga.status == status


async def refunded(db: Backend, order_id: str = "ORD-T1") -> bool:
    async with db.transaction() as tx:
        payment = await tx.get_document(PAYMENTS, order_id)
    return payment is not None and payment.data["status"] == "REFUNDED"


async def _views(tx: StoreTransaction) -> list[dict[str, Any]]:
    document = await tx.get_document(ORDER_VIEW, "ORD-T1")
    return [] if document is None else [document.data]


@asynccontextmanager
async def running(db: Backend, system: System, services: Sequence[str]) -> AsyncIterator[Runtime]:
    runtime = Runtime(db, system, services, poll_interval=0.02)
    task = asyncio.create_task(runtime.run())
    try:
        yield runtime
    finally:
        runtime.stop()
        await task


#: The limits an order saga may have: a timeout on each step, and a deadline on the whole saga,
#: each with the cause and the reason its failure records.
LIMITS = {
    "step timeout": (
        {"step_timeout": 30.0},
        "timeout",
        "step process_payment timed out after 30 s",
    ),
    "deadline": ({"deadline": 120.0}, "deadline", "the saga's deadline of 120 s passed"),
}


@pytest.mark.parametrize("limit", list(LIMITS))
def test_a_limit_that_passes_cancels_the_order_and_the_late_charge_is_refunded(
    open_store: Opener, limit: str
) -> None:
    """A step timeout (from when ProcessPayment was sent) or a deadline (from when the saga
    started) passes with the payment unanswered: the order is cancelled with a reason that
    says so; when the payment service comes back, its late charge is refunded."""
    option, cause, reason = LIMITS[limit]
    seconds = next(iter(option.values()))

    async def scenario() -> None:
        clock = FakeClock()
        db = open_store(clock)
        await db.open()
        provider = PaymentProvider()
        system = build_system(
            step_timeout=option.get("step_timeout"),
            deadline=option.get("deadline"),
            provider=provider,
        )
        async with db.transaction() as tx:
            await set_stock(tx, "PROD-A", 5)
        await system.submit(db, ORDER)

        async with running(db, system, WITHOUT_PAYMENT):
            await until(lambda: waiting_for_payment(db), "the saga sent ProcessPayment")
            # Nothing answers. The one timer set is due ``seconds`` from now (the clock stood
            # still since the saga started and the command was sent).
            due = await db.next_timer_due()
            assert due is not None and due == pytest.approx(clock.time() + seconds, abs=0.01)
            clock.advance(seconds - 1)
            assert await status_is(db, SagaStatus.RUNNING)
            clock.advance(2)
            await until(lambda: status_is(db, SagaStatus.COMPENSATED), "the order compensated")
        saga = await saga_of(db, "ORD-T1")
        assert saga is not None
        assert saga.data["_failure"] == {
            "step": "process_payment",
            "event": cause,
            "reason": reason,
        }
        async with db.transaction() as tx:
            [view] = await _views(tx)
        assert view["status"] == "CANCELLED"
        assert view["reason"] == f"Payment failed: {reason}"
        assert provider.charges() == []

        # The payment service comes back: it charges (the command was still queued), and the
        # saga, which gave up on the payment, has it refunded.
        async with running(db, system, [*WITHOUT_PAYMENT, "payment"]):
            await until(lambda: refunded(db), "the late charge refunded")
        [charge] = provider.charges()
        assert charge.refunded
        assert re.fullmatch(r"saga:order:ORD-T1:process_payment\.[0-9a-f]{8}", charge.key)
        assert await status_is(db, SagaStatus.COMPENSATED)
        assert await db.next_timer_due() is None

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    yield from servers.nats_prefix()


def test_on_a_broker_deployment_the_timer_lives_in_the_store_of_its_saga(
    pg_url: str, nats_url: str
) -> None:
    """PostgreSQL stores (one schema per service) and NATS between them: the orchestrator's
    timers are kept in its own store and fired through its outbox."""

    async def scenario() -> None:
        clock = FakeClock()
        store_url = pg_url  # the module's own database: a schema per service in it
        provider = PaymentProvider()
        system = build_system(step_timeout=30, provider=provider)
        deployment = Deployment(
            store_url, nats_url, list(system.services), store_options={"clock": clock}
        )
        await deployment.open()
        await deployment.prepare_bus(system)
        orchestrator = deployment.store("orchestrator")
        try:
            async with deployment.store("inventory").transaction() as tx:
                await set_stock(tx, "PROD-A", 5)
            await system.submit(deployment.entry, ORDER)

            runtimes = deployment.runtimes(system, WITHOUT_PAYMENT, poll_interval=0.02)
            tasks = [asyncio.create_task(r.run()) for r in runtimes]
            try:
                await until(
                    lambda: waiting_for_payment(orchestrator), "the payment step's timer set"
                )
                assert await orchestrator.next_timer_due() == clock.time() + 30
                for other in WITHOUT_PAYMENT[:2]:
                    assert await deployment.store(other).next_timer_due() is None
                clock.advance(31)
                await until(
                    lambda: status_is(orchestrator, SagaStatus.COMPENSATED),
                    "the order compensated",
                )
            finally:
                for runtime in runtimes:
                    runtime.stop()
                await asyncio.gather(*tasks)
            assert await orchestrator.next_timer_due() is None
            assert provider.charges() == []
        finally:
            await deployment.close()

    asyncio.run(scenario())


@pytest.fixture
def own_deployment_urls() -> Iterator[tuple[str, str]]:
    """A database and a NATS prefix of the test's own (nothing left by another test)."""
    database, prefix = servers.postgres_database(), servers.nats_prefix()
    try:
        yield next(database), next(prefix)
    finally:
        database.close()
        prefix.close()


def test_on_a_broker_deployment_a_saga_deadline_compensates(
    own_deployment_urls: tuple[str, str],
) -> None:
    """PostgreSQL stores and NATS between them: the deadline set when the saga started lives in
    the orchestrator's store, fires through its outbox and compensates the saga; a saga that
    completes in time leaves no timer behind."""

    async def scenario() -> None:
        clock = FakeClock()
        system = build_system(deadline=120, provider=PaymentProvider())
        store_url, bus_url = own_deployment_urls
        deployment = Deployment(
            store_url, bus_url, list(system.services), store_options={"clock": clock}
        )
        await deployment.open()
        await deployment.prepare_bus(system)
        orchestrator = deployment.store("orchestrator")
        try:
            async with deployment.store("inventory").transaction() as tx:
                await set_stock(tx, "PROD-A", 5)
            await system.submit(deployment.entry, ORDER)

            runtimes = deployment.runtimes(system, WITHOUT_PAYMENT, poll_interval=0.02)
            tasks = [asyncio.create_task(r.run()) for r in runtimes]
            try:
                await until(
                    lambda: waiting_for_payment(orchestrator), "the saga sent ProcessPayment"
                )
                assert await orchestrator.next_timer_due() == pytest.approx(
                    clock.time() + 120, abs=0.01
                )
                for other in WITHOUT_PAYMENT[:2]:
                    assert await deployment.store(other).next_timer_due() is None
                clock.advance(121)
                await until(
                    lambda: status_is(orchestrator, SagaStatus.COMPENSATED), "the order compensated"
                )
            finally:
                for runtime in runtimes:
                    runtime.stop()
                await asyncio.gather(*tasks)
            saga = await saga_of(orchestrator, "ORD-T1")
            assert saga is not None and saga.data["_failure"]["event"] == "deadline"
            assert await orchestrator.next_timer_due() is None

            # With every service up, a saga done before its deadline cancels the deadline.
            on_time = msgspec.structs.replace(ORDER, order_id="ORD-T2")
            await system.submit(deployment.entry, on_time)
            # The test's clock stands still: the stopped relays gave their outbox leases up, so
            # the new ones publish at once.
            runtimes = deployment.runtimes(system, list(system.services), poll_interval=0.02)
            tasks = [asyncio.create_task(r.run()) for r in runtimes]
            try:
                await until(
                    lambda: status_is(orchestrator, SagaStatus.COMPLETED, "ORD-T2"),
                    "the order completed",
                )
            finally:
                for runtime in runtimes:
                    runtime.stop()
                await asyncio.gather(*tasks)
            assert await orchestrator.next_timer_due() is None
        finally:
            await deployment.close()

    asyncio.run(scenario())
