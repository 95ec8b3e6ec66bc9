"""Crash safety: a worker process killed with SIGKILL loses nothing and does nothing twice.

Each test runs the five services of the order flow as a real process on one SQLite file, kills it
(at a named crash point, or from outside at a random moment), restarts it, lets it drain the
backlog and then checks every invariant of RELIABILITY.md over the store's final contents.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import OrderStore, ServiceProcesses

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import Runtime
from sagaline.orders import build_system
from sagaline.orders.checks import check_invariants
from sagaline.orders.read import ORDER_VIEW
from sagaline.testing import Violation, format_violations

ORDERS = 200
INITIAL_STOCK = {"PROD-A": 300, "PROD-B": 10}
#: Bound on any one wait for the workers (a drained run of these sizes takes a few seconds).
TIMEOUT = 60.0
#: Leases of the workers here: a restarted worker waits this long for a killed one's leases.
LEASE_SECONDS = 2.0


def assert_outcome_correct(store: OrderStore, initial_stock: dict[str, int]) -> None:
    """Every invariant holds, nothing was dead-lettered, and every path of the saga was taken."""
    violations = asyncio.run(check_invariants(store.db, initial_stock=initial_stock))
    assert not violations, format_violations(violations)
    assert store.db.sync.dead_letters() == []
    counts = store.db.sync.saga_counts()
    assert counts.get("COMPLETED", 0) > 0, counts
    reasons = {
        row["reason"].split(":")[0]
        for row in store.db.sync.query_documents(ORDER_VIEW)
        if row["status"] == "CANCELLED"
    }
    assert reasons == {"Inventory reservation failed", "Payment failed"}, reasons


@pytest.mark.parametrize(
    "crash_at",
    [
        # The handler count runs to about 2,000 for this load, the batch count to about 30.
        pytest.param("after-handle:300", id="after-handle"),
        pytest.param("before-emit:6", id="before-emit"),
        pytest.param("before-commit:6", id="before-commit"),
        pytest.param("after-commit:6", id="after-commit"),
    ],
)
def test_worker_killed_at_a_crash_point_loses_nothing(
    crash_at: str, order_store: OrderStore, service_processes: ServiceProcesses
) -> None:
    order_store.stock(INITIAL_STOCK)
    order_store.submit(order_store.mix(0, ORDERS))

    doomed = service_processes.start(
        order_store.path, crash_at=crash_at, lease_seconds=LEASE_SECONDS
    )
    service_processes.wait_for(
        lambda: doomed.poll() is not None or order_store.settled(ORDERS),
        timeout=TIMEOUT,
        what=f"crash at {crash_at}",
    )
    code = doomed.poll()
    assert code is not None, f"the work was done before {crash_at} was reached"
    assert code == -signal.SIGKILL, service_processes.output(doomed)
    # The crash interrupted the run: there is work left for the restarted worker.
    assert not order_store.settled(ORDERS)

    worker = service_processes.start(order_store.path, lease_seconds=LEASE_SECONDS)
    service_processes.wait_for(
        lambda: order_store.settled(ORDERS),
        timeout=TIMEOUT,
        what="drained store after the restart",
        alive=[worker],
    )
    assert service_processes.stop(worker) == 0, service_processes.output(worker)
    assert_outcome_correct(order_store, INITIAL_STOCK)


def test_worker_killed_at_a_random_moment_under_load(
    order_store: OrderStore, service_processes: ServiceProcesses
) -> None:
    seed = int(os.environ.get("SAGALINE_TEST_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    initial_stock = {"PROD-A": 500, "PROD-B": 10}
    order_store.stock(initial_stock)
    order_store.submit(order_store.mix(0, 300))
    submitted = 300

    # Batches of 50 make progress fine-grained, so that the kill can land anywhere in the run.
    worker = service_processes.start(
        order_store.path, lease_seconds=LEASE_SECONDS, options=["--batch-size", "50"]
    )
    threshold = rng.randint(1, 200)

    def orders_keep_coming() -> bool:
        nonlocal submitted
        if submitted < 500:
            order_store.submit(order_store.mix(submitted, 20))
            submitted += 20
        return order_store.ended_sagas() >= threshold

    service_processes.wait_for(
        orders_keep_coming,
        timeout=TIMEOUT,
        what=f"{threshold} ended sagas (seed {seed})",
        alive=[worker],
    )
    worker.kill()
    assert service_processes.wait_exit(worker, TIMEOUT) == -signal.SIGKILL
    assert not order_store.settled(submitted), f"the kill came after the work (seed {seed})"

    # More orders arrive while no worker runs; the restarted one takes the whole backlog.
    order_store.submit(order_store.mix(submitted, 600 - submitted))
    worker = service_processes.start(order_store.path, lease_seconds=LEASE_SECONDS)
    service_processes.wait_for(
        lambda: order_store.settled(600),
        timeout=TIMEOUT,
        what=f"drained store after the restart (seed {seed})",
        alive=[worker],
    )
    assert service_processes.stop(worker) == 0, service_processes.output(worker)
    assert_outcome_correct(order_store, initial_stock)


# The final check of the tests above can fail: each kind of damage below is reported.


@pytest.fixture(scope="module")
def settled_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store on which the order flow ran to the end in this process, without faults."""
    path = tmp_path_factory.mktemp("settled") / "orders.db"
    watcher = OrderStore(path)
    watcher.stock(INITIAL_STOCK)
    watcher.submit(watcher.mix(0, ORDERS))

    async def run() -> None:
        db = SqliteDatabase(f"sqlite:///{path}")
        try:
            await Runtime(db, build_system()).run_until(
                lambda: watcher.settled(ORDERS), timeout=TIMEOUT
            )
        finally:
            await db.close()

    asyncio.run(run())
    watcher.close()
    return path


def _first(conn: sqlite3.Connection, sql: str) -> str:
    row = conn.execute(sql).fetchone()
    assert row is not None, sql
    return str(row[0])


def _confirmed(conn: sqlite3.Connection) -> str:
    return _first(conn, "SELECT saga_id FROM sagas WHERE status = 'COMPLETED' ORDER BY saga_id")


def _cancelled(conn: sqlite3.Connection) -> str:
    return _first(conn, "SELECT saga_id FROM sagas WHERE status = 'COMPENSATED' ORDER BY saga_id")


def _order_of(saga_id: str) -> str:
    return saga_id.partition(":")[2]


def _saga_not_ended(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE sagas SET status = 'RUNNING' WHERE saga_id = ?", (_confirmed(conn),))


def _unit_appears(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE documents SET data = json_set(data, '$.available',"
        " json_extract(data, '$.available') + 1)"
        " WHERE namespace = 'inventory.stock' AND key = 'PROD-A'"
    )


def _confirmed_order_also_cancelled(conn: sqlite3.Connection) -> None:
    order_id = _order_of(_confirmed(conn))
    conn.execute(
        "INSERT INTO events (stream, version, message_id, type, body, correlation_id,"
        " causation_id, timestamp, traceparent, source, part)"
        " SELECT ?, (SELECT MAX(version) + 1 FROM events WHERE stream = ?), 'forged-cancel',"
        " type, json_set(body, '$.orderId', ?), ?, NULL, timestamp, NULL, source, part"
        " FROM events WHERE type = 'OrderCancelledEvent' LIMIT 1",
        (f"Order-{order_id}", f"Order-{order_id}", order_id, order_id),
    )


def _cancelled_order_charged(conn: sqlite3.Connection) -> None:
    order_id = _order_of(_cancelled(conn))
    conn.execute(
        "INSERT INTO events (message_id, type, body, correlation_id, causation_id, timestamp,"
        " traceparent, source, part)"
        " SELECT 'forged-charge', type, json_set(body, '$.orderId', ?), ?, NULL, timestamp,"
        " NULL, source, part FROM events WHERE type = 'PaymentProcessedEvent' LIMIT 1",
        (order_id, order_id),
    )


def _inbox_mark_lost(conn: sqlite3.Connection) -> None:
    conn.execute(
        "DELETE FROM inbox WHERE message_id ="
        " (SELECT message_id FROM commands WHERE type = 'ReserveInventoryCommand' LIMIT 1)"
    )


def _stream_gap(conn: sqlite3.Connection) -> None:
    order_id = _order_of(_confirmed(conn))
    conn.execute(
        "UPDATE events SET version = version + 1 WHERE stream = ? AND version > 1",
        (f"Order-{order_id}",),
    )


def _read_model_drifts(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE documents SET data = json_set(data, '$.customerId', 'CUST-999')"
        " WHERE namespace = 'read.order' AND key = ?",
        (_order_of(_cancelled(conn)),),
    )


def _answer_lost(conn: sqlite3.Connection) -> None:
    conn.execute(
        "DELETE FROM events WHERE causation_id ="
        " (SELECT message_id FROM commands WHERE type = 'ProcessPaymentCommand' LIMIT 1)"
    )


def _created_and_rejected(conn: sqlite3.Connection) -> None:
    # One CreateOrderCommand handled twice: the second handling rejected the order it had created.
    conn.execute(
        "INSERT INTO events (message_id, type, body, correlation_id, causation_id, timestamp,"
        " traceparent, source, part)"
        " SELECT 'second-answer', 'OrderRejectedEvent', json_object('eventType',"
        " 'OrderRejectedEvent', 'orderId', correlation_id, 'customerId',"
        " json_extract(body, '$.customerId'), 'reason', 'order already exists'),"
        " correlation_id, causation_id, timestamp, traceparent, source, part"
        " FROM events WHERE type = 'OrderCreatedEvent' LIMIT 1"
    )


def _command_undelivered(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE commands SET done = 0 WHERE id ="
        " (SELECT id FROM commands WHERE type = 'ReleaseInventoryCommand' LIMIT 1)"
    )


@pytest.mark.parametrize(
    ("damage", "invariant"),
    [
        (_saga_not_ended, "I1"),
        (_unit_appears, "I2"),
        (_confirmed_order_also_cancelled, "I3"),
        (_cancelled_order_charged, "I4"),
        (_inbox_mark_lost, "I5"),
        (_created_and_rejected, "I5"),
        (_stream_gap, "I6"),
        (_read_model_drifts, "I7"),
        (_answer_lost, "I8"),
        (_command_undelivered, "I9"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else str(value),
)
def test_checker_reports_damage(
    settled_store: Path,
    tmp_path: Path,
    damage: Callable[[sqlite3.Connection], None],
    invariant: str,
) -> None:
    copy = tmp_path / "damaged.db"
    with sqlite3.connect(settled_store) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    db = SqliteDatabase(f"sqlite:///{copy}")
    try:
        assert asyncio.run(check_invariants(db, initial_stock=INITIAL_STOCK)) == []
        damage(db.connection)
        violations: list[Violation] = asyncio.run(check_invariants(db, initial_stock=INITIAL_STOCK))
    finally:
        asyncio.run(db.close())
    assert invariant in {v.invariant for v in violations}, format_violations(violations)
    assert all(v.evidence for v in violations), format_violations(violations)
