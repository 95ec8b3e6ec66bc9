"""SQLite URLs, and one short write transaction on a connection. The row conversions the
database backends share live in :mod:`sagaline.backends._sql.rows`."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from sagaline.errors import ConfigurationError

__all__ = ["immediate", "path_from_url"]


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` on ``conn``, committed when the block ends, rolled back if it
    raises (bookkeeping outside a unit of work: leases, marks, rewinds)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def path_from_url(url: str) -> str:
    """The file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        # The URL is not repeated: another scheme's URL may hold a password.
        raise ConfigurationError("not a SQLite URL (expected sqlite:///path/to/file.db)")
    path = url[len(prefix) :]
    if not path:
        raise ConfigurationError("the SQLite URL names no file")
    return path
