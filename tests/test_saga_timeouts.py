"""Step timeouts through the real message path, on the test kit's clock: a step whose service is
down fails when its timeout passes and the saga compensates; the service's late answer is
compensated too. On SQLite and on PostgreSQL; no test sleeps, the fake clock is moved instead.
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


def test_a_step_timeout_cancels_the_order_and_the_late_charge_is_refunded(
    open_store: Opener,
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        db = open_store(clock)
        await db.open()
        provider = PaymentProvider()
        system = build_system(step_timeout=30, provider=provider)
        async with db.transaction() as tx:
            await set_stock(tx, "PROD-A", 5)
        await system.submit(db, ORDER)

        async def waiting_for_payment() -> bool:
            saga = await saga_of(db, "ORD-T1")
            steps: dict[str, dict[str, Any]] = saga.data.get("_steps", {}) if saga else {}
            return bool(steps.get("process_payment", {}).get("s") == "running")

        async def status_is(status: SagaStatus) -> bool:
            saga = await saga_of(db, "ORD-T1")
            return saga is not None and saga.status == status

        async with running(db, system, WITHOUT_PAYMENT):
            await until(waiting_for_payment, "the saga sent ProcessPayment")
            # Nothing answers. The step's timer is due 30 seconds after it was sent.
            due = await db.next_timer_due()
            assert due is not None and due == pytest.approx(clock.time() + 30, abs=0.01)
            clock.advance(29)
            assert await status_is(SagaStatus.RUNNING)
            clock.advance(2)
            await until(lambda: status_is(SagaStatus.COMPENSATED), "the order compensated")
        saga = await saga_of(db, "ORD-T1")
        assert saga is not None
        assert saga.data["_failure"]["reason"] == "step process_payment timed out after 30 s"
        async with db.transaction() as tx:
            [view] = [d for d in await _views(tx)]
        assert view["status"] == "CANCELLED"
        assert view["reason"] == "Payment failed: step process_payment timed out after 30 s"
        assert provider.charges() == []

        # The payment service comes back: it charges (the command was still queued), and the
        # saga, which gave up on the payment, has it refunded.
        async def refunded() -> bool:
            async with db.transaction() as tx:
                payment = await tx.get_document(PAYMENTS, "ORD-T1")
            return payment is not None and payment.data["status"] == "REFUNDED"

        async with running(db, system, [*WITHOUT_PAYMENT, "payment"]):
            await until(refunded, "the late charge refunded")
        [charge] = provider.charges()
        assert charge.refunded
        assert re.fullmatch(r"saga:order:ORD-T1:process_payment\.[0-9a-f]{8}", charge.key)
        saga = await saga_of(db, "ORD-T1")
        assert saga is not None and saga.status == SagaStatus.COMPENSATED
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

            async def waiting_for_payment() -> bool:
                saga = await saga_of(orchestrator, "ORD-T1")
                steps: dict[str, dict[str, Any]] = saga.data.get("_steps", {}) if saga else {}
                return bool(steps.get("process_payment", {}).get("s") == "running")

            async def compensated() -> bool:
                saga = await saga_of(orchestrator, "ORD-T1")
                return saga is not None and saga.status == SagaStatus.COMPENSATED

            runtimes = deployment.runtimes(system, WITHOUT_PAYMENT, poll_interval=0.02)
            tasks = [asyncio.create_task(r.run()) for r in runtimes]
            try:
                await until(waiting_for_payment, "the payment step's timer set")
                assert await orchestrator.next_timer_due() == clock.time() + 30
                for other in WITHOUT_PAYMENT[:2]:
                    assert await deployment.store(other).next_timer_due() is None
                clock.advance(31)
                await until(compensated, "the order compensated")
            finally:
                for runtime in runtimes:
                    runtime.stop()
                await asyncio.gather(*tasks)
            assert await orchestrator.next_timer_due() is None
            assert provider.charges() == []
        finally:
            await deployment.close()

    asyncio.run(scenario())


def test_a_saga_deadline_cancels_the_order_and_the_late_charge_is_refunded(
    open_store: Opener,
) -> None:
    """No step timeout, a deadline on the whole saga: when it passes with the payment still
    unanswered, the order is cancelled saying so, and the charge made afterwards is refunded."""

    async def scenario() -> None:
        clock = FakeClock()
        db = open_store(clock)
        await db.open()
        provider = PaymentProvider()
        system = build_system(deadline=120, provider=provider)
        async with db.transaction() as tx:
            await set_stock(tx, "PROD-A", 5)
        await system.submit(db, ORDER)

        async def waiting_for_payment() -> bool:
            saga = await saga_of(db, "ORD-T1")
            steps: dict[str, dict[str, Any]] = saga.data.get("_steps", {}) if saga else {}
            return bool(steps.get("process_payment", {}).get("s") == "running")

        async def status_is(status: SagaStatus) -> bool:
            saga = await saga_of(db, "ORD-T1")
            return saga is not None and saga.status == status

        async with running(db, system, WITHOUT_PAYMENT):
            await until(waiting_for_payment, "the saga sent ProcessPayment")
            # One timer only: the deadline, 120 seconds after the saga started.
            due = await db.next_timer_due()
            assert due is not None and due == pytest.approx(clock.time() + 120, abs=0.01)
            clock.advance(119)
            assert await status_is(SagaStatus.RUNNING)
            clock.advance(2)
            await until(lambda: status_is(SagaStatus.COMPENSATED), "the order compensated")
        saga = await saga_of(db, "ORD-T1")
        assert saga is not None
        reason = "the saga's deadline of 120 s passed"
        assert saga.data["_failure"] == {
            "step": "process_payment",
            "event": "deadline",
            "reason": reason,
        }
        async with db.transaction() as tx:
            [view] = await _views(tx)
        assert view["status"] == "CANCELLED"
        assert view["reason"] == f"Payment failed: {reason}"

        async def refunded() -> bool:
            async with db.transaction() as tx:
                payment = await tx.get_document(PAYMENTS, "ORD-T1")
            return payment is not None and payment.data["status"] == "REFUNDED"

        async with running(db, system, [*WITHOUT_PAYMENT, "payment"]):
            await until(refunded, "the late charge refunded")
        [charge] = provider.charges()
        assert charge.refunded
        assert await db.next_timer_due() is None

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

            async def status_is(order_id: str, status: SagaStatus) -> bool:
                saga = await saga_of(orchestrator, order_id)
                return saga is not None and saga.status == status

            async def waiting_for_payment() -> bool:
                saga = await saga_of(orchestrator, "ORD-T1")
                steps: dict[str, dict[str, Any]] = saga.data.get("_steps", {}) if saga else {}
                return bool(steps.get("process_payment", {}).get("s") == "running")

            runtimes = deployment.runtimes(system, WITHOUT_PAYMENT, poll_interval=0.02)
            tasks = [asyncio.create_task(r.run()) for r in runtimes]
            try:
                await until(waiting_for_payment, "the saga sent ProcessPayment")
                assert await orchestrator.next_timer_due() == pytest.approx(
                    clock.time() + 120, abs=0.01
                )
                for other in WITHOUT_PAYMENT[:2]:
                    assert await deployment.store(other).next_timer_due() is None
                clock.advance(121)
                await until(
                    lambda: status_is("ORD-T1", SagaStatus.COMPENSATED), "the order compensated"
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
                    lambda: status_is("ORD-T2", SagaStatus.COMPLETED), "the order completed"
                )
            finally:
                for runtime in runtimes:
                    runtime.stop()
                await asyncio.gather(*tasks)
            assert await orchestrator.next_timer_due() is None
        finally:
            await deployment.close()

    asyncio.run(scenario())
