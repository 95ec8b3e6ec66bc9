"""Read-only queries of the SQLite file for tools: the log, sagas, views, traces, dead letters.

:class:`SqliteReader` reads synchronously on the database's connection: a SQLite-specific
convenience (``db.sync``) for a test or a script that looks between two batches without awaiting.
:class:`SqliteQueries` is the asynchronous query port (:class:`~sagaline.ports.StoreQueries` and
the checker's and waiters' capabilities) that tools use on every backend; it answers inline from
the reader, since a read of a local file takes microseconds and a thread would cost more.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from sagaline.backends._sql.rows import (
    ENVELOPE_COLUMNS,
    decode_json,
    envelope_from_row,
    saga_from_row,
)
from sagaline.messages import Envelope, registry
from sagaline.ports import DeadLetter, Document, SagaRecord, StoredEvent

__all__ = ["SqliteQueries", "SqliteReader"]


class _Connected(Protocol):
    connection: sqlite3.Connection


class SqliteReader:
    """Synchronous reads on the connection of a :class:`SqliteDatabase`, outside any unit of
    work (``db.sync``); the same answers as its asynchronous query port."""

    def __init__(self, db: _Connected) -> None:
        self._db = db

    @property
    def connection(self) -> sqlite3.Connection:
        """The database's connection."""
        return self._db.connection

    def read_stream(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order."""
        rows = self.connection.execute(
            f"SELECT position, stream, version, {ENVELOPE_COLUMNS} FROM events"
            " WHERE stream = ? ORDER BY version",
            (stream,),
        ).fetchall()
        return [StoredEvent(row[0], row[1], row[2], envelope_from_row(row, 3)) for row in rows]

    def head_position(self) -> int:
        """The position of the newest event (0 when the log is empty)."""
        row = self.connection.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()
        return int(row[0])

    def get_saga(self, saga_id: str, *, history: bool = True) -> SagaRecord | None:
        """One saga instance (with its history unless told otherwise), or None."""
        row = self.connection.execute(
            "SELECT saga_id, definition, definition_version, status, step, data,"
            " version, created_at, updated_at FROM sagas WHERE saga_id = ?",
            (saga_id,),
        ).fetchone()
        if row is None:
            return None
        record = saga_from_row(row)
        if history:
            record.history = [
                decode_json(entry)
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
        return [
            saga_from_row(row)
            for row in self.connection.execute(sql + " ORDER BY created_at", params)
        ]

    def saga_counts(self) -> dict[str, int]:
        """How many sagas are in each status."""
        return dict(
            self.connection.execute("SELECT status, COUNT(*) FROM sagas GROUP BY status").fetchall()
        )

    def get_document(self, namespace: str, key: str) -> Document | None:
        """One document, or None (outside any unit of work)."""
        row = self.connection.execute(
            "SELECT data, version FROM documents WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        return None if row is None else Document(decode_json(row[0]), row[1])

    def query_documents(
        self, namespace: str, filters: Mapping[str, Any] | None = None
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
            decode_json(row[0]) for row in self.connection.execute(sql + " ORDER BY key", params)
        ]

    def trace_rows(self, correlation_id: str) -> list[dict[str, Any]]:
        """Every command and event of one business key, with who handled it and when."""
        rows = self.connection.execute(
            "SELECT 'event', position, message_id, type, body, causation_id, timestamp, source,"
            " NULL, stream, version FROM events WHERE correlation_id = ?"
            " UNION ALL"
            " SELECT 'command', id, message_id, type, body, causation_id, timestamp, source,"
            " queue, outcome, attempts FROM commands WHERE correlation_id = ?"
            # Sent through another bus: the outbox is this store's record of what it emitted.
            " UNION ALL"
            " SELECT 'outbox', id, message_id, type, body, causation_id, timestamp, source,"
            " NULL, NULL, NULL FROM outbox WHERE correlation_id = ?"
            # Submitted by a client through another bus: kept by the store that handled it.
            " UNION ALL"
            " SELECT 'received', 0, message_id, type, body, causation_id, timestamp, source,"
            " consumer, NULL, NULL FROM received WHERE correlation_id = ?",
            (correlation_id, correlation_id, correlation_id, correlation_id),
        ).fetchall()
        seen: set[str] = set()
        unique = []
        for row in rows:
            # An appended event is in the stream table and in the outbox: keep the stream row.
            if row[2] not in seen:
                seen.add(row[2])
                unique.append(row)
        rows = unique
        handled = self.handled_by([row[2] for row in rows])
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
                "body": _body_or_none(body),
                "causationId": causation,
                "timestamp": ts,
                "source": source,
                "handledBy": [{"consumer": c, "at": at} for c, at in handled.get(message_id, [])],
            }
            if kind in ("outbox", "received"):
                entry["kind"] = kind = _kind_of(type_)
            if kind == "command":
                entry.update({"queue": queue, "outcome": extra1, "deliveries": extra2})
            else:
                entry.update({"stream": extra1, "version": extra2})
            result.append(entry)
        return result

    def handled_by(self, message_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """Which consumers of this store handled each of ``message_ids``, and when."""
        handled: dict[str, list[tuple[str, str]]] = {}
        for start in range(0, len(message_ids), 500):
            chunk = message_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for message_id, consumer, at in self.connection.execute(
                "SELECT message_id, consumer, processed_at FROM inbox"
                f" WHERE message_id IN ({marks}) ORDER BY processed_at",
                chunk,
            ):
                handled.setdefault(message_id, []).append((consumer, at))
        return handled

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
                    body=row[4].encode() if isinstance(row[4], str) else row[4],
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

    def outbox_pending(self) -> int:
        """How many outbox entries are not published yet."""
        row = self.connection.execute("SELECT COUNT(*) FROM outbox WHERE sent = 0").fetchone()
        return int(row[0])

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

    def is_idle(self, subscribers: Iterable[str] = ()) -> bool:
        """Whether nothing is left to deliver: no command pending, every subscriber at the head.

        ``subscribers`` must have started: one that never claimed has no cursor yet, and would
        otherwise look caught up. Read in one snapshot, so that a commit of another process
        cannot fall between the two looks; a unit of work open on this connection means work in
        flight.
        """
        conn = self.connection
        if conn.in_transaction:
            return False
        conn.execute("BEGIN")
        try:
            pending = self.pending_counts()
            lag = self.subscription_lag()
        finally:
            conn.execute("COMMIT")
        return not pending and set(subscribers) <= set(lag) and not any(lag.values())

    def audit_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row the invariant checker reads, table by table, in one consistent read.

        The contract, shared by every backend that implements it (the checker in
        :mod:`sagaline.testing.invariants` builds its snapshot from these shapes only): a dict
        with exactly the keys below, each a list of tuples whose columns come in this order.
        A backend without a table returns an empty list for it. JSON columns hold the JSON text
        as stored (``str``; numbers with a fraction are read back exactly as decimals);
        timestamps are the ISO 8601 text the envelopes carry; ``done`` and ``sent`` are 0 or 1.

        * ``events`` (the event log: event-sourced appends, which carry a stream, and, when this
          database is a bus, every published event), by ``position``:
          ``(position, stream, version, part, message_id, type, body, correlation_id,
          causation_id, timestamp, traceparent, source)``; ``stream`` and ``version`` are NULL
          for a published event, ``part`` is the log partition of the correlation id.
        * ``commands`` (the command queues, when this database is a bus), by ``id``:
          ``(id, queue, message_id, type, correlation_id, causation_id, timestamp, source,
          done, outcome, attempts, last_error)``; ``outcome`` is ``'handled'``, ``'dead'`` or
          NULL while ``done`` is 0.
        * ``outbox`` (what a store in outbox mode emitted, commands and events alike), by
          ``id``: ``(id, message_id, type, body, correlation_id, causation_id, timestamp,
          traceparent, source, sent)``.
        * ``inbox`` (messages handled, per consumer), by consumer then message id:
          ``(consumer, message_id)``.
        * ``subscriptions`` (subscriber cursors, when this database is a bus), by subscriber
          then part: ``(subscriber, part, position)``; ``position`` is the last log position
          the subscriber has settled in that partition.
        * ``dead_letters``, by ``id``: ``(id, consumer, message_id, type, correlation_id,
          causation_id, source, reason, attempts, failed_at)``.
        * ``documents``, by namespace then key: ``(namespace, key, data, version)``.
        * ``sagas``, by ``saga_id``: ``(saga_id, definition, definition_version, status, step,
          data, version, created_at, updated_at)``.
        * ``saga_history``, by saga id, version, entry: ``(saga_id, version, entry, data)``.

        Reads in one transaction when none is open on the connection, so that a commit of
        another process cannot fall between two tables.
        """
        queries = {
            "events": "SELECT position, stream, version, part, message_id, type, body,"
            " correlation_id, causation_id, timestamp, traceparent, source FROM events"
            " ORDER BY position",
            "commands": "SELECT id, queue, message_id, type, correlation_id, causation_id,"
            " timestamp, source, done, outcome, attempts, last_error FROM commands ORDER BY id",
            "outbox": "SELECT id, message_id, type, body, correlation_id, causation_id,"
            " timestamp, traceparent, source, sent FROM outbox ORDER BY id",
            "inbox": "SELECT consumer, message_id FROM inbox ORDER BY consumer, message_id",
            "subscriptions": "SELECT subscriber, part, position FROM subscriptions"
            " ORDER BY subscriber, part",
            "dead_letters": "SELECT id, consumer, message_id, type, correlation_id,"
            " causation_id, source, reason, attempts, failed_at FROM dead_letters ORDER BY id",
            "documents": "SELECT namespace, key, data, version FROM documents"
            " ORDER BY namespace, key",
            "sagas": "SELECT saga_id, definition, definition_version, status, step, data,"
            " version, created_at, updated_at FROM sagas ORDER BY saga_id",
            "saga_history": "SELECT saga_id, version, entry, data FROM saga_history"
            " ORDER BY saga_id, version, entry",
        }
        conn = self.connection
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}
        finally:
            if own:
                conn.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query for checks and tools (parameters only)."""
        return self.connection.execute(sql, params).fetchall()

    def get_meta(self, key: str) -> str | None:
        """A value of the file's metadata table, or None."""
        row = self.connection.execute(
            "SELECT value FROM sagaline_meta WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else str(row[0])


class SqliteQueries:
    """The query port of a :class:`SqliteDatabase`, answered inline by its :class:`SqliteReader`
    (outside any unit of work)."""

    connection: sqlite3.Connection
    #: The synchronous reads behind these (SQLite only).
    sync: SqliteReader

    async def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """The global event log after ``after``, at most ``limit`` events."""
        rows = self.connection.execute(
            f"SELECT position, stream, version, {ENVELOPE_COLUMNS} FROM events"
            " WHERE position > ? ORDER BY position LIMIT ?",
            (after, limit),
        ).fetchall()
        return [StoredEvent(row[0], row[1], row[2], envelope_from_row(row, 3)) for row in rows]

    async def iter_log(self, after: int = 0, batch: int = 1000) -> AsyncIterator[StoredEvent]:
        """Stream the global log in pages of ``batch`` events."""
        while True:
            page = await self.read_log(after, batch)
            if not page:
                return
            for event in page:
                yield event
            after = page[-1].position

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order."""
        return self.sync.read_stream(stream)

    async def head_position(self) -> int:
        """The position of the newest event (0 when the log is empty)."""
        return self.sync.head_position()

    async def get_saga(self, saga_id: str, *, history: bool = True) -> SagaRecord | None:
        """One saga instance (with its history unless told otherwise), or None."""
        return self.sync.get_saga(saga_id, history=history)

    async def list_sagas(self, status: str | None = None) -> list[SagaRecord]:
        """Saga instances (without their history), optionally of one status."""
        return self.sync.list_sagas(status)

    async def saga_counts(self) -> dict[str, int]:
        """How many sagas are in each status."""
        return self.sync.saga_counts()

    async def get_document(self, namespace: str, key: str) -> Document | None:
        """One document, or None (outside any unit of work)."""
        return self.sync.get_document(namespace, key)

    async def query_documents(
        self, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Documents of a namespace whose top-level fields equal ``filters``."""
        return self.sync.query_documents(namespace, filters)

    async def trace_rows(self, correlation_id: str) -> list[dict[str, Any]]:
        """Every command and event of one business key, with who handled it and when."""
        return self.sync.trace_rows(correlation_id)

    async def handled_by(self, message_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """Which consumers of this store handled each of ``message_ids``, and when."""
        return self.sync.handled_by(message_ids)

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        return self.sync.dead_letters()

    async def outbox_pending(self) -> int:
        """How many outbox entries are not published yet."""
        return self.sync.outbox_pending()

    async def pending_counts(self) -> dict[str, int]:
        """Undone commands per queue."""
        return self.sync.pending_counts()

    async def subscription_lag(self) -> dict[str, int]:
        """Per subscriber, how many log positions its slowest partition is behind."""
        return self.sync.subscription_lag()

    async def is_idle(self, subscribers: Iterable[str] = ()) -> bool:
        """Whether nothing is left to deliver (see :meth:`SqliteReader.is_idle`)."""
        return self.sync.is_idle(subscribers)

    async def audit_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row the invariant checker reads (see :meth:`SqliteReader.audit_rows`)."""
        return self.sync.audit_rows()

    async def get_meta(self, key: str) -> str | None:
        """A value of the file's metadata table, or None."""
        return self.sync.get_meta(key)


def _kind_of(message_type: str) -> str:
    """``command`` or ``event``, by the registered type (``event`` when it is unknown)."""
    return registry.kind_of(message_type) or "event"


def _body_or_none(body: str | bytes) -> Any:
    """A logged message's body as JSON, or None when it is not JSON (a rejected message)."""
    try:
        return decode_json(body)
    except (ValueError, msgspec.DecodeError):
        return None
