"""The servers' isolation for the conformance subclasses: a database, a virtual host and topology
prefix, a stream prefix of each test's own, removed afterwards (see ``servers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import servers


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of this test's own on the PostgreSQL server."""
    yield from servers.postgres_database()


@pytest.fixture(scope="module")
def postgres_module_url() -> Iterator[str]:
    """A database of this module's own on the PostgreSQL server (each test takes schemas of its
    own in it)."""
    yield from servers.postgres_database()


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A virtual host and topology prefix of this test's own on the RabbitMQ server."""
    yield from servers.rabbitmq_vhost()


@pytest.fixture
def nats_url() -> Iterator[str]:
    """A stream and subject prefix of this test's own on the NATS server."""
    yield from servers.nats_prefix()
