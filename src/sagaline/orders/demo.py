"""The demo: the seed's order and two that fail, run through all five services in one process.

``sagaline demo`` wires these functions and prints the result; tests call them directly. The
store is a throw-away file marked with the metadata key ``demo``: a demo store is replaced on the
next run, any other store is refused, so the demo never wipes real data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from sagaline.backends.sqlite import SqliteDatabase, path_from_url
from sagaline.errors import ConfigurationError
from sagaline.handling import Runtime, System
from sagaline.messages import Command, Envelope, parse_document
from sagaline.orders import SUBSCRIBER_NAMES, PaymentRules, build_system
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem

__all__ = [
    "DEMO_META_KEY",
    "DEMO_ORDER_IDS",
    "DEMO_STOCK",
    "SEED_ORDER_JSON",
    "DemoRun",
    "NotADemoStore",
    "demo_orders",
    "is_demo_store",
    "is_settled",
    "open_demo_store",
    "run_demo",
    "run_until_settled",
    "stock_demo",
    "submit_demo_orders",
]

#: The metadata key that marks a store as the demo's own (value ``"1"``).
DEMO_META_KEY = "demo"

#: What the demo stocks before any order arrives.
DEMO_STOCK: Mapping[str, int] = {"PROD-A": 10, "PROD-B": 5}

#: The seed's CreateOrderCommand, byte for byte as the seed text writes it.
SEED_ORDER_JSON = """{
"commandType": "CreateOrderCommand",
"orderId": "ORD-12345",
"customerId": "CUST-987",
"items": [
{"productId": "PROD-A", "quantity": 2},
{"productId": "PROD-B", "quantity": 1}
],
"totalAmount": 75.50
}"""

#: The demo's orders: confirmed; cancelled for want of stock; cancelled by a payment decline.
DEMO_ORDER_IDS = ("ORD-12345", "ORD-12346", "ORD-12347")

_SIDE_FILES = ("-wal", "-shm", "-journal")


class NotADemoStore(ConfigurationError):
    """The demo was pointed at a store it did not create; it refuses to replace it."""

    code = "not_a_demo_store"


def demo_orders() -> list[Command]:
    """The three orders the demo submits, in order.

    ORD-12345 is the seed's own document; ORD-12346 asks for more PROD-A than is stocked;
    ORD-12347 costs more than the default payment limit of 1000.00.
    """
    seed = parse_document(SEED_ORDER_JSON)
    if not isinstance(seed, CreateOrderCommand):
        raise TypeError("the seed's order document must be a CreateOrderCommand")
    return [
        seed,
        CreateOrderCommand(
            order_id="ORD-12346",
            customer_id="CUST-123",
            items=[OrderItem(product_id="PROD-A", quantity=50)],
            total_amount=Decimal("500.00"),
        ),
        CreateOrderCommand(
            order_id="ORD-12347",
            customer_id="CUST-555",
            items=[OrderItem(product_id="PROD-B", quantity=2)],
            total_amount=Decimal("2500.00"),
        ),
    ]


def is_demo_store(path: str | Path) -> bool:
    """Whether the SQLite file at ``path`` carries the demo's mark.

    The file is opened read-only: a store that is not the demo's must not be touched, not even
    by creating sagaline's tables in it. A file that is not a SQLite database is not a demo store.
    """
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return False
    try:
        row = connection.execute(
            "SELECT value FROM sagaline_meta WHERE key = ?", (DEMO_META_KEY,)
        ).fetchone()
    except sqlite3.Error:
        return False
    finally:
        connection.close()
    return row is not None and row[0] == "1"


async def open_demo_store(url: str) -> SqliteDatabase:
    """A fresh, empty demo store at ``url``, replacing an earlier demo store there.

    Raises :class:`NotADemoStore` when a file that the demo did not create is in the way.
    """
    path = path_from_url(url)
    if path != ":memory:" and Path(path).exists():
        if not is_demo_store(path):
            raise NotADemoStore(
                f"{path} exists and is not a demo store; the demo will not replace it"
            )
        for name in (path, *(path + suffix for suffix in _SIDE_FILES)):
            Path(name).unlink(missing_ok=True)
    db = SqliteDatabase(url)
    await db.set_meta(DEMO_META_KEY, "1")
    return db


async def stock_demo(db: SqliteDatabase, stock: Mapping[str, int] = DEMO_STOCK) -> None:
    """Set the demo's stock levels in one transaction."""
    async with db.transaction() as tx:
        for product_id, quantity in stock.items():
            await set_stock(tx, product_id, quantity)


async def submit_demo_orders(
    db: SqliteDatabase, system: System, orders: Sequence[Command] | None = None
) -> list[Envelope]:
    """Submit the demo's orders (or ``orders``) one by one, as clients would."""
    if orders is None:
        orders = demo_orders()
    return [await system.submit(db, order) for order in orders]


def is_settled(db: SqliteDatabase, sagas: int) -> bool:
    """Whether ``sagas`` sagas have ended and nothing is left to deliver.

    Terminal sagas alone are not enough: the confirmation or cancellation still has to reach
    the read model and the inventory, so every queue must be empty and every subscriber at the
    head of the log.
    """
    counts = db.saga_counts()
    ended = counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)
    return ended == sagas == sum(counts.values()) and db.is_idle(SUBSCRIBER_NAMES)


async def run_until_settled(
    db: SqliteDatabase, system: System, sagas: int, *, timeout: float = 60.0
) -> int:
    """Run every service of ``system`` in this process until :func:`is_settled`.

    Returns how many deliveries were handled; raises ``TimeoutError`` after ``timeout`` seconds.
    """
    runtime = Runtime(db, system)
    await runtime.run_until(lambda: is_settled(db, sagas), timeout=timeout)
    return runtime.handled


@dataclass(frozen=True)
class DemoRun:
    """What a demo run did: the submitted commands (in order) and the deliveries handled."""

    submitted: list[Envelope]
    handled: int

    @property
    def order_ids(self) -> list[str]:
        """The business keys of the submitted orders, in submission order."""
        return [envelope.correlation_id for envelope in self.submitted]


async def run_demo(
    db: SqliteDatabase,
    *,
    payment_limit: Decimal = Decimal("1000.00"),
    timeout: float = 60.0,
) -> DemoRun:
    """Stock the store, submit the demo's orders and run the five services until all settle."""
    system = build_system(PaymentRules(default_limit=payment_limit))
    await stock_demo(db)
    submitted = await submit_demo_orders(db, system)
    handled = await run_until_settled(db, system, len(submitted), timeout=timeout)
    return DemoRun(submitted=submitted, handled=handled)
