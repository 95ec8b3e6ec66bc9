"""The order read service: a materialized view of orders for queries.

Rows: orderId, customerId, items, totalAmount, status (PENDING / CONFIRMED / CANCELLED), reason,
createdAt, updatedAt. Queries never touch the write side's streams.
"""

from __future__ import annotations

from datetime import datetime

from sagaline import Envelope, Projection, Views, utc_timestamp
from sagaline.orders.messages import OrderCancelledEvent, OrderConfirmedEvent, OrderCreatedEvent

__all__ = ["ORDER_VIEW", "build_order_projection"]

ORDER_VIEW = "read.order"


def _iso(moment: datetime) -> str:
    return utc_timestamp(moment)


def _order_key(event: OrderCreatedEvent | OrderConfirmedEvent | OrderCancelledEvent) -> list[str]:
    return [event.order_id]


def build_order_projection() -> Projection:
    """The projection behind ``sagaline order`` and ``sagaline orders``."""
    projection = Projection("read", ORDER_VIEW)

    @projection.on(OrderCreatedEvent, keys=_order_key)
    async def created(views: Views, event: OrderCreatedEvent, envelope: Envelope) -> None:
        row = await views.get(event.order_id) or {}
        at = _iso(event.timestamp)
        row.update(
            orderId=event.order_id,
            customerId=event.customer_id,
            items=[{"productId": i.product_id, "quantity": i.quantity} for i in event.items],
            totalAmount=event.total_amount,
            createdAt=at,
        )
        # A later status (events of other streams can arrive first) is kept.
        row.setdefault("status", "PENDING")
        row.setdefault("reason", None)
        row.setdefault("updatedAt", at)
        await views.put(event.order_id, row)

    @projection.on(OrderConfirmedEvent, OrderCancelledEvent, keys=_order_key)
    async def ended(
        views: Views, event: OrderConfirmedEvent | OrderCancelledEvent, envelope: Envelope
    ) -> None:
        row = await views.get(event.order_id) or {"orderId": event.order_id}
        if isinstance(event, OrderConfirmedEvent):
            row.update(status="CONFIRMED", reason=None)
        else:
            row.update(status="CANCELLED", reason=event.reason)
        row["updatedAt"] = _iso(event.timestamp)
        await views.put(event.order_id, row)

    return projection
