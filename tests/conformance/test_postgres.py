"""PostgreSQL joins the conformance suites: each test on schemas (or a database) of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sagaline.backends.postgres import PostgresDatabase
from sagaline.clock import Clock
from sagaline.deploy import open_bus
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
    StoreFaultConformance,
)

from .faults import PostgresStoreFaults


def schema_name(prefix: str) -> str:
    """A schema name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def open_pg(postgres_module_url: str) -> Iterator[Callable[..., PostgresDatabase]]:
    """Opens PostgresDatabase objects on the module's database; all are closed afterwards."""
    opened: list[PostgresDatabase] = []

    def make(
        *, lease_seconds: float | None = None, clock: Clock | None = None, **options: Any
    ) -> PostgresDatabase:
        if lease_seconds is not None:
            options["lease_seconds"] = lease_seconds
        if clock is not None:
            options["clock"] = clock
        db = PostgresDatabase(postgres_module_url, **options)
        opened.append(db)
        return db

    yield make
    for db in opened:
        asyncio.run(db.close())


class TestPostgresStore(StoreConformance):
    """The store suite on a schema of the test's own."""

    @pytest.fixture
    def make_store(self, open_pg: Callable[..., PostgresDatabase]) -> OpenStore:
        schema = schema_name("store")
        return lambda: open_pg(schema=schema)


class TestPostgresOutbox(OutboxConformance):
    """The outbox suite on a schema of the test's own, in outbox mode."""

    @pytest.fixture
    def make_outbox_store(self, open_pg: Callable[..., PostgresDatabase]) -> OpenOutboxStore:
        schema = schema_name("outbox")

        def make(*, lease_seconds: float | None = None) -> PostgresDatabase:
            return open_pg(schema=schema, outbox=True, lease_seconds=lease_seconds)

        return make


class TestPostgresBus(BusConformance):
    """The bus suite, store and bus in separate schemas of one database."""

    @pytest.fixture
    def make_backend(self, open_pg: Callable[..., PostgresDatabase]) -> OpenBackend:
        schema, bus_schema = schema_name("svc"), schema_name("bus")

        def make(
            *, lease_seconds: float | None = None, clock: Clock | None = None
        ) -> PostgresDatabase:
            return open_pg(
                schema=schema, bus_schema=bus_schema, lease_seconds=lease_seconds, clock=clock
            )

        return make


class TestPostgresBusPort(PostgresStoreFaults, BusPortConformance):
    """Store and bus in one PostgreSQL database (the bus in a schema of its own)."""

    @pytest.fixture
    def make_harness(self, postgres_url: str) -> MakeHarness:
        def make() -> Harness:
            db = PostgresDatabase(postgres_url, schema="svc", bus_schema="bus", lease_seconds=0.5)
            return Harness(db, None)

        return make


class TestSeparatePostgresBusPort(PostgresStoreFaults, BusPortConformance):
    """The store in a PostgreSQL schema (outbox mode), the bus in another database's schema."""

    @pytest.fixture
    def make_harness(self, postgres_url: str) -> MakeHarness:
        def make() -> Harness:
            store = PostgresDatabase(postgres_url, schema="svc", outbox=True)
            return Harness(store, open_bus(postgres_url, lease_seconds=0.5))

        return make


class TestPostgresStoreBehindRabbitmq(PostgresStoreFaults, StoreFaultConformance):
    """A PostgreSQL store (outbox mode) behind RabbitMQ: its faults, not the bus's whole suite."""

    @pytest.fixture
    def harness(self, postgres_url: str, rabbitmq_url: str) -> Harness:
        store = PostgresDatabase(postgres_url, schema="svc", outbox=True)
        return Harness(store, open_bus(rabbitmq_url))


class TestPostgresStoreBehindNats(PostgresStoreFaults, StoreFaultConformance):
    """A PostgreSQL store (outbox mode) behind NATS JetStream: its faults."""

    @pytest.fixture
    def harness(self, postgres_url: str, nats_url: str) -> Harness:
        store = PostgresDatabase(postgres_url, schema="svc", outbox=True)
        return Harness(store, open_bus(nats_url))
