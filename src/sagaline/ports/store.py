"""A service's store and what it offers besides units of work: the query tools, the audit rows
of the invariant checker, metadata, idleness, projection swaps, disposal and the outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from sagaline.clock import Clock
from sagaline.ports.records import DeadLetter, Document, OutboxEntry, SagaRecord, StoredEvent
from sagaline.ports.transaction import StoreTransaction

__all__ = [
    "AuditRows",
    "Disposable",
    "Idleness",
    "Metadata",
    "Outbox",
    "ProjectionSwap",
    "Store",
    "StoreQueries",
]


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
    """Read-only queries every store offers to tools (CLI, HTTP API, tests, the invariant
    checker), outside any unit of work. Asynchronous, so that a store across a network answers
    without blocking the event loop the tool runs on."""

    async def get_document(self, namespace: str, key: str) -> Document | None:
        """One document, or None."""
        ...

    async def query_documents(
        self, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """The documents of a namespace whose top-level fields equal ``filters``, by key."""
        ...

    async def get_saga(self, saga_id: str, *, history: bool = True) -> SagaRecord | None:
        """One saga instance (with its transitions), or None."""
        ...

    async def list_sagas(self, status: str | None = None) -> list[SagaRecord]:
        """Saga instances, optionally only those in ``status``."""
        ...

    async def saga_counts(self) -> dict[str, int]:
        """How many saga instances are in each status."""
        ...

    async def trace_rows(self, correlation_id: str) -> list[dict[str, Any]]:
        """Every message of one business key this store knows, with who handled it and when."""
        ...

    async def handled_by(self, message_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """Which consumers of this store handled each message, and when."""
        ...

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter of this store, oldest first."""
        ...

    async def head_position(self) -> int:
        """The position of the last event of the store's log (0 when empty)."""
        ...

    async def read_stream(self, stream: str) -> list[StoredEvent]:
        """Every event of one stream, in version order."""
        ...


class AuditRows(Protocol):
    """Every row of a database, table by table, for checkers that audit a whole system
    (:mod:`sagaline.testing.invariants`)."""

    async def audit_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row the invariant checker reads, in one consistent read; the keys and column
        orders are the contract documented on ``SqliteReader.audit_rows`` (SQLite)."""
        ...


class Metadata(Protocol):
    """A database's own key-value metadata (its schema version, a tool's mark)."""

    async def get_meta(self, key: str) -> str | None:
        """The value of ``key``, or None."""
        ...

    async def set_meta(self, key: str, value: str) -> None:
        """Set ``key`` to ``value`` (in a transaction of its own)."""
        ...


class Idleness(Protocol):
    """How much work a database still holds, for checks that wait for a system to settle."""

    async def outbox_pending(self) -> int:
        """How many outbox entries are not published yet (0 for a store that is its bus)."""
        ...

    async def pending_counts(self) -> dict[str, int]:
        """Per queue of this database, how many commands wait to be handled (empty queues are
        left out)."""
        ...

    async def subscription_lag(self) -> dict[str, int]:
        """Per subscriber, how many log positions its slowest partition is behind."""
        ...

    async def is_idle(self, subscribers: Iterable[str] = ()) -> bool:
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

    async def outbox_release(self, owner: str) -> None:
        """Give the relay lease up if ``owner`` holds it (a relay that stops), so that the next
        relay publishes at once instead of waiting for the lease to expire."""
        ...

    async def outbox_refused(self, entry: OutboxEntry, reason: str) -> None:
        """Set aside an entry the bus refuses for good (too large for it, say): it is recorded
        as a dead letter of the consumer ``outbox`` with ``reason`` and not published again."""
        ...

    async def wait_for_outbox(self, timeout: float) -> None:
        """Return when a unit of work of this process emitted something, or after ``timeout``."""
        ...
