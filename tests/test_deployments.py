"""The order flow with every service in its own OS process, on each deployable combination.

``sagaline up --store URL --bus URL`` starts the five services as separate processes, each with
its own store (database per service); the test stocks the inventory, submits orders as a client,
waits until every service has caught up, and checks the outcome of each order. Under load, a
service process is killed with SIGKILL; ``up`` restarts it, and afterwards the invariants of
RELIABILITY.md hold over the services' stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aio_pika
import nats
import psutil
import pytest
import servers
from conftest import OrderStore

from sagaline.config import redact_url
from sagaline.deploy import Deployment
from sagaline.orders import SERVICE_NAMES, build_system
from sagaline.orders.checks import check_deployment
from sagaline.orders.demo import DEMO_STOCK, demo_orders, is_deployment_settled
from sagaline.orders.inventory import set_stock
from sagaline.orders.read import ORDER_VIEW
from sagaline.testing import format_violations

COMBINATIONS = ("sqlite+sqlite", "postgresql+postgresql", "postgresql+rabbitmq", "postgresql+nats")


@pytest.fixture(params=COMBINATIONS)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The store URL and bus URL of one combination, on storage of this test's own."""
    combination = request.param
    if combination == "sqlite+sqlite":
        yield f"sqlite:///{tmp_path}/{{service}}.db", f"sqlite:///{tmp_path}/bus.db"
        return
    postgres = servers.postgres_database()
    store = next(postgres)
    try:
        if combination == "postgresql+postgresql":
            yield store, store
        elif combination == "postgresql+rabbitmq":
            vhost = servers.rabbitmq_vhost()
            try:
                yield store, next(vhost)
            finally:
                vhost.close()
        else:
            prefix = servers.nats_prefix()
            try:
                yield store, next(prefix)
            finally:
                prefix.close()
    finally:
        postgres.close()


class Cluster:
    """``sagaline up`` on one combination, and the test's own view of the services' stores."""

    def __init__(self, store: str, bus: str, directory: Path) -> None:
        self.store = store
        self.bus = bus
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "up.log"

    def run(self, work: Callable[[Deployment], Any]) -> Any:
        """Do ``work`` with the deployment opened in this process (then closed)."""

        async def go() -> Any:
            deployment = Deployment(self.store, self.bus, SERVICE_NAMES)
            await deployment.open()
            try:
                result = work(deployment)
                if asyncio.iscoroutine(result):
                    result = await result
                return result
            finally:
                await deployment.close()

        # Bounded: a server that accepts connections but never answers fails the test.
        return asyncio.run(asyncio.wait_for(go(), 180))

    def up(self, *options: str, command: Sequence[str] = ("up",)) -> None:
        """Start ``sagaline up`` (or ``command``) with short leases, so a restarted service
        resumes quickly. The URLs are given in the environment, as a password should be."""
        env = {k: v for k, v in os.environ.items() if k != "SAGALINE_CRASH_AT"}
        env.update(SAGALINE_STORE_URL=self.store, SAGALINE_BUS_URL=self.bus)
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sagaline", *command, "--lease-seconds", "2", *options],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def command_lines(self) -> list[str]:
        """The command lines of this process and of every process it started."""
        assert self.process is not None
        parent = psutil.Process(self.process.pid)
        found = []
        for process in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                found.append(" ".join(process.cmdline()))
        return found

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def services(self) -> dict[str, list[int]]:
        """The pids of the running service processes, by service."""
        assert self.process is not None
        found: dict[str, list[int]] = {}
        for child in psutil.Process(self.process.pid).children():
            try:
                argv = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "serve" in argv:
                found.setdefault(argv[argv.index("serve") + 1], []).append(child.pid)
        return found

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"sagaline up exited while waiting for {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> int:
        assert self.process is not None
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sagaline up did not stop:\n{self.output()}")
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"service processes left running: {alive}"
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
            self.process.kill()
            self.process.wait(30)


@pytest.fixture
def cluster(urls: tuple[str, str], tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(*urls, tmp_path)
    try:
        yield running
    finally:
        running.kill()


def stock(levels: dict[str, int]) -> Callable[[Deployment], Any]:
    async def put(deployment: Deployment) -> None:
        async with deployment.store("inventory").transaction() as tx:
            for product_id, quantity in levels.items():
                await set_stock(tx, product_id, quantity)

    return put


def submit(commands: Sequence[Any]) -> Callable[[Deployment], Any]:
    async def send(deployment: Deployment) -> None:
        await build_system().submit_many(deployment.entry, commands)

    return send


def settled(order_ids: Sequence[str]) -> Callable[[Deployment], Awaitable[bool]]:
    return lambda deployment: is_deployment_settled(deployment, order_ids)


def statuses(order_ids: Sequence[str]) -> Callable[[Deployment], Awaitable[dict[str, Any]]]:
    async def read(deployment: Deployment) -> dict[str, Any]:
        view = deployment.queries("read")
        found = {}
        for order_id in order_ids:
            document = await view.get_document(ORDER_VIEW, order_id)
            found[order_id] = document.data["status"] if document else None
        return found

    return read


def test_the_demo_orders_run_end_to_end_with_each_service_in_its_own_process(
    cluster: Cluster,
) -> None:
    cluster.run(lambda deployment: None)  # creates the schemas before the services start
    cluster.up()
    cluster.wait_for(lambda: set(cluster.services()) == set(SERVICE_NAMES), "five services")
    assert all(len(pids) == 1 for pids in cluster.services().values())
    cluster.run(stock(dict(DEMO_STOCK)))
    orders = demo_orders()
    cluster.run(submit(orders))
    order_ids = [order.correlation_key() for order in orders]
    cluster.wait_for(lambda: cluster.run(settled(order_ids)), "settled orders")
    assert cluster.run(statuses(order_ids)) == {
        "ORD-12345": "CONFIRMED",
        "ORD-12346": "CANCELLED",
        "ORD-12347": "CANCELLED",
    }
    assert cluster.stop() == 0


def with_password(url: str, password: str) -> str:
    """``url`` with a password (the servers here do not check it: PostgreSQL trusts loopback
    connections, NATS has no authorization; RabbitMQ's URL has guest's own)."""
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    user = parts.username or "app"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.mark.parametrize("urls", ["postgresql+rabbitmq", "postgresql+nats"], indirect=True)
def test_up_and_serve_put_no_password_on_a_command_line(cluster: Cluster) -> None:
    """Any user of the machine can read a process's command line (``ps``): `up` and `serve
    --instances` hand the URLs to the processes they start through their environment."""
    cluster.store = with_password(cluster.store, "s3cret")
    cluster.bus = with_password(cluster.bus, "s3cret")
    passwords = {urlsplit(url).password or "" for url in (cluster.store, cluster.bus)}
    described = repr(Deployment(cluster.store, cluster.bus))
    assert "s3cret" not in described and redact_url(cluster.bus) in described
    cluster.run(stock(dict(DEMO_STOCK)))
    cluster.up()
    cluster.wait_for(lambda: set(cluster.services()) == set(SERVICE_NAMES), "five services")
    lines = cluster.command_lines()
    assert len(lines) == 1 + len(SERVICE_NAMES)
    assert [line for line in lines if any(p in line for p in passwords)] == []
    # The services did get the URLs: the orders go through.
    orders = demo_orders()
    cluster.run(submit(orders))
    order_ids = [order.correlation_key() for order in orders]
    cluster.wait_for(lambda: cluster.run(settled(order_ids)), "settled orders")
    assert cluster.stop() == 0

    started = len(cluster.log.read_text(errors="replace"))
    cluster.up("--instances", "2", command=("serve", "read"))
    cluster.wait_for(lambda: len(cluster.services().get("read", [])) == 2, "two read services")
    lines = cluster.command_lines()
    assert len(lines) == 3
    assert [line for line in lines if any(p in line for p in passwords)] == []
    shown = (
        f"sagaline serve: read on {redact_url(cluster.store)} with bus {redact_url(cluster.bus)}"
    )
    cluster.wait_for(
        lambda: cluster.log.read_text(errors="replace")[started:].count(shown) == 2,
        "both instances connected",
    )
    assert cluster.stop() == 0
    logged = cluster.log.read_text(errors="replace")
    assert "s3cret" not in logged
    assert cluster.store not in logged and cluster.bus.partition("?")[0] not in logged


def test_a_service_killed_under_load_is_restarted_and_nothing_is_lost(
    cluster: Cluster,
) -> None:
    orders = OrderStore.mix(1, 300)
    order_ids = [order.correlation_key() for order in orders]
    cluster.run(stock({"PROD-A": 200, "PROD-B": 10}))
    cluster.up("--instances", "2")
    cluster.wait_for(
        lambda: sum(len(p) for p in cluster.services().values()) == 2 * len(SERVICE_NAMES),
        "ten service processes",
    )
    cluster.run(submit(orders))
    # Kill one instance of every service while the orders are in flight; up restarts them.
    victims = {service: pids[0] for service, pids in cluster.services().items()}
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)
    cluster.wait_for(
        lambda: (
            not set(victims.values()) & {p for ps in cluster.services().values() for p in ps}
            and sum(len(p) for p in cluster.services().values()) == 2 * len(SERVICE_NAMES)
        ),
        "restarted services",
    )
    cluster.wait_for(lambda: cluster.run(settled(order_ids)), "settled orders", timeout=240)
    found = cluster.run(statuses(order_ids))
    assert set(found.values()) <= {"CONFIRMED", "CANCELLED"}
    assert cluster.stop() == 0
    # RELIABILITY.md I1-I9 over the services' stores (and the bus, when it is a database).
    violations = cluster.run(
        lambda deployment: check_deployment(deployment, initial_stock={"PROD-A": 200, "PROD-B": 10})
    )
    assert not violations, format_violations(violations)


@pytest.mark.parametrize("urls", ["postgresql+rabbitmq", "postgresql+nats"], indirect=True)
def test_a_restarted_service_resumes_its_predecessors_leases_at_once(cluster: Cluster) -> None:
    """`up` names each process it starts, and the one replacing a killed process takes its name:
    it holds its predecessor's leases at once (here the two-minute lease on the inventory's
    outbox relay) instead of waiting for them to expire."""
    orders = OrderStore.mix(1, 60)
    order_ids = [order.correlation_key() for order in orders]
    cluster.run(stock({"PROD-A": 200, "PROD-B": 10}))
    cluster.up("--lease-seconds", "120")
    cluster.wait_for(lambda: set(cluster.services()) == set(SERVICE_NAMES), "five services")
    # A first order settles: the inventory's relay has taken its lease.
    cluster.run(submit(orders[:1]))
    cluster.wait_for(lambda: cluster.run(settled(order_ids[:1])), "the first order settled")
    [victim] = cluster.services()["inventory"]
    os.kill(victim, signal.SIGKILL)
    cluster.wait_for(
        lambda: cluster.services().get("inventory", [victim]) != [victim], "a new inventory"
    )
    cluster.run(submit(orders[1:]))
    cluster.wait_for(lambda: cluster.run(settled(order_ids)), "settled orders", timeout=60)
    assert cluster.stop() == 0


def sagaline_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def _topology_exists(bus: str) -> bool:
    """Whether the broker holds the order system's command queue or stream under the prefix."""
    parts = urlsplit(bus)
    prefix = parse_qs(parts.query)["prefix"][0]
    if parts.scheme == "nats":
        connection = await nats.connect(urlunsplit(parts._replace(query="")))
        try:
            await connection.jetstream().stream_info(f"{prefix}_commands")
        except nats.js.errors.NotFoundError:
            return False
        finally:
            await connection.close()
        return True
    amqp = await aio_pika.connect(urlunsplit(parts._replace(query="")))
    try:
        channel = await amqp.channel()
        await channel.declare_queue(f"{prefix}.cmd.order.0", passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await amqp.close()
    return True


def test_teardown_deletes_a_brokers_topology_once_confirmed(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    store, bus = urls
    if not bus.startswith(("amqp://", "nats://")):
        refused = sagaline_cli("teardown", "--bus", bus, "--yes", cwd=tmp_path)
        assert refused.returncode == 2
        assert "amqp:// or nats://" in refused.stderr
        return
    migrated = sagaline_cli("migrate", "--store", store, "--bus", bus, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert asyncio.run(_topology_exists(bus))
    declined = subprocess.run(
        [sys.executable, "-m", "sagaline", "teardown", "--bus", bus],
        input="n\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert declined.returncode == 1 and "nothing deleted" in declined.stderr
    assert asyncio.run(_topology_exists(bus))
    deleted = sagaline_cli("teardown", "--bus", bus, "--yes", cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    assert not asyncio.run(_topology_exists(bus))


def test_the_demo_and_the_queries_run_on_each_combination(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    store, bus = urls
    where = ["--store", store, "--bus", bus]
    migrated = sagaline_cli("migrate", *where, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    for _ in range(2):  # the second run replaces the first run's demo data
        demo = sagaline_cli("demo", *where, cwd=tmp_path)
        assert demo.returncode == 0, demo.stderr
        for expected in ("ORD-12345", "CONFIRMED", "Insufficient stock for PROD-A", "declined"):
            assert expected in demo.stdout
        assert "stock ledger balanced" in demo.stdout
    orders = sagaline_cli("orders", "--json", *where, cwd=tmp_path)
    assert orders.returncode == 0, orders.stderr
    found = {row["orderId"]: row["status"] for row in json.loads(orders.stdout)}
    assert found == {"ORD-12345": "CONFIRMED", "ORD-12346": "CANCELLED", "ORD-12347": "CANCELLED"}
    trace = sagaline_cli("trace", "ORD-12345", "--json", *where, cwd=tmp_path)
    assert trace.returncode == 0, trace.stderr
    story = json.loads(trace.stdout)
    assert story["saga"]["status"] == "COMPLETED"
    types = [message["type"] for message in story["messages"]]
    for expected in (
        "CreateOrderCommand",  # the client's, kept by the order service when it came by a broker
        "OrderCreatedEvent",
        "ReserveInventoryCommand",
        "InventoryReservedEvent",
        "ProcessPaymentCommand",
        "PaymentProcessedEvent",
        "OrderConfirmedEvent",
    ):
        assert expected in types
    handled = {
        message["type"]: {entry["consumer"] for entry in message["handledBy"]}
        for message in story["messages"]
    }
    assert handled["CreateOrderCommand"] == {"order"}
    assert handled["ReserveInventoryCommand"] == {"inventory"}
    assert handled["OrderConfirmedEvent"] >= {"order", "inventory", "read"}
    letters = sagaline_cli("dead-letters", "--json", *where, cwd=tmp_path)
    assert letters.returncode == 0 and json.loads(letters.stdout) == []
