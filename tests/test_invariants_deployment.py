"""The invariant checker on a database per service: a settled run is clean, damage is reported.

The order flow runs in this process on five SQLite stores (one per service, in outbox mode) and a
SQLite bus. The settled files are copied for each test; a test damages one service's store (or
the bus) with plain SQL, as a bug or a lost write would, and expects the checker to name the
invariant that broke.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import OrderStore

from sagaline.deploy import Deployment
from sagaline.orders import SERVICE_NAMES, build_system
from sagaline.orders.checks import check_deployment, check_invariants, check_snapshot
from sagaline.orders.demo import (
    open_demo_deployment,
    run_demo,
    run_until_settled,
    stock_demo,
)
from sagaline.orders.invariants import ORDER_ANSWERS
from sagaline.orders.messages import CreateOrderCommand
from sagaline.testing.invariants import (
    CLIENT_SOURCE,
    COLOCATED,
    HANDLED,
    OUTBOX,
    AuditSnapshot,
    Violation,
    format_violations,
)

ORDERS = 40
INITIAL_STOCK = {"PROD-A": 60, "PROD-B": 6}
TIMEOUT = 60.0

Connections = dict[str, sqlite3.Connection]


def _store_url(directory: Path) -> str:
    return f"sqlite:///{directory}/store-{{service}}.db"


def _bus_url(directory: Path) -> str:
    return f"sqlite:///{directory}/bus.db"


def _files(directory: Path) -> dict[str, Path]:
    """Each service's store file, and the bus's under ``bus``."""
    files = {name: directory / f"store-{name}.db" for name in SERVICE_NAMES}
    files["bus"] = directory / "bus.db"
    return files


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the stores and bus of a settled run of orders of every outcome."""
    directory = tmp_path_factory.mktemp("deployment")

    async def run() -> None:
        deployment = await open_demo_deployment(_store_url(directory), _bus_url(directory))
        try:
            system = build_system()
            await stock_demo(deployment.store("inventory"), INITIAL_STOCK)
            orders: list[CreateOrderCommand] = OrderStore.mix(0, ORDERS)
            # The same order id again: rejected, in a stream of its own.
            orders.append(OrderStore.mix(0, 1)[0])
            submitted = await system.submit_many(deployment.entry, orders)
            order_ids = sorted({envelope.correlation_id for envelope in submitted})
            await run_until_settled(deployment, system, order_ids, timeout=TIMEOUT)
        finally:
            await deployment.close()

    asyncio.run(run())
    return directory


@pytest.fixture
def copy(settled: Path, tmp_path: Path) -> Path:
    """A private copy of the settled files, to damage."""
    for name, source in _files(settled).items():
        target = _files(tmp_path)[name]
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
            src.backup(dst)
    return tmp_path


@pytest.fixture
def deployment(copy: Path) -> Iterator[Deployment]:
    """The copied stores and bus, opened."""
    opened = Deployment(_store_url(copy), _bus_url(copy), SERVICE_NAMES)
    asyncio.run(opened.open())
    try:
        yield opened
    finally:
        asyncio.run(opened.close())


def _check(deployment: Deployment) -> list[Violation]:
    return asyncio.run(check_deployment(deployment, initial_stock=INITIAL_STOCK))


def _damage(directory: Path, damage: Callable[[Connections], None]) -> None:
    files = _files(directory)
    connections = {name: sqlite3.connect(path) for name, path in files.items()}
    try:
        damage(connections)
        for connection in connections.values():
            connection.commit()
    finally:
        for connection in connections.values():
            connection.close()


def _one(conn: sqlite3.Connection, sql: str, params: tuple[str, ...] = ()) -> str:
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return str(row[0])


def _saga_order(db: Connections, status: str) -> str:
    saga_id = _one(
        db["orchestrator"],
        "SELECT saga_id FROM sagas WHERE status = ? ORDER BY saga_id",
        (status,),
    )
    return saga_id.partition(":")[2]


def _command_id(db: Connections, type_: str) -> str:
    return _one(
        db["orchestrator"], "SELECT message_id FROM outbox WHERE type = ? ORDER BY id", (type_,)
    )


# ------------------------------------------------------------------ damage


def _saga_stuck(db: Connections) -> None:
    db["orchestrator"].execute(
        "UPDATE sagas SET status = 'RUNNING' WHERE saga_id = ?",
        (f"order:{_saga_order(db, 'COMPLETED')}",),
    )


def _stock_unbalanced(db: Connections) -> None:
    db["inventory"].execute(
        "UPDATE documents SET data = json_set(data, '$.available',"
        " json_extract(data, '$.available') + 1)"
        " WHERE namespace = 'inventory.stock' AND key = 'PROD-A'"
    )


def _confirmed_order_also_cancelled(db: Connections) -> None:
    order_id = _saga_order(db, "COMPLETED")
    stream = f"Order-{order_id}"
    db["order"].execute(
        "INSERT INTO events (stream, version, message_id, type, body, correlation_id,"
        " causation_id, timestamp, traceparent, source, part)"
        " SELECT ?, (SELECT MAX(version) + 1 FROM events WHERE stream = ?), 'forged-cancel',"
        " type, json_set(body, '$.orderId', ?), ?, NULL, timestamp, NULL, source, part"
        " FROM events WHERE type = 'OrderCancelledEvent' LIMIT 1",
        (stream, stream, order_id, order_id),
    )


def _payment_doubled(db: Connections) -> None:
    order_id = _saga_order(db, "COMPLETED")
    db["payment"].execute(
        "INSERT INTO outbox (message_id, type, body, correlation_id, causation_id, timestamp,"
        " traceparent, source, sent)"
        " SELECT 'forged-charge', type, json_set(body, '$.transactionId', 'TXN-FORGED'),"
        " correlation_id, causation_id, timestamp, traceparent, source, 1"
        " FROM outbox WHERE type = 'PaymentProcessedEvent' AND correlation_id = ?",
        (order_id,),
    )


def _inbox_entry_lost(db: Connections) -> None:
    db["inventory"].execute(
        "DELETE FROM inbox WHERE consumer = 'inventory' AND message_id = ?",
        (_command_id(db, "ReserveInventoryCommand"),),
    )


def _client_inbox_entry_lost(db: Connections) -> None:
    cause = _one(
        db["order"],
        "SELECT causation_id FROM events WHERE type = 'OrderCreatedEvent' ORDER BY position",
    )
    db["order"].execute("DELETE FROM inbox WHERE consumer = 'order' AND message_id = ?", (cause,))


def _stream_gap(db: Connections) -> None:
    db["order"].execute(
        "UPDATE events SET version = version + 1 WHERE stream = ? AND version > 1",
        (f"Order-{_saga_order(db, 'COMPLETED')}",),
    )


def _read_model_drifts(db: Connections) -> None:
    db["read"].execute(
        "UPDATE documents SET data = json_set(data, '$.customerId', 'CUST-999')"
        " WHERE namespace = 'read.order' AND key = ?",
        (_saga_order(db, "COMPENSATED"),),
    )


def _answer_lost(db: Connections) -> None:
    db["payment"].execute(
        "DELETE FROM outbox WHERE causation_id = ?", (_command_id(db, "ProcessPaymentCommand"),)
    )


def _event_missed_by_subscriber(db: Connections) -> None:
    created = _one(
        db["order"], "SELECT message_id FROM events WHERE type = 'OrderCreatedEvent' LIMIT 1"
    )
    db["read"].execute("DELETE FROM inbox WHERE consumer = 'read' AND message_id = ?", (created,))


def _outbox_entry_unsent(db: Connections) -> None:
    db["orchestrator"].execute(
        "UPDATE outbox SET sent = 0 WHERE message_id = ?",
        (_command_id(db, "ReleaseInventoryCommand"),),
    )


def _command_never_delivered(db: Connections) -> None:
    message_id = _command_id(db, "CancelOrderCommand")
    db["order"].execute(
        "DELETE FROM inbox WHERE consumer = 'order' AND message_id = ?", (message_id,)
    )
    db["order"].execute("DELETE FROM events WHERE causation_id = ?", (message_id,))
    db["order"].execute("DELETE FROM outbox WHERE causation_id = ?", (message_id,))


def _bus_message_from_nowhere(db: Connections) -> None:
    db["bus"].execute(
        "INSERT INTO commands (queue, key, message_id, type, body, correlation_id,"
        " causation_id, timestamp, traceparent, source, available_at, done, outcome)"
        " SELECT queue, key, 'forged-command', type, body, correlation_id, causation_id,"
        " timestamp, traceparent, source, available_at, 1, 'handled' FROM commands"
        " WHERE type = 'ProcessPaymentCommand' LIMIT 1"
    )
    db["payment"].execute(
        "INSERT INTO inbox (message_id, consumer, processed_at)"
        " VALUES ('forged-command', 'payment', '2024-01-01T00:00:00Z')"
    )


DAMAGE = [
    (_saga_stuck, "I1"),
    (_stock_unbalanced, "I2"),
    (_confirmed_order_also_cancelled, "I3"),
    (_payment_doubled, "I4"),
    (_inbox_entry_lost, "I5"),
    (_client_inbox_entry_lost, "I5"),
    (_stream_gap, "I6"),
    (_event_missed_by_subscriber, "I6"),
    (_read_model_drifts, "I7"),
    (_answer_lost, "I8"),
    (_event_missed_by_subscriber, "I9"),
    (_outbox_entry_unsent, "I9"),
    (_command_never_delivered, "I9"),
    (_bus_message_from_nowhere, "I9"),
]


# ------------------------------------------------------------------- tests


def test_a_settled_deployment_keeps_every_invariant(deployment: Deployment) -> None:
    violations = _check(deployment)
    assert not violations, format_violations(violations)


def test_the_snapshot_accounts_for_every_message(deployment: Deployment) -> None:
    snapshot = asyncio.run(
        AuditSnapshot.from_deployment(deployment, build_system(), answers=ORDER_ANSWERS)
    )
    assert snapshot.layout == OUTBOX
    assert snapshot.bus is not None and snapshot.bus.cursors
    assert {command.state for command in snapshot.commands} == {HANDLED}
    clients = [c for c in snapshot.commands if c.source == CLIENT_SOURCE]
    # Every submission is found, the rejected duplicate included, though none is in an outbox.
    assert len(clients) == ORDERS + 1
    assert {c.type for c in clients} == {CreateOrderCommand.type_name()}
    types = {event.type for event in snapshot.events}
    assert {"OrderCreatedEvent", "OrderRejectedEvent", "OrderConfirmedEvent"} <= types
    assert {"OrderCancelledEvent", "PaymentProcessedEvent", "PaymentFailedEvent"} <= types
    statuses = {record.status for record in snapshot.sagas}
    assert statuses == {"COMPLETED", "COMPENSATED"}
    assert not snapshot.unsent and not snapshot.dead_letters


def test_the_checker_needs_no_readable_bus(deployment: Deployment) -> None:
    # As with a broker for a bus: only the stores' own rows are read.
    async def check() -> list[Violation]:
        sources = [(name, await deployment.store(name).audit_rows()) for name in SERVICE_NAMES]
        snapshot = AuditSnapshot.from_rows(
            sources, routes=build_system().routes, outbox=True, answers=ORDER_ANSWERS
        )
        assert snapshot.bus is None
        return await check_snapshot(snapshot, initial_stock=INITIAL_STOCK)

    violations = asyncio.run(check())
    assert not violations, format_violations(violations)
    orchestrator: Any = deployment.store("orchestrator")
    inventory: Any = deployment.store("inventory")
    ((reserve,),) = orchestrator.sync.execute(
        "SELECT message_id FROM outbox WHERE type = 'ReserveInventoryCommand' LIMIT 1"
    )
    inventory.connection.execute("DELETE FROM inbox WHERE message_id = ?", (reserve,))
    violations = asyncio.run(check())
    found = {(v.invariant, v.evidence.get("messageId")) for v in violations}
    assert {("I5", reserve), ("I9", reserve)} <= found, format_violations(violations)


@pytest.mark.parametrize(
    ("damage", "invariant"),
    DAMAGE,
    ids=[f"{damage.__name__.strip('_')}-{invariant}" for damage, invariant in DAMAGE],
)
def test_the_checker_reports_damage_to_a_service_store(
    copy: Path, damage: Callable[[Connections], None], invariant: str
) -> None:
    _damage(copy, damage)
    opened = Deployment(_store_url(copy), _bus_url(copy), SERVICE_NAMES)
    asyncio.run(opened.open())
    try:
        violations = _check(opened)
    finally:
        asyncio.run(opened.close())
    assert invariant in {v.invariant for v in violations}, format_violations(violations)
    assert all(v.evidence for v in violations), format_violations(violations)


def test_a_colocated_deployment_is_checked_as_one_store(tmp_path: Path) -> None:
    async def run() -> tuple[list[Violation], str]:
        deployment = await open_demo_deployment(f"sqlite:///{tmp_path}/demo.db")
        try:
            await run_demo(deployment)
            snapshot = await AuditSnapshot.from_deployment(deployment, build_system())
            return await check_deployment(deployment), snapshot.layout
        finally:
            await deployment.close()

    violations, layout = asyncio.run(run())
    assert layout == COLOCATED
    assert not violations, format_violations(violations)


def test_a_single_store_is_still_checked_by_check_invariants(tmp_path: Path) -> None:
    async def run() -> Deployment:
        deployment = await open_demo_deployment(f"sqlite:///{tmp_path}/demo.db")
        await run_demo(deployment)
        return deployment

    deployment = asyncio.run(run())
    try:
        store = deployment.store("order")
        assert asyncio.run(check_invariants(store)) == []
    finally:
        asyncio.run(deployment.close())
