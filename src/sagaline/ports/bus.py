"""The bus (durable command queues and event subscriptions), and the databases that are a store
and a bus in one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from sagaline.messages import Envelope
from sagaline.ports.batches import Batch, ConsumerSpec, Outcome
from sagaline.ports.records import StoredEvent
from sagaline.ports.store import (
    AuditRows,
    Idleness,
    Metadata,
    Outbox,
    ProjectionSwap,
    Store,
    StoreQueries,
)
from sagaline.ports.transaction import StoreTransaction

__all__ = ["Backend", "BrokerBus", "Bus", "Database"]


@runtime_checkable
class Bus(Protocol):
    """Durable command queues and event subscriptions."""

    url: str

    async def open(self) -> None:
        """Connect (a database bus also creates its schema); idempotent."""
        ...

    async def publish(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Put messages on the bus durably; returns once the bus has confirmed every message.

        A database that is its own bus writes them in a transaction of its own. A message id
        already there with the same message is a retry and changes nothing.
        """
        ...

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Lease up to ``limit`` deliveries for ``consumer``; empty when there is no work."""
        ...

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Give back at once whatever ``member`` holds for ``consumer`` (it is stopping)."""
        ...

    async def wait_for_work(self, consumer: ConsumerSpec, timeout: float) -> None:
        """Return when new work may be there, or after ``timeout`` seconds."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class BrokerBus(Bus, Protocol):
    """A bus that is not the service's store: messages arrive through the outbox relay, and each
    delivery is completed after the store's commit (ack; retry after backoff; dead letters are
    recorded in the store, then acknowledged). RabbitMQ and NATS are such buses; so is a SQLite or
    PostgreSQL bus used from another database.
    """

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Declare what the system needs (queues, streams, bindings); idempotent."""
        ...

    def database(self) -> Database | None:
        """This bus as a database (SQLite, PostgreSQL), which also keeps the commands clients
        submitted (the start of an audit trail); None for a message broker."""
        ...

    @property
    def max_payload(self) -> int | None:
        """The largest message (body and headers, in bytes) the bus carries when that is below
        sagaline's own limit (a NATS server's ``max_payload``); None when sagaline's is the
        bound."""
        ...

    async def complete(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """After the store committed: settle each delivery (ACK and DEAD acknowledge; RETRY comes
        back after ``consumer.retry.delay(attempt)``; SKIP comes back keeping its key's order)."""
        ...

    def replay(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """The retained event log from a position (projection rebuilds)."""
        ...


@runtime_checkable
class Backend(Store, Bus, Protocol):
    """A store and a bus in one database: outgoing messages and acks join the store's transaction.

    SQLite and PostgreSQL are such backends; a broker bus pairs with a store through its outbox.
    """

    async def settle(
        self, tx: StoreTransaction, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]
    ) -> None:
        """Record each delivery's outcome inside ``tx`` (ack, retry with backoff, dead letter)."""
        ...


@runtime_checkable
class Database(
    Backend,
    BrokerBus,
    Outbox,
    StoreQueries,
    AuditRows,
    Metadata,
    Idleness,
    ProjectionSwap,
    Protocol,
):
    """A database adapter with every capability: a service's store, its own bus or the bus of
    stores elsewhere, its outbox, the query tools, audit rows, metadata, idleness and
    projection swaps.

    SQLite and PostgreSQL are databases; a :class:`~sagaline.deploy.Deployment` opens one per
    service (or one shared by the services on one SQLite file).
    """
