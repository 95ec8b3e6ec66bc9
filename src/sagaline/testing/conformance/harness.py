"""A store and a bus driven together by real services: what the message-path suites run on.

A :class:`Harness` holds one store and one bus (none when the bus is in the store's database),
puts messages on the bus as a client or a broken producer would, runs services on them and reads
back what they recorded. :func:`drive` runs a test's scenario and closes every harness it made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from sagaline.backends import BrokerTopology
from sagaline.handling import Condition, Runtime, System, holds
from sagaline.messages import Envelope
from sagaline.ports import BrokerBus, Database, DeadLetter, StoredEvent
from sagaline.testing.conformance.services import recorded

__all__ = [
    "Harness",
    "MakeHarness",
    "both",
    "dead_lettered",
    "drive",
    "either",
    "handled_all",
    "run_until",
]


class Harness:
    """One store and one bus (the same object when the bus is in the store's database)."""

    def __init__(self, store: Database, bus: BrokerBus | None) -> None:
        self.store = store
        self.bus = bus
        self.extra_buses: list[BrokerBus] = []
        _OPEN.append(self)

    @property
    def entry(self) -> BrokerBus:
        """Where clients submit: the bus (or the store that is the bus)."""
        return self.bus if self.bus is not None else self.store

    @property
    def port(self) -> BrokerBus:
        """The object that claims and completes: the bus (or the store that is the bus)."""
        return self.bus if self.bus is not None else self.store

    async def open(self) -> None:
        """Open the store and the bus."""
        await self.store.open()
        if self.bus is not None:
            await self.bus.open()

    async def close(self) -> None:
        """Delete what the test declared on a broker, and close the buses and the store."""
        if isinstance(self.bus, BrokerTopology):
            # What the test declared on a broker goes with it (it holds the broker's resources).
            extra = [b for b in self.extra_buses if isinstance(b, BrokerTopology)]
            with contextlib.suppress(Exception):
                await self.bus.delete_topology([c for b in extra for c in b.prepared_consumers])
        for bus in [*self.extra_buses, *([self.bus] if self.bus is not None else [])]:
            with contextlib.suppress(Exception):
                await bus.close()
        await self.store.close()

    async def prepare(self, system: System) -> None:
        """Declare the queues and subscriptions of ``system`` on the bus."""
        consumers = [spec for service in system.services.values() for spec in service.consumers()]
        await self.port.prepare(consumers, system.routes)

    async def inject(self, envelopes: list[Envelope], system: System) -> None:
        """Put hand-made envelopes on the bus as they are, unchecked (what a broken or hostile
        producer could do)."""
        await self.prepare(system)
        await self.port.publish(envelopes, system.routes)

    def runtime(
        self, system: System, services: list[str] | None = None, member: str = "m"
    ) -> Runtime:
        """The services of ``system`` (or those named) as one member, on this store and bus."""
        return Runtime(
            self.store, system, services, bus=self.bus, member=member, poll_interval=0.05
        )

    async def recorded(self, service: str) -> dict[str, list[int]]:
        """What ``service`` recorded (see :func:`~.services.record`): per key, its seqs."""
        return await recorded(self.store, service)

    async def dead_letters(self) -> list[DeadLetter]:
        """The store's dead letters, oldest first."""
        return list(await self.store.dead_letters())

    async def replay(self, after: int = 0) -> list[StoredEvent]:
        """The bus's event log after ``after``."""
        return [stored async for stored in self.port.replay(after)]


#: Harnesses made by the running test; closed in the test's event loop when it ends.
_OPEN: list[Harness] = []


def drive(scenario: Callable[[], Any]) -> None:
    """Run a test's scenario, then close every harness it made, in the same event loop."""

    async def go() -> None:
        try:
            await scenario()
        finally:
            while _OPEN:
                with contextlib.suppress(Exception):
                    await _OPEN.pop().close()

    asyncio.run(go())


#: Makes one more harness on the test's storage (a second member of the same deployment).
MakeHarness = Callable[[], Harness]


async def run_until(
    harness: Harness,
    system: System,
    done: Condition,
    services: list[str] | None = None,
    timeout: float = 30,
    member: str = "m",
) -> Runtime:
    """Prepare the bus and run ``system``'s services until ``done`` (or fail after ``timeout``)."""
    await harness.prepare(system)
    runtime = harness.runtime(system, services, member)
    await runtime.run_until(done, timeout=timeout)
    return runtime


def handled_all(
    harness: Harness, service: str, expected: dict[str, list[int]]
) -> Callable[[], Awaitable[bool]]:
    """Whether ``service`` recorded at least as many messages per key as ``expected``."""

    async def done() -> bool:
        found = await harness.recorded(service)
        return all(len(found.get(key, [])) >= len(seqs) for key, seqs in expected.items())

    return done


def dead_lettered(harness: Harness, at_least: int = 1) -> Callable[[], Awaitable[bool]]:
    """Whether the store holds at least ``at_least`` dead letters."""

    async def done() -> bool:
        return len(await harness.dead_letters()) >= at_least

    return done


def both(*conditions: Condition) -> Callable[[], Awaitable[bool]]:
    """Whether every condition holds."""

    async def done() -> bool:
        for condition in conditions:
            if not await holds(condition):
                return False
        return True

    return done


def either(*conditions: Condition) -> Callable[[], Awaitable[bool]]:
    """Whether some condition holds."""

    async def done() -> bool:
        for condition in conditions:
            if await holds(condition):
                return True
        return False

    return done
