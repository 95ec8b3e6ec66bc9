"""Run the five services of the order flow in one process until SIGTERM or SIGINT.

The crash and concurrency tests start this as a real OS process: it does what ``sagaline run``
does, and takes a lease length short enough that the leases of a killed process expire within a
test (the default is 30 seconds). ``SAGALINE_CRASH_AT`` arms the crash points as usual.

    python tests/_run_services.py --store sqlite:///orders.db [--lease-seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from sagaline.backends.sqlite import LEASE_SECONDS, SqliteDatabase
from sagaline.handling import Runtime
from sagaline.orders import build_system


async def serve(url: str, lease_seconds: float) -> None:
    """Run every service against the store at ``url`` until a stop signal arrives."""
    db = SqliteDatabase(url, lease_seconds=lease_seconds)
    runtime = Runtime(db, build_system())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.stop)
    try:
        await runtime.run()
    finally:
        await db.close()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="sqlite:///path/to/file.db")
    parser.add_argument("--lease-seconds", type=float, default=LEASE_SECONDS)
    args = parser.parse_args()
    asyncio.run(serve(args.store, args.lease_seconds))


if __name__ == "__main__":
    main()
