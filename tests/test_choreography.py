"""The order flow run as a choreography: the services react to each other's events.

The demo's three orders end as they end under the orchestrator (confirmed; cancelled for want of
stock; cancelled by a payment decline, each with its reason), on one SQLite file and on
PostgreSQL with NATS. The passive monitor keeps their saga records where the saga queries and the
trace read them, and the invariants of RELIABILITY.md hold. A worker killed with SIGKILL mid-run
and restarted loses nothing and does nothing twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import servers
from conftest import OrderStore, ServiceProcesses

from sagaline import (
    ActionRefused,
    SagaDefinitionError,
    SagaMonitor,
    SagaStatus,
    Step,
    StepRetry,
    find_saga,
    request_action,
)
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.deploy import Deployment
from sagaline.handling import Runtime, System
from sagaline.observability import load_trace, saga_summary
from sagaline.orders import ORDER_SAGA, SERVICE_NAMES
from sagaline.orders.checks import check_deployment, check_invariants
from sagaline.orders.choreography import (
    PAYMENT_TERMS,
    SAGA_SERVICE,
    build_choreography_system,
)
from sagaline.orders.demo import (
    DEMO_ORDER_IDS,
    DEMO_STOCK,
    demo_orders,
    is_deployment_settled,
    stock_demo,
    submit_demo_orders,
)
from sagaline.orders.read import ORDER_VIEW
from sagaline.saga import saga_id
from sagaline.testing import Violation, format_violations

WORKER = ("-u", str(Path(__file__).with_name("choreography_worker.py")))
TIMEOUT = 60.0
LEASE_SECONDS = 2.0
ORDERS = 200
INITIAL_STOCK = {"PROD-A": 300, "PROD-B": 10}

#: What the demo's orders come to, as the read model and the monitor's saga records say.
EXPECTED = {
    "ORD-12345": ("CONFIRMED", None, "COMPLETED", None),
    "ORD-12346": (
        "CANCELLED",
        "Inventory reservation failed: Insufficient stock for PROD-A",
        "COMPENSATED",
        "reserve_inventory",
    ),
    "ORD-12347": (
        "CANCELLED",
        "Payment failed: Payment declined: 2500.00 exceeds the limit of 1000.00 for CUST-555",
        "COMPENSATED",
        "process_payment",
    ),
}


async def assert_demo_outcomes(deployment: Deployment) -> None:
    """Read model, saga records (as ``sagaline sagas`` lists them) and the confirmed order's
    trace (as ``sagaline trace`` reads it, from every store and a database bus) show the demo's
    three outcomes."""
    read = deployment.queries("read")
    sagas = deployment.queries(SAGA_SERVICE)
    summaries = {row["sagaId"]: row for row in map(saga_summary, await sagas.list_sagas())}
    assert set(summaries) == {saga_id(ORDER_SAGA, key) for key in DEMO_ORDER_IDS}
    for order_id, (status, reason, saga, failed_step) in EXPECTED.items():
        view = await read.get_document(ORDER_VIEW, order_id)
        assert view is not None
        assert (view.data["status"], view.data["reason"]) == (status, reason)
        summary = summaries[saga_id(ORDER_SAGA, order_id)]
        assert (summary["status"], summary["failedStep"]) == (saga, failed_step)
    assert await sagas.saga_counts() == {"COMPLETED": 1, "COMPENSATED": 2}

    trace = await load_trace(
        deployment.audit_sources(),
        "ORD-12345",
        saga_id(ORDER_SAGA, "ORD-12345"),
        saga_store=sagas,
    )
    story = trace.to_json()
    assert story["saga"]["status"] == "COMPLETED"
    transitions = [entry["transition"] for entry in story["saga"]["history"]]
    assert transitions == [
        "started",
        "step reserve_inventory succeeded",
        "step process_payment succeeded",
    ]
    # The monitor only watched: no entry sent anything, and no service sent a saga command.
    assert not any("sent" in entry for entry in story["saga"]["history"])
    types = [message["type"] for message in story["messages"]]
    assert [t for t in types if t.endswith("Command")] == ["CreateOrderCommand"]
    handled = {
        message["type"]: {entry["consumer"] for entry in message["handledBy"]}
        for message in story["messages"]
    }
    assert handled["OrderCreatedEvent"] >= {"inventory", "payment", SAGA_SERVICE, "read"}
    assert handled["InventoryReservedEvent"] >= {"payment", SAGA_SERVICE}
    assert handled["PaymentProcessedEvent"] >= {"order", SAGA_SERVICE}
    assert handled["OrderConfirmedEvent"] >= {"order", "inventory", "read"}


# ------------------------------------------------------------ the demo, embedded


def test_the_demo_orders_end_as_orchestrated_on_one_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "choreography.db"
    system = build_choreography_system()

    async def run() -> list[Violation]:
        db = SqliteDatabase(f"sqlite:///{path}")
        try:
            await stock_demo(db)
            await submit_demo_orders(db, system)
            await Runtime(db, system).run_until(lambda: _idle(db, system), timeout=TIMEOUT)
            await assert_demo_outcomes(Deployment.of(db, SERVICE_NAMES))
            return await check_invariants(db, initial_stock=DEMO_STOCK, system=system)
        finally:
            await db.close()

    violations = asyncio.run(run())
    assert not violations, format_violations(violations)

    # The command line reads the monitor's records as it reads the orchestrator's.
    where = ["--store", f"sqlite:///{path}"]
    listed = json.loads(_sagaline("sagas", "--json", *where, cwd=tmp_path))
    assert listed["counts"] == {"COMPLETED": 1, "COMPENSATED": 2}
    story = json.loads(_sagaline("trace", "ORD-12347", "--json", *where, cwd=tmp_path))
    assert story["saga"]["status"] == "COMPENSATED"
    assert [entry["transition"] for entry in story["saga"]["history"]][-2:] == [
        "step create_order compensated",
        "step reserve_inventory compensated",
    ]


async def _idle(db: SqliteDatabase, system: System, sagas: int = len(DEMO_ORDER_IDS)) -> bool:
    counts = await db.saga_counts()
    ended = counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)
    return ended == sagas == sum(counts.values()) and await db.is_idle(system.subscribers)


def _sagaline(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------ the demo, PostgreSQL + NATS


@pytest.fixture
def postgres_and_nats() -> Iterator[tuple[str, str]]:
    """A PostgreSQL database and a NATS prefix of this test's own."""
    postgres = servers.postgres_database()
    store = next(postgres)
    try:
        prefix = servers.nats_prefix()
        try:
            yield store, next(prefix)
        finally:
            prefix.close()
    finally:
        postgres.close()


async def _choreography_settled(deployment: Deployment, order_ids: Sequence[str]) -> bool:
    """The orchestrated flow's test of a settled deployment, and what only the choreography
    adds: payment kept every order's terms, the read model saw every order's creation."""
    if not await is_deployment_settled(deployment, order_ids):
        return False
    payment = deployment.queries("payment")
    read = deployment.queries("read")
    for order_id in order_ids:
        if await payment.get_document(PAYMENT_TERMS, order_id) is None:
            return False
        view = await read.get_document(ORDER_VIEW, order_id)
        if view is None or "createdAt" not in view.data:
            return False
    return True


async def _run_until(
    runtimes: Sequence[Runtime], done: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT
) -> None:
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not await done():
            for task in tasks:
                if task.done():
                    task.result()
            assert loop.time() < deadline, f"not settled after {timeout} seconds"
            await asyncio.sleep(0.05)
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)


def test_the_demo_orders_end_as_orchestrated_on_postgresql_and_nats(
    postgres_and_nats: tuple[str, str],
) -> None:
    store, bus = postgres_and_nats
    system = build_choreography_system()

    async def run() -> list[Violation]:
        deployment = Deployment(store, bus, SERVICE_NAMES)
        await deployment.open()
        try:
            await stock_demo(deployment.store("inventory"))
            await submit_demo_orders(deployment.entry, system)
            await _run_until(
                deployment.runtimes(system),
                lambda: _choreography_settled(deployment, DEMO_ORDER_IDS),
            )
            await assert_demo_outcomes(deployment)
            return await check_deployment(deployment, initial_stock=DEMO_STOCK, system=system)
        finally:
            await deployment.close()

    violations = asyncio.run(asyncio.wait_for(run(), 180))
    assert not violations, format_violations(violations)


# ---------------------------------------------------------- a worker killed mid-run


@pytest.fixture
def choreography_store(tmp_path: Path) -> Iterator[OrderStore]:
    """A fresh SQLite store for the choreography, with the test's connection to it."""
    store = OrderStore(tmp_path / "choreography.db", build_choreography_system())
    try:
        yield store
    finally:
        store.close()


def assert_outcome_correct(store: OrderStore) -> None:
    """Every invariant holds, nothing was dead-lettered, and every path was taken."""
    violations = asyncio.run(
        check_invariants(store.db, initial_stock=INITIAL_STOCK, system=store.system)
    )
    assert not violations, format_violations(violations)
    assert store.db.sync.dead_letters() == []
    assert store.db.sync.saga_counts().get("COMPLETED", 0) > 0
    reasons = {
        row["reason"].split(":")[0]
        for row in store.db.sync.query_documents(ORDER_VIEW)
        if row["status"] == "CANCELLED"
    }
    assert reasons == {"Inventory reservation failed", "Payment failed"}, reasons


@pytest.mark.parametrize(
    "crash_at",
    [
        pytest.param("after-handle:300", id="after-handle"),
        pytest.param("before-commit:6", id="before-commit"),
    ],
)
def test_a_worker_killed_mid_run_and_restarted_loses_nothing(
    crash_at: str, choreography_store: OrderStore, service_processes: ServiceProcesses
) -> None:
    choreography_store.stock(INITIAL_STOCK)
    choreography_store.submit(choreography_store.mix(0, ORDERS))

    doomed = service_processes.start(
        choreography_store.path, crash_at=crash_at, lease_seconds=LEASE_SECONDS, program=WORKER
    )
    service_processes.wait_for(
        lambda: doomed.poll() is not None or choreography_store.settled(ORDERS),
        timeout=TIMEOUT,
        what=f"crash at {crash_at}",
    )
    assert doomed.poll() == -signal.SIGKILL, service_processes.output(doomed)
    assert not choreography_store.settled(ORDERS)

    worker = service_processes.start(
        choreography_store.path, lease_seconds=LEASE_SECONDS, program=WORKER
    )
    service_processes.wait_for(
        lambda: choreography_store.settled(ORDERS),
        timeout=TIMEOUT,
        what="drained store after the restart",
        alive=[worker],
    )
    assert service_processes.stop(worker) == 0, service_processes.output(worker)
    assert_outcome_correct(choreography_store)


# ------------------------------------------- the checker sees a choreography's damage


@pytest.fixture(scope="module")
def settled_choreography(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store on which the choreography ran to the end in this process, without faults."""
    path = tmp_path_factory.mktemp("choreography") / "orders.db"
    watcher = OrderStore(path, build_choreography_system())
    watcher.stock(INITIAL_STOCK)
    watcher.submit(watcher.mix(0, ORDERS))

    async def run() -> None:
        db = SqliteDatabase(f"sqlite:///{path}")
        try:
            await Runtime(db, watcher.system).run_until(
                lambda: watcher.settled(ORDERS), timeout=TIMEOUT
            )
        finally:
            await db.close()

    asyncio.run(run())
    watcher.close()
    return path


def _compensated(conn: sqlite3.Connection) -> str:
    row = conn.execute(
        "SELECT saga_id FROM sagas WHERE status = 'COMPENSATED' ORDER BY saga_id"
    ).fetchone()
    assert row is not None
    return str(row[0]).partition(":")[2]


def _monitor_missed_the_end(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE sagas SET status = 'COMPENSATING' WHERE saga_id = ?",
        (saga_id(ORDER_SAGA, _compensated(conn)),),
    )


def _release_never_happened(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE documents SET data = json_set(data, '$.status', 'FAILED')"
        " WHERE namespace = 'inventory.reservation' AND key = ?",
        (_compensated(conn),),
    )


def _reaction_without_inbox_mark(conn: sqlite3.Connection) -> None:
    conn.execute(
        "DELETE FROM inbox WHERE consumer = 'payment' AND message_id ="
        " (SELECT message_id FROM events WHERE type = 'InventoryReservedEvent' LIMIT 1)"
    )


def _reacted_twice(conn: sqlite3.Connection) -> None:
    # Payment charged one reservation twice: a second answer to the same event.
    conn.execute(
        "INSERT INTO events (message_id, type, body, correlation_id, causation_id, timestamp,"
        " traceparent, source, part)"
        " SELECT 'second-charge', type, json_set(body, '$.transactionId', 'TRN-SECOND'),"
        " correlation_id, causation_id, timestamp, traceparent, source, part"
        " FROM events WHERE type = 'PaymentProcessedEvent' LIMIT 1"
    )


@pytest.mark.parametrize(
    ("damage", "invariants"),
    [
        (_monitor_missed_the_end, {"I1"}),
        (_release_never_happened, {"I2"}),
        (_reaction_without_inbox_mark, {"I5"}),
        (_reacted_twice, {"I4", "I5"}),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_the_checker_reports_damage_to_a_choreography(
    settled_choreography: Path,
    tmp_path: Path,
    damage: Callable[[sqlite3.Connection], None],
    invariants: set[str],
) -> None:
    copy = tmp_path / "damaged.db"
    with sqlite3.connect(settled_choreography) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    system = build_choreography_system()
    db = SqliteDatabase(f"sqlite:///{copy}")
    try:
        assert asyncio.run(check_invariants(db, initial_stock=INITIAL_STOCK, system=system)) == []
        damage(db.connection)
        violations: list[Violation] = asyncio.run(
            check_invariants(db, initial_stock=INITIAL_STOCK, system=system)
        )
    finally:
        asyncio.run(db.close())
    assert invariants <= {v.invariant for v in violations}, format_violations(violations)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"deadline": 60}, "a deadline"),
        ({"timeout": 30}, "step reserve_inventory's timeout"),
        ({"retry": StepRetry(attempts=3)}, "step reserve_inventory's retry"),
        ({"compensation_timeout": 30}, "step reserve_inventory's compensation_timeout"),
    ],
)
def test_a_monitor_refuses_what_only_a_sender_can_do(change: dict[str, Any], named: str) -> None:
    """A timeout, a retry or a deadline in a choreography's saga would never act (the monitor
    sends nothing): the monitor refuses the definition, naming it, instead of letting a saga
    wait for ever."""
    if "deadline" in change:
        definition = dataclasses.replace(ORDER_SAGA, **change)
    else:
        steps = tuple(
            dataclasses.replace(step, **change) if step.name == "reserve_inventory" else step
            for step in ORDER_SAGA.steps
            if isinstance(step, Step)
        )
        definition = dataclasses.replace(ORDER_SAGA, steps=steps)
    with pytest.raises(SagaDefinitionError, match=re.escape(named)):
        SagaMonitor([definition])
    SagaMonitor([ORDER_SAGA])  # as it is, it is followed


def test_an_operator_may_abort_a_choreographed_saga_but_not_ask_it_to_send(
    tmp_path: Path,
) -> None:
    """The monitor sends nothing: retry and compensate are refused with the reason, before
    anything is asked; abort ends the saga FAILED, recorded with who and why."""

    async def scenario() -> None:
        system = build_choreography_system()
        services = list(system.services)
        deployment = Deployment(f"sqlite:///{tmp_path}/c.db", services=services)
        await deployment.open()
        store = deployment.distinct_stores()[0]
        await stock_demo(store)
        await system.submit(store, demo_orders()[0])
        # Without its payment service the saga waits at the payment step.
        without_payment = [s for s in services if s != "payment"]
        followed = f"order:{DEMO_ORDER_IDS[0]}"

        async def waiting() -> bool:
            record = await store.get_saga(followed, history=False)
            return record is not None and record.step == 2

        await Runtime(store, system, without_payment).run_until(waiting, timeout=30)
        for action in ("retry", "compensate"):
            with pytest.raises(ActionRefused, match="monitor, which sends nothing"):
                await request_action(deployment, system, followed, action, by="ann", reason="x")
        await request_action(deployment, system, followed, "abort", by="ann", reason="by hand")

        async def failed() -> bool:
            record = await store.get_saga(followed, history=False)
            return record is not None and record.status == SagaStatus.FAILED

        await Runtime(store, system, without_payment).run_until(failed, timeout=30)
        record = await find_saga(deployment, system, followed)
        assert any(e.get("by") == "ann" and e.get("reason") == "by hand" for e in record.history)
        await deployment.close()

    asyncio.run(scenario())
