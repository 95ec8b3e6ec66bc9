"""The demo: the seed's order and two that fail, run through all five services in one process.

``sagaline demo`` wires these functions and prints the result; tests call them directly. The
demo's stores are throw-away data marked with the metadata key ``demo``: the next run replaces a
demo's stores, and refuses any other data, so the demo never wipes real data
(:meth:`sagaline.Deployment.connect` with ``replace``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from sagaline import (
    BrokerBus,
    Command,
    Database,
    Deployment,
    Envelope,
    NotResettable,
    Runtime,
    System,
    parse_document,
)
from sagaline.orders import SERVICE_NAMES, SUBSCRIBER_NAMES, PaymentRules, build_system
from sagaline.orders.inventory import STOCK, set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.orders.order import Order
from sagaline.orders.read import ORDER_VIEW

__all__ = [
    "DEMO_META_KEY",
    "DEMO_ORDER_IDS",
    "DEMO_STOCK",
    "SEED_ORDER_JSON",
    "DemoRun",
    "NotADemoStore",
    "demo_orders",
    "is_deployment_settled",
    "is_settled",
    "open_demo_deployment",
    "open_demo_store",
    "run_demo",
    "run_until_settled",
    "stock_demo",
    "submit_demo_orders",
]

#: The metadata key that marks the demo's stores as replaceable (value ``"1"``).
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

#: The order aggregate's last event once it has recorded its saga's outcome.
_ORDER_FINAL_EVENTS = frozenset(
    {"OrderConfirmationRecordedEvent", "OrderCancelledEvent", "OrderRejectedEvent"}
)


class NotADemoStore(NotResettable):
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


async def open_demo_deployment(
    store_url: str, bus_url: str | None = None, *, connect_timeout: float | None = None
) -> Deployment:
    """Fresh demo stores for the five services (and a fresh database bus), opened.

    What an earlier demo left at these URLs is replaced (SQLite files, PostgreSQL schemas); any
    other data there is refused with :class:`NotADemoStore`, and nothing is deleted.
    ``connect_timeout``: see :class:`~sagaline.Deployment`.
    """
    try:
        return await Deployment.connect(
            store_url,
            bus_url,
            services=SERVICE_NAMES,
            connect_timeout=connect_timeout,
            replace=DEMO_META_KEY,
        )
    except NotADemoStore:
        raise
    except NotResettable as exc:
        raise NotADemoStore(
            f"{exc.where} exists and is not a demo store; the demo will not replace it", exc.where
        ) from exc


async def open_demo_store(url: str) -> Database:
    """A fresh, empty demo store at ``url`` (one SQLite file for every service and the bus),
    replacing an earlier demo store there.

    Raises :class:`NotADemoStore` when a store that the demo did not create is in the way.
    """
    return (await open_demo_deployment(url)).store(SERVICE_NAMES[0])


async def stock_demo(db: Database, stock: Mapping[str, int] = DEMO_STOCK) -> None:
    """Set the demo's stock levels in one transaction (``db``: the inventory's store)."""
    async with db.transaction() as tx:
        for product_id, quantity in stock.items():
            await set_stock(tx, product_id, quantity)


async def submit_demo_orders(
    bus: Database | BrokerBus, system: System, orders: Sequence[Command] | None = None
) -> list[Envelope]:
    """Submit the demo's orders (or ``orders``) one by one, as clients would."""
    if orders is None:
        orders = demo_orders()
    return [await system.submit(bus, order) for order in orders]


async def is_settled(db: Database, sagas: int) -> bool:
    """Whether ``sagas`` sagas have ended and nothing is left to deliver.

    Terminal sagas alone are not enough: the confirmation or cancellation still has to reach
    the read model and the inventory, so every queue must be empty and every subscriber at the
    head of the log.
    """
    counts = await db.saga_counts()
    ended = counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)
    return ended == sagas == sum(counts.values()) and await db.is_idle(SUBSCRIBER_NAMES)


async def is_deployment_settled(deployment: Deployment, order_ids: Sequence[str]) -> bool:
    """Whether the orders' sagas have ended and every service has caught up with them.

    With one database for stores and bus this is :func:`is_settled`. With a database per
    service, each store is asked about its own part: the orchestrator's sagas ended, the read
    model shows every order's final status, no stock is left reserved, the order aggregate
    recorded the outcome, and no outbox holds anything unpublished.
    """
    if deployment.colocated and len(deployment.distinct_stores()) == 1:
        return await is_settled(deployment.store("orchestrator"), len(order_ids))
    counts = await deployment.queries("orchestrator").saga_counts()
    ended = counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)
    if not ended == len(order_ids) == sum(counts.values()):
        return False
    read = deployment.queries("read")
    for order_id in order_ids:
        view = await read.get_document(ORDER_VIEW, order_id)
        if view is None or view.data.get("status") not in ("CONFIRMED", "CANCELLED"):
            return False
    inventory = deployment.queries("inventory")
    if any(row.get("reserved") for row in await inventory.query_documents(STOCK)):
        return False
    order_store = deployment.queries("order")
    for order_id in order_ids:
        stream = await order_store.read_stream(Order.stream_name(order_id))
        if not stream or stream[-1].envelope.message_type not in _ORDER_FINAL_EVENTS:
            return False
    for store in deployment.distinct_stores():
        if await store.outbox_pending():
            return False
    return True


async def run_until_settled(
    db: Database | Deployment,
    system: System,
    sagas: int | Sequence[str],
    *,
    timeout: float = 60.0,
) -> int:
    """Run every service of ``system`` in this process until they settle.

    ``sagas`` is the number of sagas (one SQLite store) or the order ids. Returns how many
    deliveries were handled; raises ``TimeoutError`` after ``timeout`` seconds.
    """
    if isinstance(db, Deployment):
        deployment = db
        order_ids = list(sagas) if not isinstance(sagas, int) else []
        runtimes = deployment.runtimes(system)

        def done() -> Awaitable[bool]:
            return is_deployment_settled(deployment, order_ids)

        await _run_all_until(runtimes, done, timeout)
        return sum(runtime.handled for runtime in runtimes)
    count = sagas if isinstance(sagas, int) else len(sagas)
    runtime = Runtime(db, system)
    await runtime.run_until(lambda: is_settled(db, count), timeout=timeout)
    return runtime.handled


async def _run_all_until(
    runtimes: Sequence[Runtime], done: Callable[[], Awaitable[bool]], timeout: float
) -> None:
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not await done():
            for task in tasks:
                if task.done():
                    task.result()
            if loop.time() > deadline:
                raise TimeoutError(f"not settled after {timeout} seconds")
            await asyncio.sleep(0.05)
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    db: Database | Deployment,
    *,
    payment_limit: Decimal = Decimal("1000.00"),
    timeout: float = 60.0,
    system: System | None = None,
) -> DemoRun:
    """Stock the store, submit the demo's orders and run the five services until all settle
    (those of ``system``: the orchestrated order flow unless another is given)."""
    deployment = db if isinstance(db, Deployment) else Deployment.of(db, SERVICE_NAMES)
    if system is None:
        system = build_system(PaymentRules(default_limit=payment_limit))
    await stock_demo(deployment.store("inventory"))
    # A broker refuses a command no queue is bound for: declare the system's before submitting.
    await deployment.prepare_bus(system)
    submitted = await submit_demo_orders(deployment.entry, system)
    if isinstance(db, Deployment):
        handled = await run_until_settled(
            db, system, [e.correlation_id for e in submitted], timeout=timeout
        )
    else:
        handled = await run_until_settled(db, system, len(submitted), timeout=timeout)
    return DemoRun(submitted=submitted, handled=handled)
