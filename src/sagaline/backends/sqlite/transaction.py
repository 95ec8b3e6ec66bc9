"""One unit of work on the SQLite file: inbox, event store, documents, sagas, outgoing messages."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sagaline.backends._sql.rows import (
    DEAD_LETTER_COLUMNS,
    ENVELOPE_COLUMNS,
    JSON,
    body_value,
    dead_letter_from_row,
    decode_json,
    envelope_from_row,
    envelope_params,
    partition_of,
)
from sagaline.backends.sqlite.failures import gone, unavailable
from sagaline.errors import ConcurrencyError, DuplicateMessageId, StoreUnavailable
from sagaline.messages import Envelope, utc_timestamp
from sagaline.ports import (
    DEAD_LETTERED,
    DeadLetter,
    Document,
    Reads,
    SagaRecord,
    StoredEvent,
    bounded_dead_letter,
)

if TYPE_CHECKING:
    from sagaline.backends.sqlite import SqliteDatabase

__all__ = ["SqliteTransaction"]


class SqliteTransaction:
    """One ``BEGIN IMMEDIATE`` transaction on the shared connection."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._conn = db.connection
        self.wrote_messages = False
        # One timestamp for the whole unit of work: it commits at one moment.
        self.now = utc_timestamp(db.clock.time())
        # Saga history rows are never read inside a unit of work: they are written in one go
        # when it commits (see flush).
        self._history: list[tuple[str, int, int, str]] = []

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested unit that rolls back alone on error.

        An error that leaves the store unusable (a full disk, an I/O error), or after which SQLite
        rolled back the whole transaction, is no single message's failure: it is raised as
        :class:`StoreUnavailable`, and the whole unit of work is abandoned.
        """
        conn = self._conn
        path = self._db.path
        url = self._db.url
        conn.execute("SAVEPOINT message")
        history = len(self._history)
        try:
            yield
        except BaseException as exc:
            if not conn.in_transaction:
                if isinstance(exc, Exception) and not isinstance(exc, StoreUnavailable):
                    raise gone(exc, url, path) from exc
                raise
            conn.execute("ROLLBACK TO message")
            conn.execute("RELEASE message")
            del self._history[history:]
            if isinstance(exc, Exception):
                translated = unavailable(exc, url, path)
                if translated is not None and translated is not exc:
                    raise translated from exc
            raise
        if not conn.in_transaction:
            # The block swallowed an error after which SQLite rolled the transaction back.
            raise gone(sqlite3.OperationalError("no transaction is active"), url, path)
        conn.execute("RELEASE message")

    def flush(self) -> None:
        """Write what was kept for the end of the unit of work; called just before COMMIT."""
        if self._history:
            self._conn.executemany(
                "INSERT INTO saga_history (saga_id, version, entry, data) VALUES (?, ?, ?, ?)",
                self._history,
            )
            self._history.clear()

    async def prefetch(self, reads: Reads) -> None:
        """Nothing to do: every read is a local page lookup, as cheap as a batched one."""

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

    async def handling_counts(self, consumer: str, message_ids: Sequence[str]) -> list[int]:
        counts: dict[str, int] = {}
        for message_id in dict.fromkeys(message_ids):
            row = self._conn.execute(
                "SELECT starts FROM handling_starts WHERE message_id = ? AND consumer = ?",
                (message_id, consumer),
            ).fetchone()
            counts[message_id] = 0 if row is None else int(row[0])
        return [counts[message_id] for message_id in message_ids]

    async def handling_started(self, consumer: str, message_ids: Sequence[str]) -> list[int]:
        counts: dict[str, int] = {}
        for message_id in dict.fromkeys(message_ids):
            self._conn.execute(
                "INSERT INTO handling_starts (message_id, consumer, starts) VALUES (?, ?, 1)"
                " ON CONFLICT (message_id, consumer) DO UPDATE SET starts = starts + 1",
                (message_id, consumer),
            )
            row = self._conn.execute(
                "SELECT starts FROM handling_starts WHERE message_id = ? AND consumer = ?",
                (message_id, consumer),
            ).fetchone()
            counts[message_id] = int(row[0])
        return [counts[message_id] for message_id in message_ids]

    async def handling_aborted(self, consumer: str, message_ids: Sequence[str]) -> None:
        self._conn.executemany(
            "UPDATE handling_starts SET starts = starts - 1"
            " WHERE message_id = ? AND consumer = ? AND starts > 0 AND starts < ?",
            [(message_id, consumer, DEAD_LETTERED) for message_id in dict.fromkeys(message_ids)],
        )

    async def handling_ended(
        self, consumer: str, message_id: str, *, dead_lettered: bool = False
    ) -> None:
        if dead_lettered:
            self._conn.execute(
                "UPDATE handling_starts SET starts = ? WHERE message_id = ? AND consumer = ?",
                (DEAD_LETTERED, message_id, consumer),
            )
        else:
            self._conn.execute(
                "DELETE FROM handling_starts WHERE message_id = ? AND consumer = ?",
                (message_id, consumer),
            )

    async def append(self, stream: str, expected_version: int, events: Sequence[Envelope]) -> int:
        # A stale expected version collides with an existing (stream, version): the unique
        # constraint is the concurrency check.
        rows = [
            (stream, expected_version + i + 1, *envelope_params(e), partition_of(e.correlation_id))
            for i, e in enumerate(events)
        ]
        sql = (
            "INSERT INTO events (stream, version, message_id, type, body, correlation_id,"
            " causation_id, timestamp, traceparent, source, part)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        try:
            # One event is the common case, and execute costs less than executemany.
            if len(rows) == 1:
                self._conn.execute(sql, rows[0])
            else:
                self._conn.executemany(sql, rows)
        except sqlite3.IntegrityError:
            raise ConcurrencyError(
                f"stream {stream!r} has moved past version {expected_version}"
            ) from None
        if rows:
            self.wrote_messages = True
            if self._db.outbox:
                self._to_outbox(events)
        return expected_version + len(rows)

    def _to_outbox(self, envelopes: Sequence[Envelope]) -> None:
        self._conn.executemany(
            "INSERT INTO outbox (message_id, type, body, correlation_id, causation_id,"
            " timestamp, traceparent, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [envelope_params(envelope) for envelope in envelopes],
        )

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        return self._db.sync.read_stream(stream)

    async def get_document(self, namespace: str, key: str) -> Document | None:
        row = self._conn.execute(
            "SELECT data, version FROM documents WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        if row is None:
            return None
        return Document(decode_json(row[0]), row[1])

    async def put_document(
        self, namespace: str, key: str, data: dict[str, Any], expected_version: int
    ) -> int:
        encoded = JSON.encode(data).decode()
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
        return self._db.sync.get_saga(saga_id, history=False)

    async def put_saga(self, record: SagaRecord) -> None:
        now = self.now
        data = JSON.encode(record.data).decode()
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
        self._history.extend(
            (record.saga_id, record.version, n, JSON.encode(entry).decode())
            for n, entry in enumerate(record.new_history)
        )
        if record.new_history:
            record.history.extend(record.new_history)
            record.new_history = []

    async def emit(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        if self._db.outbox:
            if envelopes:
                self._to_outbox(envelopes)
                self.wrote_messages = True
            return
        self.to_bus(envelopes, routes)

    def to_bus(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Put messages on this file's own queues and log (a message id already there is kept)."""
        commands: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        now = self._db.clock.time()
        for envelope in envelopes:
            queue = routes.get(envelope.message_type)
            if queue is not None:
                commands.append((queue, envelope.correlation_id, *envelope_params(envelope), now))
            else:
                events.append((*envelope_params(envelope), partition_of(envelope.correlation_id)))
        if commands:
            inserted = self._conn.executemany(
                "INSERT INTO commands (queue, key, message_id, type, body, correlation_id,"
                " causation_id, timestamp, traceparent, source, available_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                # A message sent again with its id (a client's retry) is the same message.
                " ON CONFLICT (message_id) DO NOTHING",
                commands,
            ).rowcount
            if inserted != len(commands):
                self._check_known_ids("commands", [row[2:5] for row in commands])
        if events:
            inserted = self._conn.executemany(
                "INSERT INTO events (message_id, type, body, correlation_id, causation_id,"
                " timestamp, traceparent, source, part) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (message_id) DO NOTHING",
                events,
            ).rowcount
            if inserted != len(events):
                self._check_known_ids("events", [row[:3] for row in events])
        if envelopes:
            self.wrote_messages = True

    def _check_known_ids(self, table: str, sent: Sequence[tuple[Any, ...]]) -> None:
        """Some of ``sent`` (message id, type, body) met an id already there: accepted if each
        is the same message again (a retry), else :class:`DuplicateMessageId`, which rolls the
        unit of work back. Only run when an insert was short, so it costs nothing otherwise."""
        for start in range(0, len(sent), 500):
            chunk = sent[start : start + 500]
            stored = {
                row[0]: (row[1], row[2])
                for row in self._conn.execute(
                    f"SELECT message_id, type, body FROM {table} WHERE message_id IN"
                    f" ({','.join('?' * len(chunk))})",
                    [row[0] for row in chunk],
                )
            }
            for message_id, message_type, body in chunk:
                if stored.get(message_id, (message_type, body)) != (message_type, body):
                    raise DuplicateMessageId(message_id)

    async def schedule_timers(self, timers: Sequence[tuple[str, Envelope, float]]) -> None:
        now = self._db.clock.time()
        self._conn.executemany(
            f"INSERT INTO timers (timer_id, due_at, {ENVELOPE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (timer_id) DO UPDATE SET"
            " due_at = excluded.due_at, message_id = excluded.message_id, type = excluded.type,"
            " body = excluded.body, correlation_id = excluded.correlation_id,"
            " causation_id = excluded.causation_id, timestamp = excluded.timestamp,"
            " traceparent = excluded.traceparent, source = excluded.source",
            [(timer_id, now + after, *envelope_params(e)) for timer_id, e, after in timers],
        )

    async def cancel_timers(self, timer_ids: Sequence[str]) -> None:
        self._conn.executemany(
            "DELETE FROM timers WHERE timer_id = ?", [(timer_id,) for timer_id in timer_ids]
        )

    async def take_due_timers(self, limit: int) -> list[Envelope]:
        rows = self._conn.execute(
            f"DELETE FROM timers WHERE timer_id IN (SELECT timer_id FROM timers"
            f" WHERE due_at <= ? ORDER BY due_at LIMIT ?) RETURNING due_at, {ENVELOPE_COLUMNS}",
            (self._db.clock.time(), limit),
        ).fetchall()
        rows.sort(key=lambda row: row[0])
        return [envelope_from_row(row, 1) for row in rows]

    async def remove_dead_letters(self, ids: Sequence[int]) -> list[DeadLetter]:
        removed = [
            dead_letter_from_row(row)
            for row in self._conn.execute(
                f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(ids))})"
                f" RETURNING {DEAD_LETTER_COLUMNS}",
                list(ids),
            ).fetchall()
        ]
        return sorted(removed, key=lambda letter: letter.id)

    async def record_received(self, consumer: str, envelopes: Sequence[Envelope]) -> None:
        self._conn.executemany(
            f"INSERT OR IGNORE INTO received ({ENVELOPE_COLUMNS}, consumer, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*envelope_params(e), consumer, self.now) for e in envelopes],
        )

    async def dead_letter(
        self, consumer: str, envelope: Envelope, reason: str, attempts: int
    ) -> None:
        body, reason = bounded_dead_letter(envelope.body, reason)
        self._conn.execute(
            "INSERT INTO dead_letters (consumer, message_id, type, body, correlation_id,"
            " causation_id, timestamp, source, reason, attempts, failed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                consumer,
                envelope.message_id,
                envelope.message_type,
                body_value(body),
                envelope.correlation_id,
                envelope.causation_id,
                envelope.timestamp,
                envelope.source,
                reason,
                attempts,
                utc_timestamp(self._db.clock.time()),
            ),
        )
