"""The timer poller: fires a store's due timers through the usual message path.

A handler sets a timer with :meth:`~sagaline.handling.Context.schedule`: the message it fires is
written to its store's ``timers`` in the handler's unit of work, so it is as durable as the rest
of that work, and cancelled the same way. The poller takes the due ones and emits their messages
in one transaction: onto the database bus, or into the outbox for the relay to publish. A timer
is taken once (the take and the emit commit together), and its message has a fixed id, so a
consumer's inbox absorbs a copy should a broker deliver one twice. Due times are read from the
store's clock, so a test kit's fake clock decides when a timer is due.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from sagaline.handling.crash import crash_point
from sagaline.handling.system import System
from sagaline.ports import Backend

__all__ = ["TimerPoller"]

log = logging.getLogger("sagaline.timers")


class TimerPoller:
    """Fires the due timers of one store until stopped."""

    def __init__(
        self,
        db: Backend,
        system: System,
        *,
        batch_size: int = 500,
        poll_interval: float = 0.25,
        max_backoff: float = 5.0,
    ) -> None:
        self.db = db
        self.system = system
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.fired = 0

    async def fire_once(self) -> int:
        """Fire the timers due now (at most a batch); how many."""
        async with self.db.transaction() as tx:
            due = await tx.take_due_timers(self.batch_size)
            if due:
                await tx.emit(due, self.system.routes)
                crash_point("timers-before-commit")
        self.fired += len(due)
        return len(due)

    async def run(self, stop: asyncio.Event) -> None:
        """Fire due timers until ``stop`` is set."""
        failures = 0
        while not stop.is_set():
            try:
                fired = await self.fire_once()
                failures = 0
                if fired >= self.batch_size:
                    continue
                wait = self.poll_interval
                due = await self.db.next_timer_due()
                if due is not None:
                    wait = min(wait, max(0.0, due - self.db.clock.time()))
            except Exception:
                failures += 1
                log.warning("timers: firing failed, retrying", exc_info=True)
                wait = min(self.max_backoff, 0.05 * 2**failures)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
