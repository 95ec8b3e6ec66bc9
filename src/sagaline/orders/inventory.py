"""The inventory service: stock per product and all-or-nothing reservations per order.

Stock per product is ``available + reserved + sold == stocked`` at every commit. A reservation is
keyed by order, so a repeated ReserveInventory reserves once and answers the same way; a release
with nothing reserved is a no-op that still answers, and it bars a later reservation of that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from sagaline import Context, Reads, Service, StoreTransaction
from sagaline.orders.messages import (
    InventoryReleasedEvent,
    InventoryReservationFailedEvent,
    InventoryReservedEvent,
    OrderConfirmedEvent,
    OrderItem,
    ReleaseInventoryCommand,
    ReserveInventoryCommand,
)

__all__ = [
    "RESERVATIONS",
    "STOCK",
    "build_inventory_service",
    "release_order",
    "reserve_order",
    "sell_order",
    "set_stock",
    "stock_violations",
]

STOCK = "inventory.stock"
RESERVATIONS = "inventory.reservation"


def _wanted(items: list[OrderItem]) -> dict[str, int]:
    wanted: dict[str, int] = {}
    for item in items:
        wanted[item.product_id] = wanted.get(item.product_id, 0) + item.quantity
    return wanted


async def set_stock(tx: StoreTransaction, product_id: str, quantity: int) -> dict[str, Any]:
    """Set the available quantity of a product, keeping its ledger balanced."""
    if quantity < 0:
        raise ValueError("quantity must not be negative")
    current = await tx.get_document(STOCK, product_id)
    stock: dict[str, Any]
    if current is None:
        stock = {"productId": product_id, "available": 0, "reserved": 0, "sold": 0, "stocked": 0}
        version = 0
    else:
        stock, version = dict(current.data), current.version
    stock["stocked"] += quantity - stock["available"]
    stock["available"] = quantity
    await tx.put_document(STOCK, product_id, stock, version)
    return stock


def _reservation(message: OrderConfirmedEvent, reads: Reads) -> None:
    reads.document(RESERVATIONS, message.order_id)


def _reservation_and_stock(
    command: ReserveInventoryCommand | ReleaseInventoryCommand, reads: Reads
) -> None:
    reads.document(RESERVATIONS, command.order_id)
    for item in command.items:
        reads.document(STOCK, item.product_id)


def build_inventory_service() -> Service:
    """Reserve, release, and turn a confirmed order's reservation into a sale."""
    service = Service("inventory")

    @service.handles(ReserveInventoryCommand, reads=_reservation_and_stock)
    async def reserve(ctx: Context, command: ReserveInventoryCommand) -> None:
        await reserve_order(ctx, command.order_id, command.items)

    @service.handles(ReleaseInventoryCommand, reads=_reservation_and_stock)
    async def release(ctx: Context, command: ReleaseInventoryCommand) -> None:
        await release_order(ctx, command.order_id)

    @service.subscribes(OrderConfirmedEvent, reads=_reservation)
    async def order_confirmed(ctx: Context, event: OrderConfirmedEvent) -> None:
        await sell_order(ctx, event.order_id)

    return service


async def reserve_order(ctx: Context, order_id: str, items: list[OrderItem]) -> None:
    """Reserve every item of the order, or none, and answer InventoryReserved or
    InventoryReservationFailed; an order reserved (or refused, or released) before is answered
    the same way again."""
    tx = ctx.tx
    existing = await tx.get_document(RESERVATIONS, order_id)
    if existing is not None:
        _answer_again(ctx, order_id, existing.data)
        return
    wanted = _wanted(items)
    stocks = {}
    for product_id in sorted(wanted):
        stocks[product_id] = await tx.get_document(STOCK, product_id)
    problem = None
    for product_id, quantity in wanted.items():
        stock = stocks[product_id]
        if stock is None or stock.data["available"] < quantity:
            problem = f"Insufficient stock for {product_id}"
            break
    reservation: dict[str, Any] = {
        "orderId": order_id,
        "items": [{"productId": p, "quantity": q} for p, q in wanted.items()],
    }
    if problem is not None:
        reservation.update(status="FAILED", reason=problem)
        await tx.put_document(RESERVATIONS, order_id, reservation, 0)
        ctx.publish(InventoryReservationFailedEvent(order_id=order_id, reason=problem))
        return
    for product_id, quantity in wanted.items():
        stock = stocks[product_id]
        assert stock is not None
        data = dict(stock.data)
        data["available"] -= quantity
        data["reserved"] += quantity
        await tx.put_document(STOCK, product_id, data, stock.version)
    reservation["status"] = "RESERVED"
    await tx.put_document(RESERVATIONS, order_id, reservation, 0)
    ctx.publish(InventoryReservedEvent(order_id=order_id))


async def release_order(ctx: Context, order_id: str) -> None:
    """Put the order's reserved units back on the shelf and answer InventoryReleased; with
    nothing reserved, remember the release so that a late reservation is refused."""
    tx = ctx.tx
    existing = await tx.get_document(RESERVATIONS, order_id)
    if existing is None:
        await tx.put_document(
            RESERVATIONS, order_id, {"orderId": order_id, "items": [], "status": "RELEASED"}, 0
        )
    elif existing.data["status"] == "RESERVED":
        await _move(tx, existing.data["items"], "reserved", "available")
        released = dict(existing.data, status="RELEASED")
        await tx.put_document(RESERVATIONS, order_id, released, existing.version)
    elif existing.data["status"] == "FAILED":
        failed = dict(existing.data, status="RELEASED")
        await tx.put_document(RESERVATIONS, order_id, failed, existing.version)
    ctx.publish(InventoryReleasedEvent(order_id=order_id))


async def sell_order(ctx: Context, order_id: str) -> None:
    """Turn the confirmed order's reserved units into sold ones (once; nothing if not reserved)."""
    tx = ctx.tx
    existing = await tx.get_document(RESERVATIONS, order_id)
    if existing is None or existing.data["status"] != "RESERVED":
        return
    await _move(tx, existing.data["items"], "reserved", "sold")
    sold = dict(existing.data, status="SOLD")
    await tx.put_document(RESERVATIONS, order_id, sold, existing.version)


def _answer_again(ctx: Context, order_id: str, reservation: dict[str, Any]) -> None:
    status = reservation["status"]
    if status in ("RESERVED", "SOLD"):
        ctx.publish(InventoryReservedEvent(order_id=order_id))
    elif status == "FAILED":
        ctx.publish(
            InventoryReservationFailedEvent(order_id=order_id, reason=reservation["reason"])
        )
    else:
        ctx.publish(
            InventoryReservationFailedEvent(
                order_id=order_id, reason=f"the reservation of {order_id} was already released"
            )
        )


async def _move(
    tx: StoreTransaction, items: list[dict[str, Any]], source: str, target: str
) -> None:
    for item in sorted(items, key=lambda i: str(i["productId"])):
        stock = await tx.get_document(STOCK, item["productId"])
        assert stock is not None, f"no stock row for {item['productId']}"
        data = dict(stock.data)
        data[source] -= item["quantity"]
        data[target] += item["quantity"]
        await tx.put_document(STOCK, item["productId"], data, stock.version)


def stock_violations(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Products whose ledger is off: ``available + reserved + sold != stocked`` or negative."""
    problems = []
    for row in rows:
        counts = {name: row.get(name, 0) for name in ("available", "reserved", "sold", "stocked")}
        if any(not isinstance(v, int | Decimal) or v < 0 for v in counts.values()):
            problems.append(f"{row.get('productId')}: a negative or non-integer count {counts}")
        elif counts["available"] + counts["reserved"] + counts["sold"] != counts["stocked"]:
            problems.append(f"{row.get('productId')}: available + reserved + sold != stocked")
    return problems
