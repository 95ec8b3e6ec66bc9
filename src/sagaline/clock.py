"""The one clock: what leases, retry due times and backoff read the time from.

Code that schedules (a lease that expires, a retry due after its backoff) reads the time through a
:class:`Clock` it was given, so that a test can hand it a :class:`FakeClock` and move time
forward by itself: a retry due in thirty seconds is due as soon as the test says thirty seconds
have passed, and no test sleeps. The default is :data:`SYSTEM_CLOCK`, the machine's own.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time: wall seconds for what is stored, monotonic seconds for what is not."""

    def time(self) -> float:
        """Seconds since the epoch: due times and lease expiries written to a store."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go back: in-process intervals (a membership's last refresh)."""
        ...


class SystemClock:
    """The machine's clock (:func:`time.time` and :func:`time.monotonic`)."""

    __slots__ = ()

    def time(self) -> float:
        """The machine's wall clock."""
        return time.time()

    def monotonic(self) -> float:
        """The machine's monotonic clock."""
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


#: The clock used when none is given.
SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told to: the test kit's, so timeout tests never sleep.

    Both readings move together: :meth:`advance` by some seconds, :meth:`set` to a moment. It never
    goes back, as neither of the clocks it stands for does (a lease read against a clock that
    went back would be held longer than granted).
    """

    __slots__ = ("_monotonic", "_now")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._monotonic = 0.0

    def time(self) -> float:
        """The fake wall clock."""
        return self._now

    def monotonic(self) -> float:
        """Seconds the clock was advanced since it was made."""
        return self._monotonic

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (not negative); returns the new wall time."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} seconds)")
        self._now += seconds
        self._monotonic += seconds
        return self._now

    def set(self, moment: float) -> float:
        """Move time forward to ``moment`` (seconds since the epoch); returns it."""
        return self.advance(moment - self._now)

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"
