"""The bus suite's tests of time: a backend reads its leases and retry due times from the clock
it was opened with, so a fake clock moves them and no test sleeps for a backoff.

Part of :class:`~sagaline.testing.conformance.BusConformance`: its ``make_backend`` fixture
takes ``clock=`` (a :class:`~sagaline.clock.FakeClock`) and opens the backend on it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Protocol

from sagaline.clock import Clock, FakeClock
from sagaline.handling import Context, Runtime, Service, System, Worker
from sagaline.ports import RetryPolicy
from sagaline.testing.conformance.adapters import InspectableBackend
from sagaline.testing.conformance.messages import ConformanceCommand, ConformanceEvent
from sagaline.testing.conformance.services import queue_service, record, recorded

__all__ = ["ClockConformance", "OpenBackend"]

#: A backoff long enough that no test could wait for it: 30 seconds, then a minute.
SLOW_RETRY = RetryPolicy(max_attempts=5, initial_delay=30.0, multiplier=2.0, max_delay=600.0)


class OpenBackend(Protocol):
    """Opens the backend of the test (another handle on the same storage at each call), with
    shorter leases (``lease_seconds``) or on a clock of the test's (``clock``)."""

    def __call__(
        self, *, lease_seconds: float | None = None, clock: Clock | None = None
    ) -> InspectableBackend: ...


def _failing_until_moved(
    service: Service, clock: FakeClock, *types: type[Any]
) -> Counter[tuple[str, int]]:
    """Make ``service`` fail each message of ``types`` until ``clock`` has moved, then record it;
    returns the handler's calls per (key, seq)."""
    calls: Counter[tuple[str, int]] = Counter()
    start = clock.time()

    async def handle(ctx: Context, message: Any) -> None:
        calls[message.key, message.seq] += 1
        if clock.time() == start:
            raise RuntimeError("fails until the clock moves")
        await record(ctx, message)

    if issubclass(types[0], ConformanceEvent):
        service.subscribes(*types)(handle)
    else:
        service.handles(*types)(handle)
    return calls


def _worker(db: InspectableBackend, system: System, clock: FakeClock) -> Worker:
    [worker] = Runtime(db, system, member="clock-test", clock=clock).workers
    return worker


class ClockConformance:
    """Leases and retries by the backend's clock. Provided through ``make_backend(clock=...)``."""

    def test_a_retried_command_is_handed_out_once_the_clock_passes_its_backoff(
        self, make_backend: OpenBackend
    ) -> None:
        async def scenario() -> None:
            clock = FakeClock()
            db = make_backend(clock=clock)
            service = Service("alpha", retry=SLOW_RETRY)
            calls = _failing_until_moved(service, clock, ConformanceCommand)
            system = System([service])
            worker = _worker(db, system, clock)
            await system.submit(db, ConformanceCommand(key="K-1", seq=1))

            assert await worker.run_once()
            failed = calls["K-1", 1]
            clock.advance(SLOW_RETRY.delay(1) - 0.5)
            assert not await worker.run_once(), "handed out before its backoff had passed"
            assert calls["K-1", 1] == failed
            clock.advance(1.0)
            assert await worker.run_once()
            assert calls["K-1", 1] == failed + 1
            assert await recorded(db, "alpha") == {"K-1": [1]}
            assert await db.pending_counts() == {}

        asyncio.run(scenario())

    def test_a_retried_event_is_handed_out_once_the_clock_passes_its_backoff(
        self, make_backend: OpenBackend
    ) -> None:
        async def scenario() -> None:
            clock = FakeClock()
            db = make_backend(clock=clock)
            service = Service("watcher", retry=SLOW_RETRY)
            calls = _failing_until_moved(service, clock, ConformanceEvent)
            system = System([service])
            worker = _worker(db, system, clock)
            await system.submit(db, ConformanceEvent(key="K-1", seq=1))

            assert await worker.run_once()
            failed = calls["K-1", 1]
            clock.advance(SLOW_RETRY.delay(1) - 0.5)
            assert not await worker.run_once(), "handed out before its backoff had passed"
            assert calls["K-1", 1] == failed
            clock.advance(1.0)
            assert await worker.run_once()
            assert calls["K-1", 1] == failed + 1
            assert await recorded(db, "watcher") == {"K-1": [1]}
            assert await db.subscription_lag() == {"watcher": 0}

        asyncio.run(scenario())

    def test_an_unsettled_command_is_handed_out_again_once_the_clock_passes_its_lease(
        self, make_backend: OpenBackend
    ) -> None:
        lease = 60.0

        async def scenario() -> None:
            clock = FakeClock()
            db = make_backend(lease_seconds=lease, clock=clock)
            service = queue_service("alpha", ConformanceCommand)
            [spec] = service.consumers()
            system = System([service])
            sent = await system.submit(db, ConformanceCommand(key="K-1", seq=1))

            # member-1 claims it and dies without settling it.
            assert len((await db.claim(spec, "member-1", 10)).deliveries) == 1
            clock.advance(lease - 1.0)
            assert (await db.claim(spec, "member-2", 10)).deliveries == []
            clock.advance(2.0)
            [again] = (await db.claim(spec, "member-2", 10)).deliveries
            assert (again.envelope.message_id, again.attempt) == (sent.message_id, 2)

        asyncio.run(scenario())
