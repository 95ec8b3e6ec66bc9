"""Starting afresh: a database's schemas dropped when they are marked resettable.

The scheme registry's ``reset`` for PostgreSQL (see :mod:`sagaline.config`): a service's store
schema (with its co-located bus schema) or the bus schema of stores elsewhere is dropped only when
it carries the metadata mark, holds no data yet, or does not exist.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from sagaline.backends.postgres import open_bus, open_store
from sagaline.backends.postgres.schema import Names, connect

__all__ = ["reset"]

#: The tables of a service's schema that hold its data (a store without rows in any is empty).
_STORE_TABLES = ("streams", "documents", "sagas", "inbox", "outbox", "dead_letters")
#: The tables of a bus schema that hold its messages.
_BUS_TABLES = ("events", "commands")


async def reset(
    url: str,
    *,
    service: str | None,
    colocated_bus: bool = True,
    mark: str,
    delete: bool,
    connect_timeout: float | None = None,
    **_options: Any,
) -> bool:
    """Whether the schemas of ``service``'s store at ``url`` (``service`` None: the bus schema
    :data:`BUS_SCHEMA` of stores elsewhere) may be dropped to start afresh and, when they may
    and ``delete``, drop them. False, leaving everything as it was, when they hold data without
    the mark ``mark``."""
    if service is None:
        db = open_bus(url, connect_timeout=connect_timeout)
    else:
        db = open_store(
            url, service=service, colocated_bus=colocated_bus, connect_timeout=connect_timeout
        )
    names = db.names
    async with await connect(url, connect_timeout) as conn:
        if await _holds_unmarked_data(conn, names, mark):
            return False
    if delete:
        try:
            return await db.drop_if_marked(mark)
        finally:
            await db.close()
    return True


async def _holds_unmarked_data(conn: AsyncConnection[Any], names: Names, mark: str) -> bool:
    """Whether the store schema (the bus schema too, when it is the same one) holds data and
    lacks the mark."""

    async def one(sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchone()

    exists = await one("SELECT to_regclass(%s)", (f"{names.store}.meta",))
    if exists is None or exists[0] is None:
        return False
    row = await one(f"SELECT value FROM {names.store}.meta WHERE key = %s", (mark,))
    if row is not None and row[0] == "1":
        return False
    tables = [f"{names.store}.{table}" for table in _STORE_TABLES]
    if names.bus == names.store:
        tables += [f"{names.bus}.{table}" for table in _BUS_TABLES]
    for table in tables:
        if await one("SELECT to_regclass(%s)", (table,)) == (None,):
            continue
        if await one(f"SELECT 1 FROM {table} LIMIT 1"):
            return True
    return False
