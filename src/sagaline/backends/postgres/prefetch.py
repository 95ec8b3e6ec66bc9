"""The prefetch of a PostgreSQL unit of work: a batch's declared reads, in one round trip."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sagaline.backends._sql.rows import ENVELOPE_COLUMNS, envelope_from_row
from sagaline.backends.postgres.state import SAGA_COLUMNS, UnitState, _Doc, _Saga
from sagaline.ports import Reads, StoredEvent

__all__ = ["Prefetch"]

#: A read sent with others: its SQL, its parameters, and what loads its rows into the map.
_Query = tuple[str, tuple[Any, ...], Callable[[list[Any]], None]]


class Prefetch(UnitState):
    """Loads what a batch declared it will read into the identity map."""

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
