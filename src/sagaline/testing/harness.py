"""A harness that runs an app deterministically: a temporary store, a fake clock, seeded faults.

The app's system runs on a real SQLite file (its inbox, retries, leases and saga records all
real), stepped by one task: every worker claims and handles one batch in a fixed order, until
none has work; then the :class:`~sagaline.clock.FakeClock` is moved to the moment the next retry
or lease falls due, and the stepping goes on. No test sleeps for a backoff.

Faults go through the real message path; only when to inject them is decided, by a
``random.Random(seed)`` the harness owns:

* a duplicate delivery: a command handled and settled is put back on its queue, as a bus that
  lost its acknowledgement delivers it again; the consumer's inbox must absorb it;
* a crash between handling and commit: a batch's unit of work is abandoned just before its
  commit, as if the process died there; its deliveries come again once their leases expire;
* a handler that fails: a chosen message fails its first deliveries, then succeeds; the worker
  retries it after its backoff.

So one seed replays one history (:meth:`Harness.history`), and another seed gives another.
Message ids are not part of the history: they are UUIDv7s made of the machine's time and the
process's random bits, which the harness leaves alone (it does not seed the global ``random``).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from sagaline.app import App, Settings
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.clock import FakeClock
from sagaline.handling import Context, Runtime, System, Worker
from sagaline.messages import Envelope, Message
from sagaline.ports import Batch, Outcome
from sagaline.testing.invariants import Violation, check_app

__all__ = ["Delivered", "Faults", "Harness", "InjectedCrash", "InjectedFailure"]

#: The member name the harness's workers claim as: one process, always the same.
MEMBER = "harness"
#: How far past a lease's expiry the clock is moved: a lease is free once strictly past it.
_PAST = 0.001


class InjectedFailure(RuntimeError):
    """A handler's failure the harness injected (see :attr:`Faults.flaky`)."""


class InjectedCrash(Exception):
    """The harness abandoned a unit of work before its commit (see :attr:`Faults.crashes`)."""


@dataclass(frozen=True)
class Faults:
    """Which faults the harness injects, and how often; its seed decides when.

    Rates are chances between 0 and 1. A message is duplicated at most once and a batch holding
    a message already crashed under is not crashed again, so every run ends. A flaky message
    fails ``flaky_times`` deliveries; ``failing`` makes every message of a type fail its first
    deliveries (``{"ReserveHotelCommand": 2}``). Keep the failures under the consumer's retry
    policy's ``max_attempts`` (a crash spends an attempt too), or the message is dead-lettered.
    """

    #: The chance that a command, once handled and settled, is delivered again.
    duplicates: float = 0.0
    #: The chance that a batch's unit of work is abandoned just before its commit.
    crashes: float = 0.0
    #: The chance that a message's handler fails its first ``flaky_times`` deliveries.
    flaky: float = 0.0
    flaky_times: int = 2
    #: Message types whose every message fails its first N deliveries, by wire name.
    failing: Mapping[str, int] = field(default_factory=dict)


class Delivered(NamedTuple):
    """One delivery the harness saw settled (or crashed under), in the order it happened.

    ``outcome`` is ``handled``, ``duplicate`` (the inbox absorbed it), ``retry``, ``dead``,
    ``skipped`` (held back behind its key's retry) or ``crashed``.
    """

    consumer: str
    message_type: str
    correlation_id: str
    outcome: str


_OUTCOMES = {Outcome.RETRY: "retry", Outcome.DEAD: "dead", Outcome.SKIP: "skipped"}


class Harness:
    """Runs ``app`` on a temporary SQLite store with a fake clock and seeded faults.

    Use it as an async context manager::

        async with Harness(app, seed=7, faults=Faults(duplicates=0.2)) as harness:
            await harness.submit(BookTripCommand(...))
            await harness.run_until_quiet()
            assert await harness.db.saga_counts() == {"COMPLETED": 1}
            assert await harness.check() == []

    ``path`` keeps the store at a file of the caller's (else a temporary directory is removed on
    exit); ``batch_size`` is how many deliveries a worker claims at once.
    """

    def __init__(
        self,
        app: App,
        *,
        seed: int = 0,
        faults: Faults | None = None,
        clock: FakeClock | None = None,
        settings: Settings | None = None,
        path: str | Path | None = None,
        batch_size: int = 20,
    ) -> None:
        self.app = app
        self.seed = seed
        self.faults = faults or Faults()
        self.clock = clock or FakeClock()
        self.rng = random.Random(seed)
        self.system: System = app.system(settings)
        self._path = None if path is None else Path(path)
        self._batch_size = batch_size
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._db: SqliteDatabase | None = None
        self.workers: list[Worker] = []
        self._history: list[Delivered] = []
        # Per batch: what its handlers completed, and what was seen just before its commit.
        self._completed: set[tuple[str, str]] = set()
        self._pending: list[Delivered] = []
        self._crashed: set[str] = set()
        # Per (consumer, message id): how many failures are still to inject, and in which step
        # one was last injected (a failed batch is handled again message by message in the
        # same step: that is one delivery, failed once).
        self._to_fail: dict[tuple[str, str], int] = {}
        self._failed_in: dict[tuple[str, str], int] = {}
        self._considered: set[int] = set()
        self._step = 0
        self._wrap_handlers()

    # Opening and closing ---------------------------------------------------------------------

    async def __aenter__(self) -> Harness:
        await self.open()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the store and the workers, one per consumer of the system, in a fixed order."""
        path = self._path
        if path is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="sagaline-harness-")
            path = Path(self._tempdir.name) / "store.db"
        self._db = SqliteDatabase(f"sqlite:///{path}", clock=self.clock)
        runtime = Runtime(self._db, self.system, member=MEMBER, batch_size=self._batch_size)
        self.workers = runtime.workers
        for worker in self.workers:
            worker.before_commit = self._make_before_commit(worker)

    async def close(self) -> None:
        """Close the store (and remove it, when it is temporary)."""
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    @property
    def db(self) -> SqliteDatabase:
        """The store the app runs on (its queries: ``saga_counts``, ``list_sagas``...)."""
        if self._db is None:
            raise RuntimeError("the harness is not open: use `async with Harness(...)`")
        return self._db

    # Driving the app --------------------------------------------------------------------------

    async def submit(self, message: Message) -> Envelope:
        """Submit ``message`` as a client would (checked against what the app accepts)."""
        return await self.system.submit(self.db, message)

    async def run_until_quiet(self, *, max_steps: int = 100_000) -> int:
        """Step the workers until nothing is pending, moving the clock to each next due time.

        Returns the steps taken (a step is one worker's claim). Raises :class:`RuntimeError`
        after ``max_steps``, or when work is pending that no moment of the clock makes due.
        """
        taken = 0
        while True:
            progressed = False
            for worker in self.workers:
                taken += 1
                if taken > max_steps:
                    raise RuntimeError(f"the app is not quiet after {max_steps} steps")
                if await self._step_worker(worker):
                    progressed = True
            if progressed:
                continue
            due = self._next_due()
            if due is None:
                if not await self.db.is_idle(self.system.subscribers):
                    raise RuntimeError("work is pending that never falls due")
                return taken
            self.clock.set(max(due + _PAST, self.clock.time()))

    def history(self) -> list[Delivered]:
        """Every delivery settled or crashed under so far, in order; the same for one seed."""
        return list(self._history)

    async def check(self) -> list[Violation]:
        """The invariants the app breaks in the store: the generic ones, then its own."""
        return await check_app(self.app, self.db, system=self.system)

    # The stepping -----------------------------------------------------------------------------

    async def _step_worker(self, worker: Worker) -> bool:
        self._step += 1
        self._completed.clear()
        self._pending.clear()
        try:
            progressed = await worker.run_once()
        except InjectedCrash:
            # A process that died leaves what it claimed to its leases: nothing is given back.
            self._history.extend(self._pending)
            return True
        self._history.extend(self._pending)
        if progressed and worker.spec.source == "queue":
            self._duplicate_settled()
        return progressed

    def _next_due(self) -> float | None:
        """The earliest moment something pending falls due: a retry, or a lease's expiry."""
        conn = self.db.connection
        now = self.clock.time()
        commands = conn.execute(
            "SELECT MIN(MAX(available_at, COALESCE(lease_expires, 0))) FROM commands WHERE done = 0"
        ).fetchone()[0]
        parts = conn.execute(
            "SELECT MIN(available_at) FROM subscriptions WHERE available_at > ?", (now,)
        ).fetchone()[0]
        due = [float(moment) for moment in (commands, parts) if moment is not None]
        later = [moment for moment in due if moment >= now]
        return min(later) if later else None

    def _make_before_commit(
        self, worker: Worker
    ) -> Callable[[Batch, Sequence[tuple[Outcome, str | None]]], None]:
        consumer = worker.spec.name

        def before_commit(batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
            ids = [delivery.envelope.message_id for delivery in batch.deliveries]
            crash = (
                self.faults.crashes > 0
                and bool(ids)
                and not self._crashed.intersection(ids)
                and self.rng.random() < self.faults.crashes
            )
            self._pending.clear()
            for delivery, (outcome, _) in zip(batch.deliveries, outcomes, strict=True):
                envelope = delivery.envelope
                if crash:
                    said = "crashed"
                elif outcome is Outcome.ACK:
                    done = (consumer, envelope.message_id) in self._completed
                    said = "handled" if done else "duplicate"
                else:
                    said = _OUTCOMES[outcome]
                self._pending.append(
                    Delivered(consumer, envelope.message_type, envelope.correlation_id, said)
                )
            if crash:
                self._crashed.update(ids)
                raise InjectedCrash(f"{consumer}: crashed before committing {len(ids)} deliveries")

        return before_commit

    def _duplicate_settled(self) -> None:
        """Put back, each with the chance of :attr:`Faults.duplicates`, the commands handled
        since the last look: delivered again as if fresh, for the inbox to absorb."""
        if self.faults.duplicates <= 0:
            return
        conn = self.db.connection
        rows = conn.execute(
            "SELECT id FROM commands WHERE done = 1 AND outcome = 'handled' ORDER BY id"
        ).fetchall()
        chosen = []
        for (row_id,) in rows:
            if row_id in self._considered:
                continue
            self._considered.add(row_id)
            if self.rng.random() < self.faults.duplicates:
                chosen.append((self.clock.time(), row_id))
        if chosen:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "UPDATE commands SET done = 0, outcome = NULL, attempts = 0,"
                    " available_at = ? WHERE id = ?",
                    chosen,
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _wrap_handlers(self) -> None:
        """Put every handler of the system behind the failures the faults call for, and note
        each completed handling (to tell a handled delivery from an absorbed duplicate)."""
        for service in self.system.services.values():
            for handlers in (service.command_handlers, service.event_handlers):
                for type_name, handler in list(handlers.items()):
                    handlers[type_name] = self._faulty(service.name, type_name, handler)

    def _faulty(
        self, consumer: str, type_name: str, handler: Callable[[Context, Any], Awaitable[None]]
    ) -> Callable[[Context, Any], Awaitable[None]]:
        fixed = self.faults.failing.get(type_name, 0)

        async def handle(ctx: Context, message: Any) -> None:
            key = (consumer, ctx.envelope.message_id)
            left = self._to_fail.get(key)
            if left is None:
                left = fixed
                if self.faults.flaky > 0 and self.rng.random() < self.faults.flaky:
                    left = max(left, self.faults.flaky_times)
            if self._failed_in.get(key) == self._step:
                raise InjectedFailure(f"{type_name} fails again in the same delivery")
            if left > 0:
                self._to_fail[key] = left - 1
                self._failed_in[key] = self._step
                raise InjectedFailure(f"{type_name} fails ({left} more to go)")
            self._to_fail[key] = 0
            await handler(ctx, message)
            self._completed.add(key)

        return handle
