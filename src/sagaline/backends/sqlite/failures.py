"""Which SQLite errors mean the store is unavailable, as opposed to a failing message.

A full disk, an I/O error, a lock held past the busy timeout or a file turned read-only are the
store's condition, not the message's: the unit of work is rolled back whole and tried again once
the store answers, and no message is charged an attempt for it. Any other error (a constraint, a
statement a handler got wrong) stays the handler's failure.
"""

from __future__ import annotations

import sqlite3

from sagaline.errors import StoreUnavailable

__all__ = ["gone", "unavailable"]

# Primary result codes (the low byte of an extended code) that describe the store, not the data.
_UNAVAILABLE = {
    5: "the database is locked by another connection",  # SQLITE_BUSY
    6: "a table is locked",  # SQLITE_LOCKED
    7: "out of memory",  # SQLITE_NOMEM
    8: "the database is read-only",  # SQLITE_READONLY
    9: "interrupted",  # SQLITE_INTERRUPT
    10: "disk I/O error",  # SQLITE_IOERR
    13: "the database or disk is full",  # SQLITE_FULL
    14: "the database file cannot be opened",  # SQLITE_CANTOPEN
    15: "the database's locking protocol failed",  # SQLITE_PROTOCOL
}


def unavailable(exc: BaseException, path: str) -> StoreUnavailable | None:
    """``exc`` (or the error that caused it) as :class:`StoreUnavailable`, when it is one."""
    for error in (exc, exc.__cause__):
        if isinstance(error, StoreUnavailable):
            return error
        if isinstance(error, sqlite3.Error):
            code = getattr(error, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _UNAVAILABLE:
                return StoreUnavailable(f"the store {path} is unavailable: {error}")
    return None


def gone(exc: BaseException, path: str) -> StoreUnavailable:
    """The unit of work's transaction is no longer open: SQLite rolled it back after an error.

    Statements run from here on would each commit alone, so the whole unit is abandoned.
    """
    cause = exc if exc.__cause__ is None or isinstance(exc, sqlite3.Error) else exc.__cause__
    return StoreUnavailable(
        f"SQLite rolled back the unit of work on {path} after an error: {cause}"
    )
