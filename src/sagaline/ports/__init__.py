"""The ports every adapter implements: the Store (state) and the Bus (messages).

The core only knows these protocols. An adapter is one module per technology under
``sagaline.backends``, chosen by URL scheme. When the bus lives in the same database as the store
(SQLite, PostgreSQL), outgoing messages and acknowledgements are written inside the store's
transaction; a broker bus (RabbitMQ, NATS) gets them through the store's outbox instead.

The package is split by capability: :mod:`.batches` (what a bus hands a consumer),
:mod:`.records` (what a store holds), :mod:`.transaction` (one unit of work), :mod:`.store` (the
store and its capabilities: query tools, audit rows, metadata, idleness, projection swaps, the
outbox) and :mod:`.bus` (the bus, and the databases that are a store and a bus in one).
"""

from __future__ import annotations

from sagaline.ports.batches import Batch, ConsumerSpec, Delivery, Outcome, RetryPolicy
from sagaline.ports.bus import Backend, BrokerBus, Bus, Database
from sagaline.ports.records import (
    DEAD_LETTER_BODY_BYTES,
    DEAD_LETTERED,
    DeadLetter,
    Document,
    OutboxEntry,
    SagaRecord,
    StoredEvent,
    bounded_dead_letter,
)
from sagaline.ports.store import (
    AuditRows,
    Disposable,
    Idleness,
    Metadata,
    Outbox,
    ProjectionSwap,
    Store,
    StoreQueries,
)
from sagaline.ports.transaction import Reads, StoreTransaction

__all__ = [
    "DEAD_LETTERED",
    "DEAD_LETTER_BODY_BYTES",
    "AuditRows",
    "Backend",
    "Batch",
    "BrokerBus",
    "Bus",
    "ConsumerSpec",
    "Database",
    "DeadLetter",
    "Delivery",
    "Disposable",
    "Document",
    "Idleness",
    "Metadata",
    "Outbox",
    "OutboxEntry",
    "Outcome",
    "ProjectionSwap",
    "Reads",
    "RetryPolicy",
    "SagaRecord",
    "Store",
    "StoreQueries",
    "StoreTransaction",
    "StoredEvent",
    "bounded_dead_letter",
]
