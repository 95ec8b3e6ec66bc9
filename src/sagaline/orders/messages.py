"""The order flow's commands and events, with bodies exactly as the seed writes them.

The seed names CreateOrder, ReserveInventory, ProcessPayment, CancelOrder and ReleaseInventory
commands and the OrderCreated, InventoryReserved, InventoryReservationFailed, PaymentProcessed and
OrderConfirmed events. The flow also needs the answers the seed leaves implicit: PaymentFailed,
InventoryReleased, OrderCancelled, OrderRejected (a CreateOrder that was refused) and
OrderConfirmationRecorded (the Order aggregate's own record of the saga's confirmation).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, ClassVar

import msgspec

from sagaline import Command, Event, check_money, utc_now

__all__ = [
    "MESSAGES",
    "CancelOrderCommand",
    "CreateOrderCommand",
    "Id",
    "InventoryReleasedEvent",
    "InventoryReservationFailedEvent",
    "InventoryReservedEvent",
    "OrderCancelledEvent",
    "OrderConfirmationRecordedEvent",
    "OrderConfirmedEvent",
    "OrderCreatedEvent",
    "OrderItem",
    "OrderRejectedEvent",
    "PaymentFailedEvent",
    "PaymentProcessedEvent",
    "PaymentRefundedEvent",
    "ProcessPaymentCommand",
    "RefundPaymentCommand",
    "ReleaseInventoryCommand",
    "ReserveInventoryCommand",
]

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")]
Reason = Annotated[str, msgspec.Meta(max_length=1000)]
Quantity = Annotated[int, msgspec.Meta(gt=0, le=1_000_000)]


class OrderItem(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """One line of an order."""

    product_id: Id
    quantity: Quantity


Items = Annotated[list[OrderItem], msgspec.Meta(min_length=1, max_length=1000)]


# ----------------------------------------------------------------- commands


class CreateOrderCommand(Command, kw_only=True, frozen=True):
    """A customer places an order (handled by the order write service)."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    customer_id: Id
    items: Items
    total_amount: Decimal

    def __post_init__(self) -> None:
        check_money("totalAmount", self.total_amount)
        if not self.total_amount:
            raise ValueError("totalAmount must be greater than zero: an order costs something")


class ReserveInventoryCommand(Command, kw_only=True, frozen=True):
    """Reserve every item of an order, all or nothing (inventory)."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    items: Items


class ProcessPaymentCommand(Command, kw_only=True, frozen=True):
    """Charge the customer for the order (payment)."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    customer_id: Id
    amount: Decimal

    def __post_init__(self) -> None:
        check_money("amount", self.amount)


class CancelOrderCommand(Command, kw_only=True, frozen=True):
    """Mark the order cancelled (order write); a compensation."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    reason: Reason


class ReleaseInventoryCommand(Command, kw_only=True, frozen=True):
    """Undo the order's reservation, if any (inventory); a compensation."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    items: Items


class RefundPaymentCommand(Command, kw_only=True, frozen=True):
    """Give back what the order was charged, if anything (payment); the compensation of a
    payment that succeeded after the saga had given up on it."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id


# ------------------------------------------------------------------- events


class OrderCreatedEvent(Event, kw_only=True, frozen=True):
    """The order was accepted: the saga starts here."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    customer_id: Id
    items: Items
    total_amount: Decimal
    timestamp: datetime = msgspec.field(default_factory=utc_now)

    def __post_init__(self) -> None:
        check_money("totalAmount", self.total_amount)


class OrderRejectedEvent(Event, kw_only=True, frozen=True):
    """A CreateOrderCommand was refused; no saga starts."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    customer_id: Id
    reason: Reason
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class InventoryReservedEvent(Event, kw_only=True, frozen=True):
    """Every item of the order is reserved."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class InventoryReservationFailedEvent(Event, kw_only=True, frozen=True):
    """The order could not be reserved; nothing was."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    reason: Reason
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class InventoryReleasedEvent(Event, kw_only=True, frozen=True):
    """The order's reservation is undone (or there was none)."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class PaymentProcessedEvent(Event, kw_only=True, frozen=True):
    """The customer was charged."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    transaction_id: Id
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class PaymentFailedEvent(Event, kw_only=True, frozen=True):
    """The payment was declined; nothing was charged."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    reason: Reason
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class PaymentRefundedEvent(Event, kw_only=True, frozen=True):
    """What the order was charged is given back (or nothing had been charged)."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class OrderConfirmedEvent(Event, kw_only=True, frozen=True):
    """The saga completed: the order is confirmed."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class OrderConfirmationRecordedEvent(Event, kw_only=True, frozen=True):
    """The Order aggregate recorded the saga's confirmation in its own stream."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    timestamp: datetime = msgspec.field(default_factory=utc_now)


class OrderCancelledEvent(Event, kw_only=True, frozen=True):
    """The order is cancelled, with the reason."""

    correlation: ClassVar[str] = "order_id"

    order_id: Id
    reason: Reason
    timestamp: datetime = msgspec.field(default_factory=utc_now)


#: Every message type of the order system.
MESSAGES: tuple[type[Command] | type[Event], ...] = (
    CreateOrderCommand,
    ReserveInventoryCommand,
    ProcessPaymentCommand,
    CancelOrderCommand,
    ReleaseInventoryCommand,
    RefundPaymentCommand,
    OrderCreatedEvent,
    OrderRejectedEvent,
    InventoryReservedEvent,
    InventoryReservationFailedEvent,
    InventoryReleasedEvent,
    PaymentProcessedEvent,
    PaymentFailedEvent,
    PaymentRefundedEvent,
    OrderConfirmedEvent,
    OrderConfirmationRecordedEvent,
    OrderCancelledEvent,
)
