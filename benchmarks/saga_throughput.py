"""Saga throughput: N order sagas submitted at once (90% succeed, 10% compensate).

By default all services run in one process on one SQLite file (WAL, synchronous=FULL). With
``--store``/``--bus`` each service has its own store and the bus is the one named; with
``--instances N`` every service runs as N separate processes (``sagaline up``). With
``--choreography`` the order flow runs as a choreography (services react to each other's events,
a passive monitor keeps the saga records) instead of under the orchestrator. Prints completed
sagas/s, p50/p99 submit-to-terminal latency, peak RSS, messages/s and, for a deployment, the raw
durable message rate of the same transport measured in the same run and the ratio to it.

    python benchmarks/saga_throughput.py                 # 10,000 sagas, embedded
    python benchmarks/saga_throughput.py --sagas 100000  # the memory target
    python benchmarks/saga_throughput.py --choreography  # the same orders, choreographed
    python benchmarks/saga_throughput.py --store postgresql://postgres@127.0.0.1/bench \
        --bus postgresql://postgres@127.0.0.1/bench --instances 1
    python benchmarks/saga_throughput.py --store postgresql://postgres@127.0.0.1/bench \
        --bus amqp://guest:guest@127.0.0.1/ --instances 1
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.deploy import Deployment, open_bus
from sagaline.handling import DEFAULT_BATCH, Runtime, System
from sagaline.orders import SERVICE_NAMES, PaymentRules, build_system
from sagaline.orders.choreography import build_choreography_system
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.ports import ConsumerSpec


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


def _system(choreography: bool, step_timeout: float | None = None) -> System:
    """The order flow, orchestrated or choreographed, with the default payment limit (and a
    timeout on every step of the orchestrated saga when ``step_timeout`` is given)."""
    rules = PaymentRules(default_limit=Decimal("1000.00"))
    if choreography:
        return build_choreography_system(rules)
    return build_system(rules, step_timeout=step_timeout)


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def run(
    sagas: int,
    batch_size: int,
    path: str,
    choreography: bool = False,
    step_timeout: float | None = None,
) -> None:
    db = SqliteDatabase(f"sqlite:///{path}")
    system = _system(choreography, step_timeout)
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
        counts = db.sync.saga_counts()
        return counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)

    def drained() -> bool:
        return terminal() >= sagas and db.sync.is_idle(system.subscribers)

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
        for updated, ts in db.sync.execute(
            "SELECT s.updated_at, c.timestamp FROM sagas s JOIN commands c"
            " ON c.correlation_id = substr(s.saga_id, 7) AND c.type = 'CreateOrderCommand'"
        )
    ]
    counts = db.sync.saga_counts()
    run_seconds = sagas_done_at[0] - submitted
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    print(f"flow                  {_flow(choreography)}")
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


#: The consumer of the raw transport measurement.
RAW_CONSUMER = ConsumerSpec("rawbench", "queue", frozenset({"ProcessPaymentCommand"}))


async def raw_rate(bus_url: str, count: int, batch: int = 500, **options: Any) -> float:
    """Durable messages/s of the bare transport: publish and consume ``count`` at once.

    The same durability as the saga run: confirmed publishes, acknowledgements that are durable
    (committed, or acked to the broker), the batch sizes the workers use. ``options`` go to the
    bus (``bundle=1`` for RabbitMQ: one AMQP message per message, the transport's own rate).
    """
    from sagaline.messages import Envelope
    from sagaline.orders.messages import ProcessPaymentCommand
    from sagaline.ports import Outcome

    bus = open_bus(bus_url, **options)
    await bus.open()
    spec = RAW_CONSUMER
    routes = {"ProcessPaymentCommand": "rawbench"}
    await bus.prepare([spec], routes)
    envelopes = [
        Envelope.wrap(
            ProcessPaymentCommand(
                order_id=f"RAW-{n}", customer_id="CUST-1", amount=Decimal("75.50")
            ),
            source="bench",
        )
        for n in range(count)
    ]
    received = 0
    started = time.perf_counter()

    async def produce() -> None:
        for start in range(0, count, batch):
            await bus.publish(envelopes[start : start + batch], routes)

    async def consume() -> None:
        nonlocal received
        while received < count:
            claimed = await bus.claim(spec, "raw", batch)
            if not claimed.deliveries:
                await bus.wait_for_work(spec, 0.05)
                continue
            await bus.complete(claimed, [(Outcome.ACK, None)] * len(claimed.deliveries))
            received += len(claimed.deliveries)

    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - started
    await bus.leave(spec, "raw")
    await bus.close()
    return count / elapsed


def _flow(choreography: bool) -> str:
    return "choreography (monitor)" if choreography else "orchestrated"


async def _settled_check(
    deployment: Deployment, sagas: int, system: System, patience: float = 60.0
) -> list[Any]:
    """The invariants over every store once the read side caught up (the services still run)."""
    from sagaline.orders.checks import check_deployment

    stock = {"PROD-A": sagas * 2, "PROD-X": 0}
    deadline = time.perf_counter() + patience
    while True:
        violations = await check_deployment(deployment, initial_stock=stock, system=system)
        if not violations or time.perf_counter() > deadline:
            return violations
        await asyncio.sleep(1.0)


async def run_deployment(
    sagas: int,
    batch_size: int,
    store: str,
    bus: str | None,
    instances: int,
    raw: int,
    check: bool = False,
    choreography: bool = False,
    step_timeout: float | None = None,
) -> None:
    """N sagas through a deployment: services in this process, or ``instances`` processes each."""
    system = _system(choreography, step_timeout)
    deployment = Deployment(store, bus, SERVICE_NAMES)
    await deployment.open()
    async with deployment.store("inventory").transaction() as tx:
        await set_stock(tx, "PROD-A", sagas * 2)
        await set_stock(tx, "PROD-X", 0)
    if deployment.bus is not None:
        consumers = [spec for svc in system.services.values() for spec in svc.consumers()]
        await deployment.bus.prepare(consumers, system.routes)
    orchestrator = deployment.queries("orchestrator")
    supervisor = None
    runner = None
    runtimes = []
    if instances:
        argv = [sys.executable, "-m", "sagaline"]
        if choreography:
            argv += ["--app", "sagaline.orders.choreography:app"]
        argv += ["up", "--store", store, "--instances", str(instances)]
        argv += ["--batch-size", str(batch_size)]
        if bus is not None:
            argv += ["--bus", bus]
        if step_timeout is not None:
            argv += ["--set", f"step_timeout={step_timeout}"]
        supervisor = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    orders = _orders(sagas)
    started = time.perf_counter()
    submitted_at: dict[str, float] = {}
    for start in range(0, sagas, 5000):
        for envelope in await system.submit_many(deployment.entry, orders[start : start + 5000]):
            submitted_at[envelope.correlation_id] = _seconds(envelope.timestamp)
    del orders
    submitted = time.perf_counter()
    cpu_before = time.process_time()
    if not instances:
        runtimes = deployment.runtimes(system, batch_size=batch_size)
        runner = asyncio.gather(*(runtime.run() for runtime in runtimes))

    async def terminal() -> int:
        counts = await orchestrator.saga_counts()
        return int(counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0))

    while await terminal() < sagas:
        await asyncio.sleep(0.1)
    finished = time.perf_counter()
    cpu = time.process_time() - cpu_before
    violations = await _settled_check(deployment, sagas, system) if check else None
    for runtime in runtimes:
        runtime.stop()
    if runner is not None:
        await runner
    if supervisor is not None:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(120)
    handled = sum(runtime.handled for runtime in runtimes)
    latencies = [
        _seconds(record.updated_at) - submitted_at[record.saga_id.split(":", 1)[1]]
        for record in await orchestrator.list_sagas()
    ]
    run_seconds = finished - submitted
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    rate = sagas / run_seconds
    print(f"store / bus           {store} / {bus or '(the store)'}")
    print(f"services              {f'{instances} process(es) each' if instances else 'in-process'}")
    print(f"flow                  {_flow(choreography)}")
    print(f"sagas                 {sagas:,} ({await orchestrator.saga_counts()})")
    print(f"submit                {submitted - started:.2f} s")
    print(f"all sagas terminal    {run_seconds:.2f} s")
    print(f"completed sagas/s     {rate:,.0f}")
    print(
        f"latency p50 / p99     {quantiles[49]:.2f} s / {quantiles[98]:.2f} s (submit to terminal)"
    )
    if violations is not None:
        shown = "hold" if not violations else f"{len(violations)} violations: {violations[:5]}"
        print(f"invariants I1-I9      {shown}")
    if runtimes:
        print(f"messages handled      {handled:,} ({handled / sagas:.1f} per saga)")
        print(f"CPU per saga          {cpu / sagas * 1e6:,.0f} us (this process)")
        print(f"peak RSS              {rss_mb:,.0f} MB (this process)")
    await deployment.close()
    if raw:
        transport = bus or store
        rabbitmq = urlsplit(transport).scheme in ("amqp", "amqps")
        # RabbitMQ's own rate is one AMQP message per message: bundling is sagaline's doing.
        options: dict[str, Any] = {"bundle": 1} if rabbitmq else {}
        raw_rate_value = await raw_rate(transport, raw, batch_size, **options)
        per_saga = CHOREOGRAPHY_MESSAGES_PER_SAGA if choreography else MESSAGES_PER_SAGA
        print(f"raw transport rate    {raw_rate_value:,.0f} durable msgs/s publish+consume")
        print(
            f"ratio                 {rate * per_saga / raw_rate_value:.0%}"
            f" (sagas/s x {per_saga} messages per saga / raw msgs/s)"
        )
        if rabbitmq:
            bundled_rate = await raw_rate(transport, raw, batch_size)
            print(
                f"raw rate, bundled     {bundled_rate:,.0f} durable msgs/s publish+consume"
                f" (sagas/s x {per_saga} / it: {rate * per_saga / bundled_rate:.0%})"
            )


#: Messages put on the bus per saga of the benchmark's mix (commands and events as published,
#: not deliveries): CreateOrder, OrderCreated, ReserveInventory, InventoryReserved,
#: ProcessPayment, PaymentProcessed, OrderConfirmed, OrderConfirmationRecorded on the happy path.
MESSAGES_PER_SAGA = 8
#: The same for the choreography: CreateOrder, OrderCreated, InventoryReserved, PaymentProcessed,
#: OrderConfirmed, OrderConfirmationRecorded (no saga command is sent).
CHOREOGRAPHY_MESSAGES_PER_SAGA = 6


def _own_prefix(bus: str | None) -> str | None:
    """A broker URL with a topology prefix of this run's own, unless one was given."""
    if bus is None or urlsplit(bus).scheme not in ("amqp", "amqps", "nats") or "prefix=" in bus:
        return bus
    return f"{bus}{'&' if '?' in bus else '?'}prefix=bench{uuid.uuid4().hex[:8]}"


async def _delete_topology(bus_url: str) -> None:
    """Delete the queues and streams the run made under its own prefix."""
    consumers = [
        spec
        for system in (build_system(), build_choreography_system())
        for svc in system.services.values()
        for spec in svc.consumers()
    ]
    consumers.append(RAW_CONSUMER)
    bus = open_bus(bus_url)
    await bus.delete_topology(consumers)  # type: ignore[attr-defined]
    await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--path", default=None, help="SQLite file (default: a temporary one)")
    parser.add_argument("--store", default=None, help="store URL (a deployment per service)")
    parser.add_argument("--bus", default=None, help="bus URL when not the store's database")
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="run each service as this many processes (sagaline up); 0: all in this process",
    )
    parser.add_argument(
        "--raw", type=int, default=20_000, help="messages for the raw transport rate (0: skip)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="after the run, check the invariants of RELIABILITY.md over every store",
    )
    parser.add_argument(
        "--choreography",
        action="store_true",
        help="run the order flow as a choreography (services react to each other's events)",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=None,
        help="give every step of the order saga this timeout in seconds (a timer set and"
        " cancelled per step)",
    )
    args = parser.parse_args()
    if args.choreography and args.step_timeout is not None:
        parser.error("--step-timeout applies to the orchestrated saga: drop --choreography")
    with tempfile.TemporaryDirectory(prefix="sagaline-bench-") as tmp:
        if args.store is None and args.bus is None and not args.instances:
            path = args.path or str(Path(tmp) / "bench.db")
            asyncio.run(
                run(args.sagas, args.batch_size, path, args.choreography, args.step_timeout)
            )
        else:
            store = args.store or f"sqlite:///{tmp}/{{service}}.db"
            bus = _own_prefix(args.bus)
            if bus is None and "{service}" in store:
                bus = f"sqlite:///{tmp}/bus.db"
            try:
                asyncio.run(
                    run_deployment(
                        args.sagas,
                        args.batch_size,
                        store,
                        bus,
                        args.instances,
                        args.raw,
                        args.check,
                        args.choreography,
                        args.step_timeout,
                    )
                )
            finally:
                if bus is not None and bus != args.bus:
                    asyncio.run(_delete_topology(bus))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
