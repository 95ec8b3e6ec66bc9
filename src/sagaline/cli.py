"""The ``sagaline`` command line: run the order flow, submit commands, query and trace it.

Every command takes ``--store URL`` (default ``$SAGALINE_STORE_URL``, else
``sqlite:///./sagaline.db``); query commands take ``--json`` for machine-readable output on
stdout. Errors go to stderr: exit code 2 for bad input, 1 for anything else that went wrong.
A one-shot command gives up on a database or broker it cannot reach after ``--connect-timeout``
seconds (``$SAGALINE_CONNECT_TIMEOUT``, default 10); ``run``, ``serve`` and ``up`` wait for them.
URLs are shown without their passwords, and handed to child processes through the environment.

Text that comes from messages (reasons, ids, type names) is untrusted: it is printed inert, with
control characters replaced and rich markup escaped, so a payload cannot drive the terminal.
"""

import asyncio
import logging
import os
import re
import signal
import socket
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from sagaline.backends import BrokerTopology
from sagaline.backends.sqlite import LEASE_SECONDS, NotAStore, path_from_url
from sagaline.config import (
    ADAPTERS,
    BUS_URL_ENV,
    CONNECT_TIMEOUT_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    STORE_URL_ENV,
    Role,
    adapter_for,
    redact,
    redact_url,
    scheme_of,
    schemes_for,
)
from sagaline.deploy import (
    Deployment,
    Supervisor,
    open_bus,
    serve_argv,
    service_url,
    url_environment,
)
from sagaline.errors import (
    BusUnavailable,
    ConfigurationError,
    InvalidMessage,
    MessageRefused,
    NotAcceptedFromClients,
    SagalineError,
    StoreUnavailable,
    UnknownMessageType,
)
from sagaline.handling import DEFAULT_BATCH, Runtime
from sagaline.messages import (
    MAX_MESSAGE_BYTES,
    Command,
    Envelope,
    check_message_id,
    json_schema,
    parse_document,
    registry,
)
from sagaline.observability import (
    TransactionTrace,
    dead_letter_summary,
    load_trace,
    saga_failure,
    saga_summary,
    stock_violations,
    strip_control,
    to_json,
)
from sagaline.orders import ORDER_SAGA, SERVICE_NAMES, PaymentRules, build_system
from sagaline.orders.demo import (
    DEMO_STOCK,
    NotADemoStore,
    open_demo_deployment,
    run_demo,
)
from sagaline.orders.inventory import STOCK, set_stock
from sagaline.orders.messages import Id
from sagaline.orders.read import ORDER_VIEW, build_order_projection
from sagaline.ports import Document, SagaRecord, StoreQueries
from sagaline.projection import rebuild as rebuild_projection
from sagaline.saga.definition import SagaStatus
from sagaline.saga.engine import saga_id

__all__ = ["DEFAULT_STORE_URL", "app", "main"]

#: The store used when neither ``--store`` nor ``SAGALINE_STORE_URL`` names one.
DEFAULT_STORE_URL = "sqlite:///./sagaline.db"

#: The largest stock level ``sagaline stock set`` accepts.
MAX_STOCK = 10**12

log = logging.getLogger("sagaline.cli")
T = TypeVar("T")


@dataclass
class _Settings:
    """Options of the ``sagaline`` command itself, given before the subcommand."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


_settings = _Settings()

# Emoji codes (``:x:``) and highlighting would alter untrusted text; styles are set explicitly.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

app = typer.Typer(
    name="sagaline",
    help="Sagas on CQRS: run the order flow, submit commands, query read models, trace sagas.",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks with local variables could show message bodies or secrets.
    pretty_exceptions_enable=False,
)
stock_app = typer.Typer(help="Inventory stock levels.", no_args_is_help=True)
app.add_typer(stock_app, name="stock")

StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar=STORE_URL_ENV,
        metavar="URL",
        help="Store URL: sqlite:///path/to/file.db or postgresql://user@host/db.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
BusOption = Annotated[
    str | None,
    typer.Option(
        "--bus",
        envvar=BUS_URL_ENV,
        metavar="URL",
        help="Bus URL when the bus is not the store's database: amqp://, nats://, or another"
        " sqlite:/// file or postgresql:// database. With it, each service opens its own store"
        " (put {service} in a SQLite store URL for one file per service).",
    ),
]
PaymentLimitOption = Annotated[
    str,
    typer.Option(
        "--payment-limit", metavar="AMOUNT", help="Payments above this amount are declined."
    ),
]


# --------------------------------------------------------------------------- helpers


def _inert(value: object) -> str:
    """Untrusted text made safe for rich markup and for the terminal."""
    return escape(strip_control(str(value)))


def _quoted(value: object, limit: int = 120) -> str:
    """Untrusted text quoted as a Python literal: control characters show as escapes.

    Long values are cut: an error message need not repeat a megabyte of input.
    """
    text = str(value)
    quoted = repr(text[:limit]) + ("..." if len(text) > limit else "")
    return escape(strip_control(quoted))


def _fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` (already inert markup) on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _emit_json(value: Any) -> None:
    sys.stdout.write(to_json(value) + "\n")
    sys.stdout.flush()


def _arrow() -> str:
    return "→" if out.encoding.lower().startswith("utf") else "->"


def _queries(deployment: Deployment, service: str) -> StoreQueries:
    """The query methods of ``service``'s store (every backend offers the same ones)."""
    return cast(StoreQueries, deployment.store(service))


def _all_queries(deployment: Deployment) -> list[StoreQueries]:
    """The query methods of every distinct store of the deployment, and of a database bus
    (which also holds the commands that clients submitted)."""
    sources = [cast(StoreQueries, store) for store in deployment.distinct_stores()]
    if deployment.bus is not None and hasattr(deployment.bus, "trace_rows"):
        sources.append(cast(StoreQueries, deployment.bus))
    return sources


def _check_urls(store: str, bus: str | None) -> None:
    """Exit with a clear error unless ``store`` and ``bus`` are URLs sagaline supports."""
    roles: tuple[tuple[str | None, Role], ...] = ((store, "store"), (bus, "bus"))
    for url, kind in roles:
        if url is None:
            continue
        shown = _inert(redact_url(url))
        try:
            adapter_for(url, kind)
        except ConfigurationError:
            _fail(
                f"unsupported {kind} URL {shown}: use "
                + ", ".join(f"{name}://" for name in schemes_for(kind)),
                2,
            )
        scheme = scheme_of(url)
        if scheme == "sqlite":
            try:
                path_from_url(url)
            except SagalineError as exc:
                _fail(_inert(exc), 2)


def _check_store_url(url: str) -> str:
    """The file path of a SQLite store URL; exits with a clear error otherwise."""
    _check_urls(url, None)
    if not url.startswith("sqlite:///"):
        _fail(f"this command needs a SQLite store, not {_inert(redact_url(url))}", 2)
    return path_from_url(url)


def _open_deployment(
    store: str,
    bus: str | None,
    *,
    must_exist: str | None = "read",
    services: Sequence[str] = SERVICE_NAMES,
    lease_seconds: float | None = None,
    instance: tuple[int, int] | None = None,
    read_only: bool = False,
    adopt: bool = False,
    connect_timeout: float | None = None,
) -> Deployment:
    """The services' stores and bus; queries refuse to create an empty SQLite store.

    ``read_only``: SQLite files are opened for queries only (nothing is written to them);
    ``adopt``: SQLite databases that are not sagaline stores yet get sagaline's tables.
    """
    _check_urls(store, bus)
    shown = _inert(redact_url(store))
    if must_exist is not None and store.startswith("sqlite:///"):
        path = path_from_url(service_url(store, must_exist))
        if path != ":memory:" and not Path(path).exists():
            _fail(f"no store at {_inert(path)} (run `sagaline demo`, or pass --store URL)", 1)
    sqlite_options: dict[str, Any] = {}
    if read_only:
        sqlite_options["read_only"] = True
    if adopt:
        sqlite_options["adopt"] = True
    options: dict[str, Any] = dict(sqlite_options) if store.startswith("sqlite:") else {}
    if lease_seconds is not None:
        options["lease_seconds"] = lease_seconds
    bus_options: dict[str, Any] = {"instance": instance} if instance is not None else {}
    if bus is not None and bus.startswith("sqlite:"):
        bus_options.update(sqlite_options)
    try:
        return Deployment(
            store,
            bus,
            services,
            store_options=options,
            bus_options=bus_options,
            connect_timeout=connect_timeout,
        )
    except NotAStore as exc:
        _fail(_inert(exc), 2)
    except StoreUnavailable as exc:
        _fail(_inert(redact(str(exc), store, bus)), 1)
    except (SagalineError, sqlite3.Error) as exc:
        _fail(f"cannot open the store {shown}: {_inert(redact(str(exc), store, bus))}", 1)


async def _open_with_retry(deployment: Deployment, max_delay: float = 5.0) -> None:
    """Open the deployment, retrying with backoff while its servers are unreachable."""
    delay = 0.25
    while True:
        try:
            await deployment.open()
            return
        except Exception as exc:
            if not isinstance(
                exc, (StoreUnavailable, BusUnavailable, *_database_errors())
            ) or isinstance(exc, ConfigurationError):
                raise
            # Opening is idempotent: what did connect stays, the rest is tried again.
            shown = redact(str(exc), deployment.store_url, deployment.bus_url)
            log.warning("cannot connect yet (%s); retrying in %.1fs", shown, delay)
            await asyncio.sleep(delay)
            delay = min(max_delay, delay * 2)


def _database_errors() -> tuple[type[Exception], ...]:
    """Errors of the databases and brokers in use, shown as one line rather than a traceback.

    The adapters report a server they cannot reach as :class:`StoreUnavailable` or
    :class:`BusUnavailable`; these are what a driver may still raise once connected."""
    errors: list[type[Exception]] = [sqlite3.Error, OSError]
    for module, name in (("psycopg", "Error"), ("aiormq", "AMQPError"), ("nats", "errors")):
        loaded = sys.modules.get(module)
        found = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(found, type) and issubclass(found, Exception):
            errors.append(found)
        elif module == "nats" and found is not None:
            base = getattr(found, "Error", None)
            if isinstance(base, type) and issubclass(base, Exception):
                errors.append(base)
    return tuple(errors)


def _with(
    store: str,
    bus: str | None,
    work: Callable[[Deployment], Awaitable[T]],
    *,
    must_exist: str | None = "read",
    services: Sequence[str] = SERVICE_NAMES,
    lease_seconds: float | None = None,
    wait_for_servers: bool = False,
    instance: tuple[int, int] | None = None,
    read_only: bool = False,
    adopt: bool = False,
) -> T:
    """Open the deployment, do ``work`` with it and close it, all in one event loop.

    With ``wait_for_servers`` (a long-running service), a database or broker that is not
    reachable yet is waited for with backoff instead of failing; otherwise one that cannot be
    reached within ``--connect-timeout`` is an error.
    """
    deployment = _open_deployment(
        store,
        bus,
        must_exist=must_exist,
        services=services,
        lease_seconds=lease_seconds,
        instance=instance,
        read_only=read_only,
        adopt=adopt,
        connect_timeout=None if wait_for_servers else _settings.connect_timeout,
    )

    async def go() -> T:
        try:
            await _open_with_retry(deployment) if wait_for_servers else await deployment.open()
            return await work(deployment)
        finally:
            await deployment.close()

    with _errors(store, bus):
        return asyncio.run(go())


@contextmanager
def _errors(*urls: str | None) -> Iterator[None]:
    """Turn sagaline and database errors into a message on stderr and exit code 1; ``urls``
    (and their passwords) are shown redacted wherever the message repeats them."""
    try:
        yield
    except InvalidMessage as exc:
        _fail(_describe_invalid(exc), 2)
    except MessageRefused as exc:
        _fail(f"refused: {_inert(exc)}", 2)
    except SagalineError as exc:
        _fail(_inert(redact(str(exc), *urls)), 1)
    except _database_errors() as exc:
        _fail(f"database error: {_inert(redact(str(exc), *urls))}", 1)


def _describe_invalid(exc: InvalidMessage) -> str:
    field = exc.field
    prefix = f"invalid message, field {_inert(field)}: " if field else "invalid message: "
    return prefix + _inert(exc.reason)


def _parse_amount(text: str, option: str) -> Decimal:
    try:
        amount = Decimal(text)
    except InvalidOperation:
        _fail(f"{option} must be a decimal amount such as 1000.00, not {_quoted(text)}", 2)
    if not amount.is_finite() or amount < 0:
        _fail(f"{option} must be a finite, non-negative amount, not {_quoted(text)}", 2)
    return amount


def _configure_logging(level: int) -> None:
    root = logging.getLogger()
    if not any(isinstance(h.formatter, _InertFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_InertFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    # A one-shot command reports a broker it cannot reach as its error; a service logs the
    # driver's own account of each attempt while it waits.
    logging.getLogger("aiormq.connection").setLevel(
        logging.NOTSET if level <= logging.INFO else logging.CRITICAL
    )


class _InertFormatter(logging.Formatter):
    """Log lines with control characters replaced: log messages quote message payloads."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(strip_control(line) for line in super().format(record).splitlines())


def _clock(timestamp: object) -> str:
    """``HH:MM:SS.mmm`` of an ISO-8601 timestamp (the whole text when it is not one)."""
    text = str(timestamp or "")
    match = re.fullmatch(r"\d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d)(\.\d{1,3})?\d*Z?", text)
    if match is None:
        return _inert(text)
    return match.group(1) + (match.group(2) or "")


def _items(items: object) -> str:
    if not isinstance(items, list):
        return ""
    return ", ".join(
        f"{_inert(item.get('productId'))} x {_inert(item.get('quantity'))}"
        for item in items
        if isinstance(item, Mapping)
    )


def _status_style(status: object) -> str:
    return {
        "CONFIRMED": "green",
        "COMPLETED": "green",
        "CANCELLED": "red",
        "COMPENSATED": "red",
        "COMPENSATING": "yellow",
        "RUNNING": "yellow",
        "PENDING": "yellow",
    }.get(str(status), "white")


def _styled_status(status: object) -> str:
    return f"[{_status_style(status)}]{_inert(status)}[/]"


def _cell(value: object) -> str:
    return "" if value is None else _inert(value)


# ----------------------------------------------------------------- rendering


def _message_label(row: Mapping[str, Any]) -> str:
    """Three lines at most: what was sent by whom and when; who handled it; its reason."""
    arrow = _arrow()
    kind = str(row.get("kind"))
    style = "bold cyan" if kind == "command" else "bold magenta"
    lines = [
        f"[{style}]{_inert(row.get('type'))}[/] [dim]{_inert(kind)}[/]"
        f" from [blue]{_inert(row.get('source') or '?')}[/] at {_clock(row.get('timestamp'))}"
    ]
    handled = [h for h in row.get("handledBy") or [] if isinstance(h, Mapping)]
    if handled:
        lines.append(
            f"{arrow} handled by "
            + ", ".join(
                f"[green]{_inert(h.get('consumer'))}[/] at {_clock(h.get('at'))}" for h in handled
            )
        )
    elif kind == "command":
        outcome = row.get("outcome")
        if outcome == "dead":
            lines.append(f"[red]{arrow} dead-lettered[/]")
        elif outcome is None:
            lines.append(f"[yellow]{arrow} pending in queue {_inert(row.get('queue'))}[/]")
    else:
        lines.append(f"[dim]{arrow} no subscriber[/]")
    body = row.get("body")
    if isinstance(body, Mapping):
        details = [
            f"{key} [italic]{_inert(body[key])}[/]"
            for key in ("reason", "transactionId")
            if body.get(key) is not None
        ]
        if details:
            lines.append("  ".join(details))
    return "\n".join(lines)


def _saga_line(trace: TransactionTrace, order: Mapping[str, Any] | None) -> str:
    parts = [f"[bold]{_inert(trace.correlation_id)}[/]"]
    record = trace.saga
    if record is None:
        parts.append("no saga")
    else:
        parts.append(f"saga {_inert(record.saga_id)} {_styled_status(record.status)}")
        failure = saga_failure(record)
        if failure is not None:
            parts.append(
                f"failed at {_inert(failure.get('step'))}: [red]{_inert(failure.get('reason'))}[/]"
            )
    if order is not None:
        parts.append(f"order {_styled_status(order.get('status'))}")
        if order.get("reason"):
            parts.append(f"reason: {_inert(order['reason'])}")
    return f"{parts[0]}: " + "; ".join(parts[1:])


def _print_trace(trace: TransactionTrace, order: Mapping[str, Any] | None) -> None:
    out.print(_saga_line(trace, order), soft_wrap=True)
    tree = Tree("", hide_root=True, guide_style="dim")
    parents: list[Tree] = [tree]
    for depth, row in trace.messages:
        del parents[depth + 1 :]
        node = parents[-1].add(_message_label(row))
        parents.append(node)
    out.print(tree)


def _history_table(record: SagaRecord) -> Table:
    table = Table(title=f"saga {_inert(record.saga_id)} transitions", title_justify="left")
    for column in ("at", "event", "transition", "sent", "status"):
        table.add_column(column)
    for entry in record.history:
        if not isinstance(entry, Mapping):
            continue
        sent = entry.get("sent")
        table.add_row(
            _clock(entry.get("at")),
            _cell(entry.get("event")),
            _cell(entry.get("transition")),
            ", ".join(_inert(s) for s in sent) if isinstance(sent, list) else "",
            _styled_status(entry["status"]) if entry.get("status") else "",
        )
    return table


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
            _cell(row.get("orderId")),
            _cell(row.get("customerId")),
            _items(row.get("items")),
            _cell(row.get("totalAmount")),
            _styled_status(row.get("status")),
            _cell(row.get("reason")),
        )
    return table


def _stock_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Stock", title_justify="left")
    table.add_column("productId", no_wrap=True)
    for column in ("available", "reserved", "sold", "stocked"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            _cell(row.get("productId")),
            *(_cell(row.get(c)) for c in ("available", "reserved", "sold", "stocked")),
        )
    return table


# ----------------------------------------------------------------- commands


@app.callback()
def _setup(
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout",
            envvar=CONNECT_TIMEOUT_ENV,
            min=0.1,
            metavar="SECONDS",
            help="How long a one-shot command waits for its database or broker before it gives"
            " up (run, serve and up wait for them as long as it takes).",
        ),
    ] = DEFAULT_CONNECT_TIMEOUT,
) -> None:
    _settings.connect_timeout = connect_timeout
    _configure_logging(logging.WARNING)


@app.command()
def demo(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    payment_limit: PaymentLimitOption = "1000.00",
) -> None:
    """Run the seed's order flow: one order confirmed, two compensated, with their timelines.

    The store is replaced when it is an earlier demo's; any other existing store is refused.
    """
    _check_urls(store, bus)
    limit = _parse_amount(payment_limit, "--payment-limit")
    shown = _inert(redact_url(store)) + (f" with bus {_inert(redact_url(bus))}" if bus else "")

    async def go() -> tuple[
        int, list[TransactionTrace], list[dict[str, Any]], list[Document | None]
    ]:
        deployment = await open_demo_deployment(
            store, bus, connect_timeout=_settings.connect_timeout
        )
        try:
            run = await run_demo(deployment, payment_limit=limit)
            sources = _all_queries(deployment)
            orchestrator = _queries(deployment, "orchestrator")
            traces = [
                load_trace(sources, key, saga_id(ORDER_SAGA, key), saga_store=orchestrator)
                for key in run.order_ids
            ]
            read = _queries(deployment, "read")
            orders = [read.get_document_sync(ORDER_VIEW, key) for key in run.order_ids]
            stock = _queries(deployment, "inventory").query_documents(STOCK)
            return run.handled, traces, stock, orders
        finally:
            await deployment.close()

    with _errors(store, bus):
        try:
            handled, traces, stock, orders = asyncio.run(go())
        except NotADemoStore as exc:
            _fail(
                f"{_inert(exc)}. Pass another store, e.g. --store sqlite:///./sagaline-demo.db", 2
            )
        except TimeoutError:
            _fail("the demo's sagas did not settle in time", 1)
    stocked = ", ".join(f"{_inert(p)}={q}" for p, q in DEMO_STOCK.items())
    out.print(
        f"[bold]sagaline demo[/] on {shown}: stocked {stocked}; submitted {len(traces)} orders;"
        f" {handled} deliveries handled by order, inventory, payment, orchestrator, read",
        soft_wrap=True,
    )
    views = [document.data if document else None for document in orders]
    for trace, view in zip(traces, views, strict=True):
        out.print()
        _print_trace(trace, view)
    out.print()
    out.print(_orders_table([view for view in views if view is not None], "Order read model"))
    out.print(_stock_table(stock))
    problems = stock_violations(stock)
    if problems:
        for problem in problems:
            out.print(f"[red]stock ledger off:[/] {_inert(problem)}", soft_wrap=True)
    else:
        out.print("stock ledger balanced: available + reserved + sold == stocked for every product")


BatchOption = Annotated[
    int, typer.Option("--batch-size", min=1, max=100_000, help="Deliveries per batch.")
]
LeaseOption = Annotated[
    float | None,
    typer.Option(
        "--lease-seconds",
        min=0.1,
        help="How long a claim or membership lasts without renewal: after a crash, another"
        " process takes the work over once it expires.",
        show_default=f"{LEASE_SECONDS:g}",
    ),
]


def _service_names(services: str) -> list[str]:
    names: list[str] = []
    for name in (part.strip() for part in services.split(",")):
        if not name or name in names:
            continue
        if name not in SERVICE_NAMES:
            _fail(f"unknown service {_quoted(name)}; choose from {', '.join(SERVICE_NAMES)}", 2)
        names.append(name)
    if not names:
        _fail(f"no service to run; choose from {', '.join(SERVICE_NAMES)}", 2)
    return names


def _serve_in_process(
    store: str,
    bus: str | None,
    names: list[str],
    *,
    payment_limit: str,
    batch_size: int,
    lease_seconds: float | None,
    title: str,
    instance: tuple[int, int] | None = None,
    member: str | None = None,
) -> None:
    """Run ``names`` in this process until SIGINT or SIGTERM; in-flight batches finish first."""
    limit = _parse_amount(payment_limit, "--payment-limit")
    _configure_logging(logging.INFO)
    shown = redact_url(store) + (f" with bus {redact_url(bus)}" if bus else "")

    async def serve(deployment: Deployment) -> int:
        system = build_system(PaymentRules(default_limit=limit))
        runtimes = deployment.runtimes(system, names, batch_size=batch_size, member=member)
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            log.info("%s received: finishing the batches in hand", signum.name)
            for runtime in runtimes:
                runtime.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        out.print(
            f"sagaline {title}: {', '.join(names)} on {_inert(shown)} (pid {os.getpid()})",
            soft_wrap=True,
        )
        log.info("running %s on %s", ",".join(names), shown)
        reporter = asyncio.create_task(_report_progress(runtimes))
        try:
            await asyncio.gather(*(runtime.run() for runtime in runtimes))
        finally:
            reporter.cancel()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        return sum(runtime.handled for runtime in runtimes)

    handled = _with(
        store,
        bus,
        serve,
        must_exist=None,
        services=names,
        lease_seconds=lease_seconds,
        wait_for_servers=True,
        instance=instance,
    )
    log.info("stopped after handling %d deliveries", handled)


@app.command()
def run(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    services: Annotated[
        str,
        typer.Option(
            "--services", metavar="NAMES", help="Comma-separated services to run in this process."
        ),
    ] = ",".join(SERVICE_NAMES),
    payment_limit: PaymentLimitOption = "1000.00",
    batch_size: BatchOption = DEFAULT_BATCH,
    lease_seconds: LeaseOption = None,
) -> None:
    """Run services in this process until SIGINT or SIGTERM; in-flight batches finish first.

    Several processes may run on one store: they share the work of each service.
    """
    _serve_in_process(
        store,
        bus,
        _service_names(services),
        payment_limit=payment_limit,
        batch_size=batch_size,
        lease_seconds=lease_seconds,
        title="run",
    )


def _supervise(commands: dict[str, list[str]], title: str, env: Mapping[str, str]) -> None:
    """Run ``commands`` as supervised child processes, with environment ``env``, until SIGINT
    or SIGTERM."""
    _configure_logging(logging.INFO)

    async def go() -> None:
        supervisor = Supervisor(commands, env=env)
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            log.info("%s received: stopping %d processes", signum.name, len(commands))
            supervisor.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        out.print(f"sagaline {title}: {len(commands)} processes (pid {os.getpid()})")
        await supervisor.run()

    asyncio.run(go())


def _parse_instance(value: str | None) -> tuple[int, int] | None:
    """``I/N`` as a pair, with a clear error naming the option."""
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        _fail(f"--instance: {_inert(value)!r} is not I/N with 1 <= I <= N (e.g. 2/3)", 2)
    return int(index), int(count)


def _child_options(payment_limit: str, batch_size: int, lease_seconds: float | None) -> list[str]:
    extra = ["--payment-limit", payment_limit, "--batch-size", str(batch_size)]
    if lease_seconds is not None:
        extra += ["--lease-seconds", str(lease_seconds)]
    return extra


@app.command()
def serve(
    service: Annotated[
        str, typer.Argument(metavar="SERVICE", help=f"One of {', '.join(SERVICE_NAMES)}.")
    ],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    instances: Annotated[
        int,
        typer.Option(
            "--instances", min=1, max=64, help="Processes of this service, competing for work."
        ),
    ] = 1,
    payment_limit: PaymentLimitOption = "1000.00",
    batch_size: BatchOption = DEFAULT_BATCH,
    lease_seconds: LeaseOption = None,
    instance: Annotated[
        str | None,
        typer.Option(
            "--instance",
            metavar="I/N",
            help="This process is instance I of N of the service (set by --instances): on"
            " RabbitMQ each instance takes its share of the partitions first.",
        ),
    ] = None,
    member: Annotated[
        str | None,
        typer.Option(
            "--member",
            metavar="NAME",
            help="The name this process holds leases under (default: its pid and a random"
            " suffix). `up` and --instances name each process they start; one restarted after a"
            " crash takes its name, so it resumes its predecessor's leases at once. Two live"
            " processes must never share a name.",
        ),
    ] = None,
) -> None:
    """Run one service; with --instances N, N supervised processes of it share its work."""
    names = _service_names(service)
    if len(names) != 1:
        _fail("serve runs one service; use `sagaline up` for all of them", 2)
    _check_urls(store, bus)
    _parse_amount(payment_limit, "--payment-limit")
    if instances == 1:
        _serve_in_process(
            store,
            bus,
            names,
            payment_limit=payment_limit,
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            title="serve",
            instance=_parse_instance(instance),
            member=member,
        )
        return
    extra = _child_options(payment_limit, batch_size, lease_seconds)
    _supervise(
        {
            f"{names[0]}-{n}": serve_argv(
                names[0], extra, (n, instances), _member(f"{names[0]}-{n}")
            )
            for n in range(1, instances + 1)
        },
        f"serve {names[0]}",
        url_environment(store, bus),
    )


@app.command()
def up(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    instances: Annotated[
        int, typer.Option("--instances", min=1, max=64, help="Processes per service.")
    ] = 1,
    payment_limit: PaymentLimitOption = "1000.00",
    batch_size: BatchOption = DEFAULT_BATCH,
    lease_seconds: LeaseOption = None,
) -> None:
    """Run all five services as separate processes; a crashed one is restarted; Ctrl-C stops all."""
    _check_urls(store, bus)
    _parse_amount(payment_limit, "--payment-limit")
    # Create every schema once, before the processes race to do it (waiting for the servers).
    _with(store, bus, _prepare, must_exist=None, wait_for_servers=True)
    extra = _child_options(payment_limit, batch_size, lease_seconds)
    _supervise(
        {
            f"{service}-{n}": serve_argv(service, extra, (n, instances), _member(f"{service}-{n}"))
            for service in SERVICE_NAMES
            for n in range(1, instances + 1)
        },
        "up",
        url_environment(store, bus),
    )


def _member(slot: str) -> str:
    """The lease name of a supervised process: this host and supervisor, and its slot (the same
    for the process that replaces it after a crash, and for no other live process)."""
    return f"{socket.gethostname()}-{os.getpid()}-{slot}"


async def _prepare(deployment: Deployment) -> None:
    """Create the stores' schemas and the bus's topology for the whole system."""
    if deployment.bus is not None:
        system = build_system()
        consumers = [spec for svc in system.services.values() for spec in svc.consumers()]
        await deployment.bus.prepare(consumers, system.routes)


@app.command()
def migrate(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
) -> None:
    """Create or upgrade every service's store schema and the bus's queues and streams.

    A SQLite database that is not a sagaline store yet is adopted: sagaline's tables are added
    to it (other commands refuse such a file).
    """
    _with(store, bus, _prepare, must_exist=None, adopt=True)
    out.print(
        f"migrated the stores of {', '.join(SERVICE_NAMES)} on {_inert(redact_url(store))}"
        + (f" and the bus {_inert(redact_url(bus))}" if bus else ""),
        soft_wrap=True,
    )


@app.command()
def teardown(
    bus: BusOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Delete without asking for confirmation.")
    ] = False,
) -> None:
    """Delete a broker bus's queues, exchanges and streams (under its prefix), with their messages.

    For RabbitMQ (amqp://) and NATS (nats://); `migrate` or the services create them again.
    """
    if bus is None:
        _fail("--bus URL: the broker whose topology to delete (amqp:// or nats://)", 2)
    shown = _inert(redact_url(bus))
    brokers = dict.fromkeys(adapter for adapter in ADAPTERS.values() if adapter.broker)
    if urlsplit(bus).scheme.lower() not in [s for broker in brokers for s in broker.schemes]:
        listed = " or ".join(f"{broker.schemes[0]}://" for broker in brokers)
        _fail(f"--bus {shown}: teardown deletes a broker's topology ({listed})", 2)
    if not yes and not typer.confirm(
        f"Delete the queues, exchanges and streams of {redact_url(bus)}, with their messages?"
    ):
        _fail("nothing deleted", 1)

    async def delete() -> None:
        opened = open_bus(bus, connect_timeout=_settings.connect_timeout)
        assert isinstance(opened, BrokerTopology)
        system = build_system()
        consumers = [spec for svc in system.services.values() for spec in svc.consumers()]
        try:
            await opened.open()
            await opened.delete_topology(consumers)
        finally:
            await opened.close()

    try:
        asyncio.run(delete())
    except (StoreUnavailable, BusUnavailable) as exc:
        _fail(_inert(redact(str(exc), bus)), 1)
    except Exception as exc:
        _fail(f"cannot delete the topology of {shown}: {_inert(redact(str(exc), bus))}", 1)
    out.print(f"deleted the queues, exchanges and streams of {shown}", soft_wrap=True)


async def _report_progress(runtimes: Sequence[Runtime], every: float = 10.0) -> None:
    """Log, while there is work, how much was handled."""
    reported = 0
    while not all(runtime.stop_event.is_set() for runtime in runtimes):
        await asyncio.sleep(every)
        handled = sum(runtime.handled for runtime in runtimes)
        if handled != reported:
            reported = handled
            log.info("handled %d deliveries so far", reported)


def _read_document(source: str) -> bytes:
    """The bytes of FILE (``-`` is stdin), refusing anything larger than a message may be."""
    limit = MAX_MESSAGE_BYTES + 1
    try:
        if source == "-":
            data = sys.stdin.buffer.read(limit)
        else:
            with open(source, "rb") as file:
                data = file.read(limit)
    except OSError as exc:
        _fail(f"cannot read {_inert(source)}: {_inert(exc.strerror or exc)}", 2)
    if len(data) >= limit:
        _fail(f"{_inert(source)} is larger than the message limit of {MAX_MESSAGE_BYTES} bytes", 2)
    return data


@app.command()
def submit(
    file: Annotated[
        str, typer.Argument(metavar="FILE", help="A command in the seed's JSON; - reads stdin.")
    ],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    message_id: Annotated[
        str | None,
        typer.Option(
            "--message-id",
            metavar="ID",
            help="Your own id for the message (up to 128 of A-Z a-z 0-9 . _ : -), so that"
            " submitting again after a failure is the same message, accepted once; another"
            " message under a used id is refused.",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Put one command a client may submit onto the bus; prints its message id. Nothing is
    written if it is invalid, internal to the system, or its id was used for another message."""
    _check_urls(store, bus)
    document = _read_document(file)
    system = build_system()
    # Validate before the store is even opened: a bad document leaves no trace.
    try:
        message = parse_document(document)
        if message_id is not None:
            check_message_id(message_id)
    except InvalidMessage as exc:
        _fail(_describe_invalid(exc), 2)
    if not isinstance(message, Command):
        _fail(
            f"invalid message, field $.{message.discriminator}: {_inert(message.type_name())}"
            f" is an {message.kind}; submit takes a command (a commandType document)",
            2,
        )
    try:
        system.check_submittable(message)
    except NotAcceptedFromClients as exc:
        _fail(f"refused: {_inert(exc)}", 2)

    async def send(deployment: Deployment) -> Envelope:
        return await system.submit(deployment.entry, message, message_id=message_id)

    # A separate bus needs no store: only the bus is opened.
    envelope = _with(store, bus, send, must_exist=None, services=() if bus else SERVICE_NAMES)
    if json_output:
        _emit_json(
            {
                "messageId": envelope.message_id,
                "type": envelope.message_type,
                "correlationId": envelope.correlation_id,
            }
        )
    else:
        out.print(envelope.message_id)


@stock_app.command("set", context_settings={"ignore_unknown_options": True})
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
        _fail(f"QTY must be a non-negative integer, not {_quoted(quantity)}", 2)
    units = int(quantity)
    if units > MAX_STOCK:
        _fail(f"QTY must be at most {MAX_STOCK}", 2)
    try:
        msgspec.convert(product, Id)
    except msgspec.ValidationError:
        _fail(f"PRODUCT must be 1 to 100 letters, digits or . _ : -, not {_quoted(product)}", 2)

    async def apply(deployment: Deployment) -> dict[str, Any]:
        async with deployment.store("inventory").transaction() as tx:
            return await set_stock(tx, product, units)

    row = _with(store, bus, apply, must_exist=None, services=["inventory"])
    if json_output:
        _emit_json(row)
    else:
        out.print(_stock_table([row]))


@stock_app.command("list")
def stock_list(
    store: StoreOption = DEFAULT_STORE_URL, bus: BusOption = None, json_output: JsonOption = False
) -> None:
    """Every product's stock: available, reserved, sold and stocked units."""

    async def query(deployment: Deployment) -> list[dict[str, Any]]:
        return _queries(deployment, "inventory").query_documents(STOCK)

    rows = _with(store, bus, query, must_exist="inventory", services=["inventory"], read_only=True)
    if json_output:
        _emit_json(rows)
    elif rows:
        out.print(_stock_table(rows))
    else:
        out.print("no stock recorded (sagaline stock set PRODUCT QTY)")


@app.command()
def order(
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID", help="The orderId.")],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """One order of the read model."""

    async def query(deployment: Deployment) -> Document | None:
        return _queries(deployment, "read").get_document_sync(ORDER_VIEW, order_id)

    document = _with(store, bus, query, services=["read"], read_only=True)
    if document is None:
        _fail(f"no order {_quoted(order_id)} in the read model", 1)
    row = document.data
    if json_output:
        _emit_json(row)
        return
    table = Table(show_header=False, title=f"Order {_inert(order_id)}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("orderId", "customerId", "items", "totalAmount", "status", "reason"):
        value = row.get(key)
        if key == "items":
            table.add_row(key, _items(value))
        elif key == "status":
            table.add_row(key, _styled_status(value))
        else:
            table.add_row(key, _cell(value))
    for key in ("createdAt", "updatedAt"):
        table.add_row(key, _cell(row.get(key)))
    out.print(table)


@app.command()
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
        return _queries(deployment, "read").query_documents(ORDER_VIEW, filters)

    rows = _with(store, bus, query, services=["read"], read_only=True)
    if json_output:
        _emit_json(rows)
    elif rows:
        out.print(_orders_table(rows))
    else:
        out.print("no orders match")


@app.command()
def trace(
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID", help="The orderId.")],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """The audit trail of one order: every command and event as a causal tree, and its saga."""

    async def query(deployment: Deployment) -> tuple[TransactionTrace, Document | None]:
        found = load_trace(
            _all_queries(deployment),
            order_id,
            saga_id(ORDER_SAGA, order_id),
            saga_store=_queries(deployment, "orchestrator"),
        )
        return found, _queries(deployment, "read").get_document_sync(ORDER_VIEW, order_id)

    found, document = _with(store, bus, query, read_only=True)
    if not found.found:
        _fail(f"nothing is known about {_quoted(order_id)}", 1)
    if json_output:
        _emit_json(found.to_json())
        return
    _print_trace(found, document.data if document else None)
    if found.saga is not None:
        out.print(_history_table(found.saga))
    if found.dead_letters:
        out.print(_dead_letter_table([dead_letter_summary(d) for d in found.dead_letters]))


def _dead_letter_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Dead letters", title_justify="left")
    for column in ("failedAt", "consumer", "type", "messageId", "attempts"):
        table.add_column(column, no_wrap=True)
    # A long word (a truncated body's SHA-256) is folded, not cut.
    table.add_column("reason", overflow="fold")
    for row in rows:
        table.add_row(
            *(_cell(row.get(c)) for c in ("failedAt", "consumer", "type")),
            _cell(row.get("messageId")),
            _cell(row.get("attempts")),
            _cell(row.get("reason")),
        )
    return table


@app.command("dead-letters")
def dead_letters(
    store: StoreOption = DEFAULT_STORE_URL, bus: BusOption = None, json_output: JsonOption = False
) -> None:
    """Messages that could not be processed, with the reason (from every service's store)."""

    async def query(deployment: Deployment) -> list[dict[str, Any]]:
        letters = [
            letter for queries in _all_queries(deployment) for letter in queries.dead_letters()
        ]
        letters.sort(key=lambda letter: letter.failed_at)
        return [dead_letter_summary(letter) for letter in letters]

    rows = _with(store, bus, query, read_only=True)
    if json_output:
        _emit_json(rows)
    elif rows:
        out.print(_dead_letter_table(rows))
    else:
        out.print("no dead letters")


@app.command()
def schema(
    type_name: Annotated[
        str | None, typer.Argument(metavar="TYPE", help="A message type; all when left out.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """The JSON Schema of a message type, or of every type keyed by name (always JSON)."""
    if type_name is None:
        _emit_json({name: json_schema(registry.get(name)) for name in registry.names()})
        return
    try:
        cls = registry.get(type_name)
    except UnknownMessageType:
        _fail(f"unknown message type {_quoted(type_name)}; known: {', '.join(registry.names())}", 2)
    _emit_json(json_schema(cls))


@app.command()
def sagas(
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            help=f"Only sagas in this status ({', '.join(s.value for s in SagaStatus)}).",
        ),
    ] = None,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """Saga instances with their status, and how many are in each status."""
    wanted = None
    if status is not None:
        wanted = status.upper()
        if wanted not in {s.value for s in SagaStatus}:
            _fail(
                f"unknown saga status {_quoted(status)};"
                f" choose from {', '.join(s.value for s in SagaStatus)}",
                2,
            )

    async def query(deployment: Deployment) -> tuple[list[dict[str, Any]], dict[str, int]]:
        db = _queries(deployment, "orchestrator")
        return [saga_summary(record) for record in db.list_sagas(wanted)], db.saga_counts()

    rows, counts = _with(
        store, bus, query, must_exist="orchestrator", services=["orchestrator"], read_only=True
    )
    if json_output:
        _emit_json({"counts": counts, "sagas": rows})
        return
    table = Table(title="Sagas", title_justify="left")
    table.add_column("sagaId", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("failedStep")
    table.add_column("reason", min_width=20, ratio=1)
    table.add_column("updatedAt")
    for row in rows:
        table.add_row(
            _cell(row["sagaId"]),
            _styled_status(row["status"]),
            _cell(row["step"]),
            _cell(row["failedStep"]),
            _cell(row["reason"]),
            _cell(row["updatedAt"]),
        )
    if rows:
        out.print(table)
    summary = ", ".join(f"{_inert(name)} {count}" for name, count in sorted(counts.items()))
    out.print(f"sagas: {summary or 'none'}", soft_wrap=True)


@app.command()
def rebuild(store: StoreOption = DEFAULT_STORE_URL, bus: BusOption = None) -> None:
    """Rebuild the order read model from the event log; queries go on meanwhile."""
    projection = build_order_projection()

    async def go(deployment: Deployment) -> tuple[str, int, int]:
        db = deployment.store("read")
        queries = _queries(deployment, "read")
        with Progress(
            TextColumn(f"rebuilding {_inert(projection.namespace)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("events"),
            TimeElapsedColumn(),
            console=err,
        ) as progress:
            head = queries.head_position() if deployment.bus is None else None
            task = progress.add_task("rebuild", total=head)

            def advance(position: int, head: int) -> None:
                progress.update(task, completed=position, total=head)

            namespace = await rebuild_projection(
                db, projection, bus=deployment.bus, progress=advance
            )
            progress.update(task, completed=progress.tasks[0].completed)
        count = len(queries.query_documents(namespace))
        return namespace, count, int(progress.tasks[0].completed)

    namespace, count, position = _with(store, bus, go, services=["read"])
    out.print(
        f"rebuilt {_inert(namespace)}: {count} orders from the event log up to position {position}",
        soft_wrap=True,
    )


def main() -> None:
    """Run the ``sagaline`` command line."""
    app(prog_name="sagaline")
