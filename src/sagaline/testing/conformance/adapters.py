"""What the suites ask of an adapter besides its ports: a few read-only counts to check against."""

from __future__ import annotations

from typing import Protocol

from sagaline.ports import Backend, Idleness, Outbox, Store, StoreQueries

__all__ = ["InspectableBackend", "InspectableOutboxStore", "InspectableStore"]


class InspectableStore(Store, StoreQueries, Idleness, Protocol):
    """A store the store suite can look into (its queries, and how much work it holds)."""


class InspectableBackend(Backend, StoreQueries, Idleness, Protocol):
    """A store and bus in one database that the bus suite can look into."""


class InspectableOutboxStore(Store, Outbox, StoreQueries, Idleness, Protocol):
    """A store in outbox mode that the outbox suite can look into."""
