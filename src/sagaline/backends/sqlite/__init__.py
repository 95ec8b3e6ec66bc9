"""The embedded default: store and bus in one SQLite file.

Durability: WAL mode with ``synchronous=FULL``, so every commit is fsynced before it returns and a
committed saga step survives power loss. SQLite has one writer at a time; throughput comes from
group commit (a consumer claims a batch, handles it and acknowledges it in one transaction).

The process shares one connection between its services; an :class:`asyncio.Lock` keeps their
transactions apart. Calls are short and synchronous on the event loop thread. The module is split
by responsibility: :mod:`.schema`, :mod:`.rows`, :mod:`.transaction` (the unit of work),
:mod:`.bus` (queues and subscriptions) and :mod:`.queries` (read-only tools).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sagaline.backends.sqlite.bus import SqliteBus
from sagaline.backends.sqlite.queries import SqliteQueries
from sagaline.backends.sqlite.rows import partition_of, path_from_url
from sagaline.backends.sqlite.schema import (
    BACKSTOP_CHECKPOINT_PAGES,
    LEASE_SECONDS,
    PARTITIONS,
    migrate,
)
from sagaline.backends.sqlite.transaction import SqliteTransaction
from sagaline.errors import ConfigurationError

if TYPE_CHECKING:
    from sagaline.ports import Backend, StoreTransaction

__all__ = [
    "LEASE_SECONDS",
    "PARTITIONS",
    "SqliteDatabase",
    "SqliteTransaction",
    "partition_of",
    "path_from_url",
]


class SqliteDatabase(SqliteBus, SqliteQueries):
    """Store and bus in one SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, url: str, *, lease_seconds: float = LEASE_SECONDS) -> None:
        self.url = url
        self.path = path_from_url(url)
        self.lease_seconds = lease_seconds
        parent = Path(self.path).parent
        if not parent.exists():
            raise ConfigurationError(f"the directory of {self.path!r} does not exist")
        self.connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self.connection.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit fsyncs the WAL, so an acknowledged step survives power loss.
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.connection.execute("PRAGMA cache_size=-65536")
        self._lock = asyncio.Lock()
        self._init_bus()
        self._checkpointer: tuple[threading.Thread, threading.Event] | None = None
        self._migrate()

    def _migrate(self) -> None:
        migrate(self.connection, self.path)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        """One unit of work; the in-process lock keeps services' transactions apart."""
        async with self._lock:
            conn = self.connection
            conn.execute("BEGIN IMMEDIATE")
            tx = SqliteTransaction(self)
            try:
                yield tx
                tx.flush()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        if tx.wrote_messages:
            self._notify()

    def _notify(self) -> None:
        for event in self._wakeups.values():
            event.set()

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
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            try:
                while not stop.wait(interval):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
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


if TYPE_CHECKING:

    def _implements_ports(
        db: SqliteDatabase, tx: SqliteTransaction
    ) -> tuple[Backend, StoreTransaction]:
        return db, tx
