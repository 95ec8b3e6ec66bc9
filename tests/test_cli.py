"""The ``sagaline`` command line, driven as users drive it: real processes, real SQLite files."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.config import redact
from sagaline.messages import Message
from sagaline.observability import causal_order, redact_url, strip_control, to_json
from sagaline.orders import build_system
from sagaline.orders import messages as order_messages
from sagaline.orders.demo import (
    DEMO_ORDER_IDS,
    DEMO_STOCK,
    SEED_ORDER_JSON,
    open_demo_store,
    run_demo,
    stock_demo,
)
from sagaline.orders.demo import is_settled as demo_is_settled
from sagaline.orders.inventory import STOCK, stock_violations
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.orders.read import ORDER_VIEW

SEED_TEXT = (Path(__file__).parent / "data" / "seed.txt").read_text(encoding="utf-8")
PROCESS_TIMEOUT = 30.0
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DECLINE = "Payment declined: 2500.00 exceeds the limit of 1000.00 for CUST-555"


def _environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_")}
    # A wide console keeps rich from folding long reasons across lines.
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


def sagaline(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sagaline ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_environment(),
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def sagaline_all(
    calls: Sequence[tuple[Sequence[str], Path, str | None]],
    env: Mapping[str, str] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``python -m sagaline`` invocations at once: (args, cwd, stdin) each, with
    ``env`` added to the environment."""
    started = [
        (
            subprocess.Popen(
                [sys.executable, "-m", "sagaline", *args],
                cwd=cwd,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                env=_environment(env),
            ),
            args,
            stdin,
        )
        for args, cwd, stdin in calls
    ]
    results = []
    for process, args, stdin in started:
        stdout, stderr = process.communicate(stdin, timeout=PROCESS_TIMEOUT)
        results.append(subprocess.CompletedProcess(list(args), process.returncode, stdout, stderr))
    return results


def start_sagaline(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """Start ``python -m sagaline ARGS`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=_environment(),
    )


def parse_json(text: str) -> Any:
    """JSON with fractional numbers as Decimal, as money must be read."""
    return json.loads(text, parse_float=Decimal)


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float = 20.0,
    processes: Sequence[subprocess.Popen[str]] = (),
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` or when a process dies."""
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            if process.poll() is not None:
                stdout, stderr = process.communicate()
                pytest.fail(f"sagaline exited early ({process.returncode}): {stdout}{stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)


def stop(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGTERM, then wait (bounded) for the exit code and output."""
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"sagaline did not stop on SIGTERM: {stdout}{stderr}")
    return process.returncode, stdout, stderr


def count_commands(url: str) -> int:
    db = SqliteDatabase(url)
    try:
        return int(db.sync.execute("SELECT COUNT(*) FROM commands")[0][0])
    finally:
        db.connection.close()


def assert_stock_balanced(rows: Sequence[dict[str, Any]], stocked: dict[str, int]) -> None:
    assert {row["productId"]: row["stocked"] for row in rows} == stocked
    for row in rows:
        assert row["available"] + row["reserved"] + row["sold"] == row["stocked"], row
        assert row["reserved"] == 0, row
        assert min(row["available"], row["sold"]) >= 0, row


def seed_order(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SEED_ORDER_JSON, parse_float=Decimal)
    document.update(changes)
    return document


def dumps(document: dict[str, Any]) -> str:
    return to_json(document, indent=0)


# ------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A directory whose default store ``./sagaline.db`` holds a finished demo; its output."""
    directory = tmp_path_factory.mktemp("demo")
    result = sagaline("demo", cwd=directory)
    assert result.returncode == 0, result.stderr
    assert (directory / "sagaline.db").exists()
    yield directory, result.stdout


def test_the_demo_order_is_the_seed_document_byte_for_byte() -> None:
    assert SEED_ORDER_JSON in SEED_TEXT


def test_demo_shows_each_saga_its_outcome_and_the_read_model(demo_dir: tuple[Path, str]) -> None:
    _, output = demo_dir
    headers = {line.split(":", 1)[0]: line for line in output.splitlines() if line[:4] == "ORD-"}
    assert set(headers) == set(DEMO_ORDER_IDS)
    assert "COMPLETED" in headers["ORD-12345"]
    assert "order CONFIRMED" in headers["ORD-12345"]
    assert "COMPENSATED" in headers["ORD-12346"]
    assert "order CANCELLED" in headers["ORD-12346"]
    assert "Insufficient stock for PROD-A" in headers["ORD-12346"]
    assert "COMPENSATED" in headers["ORD-12347"]
    assert "order CANCELLED" in headers["ORD-12347"]
    assert DECLINE in headers["ORD-12347"]
    # The timelines name every step of the flow, with who sent and who handled it.
    for name in (
        "CreateOrderCommand",
        "OrderCreatedEvent",
        "ReserveInventoryCommand",
        "InventoryReservedEvent",
        "InventoryReservationFailedEvent",
        "ProcessPaymentCommand",
        "PaymentProcessedEvent",
        "PaymentFailedEvent",
        "ReleaseInventoryCommand",
        "CancelOrderCommand",
        "OrderCancelledEvent",
        "OrderConfirmedEvent",
    ):
        assert name in output
    assert "from client at" in output
    assert "handled by orchestrator at" in output
    assert "Order read model" in output
    assert "stock ledger balanced" in output


def test_demo_leaves_orders_sagas_and_stock_consistent(demo_dir: tuple[Path, str]) -> None:
    directory, _ = demo_dir
    orders = parse_json(sagaline("orders", "--json", cwd=directory).stdout)
    by_id = {row["orderId"]: row for row in orders}
    assert set(by_id) == set(DEMO_ORDER_IDS)
    assert by_id["ORD-12345"]["status"] == "CONFIRMED"
    assert by_id["ORD-12345"]["reason"] is None
    assert by_id["ORD-12346"]["status"] == "CANCELLED"
    assert "Insufficient stock for PROD-A" in by_id["ORD-12346"]["reason"]
    assert by_id["ORD-12347"]["status"] == "CANCELLED"
    assert DECLINE in by_id["ORD-12347"]["reason"]
    # Money keeps its scale on the way out.
    assert str(by_id["ORD-12345"]["totalAmount"]) == "75.50"

    stock = parse_json(sagaline("stock", "list", "--json", cwd=directory).stdout)
    assert_stock_balanced(stock, dict(DEMO_STOCK))
    assert {row["productId"]: row["sold"] for row in stock} == {"PROD-A": 2, "PROD-B": 1}

    sagas = parse_json(sagaline("sagas", "--json", cwd=directory).stdout)
    assert sagas["counts"] == {"COMPLETED": 1, "COMPENSATED": 2}


def test_demo_replaces_its_own_store_and_refuses_any_other(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    for _ in range(2):
        result = sagaline("demo", "--store", url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    # The second run started from an empty store: still three sagas, not six.
    assert _saga_counts(url) == {"COMPLETED": 1, "COMPENSATED": 2}

    other = f"sqlite:///{tmp_path}/real.db"

    async def stock_real_store() -> None:
        db = SqliteDatabase(other)
        async with db.transaction() as tx:
            from sagaline.orders.inventory import set_stock

            await set_stock(tx, "PROD-Z", 3)
        await db.close()

    asyncio.run(stock_real_store())
    refused = sagaline("demo", "--store", other, cwd=tmp_path)
    assert refused.returncode == 2
    assert "not a demo store" in refused.stderr
    assert "--store" in refused.stderr
    db = SqliteDatabase(other)
    try:
        assert [row["productId"] for row in db.sync.query_documents(STOCK)] == ["PROD-Z"]
        assert db.sync.get_meta("demo") is None
    finally:
        db.connection.close()

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database\n")
    refused = sagaline("demo", "--store", f"sqlite:///{text_file}", cwd=tmp_path)
    assert refused.returncode == 2
    assert text_file.read_text() == "not a database\n"


def _saga_counts(url: str) -> dict[str, int]:
    db = SqliteDatabase(url)
    try:
        return db.sync.saga_counts()
    finally:
        db.connection.close()


def test_demo_functions_run_in_process_and_the_read_model_rebuilds_the_same(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"

    async def demo() -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
        db = await open_demo_store(url)
        try:
            run = await run_demo(db, timeout=20.0)
            return (
                run.order_ids,
                await db.query_documents(ORDER_VIEW),
                await db.query_documents(STOCK),
            )
        finally:
            await db.close()

    order_ids, live, stock = asyncio.run(demo())
    assert order_ids == list(DEMO_ORDER_IDS)
    assert [row["status"] for row in live] == ["CONFIRMED", "CANCELLED", "CANCELLED"]
    assert_stock_balanced(stock, dict(DEMO_STOCK))

    result = sagaline("rebuild", "--store", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 rows" in result.stdout
    db = SqliteDatabase(url)
    try:
        assert db.sync.query_documents(ORDER_VIEW) == live
    finally:
        db.connection.close()


# ---------------------------------------------------------------------- queries


def _rows_are(key: str, values: set[str]) -> Callable[[Any], None]:
    def check(document: Any) -> None:
        assert {row[key] for row in document} == values

    return check


def _check_order(document: Any) -> None:
    assert document["orderId"] == "ORD-12345"
    assert document["status"] == "CONFIRMED"


def _check_trace(document: Any) -> None:
    assert document["saga"]["status"] == "COMPLETED"
    assert document["messages"][0]["type"] == "CreateOrderCommand"


def _check_sagas(document: Any) -> None:
    assert [row["sagaId"] for row in document["sagas"]] == ["order:ORD-12345"]


def _check_schema(document: Any) -> None:
    # The CLI process registers the order flow's types; this process may hold test types too.
    order_types = {
        cls.type_name()
        for cls in vars(order_messages).values()
        if isinstance(cls, type)
        and issubclass(cls, Message)
        and cls.__module__ == order_messages.__name__
    }
    assert (
        len(order_types) == 17
    )  # the seed's messages, its implicit answers, and the refund of a late payment
    # With sagaline's own signals the orchestrator takes: timers, operator actions, dead letters.
    signals = {"SagaTimerFired", "SagaActionRequested", "MessageDeadLettered"}
    assert set(document) == order_types | signals


QUERIES: list[tuple[list[str], Callable[[Any], None]]] = [
    (["stock", "list"], _rows_are("productId", {"PROD-A", "PROD-B"})),
    (["order", "ORD-12345"], _check_order),
    (["orders"], _rows_are("orderId", set(DEMO_ORDER_IDS))),
    (["orders", "--status", "cancelled"], _rows_are("orderId", {"ORD-12346", "ORD-12347"})),
    (["orders", "--customer", "CUST-555"], _rows_are("orderId", {"ORD-12347"})),
    (["trace", "ORD-12345"], _check_trace),
    (["dead-letters"], _rows_are("messageId", set())),
    (["sagas", "--status", "completed"], _check_sagas),
    (["schema"], _check_schema),
]


@pytest.fixture(scope="module")
def query_results(
    demo_dir: tuple[Path, str],
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every query of QUERIES with --json on the demo store, run side by side."""
    directory, _ = demo_dir
    results = sagaline_all([([*args, "--json"], directory, None) for args, _ in QUERIES])
    return {" ".join(args): result for (args, _), result in zip(QUERIES, results, strict=True)}


@pytest.mark.parametrize(("args", "check"), QUERIES, ids=[" ".join(q[0]) for q in QUERIES])
def test_query_commands_print_json(
    query_results: dict[str, subprocess.CompletedProcess[str]],
    args: list[str],
    check: Callable[[Any], None],
) -> None:
    result = query_results[" ".join(args)]
    assert result.returncode == 0, result.stderr
    check(parse_json(result.stdout))


def test_trace_is_a_causal_tree_with_the_saga(demo_dir: tuple[Path, str]) -> None:
    directory, _ = demo_dir
    trace = parse_json(sagaline("trace", "ORD-12347", "--json", cwd=directory).stdout)
    messages = trace["messages"]
    root = messages[0]
    assert (root["type"], root["depth"], root["source"]) == ("CreateOrderCommand", 0, "client")
    assert root["handledBy"][0]["consumer"] == "order"
    # In depth-first order, a message's cause is the nearest earlier message one level up.
    for index, message in enumerate(messages[1:], start=1):
        parent = next(m for m in reversed(messages[:index]) if m["depth"] == message["depth"] - 1)
        assert message["causationId"] == parent["messageId"]
        assert message["timestamp"] >= parent["timestamp"]
    types = [m["type"] for m in messages]
    assert types.index("PaymentFailedEvent") < types.index("ReleaseInventoryCommand")
    assert types.index("ReleaseInventoryCommand") < types.index("CancelOrderCommand")
    assert trace["saga"]["status"] == "COMPENSATED"
    assert trace["saga"]["failedStep"] == "process_payment"
    assert trace["saga"]["reason"] == DECLINE

    printed = sagaline("trace", "ORD-12347", cwd=directory)
    assert printed.returncode == 0
    assert DECLINE in printed.stdout
    assert "└──" in printed.stdout


def test_unknown_order_and_missing_store_are_errors(
    demo_dir: tuple[Path, str], tmp_path: Path
) -> None:
    directory, _ = demo_dir
    *unknown, missing = sagaline_all(
        [
            (["order", "ORD-404", "--json"], directory, None),
            (["trace", "ORD-404", "--json"], directory, None),
            (["orders", "--json"], tmp_path, None),
        ]
    )
    for result in unknown:
        assert result.returncode == 1
        assert "ORD-404" in result.stderr
        assert result.stdout == ""
    assert missing.returncode == 1
    assert "no store" in missing.stderr
    assert not (tmp_path / "sagaline.db").exists()


def test_store_urls_are_printed_without_passwords(tmp_path: Path) -> None:
    # An unsupported scheme is refused before anything is opened; an unreachable server fails
    # to connect. Neither message repeats the password.
    unsupported, unreachable = sagaline_all(
        [
            (("orders", "--store", "mysql://app:hunter2@db.invalid/orders"), tmp_path, None),
            (("orders", "--store", "postgresql://app:hunter2@127.0.0.1:9/o"), tmp_path, None),
        ]
    )
    assert unsupported.returncode == 2
    assert unreachable.returncode == 1
    for result in (unsupported, unreachable):
        assert "hunter2" not in result.stderr + result.stdout
        assert "app:***@" in result.stderr


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Every command that does its work and exits, with the arguments it needs.
ONE_SHOT_COMMANDS: list[tuple[str, ...]] = [
    ("submit", "-"),
    ("order", "ORD-12345"),
    ("orders",),
    ("trace", "ORD-12345"),
    ("sagas",),
    ("dead-letters",),
    ("stock", "list"),
    ("stock", "set", "PROD-A", "3"),
    ("rebuild",),
    ("migrate",),
    ("demo",),
    ("teardown", "--yes"),
]


def _unreachable(server: str, port: int, directory: Path) -> tuple[list[str], str]:
    """The URL options that put ``server`` on ``port``, and the URL as messages must show it."""
    if server == "PostgreSQL":
        store = f"postgresql://app:s3cret@127.0.0.1:{port}/shop"
        return ["--store", store], redact_url(store)
    stores = f"sqlite:///{directory}/{{service}}.db"
    if server == "RabbitMQ":
        bus = f"amqp://app:s3cret@127.0.0.1:{port}/shop"
    else:
        bus = f"nats://app:s3cret@127.0.0.1:{port}"
    return ["--store", stores, "--bus", bus], redact_url(bus)


@pytest.mark.parametrize("server", ["NATS", "RabbitMQ", "PostgreSQL"])
def test_one_shot_commands_give_up_on_an_unreachable_server(tmp_path: Path, server: str) -> None:
    """Each exits with status 1 within the connect timeout and one line naming the server,
    without its password; a long wait (the NATS client's reconnecting forever) fails the test."""
    for name in ("order", "inventory", "payment", "orchestrator", "read"):
        SqliteDatabase(f"sqlite:///{tmp_path}/{name}.db").connection.close()
    port = closed_port()
    where, shown = _unreachable(server, port, tmp_path)
    (tmp_path / "demo").mkdir()
    calls: list[tuple[Sequence[str], Path, str | None]] = []
    for command in ONE_SHOT_COMMANDS:
        if command[0] == "teardown":
            if server == "PostgreSQL":
                continue  # a broker's command
            calls.append(([*command, *where[2:]], tmp_path, None))
        elif command[0] == "demo":  # it replaces the SQLite files of the stores: others of its own
            calls.append(
                ([*command, *_unreachable(server, port, tmp_path / "demo")[0]], tmp_path, None)
            )
        else:
            calls.append(([*command, *where], tmp_path, SEED_ORDER_JSON))
    started = time.monotonic()
    results = sagaline_all(calls, env={"SAGALINE_CONNECT_TIMEOUT": "1"})
    assert time.monotonic() - started < PROCESS_TIMEOUT
    for (args, _, _), result in zip(calls, results, strict=True):
        assert result.returncode == 1, (args, result.stderr)
        assert result.stdout == "", args
        assert result.stderr.startswith(f"error: {server} at {shown} is unreachable: "), (
            command,
            result.stderr,
        )
        assert result.stderr.count("\n") == 1, (command, result.stderr)
        assert "s3cret" not in result.stderr, command


def test_the_connect_timeout_must_be_a_positive_number(tmp_path: Path) -> None:
    [refused] = sagaline_all([(("orders",), tmp_path, None)], {"SAGALINE_CONNECT_TIMEOUT": "0"})
    assert refused.returncode == 2
    assert "--connect-timeout" in refused.stderr


@pytest.mark.parametrize("command", ["run", "up"])
@pytest.mark.parametrize("server", ["NATS", "RabbitMQ", "PostgreSQL"])
def test_services_wait_for_an_unreachable_server_and_log_it_without_the_password(
    tmp_path: Path, server: str, command: str
) -> None:
    where, shown = _unreachable(server, closed_port(), tmp_path)
    log = tmp_path / "run.log"
    with log.open("wb") as output:
        runner = subprocess.Popen(
            [sys.executable, "-m", "sagaline", command, *where],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_environment({"SAGALINE_CONNECT_TIMEOUT": "1"}),
        )
    try:
        # Still waiting after several attempts, each logged: the connect timeout is for
        # one-shot commands only.
        wait_until(
            lambda: log.read_text(errors="replace").count(shown) >= 3, timeout=PROCESS_TIMEOUT
        )
        assert runner.poll() is None, log.read_text(errors="replace")
    finally:
        runner.kill()
        runner.wait(PROCESS_TIMEOUT)
    text = log.read_text(errors="replace")
    assert "s3cret" not in text
    assert "Traceback" not in text


# ----------------------------------------------------------------------- schema


def test_schema_of_one_type_has_money_as_a_number(tmp_path: Path) -> None:
    result, unknown = sagaline_all(
        [
            (["schema", "CreateOrderCommand"], tmp_path, None),
            (["schema", "ShipOrderCommand"], tmp_path, None),
        ]
    )
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    properties = schema["$defs"]["CreateOrderCommand"]["properties"]
    assert properties["totalAmount"]["type"] == "number"
    assert properties["commandType"] == {"enum": ["CreateOrderCommand"]}

    assert unknown.returncode == 2
    assert "ShipOrderCommand" in unknown.stderr
    assert unknown.stdout == ""


# ----------------------------------------------------------------------- submit


def _missing_customer() -> str:
    document = seed_order()
    del document["customerId"]
    return dumps(document)


def _with_total(amount: str) -> str:
    """The seed's order with ``totalAmount`` written exactly as ``amount``."""
    return dumps(seed_order()).replace('"totalAmount": 75.50', f'"totalAmount": {amount}')


def _internal(command_type: str, **fields: Any) -> str:
    return dumps({"commandType": command_type, "orderId": "ORD-12345", **fields})


BAD_DOCUMENTS = [
    ("malformed", '{"commandType": "CreateOrderCommand", "orderId": ', "malformed JSON"),
    ("unknown type", dumps(seed_order(commandType="ShipOrderCommand")), "commandType"),
    (
        "an event",
        dumps({"eventType": "OrderConfirmedEvent", "orderId": "ORD-1"}),
        "eventType",
    ),
    (
        "quantity -1",
        dumps(seed_order(items=[{"productId": "PROD-A", "quantity": -1}])),
        "$.items[0].quantity",
    ),
    ("missing customerId", _missing_customer(), "customerId"),
    ("unknown field", dumps(seed_order(couponCode="FREE")), "couponCode"),
    ("negative total", dumps(seed_order(totalAmount=Decimal("-1.00"))), "totalAmount"),
    ("escape in an id", dumps(seed_order(orderId="ORD-\x1b[2J")), "$.orderId"),
    (
        "a repeated key",
        dumps(seed_order()).replace('"orderId"', '"orderId": "ORD-1", "orderId"'),
        "$.orderId",
    ),
    (
        "a repeated nested key",
        dumps(seed_order()).replace('"quantity": 2', '"quantity": 2, "quantity": 9'),
        "$..quantity",
    ),
    ("negative zero total", _with_total("-0.0"), "totalAmount"),
    ("total with an exponent", _with_total("1e2"), "totalAmount"),
    ("total with a signed exponent", _with_total("7.55E+1"), "totalAmount"),
    ("zero total", _with_total("0.00"), "totalAmount"),
    (
        "the saga's cancel",
        _internal("CancelOrderCommand", reason="changed my mind"),
        "CancelOrderCommand is an internal command",
    ),
    (
        "the saga's reservation",
        _internal("ReserveInventoryCommand", items=[{"productId": "PROD-A", "quantity": 1}]),
        "clients may submit CreateOrderCommand",
    ),
    (
        "the saga's payment",
        _internal("ProcessPaymentCommand", customerId="CUST-1", amount=Decimal("1.00")),
        "ProcessPaymentCommand is an internal command",
    ),
]


@pytest.fixture(scope="module")
def rejections(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], int]]:
    """Each bad document submitted to its own empty store (side by side): result, rows after."""
    calls: list[tuple[Sequence[str], Path, str | None]] = []
    urls = []
    for _, document, _ in BAD_DOCUMENTS:
        directory = tmp_path_factory.mktemp("submit")
        url = f"sqlite:///{directory}/bus.db"
        assert count_commands(url) == 0
        urls.append(url)
        calls.append((["submit", "-", "--store", url], directory, document))
    results = sagaline_all(calls)
    return {
        name: (result, count_commands(url))
        for (name, _, _), result, url in zip(BAD_DOCUMENTS, results, urls, strict=True)
    }


@pytest.mark.parametrize(
    ("name", "field"),
    [(name, field) for name, _, field in BAD_DOCUMENTS],
    ids=[name for name, _, _ in BAD_DOCUMENTS],
)
def test_submit_rejects_a_bad_document_and_writes_nothing(
    rejections: dict[str, tuple[subprocess.CompletedProcess[str], int]], name: str, field: str
) -> None:
    result, commands_after = rejections[name]
    assert result.returncode == 2
    assert field in result.stderr
    assert "\x1b" not in result.stderr
    assert result.stdout == ""
    assert commands_after == 0


def test_submit_puts_a_command_on_the_bus(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    (tmp_path / "order.json").write_text(SEED_ORDER_JSON, encoding="utf-8")
    plain = sagaline("submit", "order.json", "--store", url, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    message_id = plain.stdout.strip()
    assert UUID.match(message_id)

    piped = sagaline(
        "submit",
        "-",
        "--json",
        "--store",
        url,
        cwd=tmp_path,
        stdin=dumps(seed_order(orderId="ORD-2")),
    )
    assert piped.returncode == 0, piped.stderr
    answer = json.loads(piped.stdout)
    assert answer["type"] == "CreateOrderCommand"
    assert UUID.match(answer["messageId"])

    db = SqliteDatabase(url)
    try:
        rows = db.sync.execute(
            "SELECT message_id, type, correlation_id, body FROM commands ORDER BY id"
        )
    finally:
        db.connection.close()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (message_id, "CreateOrderCommand", "ORD-12345"),
        (answer["messageId"], "CreateOrderCommand", "ORD-2"),
    ]
    assert '"totalAmount":75.50' in rows[0][3]


def test_submit_with_a_message_id_takes_a_retry_once_and_refuses_another_message(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    order = dumps(seed_order())
    first = sagaline(
        "submit", "-", "--message-id", "web:42", "--store", url, cwd=tmp_path, stdin=order
    )
    assert (first.returncode, first.stdout.strip()) == (0, "web:42"), first.stderr
    # The client did not hear back and sends the same order again: the same message.
    again = sagaline(
        "submit", "-", "--message-id", "web:42", "--store", url, cwd=tmp_path, stdin=order
    )
    assert (again.returncode, again.stdout.strip()) == (0, "web:42"), again.stderr
    other = dumps(seed_order(orderId="ORD-2"))
    reused = sagaline(
        "submit", "-", "--message-id", "web:42", "--store", url, cwd=tmp_path, stdin=other
    )
    assert reused.returncode == 2
    assert "web:42" in reused.stderr and "different message" in reused.stderr
    assert reused.stdout == ""
    db = SqliteDatabase(url)
    try:
        rows = db.sync.execute("SELECT message_id, correlation_id FROM commands")
    finally:
        db.connection.close()
    assert rows == [("web:42", "ORD-12345")]


@pytest.mark.parametrize(
    ("message_id", "problem"),
    [
        ("x" * 100_000, "100000 characters is longer than the limit of 128"),
        ("", "must not be empty"),
        ("web 42/\u00e9", "may only hold ASCII letters, digits"),
    ],
    ids=["100,000 characters", "empty", "space, slash and accent"],
)
def test_submit_refuses_a_message_id_that_is_not_one(
    tmp_path: Path, message_id: str, problem: str
) -> None:
    result = sagaline(
        "submit", "-", "--message-id", message_id, cwd=tmp_path, stdin=dumps(seed_order())
    )
    assert result.returncode == 2
    assert "messageId" in result.stderr and problem in result.stderr
    assert not (tmp_path / "sagaline.db").exists()


def test_untrusted_text_is_printed_inert(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    hostile = "\x1b]0;owned\x07\x1b[2J[bold red]boom[/bold red]\u202e:thumbs_up:"
    # Free text only travels in the saga's own commands, which no client may submit: the
    # orchestrator's cancel carries it here.
    cancel = order_messages.CancelOrderCommand(order_id="ORD-9", reason=hostile)

    async def send() -> None:
        db = SqliteDatabase(url)
        await build_system().submit_internal(db, [cancel], source="orchestrator")
        await db.close()

    asyncio.run(send())
    result = sagaline("trace", "ORD-9", "--store", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for unsafe in ("\x1b", "\x07", "\u202e", "👍"):
        assert unsafe not in result.stdout
    # Markup in a payload is shown as text, not applied.
    assert "[bold red]boom[/bold red]" in result.stdout
    assert ":thumbs_up:" in result.stdout
    assert "pending in queue order" in result.stdout
    # JSON keeps the text exactly, with every unsafe character written as an escape.
    as_json = sagaline("trace", "ORD-9", "--json", "--store", url, cwd=tmp_path)
    for unsafe in ("\x1b", "\x07", "\u202e"):
        assert unsafe not in as_json.stdout
    assert json.loads(as_json.stdout)["messages"][0]["body"]["reason"] == hostile


# ------------------------------------------------------------------------ stock


@pytest.mark.parametrize(
    ("product", "quantity", "problem"),
    [
        ("PROD-A", "-1", "QTY must be a non-negative integer"),
        ("PROD-A", "1.5", "QTY must be a non-negative integer"),
        ("PROD A", "1", "PRODUCT must be"),
    ],
)
def test_stock_set_refuses_bad_input(
    tmp_path: Path, product: str, quantity: str, problem: str
) -> None:
    result = sagaline("stock", "set", product, quantity, cwd=tmp_path)
    assert result.returncode == 2
    assert problem in result.stderr
    assert not (tmp_path / "sagaline.db").exists()


@pytest.mark.parametrize("instance", ["3/2", "0/2", "two", "1/"])
def test_serve_refuses_a_bad_instance(tmp_path: Path, instance: str) -> None:
    result = sagaline("serve", "order", "--instance", instance, cwd=tmp_path)
    assert result.returncode == 2
    assert "--instance" in result.stderr and "I/N" in result.stderr
    assert not (tmp_path / "sagaline.db").exists()


def test_stock_set_and_list(tmp_path: Path) -> None:
    row = parse_json(sagaline("stock", "set", "PROD-A", "4", "--json", cwd=tmp_path).stdout)
    assert row == {"productId": "PROD-A", "available": 4, "reserved": 0, "sold": 0, "stocked": 4}
    listed = sagaline("stock", "list", cwd=tmp_path)
    assert listed.returncode == 0
    assert re.search(r"PROD-A\W+4\W+0\W+0\W+4", listed.stdout)


# -------------------------------------------------------------------------- run


def test_run_processes_a_submitted_order_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/live.db"
    asyncio.run(_stock(url))
    runner = start_sagaline(
        "run", "--store", url, "--batch-size", "16", "--lease-seconds", "5", cwd=tmp_path
    )
    try:
        submitted = sagaline("submit", "-", "--store", url, cwd=tmp_path, stdin=SEED_ORDER_JSON)
        assert submitted.returncode == 0, submitted.stderr
        db = SqliteDatabase(url)
        try:

            def confirmed() -> bool:
                view = db.sync.get_document(ORDER_VIEW, "ORD-12345")
                return view is not None and view.data["status"] == "CONFIRMED"

            wait_until(confirmed, processes=[runner])
            saga = db.sync.get_saga("order:ORD-12345")
            assert saga is not None and saga.status == "COMPLETED"
        finally:
            db.connection.close()
    finally:
        code, stdout, stderr = stop(runner)
    assert code == 0, stderr
    first = stdout.splitlines()[0]
    assert "order, inventory, payment, orchestrator, read" in first
    assert "live.db" in first
    assert "SIGTERM" in stderr


def test_two_run_processes_share_one_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    asyncio.run(_stock(url))
    runners = [start_sagaline("run", "--store", url, cwd=tmp_path) for _ in range(2)]
    orders = 8
    try:
        db = SqliteDatabase(url)
        try:
            # Both are up (their signal handlers too) once both have joined as members.
            wait_until(
                lambda: db.sync.execute("SELECT COUNT(DISTINCT member) FROM members")[0][0] == 2,
                processes=runners,
            )
            asyncio.run(_submit_orders(url, orders))
            wait_until(lambda: asyncio.run(demo_is_settled(db, orders)), processes=runners)
            views = db.sync.query_documents(ORDER_VIEW)
            stock = db.sync.query_documents(STOCK)
            dead = db.sync.dead_letters()
            unhandled = db.sync.execute("SELECT COUNT(*) FROM commands WHERE outcome != 'handled'")
        finally:
            db.connection.close()
    finally:
        results = [stop(runner) for runner in runners]
    for code, _, stderr in results:
        assert code == 0, stderr
    # 10 units of PROD-A, 2 per order: five orders are confirmed and the others cancelled.
    assert sorted(view["status"] for view in views) == ["CANCELLED"] * 3 + ["CONFIRMED"] * 5
    assert_stock_balanced(stock, dict(DEMO_STOCK))
    assert dead == []
    assert unhandled == [(0,)]


async def _stock(url: str) -> None:
    db = SqliteDatabase(url)
    await stock_demo(db)
    await db.close()


async def _submit_orders(url: str, count: int) -> None:
    db = SqliteDatabase(url)
    await build_system().submit_many(
        db,
        [
            CreateOrderCommand(
                order_id=f"ORD-{n}",
                customer_id="CUST-1",
                items=[OrderItem(product_id="PROD-A", quantity=2)],
                total_amount=Decimal("10.00"),
            )
            for n in range(count)
        ],
    )
    await db.close()


# ------------------------------------------------------------ pure helpers


def _row(message_id: str, cause: str | None, timestamp: str, sequence: int = 1) -> dict[str, Any]:
    return {
        "messageId": message_id,
        "causationId": cause,
        "timestamp": timestamp,
        "sequence": sequence,
    }


def test_causal_order_walks_the_causation_tree() -> None:
    rows = [
        _row("b", "a", "2023-10-27T10:00:02Z"),
        _row("d", "c", "2023-10-27T10:00:03Z"),
        _row("a", None, "2023-10-27T10:00:00Z"),
        _row("c2", "a", "2023-10-27T10:00:01Z", sequence=2),
        _row("c", "a", "2023-10-27T10:00:01Z", sequence=1),
        _row("x", "from-elsewhere", "2023-10-27T10:00:05Z"),
    ]
    ordered = [(depth, row["messageId"]) for depth, row in causal_order(rows)]
    assert ordered == [(0, "a"), (1, "c"), (2, "d"), (1, "c2"), (1, "b"), (0, "x")]


def test_causal_order_keeps_every_row_of_a_forged_cycle() -> None:
    rows = [
        _row("a", None, "2023-10-27T10:00:00Z"),
        _row("f", "g", "2023-10-27T10:00:01Z"),
        _row("g", "f", "2023-10-27T10:00:02Z"),
        _row("self", "self", "2023-10-27T10:00:03Z"),
    ]
    ordered = [row["messageId"] for _, row in causal_order(rows)]
    assert sorted(ordered) == ["a", "f", "g", "self"]
    assert ordered[0] == "a"


def test_strip_control_and_redact_url() -> None:
    assert strip_control("ok\x1b[31m red\x07\u202e\nnext") == "ok?[31m red?? next"
    assert strip_control("PROD-A café") == "PROD-A café"
    assert redact_url("sqlite:///./sagaline.db") == "sqlite:///./sagaline.db"
    assert redact_url("postgresql://u:pw@h:5432/db?sslmode=require&password=x") == (
        "postgresql://u:***@h:5432/db?sslmode=require&password=***"
    )
    assert redact_url("nats://app:s3cret@nats:4222?prefix=shop") == (
        "nats://app:***@nats:4222?prefix=shop"
    )


def test_a_drivers_message_is_shown_without_the_urls_passwords() -> None:
    url = "amqp://guest:guest@mq:5672/shop?token=t0k3n"
    shown = "amqp://guest:***@mq:5672/shop?token=***"
    assert redact(f"cannot open {url}: password guest, t0k3n", url) == (
        f"cannot open {shown}: password ***, ***"
    )
    # Already redacted, the URL stays as it is; a percent-encoded password is masked decoded too.
    assert redact(f"RabbitMQ at {shown} refused", url) == f"RabbitMQ at {shown} refused"
    assert redact("login p@ss failed", "postgresql://u:p%40ss@h/db", None) == "login *** failed"


def test_stock_violations_name_the_product_whose_ledger_is_off() -> None:
    balanced = {"productId": "P1", "available": 1, "reserved": 2, "sold": 3, "stocked": 6}
    lost = {"productId": "P2", "available": 1, "reserved": 0, "sold": 0, "stocked": 2}
    negative = {"productId": "P3", "available": -1, "reserved": 1, "sold": 0, "stocked": 0}
    problems = stock_violations([balanced, lost, negative])
    assert len(problems) == 2
    assert problems[0].startswith("P2:")
    assert problems[1].startswith("P3:")
