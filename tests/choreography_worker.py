"""A worker process of the choreographed order flow: its five services on one SQLite store.

The tests start it as they start ``sagaline run`` for the orchestrated flow (same options:
``--store``, ``--lease-seconds``, ``--batch-size``); it runs until SIGTERM or SIGINT, finishing
the batches in hand, and honours ``SAGALINE_CRASH_AT`` like any sagaline process.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from sagaline.backends.sqlite import LEASE_SECONDS, SqliteDatabase
from sagaline.handling import DEFAULT_BATCH, Runtime
from sagaline.orders.choreography import build_choreography_system


async def serve(store: str, lease_seconds: float, batch_size: int) -> None:
    """Run every service of the choreography on ``store`` until a signal."""
    db = SqliteDatabase(store, lease_seconds=lease_seconds)
    runtime = Runtime(db, build_choreography_system(), batch_size=batch_size)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, runtime.stop)
    try:
        await runtime.run()
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--lease-seconds", type=float, default=LEASE_SECONDS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    args = parser.parse_args()
    asyncio.run(serve(args.store, args.lease_seconds, args.batch_size))


if __name__ == "__main__":
    main()
