"""A message that kills its consumer every time is dead-lettered, and harms no other message.

Real processes: a worker whose handler SIGKILLs its own process on the poison message is started
again and again on the same file, as a supervisor would, until everything has settled.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import servers

from sagaline.backends.sqlite import SqliteDatabase

MAX_ATTEMPTS = 3

#: The service of both tests: its handlers SIGKILL their own process on the key POISON.
VICTIM = textwrap.dedent(
    f"""
    import asyncio, os, signal, sys

    from sagaline import Command, Event, RetryPolicy, Runtime, Service, System
    from sagaline.backends import open_bus
    from sagaline.backends.sqlite import SqliteDatabase


    class PoisonTestCommand(Command, kw_only=True, frozen=True):
        key: str

        def correlation_key(self) -> str:
            return self.key


    class PoisonTestEvent(Event, kw_only=True, frozen=True):
        key: str

        def correlation_key(self) -> str:
            return self.key


    victim = Service("victim", retry=RetryPolicy(max_attempts={MAX_ATTEMPTS}, initial_delay=0.01))


    @victim.handles(PoisonTestCommand)
    async def on_command(ctx, command):
        if command.key == "POISON":
            os.kill(os.getpid(), signal.SIGKILL)
        await ctx.tx.put_document("victim.commands", command.key, {{"key": command.key}}, 0)


    @victim.subscribes(PoisonTestEvent)
    async def on_event(ctx, event):
        if event.key == "POISON":
            os.kill(os.getpid(), signal.SIGKILL)
        await ctx.tx.put_document("victim.events", event.key, {{"key": event.key}}, 0)
    """
)

WORKER = VICTIM + textwrap.dedent(
    """
    async def main(path, mode):
        db = SqliteDatabase(f"sqlite:///{path}", lease_seconds=0.2)
        system = System([victim])
        if mode == "submit":
            for key in ("A", "B", "POISON", "C", "D"):
                await system.submit(db, PoisonTestCommand(key=key))
                await system.submit(db, PoisonTestEvent(key=key))
            return

        def settled():
            lag = db.sync.subscription_lag()
            return not db.sync.pending_counts() and bool(lag) and all(v == 0 for v in lag.values())

        await Runtime(db, system).run_until(settled, timeout=30)
        await db.close()


    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def run_until_it_lives(run: Callable[[], subprocess.CompletedProcess[bytes]]) -> int:
    """Start the worker again each time the poison kills it, as a supervisor would, until it
    settles everything; how many times it was killed (two poisons: at most 2 x (MAX + 1))."""
    kills = 0
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "the worker never settled"
        finished = run()
        if finished.returncode == 0:
            return kills
        assert finished.returncode == -signal.SIGKILL, finished.stderr
        kills += 1
        assert kills <= 2 * (MAX_ATTEMPTS + 1), "the poison was never set aside"


def test_a_message_that_kills_its_consumer_is_dead_lettered_alone(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store = tmp_path / "poison.db"
    submit = subprocess.run(
        [sys.executable, str(script), str(store), "submit"], capture_output=True, timeout=60
    )
    assert submit.returncode == 0, submit.stderr
    kills = run_until_it_lives(
        lambda: subprocess.run(
            [sys.executable, str(script), str(store), "run"], capture_output=True, timeout=60
        )
    )

    db = SqliteDatabase(f"sqlite:///{store}")
    try:
        dead = db.sync.dead_letters()
        assert {(d.consumer, d.envelope.message_type) for d in dead} == {
            ("victim", "PoisonTestCommand"),
            ("victim", "PoisonTestEvent"),
        }
        for letter in dead:
            assert letter.envelope.correlation_id == "POISON"
            assert "without completing" in letter.reason
            assert letter.attempts == MAX_ATTEMPTS
        # Each poison killed the worker on every delivery but the last, which set it aside.
        assert kills >= 2 * MAX_ATTEMPTS
        for namespace in ("victim.commands", "victim.events"):
            handled = {row["key"] for row in db.sync.query_documents(namespace)}
            assert handled == {"A", "B", "C", "D"}
    finally:
        db.connection.close()


# ------------------------------------------------------------------------------ on a broker

#: Messages of the broker test: the poison among others of its partition, published at once.
BROKER_KEYS = [f"K-{n}" for n in range(40)]

WORKER_ON_BUS = VICTIM + textwrap.dedent(
    f"""
    async def main(path, bus_url, mode):
        system = System([victim])
        consumers = victim.consumers()
        # NATS gives a dead consumer's messages out again after ack_wait: short, for the test.
        options = dict(ack_wait=1.0, lease_seconds=2.0) if bus_url.startswith("nats") else {{}}
        bus = open_bus(bus_url, **options)
        try:
            if mode == "submit":
                await bus.prepare(consumers, system.routes)
                keys = {BROKER_KEYS[:20]!r} + ["POISON"] + {BROKER_KEYS[20:]!r}
                await system.submit_many(bus, [PoisonTestCommand(key=k) for k in keys])
                await system.submit_many(bus, [PoisonTestEvent(key=k) for k in keys])
                return
            if mode == "clean":
                delete = getattr(bus, "delete_topology", None)
                if delete is not None:
                    await (delete(consumers) if "amqp" in bus_url else delete())
                return
            db = SqliteDatabase(f"sqlite:///{{path}}", outbox=True)

            def settled():
                handled = sum(
                    len(db.sync.query_documents(f"victim.{{kind}}"))
                    for kind in ("commands", "events")
                )
                return handled == 2 * {len(BROKER_KEYS)} and len(db.sync.dead_letters()) == 2

            await Runtime(db, system, bus=bus, poll_interval=0.05).run_until(settled, timeout=60)
            await db.close()
        finally:
            await bus.close()


    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
    """
)


@pytest.fixture(params=["rabbitmq", "nats"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "rabbitmq":
        yield from servers.rabbitmq_vhost()
    else:
        yield from servers.nats_prefix()


def test_on_a_broker_only_the_message_that_kills_its_consumer_is_dead_lettered(
    tmp_path: Path, broker_url: str
) -> None:
    """A dying consumer gives back every message it held, and the broker counts a delivery for
    each: only the one that was handed to its handler each time is set aside."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_ON_BUS)
    store = tmp_path / "victim.db"

    def worker(mode: str) -> subprocess.CompletedProcess[bytes]:
        argv = [sys.executable, str(script), str(store), broker_url, mode]
        return subprocess.run(argv, capture_output=True, timeout=120)

    try:
        submit = worker("submit")
        assert submit.returncode == 0, submit.stderr
        run_until_it_lives(lambda: worker("run"))
        db = SqliteDatabase(f"sqlite:///{store}")
        try:
            dead = db.sync.dead_letters()
            # Each once, though a process that dies may not have acked its dead letter.
            assert sorted((d.envelope.message_type, d.envelope.correlation_id) for d in dead) == [
                ("PoisonTestCommand", "POISON"),
                ("PoisonTestEvent", "POISON"),
            ]
            assert all("without completing" in d.reason for d in dead)
            for namespace in ("victim.commands", "victim.events"):
                keys = {row["key"] for row in db.sync.query_documents(namespace)}
                assert keys == set(BROKER_KEYS)
            # Counts of handlings are kept until their message is handled; a dead letter keeps its
            # own, so that a delivery of it again (its ack lost) goes back to the dead letters.
            counted = db.connection.execute("SELECT message_id FROM handling_starts").fetchall()
            assert {row[0] for row in counted} == {d.envelope.message_id for d in dead}
        finally:
            db.connection.close()
    finally:
        worker("clean")
