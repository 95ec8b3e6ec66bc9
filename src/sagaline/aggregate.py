"""Event-sourced aggregates: state is a fold over the aggregate's own stream."""

from __future__ import annotations

from typing import ClassVar

from sagaline.messages import Event

__all__ = ["Aggregate"]


class Aggregate:
    """Base of an event-sourced aggregate.

    Subclasses set ``stream_prefix`` and implement :meth:`apply`. A decision calls
    :meth:`record`, which applies the event now and keeps it for the unit of work to append at the
    version the aggregate was loaded at (a stale write raises ``ConcurrencyError``).
    """

    stream_prefix: ClassVar[str]

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0
        self.pending: list[Event] = []

    @classmethod
    def stream_name(cls, aggregate_id: str) -> str:
        """The stream that holds this aggregate's events."""
        return f"{cls.stream_prefix}-{aggregate_id}"

    @property
    def exists(self) -> bool:
        """Whether any event has been recorded for this aggregate."""
        return self.version > 0 or bool(self.pending)

    def apply(self, event: Event) -> None:
        """Change state by one event (no decisions, no I/O)."""
        raise NotImplementedError

    def record(self, event: Event) -> None:
        """Apply a new event and keep it to be appended."""
        self.apply(event)
        self.pending.append(event)
