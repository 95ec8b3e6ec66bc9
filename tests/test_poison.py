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
from pathlib import Path

from sagaline.backends.sqlite import SqliteDatabase

MAX_ATTEMPTS = 3

WORKER = textwrap.dedent(
    f"""
    import asyncio, os, signal, sys

    from sagaline import Command, Event, RetryPolicy, Runtime, Service, System
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
        await ctx.tx.put_document("victim.commands", command.key, {{"ok": True}}, 0)


    @victim.subscribes(PoisonTestEvent)
    async def on_event(ctx, event):
        if event.key == "POISON":
            os.kill(os.getpid(), signal.SIGKILL)
        await ctx.tx.put_document("victim.events", event.key, {{"ok": True}}, 0)


    async def main(path, mode):
        db = SqliteDatabase(f"sqlite:///{{path}}", lease_seconds=0.2)
        system = System([victim])
        if mode == "submit":
            for key in ("A", "B", "POISON", "C", "D"):
                await system.submit(db, PoisonTestCommand(key=key))
                await system.submit(db, PoisonTestEvent(key=key))
            return

        def settled():
            lag = db.subscription_lag()
            return not db.pending_counts() and bool(lag) and all(v == 0 for v in lag.values())

        await Runtime(db, system).run_until(settled, timeout=30)
        await db.close()


    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_a_message_that_kills_its_consumer_is_dead_lettered_alone(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store = tmp_path / "poison.db"
    submit = subprocess.run(
        [sys.executable, str(script), str(store), "submit"], capture_output=True, timeout=60
    )
    assert submit.returncode == 0, submit.stderr
    kills = 0
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the worker never settled"
        run = subprocess.run(
            [sys.executable, str(script), str(store), "run"], capture_output=True, timeout=60
        )
        if run.returncode == 0:
            break
        assert run.returncode == -signal.SIGKILL, run.stderr
        kills += 1
        assert kills <= 2 * (MAX_ATTEMPTS + 1), "the poison was never set aside"

    db = SqliteDatabase(f"sqlite:///{store}")
    try:
        dead = db.dead_letters()
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
            handled = {row["ok"] for row in db.query_documents(namespace)}
            assert handled == {True}
            assert len(db.query_documents(namespace)) == 4
    finally:
        db.connection.close()
