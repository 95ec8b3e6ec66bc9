"""One unit of work on PostgreSQL: inbox, event store, documents, sagas, outgoing messages.

The unit of work keeps an identity map and writes behind:

* Documents, saga records and streams read or written in it are kept in an identity map: a
  repeated read is served from it (a copy, so a caller may change what it got), and a write checks
  its expected version against it at once.
* Writes are collected (documents, sagas and their history, stream appends, inbox marks, commands,
  outbox entries, dead letters) and written when the unit of work commits, or when a savepoint is
  released, with one set-based statement per kind (``unnest`` arrays), all sent in one pipeline.
  Conditional writes still check versions in the database: an update matches ``version = base``
  (the version it was read at), an insert does nothing on conflict, and a row count short of what
  was sent raises :class:`ConcurrencyError`, which rolls the whole unit (or savepoint) back.
* A document namespace whose documents are updated (or have met a conflict) is read with
  ``FOR UPDATE`` from then on: two units of work that update one hot document queue on its row lock
  instead of both working on the same version and one failing at commit
  (:attr:`PostgresDatabase.locked_namespaces`).
* A savepoint writes what was pending when it opens and when it is released, so a conflict of one
  message's handling is raised inside that message's savepoint; rolled back, it restores the
  identity map and drops the writes made inside it.

Events bound for the log are written when the unit of work commits (:meth:`flush`): positions are
given under the lock of the log's head row, held until the commit, so they follow commit order
with no hole.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from psycopg import AsyncConnection

from sagaline.backends._sql.rows import (
    ENVELOPE_COLUMNS,
    JSON,
    decode_json,
    envelope_from_row,
    partition_of,
)
from sagaline.backends.postgres.failures import unavailable
from sagaline.errors import ConcurrencyError, DuplicateMessageId, SagalineError
from sagaline.messages import Envelope, utc_timestamp
from sagaline.ports import (
    DEAD_LETTERED,
    Document,
    Reads,
    SagaRecord,
    StoredEvent,
    bounded_dead_letter,
)

if TYPE_CHECKING:
    from sagaline.backends.postgres import PostgresDatabase

__all__ = ["ENVELOPE_ARRAYS", "PostgresTransaction", "envelope_arrays", "queue_payload"]

#: The envelope columns as typed arrays for ``unnest`` (see :func:`envelope_arrays`). Arrays are
#: sent in binary (``%b``): the text form quotes each element through a regular expression,
#: which costs tens of milliseconds for a batch of JSON bodies.
ENVELOPE_ARRAYS = ", ".join(["%b::text[]"] * 8)
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


class _Doc(NamedTuple):
    """A document as the identity map keeps it: JSON text (decoded afresh for each reader)."""

    data: str
    version: int


class _DocWrite(NamedTuple):
    """A pending document write: ``base`` is the version the database must hold (0: absent)."""

    data: str
    base: int
    version: int


class _Saga(NamedTuple):
    """A saga row as the identity map keeps it."""

    definition: str
    definition_version: int
    status: str
    step: int
    data: str
    version: int
    created_at: str
    updated_at: str


class _SagaWrite(NamedTuple):
    row: _Saga
    base: int


#: A statement of a flush: SQL, parameters and, for a conditional write, the row count it must
#: reach and how to name the conflict when it falls short.
class _Statement(NamedTuple):
    sql: str
    params: Sequence[Any]
    expected: int = -1
    #: What a short row count means: the error to raise, or None when it is harmless.
    conflict: Callable[[], Awaitable[SagalineError | None]] | None = None
    #: True when the statement returns its row count as the value of its one row.
    counts: bool = False


#: A read sent with others: its SQL, its parameters, and what loads its rows into the map.
_Query = tuple[str, tuple[Any, ...], Callable[[list[Any]], None]]

_MISSING: Any = object()


class PostgresTransaction:
    """One transaction on a pooled connection; see :meth:`PostgresDatabase.transaction`."""

    def __init__(self, db: PostgresDatabase, conn: AsyncConnection[Any]) -> None:
        self._db = db
        self.connection = conn
        self._s = db.names.store
        self._b = db.names.bus
        # One timestamp for the whole unit of work: it commits at one moment.
        self.now = utc_timestamp()
        # The identity map: None marks a row known to be absent.
        self._docs: dict[tuple[str, str], _Doc | None] = {}
        self._sagas: dict[str, _Saga | None] = {}
        # Streams known whole (read, or appended to after a read), and each stream's head.
        self._streams: dict[str, tuple[StoredEvent, ...]] = {}
        self._heads: dict[str, int] = {}
        # Writes behind, flushed at commit or when a savepoint opens or is released.
        self._doc_writes: dict[tuple[str, str], _DocWrite] = {}
        self._saga_writes: dict[str, _SagaWrite] = {}
        self._history: list[tuple[str, int, int, str]] = []
        self._appends: list[tuple[str, int, Envelope]] = []
        self._inbox: dict[str, dict[str, None]] = {}
        self._commands: list[tuple[str, Envelope]] = []
        self._outbox: list[Envelope] = []
        self._dead: list[tuple[Any, ...]] = []
        # Events for the log, written at commit: (stream, version, envelope).
        self._log: list[tuple[str | None, int | None, Envelope]] = []
        # Stream events of an outbox store, whose positions are given at commit.
        self._placed: list[tuple[str, int]] = []
        self._deferred: list[tuple[str, tuple[Any, ...]]] = []
        self.queues: set[str] = set()
        self.wrote_events = False
        self.wrote_outbox = False

    # ------------------------------------------------------- savepoints, flush

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested unit that rolls back alone on error.

        What is pending is written first, and what the block wrote is written before the
        savepoint is released: a conflict is raised inside the block's savepoint, and a rollback
        only has to drop the pending writes and restore the identity map.
        """
        await self._run(self._pending_statements())
        marks = (len(self._log), len(self._placed), len(self._deferred))
        queues, events, outbox = set(self.queues), self.wrote_events, self.wrote_outbox
        known = (dict(self._docs), dict(self._sagas), dict(self._streams), dict(self._heads))
        try:
            async with self.connection.transaction():
                yield
                await self._run(self._pending_statements())
        except BaseException as exc:
            self._docs, self._sagas, self._streams, self._heads = known
            self._drop_pending()
            del self._log[marks[0] :]
            del self._placed[marks[1] :]
            del self._deferred[marks[2] :]
            self.queues, self.wrote_events, self.wrote_outbox = queues, events, outbox
            if isinstance(exc, Exception):
                # The server's condition, not the message's: the whole unit of work is abandoned.
                translated = unavailable(exc, f"in PostgreSQL schema {self._db.names.store_name}")
                if translated is not None and translated is not exc:
                    raise translated from exc
            raise

    async def flush(self) -> None:
        """Write what was kept for the end of the unit of work; called just before COMMIT."""
        statements = self._pending_statements()
        statements.extend(_Statement(sql, params) for sql, params in self._deferred)
        self._deferred = []
        if self._log:
            statements.extend(self._log_statements())
        if self._placed:
            statements.append(self._placement_statement())
        await self._run(statements)

    def defer(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run a statement when the unit of work commits (for tools called inside it)."""
        self._deferred.append((sql, params))

    def _drop_pending(self) -> None:
        self._doc_writes = {}
        self._saga_writes = {}
        self._history = []
        self._appends = []
        self._inbox = {}
        self._commands = []
        self._outbox = []
        self._dead = []

    async def _run(self, statements: list[_Statement]) -> None:
        """Run statements in one pipeline (one round trip), then check the conditional ones."""
        cursors = await self._send([(st.sql, st.params) for st in statements])
        for statement, cursor in zip(statements, cursors, strict=True):
            if statement.conflict is None:
                continue
            if statement.counts:
                row = await cursor.fetchone()
                count = -1 if row is None else row[0]
            else:
                count = cursor.rowcount
            if count != statement.expected:
                error = await statement.conflict()
                if error is not None:
                    raise error

    async def _send(
        self, statements: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[psycopg.AsyncCursor[Any]]:
        """Send statements in one round trip (a pipeline when there are several); their cursors."""
        conn = self.connection
        try:
            if len(statements) <= 1:
                return [await conn.execute(sql, params) for sql, params in statements]
            async with conn.pipeline():
                return [await conn.execute(sql, params) for sql, params in statements]
        except psycopg.errors.DeadlockDetected as exc:
            # Two units of work took the same rows in different orders; PostgreSQL chose this
            # one to roll back. A conflict like any other: the caller redoes its work.
            raise ConcurrencyError(f"deadlock with another unit of work: {exc}") from exc

    def _pending_statements(self) -> list[_Statement]:
        """The statements that write the pending writes (which are then no longer pending)."""
        statements: list[_Statement] = []
        if self._doc_writes:
            statements.extend(self._document_statements())
        if self._saga_writes:
            statements.extend(self._saga_statements())
        if self._history:
            rows = self._history
            statements.append(
                _Statement(
                    f"INSERT INTO {self._s}.saga_history (saga_id, version, entry, data)"
                    " SELECT * FROM unnest(%b::text[], %b::int[], %b::int[], %b::text[])",
                    (
                        [r[0] for r in rows],
                        [r[1] for r in rows],
                        [r[2] for r in rows],
                        [r[3] for r in rows],
                    ),
                )
            )
        if self._appends:
            statements.append(self._append_statement())
        if self._inbox:
            consumers: list[str] = []
            ids: list[str] = []
            for consumer, marks in self._inbox.items():
                consumers.extend([consumer] * len(marks))
                ids.extend(marks)
            statements.append(
                _Statement(
                    f"INSERT INTO {self._s}.inbox (message_id, consumer, processed_at)"
                    " SELECT m, c, %s FROM unnest(%b::text[], %b::text[]) AS u(m, c)",
                    (self.now, ids, consumers),
                )
            )
        if self._commands:
            statements.append(self._command_statement())
        if self._outbox:
            statements.append(
                _Statement(
                    f"INSERT INTO {self._s}.outbox ({ENVELOPE_COLUMNS}, created_at)"
                    f" SELECT *, %s FROM unnest({ENVELOPE_ARRAYS})",
                    (self.now, *envelope_arrays(self._outbox)),
                )
            )
        if self._dead:
            columns = list(zip(*self._dead, strict=True))
            statements.append(
                _Statement(
                    f"INSERT INTO {self._s}.dead_letters (consumer, message_id, type, body,"
                    " correlation_id, causation_id, timestamp, source, reason, attempts,"
                    " failed_at) SELECT * FROM unnest(%b::text[], %b::text[], %b::text[],"
                    " %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
                    " %b::int[], %b::text[])",
                    [list(column) for column in columns],
                )
            )
        self._drop_pending()
        return statements

    def _document_statements(self) -> list[_Statement]:
        s = self._s
        inserts = [(key, w) for key, w in self._doc_writes.items() if w.base == 0]
        updates = [(key, w) for key, w in self._doc_writes.items() if w.base != 0]
        statements = []
        if inserts:
            statements.append(
                _Statement(
                    f"INSERT INTO {s}.documents (namespace, key, data, version)"
                    " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::int[])"
                    " ON CONFLICT DO NOTHING",
                    (
                        [k[0] for k, _ in inserts],
                        [k[1] for k, _ in inserts],
                        [w.data for _, w in inserts],
                        [w.version for _, w in inserts],
                    ),
                    len(inserts),
                    lambda: self._document_conflict(inserts),
                )
            )
        if updates:
            statements.append(
                _Statement(
                    f"UPDATE {s}.documents d SET data = u.data, version = u.version"
                    " FROM unnest(%b::text[], %b::text[], %b::text[], %b::int[], %b::int[])"
                    " AS u(namespace, key, data, base, version)"
                    " WHERE d.namespace = u.namespace AND d.key = u.key AND d.version = u.base",
                    (
                        [k[0] for k, _ in updates],
                        [k[1] for k, _ in updates],
                        [w.data for _, w in updates],
                        [w.base for _, w in updates],
                        [w.version for _, w in updates],
                    ),
                    len(updates),
                    lambda: self._document_conflict(updates),
                )
            )
        return statements

    async def _document_conflict(
        self, writes: list[tuple[tuple[str, str], _DocWrite]]
    ) -> ConcurrencyError:
        """Name a document whose conditional write found another version in the database."""
        cursor = await self.connection.execute(
            "SELECT u.namespace, u.key FROM unnest(%b::text[], %b::text[], %b::text[], %b::int[])"
            " AS u(namespace, key, data, version)"
            f" LEFT JOIN {self._s}.documents d ON d.namespace = u.namespace AND d.key = u.key"
            " WHERE d.version IS DISTINCT FROM u.version OR d.data IS DISTINCT FROM u.data"
            " LIMIT 1",
            (
                [k[0] for k, _ in writes],
                [k[1] for k, _ in writes],
                [w.data for _, w in writes],
                [w.version for _, w in writes],
            ),
        )
        row = await cursor.fetchone()
        found = {k: w for k, w in writes}
        key = (row[0], row[1]) if row is not None else writes[0][0]
        self._db.locked_namespaces.add(key[0])
        return _document_error(key[0], key[1], found[key].base)

    def _saga_statements(self) -> list[_Statement]:
        s = self._s
        inserts = [w for w in self._saga_writes.items() if w[1].base == 0]
        updates = [w for w in self._saga_writes.items() if w[1].base != 0]
        statements = []
        if inserts:
            rows = [(saga_id, w.row) for saga_id, w in inserts]
            statements.append(
                _Statement(
                    f"INSERT INTO {s}.sagas ({SAGA_COLUMNS}) SELECT * FROM unnest(%b::text[],"
                    " %b::text[], %b::int[], %b::text[], %b::int[], %b::text[], %b::int[],"
                    " %b::text[], %b::text[]) ON CONFLICT DO NOTHING",
                    (
                        [i for i, _ in rows],
                        [r.definition for _, r in rows],
                        [r.definition_version for _, r in rows],
                        [r.status for _, r in rows],
                        [r.step for _, r in rows],
                        [r.data for _, r in rows],
                        [r.version for _, r in rows],
                        [r.created_at for _, r in rows],
                        [r.updated_at for _, r in rows],
                    ),
                    len(inserts),
                    lambda: self._saga_conflict(inserts),
                )
            )
        if updates:
            statements.append(
                _Statement(
                    f"UPDATE {s}.sagas t SET status = u.status, step = u.step, data = u.data,"
                    " version = u.version, updated_at = u.updated_at"
                    " FROM unnest(%b::text[], %b::text[], %b::int[], %b::text[], %b::int[],"
                    " %b::int[], %b::text[]) AS u(saga_id, status, step, data, base, version,"
                    " updated_at) WHERE t.saga_id = u.saga_id AND t.version = u.base",
                    (
                        [i for i, _ in updates],
                        [w.row.status for _, w in updates],
                        [w.row.step for _, w in updates],
                        [w.row.data for _, w in updates],
                        [w.base for _, w in updates],
                        [w.row.version for _, w in updates],
                        [w.row.updated_at for _, w in updates],
                    ),
                    len(updates),
                    lambda: self._saga_conflict(updates),
                )
            )
        return statements

    async def _saga_conflict(self, writes: list[tuple[str, _SagaWrite]]) -> ConcurrencyError:
        """Name a saga whose conditional write found another version in the database."""
        cursor = await self.connection.execute(
            "SELECT u.saga_id FROM unnest(%b::text[], %b::int[], %b::text[])"
            " AS u(saga_id, version, data)"
            f" LEFT JOIN {self._s}.sagas t ON t.saga_id = u.saga_id"
            " WHERE t.version IS DISTINCT FROM u.version OR t.data IS DISTINCT FROM u.data"
            " LIMIT 1",
            (
                [i for i, _ in writes],
                [w.row.version for _, w in writes],
                [w.row.data for _, w in writes],
            ),
        )
        row = await cursor.fetchone()
        found = dict(writes)
        saga_id = row[0] if row is not None else writes[0][0]
        return _saga_error(saga_id, found[saga_id].base)

    def _append_statement(self) -> _Statement:
        # In key order: two units of work inserting into the same streams take the index locks
        # in the same order, so one waits for the other instead of deadlocking.
        appends = sorted(self._appends, key=lambda a: (a[0], a[1]))
        # A stale expected version collides with an existing (stream, version): the primary key
        # is the concurrency check. DO NOTHING keeps the transaction usable after it.
        return _Statement(
            f"INSERT INTO {self._s}.streams (stream, version, {ENVELOPE_COLUMNS})"
            f" SELECT * FROM unnest(%b::text[], %b::int[], {ENVELOPE_ARRAYS})"
            " ON CONFLICT DO NOTHING",
            (
                [a[0] for a in appends],
                [a[1] for a in appends],
                *envelope_arrays([a[2] for a in appends]),
            ),
            len(appends),
            lambda: self._append_conflict(appends),
        )

    async def _append_conflict(self, appends: list[tuple[str, int, Envelope]]) -> ConcurrencyError:
        """Name a stream that another unit of work appended to first."""
        cursor = await self.connection.execute(
            "SELECT u.stream, u.version FROM unnest(%b::text[], %b::int[], %b::text[])"
            " AS u(stream, version, message_id)"
            f" LEFT JOIN {self._s}.streams t ON t.stream = u.stream AND t.version = u.version"
            " WHERE t.message_id IS DISTINCT FROM u.message_id ORDER BY u.version LIMIT 1",
            (
                [a[0] for a in appends],
                [a[1] for a in appends],
                [a[2].message_id for a in appends],
            ),
        )
        row = await cursor.fetchone()
        stream, version = (row[0], row[1]) if row is not None else appends[0][:2]
        return ConcurrencyError(f"stream {stream!r} has moved past version {version - 1}")

    def _command_statement(self) -> _Statement:
        commands = self._commands
        envelopes = [e for _, e in commands]
        b = self._b
        return _Statement(
            f"WITH inserted AS ("
            f" INSERT INTO {b}.commands (queue, key, {ENVELOPE_COLUMNS}, available_at)"
            f" SELECT *, %s FROM unnest(%b::text[], %b::text[], {ENVELOPE_ARRAYS})"
            # A message sent again with its id (a client's retry) is the same message; another
            # message under a known id is refused (see _known_ids).
            " ON CONFLICT (message_id) DO NOTHING RETURNING queue"
            "), notified AS ("
            " SELECT pg_notify(%s, 'q:' || queue) FROM (SELECT DISTINCT queue FROM inserted) q"
            ") SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM notified)",
            (
                time.time(),
                [q for q, _ in commands],
                [e.correlation_id for _, e in commands],
                *envelope_arrays(envelopes),
                self._db.names.channel,
            ),
            len(commands),
            lambda: self._known_ids("commands", envelopes),
            counts=True,
        )

    async def _known_ids(
        self, table: str, envelopes: Sequence[Envelope]
    ) -> DuplicateMessageId | None:
        """Some of ``envelopes`` met a message id already there: harmless if each is the same
        message again (a retry), else the id used for another message. Only run when an insert
        was short, so it costs nothing otherwise."""
        cursor = await self.connection.execute(
            "SELECT u.message_id FROM unnest(%b::text[], %b::text[], %b::text[])"
            " AS u(message_id, type, body)"
            f" JOIN {self._b}.{table} t ON t.message_id = u.message_id"
            " WHERE t.type <> u.type OR t.body <> u.body LIMIT 1",
            (
                [e.message_id for e in envelopes],
                [e.message_type for e in envelopes],
                [body_text(e.body) for e in envelopes],
            ),
        )
        row = await cursor.fetchone()
        return None if row is None else DuplicateMessageId(row[0])

    def _log_statements(self) -> list[_Statement]:
        """Append the kept events to the bus's log at the head, holding its lock to the commit."""
        unique: dict[str, tuple[str | None, int | None, Envelope]] = {}
        for entry in self._log:
            known = unique.setdefault(entry[2].message_id, entry)[2]
            if known.message_type != entry[2].message_type or known.body != entry[2].body:
                raise DuplicateMessageId(known.message_id)
        entries = list(unique.values())
        self._log = []
        envelopes = [e for _, _, e in entries]
        b = self._b
        return [
            # Waits for the appender in front to commit: its rows are visible once this returns.
            _Statement(f"SELECT position FROM {b}.log_head FOR UPDATE", ()),
            # A new statement, so a new snapshot: it sees what the appender in front committed.
            _Statement(
                f"WITH incoming AS ("
                f" SELECT u.*, (SELECT position FROM {b}.log_head)"
                "   + row_number() OVER (ORDER BY u.ord) AS position"
                f" FROM unnest(%b::text[], %b::int[], {ENVELOPE_ARRAYS}, %b::smallint[])"
                "  WITH ORDINALITY AS u(stream, version, message_id, type, body, correlation_id,"
                "   causation_id, timestamp, traceparent, source, part, ord)"
                f" WHERE NOT EXISTS (SELECT 1 FROM {b}.events e"
                "  WHERE e.message_id = u.message_id)"
                "), inserted AS ("
                f" INSERT INTO {b}.events (position, stream, version, {ENVELOPE_COLUMNS}, part)"
                f" SELECT position, stream, version, {ENVELOPE_COLUMNS}, part FROM incoming"
                " RETURNING position, stream, version"
                "), head AS ("
                f" UPDATE {b}.log_head SET position = position + (SELECT count(*) FROM inserted)"
                "), placed AS ("
                f" UPDATE {self._s}.streams t SET position = i.position FROM inserted i"
                " WHERE i.stream IS NOT NULL AND t.stream = i.stream AND t.version = i.version"
                ") SELECT n, CASE WHEN n > 0 THEN pg_notify(%s, 'e') END"
                " FROM (SELECT count(*) AS n FROM inserted) c",
                (
                    [s for s, _, _ in entries],
                    [v for _, v, _ in entries],
                    *envelope_arrays(envelopes),
                    [partition_of(e.correlation_id) for e in envelopes],
                    self._db.names.channel,
                ),
                # An id already in the log is the same event again (a relay's republication)
                # or, with another body, an id used for another message.
                len(entries),
                lambda: self._known_ids("events", envelopes),
                counts=True,
            ),
        ]

    def _placement_statement(self) -> _Statement:
        """Give an outbox store's new stream events their positions in its own log."""
        placed = self._placed
        self._placed = []
        s = self._s
        return _Statement(
            f"WITH head AS (UPDATE {s}.stream_head SET position = position + %s"
            "  RETURNING position - %s AS base)"
            f" UPDATE {s}.streams t SET position = head.base + u.ord"
            " FROM head, unnest(%b::text[], %b::int[]) WITH ORDINALITY AS u(stream, version, ord)"
            " WHERE t.stream = u.stream AND t.version = u.version",
            (len(placed), len(placed), [p[0] for p in placed], [p[1] for p in placed]),
        )

    # --------------------------------------------------------------- prefetch

    async def prefetch(self, reads: Reads) -> None:
        """Load what a batch declared it will read into the identity map, in one round trip.

        One query per kind (documents of each namespace, sagas, streams), sent in one pipeline.
        Documents of a namespace in :attr:`PostgresDatabase.locked_namespaces` are locked, in key
        order, so two batches that lock the same rows queue instead of deadlocking.
        """
        queries: list[_Query] = []
        for namespace, keys in sorted(reads.documents.items()):
            query = self._documents_query(namespace, keys)
            if query is not None:
                queries.append(query)
        for query in (self._sagas_query(reads.sagas), self._streams_query(reads.streams)):
            if query is not None:
                queries.append(query)
        cursors = await self._send([(sql, params) for sql, params, _ in queries])
        for cursor, (_, _, load) in zip(cursors, queries, strict=True):
            load(await cursor.fetchall())

    def _documents_query(self, namespace: str, keys: Iterable[str]) -> _Query | None:
        wanted = sorted({k for k in keys if (namespace, k) not in self._docs})
        if not wanted:
            return None
        lock = " FOR UPDATE" if namespace in self._db.locked_namespaces else ""

        def load(rows: list[Any]) -> None:
            found = {row[0]: _Doc(row[1], row[2]) for row in rows}
            for key in wanted:
                self._docs.setdefault((namespace, key), found.get(key))

        return (
            f"SELECT key, data, version FROM {self._s}.documents"
            f" WHERE namespace = %s AND key = ANY(%b::text[]) ORDER BY key{lock}",
            (namespace, wanted),
            load,
        )

    def _sagas_query(self, saga_ids: Iterable[str]) -> _Query | None:
        wanted = sorted({i for i in saga_ids if i not in self._sagas})
        if not wanted:
            return None

        def load(rows: list[Any]) -> None:
            found = {row[0]: _Saga(*row[1:]) for row in rows}
            for saga_id in wanted:
                self._sagas.setdefault(saga_id, found.get(saga_id))

        return (
            f"SELECT {SAGA_COLUMNS} FROM {self._s}.sagas WHERE saga_id = ANY(%b::text[])",
            (wanted,),
            load,
        )

    def _streams_query(self, streams: Iterable[str]) -> _Query | None:
        pending = {s for s, _, _ in self._appends}
        wanted = sorted({s for s in streams if s not in self._streams and s not in pending})
        if not wanted:
            return None

        def load(rows: list[Any]) -> None:
            found: dict[str, list[StoredEvent]] = {}
            for row in rows:
                found.setdefault(row[1], []).append(
                    StoredEvent(row[0], row[1], row[2], envelope_from_row(row, 3))
                )
            for stream in wanted:
                if stream in self._streams:
                    continue
                stored = found.get(stream, [])
                self._streams[stream] = tuple(stored)
                self._heads.setdefault(stream, (stored[-1].version or 0) if stored else 0)

        return (
            f"SELECT COALESCE(position, 0), stream, version, {ENVELOPE_COLUMNS}"
            f" FROM {self._s}.streams WHERE stream = ANY(%b::text[]) ORDER BY stream, version",
            (wanted,),
            load,
        )

    async def seen(self, consumer: str, message_ids: Sequence[str]) -> set[str]:
        """Which of ``message_ids`` ``consumer`` has processed already (one query)."""
        if not message_ids:
            return set()
        cursor = await self.connection.execute(
            f"SELECT message_id FROM {self._s}.inbox"
            " WHERE consumer = %s AND message_id = ANY(%b::text[])",
            (consumer, list(message_ids)),
        )
        found = {row[0] for row in await cursor.fetchall()}
        pending = self._inbox.get(consumer)
        if pending:
            found.update(m for m in message_ids if m in pending)
        return found

    async def record_inbox_many(self, consumer: str, message_ids: Sequence[str]) -> None:
        """Mark many messages processed; they must not be marked yet (see :meth:`seen`).

        Written at commit: a mark that is there already fails the commit, as it would now.
        """
        if not message_ids:
            return
        self._inbox.setdefault(consumer, {}).update(dict.fromkeys(message_ids))

    async def record_inbox(self, consumer: str, message_id: str) -> bool:
        """Mark one message processed by ``consumer``; False if it already was."""
        pending = self._inbox.get(consumer)
        if pending is not None and message_id in pending:
            return False
        cursor = await self.connection.execute(
            f"INSERT INTO {self._s}.inbox (message_id, consumer, processed_at)"
            " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (message_id, consumer, self.now),
        )
        return cursor.rowcount == 1

    async def handling_counts(self, consumer: str, message_ids: Sequence[str]) -> list[int]:
        cursor = await self.connection.execute(
            f"SELECT message_id, starts FROM {self._s}.handling_starts"
            " WHERE consumer = %s AND message_id = ANY(%s)",
            (consumer, list(dict.fromkeys(message_ids))),
        )
        counts = {str(row[0]): int(row[1]) for row in await cursor.fetchall()}
        return [counts.get(message_id, 0) for message_id in message_ids]

    async def handling_started(self, consumer: str, message_ids: Sequence[str]) -> list[int]:
        unique = list(dict.fromkeys(message_ids))
        cursor = await self.connection.execute(
            f"INSERT INTO {self._s}.handling_starts (message_id, consumer, starts)"
            " SELECT m, %s, 1 FROM unnest(%s::text[]) AS m ON CONFLICT (message_id, consumer)"
            " DO UPDATE SET starts = handling_starts.starts + 1 RETURNING message_id, starts",
            (consumer, unique),
        )
        counts = {str(row[0]): int(row[1]) for row in await cursor.fetchall()}
        return [counts[message_id] for message_id in message_ids]

    async def handling_aborted(self, consumer: str, message_ids: Sequence[str]) -> None:
        self.defer(
            f"UPDATE {self._s}.handling_starts SET starts = starts - 1"
            " WHERE consumer = %s AND message_id = ANY(%s::text[]) AND starts > 0 AND starts < %s",
            (consumer, list(dict.fromkeys(message_ids)), DEAD_LETTERED),
        )

    async def handling_ended(
        self, consumer: str, message_id: str, *, dead_lettered: bool = False
    ) -> None:
        if dead_lettered:
            self.defer(
                f"UPDATE {self._s}.handling_starts SET starts = %s"
                " WHERE message_id = %s AND consumer = %s",
                (DEAD_LETTERED, message_id, consumer),
            )
        else:
            self.defer(
                f"DELETE FROM {self._s}.handling_starts WHERE message_id = %s AND consumer = %s",
                (message_id, consumer),
            )

    # ---------------------------------------------------------------- streams

    async def append(self, stream: str, expected_version: int, events: Sequence[Envelope]) -> int:
        """Append to a stream at ``expected_version``; ConcurrencyError on conflict.

        Checked against what this unit of work knows of the stream at once, and against the
        database (the primary key on (stream, version)) when the appends are written.
        """
        if not events:
            return expected_version
        head = self._heads.get(stream)
        if head is not None and head != expected_version:
            raise ConcurrencyError(f"stream {stream!r} has moved past version {expected_version}")
        versions = range(expected_version + 1, expected_version + 1 + len(events))
        self._appends.extend(zip([stream] * len(events), versions, events, strict=True))
        self._heads[stream] = versions[-1]
        known = self._streams.get(stream)
        if known is not None:
            self._streams[stream] = known + tuple(
                StoredEvent(0, stream, v, e) for v, e in zip(versions, events, strict=True)
            )
        if self._db.outbox:
            self._to_outbox(events)
            self._placed.extend((stream, version) for version in versions)
        else:
            self._log.extend((stream, v, e) for v, e in zip(versions, events, strict=True))
            self.wrote_events = True
        return versions[-1]

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order (this unit's appends included)."""
        known = self._streams.get(stream)
        if known is not None:
            return list(known)
        cursor = await self.connection.execute(
            f"SELECT COALESCE(position, 0), stream, version, {ENVELOPE_COLUMNS}"
            f" FROM {self._s}.streams WHERE stream = %s ORDER BY version",
            (stream,),
        )
        stored = [
            StoredEvent(row[0], row[1], row[2], envelope_from_row(row, 3))
            for row in await cursor.fetchall()
        ]
        # Appends of this unit not written yet (made without reading the stream first).
        stored.extend(StoredEvent(0, s, v, e) for s, v, e in self._appends if s == stream)
        self._streams[stream] = tuple(stored)
        if stream not in self._heads:
            self._heads[stream] = (stored[-1].version or 0) if stored else 0
        return stored

    # -------------------------------------------------------------- documents

    async def get_document(self, namespace: str, key: str) -> Document | None:
        """One document, or None. Read with ``FOR UPDATE`` in a namespace that is updated."""
        known = self._docs.get((namespace, key), _MISSING)
        if known is _MISSING:
            lock = namespace in self._db.locked_namespaces
            try:
                cursor = await self.connection.execute(
                    f"SELECT data, version FROM {self._s}.documents"
                    " WHERE namespace = %s AND key = %s" + (" FOR UPDATE" if lock else ""),
                    (namespace, key),
                )
            except psycopg.errors.DeadlockDetected as exc:
                raise ConcurrencyError(f"document {namespace}/{key}: {exc}") from exc
            row = await cursor.fetchone()
            known = None if row is None else _Doc(row[0], row[1])
            self._docs[namespace, key] = known
        return None if known is None else Document(decode_json(known.data), known.version)

    async def put_document(
        self, namespace: str, key: str, data: dict[str, Any], expected_version: int
    ) -> int:
        """Write a document at ``expected_version`` (0 creates); returns the new version.

        Checked against the identity map at once, and against the database at the flush.
        """
        ident = (namespace, key)
        known = self._docs.get(ident, _MISSING)
        if known is not _MISSING:
            current = 0 if known is None else known.version
            if current != expected_version:
                raise _document_error(namespace, key, expected_version)
        encoded = JSON.encode(data).decode()
        version = expected_version + 1
        pending = self._doc_writes.get(ident)
        base = expected_version if pending is None else pending.base
        if base > 0:
            # Updated here: read it with its row lock from now on (see locked_namespaces).
            self._db.locked_namespaces.add(namespace)
        self._doc_writes[ident] = _DocWrite(encoded, base, version)
        self._docs[ident] = _Doc(encoded, version)
        return version

    async def _write_documents_now(self) -> None:
        """Write every pending write (a namespace-wide statement must see them)."""
        await self._run(self._pending_statements())

    async def delete_namespace(self, namespace: str) -> None:
        """Delete every document of a namespace."""
        await self._write_documents_now()
        await self.connection.execute(
            f"DELETE FROM {self._s}.documents WHERE namespace = %s", (namespace,)
        )
        self._docs = {k: v for k, v in self._docs.items() if k[0] != namespace}

    async def rename_namespace(self, source: str, target: str) -> None:
        """Move every document of ``source`` to ``target``."""
        await self._write_documents_now()
        await self.connection.execute(
            f"UPDATE {self._s}.documents SET namespace = %s WHERE namespace = %s",
            (target, source),
        )
        self._docs = {k: v for k, v in self._docs.items() if k[0] not in (source, target)}

    # ------------------------------------------------------------------ sagas

    async def get_saga(self, saga_id: str) -> SagaRecord | None:
        """One saga instance (without its history), or None."""
        known = self._sagas.get(saga_id, _MISSING)
        if known is _MISSING:
            cursor = await self.connection.execute(
                f"SELECT {SAGA_COLUMNS} FROM {self._s}.sagas WHERE saga_id = %s", (saga_id,)
            )
            row = await cursor.fetchone()
            known = None if row is None else _Saga(*row[1:])
            self._sagas[saga_id] = known
        if known is None:
            return None
        return SagaRecord(
            saga_id=saga_id,
            definition=known.definition,
            definition_version=known.definition_version,
            status=known.status,
            step=known.step,
            data=decode_json(known.data),
            loaded_status=known.status,
            version=known.version,
            created_at=known.created_at,
            updated_at=known.updated_at,
        )

    async def put_saga(self, record: SagaRecord) -> None:
        """Insert or update a saga instance at ``record.version``; bumps it.

        Checked against the identity map at once, and against the database at the flush.
        """
        saga_id = record.saga_id
        known = self._sagas.get(saga_id, _MISSING)
        if known is not _MISSING:
            current = 0 if known is None else known.version
            if current != record.version:
                raise _saga_error(saga_id, record.version)
        now = self.now
        created_at = now if record.version == 0 else record.created_at
        if known is not _MISSING and known is not None:
            created_at = known.created_at
        row = _Saga(
            record.definition,
            record.definition_version,
            record.status,
            record.step,
            JSON.encode(record.data).decode(),
            record.version + 1,
            created_at,
            now,
        )
        pending = self._saga_writes.get(saga_id)
        self._saga_writes[saga_id] = _SagaWrite(
            row, record.version if pending is None else pending.base
        )
        self._sagas[saga_id] = row
        if record.version == 0:
            record.created_at = now
        record.version += 1
        record.updated_at = now
        record.loaded_status = record.status
        self._history.extend(
            (saga_id, record.version, n, JSON.encode(entry).decode())
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
            self._to_outbox(envelopes)
            return
        await self.emit_to_bus(envelopes, routes)

    async def emit_to_bus(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Commands into the bus's queues and events into its log, both at commit."""
        for envelope in envelopes:
            queue = routes.get(envelope.message_type)
            if queue is not None:
                self._commands.append((queue, envelope))
                self.queues.add(queue)
            else:
                self._log.append((None, None, envelope))
                self.wrote_events = True

    def _to_outbox(self, envelopes: Sequence[Envelope]) -> None:
        self._outbox.extend(envelopes)
        self.wrote_outbox = True

    async def record_received(self, consumer: str, envelopes: Sequence[Envelope]) -> None:
        if envelopes:
            self.defer(
                f"INSERT INTO {self._s}.received ({ENVELOPE_COLUMNS}, consumer, received_at)"
                f" SELECT *, %s, %s FROM unnest({ENVELOPE_ARRAYS}) ON CONFLICT DO NOTHING",
                (consumer, self.now, *envelope_arrays(envelopes)),
            )

    async def dead_letter(
        self, consumer: str, envelope: Envelope, reason: str, attempts: int
    ) -> None:
        """Record a message that could not be processed (written at commit)."""
        body, reason = bounded_dead_letter(envelope.body, reason)
        self._dead.append(
            (
                consumer,
                envelope.message_id,
                envelope.message_type,
                body_text(body),
                envelope.correlation_id,
                envelope.causation_id,
                envelope.timestamp,
                envelope.source,
                reason,
                attempts,
                utc_timestamp(),
            )
        )


def _document_error(namespace: str, key: str, expected_version: int) -> ConcurrencyError:
    if expected_version == 0:
        return ConcurrencyError(f"document {namespace}/{key} already exists")
    return ConcurrencyError(f"document {namespace}/{key} is not at version {expected_version}")


def _saga_error(saga_id: str, version: int) -> ConcurrencyError:
    if version == 0:
        return ConcurrencyError(f"saga {saga_id!r} already exists")
    return ConcurrencyError(f"saga {saga_id!r} is not at version {version}")
