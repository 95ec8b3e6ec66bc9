"""The order saga of the seed, written as a declarative definition.

OrderCreated starts it. Reserve inventory (compensated by ReleaseInventory, also after its own
failure, since a failed reservation may have been partial), then process payment (the pivot);
success publishes OrderConfirmed. InventoryReservationFailed compensates with ReleaseInventory
and CancelOrder; PaymentFailed with ReleaseInventory and CancelOrder.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import msgspec

from sagaline.orders.messages import (
    CancelOrderCommand,
    InventoryReleasedEvent,
    InventoryReservationFailedEvent,
    InventoryReservedEvent,
    OrderCancelledEvent,
    OrderConfirmedEvent,
    OrderCreatedEvent,
    OrderItem,
    PaymentFailedEvent,
    PaymentProcessedEvent,
    ProcessPaymentCommand,
    ReleaseInventoryCommand,
    ReserveInventoryCommand,
)
from sagaline.saga.definition import SagaDefinition, Step, StepKind

__all__ = ["ORDER_SAGA"]

_FAILURE_WORDS = {
    "reserve_inventory": "Inventory reservation failed",
    "process_payment": "Payment failed",
}


def _items(data: Mapping[str, Any]) -> list[OrderItem]:
    return msgspec.convert(data["items"], list[OrderItem])


def _cancel_reason(data: Mapping[str, Any]) -> str:
    failure = data.get("_failure") or {}
    words = _FAILURE_WORDS.get(failure.get("step", ""), "Order saga failed")
    detail = failure.get("reason")
    return f"{words}: {detail}" if detail else words


ORDER_SAGA = SagaDefinition(
    name="order",
    description="Create an order, reserve its stock, take payment; compensate in reverse.",
    start=OrderCreatedEvent,
    steps=(
        Step(
            name="create_order",
            command=None,
            compensation=lambda d: CancelOrderCommand(
                order_id=d["orderId"], reason=_cancel_reason(d)
            ),
            compensated=OrderCancelledEvent,
        ),
        Step(
            name="reserve_inventory",
            command=lambda d: ReserveInventoryCommand(order_id=d["orderId"], items=_items(d)),
            success=InventoryReservedEvent,
            failures=(InventoryReservationFailedEvent,),
            compensation=lambda d: ReleaseInventoryCommand(order_id=d["orderId"], items=_items(d)),
            compensated=InventoryReleasedEvent,
            compensate_on_failure=True,
        ),
        Step(
            name="process_payment",
            command=lambda d: ProcessPaymentCommand(
                order_id=d["orderId"], customer_id=d["customerId"], amount=Decimal(d["totalAmount"])
            ),
            success=PaymentProcessedEvent,
            failures=(PaymentFailedEvent,),
            kind=StepKind.PIVOT,
            keep=("transactionId",),
        ),
    ),
    on_completed=lambda d: OrderConfirmedEvent(order_id=d["orderId"]),
)
