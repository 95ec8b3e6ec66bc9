"""PostgreSQL as store and bus: a service's schema and a bus schema in one database.

Co-located (the default), a unit of work writes outgoing commands into the bus's queues and
events into its log in the store's own transaction, exactly like the SQLite backend. With
``outbox=True`` the store keeps outgoing messages in its outbox instead, for a relay to publish to
another bus; the same class also serves as such a bus for stores elsewhere (:class:`BrokerBus`).

Connections: an asyncio pool for units of work, claims, the log and the query tools; one
autocommit connection that LISTENs for wake-ups, on which the schemas are migrated when it is
first opened. The pool and the listener belong to the event loop that opened them; used from
another loop (each ``asyncio.run`` is one), the database opens them again there. The module is
split by responsibility: :mod:`.schema`, :mod:`.transaction` (the unit of work), :mod:`.bus`
(queues and subscriptions) and :mod:`.queries` (read-only tools).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sagaline.backends._sql.rows import ENVELOPE_COLUMNS, envelope_from_row
from sagaline.backends.postgres.bus import PostgresBus
from sagaline.backends.postgres.failures import unavailable
from sagaline.backends.postgres.queries import PostgresQueries
from sagaline.backends.postgres.schedule import PostgresSchedule
from sagaline.backends.postgres.schema import (
    LEASE_SECONDS,
    MIGRATION_LOCK,
    PARTITIONS,
    SCHEMA_VERSION,
    Names,
    cannot_connect,
    connect,
    migrate,
    migrate_connection,
    redact_url,
    validate_url,
)
from sagaline.backends.postgres.transaction import PostgresTransaction, envelope_arrays
from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.ports import OutboxEntry

if TYPE_CHECKING:
    from sagaline.ports import (
        AuditRows,
        Backend,
        BrokerBus,
        Database,
        Disposable,
        Idleness,
        Metadata,
        Outbox,
        ProjectionSwap,
        StoreQueries,
        StoreTransaction,
    )

__all__ = [
    "BUS_SCHEMA",
    "LEASE_SECONDS",
    "PARTITIONS",
    "SCHEMA_VERSION",
    "PostgresDatabase",
    "PostgresTransaction",
    "envelope_arrays",
    "migrate",
    "open_bus",
    "open_store",
    "redact_url",
]

#: The unit of work open in the current task, for tools called inside it.
_CURRENT: contextvars.ContextVar[PostgresTransaction | None] = contextvars.ContextVar(
    "sagaline_postgres_transaction", default=None
)


class PostgresDatabase(PostgresBus, PostgresSchedule, PostgresQueries):
    """A service's store and (or) a bus in PostgreSQL schemas."""

    def __init__(
        self,
        url: str,
        *,
        schema: str = "sagaline",
        bus_schema: str | None = None,
        outbox: bool = False,
        lease_seconds: float = LEASE_SECONDS,
        max_connections: int = 4,
        locked_namespaces: Iterable[str] = (),
        connect_timeout: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """A store (and bus) in ``schema`` of the database at ``url``, the bus in ``bus_schema``
        when given. ``clock`` is what leases, retry due times and the timestamps the store
        writes are read from (a test kit's :class:`~sagaline.clock.FakeClock`)."""
        self.url = validate_url(url)
        self.clock = clock
        #: Seconds to wait for the server when connecting (None: the driver's own limits).
        self.connect_timeout = connect_timeout
        #: Document namespaces read with ``FOR UPDATE`` in a unit of work, so that units of work
        #: that update one document queue on its row lock instead of failing at commit. A
        #: namespace joins by itself once a unit of work updates a document in it (or meets a
        #: conflict there); pass those known to be updated to start with them.
        self.locked_namespaces: set[str] = set(locked_namespaces)
        self.names = Names(schema, bus_schema)
        self.outbox = outbox
        self.lease_seconds = lease_seconds
        self.max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Task[None] | None = None
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listener_conn: AsyncConnection[Any] | None = None
        self._connections: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()
        self._migrated = False
        self._wakeups = {}
        self._members = {}
        self._outbox_ready: asyncio.Event | None = None
        self._open_transactions = 0

    def __repr__(self) -> str:
        return (
            f"PostgresDatabase({redact_url(self.url)!r}, schema={self.names.store_name!r},"
            f" bus_schema={self.names.bus_name!r}, outbox={self.outbox})"
        )

    # -------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Migrate the schemas (once), open the pool and the listening connection."""
        await self._ready()

    def start_checkpointer(self) -> None:
        """Nothing to do: the server checkpoints its own write-ahead log."""

    @property
    def max_payload(self) -> None:
        """None: the database carries what sagaline's own message limit allows."""
        return None

    def database(self) -> PostgresDatabase:
        """This database: a bus that is a database, which keeps the commands clients submitted."""
        return self

    async def _ready(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        pool = self._pool
        loop = asyncio.get_running_loop()
        if pool is not None and self._loop is loop:
            return pool
        if self._loop is not loop or self._opening is None:
            self._abandon()
            self._loop = loop
            self._wakeups = {}
            self._outbox_ready = None
            self._opening = loop.create_task(self._start())
        opening = self._opening
        try:
            await asyncio.shield(opening)
        except BaseException:
            if opening.done() and self._opening is opening:
                self._opening = None
            raise
        assert self._pool is not None
        return self._pool

    async def _start(self) -> None:
        # The listening connection first: a wrong URL or a missing database fails at once and
        # clearly (a pool would retry until its timeout). The schemas are migrated on it.
        try:
            listener = await self._connect_listener()
        except psycopg.Error as exc:
            raise cannot_connect(self.url, exc) from None
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.max_connections,
            open=False,
            kwargs={"autocommit": True},
            configure=self._configure,
            name=f"sagaline-{self.names.store_name}",
        )
        try:
            if not self._migrated:
                await migrate_connection(listener, self.names)
                self._migrated = True
            await pool.open(wait=True, timeout=self.connect_timeout or 15.0)
        except BaseException as exc:
            await pool.close()
            await listener.close()
            if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout | TimeoutError):
                raise cannot_connect(self.url, exc) from None
            raise
        self._listener = asyncio.get_running_loop().create_task(self._listen(listener))
        self._pool = pool

    async def _connect_listener(self) -> AsyncConnection[Any]:
        """The autocommit connection that LISTENs on the bus's channel."""
        options: dict[str, Any] = {}
        if self.connect_timeout is not None:
            options["connect_timeout"] = max(2, math.ceil(self.connect_timeout))
        listener = await AsyncConnection.connect(self.url, autocommit=True, **options)
        self._connections.add(listener)
        await listener.execute(f'LISTEN "{self.names.channel}"')
        self._listener_conn = listener
        return listener

    async def _configure(self, conn: AsyncConnection[Any]) -> None:
        self._connections.add(conn)

    def _abandon(self) -> None:
        """Drop the connections of an event loop that has gone (their tasks went with it)."""
        for conn in list(self._connections):
            if not conn.closed:
                conn.pgconn.finish()
        self._connections = weakref.WeakSet()
        self._pool = None
        self._listener = None
        self._listener_conn = None
        self._opening = None
        self._loop = None

    async def close(self) -> None:
        """Close the pool and the listener."""
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            if self._listener is not None:
                self._listener.cancel()
                with suppress(asyncio.CancelledError):
                    await self._listener
            if self._listener_conn is not None:
                await self._listener_conn.close()
            await self._pool.close()
        self._abandon()

    # ---------------------------------------------------------- unit of work

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        """One unit of work on a pooled connection; commits on success, rolls back on error."""
        pool = await self._ready()
        self._open_transactions += 1
        try:
            async with pool.connection() as conn, conn.transaction():
                tx = PostgresTransaction(self, conn)
                token = _CURRENT.set(tx)
                try:
                    yield tx
                finally:
                    _CURRENT.reset(token)
                await tx.flush()
        except Exception as exc:
            translated = unavailable(exc, f"in PostgreSQL schema {self.names.store_name}")
            if translated is not None and translated is not exc:
                raise translated from exc
            raise
        finally:
            self._open_transactions -= 1
        if tx.queues or tx.wrote_events:
            self._wake(tx.queues, tx.wrote_events)
        if tx.wrote_outbox and self._outbox_ready is not None:
            self._outbox_ready.set()

    async def next_timer_due(self) -> float | None:
        """When the next timer is due (seconds since the epoch), None when none is set."""
        pool = await self._ready()
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(f"SELECT min(due_at) FROM {self.names.store}.timers")
                row = await cursor.fetchone()
        except psycopg.Error as exc:
            translated = unavailable(exc, f"in PostgreSQL schema {self.names.store}")
            if translated is None:
                raise
            raise translated from exc
        return None if row is None or row[0] is None else float(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        """Set a value of the store schema's metadata table (its own transaction)."""
        async with self.transaction() as tx:
            await tx.connection.execute(
                f"INSERT INTO {self.names.store}.meta (key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def rename_namespace(self, source: str, target: str) -> None:
        """Move every document of ``source`` to ``target`` when the unit of work of this task
        commits (called outside one, it raises :class:`RuntimeError`)."""
        sql = f"UPDATE {self.names.store}.documents SET namespace = %s WHERE namespace = %s"
        self._defer(sql, (target, source))

    def reset_subscription(self, subscriber: str, position: int) -> None:
        """Move every partition cursor of ``subscriber`` to ``position`` when the unit of work of
        this task commits (called outside one, it raises :class:`RuntimeError`)."""
        b = self.names.bus
        sql = (
            f"INSERT INTO {b}.subscriptions (subscriber, part, position)"
            " SELECT %s, g, %s FROM generate_series(0, %s) AS g"
            " ON CONFLICT (subscriber, part) DO UPDATE SET position = excluded.position,"
            " attempts = 0, available_at = 0, claimed = 0, last_error = NULL"
        )
        self._defer(sql, (subscriber, position, PARTITIONS - 1))

    def _defer(self, sql: str, params: tuple[Any, ...]) -> None:
        tx = _CURRENT.get()
        if tx is None or tx._db is not self:
            raise RuntimeError("a projection swap joins a unit of work of this database: open one")
        tx.defer(sql, params)

    # ----------------------------------------------------------------- outbox

    async def outbox_claim(self, owner: str, limit: int) -> list[OutboxEntry]:
        """The oldest unsent entries, if ``owner`` holds (or now takes) the relay lease."""
        pool = await self._ready()
        if self._outbox_ready is None:
            self._outbox_ready = asyncio.Event()
        # Armed before looking: a commit from now on wakes the relay's next wait.
        self._outbox_ready.clear()
        s = self.names.store
        now = self.clock.time()
        async with pool.connection() as conn:
            cursor = await conn.execute(
                f"WITH lease AS (INSERT INTO {s}.outbox_relay (id, owner, expires)"
                " VALUES (true, %(owner)s, %(expires)s) ON CONFLICT (id) DO UPDATE"
                " SET owner = excluded.owner, expires = excluded.expires"
                " WHERE outbox_relay.owner = excluded.owner OR outbox_relay.expires < %(now)s"
                " RETURNING owner)"
                f" SELECT id, {ENVELOPE_COLUMNS} FROM {s}.outbox"
                " WHERE sent_at IS NULL AND EXISTS (SELECT 1 FROM lease)"
                " ORDER BY id LIMIT %(limit)s",
                {
                    "owner": owner,
                    "expires": now + self.lease_seconds,
                    "now": now,
                    "limit": limit,
                },
            )
            rows = await cursor.fetchall()
        return [OutboxEntry(id=row[0], envelope=envelope_from_row(row, 1)) for row in rows]

    async def outbox_sent(self, ids: Sequence[int]) -> None:
        """Mark entries published; they are not handed out again."""
        if not ids:
            return
        pool = await self._ready()
        async with pool.connection() as conn:
            await conn.execute(
                f"UPDATE {self.names.store}.outbox SET sent_at = %s"
                " WHERE id = ANY(%s::bigint[]) AND sent_at IS NULL",
                (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.time())), list(ids)),
            )

    async def outbox_release(self, owner: str) -> None:
        """Give the relay lease up if ``owner`` holds it."""
        pool = await self._ready()
        async with pool.connection() as conn:
            await conn.execute(
                f"UPDATE {self.names.store}.outbox_relay SET expires = 0 WHERE owner = %s",
                (owner,),
            )

    async def outbox_refused(self, entry: OutboxEntry, reason: str) -> None:
        """Set aside an entry the bus refuses for good: a dead letter of ``outbox``, marked sent."""
        async with self.transaction() as tx:
            await tx.dead_letter(OUTBOX_CONSUMER, entry.envelope, reason, 1)
            await tx.connection.execute(
                f"UPDATE {self.names.store}.outbox SET sent_at = %s WHERE id = %s",
                (tx.now, entry.id),
            )

    async def wait_for_outbox(self, timeout: float) -> None:
        """Return when a unit of work of this process wrote to the outbox, or after ``timeout``."""
        await self._ready()
        if self._outbox_ready is None:
            self._outbox_ready = asyncio.Event()
        event = self._outbox_ready
        with suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # ------------------------------------------------------------------ demo

    async def drop_if_marked(self, key: str) -> bool:
        """Drop this store's schemas if they carry the metadata mark ``key``, hold no data yet
        (only migrated), or do not exist.

        False, leaving everything as it was, when the store schema holds data without the mark.
        """
        await self.close()
        conn = await connect(self.url, self.connect_timeout)
        async with conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            names = self.names
            cursor = await conn.execute("SELECT to_regclass(%s)", (f"{names.store}.meta",))
            exists = await cursor.fetchone()
            if exists is not None and exists[0] is not None:
                cursor = await conn.execute(
                    f"SELECT value FROM {names.store}.meta WHERE key = %s", (key,)
                )
                mark = await cursor.fetchone()
                if mark is None or mark[0] != "1":
                    for table in _DATA_TABLES:
                        cursor = await conn.execute(f"SELECT 1 FROM {names.store}.{table} LIMIT 1")
                        if await cursor.fetchone():
                            return False
            await conn.execute(f"DROP SCHEMA IF EXISTS {names.store} CASCADE")
            if names.bus != names.store:
                await conn.execute(f"DROP SCHEMA IF EXISTS {names.bus} CASCADE")
        self._migrated = False
        return True


#: The consumer name under which entries the bus refused for good are dead-lettered.
OUTBOX_CONSUMER = "outbox"

#: The tables of a service's schema that hold its data (a store without rows in any is empty).
_DATA_TABLES = ("streams", "documents", "sagas", "inbox", "outbox", "dead_letters")

#: The schema of the bus: beside the services' schemas, or alone for stores elsewhere.
BUS_SCHEMA = "sagaline_bus"


def open_store(
    url: str,
    *,
    service: str | None = None,
    outbox: bool = False,
    colocated_bus: bool = True,
    connect_timeout: float | None = None,
    **options: Any,
) -> PostgresDatabase:
    """The store of ``service`` at ``url`` (the scheme registry's factory; see
    :mod:`sagaline.config`): its own schema ``sagaline_SERVICE``, beside the bus's schema
    :data:`BUS_SCHEMA` when ``colocated_bus``. Without a service: the schema ``sagaline``.
    """
    if service is None:
        return PostgresDatabase(url, outbox=outbox, connect_timeout=connect_timeout, **options)
    return PostgresDatabase(
        url,
        schema=f"sagaline_{service}",
        bus_schema=BUS_SCHEMA if colocated_bus else None,
        outbox=outbox,
        connect_timeout=connect_timeout,
        **options,
    )


def open_bus(
    url: str, *, instance: tuple[int, int] | None = None, **options: Any
) -> PostgresDatabase:
    """A PostgreSQL database as the bus (schema :data:`BUS_SCHEMA`) between stores elsewhere
    (the scheme registry's factory). Its subscribers share partitions by themselves, so
    ``instance`` is not needed."""
    return PostgresDatabase(url, schema=BUS_SCHEMA, **options)


if TYPE_CHECKING:

    def _implements_ports(
        db: PostgresDatabase, tx: PostgresTransaction
    ) -> tuple[
        Backend,
        StoreTransaction,
        Outbox,
        BrokerBus,
        StoreQueries,
        AuditRows,
        Metadata,
        Idleness,
        ProjectionSwap,
        Disposable,
        Database,
    ]:
        return db, tx, db, db, db, db, db, db, db, db, db
