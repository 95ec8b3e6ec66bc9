"""Which SQLite errors mean the store is unavailable, as opposed to a failing message.

A full disk, an I/O error, a lock held past the busy timeout or a file turned read-only are the
store's condition, not the message's: the unit of work is rolled back whole and tried again once
the store answers, and no message is charged an attempt for it. Any other error (a constraint, a
statement a handler got wrong) stays the handler's failure. The errors are told as sagaline's
:class:`StoreUnavailable`, with a message a person can act on.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sagaline.errors import StoreUnavailable

__all__ = ["gone", "unavailable"]

#: Free space below which an I/O error while writing is taken for a full device.
_NEARLY_FULL_BYTES = 1024 * 1024

# Primary result codes (the low byte of an extended code) that describe the store, not the data.
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_OTHER = {sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_PROTOCOL}


def _device_nearly_full(path: str) -> bool:
    try:
        stats = os.statvfs(Path(path).resolve().parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def _told(error: sqlite3.Error, code: int, url: str, path: str) -> StoreUnavailable | None:
    primary = code & 0xFF
    if primary == sqlite3.SQLITE_FULL or (
        # A full device shows as an I/O error too, when SQLite fails to grow its shm file.
        primary == sqlite3.SQLITE_IOERR and _device_nearly_full(path)
    ):
        return StoreUnavailable(f"the store {url} is full (no space left on the device)")
    if primary == sqlite3.SQLITE_IOERR:
        name = getattr(error, "sqlite_errorname", primary)
        return StoreUnavailable(f"the store {url} cannot be read or written: {error} ({name})")
    if primary == sqlite3.SQLITE_READONLY:
        return StoreUnavailable(f"the store {url} cannot be written: {error}")
    if primary == sqlite3.SQLITE_CANTOPEN:
        return StoreUnavailable(f"the store {url} cannot be opened: {error}")
    if primary in _BUSY:
        return StoreUnavailable(f"the store {url} is locked by another connection: {error}")
    if primary in _OTHER:
        return StoreUnavailable(f"the store {url} is unavailable: {error}")
    return None


def unavailable(exc: BaseException, url: str, path: str) -> StoreUnavailable | None:
    """``exc``, or an error it was raised from or while handling, as :class:`StoreUnavailable`
    when it is one (an error raised while rolling back after a full disk carries it along)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, StoreUnavailable):
            return error
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(error, sqlite3.Error) and isinstance(code, int):
            told = _told(error, code, url, path)
            if told is not None:
                return told
        error = error.__cause__ or error.__context__
    return None


def gone(exc: BaseException, url: str, path: str) -> StoreUnavailable:
    """The unit of work's transaction is no longer open: SQLite rolled it back after an error.

    Statements run from here on would each commit alone, so the whole unit is abandoned.
    """
    told = unavailable(exc, url, path)
    if told is not None:
        return told
    cause = exc if exc.__cause__ is None or isinstance(exc, sqlite3.Error) else exc.__cause__
    return StoreUnavailable(f"SQLite rolled back the unit of work on {url} after an error: {cause}")
