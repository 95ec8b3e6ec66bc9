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

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from sagaline.backends._sql.rows import (
    ENVELOPE_COLUMNS,
    JSON,
    decode_json,
    envelope_from_row,
)
from sagaline.backends.postgres.failures import unavailable
from sagaline.backends.postgres.prefetch import Prefetch
from sagaline.backends.postgres.state import (
    ENVELOPE_ARRAYS,
    SAGA_COLUMNS,
    _Doc,
    _document_error,
    _DocWrite,
    _Saga,
    _saga_error,
    _SagaWrite,
    _Statement,
    body_text,
    envelope_arrays,
    queue_payload,
)
from sagaline.backends.postgres.statements import StatementBuilders
from sagaline.errors import ConcurrencyError
from sagaline.messages import Envelope, utc_timestamp
from sagaline.ports import (
    DEAD_LETTERED,
    Document,
    SagaRecord,
    StoredEvent,
    bounded_dead_letter,
)

__all__ = [
    "ENVELOPE_ARRAYS",
    "SAGA_COLUMNS",
    "PostgresTransaction",
    "envelope_arrays",
    "queue_payload",
]

_MISSING: Any = object()


class PostgresTransaction(StatementBuilders, Prefetch):
    """One transaction on a pooled connection; see :meth:`PostgresDatabase.transaction`."""

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

    # ------------------------------------------------------- inbox, handling counts

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
                utc_timestamp(self._db.clock.time()),
            )
        )
