"""Concurrency: competing worker processes on one store, and orders racing for the last units.

Several ``sagaline run`` processes on one SQLite file share each service's work (command queues
by lease, subscriptions by partition). Whatever the interleaving, each saga runs once, each
command has one effect, and stock is never sold twice.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from decimal import Decimal

from conftest import OrderStore, ServiceProcesses

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import Runtime
from sagaline.orders import build_system
from sagaline.orders.checks import check_invariants
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.orders.read import ORDER_VIEW
from sagaline.testing import format_violations

TIMEOUT = 60.0
#: The saga sends each of these at most once per order; the client sends CreateOrder once.
SAGA_COMMANDS = {
    "CreateOrderCommand",
    "ReserveInventoryCommand",
    "ProcessPaymentCommand",
    "ReleaseInventoryCommand",
    "CancelOrderCommand",
}


def start_sharing(
    store: OrderStore, processes: ServiceProcesses, count: int, options: list[str]
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` workers together; return once every subscriber's partitions are shared.

    Work submitted after this is taken by all of them: each holds partitions of every
    subscription and polls every queue.
    """
    workers = [processes.start(store.path, options=options) for _ in range(count)]

    def shared() -> bool:
        owners = dict(
            store.db.sync.execute(
                "SELECT subscriber, COUNT(DISTINCT lease_owner) FROM subscriptions"
                " WHERE lease_owner IS NOT NULL AND lease_expires > ? GROUP BY subscriber",
                (time.time(),),
            )
        )
        return all(owners.get(name) == count for name in store.subscribers)

    processes.wait_for(
        shared, timeout=TIMEOUT, what=f"partitions shared by {count} workers", alive=workers
    )
    return workers


def run_to_the_end(
    store: OrderStore,
    processes: ServiceProcesses,
    workers: list[subprocess.Popen[bytes]],
    sagas: int,
) -> None:
    """Wait until the store is drained with every worker alive throughout, then stop them."""
    processes.wait_for(
        lambda: store.settled(sagas), timeout=TIMEOUT, what="drained store", alive=workers
    )
    for worker in workers:
        assert processes.stop(worker) == 0, processes.output(worker)


def test_two_processes_run_each_saga_exactly_once(
    order_store: OrderStore, service_processes: ServiceProcesses
) -> None:
    orders = 300
    initial_stock = {"PROD-A": 400, "PROD-B": 10}
    order_store.stock(initial_stock)
    # Small batches, so that both processes keep claiming from every queue.
    workers = start_sharing(order_store, service_processes, 2, ["--batch-size", "16"])
    order_store.submit(order_store.mix(0, orders))
    run_to_the_end(order_store, service_processes, workers, orders)

    violations = asyncio.run(check_invariants(order_store.db, initial_stock=initial_stock))
    assert not violations, format_violations(violations)
    db = order_store.db
    order_ids = {f"ORD-{n:05d}" for n in range(orders)}
    created = Counter(
        order_id
        for (order_id,) in db.sync.execute(
            "SELECT correlation_id FROM events WHERE type = 'OrderCreatedEvent'"
        )
    )
    assert created == Counter(order_ids)
    assert {record.saga_id for record in db.sync.list_sagas()} == {f"order:{o}" for o in order_ids}
    commands = db.sync.execute(
        "SELECT correlation_id, type, outcome, message_id, queue FROM commands"
    )
    per_order = Counter((order_id, type_) for order_id, type_, *_ in commands)
    assert {type_ for _, type_ in per_order} == SAGA_COMMANDS
    assert [key for key, count in per_order.items() if count > 1] == []
    # Handled once: acknowledged, marked in its queue's inbox, and answered by exactly one event
    # (a command handled twice is answered twice: the handlers answer a repeat the same way).
    marks = set(db.sync.execute("SELECT message_id, consumer FROM inbox"))
    answers = Counter(
        causation_id
        for (causation_id,) in db.sync.execute(
            "SELECT causation_id FROM events WHERE causation_id IS NOT NULL"
        )
    )
    assert [
        (order_id, type_, outcome, answers[message_id])
        for order_id, type_, outcome, message_id, queue in commands
        if outcome != "handled" or (message_id, queue) not in marks or answers[message_id] != 1
    ] == []
    assert db.sync.dead_letters() == []


def last_units_orders(count: int) -> list[CreateOrderCommand]:
    """``count`` orders of one unit of PROD-Z each, all within the payment limit."""
    return [
        CreateOrderCommand(
            order_id=f"RACE-{n:03d}",
            customer_id=f"CUST-{n:03d}",
            items=[OrderItem(product_id="PROD-Z", quantity=1)],
            total_amount=Decimal("19.99"),
        )
        for n in range(count)
    ]


def assert_five_sold(store: OrderStore) -> None:
    """Exactly the 5 units were sold: 5 orders confirmed, the other 15 cancelled for stock."""
    violations = asyncio.run(check_invariants(store.db, initial_stock={"PROD-Z": 5}))
    assert not violations, format_violations(violations)
    rows = store.db.sync.query_documents(ORDER_VIEW)
    assert len(rows) == 20
    statuses = Counter(row["status"] for row in rows)
    assert statuses == {"CONFIRMED": 5, "CANCELLED": 15}
    for row in rows:
        if row["status"] == "CANCELLED":
            assert "Insufficient stock for PROD-Z" in row["reason"], row
    stock = store.db.sync.get_document("inventory.stock", "PROD-Z")
    assert stock is not None
    assert {k: stock.data[k] for k in ("available", "reserved", "sold", "stocked")} == {
        "available": 0,
        "reserved": 0,
        "sold": 5,
        "stocked": 5,
    }


def test_twenty_orders_for_the_last_five_units_confirm_exactly_five(
    order_store: OrderStore,
) -> None:
    order_store.stock({"PROD-Z": 5})
    order_store.submit(last_units_orders(20))

    async def run() -> None:
        db = SqliteDatabase(f"sqlite:///{order_store.path}")
        try:
            await Runtime(db, build_system()).run_until(
                lambda: order_store.settled(20), timeout=TIMEOUT
            )
        finally:
            await db.close()

    asyncio.run(run())
    assert_five_sold(order_store)


def test_twenty_orders_for_the_last_five_units_across_two_processes(
    order_store: OrderStore, service_processes: ServiceProcesses
) -> None:
    order_store.stock({"PROD-Z": 5})
    # One delivery per batch: the two processes take the reservations turn by turn.
    workers = start_sharing(order_store, service_processes, 2, ["--batch-size", "1"])
    order_store.submit(last_units_orders(20))
    run_to_the_end(order_store, service_processes, workers, 20)
    assert_five_sold(order_store)
