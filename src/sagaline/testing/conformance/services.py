"""The services the bus suites run: each records what it handled, per key, in its store."""

from __future__ import annotations

from typing import Any

from sagaline.handling import Context, Service
from sagaline.messages import Command, Event
from sagaline.ports import RetryPolicy, StoreQueries

__all__ = ["FAST_RETRY", "queue_service", "record", "recorded", "subscriber"]

#: Retries close together, so that a test of failures does not wait for long.
FAST_RETRY = RetryPolicy(max_attempts=10, initial_delay=0.01, multiplier=2.0, max_delay=0.05)


async def record(ctx: Context, message: Any) -> None:
    """Append the message's ``seq`` (and its payload's size) to the handling service's document
    for the message's ``key``, in the namespace ``bus.<service>``."""
    namespace = f"bus.{ctx.service}"
    document = await ctx.tx.get_document(namespace, message.key)
    data = dict(document.data) if document else {"key": message.key, "seqs": [], "sizes": []}
    data["seqs"] = [*data["seqs"], message.seq]
    data["sizes"] = [*data["sizes"], len(getattr(message, "payload", ""))]
    await ctx.tx.put_document(namespace, message.key, data, document.version if document else 0)


async def recorded(store: StoreQueries, service: str) -> dict[str, list[int]]:
    """What ``service`` handled (with :func:`record`): per key, the seqs in the order handled."""
    return {row["key"]: row["seqs"] for row in await store.query_documents(f"bus.{service}")}


def queue_service(name: str, *types: type[Command], retry: RetryPolicy = FAST_RETRY) -> Service:
    """A service ``name`` whose queue takes ``types``, recording each."""
    service = Service(name, retry=retry)
    service.handles(*types)(record)
    return service


def subscriber(name: str, *types: type[Event], retry: RetryPolicy = FAST_RETRY) -> Service:
    """A service ``name`` subscribed to ``types``, recording each."""
    service = Service(name, retry=retry)
    service.subscribes(*types)(record)
    return service
