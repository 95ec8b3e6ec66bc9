"""The embedded default: store and bus in one SQLite file.

Durability: WAL mode with ``synchronous=FULL``, so every commit is fsynced before it returns and a
committed saga step survives power loss. SQLite has one writer at a time; throughput comes from
group commit (a consumer claims a batch, handles it and acknowledges it in one transaction).

The process shares one connection between its services; an :class:`asyncio.Lock` keeps their
transactions apart. Calls are short and synchronous on the event loop thread (the query port's
too: a local file answers faster than a thread would start). The module is split by
responsibility: :mod:`.schema`, :mod:`.rows`, :mod:`.transaction` (the unit of work), :mod:`.bus`
(queues and subscriptions) and :mod:`.queries` (read-only tools, and ``db.sync``, their
synchronous form for tests and scripts).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagaline.backends._sql.rows import ENVELOPE_COLUMNS, envelope_from_row, partition_of
from sagaline.backends.sqlite.bus import SqliteBus
from sagaline.backends.sqlite.failures import gone, unavailable
from sagaline.backends.sqlite.files import (
    NotAStore,
    check_store_file,
    connect_read_only,
    create_owner_only,
)
from sagaline.backends.sqlite.queries import SqliteQueries, SqliteReader
from sagaline.backends.sqlite.rows import immediate, path_from_url
from sagaline.backends.sqlite.schedule import SqliteSchedule
from sagaline.backends.sqlite.schema import (
    BACKSTOP_CHECKPOINT_PAGES,
    LEASE_SECONDS,
    PARTITIONS,
    check_version,
    migrate,
)
from sagaline.backends.sqlite.transaction import SqliteTransaction
from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.errors import ConfigurationError, StoreUnavailable
from sagaline.messages import Envelope, check_message_id
from sagaline.ports import Batch, ConsumerSpec, OutboxEntry, Outcome, StoredEvent

if TYPE_CHECKING:
    from sagaline.ports import (
        AuditRows,
        Backend,
        BrokerBus,
        Database,
        Idleness,
        Metadata,
        Outbox,
        ProjectionSwap,
        StoreQueries,
        StoreTransaction,
    )

__all__ = [
    "LEASE_SECONDS",
    "PARTITIONS",
    "NotAStore",
    "SqliteDatabase",
    "SqliteReader",
    "SqliteTransaction",
    "open_bus",
    "open_store",
    "partition_of",
    "path_from_url",
]

log = logging.getLogger("sagaline.sqlite")

#: The longest wait between two tries of a checkpointer whose checkpoints fail.
CHECKPOINT_MAX_BACKOFF = 30.0


class SqliteDatabase(SqliteBus, SqliteSchedule, SqliteQueries):
    """Store and bus in one SQLite file (WAL, synchronous=FULL)."""

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = LEASE_SECONDS,
        outbox: bool = False,
        adopt: bool = False,
        read_only: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Open (or create) the store at ``url``.

        An existing file that holds data and is not a sagaline store is refused
        (:class:`NotAStore`) and left untouched, unless ``adopt`` (``sagaline migrate``) asks
        for sagaline's tables to be added to a SQLite database. ``read_only`` opens an existing
        store for queries only: nothing is written, not even its journal mode. ``clock`` is what
        leases and retry due times are read from (a test kit's :class:`~sagaline.clock.FakeClock`).
        """
        self.url = url
        self.clock = clock
        #: True when this file is a service's store whose messages go out through another bus.
        self.outbox = outbox
        self._outbox_ready = asyncio.Event()
        self.path = path_from_url(url)
        self.lease_seconds = lease_seconds
        self.read_only = read_only
        parent = Path(self.path).parent
        if not parent.exists():
            raise ConfigurationError(f"the directory of {self.path!r} does not exist")
        check_store_file(self.path, url, adopt=adopt)
        self._lock = asyncio.Lock()
        #: Synchronous reads of this file, for a test or a script between two batches (SQLite
        #: only: tools use the asynchronous query methods, the same on every backend).
        self.sync = SqliteReader(self)
        self._init_bus()
        self._checkpointer: tuple[threading.Thread, threading.Event] | None = None
        try:
            self.connection = self._connect()
        except sqlite3.Error as exc:
            translated = unavailable(exc, url, self.path)
            if translated is None:
                raise
            raise translated from exc

    def _connect(self) -> sqlite3.Connection:
        if self.read_only and self.path != ":memory:":
            if not Path(self.path).exists():
                raise StoreUnavailable(f"the store {self.url} does not exist")
            connection = connect_read_only(self.path, check_same_thread=False)
            try:
                check_version(connection, self.path)
            except BaseException:
                connection.close()
                raise
            return connection
        create_owner_only(self.path)
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit fsyncs the WAL, so an acknowledged step survives power loss.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA cache_size=-65536")
            migrate(connection, self.path)
        except BaseException:
            connection.close()
            raise
        return connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        """One unit of work; the in-process lock keeps services' transactions apart.

        A full or failing device, or a lock held past the timeout, raises
        :class:`StoreUnavailable`.
        """
        async with self._lock:
            conn = self.connection
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                translated = unavailable(exc, self.url, self.path)
                if translated is None:
                    raise
                raise translated from exc
            tx = SqliteTransaction(self)
            try:
                yield tx
                tx.flush()
                if not conn.in_transaction:
                    raise gone(
                        sqlite3.OperationalError("no transaction is active"), self.url, self.path
                    )
                conn.execute("COMMIT")
            except BaseException as exc:
                if not conn.in_transaction:
                    # SQLite rolled it back itself (a full disk, an I/O error): nothing of it
                    # is kept, and nothing may run as if it were still open.
                    if isinstance(exc, Exception) and not isinstance(exc, StoreUnavailable):
                        raise gone(exc, self.url, self.path) from exc
                    raise
                conn.execute("ROLLBACK")
                if isinstance(exc, Exception):
                    translated = unavailable(exc, self.url, self.path)
                    if translated is not None and translated is not exc:
                        raise translated from exc
                raise
        if tx.wrote_messages:
            self._notify()

    def _notify(self) -> None:
        for event in self._wakeups.values():
            event.set()
        self._outbox_ready.set()

    # The outbox (a service store whose bus is elsewhere) -------------------------------------

    async def outbox_claim(self, owner: str, limit: int) -> list[OutboxEntry]:
        """The oldest unsent entries, when ``owner`` holds or takes the relay lease."""
        self._outbox_ready.clear()
        async with self._lock:
            conn = self.connection
            now = self.clock.time()
            with self._without_fsync(), immediate(conn):
                taken = conn.execute(
                    "UPDATE relay_lease SET owner = ?, expires = ?"
                    " WHERE id = 1 AND (owner IS NULL OR owner = ? OR expires < ?)",
                    (owner, now + self.lease_seconds, owner, now),
                ).rowcount
            if not taken:
                return []
            rows = conn.execute(
                f"SELECT id, {ENVELOPE_COLUMNS} FROM outbox WHERE sent = 0 ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [OutboxEntry(row[0], envelope_from_row(row, 1)) for row in rows]

    async def outbox_release(self, owner: str) -> None:
        """Give the relay lease up if ``owner`` holds it."""
        async with self._lock:
            conn = self.connection
            with immediate(conn):
                conn.execute(
                    "UPDATE relay_lease SET owner = NULL, expires = 0 WHERE id = 1 AND owner = ?",
                    (owner,),
                )

    async def outbox_sent(self, ids: Sequence[int]) -> None:
        """Mark entries published."""
        if not ids:
            return
        async with self._lock:
            conn = self.connection
            with immediate(conn):
                conn.executemany("UPDATE outbox SET sent = 1 WHERE id = ?", [(i,) for i in ids])

    async def outbox_refused(self, entry: OutboxEntry, reason: str) -> None:
        """Set aside an entry the bus refuses for good: a dead letter of ``outbox``, marked sent."""
        async with self.transaction() as tx:
            await tx.dead_letter("outbox", entry.envelope, reason, 1)
            self.connection.execute("UPDATE outbox SET sent = 1 WHERE id = ?", (entry.id,))

    async def wait_for_outbox(self, timeout: float) -> None:
        """Wait for a commit of this process that emitted, or ``timeout`` seconds."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._outbox_ready.wait(), timeout)

    # The file as a bus for services whose stores are elsewhere ---------------------------------

    async def next_timer_due(self) -> float | None:
        """When the next timer is due (seconds since the epoch), None when none is set."""
        row = self.connection.execute("SELECT MIN(due_at) FROM timers").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def open(self) -> None:
        """Nothing to do: the file is opened and migrated by the constructor."""

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Nothing to declare: queues and subscriptions are rows, made on first use."""

    async def publish(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Put messages on this file's queues and log, durably.

        A message id already there with the same message is a retry and changes nothing; with
        another message it raises :class:`DuplicateMessageId`, and nothing is written. An id that
        is not one (see :func:`check_message_id`) raises :class:`InvalidMessage`.
        """
        if not envelopes:
            return
        for envelope in envelopes:
            check_message_id(envelope.message_id)
        async with self.transaction() as tx:
            tx.to_bus(envelopes, routes)

    @property
    def max_payload(self) -> None:
        """None: the database carries what sagaline's own message limit allows."""
        return None

    def database(self) -> SqliteDatabase:
        """This file: a bus that is a database, which keeps the commands clients submitted."""
        return self

    async def complete(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """Settle a batch whose handling committed in another store."""
        async with self.transaction() as tx:
            await self.settle(tx, batch, outcomes)

    async def replay(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """The event log from ``after`` on, streamed."""
        async for stored in self.iter_log(after):
            yield stored

    def start_checkpointer(self, interval: float = 0.5) -> None:
        """Checkpoint the WAL from a background thread with its own connection.

        A checkpoint copies committed pages into the database file and fsyncs it; done by the
        committing connection it stalls the message path. PASSIVE checkpoints never block
        writers, and the sqlite3 module releases the GIL while it runs, so it uses the other core.
        The connection's own automatic checkpoint stays as a backstop at a larger WAL size.
        """
        if self._checkpointer is not None:
            return
        self.connection.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
        stop = threading.Event()

        def run() -> None:
            # An error (a full disk, an I/O error) is logged and tried again after a backoff,
            # on a fresh connection: a checkpointer that stopped would let the WAL grow to the
            # backstop, even while the store is idle.
            conn: sqlite3.Connection | None = None
            failures = 0
            delay = interval
            try:
                while not stop.wait(delay):
                    try:
                        if conn is None:
                            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:
                        failures += 1
                        delay = min(CHECKPOINT_MAX_BACKOFF, interval * 2**failures)
                        log.warning(
                            "checkpointing %s failed (%d), trying again in %.1f s: %s",
                            self.path,
                            failures,
                            delay,
                            exc,
                        )
                        if conn is not None:
                            with suppress(sqlite3.Error):
                                conn.close()
                            conn = None
                        continue
                    if failures:
                        log.info("checkpointing %s works again", self.path)
                    failures = 0
                    delay = interval
            finally:
                if conn is not None:
                    conn.close()

        thread = threading.Thread(target=run, name="sagaline-checkpoint", daemon=True)
        thread.start()
        self._checkpointer = (thread, stop)

    async def close(self) -> None:
        """Stop the checkpointer and close the connection (after the current transaction)."""
        if self._checkpointer is not None:
            thread, stop = self._checkpointer
            stop.set()
            thread.join()
            self._checkpointer = None
        async with self._lock:
            self.connection.close()

    async def set_meta(self, key: str, value: str) -> None:
        """Set a value of the file's metadata table (its own transaction)."""
        async with self.transaction():
            self.connection.execute(
                "INSERT INTO sagaline_meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def rename_namespace(self, source: str, target: str) -> None:
        """Move every document of ``source`` to ``target`` (inside a transaction)."""
        self.connection.execute(
            "UPDATE documents SET namespace = ? WHERE namespace = ?", (target, source)
        )


def open_store(
    url: str,
    *,
    service: str | None = None,
    outbox: bool = False,
    colocated_bus: bool = True,
    connect_timeout: float | None = None,
    **options: Any,
) -> SqliteDatabase:
    """The store at ``url`` (the scheme registry's factory; see :mod:`sagaline.config`).

    A file holds its services' tables side by side, and the bus too unless ``outbox``; a local
    file needs no ``connect_timeout``.
    """
    return SqliteDatabase(url, outbox=outbox, **options)


def open_bus(
    url: str,
    *,
    connect_timeout: float | None = None,
    instance: tuple[int, int] | None = None,
    **options: Any,
) -> SqliteDatabase:
    """A SQLite file as the bus between stores elsewhere (the scheme registry's factory).

    Its subscribers share partitions by themselves, so ``instance`` is not needed.
    """
    return SqliteDatabase(url, **options)


if TYPE_CHECKING:

    def _implements_ports(
        db: SqliteDatabase, tx: SqliteTransaction
    ) -> tuple[
        Backend,
        BrokerBus,
        Outbox,
        StoreQueries,
        AuditRows,
        Metadata,
        Idleness,
        ProjectionSwap,
        Database,
        StoreTransaction,
    ]:
        return db, db, db, db, db, db, db, db, db, tx
