"""Durable timers: how many a store sets and cancels per second, and how fast it fires them.

Timers are set and cancelled inside units of work, as a saga's steps do (a batch of handlers
commits together): ``--batch`` timers per transaction. Then the same number are set due at once
and fired by the timer poller (taken and emitted onto the bus in one transaction per batch).

    python benchmarks/timer_throughput.py                                # SQLite, a temporary file
    python benchmarks/timer_throughput.py --store postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import ClassVar

from sagaline import Event, Service, System
from sagaline.backends import open_backend
from sagaline.handling.timers import TimerPoller
from sagaline.messages import Envelope
from sagaline.ports import Backend


class TimerBenchFired(Event, kw_only=True, frozen=True):
    correlation: ClassVar[str] = "key"
    key: str


async def run(url: str, timers: int, batch: int) -> None:
    db = open_backend(url, service=f"timers_{uuid.uuid4().hex[:6]}")
    assert isinstance(db, Backend)
    await db.open()
    system = System([Service("bench")])
    envelopes = [Envelope.wrap(TimerBenchFired(key=f"K-{n % 97}")) for n in range(batch)]
    try:
        started = time.perf_counter()
        for first in range(0, timers, batch):
            ids = [f"t-{first + n}" for n in range(batch)]
            async with db.transaction() as tx:
                await tx.schedule_timers(
                    [(i, e, 3600.0) for i, e in zip(ids, envelopes, strict=True)]
                )
            async with db.transaction() as tx:
                await tx.cancel_timers(ids)
        set_and_cancelled = time.perf_counter() - started
        assert await db.next_timer_due() is None
        for first in range(0, timers, batch):
            async with db.transaction() as tx:
                await tx.schedule_timers(
                    [(f"f-{first + n}", e, 0.0) for n, e in enumerate(envelopes)]
                )
        poller = TimerPoller(db, system, batch_size=batch)
        started = time.perf_counter()
        fired = 0
        while fired < timers:
            fired += await poller.fire_once()
        firing = time.perf_counter() - started
    finally:
        await db.close()
    print(f"store                 {url.split('://')[0]}")
    print(f"timers                {timers:,} in batches of {batch}")
    print(f"set + cancelled/s     {2 * timers / set_and_cancelled:,.0f}")
    print(f"fired/s               {timers / firing:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--store", default=None, help="store URL (default: a temporary SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sagaline-timers-") as tmp:
        url = args.store or f"sqlite:///{Path(tmp) / 'timers.db'}"
        asyncio.run(run(url, args.timers, args.batch))


if __name__ == "__main__":
    main()
