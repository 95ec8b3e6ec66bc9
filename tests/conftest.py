"""Shared fixtures: worker processes of the order flow and a store to drive and watch them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import System
from sagaline.orders import build_system
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem

#: How often the tests look at the store while they wait for a condition.
POLL_SECONDS = 0.02


class ServiceProcesses:
    """Starts worker processes (the ``sagaline run`` CLI), and kills what is left at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(
        self,
        store: Path,
        *,
        crash_at: str | None = None,
        lease_seconds: float | None = None,
        options: Sequence[str] = (),
        program: Sequence[str] = ("-m", "sagaline", "run"),
    ) -> subprocess.Popen[bytes]:
        """Start ``sagaline run`` on ``store``: all five services until SIGTERM.

        ``crash_at`` (``point:N``) makes it SIGKILL itself there. ``lease_seconds`` shortens its
        leases, so that a process started after it was killed need not wait long for them.
        ``options`` are more options of ``sagaline run``. ``program`` (the interpreter's
        arguments) starts another worker that takes the same options instead.
        """
        env = {k: v for k, v in os.environ.items() if k != "SAGALINE_CRASH_AT"}
        if crash_at is not None:
            env["SAGALINE_CRASH_AT"] = crash_at
        if lease_seconds is not None:
            options = ["--lease-seconds", str(lease_seconds), *options]
        log = self.directory / f"worker-{len(self.started)}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    sys.executable,
                    *program,
                    "--store",
                    f"sqlite:///{store}",
                    *options,
                ],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.logs[process.pid] = log
        self.started.append(process)
        return process

    def output(self, process: subprocess.Popen[bytes]) -> str:
        """What the worker wrote to stdout and stderr."""
        return self.logs[process.pid].read_text(errors="replace")[-4000:]

    def wait_exit(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        """The worker's return code once it has exited; fails the test after ``timeout``."""
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"worker {process.pid} still running after {timeout}s:\n{self.output(process)}"
            )

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
        """SIGTERM the worker and wait for it to finish its batch and exit."""
        process.send_signal(signal.SIGTERM)
        return self.wait_exit(process, timeout)

    def wait_for(
        self,
        condition: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        alive: Sequence[subprocess.Popen[bytes]] = (),
    ) -> None:
        """Poll ``condition`` until it holds; fail if it does not within ``timeout`` seconds.

        Every process in ``alive`` must keep running meanwhile.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            for process in alive:
                if process.poll() is not None:
                    pytest.fail(
                        f"worker {process.pid} exited ({process.returncode}) while waiting"
                        f" for {what}:\n{self.output(process)}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout}s")
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        """Kill every worker this fixture started that is still running."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


class OrderStore:
    """The test's own connection to the store the workers share: stock, submit, watch."""

    def __init__(self, path: Path, system: System | None = None) -> None:
        self.path = path
        self.db = SqliteDatabase(f"sqlite:///{path}")
        self.system: System = system or build_system()
        self.subscribers = {
            name for name, service in self.system.services.items() if service.event_handlers
        }

    def stock(self, levels: dict[str, int]) -> None:
        """Put ``levels`` units of each product on the shelf."""

        async def put() -> None:
            async with self.db.transaction() as tx:
                for product_id, quantity in levels.items():
                    await set_stock(tx, product_id, quantity)

        asyncio.run(put())

    def submit(self, commands: Sequence[CreateOrderCommand]) -> None:
        """Submit orders in one transaction, as a client does."""
        asyncio.run(self.system.submit_many(self.db, commands))

    @staticmethod
    def mix(first: int, count: int) -> list[CreateOrderCommand]:
        """Orders ``ORD-<first>`` onwards, of a fixed mix that takes every path of the saga.

        One in ten asks for 2 of the scarce PROD-B and one in ten for PROD-A and PROD-B: they
        fail for stock once PROD-B runs out. One in ten costs more than the payment limit of
        1000.00 and fails at payment. The others buy PROD-A and go through while it lasts.
        """
        orders = []
        for n in range(first, first + count):
            items = [OrderItem(product_id="PROD-A", quantity=1 + n % 2)]
            amount = Decimal(f"{10 + n % 90}.{n % 100:02d}")
            if n % 10 == 3:
                items = [OrderItem(product_id="PROD-B", quantity=2)]
            elif n % 10 == 5:
                items = [
                    OrderItem(product_id="PROD-A", quantity=1),
                    OrderItem(product_id="PROD-B", quantity=1),
                ]
            elif n % 10 == 7:
                amount = Decimal("1500.00")
            orders.append(
                CreateOrderCommand(
                    order_id=f"ORD-{n:05d}",
                    customer_id=f"CUST-{n % 13:03d}",
                    items=items,
                    total_amount=amount,
                )
            )
        return orders

    def settled(self, sagas: int) -> bool:
        """Whether ``sagas`` sagas exist, all ended, and every queue and subscription is drained.

        Read in one snapshot, so that a worker's commit cannot fall between the counts.
        """
        conn = self.db.connection
        conn.execute("BEGIN")
        try:
            counts = self.db.sync.saga_counts()
            pending = self.db.sync.pending_counts()
            lag = self.db.sync.subscription_lag()
        finally:
            conn.execute("COMMIT")
        ended = counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)
        return (
            ended == sagas == sum(counts.values())
            and not pending
            and self.subscribers <= set(lag)
            and not any(lag.values())
        )

    def ended_sagas(self) -> int:
        """How many sagas have completed or compensated."""
        counts = self.db.sync.saga_counts()
        return counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)

    def close(self) -> None:
        """Close the test's connection."""
        asyncio.run(self.db.close())


@pytest.fixture
def service_processes(tmp_path: Path) -> Iterator[ServiceProcesses]:
    """Start order-flow worker processes; any still running at the end are killed."""
    processes = ServiceProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def order_store(tmp_path: Path) -> Iterator[OrderStore]:
    """A fresh SQLite store file for the order flow, with the test's connection to it."""
    store = OrderStore(tmp_path / "orders.db")
    try:
        yield store
    finally:
        store.close()
