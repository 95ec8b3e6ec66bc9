"""The real servers the tests use, each test run isolated on them, and cleaned up afterwards.

PostgreSQL: a database of its own per test (``CREATE DATABASE``, dropped at the end). RabbitMQ: a
virtual host of its own per test. NATS: a subject and stream prefix of its own per test, its
streams deleted at the end. When a server is unreachable the test is skipped, unless
``SAGALINE_REQUIRE_SERVICES=1`` (as in CI): then it fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

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


def postgres_database() -> Iterator[str]:
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


def rabbitmq_vhost() -> Iterator[str]:
    """A fresh RabbitMQ virtual host's URL; the virtual host is deleted afterwards."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        unavailable("RabbitMQ (rabbitmqctl)", "not installed")
    name = unique("sagaline-t-")
    created = subprocess.run(
        [rabbitmqctl, "add_vhost", name], capture_output=True, text=True, timeout=60
    )
    if created.returncode != 0:
        unavailable("RabbitMQ", created.stderr.strip() or created.stdout.strip())
    try:
        subprocess.run(
            [rabbitmqctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"amqp://{RABBITMQ_HOST}/{name}"
    finally:
        subprocess.run(
            [rabbitmqctl, "delete_vhost", name], capture_output=True, timeout=60, check=False
        )


def nats_prefix() -> Iterator[str]:
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
