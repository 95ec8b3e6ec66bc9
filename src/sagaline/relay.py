"""The outbox relay: publishes what a service's units of work emitted to a separate bus.

When the bus is not in the service's own database (RabbitMQ, NATS, or a bus database shared by
services that each own their store), a unit of work cannot write to the bus in its transaction.
It writes its outgoing messages into its store's outbox instead, and the relay publishes them in
order, waits for the bus to confirm, then marks them sent. A crash between the confirm and the mark
publishes them again with the same message ids, which consumers' inboxes (and brokers with
de-duplication) absorb. One relay per store holds a lease, so the order of the outbox is the order
of publication.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import suppress

from sagaline.errors import InvalidMessage
from sagaline.ports import BrokerBus, Outbox

__all__ = ["Relay"]

log = logging.getLogger("sagaline.relay")


class Relay:
    """Moves one store's outbox to a bus until stopped; survives bus and store outages."""

    def __init__(
        self,
        store: Outbox,
        bus: BrokerBus,
        routes: Mapping[str, str],
        *,
        owner: str,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        self.store = store
        self.bus = bus
        self.routes = routes
        self.owner = owner
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.published = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, then publish what is left once and give the lease up
        (best effort: a relay that cannot lets it expire)."""
        failures = 0
        while not stop.is_set():
            try:
                moved = await self.publish_once()
                failures = 0
            except Exception:
                # The bus or the store is unreachable: everything stays in the outbox; back off.
                failures += 1
                log.warning("outbox relay: publishing failed, retrying", exc_info=True)
                await _wait(stop, min(self.max_backoff, 0.05 * 2**failures))
                continue
            if not moved:
                waiter = asyncio.ensure_future(stop.wait())
                work = asyncio.ensure_future(self.store.wait_for_outbox(self.poll_interval))
                await asyncio.wait({waiter, work}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                work.cancel()
        with suppress(Exception):
            while await self.publish_once():
                pass
        with suppress(Exception):
            await self.store.outbox_release(self.owner)

    async def publish_once(self) -> int:
        """Publish one batch of the outbox; how many entries were published."""
        entries = await self.store.outbox_claim(self.owner, self.batch_size)
        if not entries:
            return 0
        try:
            await self.bus.publish([entry.envelope for entry in entries], self.routes)
        except InvalidMessage:
            # The bus refuses one of them for good (it would never pass): publish one by one,
            # in order, and set the refused ones aside as dead letters instead of blocking.
            for entry in entries:
                try:
                    await self.bus.publish([entry.envelope], self.routes)
                except InvalidMessage as exc:
                    envelope = entry.envelope
                    log.error(
                        "outbox relay: %s %s refused by the bus: %s",
                        envelope.message_type,
                        envelope.message_id,
                        exc,
                    )
                    await self.store.outbox_refused(entry, f"refused by the bus: {exc}")
        await self.store.outbox_sent([entry.id for entry in entries])
        self.published += len(entries)
        return len(entries)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
