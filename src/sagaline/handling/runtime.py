"""The runtime: a process's workers for a set of services, and the outbox relay beside them."""

from __future__ import annotations

import asyncio
import inspect
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.errors import ConfigurationError
from sagaline.handling.system import System
from sagaline.handling.timers import TimerPoller
from sagaline.handling.worker import DEFAULT_BATCH, Worker
from sagaline.ports import Backend, BrokerBus, Outbox
from sagaline.relay import Relay

__all__ = ["Condition", "Runtime", "holds"]

#: What a runner waits for: a function that says whether it holds, now or once awaited (a
#: store's asynchronous query: ``lambda: db.is_idle(system.subscribers)``).
Condition = Callable[[], bool | Awaitable[bool]]


async def holds(condition: Condition) -> bool:
    """Whether ``condition`` holds, awaiting its answer when it gives a coroutine."""
    answer = condition()
    if inspect.isawaitable(answer):
        answer = await answer
    return bool(answer)


class Runtime:
    """Runs the workers of a set of services in this process against one store (and bus).

    Without ``bus`` the store's database is the bus too. With a separate ``bus``, the store must be
    opened in outbox mode; the runtime declares the system's topology on the bus and runs the
    outbox relay beside the workers. ``clock`` is what the workers' backoff and
    :meth:`run_until`'s checks wait on (a deployment hands its own; a fake one moves only when
    told).
    """

    def __init__(
        self,
        db: Backend,
        system: System,
        services: Iterable[str] | None = None,
        *,
        bus: BrokerBus | None = None,
        member: str | None = None,
        batch_size: int = DEFAULT_BATCH,
        poll_interval: float = 0.1,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.db = db
        self.clock = clock
        self.bus = None if bus is None or cast(object, bus) is db else bus
        self.system = system
        self.member = member or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        names = list(services) if services is not None else list(system.services)
        self.workers = [
            Worker(
                db,
                system,
                system.services[name],
                spec,
                member=self.member,
                batch_size=batch_size,
                poll_interval=poll_interval,
                bus=self.bus,
                clock=clock,
            )
            for name in names
            for spec in system.services[name].consumers()
        ]
        self.relay: Relay | None = None
        if self.bus is not None:
            if not db.outbox or not isinstance(db, Outbox):
                raise ConfigurationError(
                    "a store used with a separate bus must be opened in outbox mode"
                )
            self.relay = Relay(db, self.bus, system.routes, owner=self.member)
        #: Fires the store's due timers (see :mod:`sagaline.handling.timers`).
        self.timers = TimerPoller(db, system)
        self.stop_event = asyncio.Event()
        self._relay_stop = asyncio.Event()

    async def run(self) -> None:
        """Run every worker until :meth:`stop`; in-flight batches finish first."""
        self.db.start_checkpointer()
        if self.bus is not None:
            consumers = [
                spec for service in self.system.services.values() for spec in service.consumers()
            ]
            await self.bus.prepare(consumers, self.system.routes)
        runs = [worker.run(self.stop_event) for worker in self.workers]
        tasks = [asyncio.create_task(run) for run in runs]
        tasks.append(asyncio.create_task(self.timers.run(self.stop_event)))
        relay = None
        if self.relay is not None:
            relay = asyncio.create_task(self.relay.run(self._relay_stop))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if relay is not None:
                # The workers are done: the relay publishes what they emitted last, then stops.
                self._relay_stop.set()
                await relay

    def stop(self) -> None:
        """Ask every worker to finish its batch and return."""
        self.stop_event.set()

    async def run_until(
        self, done: Condition, *, check_every: float = 0.05, timeout: float = 300.0
    ) -> None:
        """Run until ``done()`` is true, then stop; ``done`` may answer asynchronously (a
        store's query).

        ``done()`` is checked every ``check_every`` seconds and ``timeout`` counted, both on the
        runtime's clock; a worker that fails ends the wait at once, with its error.
        """
        runner = asyncio.create_task(self.run())
        clock = self.clock
        deadline = clock.monotonic() + timeout
        try:
            while not await holds(done):
                if runner.done():
                    runner.result()
                if clock.monotonic() > deadline:
                    raise TimeoutError(f"not done after {timeout} seconds")
                pause = asyncio.ensure_future(clock.sleep(check_every))
                waits = {pause} if runner.done() else {runner, pause}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    pause.cancel()
        finally:
            self.stop()
            await runner

    @property
    def handled(self) -> int:
        """Deliveries handled by this runtime's workers."""
        return sum(worker.handled for worker in self.workers)
