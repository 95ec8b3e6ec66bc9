"""The real servers the tests use, each test run isolated on them, and cleaned up afterwards.

PostgreSQL: a database of its own per test (``CREATE DATABASE``, dropped at the end). RabbitMQ: a
virtual host of its own per run (deleted at the end), a topology prefix of its own per test.
NATS: a subject and stream prefix of its own per test, its streams deleted at the end. When a
server is unreachable the test is skipped, unless ``SAGALINE_REQUIRE_SERVICES=1`` (as in CI): then
it fails.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from sagaline.ports import ConsumerSpec

POSTGRES_ADMIN_URL = os.environ.get(
    "SAGALINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432"
)
RABBITMQ_HOST = os.environ.get("SAGALINE_TEST_RABBITMQ", "guest:guest@127.0.0.1:5672")
NATS_URL = os.environ.get("SAGALINE_TEST_NATS", "nats://127.0.0.1:4222")


def unavailable(what: str, error: object) -> NoReturn:
    """Skip (or, with SAGALINE_REQUIRE_SERVICES=1, fail) a test whose server is missing."""
    message = f"{what} is not reachable: {error}"
    if os.environ.get("SAGALINE_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def unique(prefix: str) -> str:
    """A name no other test run uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def postgres_database() -> Generator[str, None, None]:
    """A fresh PostgreSQL database's URL; the database is dropped afterwards."""
    import psycopg

    name = unique("sagaline_t_")
    try:
        admin = psycopg.connect(
            f"{POSTGRES_ADMIN_URL}/postgres", autocommit=True, connect_timeout=5
        )
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", exc)
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    try:
        yield f"{POSTGRES_ADMIN_URL}/{name}"
    finally:
        # A new connection: the server may have restarted meanwhile.
        with psycopg.connect(
            f"{POSTGRES_ADMIN_URL}/postgres", autocommit=True, connect_timeout=30
        ) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rabbitmqctl(*args: str, timeout: float = 120, check: bool = False) -> str:
    """Run rabbitmqctl and return what it printed. It runs in a process group of its own, killed
    whole if it does not finish: its Erlang child would otherwise outlive it and keep the command
    line tool's node name registered, and later calls would fail to start."""
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        unavailable("RabbitMQ (rabbitmqctl)", "not installed")
    process = subprocess.Popen(
        [executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        problem = f"did not finish within {timeout}s"
    else:
        if process.returncode == 0:
            return out
        problem = f"failed: {(err or out).strip()}"
    message = f"rabbitmqctl {' '.join(args)} {problem}"
    if check:
        pytest.fail(message)
    raise RuntimeError(message)


_SESSION_VHOST: list[str] = []
_VHOST_PREFIX = "sagaline-t-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_vhosts() -> None:
    """Delete the virtual hosts of earlier test runs on this machine that are gone (killed before
    they could clean up): their names carry the run's process id."""
    for line in rabbitmqctl("list_vhosts", "-q", "--no-table-headers").splitlines():
        name = line.strip()
        if not name.startswith(_VHOST_PREFIX):
            continue
        pid = name[len(_VHOST_PREFIX) :].partition("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            rabbitmqctl("delete_vhost", name, timeout=300)


def _delete_vhost(name: str) -> None:
    with contextlib.suppress(RuntimeError):  # else the next run's sweep deletes it
        rabbitmqctl("delete_vhost", name, timeout=300)


def session_vhost() -> str:
    """The test run's own RabbitMQ virtual host, made on first use, deleted when the run ends.

    One per run rather than one per test: each test has a topology prefix of its own inside it,
    and the broker's command line tool is called a handful of times per run, not per test."""
    if _SESSION_VHOST:
        return _SESSION_VHOST[0]
    name = unique(f"{_VHOST_PREFIX}{os.getpid()}-")
    try:
        _sweep_vhosts()
        rabbitmqctl("add_vhost", name)
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except RuntimeError as exc:
        unavailable("RabbitMQ", exc)
    _SESSION_VHOST.append(name)
    atexit.register(_delete_vhost, name)
    return name


def rabbitmq_vhost() -> Generator[str, None, None]:
    """A RabbitMQ URL of this test's own: the run's virtual host and a topology prefix no other
    test uses. The order system's queues under the prefix are deleted after the test (a test of
    other consumers deletes its own), and the virtual host when the run ends.

    Deleting as we go matters: every quorum queue and stream holds file handles in the broker,
    and a broker out of them stops accepting connections."""
    url = f"amqp://{RABBITMQ_HOST}/{session_vhost()}?prefix={unique('t')}"
    try:
        yield url
    finally:
        from sagaline.orders import build_system

        system = build_system()
        consumers = [spec for service in system.services.values() for spec in service.consumers()]
        # Should the broker be unreachable now, the run's virtual host still goes at the end.
        with contextlib.suppress(Exception):
            asyncio.run(delete_rabbitmq_topology(url, consumers))


async def delete_rabbitmq_topology(url: str, consumers: Sequence[ConsumerSpec]) -> None:
    """Delete the queues of ``consumers``, the stream and the exchanges under the URL's prefix."""
    from sagaline.backends import open_bus
    from sagaline.backends.rabbitmq import RabbitBus

    bus = open_bus(url)
    assert isinstance(bus, RabbitBus)
    try:
        await bus.delete_topology(consumers)
    finally:
        await bus.close()


def nats_prefix() -> Generator[str, None, None]:
    """A NATS URL with a prefix of its own; the prefix's streams are deleted afterwards."""
    import nats

    prefix = unique("t")

    async def probe() -> None:
        connection = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0)
        await connection.close()

    async def clean() -> None:
        connection = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0)
        try:
            js = connection.jetstream()
            for info in await js.streams_info():
                if info.config.name and info.config.name.startswith(prefix):
                    await js.delete_stream(info.config.name)
            try:
                for bucket in ("KV_" + prefix,):
                    await js.delete_stream(bucket)
            except Exception:
                pass
        finally:
            await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        unavailable("NATS", exc)
    try:
        yield f"{NATS_URL}?prefix={prefix}"
    finally:
        asyncio.run(clean())
