"""The statements that write a PostgreSQL unit of work's pending writes, and their checks.

One set-based statement per kind (``unnest`` arrays): documents, sagas and their history, stream
appends, inbox marks, commands, outbox entries, dead letters, and at commit the log and the
positions of an outbox store's stream events. A conditional write carries the row count it must
reach and how to name the conflict when it falls short; the conflict is only looked up then.
"""

from __future__ import annotations

from collections.abc import Sequence

from sagaline.backends._sql.rows import ENVELOPE_COLUMNS, partition_of
from sagaline.backends.postgres.state import (
    ENVELOPE_ARRAYS,
    SAGA_COLUMNS,
    UnitState,
    _document_error,
    _DocWrite,
    _saga_error,
    _SagaWrite,
    _Statement,
    body_text,
    envelope_arrays,
)
from sagaline.errors import ConcurrencyError, DuplicateMessageId
from sagaline.messages import Envelope

__all__ = ["StatementBuilders"]


class StatementBuilders(UnitState):
    """Builds the statements of a flush from the pending writes."""

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
                self._db.clock.time(),
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
