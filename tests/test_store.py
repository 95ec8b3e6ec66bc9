"""What only the SQLite store shows: its file's durability settings, schema version and URLs.

The Store port's behaviour is in the conformance suite (``sagaline.testing.conformance``), run on
every store from ``tests/conformance``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sagaline.backends import open_backend
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.errors import ConfigurationError


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[[], SqliteDatabase]]:
    """Opens handles on one SQLite file of the test's own; closes them at the end."""
    opened: list[SqliteDatabase] = []

    def open_store() -> SqliteDatabase:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/store.db")
        opened.append(db)
        return db

    yield open_store
    for db in opened:
        asyncio.run(db.close())


def test_commits_are_durable_wal_with_full_sync(make_store: Callable[[], SqliteDatabase]) -> None:
    for db in (make_store(), make_store()):
        assert db.sync.execute("PRAGMA journal_mode") == [("wal",)]
        assert db.sync.execute("PRAGMA synchronous") == [(2,)]


def test_the_file_records_its_schema_version(make_store: Callable[[], SqliteDatabase]) -> None:
    version = make_store().sync.get_meta("schema_version")
    assert version is not None and int(version) >= 1


def test_a_url_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        open_backend(f"mysql://{tmp_path}/x")
    with pytest.raises(ConfigurationError):
        SqliteDatabase(f"sqlite:///{tmp_path}/missing-dir/x.db")
