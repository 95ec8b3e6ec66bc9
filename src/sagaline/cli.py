"""The ``sagaline`` command line: run an app's services, submit commands, query and trace them.

The app is named by ``--app package.module:attribute`` (or ``$SAGALINE_APP``, or ``app`` in the
``[tool.sagaline]`` table of ``pyproject.toml``); the reference order system when none is. An
app's own commands (:attr:`App.commands <sagaline.app.App.commands>`) join the CLI's; they use
the tools at the end of this module, so that they look and fail like sagaline's own commands.

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
import importlib
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
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from sagaline.app import APP_ENV, App, find_app, load_app
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
from sagaline.documents import (
    DEFAULT_SUBMIT_BATCH,
    DocumentProblem,
    check_submittable,
    parse_documents,
    read_input,
    submit_in_batches,
)
from sagaline.errors import (
    BusUnavailable,
    ConfigurationError,
    InvalidMessage,
    MessageRefused,
    SagaDefinitionError,
    SagalineError,
    StoreUnavailable,
    UnknownMessageType,
)
from sagaline.handling import DEFAULT_BATCH, Runtime, System
from sagaline.messages import (
    Envelope,
    check_message_id,
    json_schema,
)
from sagaline.observability import (
    TransactionTrace,
    dead_letter_summary,
    load_trace,
    saga_failure,
    saga_summary,
    strip_control,
    to_json,
)
from sagaline.ports import SagaRecord, StoreQueries
from sagaline.projection import rebuild as rebuild_projection
from sagaline.saga.definition import SagaStatus
from sagaline.saga.describe import SagaDescription, sagas_of
from sagaline.saga.describe import describe as describe_saga
from sagaline.saga.engine import saga_id

__all__ = [
    "DEFAULT_STORE_URL",
    "STATUS_STYLES",
    "BusOption",
    "JsonOption",
    "StoreOption",
    "all_queries",
    "app",
    "cell",
    "check_urls",
    "current_app",
    "emit_json",
    "errors",
    "fail",
    "inert",
    "load_transaction",
    "main",
    "out",
    "print_trace",
    "queries",
    "quoted",
    "settings",
    "styled_status",
    "with_deployment",
]

#: The store used when neither ``--store`` nor ``SAGALINE_STORE_URL`` names one.
DEFAULT_STORE_URL = "sqlite:///./sagaline.db"

log = logging.getLogger("sagaline.cli")
T = TypeVar("T")


@dataclass
class _Settings:
    """Options of the ``sagaline`` command itself, given before the subcommand."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: The app the commands work on (see :func:`current_app`), and how it was named.
    app: App | None = None
    app_spec: str = ""


_settings = _Settings()


def current_app() -> App:
    """The app the command line works on: the one named, or the reference order system."""
    if _settings.app is None:
        _use_app(find_app())
    assert _settings.app is not None
    return _settings.app


def _use_app(spec: str) -> App:
    try:
        loaded = load_app(spec)
    except ConfigurationError as exc:
        _fail(f"--app: {_inert(exc)}", 2)
    _settings.app, _settings.app_spec = loaded, spec
    return loaded


# Emoji codes (``:x:``) and highlighting would alter untrusted text; styles are set explicitly.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

app = typer.Typer(
    name="sagaline",
    help="Sagas on CQRS: run an app's services, submit commands, trace transactions and sagas.",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks with local variables could show message bodies or secrets.
    pretty_exceptions_enable=False,
)

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
    services: Sequence[str] | None = None,
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
    if services is None:
        services = current_app().services
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
    services: Sequence[str] | None = None,
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


#: The colour of a status word; an app adds its own words (its read model's statuses).
STATUS_STYLES: dict[str, str] = {
    "COMPLETED": "green",
    "COMPENSATED": "red",
    "COMPENSATING": "yellow",
    "RUNNING": "yellow",
}


def _status_style(status: object) -> str:
    return STATUS_STYLES.get(str(status), "white")


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


def _saga_line(trace: TransactionTrace, notes: Sequence[str] = ()) -> str:
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
    parts.extend(notes)
    return f"{parts[0]}: " + "; ".join(parts[1:])


def _print_trace(trace: TransactionTrace, notes: Sequence[str] = ()) -> None:
    """The saga line (with ``notes``, markup already inert) and the causal tree of messages."""
    out.print(_saga_line(trace, notes), soft_wrap=True)
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
    app_spec: Annotated[
        str | None,
        typer.Option(
            "--app",
            envvar=APP_ENV,
            metavar="MODULE:ATTR",
            help="The app to work on (default: [tool.sagaline] app in pyproject.toml, else the"
            " reference order system).",
        ),
    ] = None,
) -> None:
    _settings.connect_timeout = connect_timeout
    if _settings.app is None:
        _use_app(find_app(app_spec))
    _configure_logging(logging.WARNING)


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


def _service_names(services: str | None) -> list[str]:
    known = current_app().services
    if services is None:
        return list(known)
    names: list[str] = []
    for name in (part.strip() for part in services.split(",")):
        if not name or name in names:
            continue
        if name not in known:
            _fail(f"unknown service {_quoted(name)}; choose from {', '.join(known)}", 2)
        names.append(name)
    if not names:
        _fail(f"no service to run; choose from {', '.join(known)}", 2)
    return names


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="NAME=VALUE",
        help="A setting of the app (repeatable); `sagaline describe` lists them.",
    ),
]


def _app_settings(pairs: Sequence[str] | None) -> dict[str, str]:
    """``--set NAME=VALUE`` options as settings, checked against those the app declares."""
    settings: dict[str, str] = {}
    declared = current_app().settings
    for pair in pairs or ():
        name, equals, value = pair.partition("=")
        name = name.strip()
        if not equals or not name:
            _fail(f"--set: {_quoted(pair)} is not NAME=VALUE", 2)
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            _fail(f"--set: the app has no setting {_quoted(name)}; it has: {_inert(known)}", 2)
        settings[name] = value
    return settings


def _system(settings: Mapping[str, str]) -> System:
    """The app's system built with ``settings``; a setting it refuses is exit status 2."""
    try:
        return current_app().system(settings)
    except (ConfigurationError, ValueError) as exc:
        _fail(f"--set: {_inert(exc)}", 2)


def _serve_in_process(
    store: str,
    bus: str | None,
    names: list[str],
    *,
    settings: Mapping[str, str],
    batch_size: int,
    lease_seconds: float | None,
    title: str,
    instance: tuple[int, int] | None = None,
    member: str | None = None,
) -> None:
    """Run ``names`` in this process until SIGINT or SIGTERM; in-flight batches finish first."""
    system = _system(settings)
    _configure_logging(logging.INFO)
    shown = redact_url(store) + (f" with bus {redact_url(bus)}" if bus else "")

    async def serve(deployment: Deployment) -> int:
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
        str | None,
        typer.Option(
            "--services",
            metavar="NAMES",
            help="Comma-separated services to run in this process (default: all of the app's).",
        ),
    ] = None,
    set_: SetOption = None,
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
        settings=_app_settings(set_),
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


def _child_options(
    settings: Mapping[str, str], batch_size: int, lease_seconds: float | None
) -> list[str]:
    extra = ["--batch-size", str(batch_size)]
    for name, value in settings.items():
        extra += ["--set", f"{name}={value}"]
    if lease_seconds is not None:
        extra += ["--lease-seconds", str(lease_seconds)]
    return extra


@app.command()
def serve(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="One of the app's services.")],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    instances: Annotated[
        int,
        typer.Option(
            "--instances", min=1, max=64, help="Processes of this service, competing for work."
        ),
    ] = 1,
    set_: SetOption = None,
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
    settings = _app_settings(set_)
    _system(settings)
    if instances == 1:
        _serve_in_process(
            store,
            bus,
            names,
            settings=settings,
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            title="serve",
            instance=_parse_instance(instance),
            member=member,
        )
        return
    extra = _child_options(settings, batch_size, lease_seconds)
    _supervise(
        {
            f"{names[0]}-{n}": serve_argv(
                names[0], extra, (n, instances), _member(f"{names[0]}-{n}")
            )
            for n in range(1, instances + 1)
        },
        f"serve {names[0]}",
        _child_environment(store, bus),
    )


@app.command()
def up(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    instances: Annotated[
        int, typer.Option("--instances", min=1, max=64, help="Processes per service.")
    ] = 1,
    set_: SetOption = None,
    batch_size: BatchOption = DEFAULT_BATCH,
    lease_seconds: LeaseOption = None,
) -> None:
    """Run every service of the app as its own process; a crashed one is restarted; Ctrl-C
    stops all."""
    _check_urls(store, bus)
    settings = _app_settings(set_)
    _system(settings)
    # Create every schema once, before the processes race to do it (waiting for the servers).
    _with(store, bus, _prepare, must_exist=None, wait_for_servers=True)
    extra = _child_options(settings, batch_size, lease_seconds)
    _supervise(
        {
            f"{service}-{n}": serve_argv(service, extra, (n, instances), _member(f"{service}-{n}"))
            for service in current_app().services
            for n in range(1, instances + 1)
        },
        "up",
        _child_environment(store, bus),
    )


def _child_environment(store: str, bus: str | None) -> dict[str, str]:
    """The environment of a supervised process: the URLs, and the app it runs."""
    env = url_environment(store, bus)
    env[APP_ENV] = _settings.app_spec or find_app()
    return env


def _member(slot: str) -> str:
    """The lease name of a supervised process: this host and supervisor, and its slot (the same
    for the process that replaces it after a crash, and for no other live process)."""
    return f"{socket.gethostname()}-{os.getpid()}-{slot}"


async def _prepare(deployment: Deployment) -> None:
    """Create the stores' schemas and the bus's topology for the whole system."""
    if deployment.bus is not None:
        system = current_app().default
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
        f"migrated the stores of {', '.join(current_app().services)} on"
        f" {_inert(redact_url(store))}"
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
        system = current_app().default
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


@app.command()
def submit(
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="Commands in the seed's JSON: one document, a JSON array of them, or JSON Lines"
            " (one per line); - reads stdin.",
        ),
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
            " message under a used id is refused. For one document only.",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print no message ids (a summary only).")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar on stderr (default: when stderr is a terminal).",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Put commands a client may submit onto the bus; prints their message ids, one per line.

    Every command is checked before any is written: one that is invalid, internal to the
    system, or an event fails the whole input (exit 2, naming its line or index and the field).
    Then they are submitted in batches of 1,000.
    """
    _submit_documents(file, store, bus, message_id, quiet, progress, json_output)


def _submit_documents(
    file: str,
    store: str,
    bus: str | None,
    message_id: str | None,
    quiet: bool,
    progress: bool | None,
    json_output: bool,
) -> None:
    _check_urls(store, bus)
    try:
        data = read_input(file)
    except OSError as exc:
        _fail(f"cannot read {_inert(file)}: {_inert(exc.strerror or exc)}", 2)
    except InvalidMessage as exc:
        _fail(_inert(exc), 2)
    system = current_app().default
    # Validate everything before the store is even opened: a bad input leaves no trace.
    try:
        commands = check_submittable(system, parse_documents(data, types=system.registry))
        if message_id is not None:
            check_message_id(message_id)
    except DocumentProblem as exc:
        where = f"{_inert(exc.position)}: " if exc.position else ""
        if isinstance(exc.error, InvalidMessage):
            _fail(where + _describe_invalid(exc.error), 2)
        _fail(f"{where}refused: {_inert(exc.error)}", 2)
    except InvalidMessage as exc:
        _fail(_describe_invalid(exc), 2)
    single = len(commands) == 1
    if message_id is not None and not single:
        _fail(
            f"--message-id names one message, and {_inert(file)} holds {len(commands)}:"
            " submit them without it",
            2,
        )
    show_progress = not single and (progress if progress is not None else err.is_terminal)
    submitted: list[Envelope] = []

    async def send(deployment: Deployment) -> None:
        # A broker refuses a command no queue is bound for yet: declare them first.
        await deployment.prepare_bus(system)
        with Progress(
            TextColumn("submitting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("commands"),
            TimeElapsedColumn(),
            console=err,
            disable=not show_progress,
        ) as bar:
            task = bar.add_task("submit", total=len(commands))

            def done(envelopes: list[Envelope]) -> None:
                submitted.extend(envelopes)
                bar.advance(task, len(envelopes))
                if not (single or quiet or json_output):
                    sys.stdout.write("".join(f"{e.message_id}\n" for e in envelopes))
                    sys.stdout.flush()

            await submit_in_batches(
                system,
                deployment.entry,
                commands,
                batch_size=DEFAULT_SUBMIT_BATCH,
                message_ids=[message_id] if message_id is not None else None,
                on_batch=done,
            )

    # A separate bus needs no store: only the bus is opened. A bus URL equal to the store's is
    # the store's own database (as without one): then the stores hold the bus.
    separate = bus is not None and bus != store
    try:
        _with(store, bus, send, must_exist=None, services=() if separate else None)
    finally:
        if submitted and not single and len(submitted) < len(commands):
            err.print(
                f"[bold red]only {len(submitted)} of {len(commands)} commands were submitted[/]"
                " (their ids are printed); the others were not",
                soft_wrap=True,
            )
    summaries = [
        {"messageId": e.message_id, "type": e.message_type, "correlationId": e.correlation_id}
        for e in submitted
    ]
    if json_output:
        _emit_json(summaries[0] if single else summaries)
    elif single and not quiet:
        out.print(submitted[0].message_id)
    if not single:
        err.print(f"submitted {len(submitted)} commands", soft_wrap=True)


@app.command()
def trace(
    key: Annotated[
        str, typer.Argument(metavar="ID", help="The business key: a transaction's correlation id.")
    ],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """The audit trail of one transaction: every command and event as a causal tree, its saga."""
    keepers = current_app().default.saga_services()

    async def query(deployment: Deployment) -> TransactionTrace:
        return _load_trace(deployment, key, keepers)

    found = _with(store, bus, query, read_only=True)
    if not found.found:
        _fail(f"nothing is known about {_quoted(key)}", 1)
    if json_output:
        _emit_json(found.to_json())
        return
    _print_trace(found)
    if found.saga is not None:
        out.print(_history_table(found.saga))
    if found.dead_letters:
        out.print(_dead_letter_table([dead_letter_summary(d) for d in found.dead_letters]))


def _load_trace(
    deployment: Deployment, key: str, keepers: Sequence[str] | None = None
) -> TransactionTrace:
    """The audit trail of ``key`` with its saga: the first instance found of one of the app's
    sagas, in the store of a service that keeps saga instances."""
    app = current_app()
    sources = _all_queries(deployment)
    keepers = app.default.saga_services() if keepers is None else keepers
    found: TransactionTrace | None = None
    for definition in app.sagas.values():
        for keeper in keepers:
            found = load_trace(
                sources, key, saga_id(definition, key), saga_store=_queries(deployment, keeper)
            )
            if found.saga is not None:
                return found
    return found if found is not None else load_trace(sources, key)


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
    registry = current_app().registry
    if type_name is None:
        _emit_json({name: json_schema(registry.get(name)) for name in registry.names()})
        return
    try:
        cls = registry.get(type_name)
    except UnknownMessageType:
        _fail(f"unknown message type {_quoted(type_name)}; known: {', '.join(registry.names())}", 2)
    _emit_json(json_schema(cls))


@app.command()
def describe(
    name: Annotated[
        str | None, typer.Argument(metavar="SAGA", help="A saga's name; every saga when left out.")
    ] = None,
    mermaid: Annotated[
        bool, typer.Option("--mermaid", help="Print only the saga's Mermaid diagram.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Validate and show the system's sagas: steps, kinds, commands, compensations, diagram.

    Exits with 1 when a saga sends a command no service handles, 2 when one is not valid.
    """
    try:
        system = current_app().default
    except SagaDefinitionError as exc:
        _fail(f"invalid saga definition: {_inert(exc)}", 2)
    definitions = {definition.name: definition for definition in sagas_of(system)}
    known = ", ".join(definitions) or "none"
    if name is not None and name not in definitions:
        _fail(f"unknown saga {_quoted(name)}; known: {_inert(known)}", 2)
    wanted = [definitions[name]] if name is not None else list(definitions.values())
    if mermaid and len(wanted) != 1:
        _fail(f"--mermaid draws one saga: name it (known: {_inert(known)})", 2)
    described = [describe_saga(definition, system) for definition in wanted]
    if mermaid:
        sys.stdout.write(described[0].mermaid + "\n")
    elif json_output:
        _emit_json(described[0].to_json() if name is not None else [d.to_json() for d in described])
    else:
        for saga in described:
            out.print(_saga_table(saga))
            if name is not None:
                out.print(f"[bold]Mermaid[/] (sagaline describe {_inert(saga.name)} --mermaid):")
                for line in saga.mermaid.splitlines():
                    out.print(_inert(line), soft_wrap=True)
        if not described:
            out.print("the system has no sagas")
    problems = [problem for saga in described for problem in saga.problems]
    for problem in problems:
        err.print(f"[bold red]problem:[/] {_inert(problem)}", soft_wrap=True)
    if problems:
        raise typer.Exit(1)


def _saga_table(saga: SagaDescription) -> Table:
    """One saga's steps as a table, its start and outcome in the title and caption."""
    title = f"saga {_inert(saga.name)} v{saga.version}" + (
        f": {_inert(saga.description)}" if saga.description else ""
    )
    table = Table(
        title=title,
        title_justify="left",
        caption=f"starts on {_inert(saga.start)}, correlated by {_inert(saga.correlation_field)};"
        f" on completion: {_inert(saga.on_completed or 'nothing published')}",
        caption_justify="left",
    )
    for column in ("#", "step", "kind", "command", "success", "failures", "compensation"):
        # Names are folded, never cut: a cut name would not say which message it is.
        table.add_column(column, overflow="fold")
    for position, step in enumerate(saga.steps, 1):
        undo = ""
        if step.compensation is not None:
            undo = f"{_inert(step.compensation)}\n{_arrow()} {_inert(step.compensated or '?')}"
            if step.compensate_on_failure:
                undo += "\n(also when the step fails)"
        table.add_row(
            str(position),
            _inert(step.name),
            _inert(step.kind),
            _inert(step.command) if step.command else "[dim](the start event)[/]",
            _cell(step.success),
            "\n".join(_inert(failure) for failure in step.failures),
            undo,
        )
    return table


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

    keepers = current_app().default.saga_services()
    if not keepers:
        _fail("the app keeps no sagas", 1)

    async def query(deployment: Deployment) -> tuple[list[dict[str, Any]], dict[str, int]]:
        rows: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        for db in {id(q): q for q in (_queries(deployment, k) for k in keepers)}.values():
            rows += [saga_summary(record) for record in db.list_sagas(wanted)]
            for name, count in db.saga_counts().items():
                counts[name] = counts.get(name, 0) + count
        return rows, counts

    rows, counts = _with(store, bus, query, must_exist=keepers[0], services=keepers, read_only=True)
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
def rebuild(
    name: Annotated[
        str | None,
        typer.Argument(metavar="PROJECTION", help="Which read model (default: the app's first)."),
    ] = None,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
) -> None:
    """Rebuild a read model from the event log; queries go on meanwhile."""
    app_ = current_app()
    if not app_.projections:
        _fail("the app has no projection to rebuild", 1)
    try:
        projection = app_.projection(name) if name is not None else app_.projections[0]
    except ConfigurationError as exc:
        _fail(_inert(exc), 2)
    service = projection.name

    async def go(deployment: Deployment) -> tuple[str, int, int]:
        db = deployment.store(service)
        queries = _queries(deployment, service)
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

    namespace, count, position = _with(store, bus, go, services=[service])
    out.print(
        f"rebuilt {_inert(namespace)}: {count} rows from the event log up to position {position}",
        soft_wrap=True,
    )


# ------------------------------------------------------------ for an app's own commands
# An app's commands (App.commands) use these, so that they take the same options, open
# deployments the same way and look and fail like sagaline's own commands.

#: Open the deployment, do the work with it, close it (see :func:`_with`).
with_deployment = _with
#: Print an error (already inert markup) on stderr and exit with a status.
fail = _fail
#: Untrusted text made inert for the terminal; quoted as a literal.
inert, quoted = _inert, _quoted
#: JSON on stdout; a table cell; a status in its colour.
emit_json, cell, styled_status = _emit_json, _cell, _styled_status
#: The query tools of one service's store; of every store (and a database bus).
queries, all_queries = _queries, _all_queries
#: A transaction's causal tree, with notes for its first line; a saga's trace.
print_trace, load_transaction = _print_trace, _load_trace
#: Exit with a clear error unless the URLs are supported; errors as messages and exit codes.
check_urls, errors = _check_urls, _errors
#: The command line's own options (``settings.connect_timeout``).
settings = _settings


def _app_option(argv: Sequence[str]) -> str | None:
    """The value of ``--app`` among the options before the command, if given there."""
    for index, arg in enumerate(argv):
        if arg == "--app" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--app="):
            return arg.partition("=")[2]
        if not arg.startswith("-"):
            return None  # the command: its own options follow
    return None


def main() -> None:
    """Run the ``sagaline`` command line, with the commands of the app it works on."""
    try:
        loaded = _use_app(find_app(_app_option(sys.argv[1:])))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ConfigurationError as exc:
        err.print(f"[bold red]error:[/] --app: {_inert(exc)}", soft_wrap=True)
        sys.exit(2)
    commands = loaded.commands
    if isinstance(commands, str):
        module, _, attribute = commands.partition(":")
        commands = getattr(importlib.import_module(module), attribute or "commands")
    if commands is not None:
        app.add_typer(commands)
    app(prog_name="sagaline")
