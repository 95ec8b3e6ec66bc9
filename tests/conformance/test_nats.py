"""NATS JetStream joins the bus suite: a stream and subject prefix of each test's own, each
member's store a SQLite file in outbox mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.deploy import open_bus
from sagaline.testing.conformance import BusPortConformance, Harness, MakeHarness

from .faults import SqliteStoreFaults


class TestNatsBusPort(SqliteStoreFaults, BusPortConformance):
    """File streams, durable pull consumers per partition."""

    bus_is_a_database = False

    @pytest.fixture
    def make_harness(self, nats_url: str, tmp_path: Path) -> MakeHarness:
        made: list[Harness] = []

        def make() -> Harness:
            store = SqliteDatabase(f"sqlite:///{tmp_path}/store-{len(made)}.db", outbox=True)
            made.append(harness := Harness(store, open_bus(nats_url)))
            return harness

        return make
