"""Read-only queries of a PostgreSQL store and bus for tools: the log, sagas, views, traces.

Every query runs on a connection of the database's asyncio pool (autocommit, outside any unit of
work), so a tool never blocks its event loop and keeps one pool for its lifetime; the reads that
must agree with each other (the audit rows, idleness) share one snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sagaline.backends._sql.rows import (
    ENVELOPE_COLUMNS,
    JSON,
    decode_json,
    envelope_from_row,
    saga_from_row,
)
from sagaline.backends.postgres.schema import Names
from sagaline.backends.postgres.transaction import SAGA_COLUMNS
from sagaline.messages import Envelope, registry
from sagaline.ports import DeadLetter, Document, SagaRecord, StoredEvent

__all__ = ["PostgresQueries"]


class PostgresQueries:
    """Queries of a :class:`PostgresDatabase` outside any unit of work."""

    names: Names
    outbox: bool
    _open_transactions: int

    async def _ready(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        raise NotImplementedError

    async def audit_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row the invariant checker reads, in one snapshot; the same keys and column
        orders as the SQLite backend's ``audit_rows`` (see there). With its bus co-located,
        ``events``, ``commands`` and ``subscriptions`` are the bus's; in outbox mode ``events``
        are this store's streams and the outbox is listed."""
        s, b = self.names.store, self.names.bus
        outbox = self.outbox
        queries: dict[str, str] = {
            "outbox": f"SELECT id, message_id, type, body, correlation_id, causation_id, timestamp,"
            f" traceparent, source, (sent_at IS NOT NULL)::int FROM {s}.outbox ORDER BY id",
            "inbox": f"SELECT consumer, message_id FROM {s}.inbox ORDER BY consumer, message_id",
            "dead_letters": f"SELECT id, consumer, message_id, type, correlation_id, causation_id,"
            f" source, reason, attempts, failed_at FROM {s}.dead_letters ORDER BY id",
            "documents": f"SELECT namespace, key, data, version FROM {s}.documents"
            " ORDER BY namespace, key",
            "sagas": f"SELECT {SAGA_COLUMNS} FROM {s}.sagas ORDER BY saga_id",
            "saga_history": f"SELECT saga_id, version, entry, data FROM {s}.saga_history"
            " ORDER BY saga_id, version, entry",
        }
        if outbox:
            queries["events"] = (
                "SELECT COALESCE(position, 0), stream, version, 0, message_id, type, body,"
                " correlation_id, causation_id, timestamp, traceparent, source"
                f" FROM {s}.streams ORDER BY position, stream, version"
            )
        else:
            queries["events"] = (
                "SELECT position, stream, version, part, message_id, type, body, correlation_id,"
                f" causation_id, timestamp, traceparent, source FROM {b}.events ORDER BY position"
            )
            queries["commands"] = (
                "SELECT id, queue, message_id, type, correlation_id, causation_id, timestamp,"
                " source, done::int, outcome, attempts, last_error"
                f" FROM {b}.commands ORDER BY id"
            )
            queries["subscriptions"] = (
                f"SELECT subscriber, part, position FROM {b}.subscriptions"
                " ORDER BY subscriber, part"
            )
        result: dict[str, list[tuple[Any, ...]]] = {}
        pool = await self._ready()
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            for key, sql in queries.items():
                result[key] = [tuple(row) for row in await _fetch(conn, sql)]
        result.setdefault("commands", [])
        result.setdefault("subscriptions", [])
        return result

    async def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        pool = await self._ready()
        async with pool.connection() as conn:
            return await _fetch(conn, sql, params)

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order."""
        rows = await self._rows(
            f"SELECT COALESCE(position, 0), stream, version, {ENVELOPE_COLUMNS}"
            f" FROM {self.names.store}.streams WHERE stream = %s ORDER BY version",
            (stream,),
        )
        return [StoredEvent(row[0], row[1], row[2], envelope_from_row(row, 3)) for row in rows]

    def _log_source(self) -> str:
        """The log this store reads: the bus's, or (an outbox store) its own stream events."""
        if self.outbox:
            return f"{self.names.store}.streams"
        return f"{self.names.bus}.events"

    async def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """The global event log after ``after``, at most ``limit`` events."""
        rows = await self._rows(
            f"SELECT position, stream, version, {ENVELOPE_COLUMNS} FROM {self._log_source()}"
            " WHERE position > %s ORDER BY position LIMIT %s",
            (after, limit),
        )
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

    async def head_position(self) -> int:
        """The position of the newest event (0 when the log is empty)."""
        head = f"{self.names.store}.stream_head" if self.outbox else f"{self.names.bus}.log_head"
        return int((await self._rows(f"SELECT position FROM {head}"))[0][0])

    async def get_saga(self, saga_id: str, *, history: bool = True) -> SagaRecord | None:
        """One saga instance (with its history unless told otherwise), or None."""
        s = self.names.store
        pool = await self._ready()
        async with pool.connection() as conn:
            rows = await _fetch(
                conn, f"SELECT {SAGA_COLUMNS} FROM {s}.sagas WHERE saga_id = %s", (saga_id,)
            )
            if not rows:
                return None
            record = saga_from_row(rows[0])
            if history:
                entries = await _fetch(
                    conn,
                    f"SELECT data FROM {s}.saga_history WHERE saga_id = %s ORDER BY version, entry",
                    (saga_id,),
                )
                record.history = [decode_json(entry) for (entry,) in entries]
        return record

    async def list_sagas(self, status: str | None = None) -> list[SagaRecord]:
        """Saga instances (without their history), optionally of one status."""
        sql = f"SELECT {SAGA_COLUMNS} FROM {self.names.store}.sagas"
        params: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = %s"
            params = (status,)
        rows = await self._rows(sql + " ORDER BY created_at", params)
        return [saga_from_row(row) for row in rows]

    async def saga_counts(self) -> dict[str, int]:
        """How many sagas are in each status."""
        return {
            status: int(count)
            for status, count in await self._rows(
                f"SELECT status, count(*) FROM {self.names.store}.sagas GROUP BY status"
            )
        }

    async def get_document(self, namespace: str, key: str) -> Document | None:
        """One document, or None (outside any unit of work)."""
        rows = await self._rows(
            f"SELECT data, version FROM {self.names.store}.documents"
            " WHERE namespace = %s AND key = %s",
            (namespace, key),
        )
        return None if not rows else Document(decode_json(rows[0][0]), rows[0][1])

    async def query_documents(
        self, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Documents of a namespace whose top-level fields equal ``filters`` (parameters only)."""
        sql = f"SELECT data FROM {self.names.store}.documents WHERE namespace = %s"
        params: list[Any] = [namespace]
        for name, value in (filters or {}).items():
            if not name.isidentifier():
                raise ValueError(f"not a field name: {name!r}")
            sql += " AND data::json ->> %s = %s"
            params.extend([name, value if isinstance(value, str) else JSON.encode(value).decode()])
        return [decode_json(row[0]) for row in await self._rows(sql + " ORDER BY key", params)]

    async def trace_rows(self, correlation_id: str) -> list[dict[str, Any]]:
        """Every command and event of one business key, with who handled it and when."""
        b, s = self.names.bus, self.names.store
        rows = await self._rows(
            "SELECT 'event', position, message_id, type, body, causation_id, timestamp, source,"
            f" NULL, stream, version FROM {b}.events WHERE correlation_id = %(key)s"
            " UNION ALL"
            " SELECT 'command', id, message_id, type, body, causation_id, timestamp, source,"
            f" queue, outcome, attempts FROM {b}.commands WHERE correlation_id = %(key)s"
            # Stream events of an outbox store, and what it sent through another bus.
            " UNION ALL"
            " SELECT 'event', position, message_id, type, body, causation_id, timestamp, source,"
            f" NULL, stream, version FROM {s}.streams WHERE correlation_id = %(key)s"
            " AND %(outbox)s"
            " UNION ALL"
            " SELECT 'outbox', id, message_id, type, body, causation_id, timestamp, source,"
            f" NULL, NULL, NULL FROM {s}.outbox WHERE correlation_id = %(key)s"
            # Submitted by a client through another bus: kept by the store that handled it.
            " UNION ALL"
            " SELECT 'received', 0, message_id, type, body, causation_id, timestamp, source,"
            f" consumer, NULL, NULL FROM {s}.received WHERE correlation_id = %(key)s",
            {"key": correlation_id, "outbox": self.outbox},
        )
        seen: set[str] = set()
        unique = []
        for row in rows:
            # An appended event is in the stream table and in the outbox: keep the stream row.
            if row[2] not in seen:
                seen.add(row[2])
                unique.append(row)
        handled = await self.handled_by([row[2] for row in unique])
        result = []
        for kind, seq, message_id, type_, body, causation, ts, source, queue, one, two in unique:
            entry: dict[str, Any] = {
                "kind": kind,
                "sequence": seq,
                "messageId": message_id,
                "type": type_,
                "body": decode_json(body),
                "causationId": causation,
                "timestamp": ts,
                "source": source,
                "handledBy": [{"consumer": c, "at": at} for c, at in handled.get(message_id, [])],
            }
            if kind in ("outbox", "received"):
                entry["kind"] = kind = _kind_of(type_)
            if kind == "command":
                entry.update(
                    {
                        "queue": queue,
                        "outcome": one,
                        "deliveries": None if two is None else int(two),
                    }
                )
            else:
                entry.update({"stream": one, "version": None if two is None else int(two)})
            result.append(entry)
        return result

    async def handled_by(self, message_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """Which consumers of this store handled each of ``message_ids``, and when."""
        handled: dict[str, list[tuple[str, str]]] = {}
        if not message_ids:
            return handled
        for message_id, consumer, at in await self._rows(
            f"SELECT message_id, consumer, processed_at FROM {self.names.store}.inbox"
            " WHERE message_id = ANY(%s::text[]) ORDER BY processed_at",
            (list(message_ids),),
        ):
            handled.setdefault(message_id, []).append((consumer, at))
        return handled

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        rows = await self._rows(
            "SELECT id, consumer, message_id, type, body, correlation_id, causation_id, timestamp,"
            f" source, reason, attempts, failed_at FROM {self.names.store}.dead_letters ORDER BY id"
        )
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

    async def outbox_pending(self) -> int:
        """How many outbox entries are not published yet."""
        s = self.names.store
        return int(
            (await self._rows(f"SELECT count(*) FROM {s}.outbox WHERE sent_at IS NULL"))[0][0]
        )

    async def pending_counts(self) -> dict[str, int]:
        """Undone commands per queue."""
        pool = await self._ready()
        async with pool.connection() as conn:
            return await self._pending(conn)

    async def subscription_lag(self) -> dict[str, int]:
        """Per subscriber, how many log positions its slowest partition is behind."""
        pool = await self._ready()
        async with pool.connection() as conn:
            return await self._lag(conn)

    async def _pending(self, conn: AsyncConnection[Any]) -> dict[str, int]:
        sql = f"SELECT queue, count(*) FROM {self.names.bus}.commands WHERE NOT done GROUP BY queue"
        return {queue: int(count) for queue, count in await _fetch(conn, sql)}

    async def _lag(self, conn: AsyncConnection[Any]) -> dict[str, int]:
        b = self.names.bus
        sql = (
            f"SELECT subscriber, (SELECT position FROM {b}.log_head) - min(position)"
            f" FROM {b}.subscriptions GROUP BY subscriber"
        )
        return {name: int(lag) for name, lag in await _fetch(conn, sql)}

    async def is_idle(self, subscribers: Iterable[str] = ()) -> bool:
        """Whether nothing is left to deliver: no command pending, every subscriber at the head.

        ``subscribers`` must have started: one that never claimed has no cursor yet. Read in one
        snapshot; a unit of work open in this process means work in flight.
        """
        if self._open_transactions:
            return False
        pool = await self._ready()
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            pending = await self._pending(conn)
            lag = await self._lag(conn)
        return not pending and set(subscribers) <= set(lag) and not any(lag.values())

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query for checks and tools (parameters only, ``%s`` placeholders)."""
        return [tuple(row) for row in await self._rows(sql, params)]

    async def get_meta(self, key: str) -> str | None:
        """A value of the store schema's metadata table, or None."""
        sql = f"SELECT value FROM {self.names.store}.meta WHERE key = %s"
        rows = await self._rows(sql, (key,))
        return None if not rows else str(rows[0][0])


async def _fetch(
    conn: AsyncConnection[Any], sql: str, params: Sequence[Any] | dict[str, Any] = ()
) -> list[Any]:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchall()


def _kind_of(message_type: str) -> str:
    """``command`` or ``event``, by the registered type (``event`` when it is unknown)."""
    return registry.kind_of(message_type) or "event"
