"""One unit of work on a service's store, and what a batch declares it will read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from sagaline.messages import Envelope
from sagaline.ports.records import DeadLetter, Document, SagaRecord, StoredEvent

__all__ = ["Reads", "StoreTransaction"]


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
