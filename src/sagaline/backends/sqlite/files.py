"""The store file: what may be opened as a store, and how it is created and opened read-only.

A file that exists, holds data and is not a sagaline store (another application's database, or
not a database at all) is refused before anything writes to it: no table, no switch to WAL.
``sagaline migrate`` adopts a SQLite database on purpose. A new store file is created readable
and writable by its owner only; SQLite gives its ``-wal`` and ``-shm`` files the same mode.
A store file marked resettable (or holding no data yet) may be deleted to start afresh
(:func:`reset`); any other is left as it is.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import suppress
from pathlib import Path
from typing import Any

from sagaline.backends.sqlite.rows import path_from_url
from sagaline.errors import NotAStore, StoreUnavailable

__all__ = [
    "NotAStore",
    "check_store_file",
    "connect_read_only",
    "create_owner_only",
    "reset",
]

_SQLITE_HEADER = b"SQLite format 3\x00"
#: The files SQLite keeps beside a database file, which go with it.
_SIDE_FILES = ("-wal", "-shm", "-journal")
#: The tables that hold a store's data (a store without rows in any is empty).
_DATA_TABLES = ("events", "commands", "documents", "sagas", "inbox", "outbox", "dead_letters")


def _uri(path: str, **parameters: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in parameters.items())
    return f"{Path(path).resolve().as_uri()}?{query}"


def connect_read_only(path: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection that cannot write to the file at ``path``, and creates no file beside it.

    Every connection to a WAL database keeps its ``-wal`` file. Without one, the database is
    open nowhere and all of it is in the main file, which is read as immutable: no ``-wal`` or
    ``-shm`` file is created (they would outlive a read-only connection, owned by whoever ran
    the query), and a read-only directory or file system is no obstacle. With one, the file is
    read through the existing ``-wal`` and ``-shm``, seeing what their writers committed.
    """
    if Path(path + "-wal").exists():
        uri = _uri(path, mode="ro")
    else:
        uri = _uri(path, mode="ro", immutable="1")
    return sqlite3.connect(
        uri, uri=True, isolation_level=None, check_same_thread=check_same_thread, timeout=30.0
    )


def _is_sqlite(path: str) -> bool:
    with open(path, "rb") as file:
        return file.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER


def _has_sagaline_meta(path: str) -> bool:
    connection = connect_read_only(path)
    try:
        row = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sagaline_meta'"
        ).fetchone()
    finally:
        connection.close()
    return row is not None


def check_store_file(path: str, url: str, *, adopt: bool = False) -> None:
    """Refuse (:class:`NotAStore`) an existing, non-empty file that is not a sagaline store.

    A missing or empty file is fine (it becomes a new store), and so, with ``adopt``, is any
    SQLite database. The file is only read.
    """
    if path == ":memory:":
        return
    try:
        if os.stat(path).st_size == 0:
            return
        if not _is_sqlite(path):
            raise NotAStore(f"{path} is not a SQLite database; it was left untouched")
        if adopt or _has_sagaline_meta(path):
            return
    except FileNotFoundError:
        return
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"the store {url} cannot be read: {exc}") from exc
    raise NotAStore(
        f"{path} is a SQLite database that is not a sagaline store; it was left untouched."
        f" To add sagaline's tables to it, run `sagaline migrate --store {url}`"
    )


def create_owner_only(path: str) -> None:
    """Create the file at ``path`` with mode 0600 unless it exists (SQLite then opens it)."""
    if path == ":memory:":
        return
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


async def reset(url: str, *, mark: str, delete: bool, **_options: Any) -> bool:
    """Whether the store file at ``url`` may be deleted to start afresh, and, if it may and
    ``delete``, delete it with the files beside it (the scheme registry's ``reset``; see
    :mod:`sagaline.config`).

    It may when it carries the metadata mark ``mark`` (value ``"1"``), holds no data yet, or
    does not exist. It is only read to find out: a file that is not the deployment's is not
    touched, not even by creating sagaline's tables in it.
    """
    path = path_from_url(url)
    if path == ":memory:" or not Path(path).exists():
        return True
    if not _resettable(path, mark):
        return False
    if delete:
        for name in (path, *(path + suffix for suffix in _SIDE_FILES)):
            Path(name).unlink(missing_ok=True)
    return True


def _resettable(path: str, mark: str) -> bool:
    """Whether the file at ``path`` is empty, or a sagaline store marked ``mark`` or empty."""
    try:
        if os.stat(path).st_size == 0:
            return True
        if not _is_sqlite(path):
            return False
        connection = connect_read_only(path)
    except (OSError, sqlite3.Error):
        return False
    try:
        row = connection.execute(
            "SELECT value FROM sagaline_meta WHERE key = ?", (mark,)
        ).fetchone()
        if row is not None and row[0] == "1":
            return True
        return not any(
            connection.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()
            for table in _DATA_TABLES
        )
    except sqlite3.Error:
        return False  # not a sagaline store
    finally:
        connection.close()
