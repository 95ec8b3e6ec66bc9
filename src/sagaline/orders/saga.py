"""The order saga of the seed, written as a declarative definition.

OrderCreated starts it. Reserve inventory (compensated by ReleaseInventory, also after its own
failure, since a failed reservation may have been partial), then process payment (the pivot);
success publishes OrderConfirmed. InventoryReservationFailed compensates with ReleaseInventory
and CancelOrder; PaymentFailed with ReleaseInventory and CancelOrder.

With a step timeout (the app's ``step_timeout`` setting), a step that gets no answer in time
fails: the order is cancelled with a reason that says so; so is an order whose whole saga takes
longer than its ``deadline`` setting. A payment that goes through after its step timed out is
refunded (RefundPayment, the pivot's compensation for a late success).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any

import msgspec

from sagaline import SagaDefinition, Step, StepKind
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
    PaymentRefundedEvent,
    ProcessPaymentCommand,
    RefundPaymentCommand,
    ReleaseInventoryCommand,
    ReserveInventoryCommand,
)

__all__ = ["ORDER_SAGA", "cancellation_reason", "order_saga"]

_FAILURE_WORDS = {
    "reserve_inventory": "Inventory reservation failed",
    "process_payment": "Payment failed",
}


def _items(data: Mapping[str, Any]) -> list[OrderItem]:
    return msgspec.convert(data["items"], list[OrderItem])


def cancellation_reason(step: str, detail: str | None) -> str:
    """The reason an order is cancelled with when step ``step`` failed for ``detail``
    (``Payment failed: Payment declined: ...``), in either style of running the saga."""
    words = _FAILURE_WORDS.get(step, "Order saga failed")
    return f"{words}: {detail}" if detail else words


def _cancel_reason(data: Mapping[str, Any]) -> str:
    failure = data.get("_failure") or {}
    return cancellation_reason(failure.get("step", ""), failure.get("reason"))


def _reserve(data: Mapping[str, Any]) -> ReserveInventoryCommand:
    return ReserveInventoryCommand(order_id=data["orderId"], items=_items(data))


def _release(data: Mapping[str, Any]) -> ReleaseInventoryCommand:
    return ReleaseInventoryCommand(order_id=data["orderId"], items=_items(data))


def _pay(data: Mapping[str, Any]) -> ProcessPaymentCommand:
    return ProcessPaymentCommand(
        order_id=data["orderId"],
        customer_id=data["customerId"],
        amount=Decimal(data["totalAmount"]),
    )


def _cancel(data: Mapping[str, Any]) -> CancelOrderCommand:
    return CancelOrderCommand(order_id=data["orderId"], reason=_cancel_reason(data))


def _refund(data: Mapping[str, Any]) -> RefundPaymentCommand:
    return RefundPaymentCommand(order_id=data["orderId"])


def _confirmed(data: Mapping[str, Any]) -> OrderConfirmedEvent:
    return OrderConfirmedEvent(order_id=data["orderId"])


ORDER_SAGA = SagaDefinition(
    name="order",
    description="Create an order, reserve its stock, take payment; compensate in reverse.",
    start=OrderCreatedEvent,
    steps=(
        Step(
            name="create_order",
            command=None,
            compensation=_cancel,
            compensated=OrderCancelledEvent,
        ),
        Step(
            name="reserve_inventory",
            command=_reserve,
            success=InventoryReservedEvent,
            failures=(InventoryReservationFailedEvent,),
            compensation=_release,
            compensated=InventoryReleasedEvent,
            compensate_on_failure=True,
        ),
        Step(
            name="process_payment",
            command=_pay,
            success=PaymentProcessedEvent,
            failures=(PaymentFailedEvent,),
            kind=StepKind.PIVOT,
            keep=("transactionId",),
            compensation=_refund,
            compensated=PaymentRefundedEvent,
        ),
    ),
    on_completed=_confirmed,
)


def order_saga(step_timeout: float | None = None, deadline: float | None = None) -> SagaDefinition:
    """The order saga, each step timing out after ``step_timeout`` seconds and the whole saga
    after ``deadline`` seconds, when given."""
    saga = ORDER_SAGA if step_timeout is None else ORDER_SAGA.with_timeouts(step_timeout)
    return saga if deadline is None else replace(saga, deadline=deadline)
