"""Settings read from ``SAGALINE_*`` environment variables, and URLs made safe to show.

A store or bus URL may carry a password (``postgresql://app:secret@db/shop``,
``amqp://app:secret@mq/vhost``). It is handed to child processes through the environment, never
on their command line, and every URL that reaches a log record, an error message or the CLI's
output goes through :func:`redact_url` (or, for a driver's message that may quote the URL or its
password, :func:`redact`).

The scheme registry
-------------------

A URL's scheme picks its adapter from one table, :data:`ADAPTERS`: one row (an
:class:`Adapter`) per technology, naming its schemes, whether it offers stores, a bus or both,
the module and function that open them, and what to install for its driver. The module is
imported only when a URL with that scheme is opened, so ``import sagaline`` never loads a
driver, and a missing driver fails with :class:`MissingDriver` naming the extra to install.
:class:`~sagaline.deploy.Deployment`, :func:`~sagaline.backends.open_bus`,
:func:`~sagaline.backends.open_backend` and the CLI find adapters here and nowhere else.

A third-party adapter registers itself with one call, made when its package is imported::

    from sagaline.config import register_scheme

    register_scheme(
        "redis", "rediss",
        title="Redis Streams",
        bus="sagaline_redis:open_redis_bus",
        install="sagaline-redis",
        drivers=("redis",),
        errors=("redis.exceptions:RedisError",),
        example="redis://host:6379/0",
    )

and becomes available by URL once its package is imported, or without any import if it
declares an entry point in the ``sagaline.adapters`` group naming that package (looked up the
first time an unknown scheme is met). The factories it names are called as:

* ``store(url, *, service, outbox, colocated_bus, connect_timeout, clock, **options)``: the store
  of ``service`` (None: a standalone backend, as :func:`~sagaline.backends.open_backend`
  opens), where ``url`` has ``{service}`` already filled in; ``outbox``: its messages leave
  through another bus (a relay publishes them); ``colocated_bus``: the bus lives in the same
  database. It returns a :class:`~sagaline.ports.Database` (a store that is also a bus, with
  its outbox, query tools, metadata and idleness).
* ``bus(url, *, connect_timeout, instance, clock, **options)``: a
  :class:`~sagaline.ports.BrokerBus` not yet connected; ``instance=(i, n)`` says this process
  is instance i of n of its services. A factory ignores the options it has no use for.

``clock`` (a :class:`~sagaline.clock.Clock`) is what the adapter reads leases, retry due times
and membership intervals from; it is passed only when it is not the machine's
(:data:`~sagaline.clock.SYSTEM_CLOCK`, every factory's default), so a factory that does not
know the option yet still opens on the machine's clock.

* ``reset(url, *, service, colocated_bus, mark, delete, connect_timeout)``, for a database
  (optional): awaited, it says whether the data at ``url`` may be deleted to start afresh (it
  carries the metadata mark ``mark``, holds no data yet, or does not exist) and, when it may and
  ``delete``, deletes it. ``service`` and ``colocated_bus`` are as for ``store``; ``service``
  None means the database used as a bus for stores elsewhere. It returns False, leaving
  everything as it was, when the data may not be deleted
  (:meth:`~sagaline.deploy.Deployment.reset`).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from sagaline.errors import ConfigurationError

__all__ = [
    "ADAPTERS",
    "BUS_URL_ENV",
    "CONNECT_TIMEOUT_ENV",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LEASE_SECONDS",
    "STORE_URL_ENV",
    "Adapter",
    "MissingDriver",
    "Role",
    "adapter_for",
    "redact",
    "redact_url",
    "register_scheme",
    "scheme_of",
    "schemes_for",
]

#: The store URL (``--store``).
STORE_URL_ENV = "SAGALINE_STORE_URL"
#: The bus URL (``--bus``).
BUS_URL_ENV = "SAGALINE_BUS_URL"
#: Seconds a one-shot command (``--connect-timeout``) waits for its database or broker before it
#: gives up; long-running services wait as long as it takes.
CONNECT_TIMEOUT_ENV = "SAGALINE_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: How long a claim, a partition lease or a membership lasts without renewal, on every backend
#: that leases (``--lease-seconds``): after a crash, another process takes the work over then.
DEFAULT_LEASE_SECONDS = 10.0

_SECRET_PARAMETER = re.compile(r"pass|secret|token|key", re.IGNORECASE)
_MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with its password (and any password-like query parameter) masked.

    ``postgresql://app:secret@db/shop?password=x`` shows as
    ``postgresql://app:***@db/shop?password=***``; a URL without secrets is returned unchanged.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    # Edit the text in place: urlunsplit would rewrite ``sqlite:///x`` as ``sqlite:/x``.
    redacted = url
    if password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        redacted = redacted.replace(parts.netloc, f"{user}:{_MASK}@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_PARAMETER.search(name) for name, _ in pairs):
            masked = urlencode(
                [(n, _MASK if _SECRET_PARAMETER.search(n) else v) for n, v in pairs], safe="*"
            )
            redacted = redacted.replace(f"?{parts.query}", f"?{masked}", 1)
    return redacted


def _secrets(url: str) -> list[str]:
    """The secrets a URL carries, as written and decoded, longest first."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [
            value
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            if _SECRET_PARAMETER.search(name)
        ]
        found.append(parts.netloc.rpartition("@")[0].partition(":")[2])
    except ValueError:
        return []
    found += [unquote(value) for value in found]
    return sorted({value for value in found if value}, key=len, reverse=True)


def redact(text: str, *urls: str | None) -> str:
    """``text`` (a driver's error message, say) with each URL and its secrets masked."""
    for url in urls:
        if not url:
            continue
        # The URL shows redacted (as it does where it already is); its secrets are masked
        # wherever else they appear.
        shown = redact_url(url)
        pieces = re.split(f"({re.escape(url)}|{re.escape(shown)})", text)
        for secret in _secrets(url):
            pieces[::2] = [piece.replace(secret, _MASK) for piece in pieces[::2]]
        pieces[1::2] = [shown] * len(pieces[1::2])
        text = "".join(pieces)
    return text


# ------------------------------------------------------------------------------ scheme registry

#: What an adapter offers: the stores of services, a bus between them, or both.
Role = Literal["store", "bus"]

#: The entry-point group a third-party adapter may declare to be found by its scheme.
ENTRY_POINT_GROUP = "sagaline.adapters"


class MissingDriver(ConfigurationError):
    """A URL names an adapter whose driver is not installed; the message names the extra."""

    code = "missing_driver"


@dataclass(frozen=True)
class Adapter:
    """One row of the scheme registry: a technology, its URL schemes and how to open it.

    ``store`` and ``bus`` are ``"package.module:function"`` references, imported only when a
    URL of one of ``schemes`` is opened (see the module docstring for their signatures).
    ``drivers``: the top-level modules of the driver, which ``pip install INSTALL`` installs
    (``install``: a requirement, such as ``sagaline[postgres]``, a bundled adapter's extra);
    ``store_per_service``: each service gets its own store object on one URL (its own schema);
    otherwise services whose URLs are the same share one store (one SQLite file). ``broker``:
    a message broker whose bus declares queues and streams, which ``sagaline teardown``
    deletes (its bus is a :class:`~sagaline.backends.BrokerTopology`). ``errors``: the base
    classes of what the driver raises once connected, as ``"module:Name"`` references, which
    the command line reports as one line rather than a traceback (see :meth:`error_types`).
    ``reset``: the function that deletes a database's data when it is marked resettable (see
    the module docstring); a broker has none. ``file``: for a database in a local file, the
    function that gives a URL's path (and raises :class:`ConfigurationError` for a malformed
    URL), so that queries can refuse to create an empty store. ``options``: the keyword options
    only this adapter's factories take (SQLite's ``read_only`` and ``adopt``), which the
    command line passes to it alone.
    """

    schemes: tuple[str, ...]
    title: str
    example: str
    store: str | None = None
    bus: str | None = None
    install: str | None = None
    drivers: tuple[str, ...] = ()
    store_per_service: bool = False
    broker: bool = False
    errors: tuple[str, ...] = ()
    reset: str | None = None
    file: str | None = None
    options: tuple[str, ...] = ()

    def file_of(self, url: str) -> str | None:
        """The local file a URL of this adapter names (checking the URL), or None when its
        databases are not local files."""
        if self.file is None:
            return None
        path: str = self._load(self.file, url)(url)
        return path

    def error_types(self) -> tuple[type[Exception], ...]:
        """The driver's error classes that ``errors`` names, from modules already imported:
        a driver not in use is not imported for them (nothing of it can have been raised)."""
        found: list[type[Exception]] = []
        for reference in self.errors:
            module_name, _, name = reference.partition(":")
            module = sys.modules.get(module_name)
            error = getattr(module, name, None) if module is not None else None
            if isinstance(error, type) and issubclass(error, Exception):
                found.append(error)
        return tuple(found)

    def provides(self, role: Role) -> bool:
        """Whether this adapter opens stores (``"store"``) or a bus (``"bus"``)."""
        return (self.store if role == "store" else self.bus) is not None

    def factory(self, role: Role, url: str) -> Callable[..., Any]:
        """The function that opens a ``role`` for ``url``, its module imported now.

        Raises :class:`MissingDriver` when the driver is not installed, naming the extra.
        """
        reference = self.store if role == "store" else self.bus
        if reference is None:
            raise ConfigurationError(
                f"{self.title} ({self.schemes[0]}://) offers no {role}: {_choices(role)}"
            )
        return self._load(reference, url)

    def resetter(self, url: str) -> Callable[..., Any]:
        """The function that resets a database of this adapter at ``url`` (see the module
        docstring), its module imported now; a :class:`ConfigurationError` when it has none."""
        if self.reset is None:
            raise ConfigurationError(
                f"the data of {self.title} ({self.schemes[0]}://) cannot be reset by sagaline"
            )
        return self._load(self.reset, url)

    def _load(self, reference: str, url: str) -> Callable[..., Any]:
        module_name, _, name = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = (exc.name or "").partition(".")[0]
            if missing not in self.drivers:
                raise
            raise MissingDriver(
                f"the URL {redact_url(url)} needs the {self.title} driver ({missing}),"
                f" which is not installed: pip install '{self.install or missing}'"
            ) from exc
        found: Callable[..., Any] = getattr(module, name)
        return found


#: The scheme registry: each scheme to its adapter (several schemes may share a row).
ADAPTERS: dict[str, Adapter] = {}


def register_scheme(
    *schemes: str,
    title: str,
    example: str,
    store: str | None = None,
    bus: str | None = None,
    install: str | None = None,
    drivers: tuple[str, ...] = (),
    store_per_service: bool = False,
    broker: bool = False,
    errors: tuple[str, ...] = (),
    replace: bool = False,
    reset: str | None = None,
    file: str | None = None,
    options: tuple[str, ...] = (),
) -> Adapter:
    """Make URLs of ``schemes`` open the adapter whose factories ``store``/``bus`` name.

    A scheme already registered to another adapter is refused unless ``replace``.
    """
    if not schemes:
        raise ConfigurationError("register_scheme needs at least one scheme")
    if store is None and bus is None:
        raise ConfigurationError(f"the adapter {title!r} opens neither a store nor a bus")
    adapter = Adapter(
        tuple(scheme.lower() for scheme in schemes),
        title,
        example,
        store,
        bus,
        install,
        drivers,
        store_per_service,
        broker,
        errors,
        reset,
        file,
        options,
    )
    for scheme in adapter.schemes:
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            raise ConfigurationError(f"{scheme!r} is not a URL scheme")
        known = ADAPTERS.get(scheme)
        if known is not None and known != adapter and not replace:
            raise ConfigurationError(f"the scheme {scheme}:// is already {known.title}'s")
    for scheme in adapter.schemes:
        ADAPTERS[scheme] = adapter
    return adapter


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased (``sqlite``, ``postgresql``, ``amqp``, ``nats``)."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigurationError("a store or bus URL must have a scheme, e.g. sqlite:///file.db")
    return scheme.lower()


def schemes_for(role: Role) -> list[str]:
    """The registered schemes whose adapter offers ``role``, in registration order."""
    return [scheme for scheme, adapter in ADAPTERS.items() if adapter.provides(role)]


def adapter_for(url: str, role: Role) -> Adapter:
    """The adapter that opens a ``role`` (store or bus) for ``url``.

    An unknown scheme is looked up once among the ``sagaline.adapters`` entry points; a scheme
    nobody registered, or whose adapter does not offer ``role``, is a
    :class:`~sagaline.errors.ConfigurationError` listing what is supported.
    """
    scheme = scheme_of(url)
    if scheme not in ADAPTERS:
        _load_entry_points()
    adapter = ADAPTERS.get(scheme)
    if adapter is None or not adapter.provides(role):
        raise ConfigurationError(f"no {role} for URL scheme {scheme!r}: {_choices(role)}")
    return adapter


_entry_points_loaded = False


def _load_entry_points() -> None:
    """Import the packages that declare themselves adapters (they call register_scheme)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        point.load()


def _choices(role: Role) -> str:
    """What a ``role`` URL may be, one example per adapter."""
    examples = dict.fromkeys(
        adapter.example for adapter in ADAPTERS.values() if adapter.provides(role)
    )
    return f"{role}s are " + ", ".join(examples)


# The adapters sagaline ships. The SQLite one needs nothing beyond Python; the others' drivers
# are extras (``pip install 'sagaline[postgres,rabbitmq,nats]'``, or ``sagaline[all]``).
register_scheme(
    "sqlite",
    title="SQLite",
    example="sqlite:///path/to/file.db",
    store="sagaline.backends.sqlite:open_store",
    bus="sagaline.backends.sqlite:open_bus",
    errors=("sqlite3:Error",),
    reset="sagaline.backends.sqlite.files:reset",
    file="sagaline.backends.sqlite.rows:path_from_url",
    options=("read_only", "adopt"),
)
register_scheme(
    "postgresql",
    "postgres",
    title="PostgreSQL",
    example="postgresql://user@host:port/dbname",
    store="sagaline.backends.postgres:open_store",
    bus="sagaline.backends.postgres:open_bus",
    install="sagaline[postgres]",
    drivers=("psycopg", "psycopg_pool", "psycopg_binary"),
    store_per_service=True,
    errors=("psycopg:Error",),
    reset="sagaline.backends.postgres.disposal:reset",
)
register_scheme(
    "amqp",
    "amqps",
    title="RabbitMQ",
    example="amqp://user:pass@host:5672/vhost",
    bus="sagaline.backends.rabbitmq:open_bus",
    install="sagaline[rabbitmq]",
    drivers=("aio_pika", "aiormq", "pamqp"),
    broker=True,
    errors=("aiormq:AMQPError",),
)
register_scheme(
    "nats",
    title="NATS JetStream",
    example="nats://host:4222",
    bus="sagaline.backends.nats:open_bus",
    install="sagaline[nats]",
    drivers=("nats",),
    broker=True,
    errors=("nats.errors:Error",),
)
