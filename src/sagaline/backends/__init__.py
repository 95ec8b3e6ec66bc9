"""Adapters, one module per technology, chosen by URL scheme and imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagaline.errors import ConfigurationError

if TYPE_CHECKING:
    from sagaline.ports import Backend, BrokerBus

__all__ = ["BUS_SCHEMA", "open_backend", "open_bus"]


def open_backend(url: str) -> Backend:
    """The store-and-bus backend a URL names (``sqlite:///path``, ``postgresql://...``).

    Call ``await backend.open()`` before use: a PostgreSQL backend connects and migrates its
    schemas there (it would also do so on first use); for SQLite it does nothing more.
    """
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        from sagaline.backends.sqlite import SqliteDatabase

        return SqliteDatabase(url)
    if scheme in ("postgresql", "postgres"):
        from sagaline.backends.postgres import PostgresDatabase

        return PostgresDatabase(url)
    raise ConfigurationError(
        f"no backend for URL scheme {scheme!r}; this version supports sqlite:///path"
        " and postgresql://user@host:port/dbname"
    )


#: The schema of a PostgreSQL bus that serves stores in other databases or schemas.
BUS_SCHEMA = "sagaline_bus"


def open_bus(url: str, **options: Any) -> BrokerBus:
    """The bus a URL names, not yet connected (``await bus.open()``, or on first use).

    ``amqp://user:pass@host:5672/vhost`` (RabbitMQ), ``nats://host:4222`` (NATS JetStream),
    or a database bus for stores elsewhere: ``sqlite:///bus.db``, ``postgresql://...`` (schema
    ``sagaline_bus``). A broker URL may carry ``?prefix=NAME`` to name its exchanges, queues and
    streams apart from other systems on the same server, and a RabbitMQ URL ``?bundle=N``, the
    most messages one AMQP message carries (``bundle=1``: one each; see
    ``sagaline.backends.bundles``).
    ``instance=(i, n)`` tells a RabbitMQ bus that this process is instance i of n of its
    services (see :class:`RabbitBus`); other buses ignore it. ``connect_timeout`` (seconds)
    bounds how long opening a server's bus waits for it; a SQLite bus ignores it.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme != "amqp" and scheme != "amqps":
        # Only RabbitMQ needs to know its instance (the others share partitions by themselves).
        options = {k: v for k, v in options.items() if k != "instance"}
    if scheme == "sqlite":
        options = {k: v for k, v in options.items() if k != "connect_timeout"}
    if scheme == "sqlite":
        from sagaline.backends.sqlite import SqliteDatabase

        return SqliteDatabase(url, **options)
    if scheme in ("postgresql", "postgres"):
        from sagaline.backends.postgres import PostgresDatabase

        return PostgresDatabase(url, schema=BUS_SCHEMA, **options)
    if scheme in ("amqp", "amqps", "nats"):
        url, prefix = _take_prefix(url)
        if prefix:
            options = {"prefix": prefix, **options}
        if scheme != "nats":
            url, bundle = _take_query(url, "bundle")
            if bundle is not None:
                if not bundle.isdigit():
                    raise ConfigurationError(f"bundle={bundle!r}: a whole number is expected")
                options = {"bundle": int(bundle), **options}
        if scheme == "nats":
            from sagaline.backends.nats import NatsBus

            return NatsBus(url, **options)
        from sagaline.backends.rabbitmq import RabbitBus

        return RabbitBus(url, **options)
    raise ConfigurationError(
        f"no bus for URL scheme {scheme!r}; buses are amqp://user:pass@host/vhost,"
        " nats://host:4222, sqlite:///path and postgresql://user@host:port/dbname"
    )


def _take_query(url: str, parameter: str) -> tuple[str, str | None]:
    """Split the query parameter ``parameter`` off a URL: the rest of the URL, and its value."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    value = next((value for name, value in pairs if name == parameter), None)
    if value is None:
        return url, None
    rest = urlencode([(name, value) for name, value in pairs if name != parameter])
    return urlunsplit(parts._replace(query=rest)), value


def _take_prefix(url: str) -> tuple[str, str | None]:
    """Split a ``prefix=NAME`` query parameter off a broker URL."""
    url, prefix = _take_query(url, "prefix")
    if prefix is not None and (
        not prefix or not prefix.replace("_", "").replace("-", "").isalnum()
    ):
        raise ConfigurationError("a bus prefix may hold letters, digits, '_' and '-' only")
    return url, prefix
