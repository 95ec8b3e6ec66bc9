"""One unit of work on PostgreSQL: inbox, event store, documents, sagas, outgoing messages.

Every method is one statement whatever the number of rows (arrays and ``unnest``), so a batch of
hundreds of messages costs a handful of round trips. Events bound for the log are written when
the unit of work commits (:meth:`PostgresTransaction.flush`): positions are given under the lock
of the log's head row, held until the commit, so they follow commit order with no hole.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection

from sagaline.backends.sqlite.rows import (
    ENVELOPE_COLUMNS,
    JSON,
    decode_json,
    envelope_from_row,
    partition_of,
    saga_from_row,
)
from sagaline.errors import ConcurrencyError
from sagaline.messages import Envelope, utc_timestamp
from sagaline.ports import Document, SagaRecord, StoredEvent

if TYPE_CHECKING:
    from sagaline.backends.postgres import PostgresDatabase

__all__ = ["ENVELOPE_ARRAYS", "PostgresTransaction", "envelope_arrays", "queue_payload"]

#: The envelope columns as typed arrays for ``unnest`` (see :func:`envelope_arrays`).
ENVELOPE_ARRAYS = ", ".join(["%s::text[]"] * 8)
SAGA_COLUMNS = (
    "saga_id, definition, definition_version, status, step, data, version, created_at, updated_at"
)


def body_text(body: bytes) -> str:
    """A body as PostgreSQL text. A body that is not UTF-8 text or holds NUL (a foreign
    producer's bytes) is stored with those bytes replaced: it is invalid either way, and is
    dead-lettered by its consumer rather than refused at the door."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = body.decode(errors="replace")
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def envelope_arrays(envelopes: Sequence[Envelope]) -> list[list[Any]]:
    """The envelopes as one list per column of :data:`ENVELOPE_COLUMNS`."""
    return [
        [e.message_id for e in envelopes],
        [e.message_type for e in envelopes],
        [body_text(e.body) for e in envelopes],
        [e.correlation_id for e in envelopes],
        [e.causation_id for e in envelopes],
        [e.timestamp for e in envelopes],
        [e.traceparent for e in envelopes],
        [e.source for e in envelopes],
    ]


def queue_payload(queue: str) -> str:
    """The NOTIFY payload that announces new commands on ``queue``."""
    return f"q:{queue}"


class PostgresTransaction:
    """One transaction on a pooled connection; see :meth:`PostgresDatabase.transaction`."""

    def __init__(self, db: PostgresDatabase, conn: AsyncConnection[Any]) -> None:
        self._db = db
        self.connection = conn
        self._s = db.names.store
        self._b = db.names.bus
        # One timestamp for the whole unit of work: it commits at one moment.
        self.now = utc_timestamp()
        self._history: list[tuple[str, int, int, str]] = []
        # Events for the log, written at commit: (stream, version, envelope).
        self._log: list[tuple[str | None, int | None, Envelope]] = []
        # Stream events of an outbox store, whose positions are given at commit.
        self._placed: list[tuple[str, int]] = []
        self._deferred: list[tuple[str, tuple[Any, ...]]] = []
        self.queues: set[str] = set()
        self.wrote_events = False
        self.wrote_outbox = False

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested unit that rolls back alone on error."""
        marks = (len(self._history), len(self._log), len(self._placed), len(self._deferred))
        queues, events, outbox = set(self.queues), self.wrote_events, self.wrote_outbox
        try:
            async with self.connection.transaction():
                yield
        except BaseException:
            del self._history[marks[0] :]
            del self._log[marks[1] :]
            del self._placed[marks[2] :]
            del self._deferred[marks[3] :]
            self.queues, self.wrote_events, self.wrote_outbox = queues, events, outbox
            raise

    async def flush(self) -> None:
        """Write what was kept for the end of the unit of work; called just before COMMIT."""
        conn = self.connection
        if self._history:
            rows = self._history
            await conn.execute(
                f"INSERT INTO {self._s}.saga_history (saga_id, version, entry, data)"
                " SELECT * FROM unnest(%s::text[], %s::int[], %s::int[], %s::text[])",
                (
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2] for r in rows],
                    [r[3] for r in rows],
                ),
            )
            self._history = []
        for sql, params in self._deferred:
            await conn.execute(sql, params)
        self._deferred = []
        if self._log:
            await self._write_log()
        if self._placed:
            await self._place_stream_events()

    def defer(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run a statement when the unit of work commits (for tools called inside it)."""
        self._deferred.append((sql, params))

    async def _write_log(self) -> None:
        """Append the kept events to the bus's log at the head, holding its lock to the commit."""
        unique: dict[str, tuple[str | None, int | None, Envelope]] = {}
        for entry in self._log:
            unique.setdefault(entry[2].message_id, entry)
        entries = list(unique.values())
        self._log = []
        envelopes = [e for _, _, e in entries]
        conn = self.connection
        b = self._b
        # Waits for the appender in front to commit: its rows are visible once this returns.
        await conn.execute(f"SELECT position FROM {b}.log_head FOR UPDATE")
        # A new statement, so a new snapshot: it sees what the appender in front committed.
        await conn.execute(
            f"WITH incoming AS ("
            f" SELECT u.*, (SELECT position FROM {b}.log_head)"
            "   + row_number() OVER (ORDER BY u.ord) AS position"
            f" FROM unnest(%s::text[], %s::int[], {ENVELOPE_ARRAYS}, %s::smallint[])"
            "  WITH ORDINALITY AS u(stream, version, message_id, type, body, correlation_id,"
            "   causation_id, timestamp, traceparent, source, part, ord)"
            f" WHERE NOT EXISTS (SELECT 1 FROM {b}.events e WHERE e.message_id = u.message_id)"
            "), inserted AS ("
            f" INSERT INTO {b}.events (position, stream, version, {ENVELOPE_COLUMNS}, part)"
            f" SELECT position, stream, version, {ENVELOPE_COLUMNS}, part FROM incoming"
            " RETURNING position, stream, version"
            "), head AS ("
            f" UPDATE {b}.log_head SET position = position + (SELECT count(*) FROM inserted)"
            "), placed AS ("
            f" UPDATE {self._s}.streams t SET position = i.position FROM inserted i"
            " WHERE i.stream IS NOT NULL AND t.stream = i.stream AND t.version = i.version"
            ") SELECT pg_notify(%s, 'e') WHERE EXISTS (SELECT 1 FROM inserted)",
            (
                [s for s, _, _ in entries],
                [v for _, v, _ in entries],
                *envelope_arrays(envelopes),
                [partition_of(e.correlation_id) for e in envelopes],
                self._db.names.channel,
            ),
        )

    async def _place_stream_events(self) -> None:
        """Give an outbox store's new stream events their positions in its own log."""
        placed = self._placed
        self._placed = []
        s = self._s
        await self.connection.execute(
            f"WITH head AS (UPDATE {s}.stream_head SET position = position + %s"
            "  RETURNING position - %s AS base)"
            f" UPDATE {s}.streams t SET position = head.base + u.ord"
            " FROM head, unnest(%s::text[], %s::int[]) WITH ORDINALITY AS u(stream, version, ord)"
            " WHERE t.stream = u.stream AND t.version = u.version",
            (len(placed), len(placed), [p[0] for p in placed], [p[1] for p in placed]),
        )

    # ------------------------------------------------------------------ inbox

    async def seen(self, consumer: str, message_ids: Sequence[str]) -> set[str]:
        """Which of ``message_ids`` ``consumer`` has processed already (one query)."""
        if not message_ids:
            return set()
        cursor = await self.connection.execute(
            f"SELECT message_id FROM {self._s}.inbox"
            " WHERE consumer = %s AND message_id = ANY(%s::text[])",
            (consumer, list(message_ids)),
        )
        return {row[0] for row in await cursor.fetchall()}

    async def record_inbox_many(self, consumer: str, message_ids: Sequence[str]) -> None:
        """Mark many messages processed; they must not be marked yet (see :meth:`seen`)."""
        if not message_ids:
            return
        await self.connection.execute(
            f"INSERT INTO {self._s}.inbox (message_id, consumer, processed_at)"
            " SELECT m, %s, %s FROM unnest(%s::text[]) AS m",
            (consumer, self.now, list(message_ids)),
        )

    async def record_inbox(self, consumer: str, message_id: str) -> bool:
        """Mark one message processed by ``consumer``; False if it already was."""
        cursor = await self.connection.execute(
            f"INSERT INTO {self._s}.inbox (message_id, consumer, processed_at)"
            " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (message_id, consumer, self.now),
        )
        return cursor.rowcount == 1

    # ---------------------------------------------------------------- streams

    async def append(self, stream: str, expected_version: int, events: Sequence[Envelope]) -> int:
        """Append to a stream at ``expected_version``; ConcurrencyError on conflict."""
        if not events:
            return expected_version
        versions = list(range(expected_version + 1, expected_version + 1 + len(events)))
        # A stale expected version collides with an existing (stream, version): the primary
        # key is the concurrency check. DO NOTHING keeps the transaction usable after it.
        cursor = await self.connection.execute(
            f"INSERT INTO {self._s}.streams (stream, version, {ENVELOPE_COLUMNS})"
            f" SELECT %s::text, * FROM unnest(%s::int[], {ENVELOPE_ARRAYS})"
            " ON CONFLICT DO NOTHING",
            (stream, versions, *envelope_arrays(events)),
        )
        if cursor.rowcount != len(events):
            if cursor.rowcount > 0:
                await self.connection.execute(
                    f"DELETE FROM {self._s}.streams WHERE stream = %s"
                    " AND version = ANY(%s::int[]) AND message_id = ANY(%s::text[])",
                    (stream, versions, [e.message_id for e in events]),
                )
            raise ConcurrencyError(f"stream {stream!r} has moved past version {expected_version}")
        if self._db.outbox:
            await self._to_outbox(events)
            self._placed.extend((stream, version) for version in versions)
        else:
            self._log.extend((stream, v, e) for v, e in zip(versions, events, strict=True))
            self.wrote_events = True
        return versions[-1]

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order (this unit's appends included)."""
        cursor = await self.connection.execute(
            f"SELECT COALESCE(position, 0), stream, version, {ENVELOPE_COLUMNS}"
            f" FROM {self._s}.streams WHERE stream = %s ORDER BY version",
            (stream,),
        )
        return [
            StoredEvent(row[0], row[1], row[2], envelope_from_row(row, 3))
            for row in await cursor.fetchall()
        ]

    # -------------------------------------------------------------- documents

    async def get_document(self, namespace: str, key: str) -> Document | None:
        """One document, or None."""
        cursor = await self.connection.execute(
            f"SELECT data, version FROM {self._s}.documents WHERE namespace = %s AND key = %s",
            (namespace, key),
        )
        row = await cursor.fetchone()
        return None if row is None else Document(decode_json(row[0]), row[1])

    async def put_document(
        self, namespace: str, key: str, data: dict[str, Any], expected_version: int
    ) -> int:
        """Write a document at ``expected_version`` (0 creates); returns the new version."""
        encoded = JSON.encode(data).decode()
        if expected_version == 0:
            cursor = await self.connection.execute(
                f"INSERT INTO {self._s}.documents (namespace, key, data, version)"
                " VALUES (%s, %s, %s, 1) ON CONFLICT DO NOTHING",
                (namespace, key, encoded),
            )
            if cursor.rowcount != 1:
                raise ConcurrencyError(f"document {namespace}/{key} already exists")
            return 1
        cursor = await self.connection.execute(
            f"UPDATE {self._s}.documents SET data = %s, version = version + 1"
            " WHERE namespace = %s AND key = %s AND version = %s",
            (encoded, namespace, key, expected_version),
        )
        if cursor.rowcount != 1:
            raise ConcurrencyError(
                f"document {namespace}/{key} is not at version {expected_version}"
            )
        return expected_version + 1

    async def delete_namespace(self, namespace: str) -> None:
        """Delete every document of a namespace."""
        await self.connection.execute(
            f"DELETE FROM {self._s}.documents WHERE namespace = %s", (namespace,)
        )

    async def rename_namespace(self, source: str, target: str) -> None:
        """Move every document of ``source`` to ``target``."""
        await self.connection.execute(
            f"UPDATE {self._s}.documents SET namespace = %s WHERE namespace = %s",
            (target, source),
        )

    # ------------------------------------------------------------------ sagas

    async def get_saga(self, saga_id: str) -> SagaRecord | None:
        """One saga instance (without its history), or None."""
        cursor = await self.connection.execute(
            f"SELECT {SAGA_COLUMNS} FROM {self._s}.sagas WHERE saga_id = %s", (saga_id,)
        )
        row = await cursor.fetchone()
        return None if row is None else saga_from_row(row)

    async def put_saga(self, record: SagaRecord) -> None:
        """Insert or update a saga instance at ``record.version``; bumps it."""
        now = self.now
        data = JSON.encode(record.data).decode()
        conn = self.connection
        s = self._s
        if record.version == 0:
            cursor = await conn.execute(
                f"INSERT INTO {s}.sagas ({SAGA_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, 1, %s, %s) ON CONFLICT DO NOTHING",
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
            if cursor.rowcount != 1:
                raise ConcurrencyError(f"saga {record.saga_id!r} already exists")
            record.created_at = now
        else:
            cursor = await conn.execute(
                f"UPDATE {s}.sagas SET status = %s, step = %s, data = %s,"
                " version = version + 1, updated_at = %s WHERE saga_id = %s AND version = %s",
                (record.status, record.step, data, now, record.saga_id, record.version),
            )
            if cursor.rowcount != 1:
                raise ConcurrencyError(
                    f"saga {record.saga_id!r} is not at version {record.version}"
                )
        record.version += 1
        record.updated_at = now
        record.loaded_status = record.status
        self._history.extend(
            (record.saga_id, record.version, n, JSON.encode(entry).decode())
            for n, entry in enumerate(record.new_history)
        )
        if record.new_history:
            record.history.extend(record.new_history)
            record.new_history = []

    # --------------------------------------------------------------- messages

    async def emit(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Commands to their queues and events to the log, or everything to the outbox."""
        if not envelopes:
            return
        if self._db.outbox:
            await self._to_outbox(envelopes)
            return
        await self.emit_to_bus(envelopes, routes)

    async def emit_to_bus(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Commands into the bus's queues now; events into its log at commit."""
        commands: list[tuple[str, Envelope]] = []
        for envelope in envelopes:
            queue = routes.get(envelope.message_type)
            if queue is not None:
                commands.append((queue, envelope))
            else:
                self._log.append((None, None, envelope))
                self.wrote_events = True
        if not commands:
            return
        b = self._b
        await self.connection.execute(
            f"WITH inserted AS ("
            f" INSERT INTO {b}.commands (queue, key, {ENVELOPE_COLUMNS}, available_at)"
            f" SELECT *, %s FROM unnest(%s::text[], %s::text[], {ENVELOPE_ARRAYS})"
            # A message sent again with its id (a client's retry) is the same message.
            " ON CONFLICT (message_id) DO NOTHING RETURNING queue"
            ") SELECT pg_notify(%s, 'q:' || queue) FROM (SELECT DISTINCT queue FROM inserted) q",
            (
                time.time(),
                [q for q, _ in commands],
                [e.correlation_id for _, e in commands],
                *envelope_arrays([e for _, e in commands]),
                self._db.names.channel,
            ),
        )
        self.queues.update(q for q, _ in commands)

    async def _to_outbox(self, envelopes: Sequence[Envelope]) -> None:
        await self.connection.execute(
            f"INSERT INTO {self._s}.outbox ({ENVELOPE_COLUMNS}, created_at)"
            f" SELECT *, %s FROM unnest({ENVELOPE_ARRAYS})",
            (self.now, *envelope_arrays(envelopes)),
        )
        self.wrote_outbox = True

    async def dead_letter(
        self, consumer: str, envelope: Envelope, reason: str, attempts: int
    ) -> None:
        """Record a message that could not be processed."""
        await self.connection.execute(
            f"INSERT INTO {self._s}.dead_letters (consumer, message_id, type, body,"
            " correlation_id, causation_id, timestamp, source, reason, attempts, failed_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
