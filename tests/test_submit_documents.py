"""``sagaline submit`` of many commands (a JSON array, JSON Lines), on every kind of bus: a bus URL
equal to the store's, and a broker that no service or ``migrate`` has prepared yet."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
import servers

from sagaline.backends import open_bus
from sagaline.backends.rabbitmq import RabbitBus
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.documents import parse_documents, split_documents
from sagaline.orders import build_system
from sagaline.orders.demo import run_until_settled, stock_demo
from sagaline.orders.read import ORDER_VIEW

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def sagaline(
    *args: str, cwd: Path, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_")}
    environment["COLUMNS"] = "200"
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=environment,
        timeout=120,
        check=False,
    )


def order(order_id: str, quantity: int = 1) -> dict[str, Any]:
    return {
        "commandType": "CreateOrderCommand",
        "orderId": order_id,
        "customerId": "CUST-1",
        "items": [{"productId": "PROD-A", "quantity": quantity}],
        "totalAmount": 10.00,
    }


def json_lines(documents: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(document) + "\n" for document in documents)


def commands_in(url: str) -> list[str]:
    """The correlation ids of the commands on a SQLite store's bus, in order."""
    db = SqliteDatabase(url)
    try:
        return [
            row[0] for row in db.sync.execute("SELECT correlation_id FROM commands ORDER BY id")
        ]
    finally:
        db.connection.close()


# ------------------------------------------------------------------------ formats


def test_the_format_is_told_from_the_input() -> None:
    one = json.dumps(order("ORD-1"), indent=2).encode()
    assert split_documents(one) == [("", one)]
    lines = json_lines([order("ORD-1"), order("ORD-2")]).encode()
    assert [position for position, _ in split_documents(b"\n" + lines + b"\n\n")] == [
        "line 2",
        "line 3",
    ]
    array = json.dumps([order("ORD-1"), order("ORD-2")]).encode()
    parsed = parse_documents(array)
    assert [(d.position, d.message.correlation_key()) for d in parsed] == [
        ("index 0", "ORD-1"),
        ("index 1", "ORD-2"),
    ]


def test_a_json_array_and_json_lines_are_submitted_and_handled(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shop.db"
    array = [order(f"ORD-A{n}") for n in range(3)]
    (tmp_path / "orders.json").write_text(json.dumps(array, indent=2))
    lines = json_lines([order(f"ORD-L{n}") for n in range(4)])
    (tmp_path / "orders.jsonl").write_text(lines.replace("\n", "\n\n", 1))  # a blank line

    from_array = sagaline("submit", "orders.json", "--store", url, cwd=tmp_path)
    assert from_array.returncode == 0, from_array.stderr
    from_lines = sagaline("submit", "-", "--store", url, cwd=tmp_path, stdin=lines)
    assert from_lines.returncode == 0, from_lines.stderr
    ids = from_array.stdout.splitlines() + from_lines.stdout.splitlines()
    assert len(ids) == len(set(ids)) == 7 and all(UUID.match(i) for i in ids)
    assert "submitted 3 commands" in from_array.stderr
    expected = [f"ORD-A{n}" for n in range(3)] + [f"ORD-L{n}" for n in range(4)]
    assert commands_in(url) == expected

    async def handle() -> dict[str, Any]:
        db = SqliteDatabase(url)
        try:
            await stock_demo(db, {"PROD-A": 100})
            await run_until_settled(db, build_system(), len(expected), timeout=60)
            return {row["orderId"]: row["status"] for row in db.sync.query_documents(ORDER_VIEW)}
        finally:
            await db.close()

    assert asyncio.run(handle()) == dict.fromkeys(expected, "CONFIRMED")


def test_many_commands_print_json_or_nothing_on_request(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shop.db"
    lines = json_lines([order("ORD-1"), order("ORD-2")])
    answer = sagaline("submit", "-", "--json", "--store", url, cwd=tmp_path, stdin=lines)
    assert answer.returncode == 0, answer.stderr
    assert [row["correlationId"] for row in json.loads(answer.stdout)] == ["ORD-1", "ORD-2"]
    quiet = sagaline("submit", "-", "--quiet", "--store", url, cwd=tmp_path, stdin=lines)
    assert (quiet.returncode, quiet.stdout) == (0, "")
    assert len(commands_in(url)) == 4


@pytest.mark.parametrize("layout", ["json lines", "array"])
def test_one_bad_message_fails_the_input_naming_where_and_the_field(
    tmp_path: Path, layout: str
) -> None:
    url = f"sqlite:///{tmp_path}/shop.db"
    first = sagaline("submit", "-", "--store", url, cwd=tmp_path, stdin=json.dumps(order("ORD-0")))
    assert first.returncode == 0, first.stderr
    documents = [order(f"ORD-{n}") for n in range(1, 6)]
    documents[2] = order("ORD-3", quantity=0)
    text = json_lines(documents) if layout == "json lines" else json.dumps(documents, indent=1)
    refused = sagaline("submit", "-", "--store", url, cwd=tmp_path, stdin=text)
    assert refused.returncode == 2
    where = "line 3" if layout == "json lines" else "index 2"
    assert f"error: {where}: invalid message, field $.items[0].quantity:" in refused.stderr
    assert refused.stdout == ""
    assert commands_in(url) == ["ORD-0"]  # nothing of the input was written


def test_an_internal_command_among_many_is_refused_with_its_line(tmp_path: Path) -> None:
    lines = json_lines([order("ORD-1")]) + json.dumps(
        {"commandType": "CancelOrderCommand", "orderId": "ORD-1", "reason": "no"}
    )
    refused = sagaline("submit", "-", cwd=tmp_path, stdin=lines)
    assert refused.returncode == 2
    assert "error: line 2: refused: CancelOrderCommand is an internal command" in refused.stderr
    assert not (tmp_path / "sagaline.db").exists()


def test_a_message_id_is_refused_with_many_commands(tmp_path: Path) -> None:
    lines = json_lines([order("ORD-1"), order("ORD-2")])
    refused = sagaline("submit", "-", "--message-id", "web:1", cwd=tmp_path, stdin=lines)
    assert refused.returncode == 2
    assert "--message-id names one message" in refused.stderr and "holds 2" in refused.stderr
    assert not (tmp_path / "sagaline.db").exists()


# --------------------------------------------------------- the store's URL as bus URL


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/shop.db"
        return
    database = servers.postgres_database()
    try:
        yield next(database)
    finally:
        database.close()


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_bus_url_equal_to_the_store_url_is_the_stores_own_bus(
    tmp_path: Path, store_url: str, how: str
) -> None:
    submitted = sagaline(
        "submit",
        "-",
        "--store",
        store_url,
        *(["--bus", store_url] if how == "option" else []),
        cwd=tmp_path,
        stdin=json.dumps(order("ORD-1")),
        env={"SAGALINE_BUS_URL": store_url} if how == "environment" else {},
    )
    assert submitted.returncode == 0, submitted.stderr
    message_id = submitted.stdout.strip()
    assert UUID.match(message_id)
    trace = sagaline("trace", "ORD-1", "--json", "--store", store_url, cwd=tmp_path)
    assert trace.returncode == 0, trace.stderr
    [command] = json.loads(trace.stdout)["messages"]
    assert (command["messageId"], command["queue"]) == (message_id, "order")


# ------------------------------------------------- a broker no one has prepared yet


@pytest.fixture
def fresh_rabbitmq() -> Iterator[str]:
    vhost = servers.rabbitmq_vhost()
    try:
        yield next(vhost)
    finally:
        vhost.close()


async def _queued_commands(bus_url: str) -> int:
    """How many messages wait in the order service's command queues on RabbitMQ."""
    bus = open_bus(bus_url)
    assert isinstance(bus, RabbitBus)
    [spec] = [s for s in build_system().services["order"].consumers() if s.source == "queue"]
    parts = urlsplit(bus_url)
    connection = await aio_pika.connect(urlunsplit(parts._replace(query="")))
    try:
        channel = await connection.channel()
        total = 0
        for name in bus.queue_names(spec):
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
        return total
    finally:
        await connection.close()


def test_submit_to_a_fresh_rabbitmq_declares_the_queues_and_the_command_waits(
    tmp_path: Path, fresh_rabbitmq: str
) -> None:
    lines = json_lines([order("ORD-1"), order("ORD-2")])
    submitted = sagaline("submit", "-", "--bus", fresh_rabbitmq, cwd=tmp_path, stdin=lines)
    assert submitted.returncode == 0, submitted.stderr
    assert len(submitted.stdout.splitlines()) == 2
    assert asyncio.run(_queued_commands(fresh_rabbitmq)) == 2


def test_the_demo_runs_on_postgresql_and_a_fresh_rabbitmq_without_migrate(
    tmp_path: Path, fresh_rabbitmq: str
) -> None:
    database = servers.postgres_database()
    try:
        store = next(database)
        demo = sagaline("demo", "--store", store, "--bus", fresh_rabbitmq, cwd=tmp_path)
        assert demo.returncode == 0, demo.stderr
        for expected in ("ORD-12345", "CONFIRMED", "Insufficient stock for PROD-A", "declined"):
            assert expected in demo.stdout
        assert "stock ledger balanced" in demo.stdout
    finally:
        database.close()
