"""The embedded default: store and bus in one SQLite file.

Durability: WAL mode with ``synchronous=FULL``, so every commit is fsynced before it returns and a
committed saga step survives power loss. SQLite has one writer at a time; throughput comes from
group commit (a consumer claims a batch, handles it and acknowledges it in one transaction).

Commands are a work queue per service with leases: a claim leases the oldest pending message of
each correlation key (one in flight per key keeps per-key order); a dead consumer's lease expires
and the message is delivered again. Events are a retained log (the event store itself) read by each
subscriber through a cursor per partition; partitions are leased to the live members of a
subscriber so that several processes share the work while each key stays in order.

The process shares one connection between its services; an :class:`asyncio.Lock` keeps their
transactions apart. Calls are short and synchronous on the event loop thread.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from sagaline.errors import ConcurrencyError, ConfigurationError
from sagaline.messages import Envelope, utc_timestamp
from sagaline.ports import (
    Backend,
    Batch,
    ConsumerSpec,
    DeadLetter,
    Delivery,
    Document,
    Outcome,
    SagaRecord,
    StoredEvent,
    StoreTransaction,
)

__all__ = ["SqliteDatabase", "SqliteTransaction", "path_from_url"]

SCHEMA_VERSION = 1
PARTITIONS = 8
LEASE_SECONDS = 10.0
#: How often a subscriber refreshes its membership and partition leases.
MEMBERSHIP_INTERVAL = 1.0
#: WAL pages past which a committing connection checkpoints itself (when a background
#: checkpointer runs, it normally keeps the WAL well below this).
BACKSTOP_CHECKPOINT_PAGES = 20000
#: A subscription claim reads at most this many wanted log rows per delivery it may return
#: (rows of partitions another member leases are read and passed over).
SCAN_FACTOR = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sagaline_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT,
    version INTEGER,
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    traceparent TEXT,
    source TEXT,
    part INTEGER NOT NULL
);
-- Only event-sourced appends have a stream: published events cost this index nothing.
CREATE UNIQUE INDEX IF NOT EXISTS events_stream ON events (stream, version)
    WHERE stream IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_correlation ON events (correlation_id);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    traceparent TEXT,
    source TEXT,
    available_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    done INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (queue, id) WHERE done = 0;
CREATE INDEX IF NOT EXISTS commands_pending_key ON commands (queue, key, id) WHERE done = 0;
CREATE INDEX IF NOT EXISTS commands_correlation ON commands (correlation_id);
CREATE TABLE IF NOT EXISTS subscriptions (
    subscriber TEXT NOT NULL,
    part INTEGER NOT NULL,
    position INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    lease_owner TEXT,
    lease_expires REAL,
    PRIMARY KEY (subscriber, part)
);
CREATE TABLE IF NOT EXISTS members (
    consumer TEXT NOT NULL,
    member TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    PRIMARY KEY (consumer, member)
);
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT NOT NULL,
    consumer TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (message_id, consumer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS documents (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sagas (
    saga_id TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    definition_version INTEGER NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    data TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sagas_status ON sagas (status);
CREATE TABLE IF NOT EXISTS saga_history (
    saga_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    entry INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (saga_id, version, entry)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    source TEXT,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at TEXT NOT NULL
);
"""

_JSON = msgspec.json.Encoder(decimal_format="number")
_DECODER: msgspec.json.Decoder[Any] = msgspec.json.Decoder(float_hook=Decimal)
_ENVELOPE_COLUMNS = (
    "message_id, type, body, correlation_id, causation_id, timestamp, traceparent, source"
)


def _decode_json(text: str | bytes) -> Any:
    """JSON with numbers that have a fraction read as Decimal (money never goes through float)."""
    return _DECODER.decode(text)


def path_from_url(url: str) -> str:
    """The file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigurationError(f"not a SQLite URL: {url!r} (expected sqlite:///path/to/file.db)")
    path = url[len(prefix) :]
    if not path:
        raise ConfigurationError("the SQLite URL names no file")
    return path


def partition_of(key: str) -> int:
    """The partition of a correlation key: stable across processes and runs."""
    return zlib.crc32(key.encode()) % PARTITIONS


def _envelope(row: Sequence[Any], offset: int = 0) -> Envelope:
    body = row[offset + 2]
    return Envelope(
        message_id=row[offset],
        message_type=row[offset + 1],
        body=body.encode() if isinstance(body, str) else body,
        correlation_id=row[offset + 3],
        causation_id=row[offset + 4],
        timestamp=row[offset + 5],
        traceparent=row[offset + 6],
        source=row[offset + 7],
    )


def _envelope_params(envelope: Envelope) -> tuple[Any, ...]:
    return (
        envelope.message_id,
        envelope.message_type,
        envelope.body.decode(),
        envelope.correlation_id,
        envelope.causation_id,
        envelope.timestamp,
        envelope.traceparent,
        envelope.source,
    )


@dataclass(slots=True)
class _SubscriptionCursor:
    """Adapter state for settling a subscription batch."""

    positions: dict[int, int]
    attempts: dict[int, int]
    scanned_to: int


@dataclass(slots=True)
class _Membership:
    refreshed: float = 0.0
    owned: list[int] = field(default_factory=list)


class SqliteTransaction:
    """One ``BEGIN IMMEDIATE`` transaction on the shared connection."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._conn = db.connection
        self.wrote_messages = False
        # One timestamp for the whole unit of work: it commits at one moment.
        self.now = utc_timestamp()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit that rolls back alone on error."""
        self._conn.execute("SAVEPOINT message")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO message")
            self._conn.execute("RELEASE message")
            raise
        self._conn.execute("RELEASE message")

    async def seen(self, consumer: str, message_ids: Sequence[str]) -> set[str]:
        """Which of ``message_ids`` ``consumer`` has processed already."""
        found: set[str] = set()
        for start in range(0, len(message_ids), 500):
            chunk = message_ids[start : start + 500]
            found.update(
                row[0]
                for row in self._conn.execute(
                    "SELECT message_id FROM inbox WHERE consumer = ? AND message_id IN"
                    f" ({','.join('?' * len(chunk))})",
                    (consumer, *chunk),
                )
            )
        return found

    async def record_inbox_many(self, consumer: str, message_ids: Sequence[str]) -> None:
        """Mark many messages processed; they must not be marked yet (see :meth:`seen`)."""
        self._conn.executemany(
            "INSERT INTO inbox (message_id, consumer, processed_at) VALUES (?, ?, ?)",
            [(message_id, consumer, self.now) for message_id in message_ids],
        )

    async def record_inbox(self, consumer: str, message_id: str) -> bool:
        cursor = self._conn.execute(
            "INSERT OR IGNORE INTO inbox (message_id, consumer, processed_at) VALUES (?, ?, ?)",
            (message_id, consumer, self.now),
        )
        return cursor.rowcount == 1

    async def append(self, stream: str, expected_version: int, events: Sequence[Envelope]) -> int:
        # A stale expected version collides with an existing (stream, version): the unique
        # constraint is the concurrency check.
        rows = [
            (stream, expected_version + i + 1, *_envelope_params(e), partition_of(e.correlation_id))
            for i, e in enumerate(events)
        ]
        try:
            self._conn.executemany(
                "INSERT INTO events (stream, version, message_id, type, body, correlation_id,"
                " causation_id, timestamp, traceparent, source, part)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        except sqlite3.IntegrityError:
            raise ConcurrencyError(
                f"stream {stream!r} has moved past version {expected_version}"
            ) from None
        if rows:
            self.wrote_messages = True
        return expected_version + len(rows)

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        return self._db.read_stream_sync(stream)

    async def get_document(self, namespace: str, key: str) -> Document | None:
        row = self._conn.execute(
            "SELECT data, version FROM documents WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        if row is None:
            return None
        return Document(_decode_json(row[0]), row[1])

    async def put_document(
        self, namespace: str, key: str, data: dict[str, Any], expected_version: int
    ) -> int:
        encoded = _JSON.encode(data).decode()
        if expected_version == 0:
            try:
                self._conn.execute(
                    "INSERT INTO documents (namespace, key, data, version) VALUES (?, ?, ?, 1)",
                    (namespace, key, encoded),
                )
            except sqlite3.IntegrityError:
                raise ConcurrencyError(f"document {namespace}/{key} already exists") from None
            return 1
        cursor = self._conn.execute(
            "UPDATE documents SET data = ?, version = version + 1"
            " WHERE namespace = ? AND key = ? AND version = ?",
            (encoded, namespace, key, expected_version),
        )
        if cursor.rowcount != 1:
            raise ConcurrencyError(
                f"document {namespace}/{key} is not at version {expected_version}"
            )
        return expected_version + 1

    async def delete_namespace(self, namespace: str) -> None:
        self._conn.execute("DELETE FROM documents WHERE namespace = ?", (namespace,))

    async def get_saga(self, saga_id: str) -> SagaRecord | None:
        return self._db.get_saga_sync(saga_id, history=False)

    async def put_saga(self, record: SagaRecord) -> None:
        now = self.now
        data = _JSON.encode(record.data).decode()
        if record.version == 0:
            try:
                self._conn.execute(
                    "INSERT INTO sagas (saga_id, definition, definition_version, status, step,"
                    " data, version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    (
                        record.saga_id,
                        record.definition,
                        record.definition_version,
                        record.status,
                        record.step,
                        data,
                        now,
                        now,
                    ),
                )
            except sqlite3.IntegrityError:
                raise ConcurrencyError(f"saga {record.saga_id!r} already exists") from None
            record.created_at = now
        else:
            if record.status == record.loaded_status:
                # The status index is left alone unless the status changes.
                cursor = self._conn.execute(
                    "UPDATE sagas SET step = ?, data = ?, version = version + 1,"
                    " updated_at = ? WHERE saga_id = ? AND version = ?",
                    (record.step, data, now, record.saga_id, record.version),
                )
            else:
                cursor = self._conn.execute(
                    "UPDATE sagas SET status = ?, step = ?, data = ?, version = version + 1,"
                    " updated_at = ? WHERE saga_id = ? AND version = ?",
                    (record.status, record.step, data, now, record.saga_id, record.version),
                )
            if cursor.rowcount != 1:
                raise ConcurrencyError(
                    f"saga {record.saga_id!r} is not at version {record.version}"
                )
        record.version += 1
        record.updated_at = now
        record.loaded_status = record.status
        for n, entry in enumerate(record.new_history):
            self._conn.execute(
                "INSERT INTO saga_history (saga_id, version, entry, data) VALUES (?, ?, ?, ?)",
                (record.saga_id, record.version, n, _JSON.encode(entry).decode()),
            )
        if record.new_history:
            record.history.extend(record.new_history)
            record.new_history = []

    async def emit(self, envelopes: Sequence[Envelope], routes: dict[str, str]) -> None:
        commands: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        now = time.time()
        for envelope in envelopes:
            queue = routes.get(envelope.message_type)
            if queue is not None:
                commands.append((queue, envelope.correlation_id, *_envelope_params(envelope), now))
            else:
                events.append((*_envelope_params(envelope), partition_of(envelope.correlation_id)))
        if commands:
            self._conn.executemany(
                "INSERT INTO commands (queue, key, message_id, type, body, correlation_id,"
                " causation_id, timestamp, traceparent, source, available_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                # A message sent again with its id (a client's retry) is the same message.
                " ON CONFLICT (message_id) DO NOTHING",
                commands,
            )
        if events:
            self._conn.executemany(
                "INSERT INTO events (message_id, type, body, correlation_id, causation_id,"
                " timestamp, traceparent, source, part) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (message_id) DO NOTHING",
                events,
            )
        if envelopes:
            self.wrote_messages = True

    async def dead_letter(
        self, consumer: str, envelope: Envelope, reason: str, attempts: int
    ) -> None:
        self._conn.execute(
            "INSERT INTO dead_letters (consumer, message_id, type, body, correlation_id,"
            " causation_id, timestamp, source, reason, attempts, failed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                consumer,
                envelope.message_id,
                envelope.message_type,
                envelope.body.decode(errors="replace"),
                envelope.correlation_id,
                envelope.causation_id,
                envelope.timestamp,
                envelope.source,
                reason,
                attempts,
                utc_timestamp(),
            ),
        )


class SqliteDatabase:
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
        self._wakeups: dict[tuple[str, str], asyncio.Event] = {}
        self._members: dict[tuple[str, str], _Membership] = {}
        self._checkpointer: tuple[threading.Thread, threading.Event] | None = None
        self._migrate()

    # ----------------------------------------------------------------- schema

    def _migrate(self) -> None:
        conn = self.connection
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute(
                "SELECT value FROM sagaline_meta WHERE key = 'schema_version'"
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO sagaline_meta (key, value) VALUES ('schema_version', ?),"
                    " ('partitions', ?)",
                    (str(SCHEMA_VERSION), str(PARTITIONS)),
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"{self.path} has schema version {row[0]}; this sagaline knows"
                    f" {SCHEMA_VERSION}: upgrade sagaline"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        """One unit of work; the in-process lock keeps services' transactions apart."""
        async with self._lock:
            conn = self.connection
            conn.execute("BEGIN IMMEDIATE")
            tx = SqliteTransaction(self)
            try:
                yield tx
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

    # ----------------------------------------------------------------- bus

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Lease up to ``limit`` deliveries for ``consumer``."""
        # Arm the wake-up before looking: a commit from now on wakes a later wait_for_work.
        self._wakeup(consumer).clear()
        async with self._lock:
            if consumer.source == "queue":
                return self._claim_queue(consumer, member, limit)
            return self._claim_subscription(consumer, member, limit)

    @contextmanager
    def _without_fsync(self) -> Iterator[None]:
        """Commit without waiting for the disk: only for bookkeeping that may be lost.

        A lease or membership row lost to a power cut only makes a message claimable again
        sooner; the next FULL commit flushes these WAL frames along with its own.
        """
        self.connection.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self.connection.execute("PRAGMA synchronous=FULL")

    def _claim_queue(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        with self._without_fsync():
            return self._claim_queue_rows(consumer, member, limit)

    def _claim_queue_rows(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        conn = self.connection
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(
                "UPDATE commands SET lease_owner = ?, lease_expires = ?, attempts = attempts + 1"
                " WHERE id IN ("
                "  SELECT c.id FROM commands c"
                "  WHERE c.queue = ? AND c.done = 0 AND c.available_at <= ?"
                "   AND (c.lease_expires IS NULL OR c.lease_expires < ?)"
                "   AND NOT EXISTS (SELECT 1 FROM commands p WHERE p.queue = c.queue"
                "    AND p.key = c.key AND p.done = 0 AND p.id < c.id)"
                "  ORDER BY c.id LIMIT ?)"
                f" RETURNING id, attempts, key, {_ENVELOPE_COLUMNS}",
                (member, now + self.lease_seconds, consumer.name, now, now, limit),
            ).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        rows.sort(key=lambda row: row[0])
        deliveries = [
            Delivery(envelope=_envelope(row, 3), attempt=row[1], ordering_key=row[2], token=row[0])
            for row in rows
        ]
        return Batch(consumer=consumer, deliveries=deliveries)

    def _refresh_membership(self, consumer: ConsumerSpec, member: str, now: float) -> list[int]:
        """Heartbeat, then hold a fair share of the subscriber's partitions (in a transaction)."""
        conn = self.connection
        name = consumer.name
        conn.execute(
            "INSERT INTO members (consumer, member, heartbeat) VALUES (?, ?, ?)"
            " ON CONFLICT (consumer, member) DO UPDATE SET heartbeat = excluded.heartbeat",
            (name, member, now),
        )
        conn.execute(
            "DELETE FROM members WHERE consumer = ? AND heartbeat < ?",
            (name, now - self.lease_seconds),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO subscriptions (subscriber, part) VALUES (?, ?)",
            [(name, part) for part in range(PARTITIONS)],
        )
        live = conn.execute("SELECT COUNT(*) FROM members WHERE consumer = ?", (name,)).fetchone()[
            0
        ]
        share = math.ceil(PARTITIONS / max(1, live))
        expires = now + self.lease_seconds
        owned = [
            row[0]
            for row in conn.execute(
                "SELECT part FROM subscriptions WHERE subscriber = ? AND lease_owner = ?"
                " AND lease_expires >= ? ORDER BY part",
                (name, member, now),
            )
        ]
        if len(owned) > share:
            surplus = owned[share:]
            owned = owned[:share]
            conn.executemany(
                "UPDATE subscriptions SET lease_owner = NULL, lease_expires = NULL"
                " WHERE subscriber = ? AND part = ? AND lease_owner = ?",
                [(name, part, member) for part in surplus],
            )
        elif len(owned) < share:
            free = [
                row[0]
                for row in conn.execute(
                    "SELECT part FROM subscriptions WHERE subscriber = ?"
                    " AND (lease_owner IS NULL OR lease_expires < ?) ORDER BY part LIMIT ?",
                    (name, now, share - len(owned)),
                )
            ]
            owned.extend(free)
        conn.executemany(
            "UPDATE subscriptions SET lease_owner = ?, lease_expires = ?"
            " WHERE subscriber = ? AND part = ?",
            [(member, expires, name, part) for part in owned],
        )
        return sorted(owned)

    def _claim_subscription(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        with self._without_fsync():
            return self._claim_subscription_rows(consumer, member, limit)

    def _claim_subscription_rows(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        conn = self.connection
        now = time.monotonic()
        wall = time.time()
        membership = self._members.setdefault((consumer.name, member), _Membership())
        conn.execute(
            "BEGIN IMMEDIATE" if now - membership.refreshed > MEMBERSHIP_INTERVAL else "BEGIN"
        )
        try:
            if now - membership.refreshed > MEMBERSHIP_INTERVAL:
                membership.owned = self._refresh_membership(consumer, member, wall)
                membership.refreshed = now
            if not membership.owned:
                conn.execute("COMMIT")
                return Batch(consumer=consumer, deliveries=[])
            marks = ",".join("?" * len(membership.owned))
            state = conn.execute(
                "SELECT part, position, attempts, available_at FROM subscriptions"
                f" WHERE subscriber = ? AND lease_owner = ? AND part IN ({marks})",
                (consumer.name, member, *membership.owned),
            ).fetchall()
            eligible = {part: position for part, position, _, due in state if due <= wall}
            attempts = {part: tries for part, _, tries, _ in state}
            if not eligible:
                conn.execute("COMMIT")
                return Batch(consumer=consumer, deliveries=[])
            start = min(eligible.values())
            head = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
            wanted = sorted(consumer.message_types)
            rows = conn.execute(
                f"SELECT position, part, {_ENVELOPE_COLUMNS} FROM events"
                f" WHERE position > ? AND type IN ({','.join('?' * len(wanted))})"
                " ORDER BY position LIMIT ?",
                (start, *wanted, limit * SCAN_FACTOR),
            )
            deliveries: list[Delivery] = []
            first_seen: set[int] = set()
            scanned_to = head
            seen = 0
            for row in rows:
                seen += 1
                position, part = row[0], row[1]
                cursor = eligible.get(part)
                if cursor is None or position <= cursor:
                    continue
                attempt = 1
                if part not in first_seen:
                    first_seen.add(part)
                    attempt = attempts.get(part, 0) + 1
                deliveries.append(
                    Delivery(
                        envelope=_envelope(row, 2),
                        attempt=attempt,
                        ordering_key=part,
                        token=position,
                    )
                )
                if len(deliveries) >= limit:
                    scanned_to = position
                    break
            else:
                if seen == limit * SCAN_FACTOR:  # the scan stopped short of the head
                    scanned_to = position
            rows.close()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if scanned_to == start:
            return Batch(consumer=consumer, deliveries=[])
        return Batch(
            consumer=consumer,
            deliveries=deliveries,
            cursor=_SubscriptionCursor(
                positions=eligible, attempts=attempts, scanned_to=scanned_to
            ),
        )

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Hand back what ``member`` holds at once: its membership and partition leases.

        A stopping worker calls it, so its successor does not wait for the leases to expire;
        claimed commands are left to expire (their batch was settled, or it was cut short).
        """
        if consumer.source != "subscription":
            return
        async with self._lock:
            conn = self.connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "DELETE FROM members WHERE consumer = ? AND member = ?",
                    (consumer.name, member),
                )
                conn.execute(
                    "UPDATE subscriptions SET lease_owner = NULL, lease_expires = NULL"
                    " WHERE subscriber = ? AND lease_owner = ?",
                    (consumer.name, member),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._members.pop((consumer.name, member), None)

    async def settle(
        self,
        tx: Any,
        batch: Batch,
        outcomes: Sequence[tuple[Outcome, str | None]],
    ) -> None:
        """Acknowledge, schedule retries and dead-letter inside the handling transaction."""
        conn = self.connection
        wall = time.time()
        policy = batch.consumer.retry
        if batch.consumer.source == "queue":
            done: list[tuple[Any, ...]] = []
            retry: list[tuple[Any, ...]] = []
            release: list[tuple[Any, ...]] = []
            for delivery, (outcome, error) in zip(batch.deliveries, outcomes, strict=True):
                if outcome is Outcome.ACK or outcome is Outcome.DEAD:
                    done.append(
                        ("handled" if outcome is Outcome.ACK else "dead", error, delivery.token)
                    )
                elif outcome is Outcome.RETRY:
                    retry.append((wall + policy.delay(delivery.attempt), error, delivery.token))
                else:
                    release.append((delivery.token,))
            conn.executemany(
                "UPDATE commands SET done = 1, outcome = ?, last_error = ?, lease_owner = NULL,"
                " lease_expires = NULL WHERE id = ?",
                done,
            )
            conn.executemany(
                "UPDATE commands SET available_at = ?, last_error = ?, lease_owner = NULL,"
                " lease_expires = NULL WHERE id = ?",
                retry,
            )
            conn.executemany(
                "UPDATE commands SET lease_owner = NULL, lease_expires = NULL,"
                " attempts = attempts - 1 WHERE id = ?",
                release,
            )
            return
        state: _SubscriptionCursor = batch.cursor
        # A partition stops at its first retried delivery; before that it moves to the scan's end.
        stop: dict[int, tuple[int, int, str | None]] = {}
        for delivery, (outcome, error) in zip(batch.deliveries, outcomes, strict=True):
            part = delivery.ordering_key
            if part in stop:
                continue
            if outcome is Outcome.RETRY or outcome is Outcome.SKIP:
                stop[part] = (delivery.token - 1, delivery.attempt, error)
        updates: list[tuple[Any, ...]] = []
        for part in state.positions:
            if part in stop:
                position, attempt, error = stop[part]
                if error is None:  # skipped behind another key's failure: no attempt spent
                    updates.append((position, state.attempts.get(part, 0), 0.0, None, part))
                else:
                    updates.append((position, attempt, wall + policy.delay(attempt), error, part))
            else:
                updates.append((state.scanned_to, 0, 0.0, None, part))
        conn.executemany(
            "UPDATE subscriptions SET position = MAX(position, ?), attempts = ?,"
            " available_at = ?, last_error = ? WHERE subscriber = ? AND part = ?",
            [(p, a, due, err, batch.consumer.name, part) for p, a, due, err, part in updates],
        )

    async def wait_for_work(self, consumer: ConsumerSpec, timeout: float) -> None:
        """Wait for an in-process commit that wrote messages, or poll after ``timeout``."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup(consumer).wait(), timeout)

    def _wakeup(self, consumer: ConsumerSpec) -> asyncio.Event:
        key = (consumer.name, consumer.source)
        event = self._wakeups.get(key)
        if event is None:
            event = self._wakeups[key] = asyncio.Event()
        return event

    def get_meta(self, key: str) -> str | None:
        """A value of the file's metadata table, or None."""
        row = self.connection.execute(
            "SELECT value FROM sagaline_meta WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else str(row[0])

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

    def reset_subscription(self, subscriber: str, position: int) -> None:
        """Move every partition cursor of ``subscriber`` to ``position`` (inside a transaction)."""
        self.connection.executemany(
            "INSERT OR IGNORE INTO subscriptions (subscriber, part) VALUES (?, ?)",
            [(subscriber, part) for part in range(PARTITIONS)],
        )
        self.connection.execute(
            "UPDATE subscriptions SET position = ?, attempts = 0, available_at = 0,"
            " last_error = NULL WHERE subscriber = ?",
            (position, subscriber),
        )

    # --------------------------------------------------------------- queries

    def read_stream_sync(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order."""
        rows = self.connection.execute(
            f"SELECT position, stream, version, {_ENVELOPE_COLUMNS} FROM events"
            " WHERE stream = ? ORDER BY version",
            (stream,),
        ).fetchall()
        return [StoredEvent(row[0], row[1], row[2], _envelope(row, 3)) for row in rows]

    async def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """The global event log after ``after``, at most ``limit`` events."""
        rows = self.connection.execute(
            f"SELECT position, stream, version, {_ENVELOPE_COLUMNS} FROM events"
            " WHERE position > ? ORDER BY position LIMIT ?",
            (after, limit),
        ).fetchall()
        return [StoredEvent(row[0], row[1], row[2], _envelope(row, 3)) for row in rows]

    async def iter_log(self, after: int = 0, batch: int = 1000) -> AsyncIterator[StoredEvent]:
        """Stream the global log in pages of ``batch`` events."""
        while True:
            page = await self.read_log(after, batch)
            if not page:
                return
            for event in page:
                yield event
            after = page[-1].position

    def head_position(self) -> int:
        """The position of the newest event (0 when the log is empty)."""
        row = self.connection.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()
        return int(row[0])

    def get_saga_sync(self, saga_id: str, *, history: bool = True) -> SagaRecord | None:
        """One saga instance (with its history unless told otherwise), or None."""
        row = self.connection.execute(
            "SELECT saga_id, definition, definition_version, status, step, data,"
            " version, created_at, updated_at FROM sagas WHERE saga_id = ?",
            (saga_id,),
        ).fetchone()
        if row is None:
            return None
        record = _saga(row)
        if history:
            record.history = [
                _decode_json(entry)
                for (entry,) in self.connection.execute(
                    "SELECT data FROM saga_history WHERE saga_id = ? ORDER BY version, entry",
                    (saga_id,),
                )
            ]
        return record

    def list_sagas(self, status: str | None = None) -> list[SagaRecord]:
        """Saga instances (without their history), optionally of one status."""
        sql = (
            "SELECT saga_id, definition, definition_version, status, step, data,"
            " version, created_at, updated_at FROM sagas"
        )
        params: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            params = (status,)
        return [_saga(row) for row in self.connection.execute(sql + " ORDER BY created_at", params)]

    def saga_counts(self) -> dict[str, int]:
        """How many sagas are in each status."""
        return dict(
            self.connection.execute("SELECT status, COUNT(*) FROM sagas GROUP BY status").fetchall()
        )

    def get_document_sync(self, namespace: str, key: str) -> Document | None:
        """One document, or None (outside any unit of work)."""
        row = self.connection.execute(
            "SELECT data, version FROM documents WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        return None if row is None else Document(_decode_json(row[0]), row[1])

    def query_documents(
        self, namespace: str, filters: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Documents of a namespace whose top-level fields equal ``filters`` (parameters only)."""
        sql = "SELECT data FROM documents WHERE namespace = ?"
        params: list[Any] = [namespace]
        for name, value in (filters or {}).items():
            if not name.isidentifier():
                raise ValueError(f"not a field name: {name!r}")
            sql += " AND json_extract(data, ?) = ?"
            params.extend([f"$.{name}", value])
        return [
            _decode_json(row[0]) for row in self.connection.execute(sql + " ORDER BY key", params)
        ]

    def trace_rows(self, correlation_id: str) -> list[dict[str, Any]]:
        """Every command and event of one business key, with who handled it and when."""
        rows = self.connection.execute(
            "SELECT 'event', position, message_id, type, body, causation_id, timestamp, source,"
            " NULL, stream, version FROM events WHERE correlation_id = ?"
            " UNION ALL"
            " SELECT 'command', id, message_id, type, body, causation_id, timestamp, source,"
            " queue, outcome, attempts FROM commands WHERE correlation_id = ?",
            (correlation_id, correlation_id),
        ).fetchall()
        handled: dict[str, list[tuple[str, str]]] = {}
        ids = [row[2] for row in rows]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for message_id, consumer, at in self.connection.execute(
                "SELECT message_id, consumer, processed_at FROM inbox"
                f" WHERE message_id IN ({marks}) ORDER BY processed_at",
                chunk,
            ):
                handled.setdefault(message_id, []).append((consumer, at))
        result = []
        for (
            kind,
            seq,
            message_id,
            type_,
            body,
            causation,
            ts,
            source,
            queue,
            extra1,
            extra2,
        ) in rows:
            entry: dict[str, Any] = {
                "kind": kind,
                "sequence": seq,
                "messageId": message_id,
                "type": type_,
                "body": _decode_json(body),
                "causationId": causation,
                "timestamp": ts,
                "source": source,
                "handledBy": [{"consumer": c, "at": at} for c, at in handled.get(message_id, [])],
            }
            if kind == "command":
                entry.update({"queue": queue, "outcome": extra1, "deliveries": extra2})
            else:
                entry.update({"stream": extra1, "version": extra2})
            result.append(entry)
        return result

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        rows = self.connection.execute(
            "SELECT id, consumer, message_id, type, body, correlation_id, causation_id, timestamp,"
            " source, reason, attempts, failed_at FROM dead_letters ORDER BY id"
        ).fetchall()
        return [
            DeadLetter(
                id=row[0],
                consumer=row[1],
                envelope=Envelope(
                    message_id=row[2],
                    message_type=row[3],
                    body=row[4].encode(),
                    correlation_id=row[5],
                    causation_id=row[6],
                    timestamp=row[7],
                    source=row[8],
                ),
                reason=row[9],
                attempts=row[10],
                failed_at=row[11],
            )
            for row in rows
        ]

    def pending_counts(self) -> dict[str, int]:
        """Undone commands per queue."""
        return dict(
            self.connection.execute(
                "SELECT queue, COUNT(*) FROM commands WHERE done = 0 GROUP BY queue"
            ).fetchall()
        )

    def subscription_lag(self) -> dict[str, int]:
        """Per subscriber, how many log positions its slowest partition is behind."""
        head = self.head_position()
        return {
            name: head - low
            for name, low in self.connection.execute(
                "SELECT subscriber, MIN(position) FROM subscriptions GROUP BY subscriber"
            )
        }

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query for checks and tools (parameters only)."""
        return self.connection.execute(sql, params).fetchall()


def _saga(row: Sequence[Any]) -> SagaRecord:
    return SagaRecord(
        saga_id=row[0],
        definition=row[1],
        definition_version=row[2],
        status=row[3],
        step=row[4],
        data=_decode_json(row[5]),
        loaded_status=row[3],
        version=row[6],
        created_at=row[7],
        updated_at=row[8],
    )


if TYPE_CHECKING:

    def _implements_ports(
        db: SqliteDatabase, tx: SqliteTransaction
    ) -> tuple[Backend, StoreTransaction]:
        return db, tx
