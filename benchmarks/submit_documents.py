"""How long ``sagaline submit`` takes for many orders from one JSON Lines file: writes N
CreateOrderCommands (default 100,000) to a file, runs the command line on a fresh store and prints
the wall clock and the rate. The figure includes starting Python and validating every line.

    python benchmarks/submit_documents.py --orders 100000
    python benchmarks/submit_documents.py --store postgresql://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_orders(path: Path, count: int) -> int:
    """``count`` CreateOrderCommands as JSON Lines at ``path``; returns the file's size."""
    with path.open("w", encoding="utf-8") as file:
        for n in range(count):
            order = {
                "commandType": "CreateOrderCommand",
                "orderId": f"ORD-{n:07d}",
                "customerId": f"CUST-{n % 997}",
                "items": [
                    {"productId": "PROD-A", "quantity": 1 + n % 3},
                    {"productId": "PROD-B", "quantity": 1},
                ],
                "totalAmount": 75.50,
            }
            # As a client would write it (with spaces), not as sagaline encodes it.
            file.write(json.dumps(order).replace("75.5}", "75.50}") + "\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--store", help="store URL (default: a new SQLite file)")
    parser.add_argument("--bus", help="bus URL (default: the store's database)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        orders = Path(directory) / "orders.jsonl"
        size = write_orders(orders, options.orders)
        store = options.store or f"sqlite:///{directory}/bench.db"
        argv = [sys.executable, "-m", "sagaline", "submit", str(orders), "--store", store, "-q"]
        if options.bus:
            argv += ["--bus", options.bus]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_")}
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"sagaline submit failed ({done.returncode}): {done.stderr}")
    print(f"file        {options.orders:,} orders, {size / 1e6:.1f} MB of JSON Lines")
    print("command     sagaline submit orders.jsonl --store " + (options.store or "sqlite:///x.db"))
    print(f"wall clock  {wall:.2f} s ({options.orders / wall:,.0f} orders/s)")


if __name__ == "__main__":
    main()
