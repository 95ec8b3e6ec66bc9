"""The order read model: it converges to a rebuild from the log, and it answers queries."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import Runtime, System
from sagaline.orders import PaymentRules, build_system
from sagaline.orders.demo import is_settled
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.orders.read import ORDER_VIEW, build_order_projection
from sagaline.projection import rebuild

MEMBER = "projection-test"
STOCK = {"PROD-A": 1000, "PROD-B": 1000}
RULES = PaymentRules(limits={"CUST-4": Decimal("1.00")})


def plan(first: int, count: int) -> list[tuple[CreateOrderCommand, str]]:
    """Orders with the status each must end in: most confirm, some fail either step."""
    orders = []
    for n in range(first, first + count):
        customer = f"CUST-{n % 5}"
        short_of_stock = n % 7 == 3
        quantity = 5000 if short_of_stock else 1 + n % 3
        command = CreateOrderCommand(
            order_id=f"ORD-{n:03d}",
            customer_id=customer,
            items=[
                OrderItem(product_id="PROD-A", quantity=quantity),
                OrderItem(product_id="PROD-B", quantity=1),
            ],
            total_amount=Decimal(f"{10 + n}.{n % 100:02d}"),
        )
        declined = customer == "CUST-4"
        orders.append((command, "CANCELLED" if short_of_stock or declined else "CONFIRMED"))
    return orders


async def drained(db: SqliteDatabase, sagas: int) -> bool:
    """Every saga ended, no command pending, every subscriber caught up with the log."""
    return await is_settled(db, sagas)


async def run(db: SqliteDatabase, system: System, orders: list[Any], sagas: int) -> None:
    await system.submit_many(db, orders)
    await Runtime(db, system, member=MEMBER).run_until(lambda: drained(db, sagas), timeout=30)


async def thirty_orders(path: Path) -> tuple[SqliteDatabase, System, dict[str, str]]:
    db = SqliteDatabase(f"sqlite:///{path}/s.db")
    system = build_system(RULES)
    async with db.transaction() as tx:
        for product_id, quantity in STOCK.items():
            await set_stock(tx, product_id, quantity)
    orders = plan(0, 30)
    # Two duplicates of existing ids: rejected, they must not show in the view.
    duplicates = [
        CreateOrderCommand(
            order_id=orders[n][0].order_id,
            customer_id="CUST-9",
            items=[OrderItem(product_id="PROD-B", quantity=1)],
            total_amount=Decimal("1.00"),
        )
        for n in (0, 1)
    ]
    await run(db, system, [c for c, _ in orders] + duplicates, 30)
    return db, system, {c.order_id: status for c, status in orders}


def view(db: SqliteDatabase, namespace: str = ORDER_VIEW) -> list[dict[str, Any]]:
    return db.sync.query_documents(namespace)


def test_the_read_model_equals_a_fresh_rebuild(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, _, expected = await thirty_orders(tmp_path)
        live = view(db)
        assert {row["orderId"]: row["status"] for row in live} == expected
        assert set(expected.values()) == {"CONFIRMED", "CANCELLED"}
        assert all(row["customerId"] != "CUST-9" for row in live)

        reported: list[tuple[int, int]] = []
        shadow = await rebuild(
            db,
            build_order_projection(),
            swap=False,
            page=7,
            progress=lambda done, total: reported.append((done, total)),
        )
        assert shadow != ORDER_VIEW
        assert view(db, shadow) == live
        assert view(db) == live  # the live view was left alone
        done = [d for d, _ in reported]
        assert done == sorted(done) and done[-1] == db.sync.head_position()
        assert len(reported) > 1

    asyncio.run(scenario())


def test_a_swapped_rebuild_keeps_the_view_and_later_events_still_apply(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, system, expected = await thirty_orders(tmp_path)
        before = view(db)

        namespace = await rebuild(db, build_order_projection(), swap=True, page=10)
        assert namespace == ORDER_VIEW
        assert view(db) == before
        assert view(db, f"{ORDER_VIEW}.rebuild") == []
        assert db.sync.subscription_lag()["read"] == 0

        more = plan(30, 6)
        await run(db, system, [c for c, _ in more], 36)
        expected |= {c.order_id: status for c, status in more}
        after = view(db)
        assert {row["orderId"]: row["status"] for row in after} == expected
        assert [row for row in after if row["orderId"] < "ORD-030"] == before
        shadow = await rebuild(db, build_order_projection(), swap=False)
        assert view(db, shadow) == after

    asyncio.run(scenario())


def test_the_view_answers_queries_by_status_and_by_customer(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, _, expected = await thirty_orders(tmp_path)
        for status in ("CONFIRMED", "CANCELLED"):
            rows = db.sync.query_documents(ORDER_VIEW, {"status": status})
            wanted = sorted(o for o, s in expected.items() if s == status)
            assert [row["orderId"] for row in rows] == wanted
            assert all(row["status"] == status for row in rows)
        assert db.sync.query_documents(ORDER_VIEW, {"status": "PENDING"}) == []

        rows = db.sync.query_documents(ORDER_VIEW, {"customerId": "CUST-2"})
        assert [row["orderId"] for row in rows] == [f"ORD-{n:03d}" for n in range(2, 30, 5)]
        rows = db.sync.query_documents(ORDER_VIEW, {"customerId": "CUST-4", "status": "CONFIRMED"})
        assert rows == []
        assert db.sync.query_documents(ORDER_VIEW, {"customerId": "CUST-404"}) == []

        [row] = db.sync.query_documents(ORDER_VIEW, {"orderId": "ORD-003"})
        assert row["status"] == "CANCELLED"
        assert "Insufficient stock for PROD-A" in row["reason"]
        [row] = db.sync.query_documents(ORDER_VIEW, {"orderId": "ORD-004"})
        assert row["status"] == "CANCELLED" and "declined" in row["reason"]
        [row] = db.sync.query_documents(ORDER_VIEW, {"orderId": "ORD-001"})
        assert row["status"] == "CONFIRMED" and row["reason"] is None
        assert row["totalAmount"] == Decimal("11.01")
        assert row["items"] == [
            {"productId": "PROD-A", "quantity": 2},
            {"productId": "PROD-B", "quantity": 1},
        ]

        # Filter names are checked, values are parameters: no way to inject SQL.
        with pytest.raises(ValueError):
            db.sync.query_documents(ORDER_VIEW, {"status') OR 1=1 --": "x"})
        assert db.sync.query_documents(ORDER_VIEW, {"status": "x' OR '1'='1"}) == []

    asyncio.run(scenario())
