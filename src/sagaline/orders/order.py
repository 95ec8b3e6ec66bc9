"""The order write service: an event-sourced Order aggregate."""

from __future__ import annotations

import logging
from decimal import Decimal

from sagaline import Aggregate, Context, Envelope, Event, Reads, Service
from sagaline.orders.messages import (
    CancelOrderCommand,
    CreateOrderCommand,
    OrderCancelledEvent,
    OrderConfirmationRecordedEvent,
    OrderConfirmedEvent,
    OrderCreatedEvent,
    OrderItem,
    OrderRejectedEvent,
)

__all__ = [
    "Order",
    "OrderStatus",
    "build_order_service",
    "cancel_order",
    "record_confirmation",
]

log = logging.getLogger("sagaline.orders.order")


class OrderStatus:
    """The states an order goes through on the write side."""

    NEW = "NEW"
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"


class Order(Aggregate):
    """An order, rebuilt from its stream ``Order-<orderId>``."""

    stream_prefix = "Order"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.status = OrderStatus.NEW
        self.customer_id = ""
        self.items: list[OrderItem] = []
        self.total_amount = Decimal(0)
        self.reason: str | None = None

    def apply(self, event: Event) -> None:
        if isinstance(event, OrderCreatedEvent):
            self.status = OrderStatus.PENDING
            self.customer_id = event.customer_id
            self.items = list(event.items)
            self.total_amount = event.total_amount
        elif isinstance(event, OrderConfirmationRecordedEvent):
            self.status = OrderStatus.CONFIRMED
        elif isinstance(event, OrderCancelledEvent):
            self.status = OrderStatus.CANCELLED
            self.reason = event.reason

    def validate(self, command: CreateOrderCommand) -> str | None:
        """Why ``command`` cannot create this order, or None when it can."""
        if self.exists:
            return f"order {command.order_id} already exists"
        if not command.items:
            return "an order needs at least one item"
        for item in command.items:
            if item.quantity <= 0:
                return f"quantity of {item.product_id} must be a positive integer"
        if command.total_amount < 0:
            return "totalAmount must not be negative"
        return None

    def create(self, command: CreateOrderCommand) -> None:
        """Record the order as created."""
        self.record(
            OrderCreatedEvent(
                order_id=command.order_id,
                customer_id=command.customer_id,
                items=list(command.items),
                total_amount=command.total_amount,
            )
        )

    def confirm(self) -> bool:
        """Record the saga's confirmation; False when the order cannot be confirmed."""
        if self.status == OrderStatus.CONFIRMED:
            return True
        if self.status != OrderStatus.PENDING:
            return False
        self.record(OrderConfirmationRecordedEvent(order_id=self.id))
        return True

    def cancel(self, reason: str) -> OrderCancelledEvent | None:
        """Cancel a pending order. A cancelled order answers again with its cancellation."""
        if self.status == OrderStatus.PENDING or self.status == OrderStatus.NEW:
            event = OrderCancelledEvent(order_id=self.id, reason=reason)
            self.record(event)
            return event
        return None


def _order_stream(
    message: CreateOrderCommand | CancelOrderCommand | OrderConfirmedEvent, reads: Reads
) -> None:
    reads.stream(Order.stream_name(message.order_id))


def build_order_service() -> Service:
    """The order write service: CreateOrder, CancelOrder and the saga's confirmation."""
    service = Service("order")

    @service.handles(CreateOrderCommand, reads=_order_stream)
    async def create_order(ctx: Context, command: CreateOrderCommand) -> None:
        order = await ctx.load(Order, command.order_id)
        problem = order.validate(command)
        if problem is not None:
            await _reject(ctx, command, problem)
            return
        order.create(command)
        await ctx.save(order)

    @service.handles(CancelOrderCommand, reads=_order_stream)
    async def cancel(ctx: Context, command: CancelOrderCommand) -> None:
        await cancel_order(ctx, command.order_id, command.reason)

    @service.subscribes(OrderConfirmedEvent, reads=_order_stream)
    async def order_confirmed(ctx: Context, event: OrderConfirmedEvent) -> None:
        await record_confirmation(ctx, event.order_id)

    return service


async def cancel_order(ctx: Context, order_id: str, reason: str) -> None:
    """Cancel the pending order for ``reason`` (OrderCancelled); a cancelled order answers again
    with its cancellation, a confirmed one is left as it is."""
    order = await ctx.load(Order, order_id)
    if order.cancel(reason) is not None:
        await ctx.save(order)
    elif order.status == OrderStatus.CANCELLED:
        # Already cancelled by an earlier intent: answer the same way again.
        ctx.publish(OrderCancelledEvent(order_id=order.id, reason=order.reason or ""))
    else:
        log.error("cannot cancel %s: it is %s", order.id, order.status)


async def record_confirmation(ctx: Context, order_id: str) -> None:
    """Record the transaction's confirmation in the order's stream (once)."""
    order = await ctx.load(Order, order_id)
    if not order.confirm():
        log.error("cannot confirm %s: it is %s", order.id, order.status)
        return
    await ctx.save(order)


async def _reject(ctx: Context, command: CreateOrderCommand, reason: str) -> None:
    """Record the refusal in its own stream, so a duplicate id never touches the live order."""
    stream = f"OrderRejections-{command.order_id}"
    existing = await ctx.tx.read_stream(stream)
    event = OrderRejectedEvent(
        order_id=command.order_id, customer_id=command.customer_id, reason=reason
    )
    await ctx.tx.append(
        stream, len(existing), [Envelope.wrap(event, causation=ctx.envelope, source=ctx.service)]
    )
