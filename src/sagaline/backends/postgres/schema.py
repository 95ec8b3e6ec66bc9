"""The PostgreSQL schemas (a service's store and the bus), their versions, and migrations.

A service's own tables live in one schema; the bus tables (command queues, the event log, the
subscription cursors and members) in the bus schema, which may be the same one. Migrations are
idempotent and hold an advisory lock, so that several processes may run them at once.
"""

from __future__ import annotations

import math
import re
from typing import Any

import psycopg
from psycopg import AsyncConnection

from sagaline.backends._sql.constants import LEASE_SECONDS, MEMBERSHIP_INTERVAL, PARTITIONS
from sagaline.config import redact, redact_url
from sagaline.errors import ConfigurationError, StoreUnavailable

__all__ = [
    "LEASE_SECONDS",
    "MEMBERSHIP_INTERVAL",
    "PARTITIONS",
    "SCHEMA_VERSION",
    "Names",
    "cannot_connect",
    "connect",
    "migrate",
    "migrate_connection",
    "quote_schema",
    "redact_url",
    "validate_url",
]

#: The version of both schemas this code writes (2 added ``received``, 3 ``handling_starts``,
#: 4 ``timers``; an older schema is upgraded in place by creating what it lacks).
SCHEMA_VERSION = 4
#: The key of the advisory lock that serializes migrations across processes.
MIGRATION_LOCK = 0x5A6A11E
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def validate_url(url: str) -> str:
    """The URL itself when it is a PostgreSQL URL; ConfigurationError (without the URL) if not."""
    scheme = url.split(":", 1)[0]
    if scheme not in ("postgresql", "postgres") or not url.startswith(f"{scheme}://"):
        # The URL is not repeated: it may hold a password.
        raise ConfigurationError(
            "not a PostgreSQL URL (expected postgresql://user@host:port/dbname)"
        )
    return url


def quote_schema(name: str) -> str:
    """A schema name checked against identifier characters, double-quoted for SQL."""
    if not _IDENTIFIER.fullmatch(name):
        raise ConfigurationError(
            f"not a schema name: {name!r} (letters, digits and _, not starting with a digit)"
        )
    return f'"{name}"'


class Names:
    """The quoted, checked names of a store's schema and its bus schema."""

    __slots__ = ("bus", "bus_name", "channel", "store", "store_name")

    def __init__(self, schema: str, bus_schema: str | None = None) -> None:
        self.store_name = schema
        self.bus_name = bus_schema or schema
        self.store = quote_schema(self.store_name)
        self.bus = quote_schema(self.bus_name)
        #: The LISTEN/NOTIFY channel of the bus schema (payloads name the queue or the log).
        self.channel = f"sagaline.{self.bus_name}"


def _store_ddl(s: str) -> list[str]:
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.meta (
            key text PRIMARY KEY,
            value text NOT NULL)""",
        # The event store of event-sourced aggregates; ``position`` is the event's place in the
        # log (the bus's when co-located, this store's own otherwise), given at commit.
        f"""CREATE TABLE IF NOT EXISTS {s}.streams (
            stream text NOT NULL,
            version integer NOT NULL,
            position bigint,
            message_id text NOT NULL,
            type text NOT NULL,
            body text NOT NULL,
            correlation_id text NOT NULL,
            causation_id text,
            timestamp text NOT NULL,
            traceparent text,
            source text,
            PRIMARY KEY (stream, version))""",
        f"CREATE INDEX IF NOT EXISTS streams_position ON {s}.streams (position)",
        f"""CREATE TABLE IF NOT EXISTS {s}.stream_head (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            position bigint NOT NULL)""",
        f"INSERT INTO {s}.stream_head (id, position) VALUES (true, 0) ON CONFLICT DO NOTHING",
        f"""CREATE TABLE IF NOT EXISTS {s}.inbox (
            message_id text NOT NULL,
            consumer text NOT NULL,
            processed_at text NOT NULL,
            PRIMARY KEY (message_id, consumer))""",
        f"""CREATE TABLE IF NOT EXISTS {s}.handling_starts (
            message_id text NOT NULL,
            consumer text NOT NULL,
            starts integer NOT NULL,
            PRIMARY KEY (message_id, consumer))""",
        # JSON kept as text: jsonb would drop the scale of 75.50.
        f"""CREATE TABLE IF NOT EXISTS {s}.documents (
            namespace text NOT NULL,
            key text NOT NULL,
            data text NOT NULL,
            version integer NOT NULL,
            PRIMARY KEY (namespace, key))""",
        f"""CREATE TABLE IF NOT EXISTS {s}.sagas (
            saga_id text PRIMARY KEY,
            definition text NOT NULL,
            definition_version integer NOT NULL,
            status text NOT NULL,
            step integer NOT NULL,
            data text NOT NULL,
            version integer NOT NULL,
            created_at text NOT NULL,
            updated_at text NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS sagas_status ON {s}.sagas (status)",
        f"""CREATE TABLE IF NOT EXISTS {s}.saga_history (
            saga_id text NOT NULL,
            version integer NOT NULL,
            entry integer NOT NULL,
            data text NOT NULL,
            PRIMARY KEY (saga_id, version, entry))""",
        f"""CREATE TABLE IF NOT EXISTS {s}.dead_letters (
            id bigserial PRIMARY KEY,
            consumer text NOT NULL,
            message_id text NOT NULL,
            type text NOT NULL,
            body text NOT NULL,
            correlation_id text NOT NULL,
            causation_id text,
            timestamp text NOT NULL,
            source text,
            reason text NOT NULL,
            attempts integer NOT NULL,
            failed_at text NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.outbox (
            id bigserial PRIMARY KEY,
            message_id text NOT NULL,
            type text NOT NULL,
            body text NOT NULL,
            correlation_id text NOT NULL,
            causation_id text,
            timestamp text NOT NULL,
            traceparent text,
            source text,
            created_at text NOT NULL,
            sent_at text)""",
        f"CREATE INDEX IF NOT EXISTS outbox_unsent ON {s}.outbox (id) WHERE sent_at IS NULL",
        f"""CREATE TABLE IF NOT EXISTS {s}.received (
            message_id text PRIMARY KEY,
            type text NOT NULL,
            body text NOT NULL,
            correlation_id text NOT NULL,
            causation_id text,
            timestamp text NOT NULL,
            traceparent text,
            source text,
            consumer text NOT NULL,
            received_at text NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS received_correlation ON {s}.received (correlation_id)",
        f"""CREATE TABLE IF NOT EXISTS {s}.timers (
            timer_id text PRIMARY KEY,
            due_at double precision NOT NULL,
            message_id text NOT NULL,
            type text NOT NULL,
            body text NOT NULL,
            correlation_id text NOT NULL,
            causation_id text,
            timestamp text NOT NULL,
            traceparent text,
            source text)""",
        f"CREATE INDEX IF NOT EXISTS timers_due ON {s}.timers (due_at)",
        # One row: the relay that holds it publishes this store's outbox, and no other.
        f"""CREATE TABLE IF NOT EXISTS {s}.outbox_relay (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            owner text NOT NULL,
            expires double precision NOT NULL)""",
    ]


def _bus_ddl(b: str) -> list[str]:
    return [
        f"CREATE SCHEMA IF NOT EXISTS {b}",
        f"""CREATE TABLE IF NOT EXISTS {b}.meta (
            key text PRIMARY KEY,
            value text NOT NULL)""",
        # The log's head: appenders take this row's lock at commit, so positions are given in
        # commit order with no hole, and a reader past position p has seen everything up to p.
        f"""CREATE TABLE IF NOT EXISTS {b}.log_head (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            position bigint NOT NULL)""",
        f"INSERT INTO {b}.log_head (id, position) VALUES (true, 0) ON CONFLICT DO NOTHING",
        f"""CREATE TABLE IF NOT EXISTS {b}.events (
            position bigint PRIMARY KEY,
            stream text,
            version integer,
            message_id text NOT NULL UNIQUE,
            type text NOT NULL,
            body text NOT NULL,
            correlation_id text NOT NULL,
            causation_id text,
            timestamp text NOT NULL,
            traceparent text,
            source text,
            part smallint NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS events_correlation ON {b}.events (correlation_id)",
        f"""CREATE TABLE IF NOT EXISTS {b}.commands (
            id bigserial PRIMARY KEY,
            queue text NOT NULL,
            key text NOT NULL,
            message_id text NOT NULL UNIQUE,
            type text NOT NULL,
            body text NOT NULL,
            correlation_id text NOT NULL,
            causation_id text,
            timestamp text NOT NULL,
            traceparent text,
            source text,
            available_at double precision NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            lease_owner text,
            lease_expires double precision,
            done boolean NOT NULL DEFAULT false,
            outcome text,
            last_error text)""",
        f"CREATE INDEX IF NOT EXISTS commands_pending ON {b}.commands (queue, id) WHERE NOT done",
        f"""CREATE INDEX IF NOT EXISTS commands_pending_key ON {b}.commands (queue, key, id)
            WHERE NOT done""",
        f"CREATE INDEX IF NOT EXISTS commands_correlation ON {b}.commands (correlation_id)",
        f"""CREATE TABLE IF NOT EXISTS {b}.subscriptions (
            subscriber text NOT NULL,
            part integer NOT NULL,
            position bigint NOT NULL DEFAULT 0,
            attempts integer NOT NULL DEFAULT 0,
            available_at double precision NOT NULL DEFAULT 0,
            last_error text,
            claimed bigint NOT NULL DEFAULT 0,
            lease_owner text,
            lease_expires double precision,
            PRIMARY KEY (subscriber, part))""",
        f"""CREATE TABLE IF NOT EXISTS {b}.members (
            consumer text NOT NULL,
            member text NOT NULL,
            heartbeat double precision NOT NULL,
            PRIMARY KEY (consumer, member))""",
    ]


async def _version(conn: AsyncConnection[Any], schema: str, key: str) -> int | None:
    cursor = await conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",))
    exists = await cursor.fetchone()
    if exists is None or exists[0] is None:
        return None
    cursor = await conn.execute(f"SELECT value FROM {schema}.meta WHERE key = %s", (key,))
    row = await cursor.fetchone()
    return None if row is None else int(row[0])


async def _migrate_one(
    conn: AsyncConnection[Any], schema: str, key: str, ddl: list[str], label: str
) -> None:
    current = await _version(conn, schema, key)
    if current is not None and current > SCHEMA_VERSION:
        raise ConfigurationError(
            f"schema {label} has version {current}; this sagaline knows {SCHEMA_VERSION}:"
            " upgrade sagaline"
        )
    if current == SCHEMA_VERSION:
        return
    for statement in ddl:
        await conn.execute(statement)
    await conn.execute(
        f"INSERT INTO {schema}.meta (key, value) VALUES (%s, %s), ('partitions', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, str(SCHEMA_VERSION), str(PARTITIONS)),
    )


async def migrate_connection(conn: AsyncConnection[Any], names: Names) -> None:
    """Create or upgrade both schemas on ``conn`` in one transaction, under the advisory lock."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await _migrate_one(
            conn, names.store, "schema_version", _store_ddl(names.store), names.store_name
        )
        await _migrate_one(
            conn, names.bus, "bus_schema_version", _bus_ddl(names.bus), names.bus_name
        )


async def migrate(url: str, schema: str = "sagaline", bus_schema: str | None = None) -> None:
    """Create or upgrade a store's schema and its bus schema (``sagaline migrate``); idempotent."""
    names = Names(schema, bus_schema)
    async with await connect(url) as conn:
        await migrate_connection(conn, names)


async def connect(url: str, connect_timeout: float | None = None) -> AsyncConnection[Any]:
    """An autocommit connection; :class:`StoreUnavailable` (without the password) when the server
    cannot be reached or refuses it. ``connect_timeout`` bounds the wait in seconds (PostgreSQL
    counts whole seconds, at least 2)."""
    validate_url(url)
    options: dict[str, Any] = {}
    if connect_timeout is not None:
        options["connect_timeout"] = max(2, math.ceil(connect_timeout))
    try:
        return await AsyncConnection.connect(url, autocommit=True, **options)
    except psycopg.Error as exc:
        raise cannot_connect(url, exc) from None


def cannot_connect(url: str, exc: BaseException) -> StoreUnavailable:
    """The error that says, on one line and without the password, why ``url`` cannot be used."""
    lines = [line.strip(" \t-") for line in str(exc).splitlines() if line.strip()]
    reasons = [line.rpartition(" failed: ")[2] if " failed: " in line else line for line in lines]
    reasons = [reason.removeprefix("FATAL:").strip() for reason in reasons]
    reasons = [r for r in reasons if r and not r.startswith(("Is the server", "Multiple conn"))]
    reason = redact("; ".join(dict.fromkeys(reasons)) or type(exc).__name__, url)
    verb = "refused the connection" if "FATAL:" in str(exc) else "is unreachable"
    return StoreUnavailable(f"PostgreSQL at {redact_url(url)} {verb}: {reason}")
