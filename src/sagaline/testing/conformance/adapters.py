"""What the suites ask of an adapter besides its ports: a few read-only counts to check against."""

from __future__ import annotations

from typing import Protocol

from sagaline.ports import Backend, Outbox, Store, StoreQueries

__all__ = ["InspectableBackend", "InspectableOutboxStore", "InspectableStore"]


class InspectableStore(Store, StoreQueries, Protocol):
    """A store the store suite can look into."""

    def pending_counts(self) -> dict[str, int]:
        """Per queue, how many commands wait to be handled (none in the outbox are counted)."""
        ...


class InspectableBackend(Backend, StoreQueries, Protocol):
    """A store and bus in one database that the bus suite can look into."""

    def pending_counts(self) -> dict[str, int]:
        """Per queue, how many commands wait to be handled."""
        ...

    def subscription_lag(self) -> dict[str, int]:
        """Per subscriber, how many events of the log it has yet to handle."""
        ...


class InspectableOutboxStore(Store, Outbox, StoreQueries, Protocol):
    """A store in outbox mode that the outbox suite can look into."""

    def pending_counts(self) -> dict[str, int]:
        """Per queue of the store's own database, how many commands wait (none, in outbox mode)."""
        ...
