"""RabbitMQ joins the bus suite: a virtual host and topology prefix of each test's own, each
member's store a SQLite file in outbox mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.deploy import open_bus
from sagaline.testing.conformance import BusPortConformance, Harness, MakeHarness

from .faults import SqliteStoreFaults


class TestRabbitmqBusPort(SqliteStoreFaults, BusPortConformance):
    """Quorum queues with single active consumers per partition, a stream for replay."""

    bus_is_a_database = False

    @pytest.fixture
    def make_harness(self, rabbitmq_url: str, tmp_path: Path) -> MakeHarness:
        made: list[Harness] = []

        def make() -> Harness:
            store = SqliteDatabase(f"sqlite:///{tmp_path}/store-{len(made)}.db", outbox=True)
            made.append(harness := Harness(store, open_bus(rabbitmq_url)))
            return harness

        return make
