"""What every command shares: the typer app and its options, the app loaded, logging, and
deployments opened (and their errors reported) the same way."""

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sagaline.app import APP_ENV, App, find_app, load_app
from sagaline.cli.render import describe_invalid, fail, inert
from sagaline.config import (
    ADAPTERS,
    BUS_URL_ENV,
    CONNECT_TIMEOUT_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LEASE_SECONDS,
    STORE_URL_ENV,
    Role,
    adapter_for,
    redact,
    redact_url,
    schemes_for,
)
from sagaline.deploy import Deployment, service_url
from sagaline.errors import (
    BusUnavailable,
    ConfigurationError,
    InvalidMessage,
    MessageRefused,
    NotAStore,
    SagalineError,
    StoreUnavailable,
)
from sagaline.observability import strip_control

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
        use_app(find_app())
    assert _settings.app is not None
    return _settings.app


def use_app(spec: str) -> App:
    try:
        loaded = load_app(spec)
    except ConfigurationError as exc:
        fail(f"--app: {inert(exc)}", 2)
    _settings.app, _settings.app_spec = loaded, spec
    return loaded


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


def check_urls(store: str, bus: str | None) -> None:
    """Exit with a clear error unless ``store`` and ``bus`` are URLs sagaline supports."""
    roles: tuple[tuple[str | None, Role], ...] = ((store, "store"), (bus, "bus"))
    for url, kind in roles:
        if url is None:
            continue
        shown = inert(redact_url(url))
        try:
            adapter = adapter_for(url, kind)
        except ConfigurationError:
            fail(
                f"unsupported {kind} URL {shown}: use "
                + ", ".join(f"{name}://" for name in schemes_for(kind)),
                2,
            )
        try:
            adapter.file_of(url)
        except SagalineError as exc:
            fail(inert(exc), 2)


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
    check_urls(store, bus)
    shown = inert(redact_url(store))
    if must_exist is not None:
        path = adapter_for(store, "store").file_of(service_url(store, must_exist))
        if path is not None and path != ":memory:" and not Path(path).exists():
            fail(f"no store at {inert(path)} (run `sagaline demo`, or pass --store URL)", 1)
    # Options some adapters take (SQLite's), passed to those alone.
    asked: dict[str, Any] = {"read_only": read_only, "adopt": adopt}
    options = _options_for(store, "store", asked)
    if lease_seconds is not None:
        options["lease_seconds"] = lease_seconds
    bus_options: dict[str, Any] = {"instance": instance} if instance is not None else {}
    if services is None:
        services = current_app().services
    if bus is not None:
        bus_options.update(_options_for(bus, "bus", asked))
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
        fail(inert(exc), 2)
    except StoreUnavailable as exc:
        fail(inert(redact(str(exc), store, bus)), 1)
    except _opening_errors() as exc:
        fail(f"cannot open the store {shown}: {inert(redact(str(exc), store, bus))}", 1)


def _options_for(url: str, role: Role, asked: dict[str, Any]) -> dict[str, Any]:
    """Of the options ``asked`` (those set), the ones the adapter of ``url`` takes."""
    accepted = adapter_for(url, role).options
    return {name: value for name, value in asked.items() if value and name in accepted}


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
    :class:`BusUnavailable`; these are what a driver may still raise once connected, as each
    adapter's row of the scheme registry names them (:attr:`~sagaline.config.Adapter.errors`)."""
    errors: list[type[Exception]] = [OSError]
    for adapter in dict.fromkeys(ADAPTERS.values()):
        errors.extend(adapter.error_types())
    return tuple(errors)


def _opening_errors() -> tuple[type[Exception], ...]:
    """What opening a deployment may raise that is reported as one line."""
    return (SagalineError, *_database_errors())


def with_deployment(
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
        fail(describe_invalid(exc), 2)
    except MessageRefused as exc:
        fail(f"refused: {inert(exc)}", 2)
    except SagalineError as exc:
        fail(inert(redact(str(exc), *urls)), 1)
    except _database_errors() as exc:
        fail(f"database error: {inert(redact(str(exc), *urls))}", 1)


def configure_logging(level: int) -> None:
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
            help="The app to work on (default: app in the tool.sagaline table of"
            " pyproject.toml, else the reference order system).",
        ),
    ] = None,
) -> None:
    _settings.connect_timeout = connect_timeout
    if _settings.app is None:
        use_app(find_app(app_spec))
    configure_logging(logging.WARNING)


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
        show_default=f"{DEFAULT_LEASE_SECONDS:g}",
    ),
]


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="NAME=VALUE",
        help="A setting of the app (repeatable); `sagaline describe` lists them.",
    ),
]


def app_option(argv: Sequence[str]) -> str | None:
    """The value of ``--app`` among the options before the command, if given there."""
    for index, arg in enumerate(argv):
        if arg == "--app" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--app="):
            return arg.partition("=")[2]
        if not arg.startswith("-"):
            return None  # the command: its own options follow
    return None
