"""Saga throughput on the embedded default: N order sagas submitted at once, all services in one
process on one SQLite file (WAL, synchronous=FULL).

Prints completed sagas/s, p50/p99 submit-to-terminal latency, peak RSS and messages/s.

    python benchmarks/saga_throughput.py                 # 10,000 sagas
    python benchmarks/saga_throughput.py --sagas 100000  # the memory target
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import DEFAULT_BATCH, Runtime
from sagaline.orders import PaymentRules, build_system
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem


def _orders(count: int) -> list[CreateOrderCommand]:
    orders = []
    for n in range(count):
        product, amount = "PROD-A", Decimal("75.50")
        if n % 20 == 7:  # 5%: not enough stock
            product = "PROD-X"
        elif n % 20 == 13:  # 5%: payment declined
            amount = Decimal("5000.00")
        orders.append(
            CreateOrderCommand(
                order_id=f"ORD-{n:07d}",
                customer_id=f"CUST-{n % 1000:04d}",
                items=[OrderItem(product_id=product, quantity=1)],
                total_amount=amount,
            )
        )
    return orders


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def run(sagas: int, batch_size: int, path: str) -> None:
    db = SqliteDatabase(f"sqlite:///{path}")
    system = build_system(PaymentRules(default_limit=Decimal("1000.00")))
    async with db.transaction() as tx:
        await set_stock(tx, "PROD-A", sagas * 2)
        await set_stock(tx, "PROD-X", 0)
    orders = _orders(sagas)
    started = time.perf_counter()
    for start in range(0, sagas, 5000):
        await system.submit_many(db, orders[start : start + 5000])
    del orders
    submitted = time.perf_counter()
    cpu_before = time.process_time()
    runtime = Runtime(db, system, batch_size=batch_size)

    def terminal() -> int:
        counts = db.saga_counts()
        return counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)

    def drained() -> bool:
        return terminal() >= sagas and db.is_idle(system.subscribers)

    sagas_done_at: list[float] = []

    def done() -> bool:
        if not sagas_done_at and terminal() >= sagas:
            sagas_done_at.append(time.perf_counter())
        return bool(sagas_done_at) and drained()

    await runtime.run_until(done, check_every=0.1, timeout=3600)
    finished = time.perf_counter()
    cpu = time.process_time() - cpu_before
    handled = runtime.handled
    latencies = [
        _seconds(updated) - _seconds(ts)
        for updated, ts in db.execute(
            "SELECT s.updated_at, c.timestamp FROM sagas s JOIN commands c"
            " ON c.correlation_id = substr(s.saga_id, 7) AND c.type = 'CreateOrderCommand'"
        )
    ]
    counts = db.saga_counts()
    run_seconds = sagas_done_at[0] - submitted
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    print(f"sagas                 {sagas:,} ({counts})")
    print(f"submit                {submitted - started:.2f} s")
    print(f"all sagas terminal    {run_seconds:.2f} s")
    print(f"completed sagas/s     {sagas / run_seconds:,.0f}")
    print(
        f"latency p50 / p99     {quantiles[49]:.2f} s / {quantiles[98]:.2f} s (submit to terminal)"
    )
    print(f"messages handled      {handled:,} in {finished - submitted:.2f} s")
    print(f"messages/s            {handled / (finished - submitted):,.0f}")
    print(f"CPU per saga          {cpu / sagas * 1e6:,.0f} us ({cpu:.2f} s of CPU in the run)")
    print(f"peak RSS              {rss_mb:,.0f} MB")
    await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--path", default=None, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sagaline-bench-") as tmp:
        path = args.path or str(Path(tmp) / "bench.db")
        asyncio.run(run(args.sagas, args.batch_size, path))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
