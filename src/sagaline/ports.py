"""The ports every adapter implements: the Store (state) and the Bus (messages).

The core only knows these protocols. An adapter is one module per technology under
``sagaline.backends``, chosen by URL scheme. When the bus lives in the same database as the store
(SQLite, PostgreSQL), outgoing messages and acknowledgements are written inside the store's
transaction; a broker bus (RabbitMQ, NATS) gets them through the store's outbox instead.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from sagaline.clock import Clock
from sagaline.messages import Envelope

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


#: The handling count of a message in the dead letters (see ``handling_ended``).
DEAD_LETTERED = 1 << 30


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed handling is retried: exponential backoff, then the dead letters."""

    max_attempts: int = 5
    initial_delay: float = 0.05
    multiplier: float = 2.0
    max_delay: float = 30.0

    @property
    def delivery_limit(self) -> int:
        """How many times a broker delivers a message before its own dead letters take it.

        A backstop, far above ``max_attempts``: the worker dead-letters a message that keeps
        failing or killing its consumer, counting the times it really handed it to its handler,
        while a broker counts a delivery for every message a dying consumer held.
        """
        return 5 * (self.max_attempts + 2)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before delivery number ``attempt + 1``."""
        return float(
            min(self.max_delay, self.initial_delay * self.multiplier ** max(0, attempt - 1))
        )


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """One consumer: a service's command queue, or its subscription to event types."""

    name: str
    source: Literal["queue", "subscription"]
    message_types: frozenset[str]
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer. ``ordering_key`` groups what must stay in order."""

    envelope: Envelope
    attempt: int
    ordering_key: Any
    token: Any


@dataclass(slots=True)
class Batch:
    """What one claim returned; ``cursor`` is adapter state needed to settle it."""

    consumer: ConsumerSpec
    deliveries: list[Delivery]
    cursor: Any = None


class Outcome(enum.Enum):
    """How one delivery of a batch ended."""

    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the log holds it: envelope, stream, version and global position."""

    position: int
    stream: str | None
    version: int | None
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Document:
    """A JSON document with the version it was read at (for optimistic concurrency)."""

    data: dict[str, Any]
    version: int


@dataclass(slots=True)
class SagaRecord:
    """The persisted state of one saga instance.

    ``history`` holds the transitions read back (left empty when the instance is loaded to make a
    transition); ``new_history`` the ones the current unit of work adds.
    """

    saga_id: str
    definition: str
    definition_version: int
    status: str
    step: int
    data: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0
    created_at: str = ""
    updated_at: str = ""
    new_history: list[dict[str, Any]] = field(default_factory=list)
    loaded_status: str = ""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A message a unit of work emitted, waiting in the store's outbox to be published."""

    id: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be processed, with the reason."""

    id: int
    consumer: str
    envelope: Envelope
    reason: str
    attempts: int
    failed_at: str


#: The most bytes of a body a dead letter keeps; a larger body is kept as this long a prefix,
#: with its size and SHA-256 in the reason.
DEAD_LETTER_BODY_BYTES = 64 * 1024


def bounded_dead_letter(
    body: bytes, reason: str, limit: int = DEAD_LETTER_BODY_BYTES
) -> tuple[bytes, str]:
    """The body and reason a store records for a dead letter: a body over ``limit`` bytes is cut
    to its first ``limit`` bytes (fewer, not to split a UTF-8 character of a text body) and the
    reason says so, with the whole body's size and SHA-256.
    """
    if len(body) <= limit:
        return body, reason
    prefix = body[:limit]
    # Drop a UTF-8 character cut in two (at most 3 bytes), so that a text body stays text.
    for cut in range(4):
        try:
            prefix[: limit - cut].decode()
        except UnicodeDecodeError:
            continue
        prefix = prefix[: limit - cut]
        break
    digest = hashlib.sha256(body).hexdigest()
    return prefix, (
        f"{reason}; body of {len(body):,} bytes stored truncated to its first"
        f" {len(prefix):,} bytes, sha256 {digest}"
    )


@dataclass(slots=True)
class Reads:
    """What handling a batch is about to read, declared ahead so a store can load it at once.

    A store across a network (PostgreSQL) loads every declared document, saga and stream of a
    batch in one round trip instead of one per read; an embedded one (SQLite) has nothing to gain
    and ignores it. Declaring is an optimization only: what is not declared is read as usual.
    """

    documents: dict[str, set[str]] = field(default_factory=dict)
    sagas: set[str] = field(default_factory=set)
    streams: set[str] = field(default_factory=set)

    def document(self, namespace: str, key: str) -> None:
        """The document ``key`` of ``namespace`` will be read."""
        self.documents.setdefault(namespace, set()).add(key)

    def saga(self, saga_id: str) -> None:
        """The saga instance ``saga_id`` will be read."""
        self.sagas.add(saga_id)

    def stream(self, stream: str) -> None:
        """The event stream ``stream`` will be read."""
        self.streams.add(stream)

    def __bool__(self) -> bool:
        return bool(self.documents or self.sagas or self.streams)


class StoreTransaction(Protocol):
    """One local transaction on a service's store: inbox, state and outgoing messages."""

    #: When this unit of work happens (ISO-8601 UTC); one value for everything it writes.
    now: str

    async def record_inbox(self, consumer: str, message_id: str) -> bool:
        """Mark ``message_id`` processed by ``consumer``; False if it already was."""
        ...

    async def seen(self, consumer: str, message_ids: Sequence[str]) -> set[str]:
        """Which of ``message_ids`` ``consumer`` has processed already (one query per batch)."""
        ...

    async def prefetch(self, reads: Reads) -> None:
        """Load what a batch declared it will read (see :class:`Reads`); may do nothing."""
        ...

    async def record_inbox_many(self, consumer: str, message_ids: Sequence[str]) -> None:
        """Mark many messages processed; none of them may be marked yet."""
        ...

    async def handling_counts(self, consumer: str, message_ids: Sequence[str]) -> list[int]:
        """How many handlings of each message :meth:`handling_started` counted (0: none)."""
        ...

    async def handling_started(self, consumer: str, message_ids: Sequence[str]) -> list[int]:
        """Count one more handling of each message ``consumer`` received again; the new counts.

        Committed before their handlers run, so that a message that kills its process is known
        by how many times it was handed to its handler, not by how many times a broker delivered
        it (a broker counts a delivery for every message a dying consumer held).
        """
        ...

    async def handling_aborted(self, consumer: str, message_ids: Sequence[str]) -> None:
        """Take back one count of :meth:`handling_started` for each message: their handling
        was cut short by the store failing, not by the message, so it does not count."""
        ...

    async def handling_ended(
        self, consumer: str, message_id: str, *, dead_lettered: bool = False
    ) -> None:
        """Forget the count of a message ``consumer`` handled; or, ``dead_lettered``, set it to
        :data:`DEAD_LETTERED`, so that a delivery of it again (its ack lost) is known as one."""
        ...

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested unit that rolls back alone when its block raises."""
        ...

    async def append(self, stream: str, expected_version: int, events: Sequence[Envelope]) -> int:
        """Append to a stream at ``expected_version``; ConcurrencyError on conflict."""
        ...

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order."""
        ...

    async def get_document(self, namespace: str, key: str) -> Document | None:
        """One document, or None."""
        ...

    async def put_document(
        self, namespace: str, key: str, data: dict[str, Any], expected_version: int
    ) -> int:
        """Write a document at ``expected_version`` (0 creates); returns the new version."""
        ...

    async def delete_namespace(self, namespace: str) -> None:
        """Delete every document of a namespace."""
        ...

    async def get_saga(self, saga_id: str) -> SagaRecord | None:
        """One saga instance, or None."""
        ...

    async def put_saga(self, record: SagaRecord) -> None:
        """Insert or update a saga instance at ``record.version``; bumps it."""
        ...

    async def emit(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Hand outgoing messages to the bus (same database) or the outbox."""
        ...

    async def dead_letter(
        self, consumer: str, envelope: Envelope, reason: str, attempts: int
    ) -> None:
        """Record a message that could not be processed."""
        ...

    async def remove_dead_letters(self, ids: Sequence[int]) -> list[DeadLetter]:
        """Remove the dead letters ``ids`` of this store in this unit of work (an operator
        replays or discards them); those that were there, by id."""
        ...

    async def schedule_timers(self, timers: Sequence[tuple[str, Envelope, float]]) -> None:
        """Set timers ``(timer id, message, seconds from now)``: each message goes out once
        when due (see :mod:`sagaline.handling.timers`); an id already set is moved."""
        ...

    async def cancel_timers(self, timer_ids: Sequence[str]) -> None:
        """Cancel timers by id; one that fired or was never set is passed over."""
        ...

    async def take_due_timers(self, limit: int) -> list[Envelope]:
        """Remove up to ``limit`` timers due now (the store's clock) and return their messages,
        earliest first, for this unit of work to emit."""
        ...

    async def record_received(self, consumer: str, envelopes: Sequence[Envelope]) -> None:
        """Keep messages submitted from outside (a client) that arrived through a broker.

        No store emitted them, so without this the audit trail of a deployment with a broker bus
        would start at their effects. A message already kept is passed over.
        """
        ...


@runtime_checkable
class Store(Protocol):
    """A service's own durable state."""

    url: str
    #: True when the store's messages go out through its outbox to a separate bus (a relay
    #: publishes them); False when the store's database is its bus.
    outbox: bool

    async def open(self) -> None:
        """Connect and create or check the schema; idempotent (may have nothing to do)."""
        ...

    #: What due times and leases are read from (a test kit's fake clock, or the machine's).
    clock: Clock

    async def next_timer_due(self) -> float | None:
        """When the store's next timer is due (seconds since the epoch); None when none is."""
        ...

    def start_checkpointer(self) -> None:
        """Start whatever background upkeep the store wants while services run on it (SQLite
        checkpoints its write-ahead log from a thread); does nothing where there is none."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[StoreTransaction]:
        """One unit of work; commits on success, rolls back on error."""
        ...

    async def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """The global event log from a position."""
        ...

    def iter_log(self, after: int = 0, batch: int = 1000) -> AsyncIterator[StoredEvent]:
        """Stream the global event log without loading it whole."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class StoreQueries(Protocol):
    """Read-only queries every store offers to tools (CLI, HTTP API, tests), outside any unit of
    work; synchronous, so that a check can run between two batches without awaiting."""

    def get_document_sync(self, namespace: str, key: str) -> Document | None:
        """One document, or None."""
        ...

    def query_documents(
        self, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """The documents of a namespace whose top-level fields equal ``filters``, by key."""
        ...

    def get_saga_sync(self, saga_id: str, *, history: bool = True) -> SagaRecord | None:
        """One saga instance (with its transitions), or None."""
        ...

    def list_sagas(self, status: str | None = None) -> list[SagaRecord]:
        """Saga instances, optionally only those in ``status``."""
        ...

    def saga_counts(self) -> dict[str, int]:
        """How many saga instances are in each status."""
        ...

    def trace_rows(self, correlation_id: str) -> list[dict[str, Any]]:
        """Every message of one business key this store knows, with who handled it and when."""
        ...

    def handled_by(self, message_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """Which consumers of this store handled each message, and when."""
        ...

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter of this store, oldest first."""
        ...

    def head_position(self) -> int:
        """The position of the last event of the store's log (0 when empty)."""
        ...

    def read_stream_sync(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order."""
        ...


class AuditRows(Protocol):
    """Every row of a database, table by table, for checkers that audit a whole system
    (:mod:`sagaline.testing.invariants`)."""

    def audit_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row the invariant checker reads, in one consistent read; the keys and column
        orders are the contract documented on the SQLite adapter's ``audit_rows``."""
        ...


class Metadata(Protocol):
    """A database's own key-value metadata (its schema version, a tool's mark)."""

    def get_meta(self, key: str) -> str | None:
        """The value of ``key``, or None."""
        ...

    async def set_meta(self, key: str, value: str) -> None:
        """Set ``key`` to ``value`` (in a transaction of its own)."""
        ...


class Idleness(Protocol):
    """How much work a database still holds, for checks that wait for a system to settle."""

    def outbox_pending(self) -> int:
        """How many outbox entries are not published yet (0 for a store that is its bus)."""
        ...

    def pending_counts(self) -> dict[str, int]:
        """Per queue of this database, how many commands wait to be handled (empty queues are
        left out)."""
        ...

    def subscription_lag(self) -> dict[str, int]:
        """Per subscriber, how many log positions its slowest partition is behind."""
        ...

    def is_idle(self, subscribers: Iterable[str] = ()) -> bool:
        """Whether nothing is left to deliver: no command pending, every subscriber at the head
        of the log. ``subscribers`` must have a cursor (one that never claimed has none, and
        would otherwise look caught up)."""
        ...


class ProjectionSwap(Protocol):
    """What a projection rebuild needs besides units of work: put the rebuilt view in place of
    the live one, and move the projection's cursor. Called inside a unit of work of the same
    task, each joins it (it takes effect when that unit commits)."""

    def rename_namespace(self, source: str, target: str) -> None:
        """Move every document of ``source`` to ``target``."""
        ...

    def reset_subscription(self, subscriber: str, position: int) -> None:
        """Move every partition cursor of ``subscriber`` to ``position``."""
        ...


@runtime_checkable
class Disposable(Protocol):
    """A store whose tables live in schemas it can drop in place (PostgreSQL), so that a tool
    (the demo) can start afresh; a SQLite file is replaced whole by its owner instead."""

    async def drop_if_marked(self, key: str) -> bool:
        """Drop the store's schemas if they carry the metadata mark ``key``, hold no data yet,
        or do not exist; False, leaving everything as it was, when they hold data unmarked."""
        ...


@runtime_checkable
class Outbox(Protocol):
    """The outbox of a store whose service publishes through a separate bus.

    ``StoreTransaction.emit`` (and ``append``) write the outgoing messages into the outbox in the
    unit of work; one relay per store publishes them in order and marks them sent.
    """

    async def outbox_claim(self, owner: str, limit: int) -> list[OutboxEntry]:
        """The oldest unsent entries, if ``owner`` holds (or now takes) the relay lease."""
        ...

    async def outbox_sent(self, ids: Sequence[int]) -> None:
        """Mark entries published; they are not handed out again."""
        ...

    async def outbox_refused(self, entry: OutboxEntry, reason: str) -> None:
        """Set aside an entry the bus refuses for good (too large for it, say): it is recorded
        as a dead letter of the consumer ``outbox`` with ``reason`` and not published again."""
        ...

    async def wait_for_outbox(self, timeout: float) -> None:
        """Return when a unit of work of this process emitted something, or after ``timeout``."""
        ...


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
