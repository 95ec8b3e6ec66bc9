"""SQLite joins the conformance suites: each test on files of its own in its ``tmp_path``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.clock import Clock
from sagaline.testing.conformance import (
    BusConformance,
    BusPortConformance,
    Harness,
    MakeHarness,
    OpenBackend,
    OpenOutboxStore,
    OpenStore,
    OutboxConformance,
    StoreConformance,
)

from .faults import SqliteStoreFaults


@pytest.fixture
def open_sqlite(tmp_path: Path) -> Iterator[Callable[..., SqliteDatabase]]:
    """Opens a file of the test's own (``name``) with options; closes each at the end."""
    opened: list[SqliteDatabase] = []

    def open_file(
        name: str,
        *,
        lease_seconds: float | None = None,
        clock: Clock | None = None,
        **options: Any,
    ) -> SqliteDatabase:
        if lease_seconds is not None:
            options["lease_seconds"] = lease_seconds
        if clock is not None:
            options["clock"] = clock
        db = SqliteDatabase(f"sqlite:///{tmp_path}/{name}.db", **options)
        opened.append(db)
        return db

    yield open_file
    for db in opened:
        asyncio.run(db.close())


class TestSqliteStore(StoreConformance):
    """The embedded default: one SQLite file."""

    @pytest.fixture
    def make_store(self, open_sqlite: Callable[..., SqliteDatabase]) -> OpenStore:
        return lambda: open_sqlite("store")


class TestSqliteOutbox(OutboxConformance):
    """A SQLite store in outbox mode, its bus elsewhere."""

    @pytest.fixture
    def make_outbox_store(self, open_sqlite: Callable[..., SqliteDatabase]) -> OpenOutboxStore:
        def make(*, lease_seconds: float | None = None) -> SqliteDatabase:
            return open_sqlite("store", outbox=True, lease_seconds=lease_seconds)

        return make


class TestSqliteBus(BusConformance):
    """The embedded default: store and bus in one SQLite file."""

    @pytest.fixture
    def make_backend(self, open_sqlite: Callable[..., SqliteDatabase]) -> OpenBackend:
        def make(
            *, lease_seconds: float | None = None, clock: Clock | None = None
        ) -> SqliteDatabase:
            return open_sqlite("bus", lease_seconds=lease_seconds, clock=clock)

        return make


class TestSqliteBusPort(SqliteStoreFaults, BusPortConformance):
    """Store and bus in one SQLite file."""

    @pytest.fixture
    def make_harness(self, tmp_path: Path) -> MakeHarness:
        def make() -> Harness:
            return Harness(SqliteDatabase(f"sqlite:///{tmp_path}/one.db", lease_seconds=0.5), None)

        return make


class TestSeparateSqliteBusPort(SqliteStoreFaults, BusPortConformance):
    """Each member's store in its own SQLite file (outbox mode), the bus in another."""

    @pytest.fixture
    def make_harness(self, tmp_path: Path) -> MakeHarness:
        def make() -> Harness:
            store = SqliteDatabase(f"sqlite:///{tmp_path}/store.db", outbox=True)
            bus = SqliteDatabase(f"sqlite:///{tmp_path}/bus.db", lease_seconds=0.5)
            return Harness(store, bus)

        return make
