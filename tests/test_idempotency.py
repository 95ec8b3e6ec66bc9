"""Exactly-once effects: redelivery is absorbed by the inbox, repeated intents by business keys."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import Runtime, System
from sagaline.messages import Message, new_message_id
from sagaline.orders import PaymentRules, build_system
from sagaline.orders.inventory import RESERVATIONS, STOCK, set_stock
from sagaline.orders.messages import (
    CancelOrderCommand,
    CreateOrderCommand,
    InventoryReleasedEvent,
    InventoryReservedEvent,
    OrderCreatedEvent,
    OrderItem,
    PaymentFailedEvent,
    PaymentProcessedEvent,
    ProcessPaymentCommand,
    ReleaseInventoryCommand,
    ReserveInventoryCommand,
)
from sagaline.orders.payment import PAYMENTS
from sagaline.orders.read import ORDER_VIEW
from sagaline.saga import SagaStatus

SUBSCRIBERS = {"order", "inventory", "orchestrator", "read"}
TERMINAL = {SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value}
MEMBER = "idempotency-test"

EVERY_TYPE = {
    "CreateOrderCommand",
    "ReserveInventoryCommand",
    "ProcessPaymentCommand",
    "ReleaseInventoryCommand",
    "CancelOrderCommand",
    "OrderCreatedEvent",
    "OrderRejectedEvent",
    "InventoryReservedEvent",
    "InventoryReservationFailedEvent",
    "InventoryReleasedEvent",
    "PaymentProcessedEvent",
    "PaymentFailedEvent",
    "OrderConfirmedEvent",
    "OrderConfirmationRecordedEvent",
    "OrderCancelledEvent",
}


def order(order_id: str, customer_id: str, quantity: int, amount: str) -> CreateOrderCommand:
    return CreateOrderCommand(
        order_id=order_id,
        customer_id=customer_id,
        items=[OrderItem(product_id="PROD-A", quantity=quantity)],
        total_amount=Decimal(amount),
    )


def drained(db: SqliteDatabase, subscribers: set[str], sagas: int | None = None) -> bool:
    counts = db.sync.saga_counts()
    lag = db.sync.subscription_lag()
    return (
        (sagas is None or sum(counts.values()) == sagas)
        and set(counts) <= TERMINAL
        and not db.sync.pending_counts()
        and set(lag) >= subscribers
        and not any(lag[name] for name in subscribers)
    )


def snapshot(db: SqliteDatabase) -> dict[str, Any]:
    """Everything a redelivered message could change by mistake."""
    sagas = []
    for record in db.sync.list_sagas():
        full = db.sync.get_saga(record.saga_id)
        assert full is not None
        sagas.append(
            (
                full.saga_id,
                full.definition,
                full.definition_version,
                full.status,
                full.step,
                full.data,
                full.history,
                full.version,
                full.created_at,
            )
        )
    return {
        "documents": db.sync.execute(
            "SELECT namespace, key, data, version FROM documents ORDER BY namespace, key"
        ),
        "sagas": sorted(sagas, key=lambda s: s[0]),
        "events": dict(db.sync.execute("SELECT type, COUNT(*) FROM events GROUP BY type")),
        "head": db.sync.head_position(),
        "inbox": dict(db.sync.execute("SELECT consumer, COUNT(*) FROM inbox GROUP BY consumer")),
        "dead": len(db.sync.dead_letters()),
    }


def test_every_message_delivered_twice_has_no_second_effect(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db")
        system = build_system(PaymentRules(limits={"CUST-POOR": Decimal("5.00")}))
        async with db.transaction() as tx:
            await set_stock(tx, "PROD-A", 10)
        for command in (
            order("ORD-OK", "CUST-1", 2, "20.00"),  # confirmed
            order("ORD-NOSTOCK", "CUST-1", 50, "500.00"),  # inventory fails
            order("ORD-DECLINED", "CUST-POOR", 1, "10.00"),  # payment fails
            order("ORD-OK", "CUST-2", 1, "1.00"),  # duplicate id: rejected
        ):
            await system.submit(db, command)
        await Runtime(db, system, member=MEMBER).run_until(
            lambda: drained(db, SUBSCRIBERS, 3), timeout=30
        )
        seen_types = {row[0] for row in db.sync.execute("SELECT type FROM events")}
        seen_types |= {row[0] for row in db.sync.execute("SELECT type FROM commands")}
        assert seen_types == EVERY_TYPE
        assert db.sync.saga_counts() == {"COMPLETED": 1, "COMPENSATED": 2}
        before = snapshot(db)
        commands = db.sync.execute("SELECT COUNT(*) FROM commands")[0][0]
        log_events = before["head"]

        # Deliver everything again: every command back in its queue, every cursor at 0.
        async with db.transaction():
            db.sync.execute("UPDATE commands SET done = 0, outcome = NULL, attempts = 0")
            for (name,) in db.sync.execute("SELECT DISTINCT subscriber FROM subscriptions"):
                db.reset_subscription(name, 0)
        assert sum(db.sync.pending_counts().values()) == commands
        assert all(lag == log_events for lag in db.sync.subscription_lag().values())

        runtime = Runtime(db, system, member=MEMBER)
        await runtime.run_until(lambda: drained(db, SUBSCRIBERS, 3), timeout=30)
        # It was really delivered again: every command, and every event to its subscribers.
        assert runtime.handled >= commands + log_events
        assert snapshot(db) == before
        assert db.sync.execute("SELECT DISTINCT outcome, attempts FROM commands") == [
            ("handled", 1)
        ]

    asyncio.run(scenario())


def history_of(db: SqliteDatabase, saga_id: str) -> list[dict[str, Any]]:
    record = db.sync.get_saga(saga_id)
    assert record is not None
    return record.history


def test_late_and_repeated_answers_do_not_move_an_ended_saga(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db")
        system = build_system(PaymentRules(limits={"CUST-POOR": Decimal("5.00")}))
        async with db.transaction() as tx:
            await set_stock(tx, "PROD-A", 10)
        await system.submit(db, order("ORD-OK", "CUST-1", 2, "20.00"))
        await system.submit(db, order("ORD-DECLINED", "CUST-POOR", 1, "10.00"))
        runtime = Runtime(db, system, member=MEMBER)
        await runtime.run_until(lambda: drained(db, SUBSCRIBERS, 2), timeout=30)
        sagas = {r.saga_id: (r.status, r.step, r.data) for r in db.sync.list_sagas()}
        history = {r.saga_id: len(history_of(db, r.saga_id)) for r in db.sync.list_sagas()}
        commands = db.sync.execute("SELECT COUNT(*) FROM commands")[0][0]
        state = db.sync.execute(
            "SELECT namespace, key, data, version FROM documents"
            " WHERE namespace IN ('inventory.stock', 'inventory.reservation', 'payment.payment')"
        )
        statuses = {row["orderId"]: row["status"] for row in db.sync.query_documents(ORDER_VIEW)}
        assert statuses == {"ORD-OK": "CONFIRMED", "ORD-DECLINED": "CANCELLED"}

        # The same answers again as new messages (fresh ids): a retried send, a late reply.
        repeats: list[Message] = [
            OrderCreatedEvent(
                order_id="ORD-OK",
                customer_id="CUST-1",
                items=items(2),
                total_amount=Decimal("20.00"),
            ),
            InventoryReservedEvent(order_id="ORD-OK"),
            PaymentProcessedEvent(order_id="ORD-OK", transaction_id="TRN-LATE"),
            InventoryReservedEvent(order_id="ORD-DECLINED"),
            PaymentFailedEvent(order_id="ORD-DECLINED", reason="declined again"),
            InventoryReleasedEvent(order_id="ORD-DECLINED"),
        ]
        for repeat in repeats:
            await send(system, db, repeat)
        await Runtime(db, system, member=MEMBER).run_until(
            lambda: drained(db, SUBSCRIBERS, 2), timeout=30
        )
        assert {r.saga_id: (r.status, r.step, r.data) for r in db.sync.list_sagas()} == sagas
        for saga_id, known in history.items():
            for entry in history_of(db, saga_id)[known:]:
                assert entry["transition"].startswith("ignored"), entry
                assert "sent" not in entry
        assert db.sync.execute("SELECT COUNT(*) FROM commands")[0][0] == commands
        assert (
            db.sync.execute(
                "SELECT namespace, key, data, version FROM documents"
                " WHERE namespace IN ('inventory.stock', 'inventory.reservation',"
                " 'payment.payment')"
            )
            == state
        )
        assert {row["orderId"]: row["status"] for row in db.sync.query_documents(ORDER_VIEW)} == (
            statuses
        )

    asyncio.run(scenario())


# ------------------------------------------------------- one intent, distinct messages


async def send(system: System, db: SqliteDatabase, message: Message) -> str:
    """Submit ``message`` as a client if clients may, else as the service that sends it (the
    orchestrator sends the saga's commands); its message id."""
    if system.accepts_from_clients(message.type_name()):
        return (await system.submit(db, message)).message_id
    source = EMITTERS.get(message.type_name(), "orchestrator")
    [envelope] = await system.submit_internal(db, [message], source=source)
    return envelope.message_id


#: The service that publishes each event the tests send again.
EMITTERS = {
    "OrderCreatedEvent": "order",
    "InventoryReservedEvent": "inventory",
    "InventoryReleasedEvent": "inventory",
    "PaymentProcessedEvent": "payment",
    "PaymentFailedEvent": "payment",
}


async def run_service(
    tmp_path: Path,
    service: str,
    messages: list[Message],
    *,
    stock: int = 10,
    subscribers: set[str] | None = None,
) -> tuple[SqliteDatabase, System, list[str]]:
    """Submit ``messages`` (each with its own message id) and run one service until idle."""
    db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db")
    system = build_system(PaymentRules())
    async with db.transaction() as tx:
        await set_stock(tx, "PROD-A", stock)
    ids = [await send(system, db, message) for message in messages]
    assert len(set(ids)) == len(ids)
    wanted = subscribers if subscribers is not None else {service}
    await Runtime(db, system, services=[service]).run_until(lambda: drained(db, wanted), timeout=30)
    return db, system, ids


def answers(db: SqliteDatabase, order_id: str, event_type: str) -> list[dict[str, Any]]:
    return [
        row
        for row in sorted(db.sync.trace_rows(order_id), key=lambda r: r["sequence"])
        if row["type"] == event_type
    ]


def stock(db: SqliteDatabase) -> tuple[int, int, int]:
    document = db.sync.get_document(STOCK, "PROD-A")
    assert document is not None
    data = document.data
    assert data["available"] + data["reserved"] + data["sold"] == data["stocked"]
    return data["available"], data["reserved"], data["sold"]


def items(quantity: int) -> list[OrderItem]:
    return [OrderItem(product_id="PROD-A", quantity=quantity)]


def test_reserve_inventory_twice_reserves_once_and_answers_twice(tmp_path: Path) -> None:
    async def scenario() -> None:
        reserve = ReserveInventoryCommand(order_id="ORD-7", items=items(3))
        db, _, ids = await run_service(tmp_path, "inventory", [reserve, reserve])
        assert stock(db) == (7, 3, 0)
        reservation = db.sync.get_document(RESERVATIONS, "ORD-7")
        assert reservation is not None
        assert (reservation.data["status"], reservation.version) == ("RESERVED", 1)
        replies = answers(db, "ORD-7", "InventoryReservedEvent")
        assert [r["causationId"] for r in replies] == ids
        assert not answers(db, "ORD-7", "InventoryReservationFailedEvent")

    asyncio.run(scenario())


def test_release_with_nothing_reserved_answers_and_bars_a_later_reservation(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        release = ReleaseInventoryCommand(order_id="ORD-8", items=items(3))
        reserve = ReserveInventoryCommand(order_id="ORD-8", items=items(3))
        db, _, ids = await run_service(tmp_path, "inventory", [release, reserve])
        assert stock(db) == (10, 0, 0)
        [released] = answers(db, "ORD-8", "InventoryReleasedEvent")
        assert released["causationId"] == ids[0]
        [refused] = answers(db, "ORD-8", "InventoryReservationFailedEvent")
        assert refused["causationId"] == ids[1]
        assert "released" in refused["body"]["reason"]
        assert not answers(db, "ORD-8", "InventoryReservedEvent")

    asyncio.run(scenario())


def test_release_twice_gives_the_stock_back_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        reserve = ReserveInventoryCommand(order_id="ORD-9", items=items(4))
        release = ReleaseInventoryCommand(order_id="ORD-9", items=items(4))
        db, _, ids = await run_service(tmp_path, "inventory", [reserve, release, release])
        assert stock(db) == (10, 0, 0)
        replies = answers(db, "ORD-9", "InventoryReleasedEvent")
        assert [r["causationId"] for r in replies] == ids[1:]

    asyncio.run(scenario())


def test_process_payment_twice_charges_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        pay = ProcessPaymentCommand(order_id="ORD-10", customer_id="CUST-1", amount=Decimal("7.25"))
        db, _, ids = await run_service(tmp_path, "payment", [pay, pay], subscribers=set())
        payments = db.sync.query_documents(PAYMENTS)
        assert len(payments) == 1
        assert payments[0]["amount"] == Decimal("7.25")
        replies = answers(db, "ORD-10", "PaymentProcessedEvent")
        assert [r["causationId"] for r in replies] == ids
        transaction_ids = {r["body"]["transactionId"] for r in replies}
        assert transaction_ids == {payments[0]["transactionId"]}

    asyncio.run(scenario())


def test_cancel_order_twice_answers_twice_and_cancels_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        create = CreateOrderCommand(
            order_id="ORD-11", customer_id="CUST-1", items=items(1), total_amount=Decimal("3")
        )
        first = CancelOrderCommand(order_id="ORD-11", reason="customer changed their mind")
        second = CancelOrderCommand(order_id="ORD-11", reason="asked again")
        db, _, ids = await run_service(tmp_path, "order", [create, first, second])
        replies = answers(db, "ORD-11", "OrderCancelledEvent")
        assert [r["causationId"] for r in replies] == ids[1:]
        # Both answers say the same thing: the order was cancelled for the first reason.
        assert {r["body"]["reason"] for r in replies} == {"customer changed their mind"}
        stream = [e.envelope.message_type for e in db.sync.read_stream("Order-ORD-11")]
        assert stream == ["OrderCreatedEvent", "OrderCancelledEvent"]

    asyncio.run(scenario())


def test_a_submit_repeated_with_the_same_message_id_is_absorbed(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db")
        system = build_system()
        command = order("ORD-12", "CUST-1", 1, "1.00")
        message_id = new_message_id()
        await system.submit(db, command, message_id=message_id)
        # A client retrying after a timeout whose outcome it does not know.
        await system.submit(db, command, message_id=message_id)
        assert db.sync.execute("SELECT message_id FROM commands") == [(message_id,)]

    asyncio.run(scenario())
