"""Real store failures for sagaline's own stores, as the store-fault suite asks of a backend.

SQLite's page limit makes a write that needs a new page fail with ``SQLITE_FULL`` (after which
SQLite rolls the whole transaction back, as on a full disk); on PostgreSQL a trigger makes every
document write fail with SQLSTATE 53100 ``disk_full``, as the server does when its disk is full.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sagaline.backends.postgres import PostgresDatabase
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.testing.conformance import StoreOutage


class SqliteOutage:
    """A SQLite store out of room: no page may be added to its file."""

    def __init__(self, store: SqliteDatabase) -> None:
        self.store = store

    def begin(self) -> None:
        conn = self.store.connection
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {int(pages)}")

    def end(self) -> None:
        self.store.connection.execute("PRAGMA max_page_count = 4294967294")


class PostgresOutage:
    """A PostgreSQL store whose document writes fail as on a full disk."""

    def __init__(self, store: PostgresDatabase) -> None:
        self.store = store

    def begin(self) -> None:
        self._run(
            "CREATE FUNCTION {s}.disk_full() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'"
            " USING ERRCODE = 'disk_full'; END $$",
            "CREATE TRIGGER disk_full BEFORE INSERT OR UPDATE ON {s}.documents"
            " FOR EACH ROW EXECUTE FUNCTION {s}.disk_full()",
        )

    def end(self) -> None:
        self._run("DROP TRIGGER disk_full ON {s}.documents", "DROP FUNCTION {s}.disk_full()")

    def _run(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.store.url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.format(s=self.store.names.store).encode())


class SqliteStoreFaults:
    """For a suite whose services' store is a SQLite file: its outage, and its size on disk."""

    def store_outage(self, store: Any) -> StoreOutage:
        return SqliteOutage(store)

    def store_bytes(self, store: Any) -> int | None:
        files = [Path(store.path), Path(store.path + "-wal")]
        return sum(path.stat().st_size for path in files if path.exists())


class PostgresStoreFaults:
    """For a suite whose services' store is a PostgreSQL schema: its outage."""

    def store_outage(self, store: Any) -> StoreOutage:
        return PostgresOutage(store)
