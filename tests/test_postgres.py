"""PostgreSQL as store and bus: what only a server shows (its conformance is in ``conformance/``).

Each test run gets a database of its own on the server (dropped at the end) and each test its own
schemas in it. Without a reachable server the tests are skipped, unless
``SAGALINE_REQUIRE_SERVICES=1``: then they fail.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import servers

from sagaline.backends import open_backend
from sagaline.backends.postgres import PostgresDatabase, migrate
from sagaline.backends.postgres.schema import SCHEMA_VERSION
from sagaline.errors import ConcurrencyError, ConfigurationError, StoreUnavailable
from sagaline.handling import Context, Runtime, Service, System
from sagaline.messages import Envelope
from sagaline.orders.demo import DEMO_ORDER_IDS, run_demo
from sagaline.orders.read import ORDER_VIEW
from sagaline.ports import Backend, BrokerBus, Outbox, Outcome, Reads, RetryPolicy
from sagaline.testing.conformance import (
    ConformanceCommand,
    ConformanceEvent,
    ConformanceStoreEvent,
    queue_service,
    subscriber,
)
from sagaline.testing.conformance.messages import events
from sagaline.testing.conformance.store import Boom, saga


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of this test run's own on the PostgreSQL server."""
    yield from servers.postgres_database()


def schema_name(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def open_pg(pg_url: str) -> Iterator[Callable[..., PostgresDatabase]]:
    """Opens PostgresDatabase objects on the run's database; all are closed afterwards."""
    opened: list[PostgresDatabase] = []

    def make(**options: Any) -> PostgresDatabase:
        db = PostgresDatabase(pg_url, **options)
        opened.append(db)
        return db

    yield make
    for db in opened:
        asyncio.run(db.close())


# ------------------------------------------------------------------------------ configuration


def test_the_url_scheme_opens_a_postgres_backend(pg_url: str) -> None:
    for scheme in ("postgresql", "postgres"):
        backend = open_backend(pg_url.replace("postgresql", scheme, 1))
        assert isinstance(backend, PostgresDatabase)
        assert isinstance(backend, Backend)
        assert isinstance(backend, BrokerBus)
        assert isinstance(backend, Outbox)


def test_schema_names_are_checked_and_passwords_never_shown() -> None:
    for bad in ('x"; DROP TABLE y; --', "1abc", "a b", ""):
        with pytest.raises(ConfigurationError):
            PostgresDatabase("postgresql://u@h/db", schema=bad)
    with pytest.raises(ConfigurationError):
        PostgresDatabase("postgresql://u@h/db", bus_schema="a-b")
    with pytest.raises(ConfigurationError) as refused:
        PostgresDatabase("mysql://user:s3cret@h/db")
    assert "s3cret" not in str(refused.value)
    db = PostgresDatabase("postgresql://user:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in repr(db)

    async def connect() -> None:
        await db.open()

    with pytest.raises(StoreUnavailable) as failed:
        asyncio.run(connect())
    assert "s3cret" not in str(failed.value)
    assert "127.0.0.1" in str(failed.value)


def test_a_missing_database_is_one_clear_line_without_the_password(pg_url: str) -> None:
    """The store raises StoreUnavailable saying why; the command line prints it and exits 1."""
    parts = urlsplit(pg_url)
    name = schema_name("sagaline_missing")
    missing = urlunsplit(
        parts._replace(netloc=f"{parts.username}:s3cret@{parts.hostname}:{parts.port or 5432}")
    ).replace(parts.path, f"/{name}")
    shown = missing.replace(":s3cret@", ":***@")
    expected = f'PostgreSQL at {shown} refused the connection: database "{name}" does not exist'

    async def connect() -> None:
        await PostgresDatabase(missing).open()

    with pytest.raises(StoreUnavailable) as refused:
        asyncio.run(connect())
    assert str(refused.value) == expected
    done = subprocess.run(
        [sys.executable, "-m", "sagaline", "orders", "--store", missing],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"error: {expected}\n")


def test_migration_is_idempotent_and_safe_from_several_processes_at_once(pg_url: str) -> None:
    schema, bus_schema = schema_name("mig"), schema_name("migbus")

    async def race() -> str | None:
        # Six connections at once, as six processes starting together.
        await asyncio.gather(*(migrate(pg_url, schema, bus_schema) for _ in range(6)))
        await migrate(pg_url, schema, bus_schema)
        db = PostgresDatabase(pg_url, schema=schema, bus_schema=bus_schema)
        try:
            return await db.get_meta("schema_version")
        finally:
            await db.close()

    assert asyncio.run(race()) == str(SCHEMA_VERSION)
    with psycopg.connect(pg_url) as conn:
        tables = {
            (row[0], row[1])
            for row in conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_schema = ANY(%s)",
                ([schema, bus_schema],),
            )
        }
    assert {
        (schema, t)
        for t in ("inbox", "documents", "sagas", "outbox", "streams", "received", "handling_starts")
    } <= tables
    assert {(bus_schema, t) for t in ("commands", "events", "subscriptions", "members")} <= tables
    assert not {(schema, t) for t in ("commands", "events", "subscriptions")} & tables
    assert not {(bus_schema, t) for t in ("inbox", "documents", "sagas", "outbox")} & tables


@pytest.mark.parametrize(
    ("old", "missing"),
    [
        (1, ["received", "handling_starts", "timers"]),
        (2, ["handling_starts", "timers"]),
        (3, ["timers"]),
    ],
)
def test_an_older_schema_is_upgraded_in_place(pg_url: str, old: int, missing: list[str]) -> None:
    """Version 2 added the table of messages received from clients through a broker, version 3
    the count of handlings of messages received again, version 4 the durable timers."""
    schema, bus_schema = schema_name("old"), schema_name("oldbus")
    asyncio.run(migrate(pg_url, schema, bus_schema))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for table in missing:
            conn.execute(f'DROP TABLE "{schema}".{table}')
        conn.execute(
            f"UPDATE \"{schema}\".meta SET value = %s WHERE key = 'schema_version'", (str(old),)
        )
    asyncio.run(migrate(pg_url, schema, bus_schema))
    with psycopg.connect(pg_url) as conn:
        version = conn.execute(
            f"SELECT value FROM \"{schema}\".meta WHERE key = 'schema_version'"
        ).fetchone()
        found = [
            conn.execute("SELECT to_regclass(%s)", (f'"{schema}".{table}',)).fetchone()
            for table in missing
        ]
    assert version == (str(SCHEMA_VERSION),) == ("4",)
    assert all(row is not None and row[0] is not None for row in found)


def test_a_newer_schema_version_is_refused(open_pg: Callable[..., PostgresDatabase]) -> None:
    schema = schema_name("newer")
    db = open_pg(schema=schema)

    async def scenario() -> None:
        await db.open()  # migrates
        conn = await psycopg.AsyncConnection.connect(db.url, autocommit=True)
        async with conn:
            await conn.execute(
                f"UPDATE \"{schema}\".meta SET value = '99' WHERE key = 'schema_version'"
            )
        with pytest.raises(ConfigurationError, match="upgrade sagaline"):
            await migrate(db.url, schema)

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ the log


def test_the_log_never_skips_a_position_that_commits_late(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    """A unit of work that appended first and commits last is read, in commit order."""
    schema = schema_name("gap")
    first_db, second_db, reader = (
        open_pg(schema=schema),
        open_pg(schema=schema),
        open_pg(schema=schema),
    )

    async def scenario() -> None:
        await reader.open()
        first_open, release_first = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with first_db.transaction() as tx:
                await tx.append("Early-1", 0, events("K-1", 1))
                first_open.set()
                await release_first.wait()

        task = asyncio.create_task(first())
        await first_open.wait()
        async with second_db.transaction() as tx:
            await tx.append("Late-1", 0, events("K-2", 1))
        seen = await reader.read_log(0)
        assert [e.stream for e in seen] == ["Late-1"]
        cursor = seen[-1].position
        release_first.set()
        await task
        after = await reader.read_log(cursor)
        assert [e.stream for e in after] == ["Early-1"]
        everything = await reader.read_log(0)
        assert [e.stream for e in everything] == ["Late-1", "Early-1"]
        assert [e.position for e in everything] == [cursor, cursor + 1]

    asyncio.run(scenario())


def test_a_reader_does_not_pass_a_position_held_by_a_committing_appender(
    pg_url: str, open_pg: Callable[..., PostgresDatabase]
) -> None:
    """While an appender holds the log's head, a later appender waits, and readers see neither;
    then both, in order, with nothing skipped."""
    schema = schema_name("gap")
    db, reader = open_pg(schema=schema), open_pg(schema=schema)
    quoted = f'"{schema}"'

    async def scenario() -> None:
        await reader.open()  # migrates
        await db.open()
        holder = await psycopg.AsyncConnection.connect(pg_url)
        try:
            # Take the head as a committing appender does, and write one event at it.
            await holder.execute(f"SELECT position FROM {quoted}.log_head FOR UPDATE")
            await holder.execute(
                f"INSERT INTO {quoted}.events (position, message_id, type, body,"
                " correlation_id, timestamp, part) VALUES (1, 'held-1', 'ConformanceStoreEvent',"
                " '{}', 'K-1', '2020-01-01T00:00:00Z', 0)"
            )
            await holder.execute(f"UPDATE {quoted}.log_head SET position = 1")

            async def later() -> None:
                async with db.transaction() as tx:
                    await tx.emit(events("K-2", 1), {})

            task = asyncio.create_task(later())
            while not await reader.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ):
                await asyncio.sleep(0.01)
            assert await reader.read_log(0) == []
            await holder.commit()
            await task
        finally:
            await holder.close()
        log = await reader.read_log(0)
        assert [e.envelope.message_id for e in log[:1]] == ["held-1"]
        assert [e.position for e in log] == [1, 2]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ wake-ups


def test_a_waiting_consumer_is_woken_by_a_commit_in_another_process(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    schema = schema_name("wake")
    waiter, sender = open_pg(schema=schema), open_pg(schema=schema)
    system = System(
        [queue_service("alpha", ConformanceCommand), subscriber("watcher", ConformanceEvent)]
    )
    [queue] = system.services["alpha"].consumers()
    [subscription] = system.services["watcher"].consumers()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for spec, message in (
            (queue, ConformanceCommand(key="K-1", seq=1)),
            (subscription, ConformanceEvent(key="K-1", seq=2)),
        ):
            assert (await waiter.claim(spec, "m-1", 10)).deliveries == []
            started = loop.time()
            waiting = asyncio.create_task(waiter.wait_for_work(spec, 30.0))
            await asyncio.sleep(0)
            await system.submit(sender, message)
            await asyncio.wait_for(waiting, 10.0)
            assert loop.time() - started < 10.0
            assert waiter._wakeup(spec).is_set()
            batch = await waiter.claim(spec, "m-1", 10)
            assert [d.envelope.decode() for d in batch.deliveries] == [message]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ competing members


def test_two_members_compete_for_a_queue_and_none_is_handled_twice(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    schema = schema_name("compete")
    handled: Counter[str] = Counter()
    order: dict[str, list[int]] = {}

    async def handler(ctx: Any, command: ConformanceCommand) -> None:
        handled[ctx.envelope.message_id] += 1
        order.setdefault(command.key, []).append(command.seq)
        await asyncio.sleep(0.001)

    service = queue_service("alpha", ConformanceCommand)
    service.command_handlers["ConformanceCommand"] = handler
    system = System([service])
    first, second = open_pg(schema=schema), open_pg(schema=schema)

    async def scenario() -> None:
        sent = await system.submit_many(
            first, [ConformanceCommand(key=f"K-{i % 60}", seq=i) for i in range(600)]
        )
        runtimes = [
            Runtime(db, system, member=f"member-{n}", batch_size=20, poll_interval=0.05)
            for n, db in enumerate((first, second))
        ]

        async def drained() -> bool:
            return not await first.pending_counts()

        tasks = [asyncio.create_task(r.run_until(drained, timeout=60)) for r in runtimes]
        await asyncio.gather(*tasks)
        assert set(handled) == {e.message_id for e in sent}
        assert max(handled.values()) == 1
        assert all(r.handled > 0 for r in runtimes)
        for seqs in order.values():
            assert seqs == sorted(seqs)

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ outbox and broker


def test_publish_is_idempotent_on_message_id_and_replay_streams_the_log(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    bus = open_pg(schema=schema_name("broker"))
    system = System(
        [queue_service("alpha", ConformanceCommand), subscriber("watcher", ConformanceEvent)]
    )
    commands = [Envelope.wrap(ConformanceCommand(key="K-1", seq=i)) for i in range(3)]
    published = [Envelope.wrap(ConformanceEvent(key=f"K-{i}", seq=i)) for i in range(5)]

    async def scenario() -> None:
        await bus.prepare([], system.routes)
        await bus.publish(commands + published[:3], system.routes)
        await bus.publish(commands + published, system.routes)  # a relay publishing again
        assert await bus.pending_counts() == {"alpha": 3}
        replayed = [e async for e in bus.replay(0)]
        assert [e.envelope.message_id for e in replayed] == [e.message_id for e in published]
        assert [e.position for e in replayed] == [1, 2, 3, 4, 5]
        assert [e.envelope.message_id async for e in bus.replay(3)] == [
            e.message_id for e in published[3:]
        ]
        [spec] = system.services["alpha"].consumers()
        batch = await bus.claim(spec, "m-1", 10)
        assert [d.envelope.message_id for d in batch.deliveries] == [commands[0].message_id]
        await bus.complete(batch, [(Outcome.ACK, None)])
        assert await bus.pending_counts() == {"alpha": 2}

    asyncio.run(scenario())


def test_a_service_schema_and_the_bus_schema_are_kept_apart(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    bus_schema = schema_name("bus")
    order = open_pg(schema=schema_name("order"), bus_schema=bus_schema)
    payment = open_pg(schema=schema_name("payment"), bus_schema=bus_schema)
    system = System(
        [queue_service("alpha", ConformanceCommand), subscriber("watcher", ConformanceEvent)]
    )

    async def scenario() -> None:
        async with order.transaction() as tx:
            await tx.append("Order-1", 0, events("K-1", 1))
            await tx.put_document("ns", "k", {"amount": Decimal("75.50")}, 0)
        await system.submit(order, ConformanceCommand(key="K-1", seq=1))
        # The bus is shared: the other service sees the log and the queue ...
        assert [e.stream for e in await payment.read_log()] == ["Order-1"]
        assert await payment.pending_counts() == {"alpha": 1}
        # ... but not the order service's own state.
        assert await payment.get_document("ns", "k") is None
        async with payment.transaction() as tx:
            assert await tx.read_stream("Order-1") == []
        document = await order.get_document("ns", "k")
        assert document is not None and str(document.data["amount"]) == "75.50"
        async with order.transaction() as tx:
            stored = await tx.read_stream("Order-1")
        assert [(e.stream, e.version, e.position) for e in stored] == [("Order-1", 1, 1)]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ the order flow


def test_the_demo_orders_settle_on_postgres(open_pg: Callable[..., PostgresDatabase]) -> None:
    db = open_pg(schema=schema_name("demo"))

    async def scenario() -> None:
        await db.open()
        run = await run_demo(db, timeout=60)
        assert run.order_ids == list(DEMO_ORDER_IDS)
        statuses = {}
        for order_id in DEMO_ORDER_IDS:
            view = await db.get_document(ORDER_VIEW, order_id)
            assert view is not None
            statuses[order_id] = view.data["status"]
        assert statuses == {
            "ORD-12345": "CONFIRMED",
            "ORD-12346": "CANCELLED",
            "ORD-12347": "CANCELLED",
        }
        assert await db.saga_counts() == {"COMPLETED": 1, "COMPENSATED": 2}
        assert await db.dead_letters() == []
        assert await db.is_idle()

    asyncio.run(scenario())


def test_tools_called_inside_a_unit_of_work_commit_with_it(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    """A projection rebuild swaps namespaces and moves the cursor inside its transaction."""
    db = open_pg(schema=schema_name("swap"))

    async def scenario() -> None:
        async with db.transaction() as tx:
            await tx.put_document("view", "a", {"old": True}, 0)
            await tx.put_document("view.rebuild", "a", {"old": False}, 0)
        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                await tx.delete_namespace("view")
                db.rename_namespace("view.rebuild", "view")
                db.reset_subscription("projection", 7)
                raise RuntimeError("rolled back")
        assert await db.query_documents("view") == [{"old": True}]
        async with db.transaction() as tx:
            await tx.delete_namespace("view")
            db.rename_namespace("view.rebuild", "view")
            db.reset_subscription("projection", 7)
            assert await db.query_documents("view") == [{"old": True}]
        assert await db.query_documents("view") == [{"old": False}]
        assert await db.query_documents("view.rebuild") == []
        assert await db.execute(
            f'SELECT DISTINCT position FROM "{db.names.bus_name}".subscriptions'
            " WHERE subscriber = %s",
            ("projection",),
        ) == [(7,)]

    asyncio.run(scenario())


def test_a_projection_swap_outside_a_unit_of_work_is_refused(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    """It joins a unit of work of the database; there is no connection of its own to run on."""
    db = open_pg(schema=schema_name("swap"))
    with pytest.raises(RuntimeError, match="unit of work"):
        db.rename_namespace("view.rebuild", "view")
    with pytest.raises(RuntimeError, match="unit of work"):
        db.reset_subscription("projection", 7)


def test_demo_schemas_are_dropped_only_when_marked(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    schema, bus_schema = schema_name("demo"), schema_name("demobus")
    db = open_pg(schema=schema, bus_schema=bus_schema)

    async def scenario() -> None:
        assert await db.drop_if_marked("demo")  # nothing there yet
        async with db.transaction() as tx:
            await tx.put_document("ns", "k", {"n": 1}, 0)
        assert not await db.drop_if_marked("demo")
        assert await db.get_document("ns", "k") is not None
        await db.set_meta("demo", "1")
        assert await db.get_meta("demo") == "1"
        assert await db.drop_if_marked("demo")
        await db.open()
        assert await db.get_document("ns", "k") is None
        assert await db.get_meta("demo") is None

    asyncio.run(scenario())


def test_the_listener_comes_back_after_its_connection_is_killed(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    schema = schema_name("relisten")
    waiter, sender = open_pg(schema=schema), open_pg(schema=schema)
    system = System([queue_service("alpha", ConformanceCommand)])
    [spec] = system.services["alpha"].consumers()

    async def scenario() -> None:
        await waiter.open()
        listener = waiter._listener_conn
        assert listener is not None
        killed = listener.info.backend_pid
        await sender.execute("SELECT pg_terminate_backend(%s)", (killed,))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (
            waiter._listener_conn is None
            or waiter._listener_conn.closed
            or waiter._listener_conn.info.backend_pid == killed
        ):
            assert loop.time() < deadline, "the listener did not reconnect"
            await asyncio.sleep(0.05)
        assert (await waiter.claim(spec, "m-1", 10)).deliveries == []
        waiting = asyncio.create_task(waiter.wait_for_work(spec, 30.0))
        await asyncio.sleep(0)
        await system.submit(sender, ConformanceCommand(key="K-1", seq=1))
        await asyncio.wait_for(waiting, 10.0)
        assert waiter._wakeup(spec).is_set()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ the unit of work


async def _sagas_of(db: PostgresDatabase) -> list[tuple[Any, ...]]:
    return await db.execute(f"SELECT saga_id, version FROM {db.names.store}.sagas ORDER BY saga_id")


def test_a_read_after_a_write_in_one_unit_of_work_sees_the_write(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    """The identity map answers repeated reads: with this unit's writes, as copies."""
    db = open_pg(schema=schema_name("uow"))

    async def scenario() -> None:
        async with db.transaction() as tx:
            assert await tx.put_document("ns", "k", {"n": 1, "items": [1]}, 0) == 1
            first = await tx.get_document("ns", "k")
            assert first is not None and (first.data, first.version) == ({"n": 1, "items": [1]}, 1)
            first.data["items"].append(2)  # a reader's copy: the unit's state is not touched
            assert await tx.put_document("ns", "k", {"n": 2, "items": [1]}, 1) == 2
            again = await tx.get_document("ns", "k")
            assert again is not None and (again.data, again.version) == ({"n": 2, "items": [1]}, 2)
            with pytest.raises(ConcurrencyError):
                await tx.put_document("ns", "k", {"n": 9}, 1)  # checked against the map at once

            record = saga("order:ORD-1")
            await tx.put_saga(record)
            loaded = await tx.get_saga("order:ORD-1")
            assert loaded is not None and (loaded.version, loaded.status) == (1, "RUNNING")
            loaded.status = "COMPLETED"
            await tx.put_saga(loaded)
            stale = await tx.get_saga("order:ORD-1")
            assert stale is not None and (stale.version, stale.status) == (2, "COMPLETED")
            with pytest.raises(ConcurrencyError):
                await tx.put_saga(record)  # still at version 1 in the caller's hands

            assert await tx.read_stream("Stream-1") == []
            await tx.append("Stream-1", 0, events("K-1", 1, 2))
            assert [e.version for e in await tx.read_stream("Stream-1")] == [1, 2]
            with pytest.raises(ConcurrencyError):
                await tx.append("Stream-1", 1, events("K-1", 3))
            await tx.append("Blind-1", 0, events("K-2", 1))  # appended without reading first
            assert [e.version for e in await tx.read_stream("Blind-1")] == [1]

            await tx.record_inbox_many("consumer", ["m-1", "m-2"])
            assert await tx.seen("consumer", ["m-1", "m-3"]) == {"m-1"}
            assert await tx.record_inbox("consumer", "m-2") is False
        document = await db.get_document("ns", "k")
        assert document is not None and (document.data, document.version) == (
            {"n": 2, "items": [1]},
            2,
        )
        assert await _sagas_of(db) == [("order:ORD-1", 2)]
        assert [e.version for e in await db.read_stream("Stream-1")] == [1, 2]
        assert [e.stream for e in await db.read_log()] == ["Stream-1", "Stream-1", "Blind-1"]
        async with db.transaction() as tx:
            assert await tx.seen("consumer", ["m-1", "m-2", "m-3"]) == {"m-1", "m-2"}

    asyncio.run(scenario())


@pytest.mark.parametrize("conflict", ["document", "saga", "stream", "new-document"])
def test_a_conflict_found_at_the_flush_raises_and_commits_nothing_of_the_unit(
    open_pg: Callable[..., PostgresDatabase], conflict: str
) -> None:
    """Another unit of work changes a row between this unit's read and its commit."""
    schema = schema_name("flush")
    db, other = open_pg(schema=schema), open_pg(schema=schema)

    async def scenario() -> None:
        async with db.transaction() as tx:
            await tx.put_document("ns", "k", {"n": 1}, 0)
            await tx.put_saga(saga("order:ORD-1"))
            await tx.append("Stream-1", 0, events("K-1", 1))
        log_before = await db.read_log()
        system = System([queue_service("alpha", ConformanceCommand)])
        with pytest.raises(ConcurrencyError) as raised:
            async with db.transaction() as tx:
                document = await tx.get_document("ns", "k")
                record = await tx.get_saga("order:ORD-1")
                stored = await tx.read_stream("Stream-1")
                assert document is not None and record is not None
                # Everything else this unit does must be lost with it.
                await tx.put_document("ns", "other", {"n": 1}, 0)
                await tx.record_inbox_many("consumer", ["m-1"])
                await tx.emit([Envelope.wrap(ConformanceCommand(key="K-1", seq=1))], system.routes)
                await tx.emit(events("K-1", 2), {})
                await tx.dead_letter("consumer", events("K-1", 3)[0], "no reason", 1)
                # The other unit commits in between: this one read before it.
                async with other.transaction() as racer:
                    if conflict == "document":
                        await racer.put_document("ns", "k", {"n": 2}, 1)
                    elif conflict == "saga":
                        winner = await racer.get_saga("order:ORD-1")
                        assert winner is not None
                        await racer.put_saga(winner)
                    elif conflict == "stream":
                        await racer.append("Stream-1", 1, events("K-1", 4))
                    else:
                        await racer.put_document("ns", "new", {"n": 2}, 0)
                await tx.put_document("ns", "k", {"n": 3}, document.version)
                await tx.put_saga(record)
                await tx.append("Stream-1", len(stored), events("K-1", 5))
                await tx.put_document("ns", "new", {"n": 3}, 0)
        expected = {
            "document": "document ns/k is not at version 1",
            "saga": "saga 'order:ORD-1' is not at version 1",
            "stream": "stream 'Stream-1' has moved past version 1",
            "new-document": "document ns/new already exists",
        }[conflict]
        assert str(raised.value) == expected
        assert await db.get_document("ns", "other") is None
        assert await db.dead_letters() == []
        assert await db.pending_counts() == {}
        kept = await db.read_log()
        assert [e.envelope.message_id for e in kept][: len(log_before)] == [
            e.envelope.message_id for e in log_before
        ]
        assert all(e.envelope.correlation_id == "K-1" for e in kept)
        assert len(kept) == len(log_before) + (1 if conflict == "stream" else 0)
        async with db.transaction() as tx:
            assert await tx.seen("consumer", ["m-1"]) == set()

    asyncio.run(scenario())


def test_a_savepoint_rollback_discards_its_pending_writes_and_restores_the_identity_map(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    db = open_pg(schema=schema_name("savepoint"))

    async def scenario() -> None:
        async with db.transaction() as tx:
            await tx.put_document("ns", "a", {"n": 1}, 0)
            await tx.put_saga(saga("order:ORD-1"))
            await tx.append("Stream-1", 0, events("K-1", 1))
            with pytest.raises(Boom):
                async with tx.savepoint():
                    assert await tx.put_document("ns", "a", {"n": 2}, 1) == 2
                    await tx.put_document("ns", "b", {"n": 1}, 0)
                    record = await tx.get_saga("order:ORD-1")
                    assert record is not None
                    record.status = "COMPENSATING"
                    await tx.put_saga(record)
                    await tx.append("Stream-1", 1, events("K-1", 2))
                    await tx.record_inbox_many("consumer", ["m-1"])
                    await tx.emit(events("K-1", 3), {})
                    await tx.dead_letter("consumer", events("K-1", 4)[0], "no reason", 1)
                    raise Boom
            document = await tx.get_document("ns", "a")
            assert document is not None and (document.data, document.version) == ({"n": 1}, 1)
            assert await tx.get_document("ns", "b") is None
            record = await tx.get_saga("order:ORD-1")
            assert record is not None and (record.status, record.version) == ("RUNNING", 1)
            assert [e.version for e in await tx.read_stream("Stream-1")] == [1]
            assert await tx.seen("consumer", ["m-1"]) == set()
            # The unit goes on from the state before the savepoint.
            async with tx.savepoint():
                assert await tx.put_document("ns", "a", {"n": 3}, 1) == 2
                assert await tx.append("Stream-1", 1, events("K-1", 5)) == 2
        document = await db.get_document("ns", "a")
        assert document is not None and (document.data, document.version) == ({"n": 3}, 2)
        assert await db.get_document("ns", "b") is None
        assert await _sagas_of(db) == [("order:ORD-1", 1)]
        assert await db.execute(f"SELECT count(*) FROM {db.names.store}.saga_history") == [(0,)]
        kept = [ConformanceStoreEvent(key="K-1", seq=seq) for seq in (1, 5)]
        assert [e.envelope.decode() for e in await db.read_stream("Stream-1")] == kept
        assert [e.envelope.decode() for e in await db.read_log()] == kept
        assert await db.dead_letters() == []

    asyncio.run(scenario())


def test_a_conflict_inside_a_savepoint_is_raised_there_and_the_rest_commits(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    """The careful pass handles each message under a savepoint: a write that conflicts in the
    database must fail that message's savepoint, not the commit of the whole batch."""
    schema = schema_name("careful")
    db, other = open_pg(schema=schema), open_pg(schema=schema)

    async def scenario() -> None:
        async with other.transaction() as tx:
            await tx.put_document("ns", "taken", {"by": "other"}, 0)
        async with db.transaction() as tx:
            with pytest.raises(ConcurrencyError, match="already exists"):
                async with tx.savepoint():
                    await tx.put_document("ns", "mine", {"n": 1}, 0)
                    await tx.put_document("ns", "taken", {"by": "me"}, 0)  # a blind write
            async with tx.savepoint():
                await tx.put_document("ns", "kept", {"n": 1}, 0)
            assert await tx.get_document("ns", "mine") is None
        assert await db.get_document("ns", "mine") is None
        kept = await db.get_document("ns", "kept")
        taken = await db.get_document("ns", "taken")
        assert kept is not None and taken is not None and taken.data == {"by": "other"}

    asyncio.run(scenario())


def test_units_of_work_that_update_one_hot_document_queue_on_its_lock(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    """Once a namespace is updated, reads take the row lock: a second unit of work waits for
    the first to commit and reads its version, instead of failing at its own commit."""
    schema = schema_name("hot")
    first_db, second_db = open_pg(schema=schema), open_pg(schema=schema)

    async def scenario() -> None:
        async with first_db.transaction() as tx:
            await tx.put_document("stock", "P-1", {"n": 0}, 0)
        for db in (first_db, second_db):
            async with db.transaction() as tx:
                current = await tx.get_document("stock", "P-1")
                assert current is not None
                await tx.put_document("stock", "P-1", {"n": current.data["n"] + 1}, current.version)
            assert "stock" in db.locked_namespaces
        holding, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with first_db.transaction() as tx:
                current = await tx.get_document("stock", "P-1")
                assert current is not None
                holding.set()
                await release.wait()
                await tx.put_document("stock", "P-1", {"n": current.data["n"] + 1}, current.version)

        async def second() -> None:
            await holding.wait()
            async with second_db.transaction() as tx:
                current = await tx.get_document("stock", "P-1")  # waits for the first's commit
                assert current is not None and current.version == 4
                await tx.put_document("stock", "P-1", {"n": current.data["n"] + 1}, current.version)

        tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
        await holding.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await second_db.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ):
            assert loop.time() < deadline, "the second unit of work did not wait for the lock"
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        document = await first_db.get_document("stock", "P-1")
        assert document is not None and (document.data, document.version) == ({"n": 4}, 5)

    asyncio.run(scenario())


def test_a_queue_and_a_subscription_that_update_one_document_do_not_fail_their_batches(
    open_pg: Callable[..., PostgresDatabase], caplog: pytest.LogCaptureFixture
) -> None:
    """The inventory's case: its command consumer and its event subscription, two concurrent
    transactions, both update one stock document. They queue on its row lock: every message is
    counted once, and no batch fails or is redone."""
    db = open_pg(schema=schema_name("hotflow"))
    service = Service("counter", retry=RetryPolicy(max_attempts=50, initial_delay=0.01))

    async def bump(ctx: Context) -> None:
        current = await ctx.tx.get_document("counter.total", "all")
        data = {"n": 0} if current is None else current.data
        version = 0 if current is None else current.version
        await ctx.tx.put_document("counter.total", "all", {"n": data["n"] + 1}, version)

    @service.handles(ConformanceCommand)
    async def on_command(ctx: Context, command: ConformanceCommand) -> None:
        await bump(ctx)
        ctx.publish(ConformanceEvent(key=command.key, seq=command.seq))

    @service.subscribes(ConformanceEvent)
    async def on_event(ctx: Context, event: ConformanceEvent) -> None:
        await bump(ctx)

    system = System([service])
    count = 400

    async def total() -> int:
        document = await db.get_document("counter.total", "all")
        return 0 if document is None else int(document.data["n"])

    async def scenario() -> None:
        async with db.transaction() as tx:
            await tx.put_document("counter.total", "all", {"n": 0}, 0)
        await system.submit_many(
            db, [ConformanceCommand(key=f"K-{i % 40}", seq=i) for i in range(count)]
        )
        runtime = Runtime(db, system, batch_size=25, poll_interval=0.02)

        async def counted() -> bool:
            return await total() >= 2 * count

        await runtime.run_until(counted, timeout=60)
        assert await total() == 2 * count
        assert await db.dead_letters() == []

    with caplog.at_level(logging.WARNING, logger="sagaline"):
        asyncio.run(scenario())
    assert "counter.total" in db.locked_namespaces
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert failures == []


def test_prefetch_loads_a_batch_of_rows_into_the_identity_map_in_one_round_trip(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    schema = schema_name("prefetch")
    db, other = open_pg(schema=schema), open_pg(schema=schema)

    async def scenario() -> None:
        async with db.transaction() as tx:
            await tx.put_document("ns", "a", {"n": 1}, 0)
            await tx.put_saga(saga("order:ORD-1"))
            await tx.append("Order-1", 0, events("K-1", 1, 2))
        with pytest.raises(ConcurrencyError):
            async with db.transaction() as tx:
                await tx.prefetch(
                    Reads(
                        documents={"ns": {"a", "missing"}},
                        sagas={"order:ORD-1", "order:ORD-2"},
                        streams={"Order-1", "Order-2"},
                    )
                )
                async with other.transaction() as racer:  # after the prefetch: not seen
                    await racer.put_document("ns", "a", {"n": 2}, 1)
                    await racer.put_document("ns", "missing", {"n": 2}, 0)
                document = await tx.get_document("ns", "a")
                assert document is not None and (document.data, document.version) == ({"n": 1}, 1)
                assert await tx.get_document("ns", "missing") is None
                record = await tx.get_saga("order:ORD-1")
                assert record is not None and record.version == 1
                assert await tx.get_saga("order:ORD-2") is None
                assert [e.version for e in await tx.read_stream("Order-1")] == [1, 2]
                assert await tx.read_stream("Order-2") == []
                assert await tx.append("Order-1", 2, events("K-1", 3)) == 3
                await tx.put_document("ns", "a", {"n": 3}, 1)  # stale: fails at the commit
        assert [e.version for e in await db.read_stream("Order-1")] == [1, 2]
        # In a locked namespace the prefetch takes the row locks.
        db.locked_namespaces.add("ns")
        async with db.transaction() as tx:
            await tx.prefetch(Reads(documents={"ns": {"missing", "a"}}))
            free = await other.execute(
                f"SELECT key FROM {db.names.store}.documents WHERE namespace = 'ns'"
                " FOR UPDATE SKIP LOCKED"
            )
            assert free == []
        assert (
            len(await other.execute(f"SELECT key FROM {db.names.store}.documents FOR UPDATE")) == 2
        )

    asyncio.run(scenario())


def test_what_a_batch_declares_it_reads_is_loaded_before_its_first_handler_runs(
    open_pg: Callable[..., PostgresDatabase],
) -> None:
    """A handler registered with ``reads=`` gets the rows of its whole batch loaded up front: in
    a locked namespace, every declared row is already locked when the first message is handled."""
    schema = schema_name("reads")
    db = open_pg(schema=schema)
    db.locked_namespaces.add("ns")
    other = open_pg(schema=schema)
    service = Service("reader")
    free_at_first: list[list[str]] = []
    handled: list[str] = []

    def declare(command: ConformanceCommand, reads: Reads) -> None:
        reads.document("ns", command.key)

    @service.handles(ConformanceCommand, reads=declare)
    async def handle(ctx: Context, command: ConformanceCommand) -> None:
        if not handled:
            rows = await other.execute(
                f"SELECT key FROM {db.names.store}.documents WHERE namespace = 'ns'"
                " ORDER BY key FOR UPDATE SKIP LOCKED"
            )
            free_at_first.append([row[0] for row in rows])
        document = await ctx.tx.get_document("ns", command.key)
        assert document is not None
        await ctx.tx.put_document("ns", command.key, {"n": 1}, document.version)
        handled.append(command.key)

    system = System([service])
    keys = [f"K-{i}" for i in range(5)]

    async def scenario() -> None:
        async with db.transaction() as tx:
            for key in keys:
                await tx.put_document("ns", key, {"n": 0}, 0)
        await system.submit_many(db, [ConformanceCommand(key=key, seq=0) for key in keys])
        runtime = Runtime(db, system, batch_size=50, poll_interval=0.02)
        await runtime.run_until(lambda: len(handled) == len(keys), timeout=60)

    asyncio.run(scenario())
    assert free_at_first == [[]], "the batch's rows were not loaded (and locked) up front"
    assert sorted(handled) == keys


def test_a_batch_that_loses_a_race_at_commit_is_redone_without_failing(
    open_pg: Callable[..., PostgresDatabase], caplog: pytest.LogCaptureFixture
) -> None:
    """Two instances handle commands that append to the same streams: one of them finds, at
    commit, that a stream moved on. Its batch is redone message by message on fresh reads (no
    batch failure is logged), and every command is applied exactly once."""
    schema = schema_name("race")
    service = Service("appender", retry=RetryPolicy(max_attempts=50, initial_delay=0.01))

    @service.handles(ConformanceCommand)
    async def append(ctx: Context, command: ConformanceCommand) -> None:
        stream = f"S-{command.seq % 3}"
        existing = await ctx.tx.read_stream(stream)
        event = Envelope.wrap(ConformanceEvent(key=command.key, seq=command.seq), source="t")
        await ctx.tx.append(stream, len(existing), [event])

    system = System([service])
    dbs = [open_pg(schema=schema) for _ in range(2)]
    count = 300

    async def appended() -> bool:
        return sum([len(await dbs[0].read_stream(f"S-{n}")) for n in range(3)]) >= count

    async def scenario() -> list[int]:
        # Every command has its own key: the two instances take batches side by side.
        await system.submit_many(
            dbs[0], [ConformanceCommand(key=f"K-{i}", seq=i) for i in range(count)]
        )
        runtimes = [
            Runtime(db, system, member=f"m{n}", batch_size=10, poll_interval=0.01)
            for n, db in enumerate(dbs)
        ]
        await asyncio.gather(*(r.run_until(appended, timeout=120) for r in runtimes))
        return [
            stored.envelope.decode().seq  # type: ignore[attr-defined]
            for n in range(3)
            for stored in await dbs[0].read_stream(f"S-{n}")
        ]

    with caplog.at_level(logging.WARNING, logger="sagaline"):
        seqs = sorted(asyncio.run(scenario()))
    assert seqs == list(range(count))
    assert not [r for r in caplog.records if "batch failed" in r.getMessage()]
