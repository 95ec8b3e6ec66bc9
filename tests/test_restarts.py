"""A database or broker that restarts under load: the services reconnect and nothing is lost.

The five services run as separate processes (``sagaline up``); while orders are in flight the
shared PostgreSQL server (with the PostgreSQL bus, and with the NATS bus), or the RabbitMQ broker,
is restarted. Every order must still end
CONFIRMED or CANCELLED and every saga terminal, with no service process restarted by its
supervisor for it (they reconnect by themselves).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import servers
from conftest import OrderStore
from test_deployments import Cluster, settled, statuses, stock, submit

from sagaline.orders import SERVICE_NAMES


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not _port_open(port):
        if time.monotonic() > deadline:
            pytest.fail(f"nothing listens on port {port} after {timeout}s")
        time.sleep(0.2)


def restart_postgresql() -> None:
    """Restart the PostgreSQL cluster (every connection is dropped)."""
    versions = sorted(Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").exists() else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        servers.unavailable("PostgreSQL restart (pg_ctlcluster)", "not on this machine")
    subprocess.run(
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            versions[-1].name,
            "main",
            "restart",
            "-m",
            "fast",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    _wait_port(5432)


def restart_rabbitmq() -> None:
    """Restart the RabbitMQ broker application: every connection drops, queues recover."""
    servers.rabbitmqctl("stop_app", check=True)
    time.sleep(1.0)  # the broker stays down a moment, as in a real restart
    servers.rabbitmqctl("start_app", timeout=180, check=True)
    servers.rabbitmqctl("await_startup", timeout=180, check=True)
    _wait_port(5672)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from servers.postgres_database()


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    yield from servers.rabbitmq_vhost()


@pytest.fixture
def nats_url() -> Iterator[str]:
    yield from servers.nats_prefix()


def run_through_restart(cluster: Cluster, restart: object) -> None:
    orders = OrderStore.mix(1, 400)
    order_ids = [order.correlation_key() for order in orders]
    cluster.run(stock({"PROD-A": 300, "PROD-B": 10}))
    cluster.up()
    cluster.wait_for(lambda: set(cluster.services()) == set(SERVICE_NAMES), "five services")
    pids = {service: list(p) for service, p in cluster.services().items()}
    cluster.run(submit(orders))
    # Under load: the restart comes once the services are well into the orders.
    cluster.wait_for(lambda: _ended(cluster) >= 40, "sagas under way")
    assert callable(restart)
    restart()
    cluster.wait_for(lambda: _settled(cluster, order_ids), "settled orders", timeout=300)
    assert set(cluster.run(statuses(order_ids)).values()) <= {"CONFIRMED", "CANCELLED"}
    # The services reconnected by themselves: none of them had to be restarted.
    assert cluster.services() == pids, cluster.output()
    assert cluster.stop() == 0


def _ended(cluster: Cluster) -> int:
    async def count(deployment: Any) -> int:
        counts = await deployment.store("orchestrator").saga_counts()
        return int(counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0))

    return int(cluster.run(count))


def _settled(cluster: Cluster, order_ids: list[str]) -> bool:
    try:
        return bool(cluster.run(settled(order_ids)))
    except Exception:
        return False  # the server is still coming back


def test_a_postgresql_restart_under_load_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    cluster = Cluster(postgres_url, postgres_url, tmp_path)
    try:
        run_through_restart(cluster, restart_postgresql)
    finally:
        cluster.kill()


def test_a_postgresql_restart_under_load_loses_nothing_with_the_nats_bus(
    postgres_url: str, nats_url: str, tmp_path: Path
) -> None:
    """The services' stores go away mid-batch: a batch whose transaction failed is handed out
    again by the bus (its deliveries are kept alive, so the server would not)."""
    cluster = Cluster(postgres_url, nats_url, tmp_path)
    try:
        run_through_restart(cluster, restart_postgresql)
    finally:
        cluster.kill()


def test_a_rabbitmq_restart_under_load_loses_nothing(
    postgres_url: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    cluster = Cluster(postgres_url, rabbitmq_url, tmp_path)
    try:
        run_through_restart(cluster, restart_rabbitmq)
    finally:
        cluster.kill()
