"""The order system's own commands: the demo, stock levels and the order read model.

They join sagaline's command line when the order app is the one run (it is by default), and use
the tools sagaline's CLI offers an app's commands (:mod:`sagaline.cli`), so they look and fail as
its own commands do.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from sagaline import Deployment, Document, saga_id
from sagaline.cli import (
    DEFAULT_STORE_URL,
    STATUS_STYLES,
    BusOption,
    JsonOption,
    StoreOption,
    TransactionTrace,
    cell,
    check_urls,
    current_app,
    emit_json,
    errors,
    fail,
    inert,
    load_trace,
    out,
    print_trace,
    quoted,
    redact_url,
    settings,
    styled_status,
    with_deployment,
)
from sagaline.orders.demo import DEMO_STOCK, NotADemoStore, open_demo_deployment, run_demo
from sagaline.orders.inventory import STOCK, set_stock, stock_violations
from sagaline.orders.messages import Id
from sagaline.orders.read import ORDER_VIEW
from sagaline.orders.saga import ORDER_SAGA

__all__ = ["commands"]

#: The largest stock level ``sagaline stock set`` accepts.
MAX_STOCK = 10**12

commands = typer.Typer()
STATUS_STYLES.update(CONFIRMED="green", CANCELLED="red", PENDING="yellow")
stock_commands = typer.Typer(help="Inventory stock levels.", no_args_is_help=True)
commands.add_typer(stock_commands, name="stock")

PaymentLimitOption = Annotated[
    str,
    typer.Option(
        "--payment-limit", metavar="AMOUNT", help="Payments above this amount are declined."
    ),
]


def _parse_amount(text: str, option: str) -> Decimal:
    try:
        amount = Decimal(text)
    except InvalidOperation:
        fail(f"{option} must be a decimal amount such as 1000.00, not {quoted(text)}", 2)
    if not amount.is_finite() or amount < 0:
        fail(f"{option} must be a finite, non-negative amount, not {quoted(text)}", 2)
    return amount


def _items(items: object) -> str:
    if not isinstance(items, list):
        return ""
    return ", ".join(
        f"{inert(item.get('productId'))} x {inert(item.get('quantity'))}"
        for item in items
        if isinstance(item, Mapping)
    )


def _order_notes(order: Mapping[str, Any] | None) -> list[str]:
    """What the read model says of an order, for the line above its trace."""
    if order is None:
        return []
    notes = [f"order {styled_status(order.get('status'))}"]
    if order.get("reason"):
        notes.append(f"reason: {inert(order['reason'])}")
    return notes


def _orders_table(rows: Sequence[Mapping[str, Any]], title: str = "Orders") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("orderId", no_wrap=True)
    table.add_column("customerId", no_wrap=True)
    table.add_column("items")
    table.add_column("totalAmount", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("reason")
    for row in rows:
        table.add_row(
            cell(row.get("orderId")),
            cell(row.get("customerId")),
            _items(row.get("items")),
            cell(row.get("totalAmount")),
            styled_status(row.get("status")),
            cell(row.get("reason")),
        )
    return table


def _stock_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Stock", title_justify="left")
    table.add_column("productId", no_wrap=True)
    for column in ("available", "reserved", "sold", "stocked"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            cell(row.get("productId")),
            *(cell(row.get(c)) for c in ("available", "reserved", "sold", "stocked")),
        )
    return table


@commands.command()
def demo(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    payment_limit: PaymentLimitOption = "1000.00",
) -> None:
    """Run the seed's order flow: one order confirmed, two compensated, with their timelines.

    The store is replaced when it is an earlier demo's; any other existing store is refused.
    """
    check_urls(store, bus)
    limit = _parse_amount(payment_limit, "--payment-limit")
    shown = inert(redact_url(store)) + (f" with bus {inert(redact_url(bus))}" if bus else "")

    async def go() -> tuple[
        int, list[TransactionTrace], list[dict[str, Any]], list[Document | None]
    ]:
        deployment = await open_demo_deployment(
            store, bus, connect_timeout=settings.connect_timeout
        )
        try:
            system = current_app().system({"payment_limit": str(limit)})
            run = await run_demo(deployment, system=system)
            sources = deployment.audit_sources()
            orchestrator = deployment.queries("orchestrator")
            traces = [
                await load_trace(sources, key, saga_id(ORDER_SAGA, key), saga_store=orchestrator)
                for key in run.order_ids
            ]
            read = deployment.queries("read")
            orders = [await read.get_document(ORDER_VIEW, key) for key in run.order_ids]
            stock = await deployment.queries("inventory").query_documents(STOCK)
            return run.handled, traces, stock, orders
        finally:
            await deployment.close()

    with errors(store, bus):
        try:
            handled, traces, stock, orders = asyncio.run(go())
        except NotADemoStore as exc:
            fail(f"{inert(exc)}. Pass another store, e.g. --store sqlite:///./sagaline-demo.db", 2)
        except TimeoutError:
            fail("the demo's sagas did not settle in time", 1)
    stocked = ", ".join(f"{inert(p)}={q}" for p, q in DEMO_STOCK.items())
    out.print(
        f"[bold]sagaline demo[/] on {shown}: stocked {stocked}; submitted {len(traces)} orders;"
        f" {handled} deliveries handled by order, inventory, payment, orchestrator, read",
        soft_wrap=True,
    )
    views = [document.data if document else None for document in orders]
    for trace, view in zip(traces, views, strict=True):
        out.print()
        print_trace(trace, _order_notes(view))
    out.print()
    out.print(_orders_table([view for view in views if view is not None], "Order read model"))
    out.print(_stock_table(stock))
    problems = stock_violations(stock)
    if problems:
        for problem in problems:
            out.print(f"[red]stock ledger off:[/] {inert(problem)}", soft_wrap=True)
    else:
        out.print("stock ledger balanced: available + reserved + sold == stocked for every product")


@stock_commands.command("set", context_settings={"ignore_unknown_options": True})
def stock_set(
    product: Annotated[str, typer.Argument(metavar="PRODUCT", help="The product id.")],
    quantity: Annotated[
        str, typer.Argument(metavar="QTY", help="Units available: a non-negative integer.")
    ],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """Set how many units of a product are available."""
    # QTY is parsed here, not by the option parser, so that "-1" gets a clear error.
    if re.fullmatch(r"[0-9]+", quantity) is None:
        fail(f"QTY must be a non-negative integer, not {quoted(quantity)}", 2)
    units = int(quantity)
    if units > MAX_STOCK:
        fail(f"QTY must be at most {MAX_STOCK}", 2)
    try:
        msgspec.convert(product, Id)
    except msgspec.ValidationError:
        fail(f"PRODUCT must be 1 to 100 letters, digits or . _ : -, not {quoted(product)}", 2)

    async def apply(deployment: Deployment) -> dict[str, Any]:
        async with deployment.store("inventory").transaction() as tx:
            return await set_stock(tx, product, units)

    row = with_deployment(store, bus, apply, must_exist=None, services=["inventory"])
    if json_output:
        emit_json(row)
    else:
        out.print(_stock_table([row]))


@stock_commands.command("list")
def stock_list(
    store: StoreOption = DEFAULT_STORE_URL, bus: BusOption = None, json_output: JsonOption = False
) -> None:
    """Every product's stock: available, reserved, sold and stocked units."""

    async def query(deployment: Deployment) -> list[dict[str, Any]]:
        return await deployment.queries("inventory").query_documents(STOCK)

    rows = with_deployment(
        store, bus, query, must_exist="inventory", services=["inventory"], read_only=True
    )
    if json_output:
        emit_json(rows)
    elif rows:
        out.print(_stock_table(rows))
    else:
        out.print("no stock recorded (sagaline stock set PRODUCT QTY)")


@commands.command()
def order(
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID", help="The orderId.")],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """One order of the read model."""

    async def query(deployment: Deployment) -> Document | None:
        return await deployment.queries("read").get_document(ORDER_VIEW, order_id)

    document = with_deployment(store, bus, query, services=["read"], read_only=True)
    if document is None:
        fail(f"no order {quoted(order_id)} in the read model", 1)
    row = document.data
    if json_output:
        emit_json(row)
        return
    table = Table(show_header=False, title=f"Order {inert(order_id)}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("orderId", "customerId", "items", "totalAmount", "status", "reason"):
        value = row.get(key)
        if key == "items":
            table.add_row(key, _items(value))
        elif key == "status":
            table.add_row(key, styled_status(value))
        else:
            table.add_row(key, cell(value))
    for key in ("createdAt", "updatedAt"):
        table.add_row(key, cell(row.get(key)))
    out.print(table)


@commands.command()
def orders(
    status: Annotated[
        str | None, typer.Option("--status", help="Only orders with this status.")
    ] = None,
    customer: Annotated[
        str | None, typer.Option("--customer", help="Only orders of this customerId.")
    ] = None,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """Orders of the read model, optionally filtered by status and customer."""
    filters: dict[str, str] = {}
    if status is not None:
        filters["status"] = status.upper()
    if customer is not None:
        filters["customerId"] = customer

    async def query(deployment: Deployment) -> list[dict[str, Any]]:
        return await deployment.queries("read").query_documents(ORDER_VIEW, filters)

    rows = with_deployment(store, bus, query, services=["read"], read_only=True)
    if json_output:
        emit_json(rows)
    elif rows:
        out.print(_orders_table(rows))
    else:
        out.print("no orders match")
