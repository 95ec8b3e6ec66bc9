"""Adapters, one package per technology, chosen by URL scheme and imported lazily.

Which module opens which scheme is the scheme registry's business (:mod:`sagaline.config`);
this module only resolves URLs through it, so importing it loads no driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sagaline.config import adapter_for

if TYPE_CHECKING:
    from sagaline.ports import Backend, BrokerBus, ConsumerSpec

__all__ = ["BrokerTopology", "open_backend", "open_bus"]


@runtime_checkable
class BrokerTopology(Protocol):
    """A broker bus that declares exchanges, queues or streams, and can delete them again."""

    async def open(self) -> None:
        """Connect to the broker."""

    async def delete_topology(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        """Delete what the bus declared for ``consumers`` (and the shared pieces), with the
        messages they hold."""

    @property
    def prepared_consumers(self) -> list[ConsumerSpec]:
        """The consumers this bus declared queues or consumers for in this process."""


def open_backend(url: str, **options: Any) -> Backend:
    """The store-and-bus backend a URL names (``sqlite:///path``, ``postgresql://...``).

    Call ``await backend.open()`` before use: a PostgreSQL backend connects and migrates its
    schemas there (it would also do so on first use); for SQLite it does nothing more.
    ``options`` go to the adapter's store factory (``clock=``, ``lease_seconds=``; see
    :mod:`sagaline.config`).
    """
    backend: Backend = adapter_for(url, "store").factory("store", url)(url, **options)
    return backend


def open_bus(url: str, **options: Any) -> BrokerBus:
    """The bus a URL names, not yet connected (``await bus.open()``, or on first use).

    ``amqp://user:pass@host:5672/vhost`` (RabbitMQ), ``nats://host:4222`` (NATS JetStream),
    a database bus for stores elsewhere: ``sqlite:///bus.db``, ``postgresql://...`` (schema
    ``sagaline_bus``), or any scheme an adapter registered
    (:func:`sagaline.config.register_scheme`).
    A broker URL may carry ``?prefix=NAME`` to name its exchanges, queues and streams apart from
    other systems on the same server, and a RabbitMQ URL ``?bundle=N``, the most messages one
    AMQP message carries (``bundle=1``: one each; see ``sagaline.backends.bundles``).
    ``instance=(i, n)`` tells a RabbitMQ bus that this process is instance i of n of its
    services (see :class:`~sagaline.backends.rabbitmq.RabbitBus`); other buses ignore it.
    ``connect_timeout`` (seconds) bounds how long opening a server's bus waits for it; a SQLite
    bus ignores it.
    """
    bus: BrokerBus = adapter_for(url, "bus").factory("bus", url)(url, **options)
    return bus
