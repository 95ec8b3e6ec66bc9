"""The one clock: what leases, retry due times, backoff and waits read the time from.

Code that schedules (a lease that expires, a retry due after its backoff, a worker that backs
off while its store is down) reads the time through a :class:`Clock` it was given, and waits
with the clock's :meth:`~Clock.sleep`, so that a test can hand it a :class:`FakeClock` and move
time forward by itself: a retry due in thirty seconds is due as soon as the test says thirty
seconds have passed, a worker backing off for five seconds goes on once the test has moved the
clock five seconds, and no test sleeps. The default is :data:`SYSTEM_CLOCK`, the machine's own.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time: wall seconds for what is stored, monotonic seconds for what is not,
    and waits measured in the clock's own seconds."""

    def time(self) -> float:
        """Seconds since the epoch: due times and lease expiries written to a store."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go back: in-process intervals (a membership's last refresh)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` of this clock have passed (a backoff, a pause between
        checks)."""
        ...


class SystemClock:
    """The machine's clock (:func:`time.time`, :func:`time.monotonic`, :func:`asyncio.sleep`)."""

    __slots__ = ()

    def time(self) -> float:
        """The machine's wall clock."""
        return time.time()

    def monotonic(self) -> float:
        """The machine's monotonic clock."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


#: The clock used when none is given.
SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told to: the test kit's, so timeout tests never sleep.

    Both readings move together: :meth:`advance` by some seconds, :meth:`set` to a moment. It never
    goes back, as neither of the clocks it stands for does (a lease read against a clock that
    went back would be held longer than granted).

    :meth:`sleep` does not sleep for real: a task that calls ``await clock.sleep(5)`` waits until
    the clock has been moved five seconds on from when it called, by whoever moves it (a test,
    another task). The woken task runs at the event loop's next turn, so a test that advances the
    clock and wants to see the sleeper's effect lets the loop run (an ``await``). :attr:`sleeping`
    tells how many tasks wait on the clock, and :meth:`next_wake` when the first of them is due.
    """

    __slots__ = ("_monotonic", "_now", "_order", "_sleepers")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._monotonic = 0.0
        # (monotonic deadline, arrival, future): woken in deadline order, then arrival order.
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        """The fake wall clock."""
        return self._now

    def monotonic(self) -> float:
        """Seconds the clock was advanced since it was made."""
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        """Return once the clock has been moved ``seconds`` on from now, without sleeping.

        Not positive: return at the loop's next turn, as :func:`asyncio.sleep` does.
        """
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._monotonic + seconds, next(self._order), woken))
        # A cancelled sleeper's future is cancelled with it; the clock skips it when due.
        await woken

    @property
    def sleeping(self) -> int:
        """How many tasks wait in :meth:`sleep` for the clock to move."""
        return sum(1 for _, _, woken in self._sleepers if not woken.done())

    def next_wake(self) -> float | None:
        """The wall time at which the first task waiting in :meth:`sleep` is due, or None."""
        due = [deadline for deadline, _, woken in self._sleepers if not woken.done()]
        return None if not due else self._now + (min(due) - self._monotonic)

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (not negative), waking the sleepers it makes due;
        returns the new wall time."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} seconds)")
        self._now += seconds
        self._monotonic += seconds
        self._wake()
        return self._now

    def set(self, moment: float) -> float:
        """Move time forward to ``moment`` (seconds since the epoch); returns it."""
        return self.advance(moment - self._now)

    def _wake(self) -> None:
        sleepers = self._sleepers
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        while sleepers and sleepers[0][0] <= self._monotonic:
            _, _, woken = heapq.heappop(sleepers)
            if woken.done():
                continue
            loop = woken.get_loop()
            if loop is running:
                woken.set_result(None)
            else:
                # Moved from another thread (or outside any loop): the sleeper's loop wakes it.
                loop.call_soon_threadsafe(_release, woken)

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"


def _release(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
