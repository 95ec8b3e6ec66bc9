"""The seed's order flow end to end, in process: the happy path, both failures, duplicates."""

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
from sagaline.orders.inventory import RESERVATIONS, STOCK, set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.orders.payment import PAYMENTS
from sagaline.orders.read import ORDER_VIEW
from sagaline.saga import SagaStatus


def seed_order(**changes: Any) -> CreateOrderCommand:
    """ORD-12345 of the seed: two PROD-A and one PROD-B for 75.50."""
    fields: dict[str, Any] = {
        "order_id": "ORD-12345",
        "customer_id": "CUST-987",
        "items": [
            OrderItem(product_id="PROD-A", quantity=2),
            OrderItem(product_id="PROD-B", quantity=1),
        ],
        "total_amount": Decimal("75.50"),
    }
    fields.update(changes)
    return CreateOrderCommand(**fields)


async def drained(db: SqliteDatabase, sagas: int) -> bool:
    """Every saga ended, no command pending, every subscriber caught up with the log."""
    return await is_settled(db, sagas)


async def run_flow(
    path: Path,
    orders: list[CreateOrderCommand],
    *,
    stock: dict[str, int],
    rules: PaymentRules | None = None,
    sagas: int | None = None,
) -> tuple[SqliteDatabase, System]:
    db = SqliteDatabase(f"sqlite:///{path}/s.db")
    system = build_system(rules or PaymentRules())
    async with db.transaction() as tx:
        for product_id, quantity in stock.items():
            await set_stock(tx, product_id, quantity)
    for order in orders:
        await system.submit(db, order)
    expected = len({o.order_id for o in orders}) if sagas is None else sagas
    await Runtime(db, system).run_until(lambda: drained(db, expected), timeout=30)
    return db, system


def stock_of(db: SqliteDatabase, product_id: str) -> dict[str, Any]:
    document = db.sync.get_document(STOCK, product_id)
    assert document is not None
    return document.data


def trace_types(db: SqliteDatabase, order_id: str, kind: str) -> list[str]:
    rows = [r for r in db.sync.trace_rows(order_id) if r["kind"] == kind]
    return [r["type"] for r in sorted(rows, key=lambda r: r["sequence"])]


def assert_history(
    db: SqliteDatabase, events: list[str], sent: list[str], status: SagaStatus
) -> None:
    """The saga's recorded story: the events it took, what it sent, how it ended."""
    saga = db.sync.get_saga("order:ORD-12345")
    assert saga is not None
    assert [entry["event"] for entry in saga.history] == events
    assert [name for entry in saga.history for name in entry.get("sent", [])] == sent
    assert saga.history[-1]["status"] == status
    by_id = {row["messageId"]: row["type"] for row in db.sync.trace_rows("ORD-12345")}
    assert [by_id[entry["messageId"]] for entry in saga.history] == events


def test_happy_path_confirms_the_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, _ = await run_flow(tmp_path, [seed_order()], stock={"PROD-A": 10, "PROD-B": 5})

        view = db.sync.query_documents(ORDER_VIEW, {"orderId": "ORD-12345"})
        assert len(view) == 1
        order = view[0]
        assert order["status"] == "CONFIRMED"
        assert order["customerId"] == "CUST-987"
        assert order["totalAmount"] == Decimal("75.50")
        assert str(order["totalAmount"]) == "75.50"
        assert order["items"] == [
            {"productId": "PROD-A", "quantity": 2},
            {"productId": "PROD-B", "quantity": 1},
        ]

        [saga] = db.sync.list_sagas()
        assert saga.saga_id == "order:ORD-12345"
        assert saga.status == SagaStatus.COMPLETED
        assert saga.data["transactionId"].startswith("TRN-")

        for product_id, stocked, ordered in (("PROD-A", 10, 2), ("PROD-B", 5, 1)):
            stock = stock_of(db, product_id)
            assert (stock["available"], stock["reserved"], stock["sold"]) == (
                stocked - ordered,
                0,
                ordered,
            )
        reservation = db.sync.get_document(RESERVATIONS, "ORD-12345")
        assert reservation is not None and reservation.data["status"] == "SOLD"

        payment = db.sync.get_document(PAYMENTS, "ORD-12345")
        assert payment is not None
        assert payment.data["status"] == "PROCESSED"
        assert payment.data["amount"] == Decimal("75.50")
        transaction_id = payment.data["transactionId"]
        assert transaction_id == saga.data["transactionId"]

        events = trace_types(db, "ORD-12345", "event")
        assert events[:4] == [
            "OrderCreatedEvent",
            "InventoryReservedEvent",
            "PaymentProcessedEvent",
            "OrderConfirmedEvent",
        ]
        assert "OrderCancelledEvent" not in events
        [processed] = [
            r for r in db.sync.trace_rows("ORD-12345") if r["type"] == "PaymentProcessedEvent"
        ]
        assert processed["body"]["transactionId"] == transaction_id
        assert trace_types(db, "ORD-12345", "command") == [
            "CreateOrderCommand",
            "ReserveInventoryCommand",
            "ProcessPaymentCommand",
        ]
        assert not db.sync.dead_letters()
        assert_history(
            db,
            ["OrderCreatedEvent", "InventoryReservedEvent", "PaymentProcessedEvent"],
            ["ReserveInventoryCommand", "ProcessPaymentCommand", "OrderConfirmedEvent"],
            SagaStatus.COMPLETED,
        )

    asyncio.run(scenario())


def test_inventory_failure_cancels_and_reserves_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        # One PROD-A in stock: the order wants two.
        db, _ = await run_flow(tmp_path, [seed_order()], stock={"PROD-A": 1, "PROD-B": 5})

        [order] = db.sync.query_documents(ORDER_VIEW, {"orderId": "ORD-12345"})
        assert order["status"] == "CANCELLED"
        assert "Insufficient stock for PROD-A" in order["reason"]

        [saga] = db.sync.list_sagas()
        assert saga.status == SagaStatus.COMPENSATED

        commands = trace_types(db, "ORD-12345", "command")
        assert commands == [
            "CreateOrderCommand",
            "ReserveInventoryCommand",
            "ReleaseInventoryCommand",
            "CancelOrderCommand",
        ]
        assert trace_types(db, "ORD-12345", "event")[:2] == [
            "OrderCreatedEvent",
            "InventoryReservationFailedEvent",
        ]
        for product_id, stocked in (("PROD-A", 1), ("PROD-B", 5)):
            stock = stock_of(db, product_id)
            assert (stock["available"], stock["reserved"], stock["sold"]) == (stocked, 0, 0)
        assert db.sync.get_document(PAYMENTS, "ORD-12345") is None
        assert not db.sync.dead_letters()
        assert_history(
            db,
            [
                "OrderCreatedEvent",
                "InventoryReservationFailedEvent",
                "InventoryReleasedEvent",
                "OrderCancelledEvent",
            ],
            ["ReserveInventoryCommand", "ReleaseInventoryCommand", "CancelOrderCommand"],
            SagaStatus.COMPENSATED,
        )

    asyncio.run(scenario())


def test_payment_failure_releases_the_reservation_and_cancels(tmp_path: Path) -> None:
    async def scenario() -> None:
        rules = PaymentRules(limits={"CUST-987": Decimal("50.00")})
        db, _ = await run_flow(
            tmp_path, [seed_order()], stock={"PROD-A": 10, "PROD-B": 5}, rules=rules
        )

        [order] = db.sync.query_documents(ORDER_VIEW, {"orderId": "ORD-12345"})
        assert order["status"] == "CANCELLED"
        assert "Payment" in order["reason"]

        [saga] = db.sync.list_sagas()
        assert saga.status == SagaStatus.COMPENSATED
        assert "transactionId" not in saga.data or saga.data["transactionId"] is None

        assert trace_types(db, "ORD-12345", "command") == [
            "CreateOrderCommand",
            "ReserveInventoryCommand",
            "ProcessPaymentCommand",
            "ReleaseInventoryCommand",
            "CancelOrderCommand",
        ]
        events = trace_types(db, "ORD-12345", "event")
        assert events.index("InventoryReservedEvent") < events.index("PaymentFailedEvent")
        assert events.index("PaymentFailedEvent") < events.index("InventoryReleasedEvent")
        assert events.index("InventoryReleasedEvent") < events.index("OrderCancelledEvent")
        assert "OrderConfirmedEvent" not in events

        reservation = db.sync.get_document(RESERVATIONS, "ORD-12345")
        assert reservation is not None and reservation.data["status"] == "RELEASED"
        for product_id, stocked in (("PROD-A", 10), ("PROD-B", 5)):
            stock = stock_of(db, product_id)
            assert (stock["available"], stock["reserved"], stock["sold"]) == (stocked, 0, 0)
        payment = db.sync.get_document(PAYMENTS, "ORD-12345")
        assert payment is not None
        assert payment.data["status"] == "FAILED"
        assert "transactionId" not in payment.data
        assert_history(
            db,
            [
                "OrderCreatedEvent",
                "InventoryReservedEvent",
                "PaymentFailedEvent",
                "InventoryReleasedEvent",
                "OrderCancelledEvent",
            ],
            [
                "ReserveInventoryCommand",
                "ProcessPaymentCommand",
                "ReleaseInventoryCommand",
                "CancelOrderCommand",
            ],
            SagaStatus.COMPENSATED,
        )

    asyncio.run(scenario())


def test_a_duplicate_order_id_is_rejected_and_the_first_order_is_untouched(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        first = seed_order()
        second = seed_order(
            customer_id="CUST-111",
            items=[OrderItem(product_id="PROD-B", quantity=3)],
            total_amount=Decimal("9.99"),
        )
        db, _ = await run_flow(
            tmp_path, [first, second], stock={"PROD-A": 10, "PROD-B": 5}, sagas=1
        )

        [order] = db.sync.query_documents(ORDER_VIEW, {"orderId": "ORD-12345"})
        assert order["status"] == "CONFIRMED"
        assert order["customerId"] == "CUST-987"
        assert order["totalAmount"] == Decimal("75.50")
        assert len(order["items"]) == 2

        [saga] = db.sync.list_sagas()
        assert saga.status == SagaStatus.COMPLETED
        assert saga.data["customerId"] == "CUST-987"

        rows = db.sync.trace_rows("ORD-12345")
        rejected = [r for r in rows if r["type"] == "OrderRejectedEvent"]
        assert len(rejected) == 1
        assert rejected[0]["body"]["customerId"] == "CUST-111"
        assert "already exists" in rejected[0]["body"]["reason"]
        created = [r for r in rows if r["type"] == "OrderCreatedEvent"]
        assert len(created) == 1
        assert created[0]["body"]["customerId"] == "CUST-987"
        # The rejection is recorded apart: the order's own stream holds only its own life.
        assert rejected[0]["stream"] != "Order-ORD-12345"
        assert [e.envelope.message_type for e in db.sync.read_stream("Order-ORD-12345")] == [
            "OrderCreatedEvent",
            "OrderConfirmationRecordedEvent",
        ]
        # Only the first order's goods moved.
        assert stock_of(db, "PROD-B")["sold"] == 1
        assert stock_of(db, "PROD-B")["available"] == 4
        creates = [r for r in rows if r["type"] == "CreateOrderCommand"]
        assert [c["outcome"] for c in creates] == ["handled", "handled"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("stock", "rules"),
    [
        ({"PROD-A": 10, "PROD-B": 5}, None),
        ({"PROD-A": 1, "PROD-B": 5}, None),
        ({"PROD-A": 10, "PROD-B": 5}, PaymentRules(default_limit=Decimal("10"))),
    ],
    ids=["confirmed", "inventory-failed", "payment-failed"],
)
def test_every_message_of_a_saga_is_caused_by_another_in_its_trace(
    tmp_path: Path, stock: dict[str, int], rules: PaymentRules | None
) -> None:
    async def scenario() -> None:
        db, _ = await run_flow(tmp_path, [seed_order()], stock=stock, rules=rules)
        rows = db.sync.trace_rows("ORD-12345")
        ids = {r["messageId"] for r in rows}
        assert len(ids) == len(rows)
        roots = [r for r in rows if r["causationId"] is None]
        assert [r["type"] for r in roots] == ["CreateOrderCommand"]
        assert roots[0]["source"] == "client"
        for row in rows:
            if row is not roots[0]:
                assert row["causationId"] in ids, row
        # Every message was handled by someone (the read model and the services included).
        by_id = {r["messageId"]: r for r in rows}
        for row in rows:
            cause = by_id.get(row["causationId"])
            if cause is not None:
                assert cause["handledBy"], cause
        # Following causes from any message leads back to the submitted command.
        for row in rows:
            seen = 0
            while row["causationId"] is not None:
                row = by_id[row["causationId"]]
                seen += 1
                assert seen <= len(rows)
            assert row is roots[0]

    asyncio.run(scenario())
