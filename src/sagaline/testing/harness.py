"""A harness that runs an app deterministically: a temporary store, a fake clock, seeded faults.

The app's system runs on a real store (its inbox, retries, leases and saga records all real): a
temporary SQLite file by default, or a temporary schema of a PostgreSQL database given by URL,
dropped at the end. One task steps it: every worker claims and handles one batch in a fixed
order, until none has work; then the :class:`~sagaline.clock.FakeClock` is moved to the moment
the store says the next retry or lease falls due, and the stepping goes on. No test sleeps for a
backoff.

Faults go through the real message path; only when to inject them is decided, by a
``random.Random(seed)`` the harness owns:

* a duplicate delivery: a message (command or event) handled and settled is delivered again, as
  a bus that lost its acknowledgement would; the consumer's inbox must absorb it. With
  :attr:`Faults.twice` every message is delivered twice;
* a crash between handling and commit: a batch's unit of work is abandoned just before its
  commit, as if the process died there; its deliveries come again once their leases expire;
* a handler that fails: a chosen message fails its first deliveries, then succeeds; the worker
  retries it after its backoff.

Inside the harness (``async with``), new messages take their ids and timestamps from the harness
(:class:`~sagaline.messages.MessageStamps` of its clock and of a PRNG seeded from its seed), and
the store writes its timestamps by the same clock. So one seed replays one history: the same
deliveries (:meth:`Harness.history`) and the same rows, byte for byte (:meth:`Harness.audit`:
messages, saga records and their histories, documents); another seed gives another.
"""

from __future__ import annotations

import random
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol, runtime_checkable

from sagaline.app import App, Settings
from sagaline.backends import open_backend
from sagaline.clock import FakeClock
from sagaline.config import scheme_of
from sagaline.errors import ConfigurationError
from sagaline.handling import Context, Runtime, System, Worker
from sagaline.handling.timers import TimerPoller
from sagaline.messages import Envelope, Message, MessageStamps, stamping
from sagaline.ports import Batch, ConsumerSpec, Database, Delivery, Disposable, Outcome
from sagaline.testing.invariants import Violation, check_app

__all__ = ["Delivered", "Faults", "Harness", "InjectedCrash", "InjectedFailure", "Schedule"]

#: The member name the harness's workers claim as: one process, always the same.
MEMBER = "harness"
#: How far past a lease's expiry the clock is moved: a lease is free once strictly past it.
_PAST = 0.001
#: The metadata mark of a temporary schema the harness made (and drops when it closes).
_MARK = "sagaline.harness"


class InjectedFailure(RuntimeError):
    """A handler's failure the harness injected (see :attr:`Faults.flaky`)."""


class InjectedCrash(Exception):
    """The harness abandoned a unit of work before its commit (see :attr:`Faults.crashes`)."""


@runtime_checkable
class Schedule(Protocol):
    """What the harness needs of a store besides its ports: when its pending work falls due,
    and how to deliver again what it settled (SQLite and PostgreSQL have both)."""

    async def next_due(self, after: float) -> float | None:
        """The earliest moment later than ``after`` at which pending work falls due, or None."""
        ...

    async def redeliver(self, consumer: ConsumerSpec, deliveries: Sequence[Delivery]) -> None:
        """Deliver again ``deliveries`` that ``consumer`` settled."""
        ...


@dataclass(frozen=True)
class Faults:
    """Which faults the harness injects, and how often; its seed decides when.

    Rates are chances between 0 and 1. A message is delivered again at most once per consumer
    and a batch holding a message already crashed under is not crashed again, so every run
    ends. A flaky message fails ``flaky_times`` deliveries; ``failing`` makes every message of a
    type fail its first deliveries (``{"ReserveHotelCommand": 2}``). Keep the failures under the
    consumer's retry policy's ``max_attempts`` (a crash spends an attempt too), or the message
    is dead-lettered.
    """

    #: The chance that a message (command or event), once handled and settled, is delivered
    #: again. An event comes again with those after it in its log partition.
    duplicates: float = 0.0
    #: Every message delivered a second time once handled and settled: each consumer's
    #: idempotency is exercised on every message, and the effects must still happen once.
    twice: bool = False
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
    ``skipped`` (held back behind its key's retry) or ``crashed``; ``message_id`` is the
    delivered message's (the same on every run of one seed).
    """

    consumer: str
    message_type: str
    correlation_id: str
    outcome: str
    message_id: str


_OUTCOMES = {Outcome.RETRY: "retry", Outcome.DEAD: "dead", Outcome.SKIP: "skipped"}


class Harness:
    """Runs ``app`` on a temporary store with a fake clock and seeded faults.

    Use it as an async context manager::

        async with Harness(app, seed=7, faults=Faults(duplicates=0.2)) as harness:
            await harness.submit(BookTripCommand(...))
            await harness.run_until_quiet()
            assert await harness.db.saga_counts() == {"COMPLETED": 1}
            assert await harness.check() == []

    The store is a SQLite file in a temporary directory, removed on exit; ``path`` keeps it at a
    file of the caller's instead. ``url`` names a database to run on: a PostgreSQL URL gets a
    schema of the harness's own, dropped on exit (a SQLite URL is a file kept, as ``path``).
    The store reads leases and due times from ``clock``. ``batch_size`` is how many deliveries
    a worker claims at once.
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
        url: str | None = None,
        batch_size: int = 20,
    ) -> None:
        if path is not None and url is not None:
            raise ConfigurationError("give the harness a path or a URL, not both")
        self.app = app
        self.seed = seed
        self.faults = faults or Faults()
        self.clock = clock or FakeClock()
        self.rng = random.Random(seed)
        #: Where new messages take their ids and timestamps from, inside the harness.
        self.stamps = MessageStamps(self.clock, random.Random(f"sagaline.harness.ids:{seed}"))
        self.system: System = app.system(settings)
        self._url = url if path is None else f"sqlite:///{path}"
        self._batch_size = batch_size
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._db: Database | None = None
        self._schedule: Schedule | None = None
        self._disposable: Disposable | None = None
        self._context = ExitStack()
        self.workers: list[Worker] = []
        self._timers: TimerPoller | None = None
        self._history: list[Delivered] = []
        # Per batch: what its handlers completed, and what was seen just before its commit.
        self._completed: set[tuple[str, str]] = set()
        self._pending: list[Delivered] = []
        self._handled: list[Delivery] = []
        self._crashed: set[str] = set()
        # Per (consumer, message id): delivered again once already.
        self._redelivered: set[tuple[str, str]] = set()
        # Per (consumer, message id): how many failures are still to inject, and in which step
        # one was last injected (a failed batch is handled again message by message in the
        # same step: that is one delivery, failed once).
        self._to_fail: dict[tuple[str, str], int] = {}
        self._failed_in: dict[tuple[str, str], int] = {}
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
        """Create the store and the workers, one per consumer of the system, in a fixed order;
        from here to :meth:`close`, new messages of this task take the harness's stamps."""
        self._context.enter_context(stamping(self.stamps))
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        url = self._url
        if url is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="sagaline-harness-")
            url = f"sqlite:///{Path(self._tempdir.name) / 'store.db'}"
        # A schema of its own where the adapter gives each service one (PostgreSQL), the bus
        # beside it; a file holds its one store whatever the name.
        service = f"harness_{secrets.token_hex(5)}"
        store = open_backend(
            url, service=service, colocated_bus=False, outbox=False, clock=self.clock
        )
        if not isinstance(store, Database) or not isinstance(store, Schedule):
            await store.close()
            raise ConfigurationError(
                f"the harness cannot run on {scheme_of(url)}:// stores: it needs a database"
                " that is its own bus, with next_due() and redeliver()"
            )
        self._db, self._schedule = store, store
        await store.open()
        if isinstance(store, Disposable):
            await store.set_meta(_MARK, "1")
            self._disposable = store
        runtime = Runtime(
            store, self.system, member=MEMBER, batch_size=self._batch_size, clock=self.clock
        )
        self.workers = runtime.workers
        self._timers = runtime.timers
        for worker in self.workers:
            worker.before_commit = self._make_before_commit(worker)

    async def close(self) -> None:
        """Close the store, and remove it when it is temporary (a file, a schema)."""
        disposable, self._disposable = self._disposable, None
        db, self._db = self._db, None
        tempdir, self._tempdir = self._tempdir, None
        try:
            if disposable is not None:
                await disposable.drop_if_marked(_MARK)
        finally:
            try:
                if db is not None:
                    await db.close()
                if tempdir is not None:
                    tempdir.cleanup()
            finally:
                self._context.close()

    @property
    def db(self) -> Database:
        """The store the app runs on (its queries: ``saga_counts``, ``list_sagas``...)."""
        if self._db is None:
            raise RuntimeError("the harness is not open: use `async with Harness(...)`")
        return self._db

    # Driving the app --------------------------------------------------------------------------

    async def submit(self, message: Message) -> Envelope:
        """Submit ``message`` as a client would (checked against what the app accepts)."""
        with stamping(self.stamps):
            return await self.system.submit(self.db, message)

    async def run_until_quiet(self, *, max_steps: int = 100_000) -> int:
        """Step the workers until nothing is pending, moving the clock to each next due time.

        Returns the steps taken (a step is one worker's claim). Raises :class:`RuntimeError`
        after ``max_steps``, or when work is pending that no moment of the clock makes due.
        """
        assert self._schedule is not None, "the harness is not open"
        schedule = self._schedule
        taken = 0
        with stamping(self.stamps):
            while True:
                progressed = False
                for worker in self.workers:
                    taken += 1
                    if taken > max_steps:
                        raise RuntimeError(f"the app is not quiet after {max_steps} steps")
                    if await self._step_worker(worker):
                        progressed = True
                assert self._timers is not None
                if progressed or await self._timers.fire_once():
                    continue
                due = await schedule.next_due(self.clock.time())
                if due is None:
                    if not await self.db.is_idle(self.system.subscribers):
                        raise RuntimeError("work is pending that never falls due")
                    return taken
                self.clock.set(max(due + _PAST, self.clock.time()))

    def history(self) -> list[Delivered]:
        """Every delivery settled or crashed under so far, in order; the same for one seed."""
        return list(self._history)

    async def audit(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the store the invariant checker reads, table by table (messages with
        their ids, bodies and timestamps, saga records and histories, documents, inbox): for
        one seed, the same rows on every run."""
        return await self.db.audit_rows()

    async def check(self) -> list[Violation]:
        """The invariants the app breaks in the store: the generic ones, then its own."""
        return await check_app(self.app, self.db, system=self.system)

    # The stepping -----------------------------------------------------------------------------

    async def _step_worker(self, worker: Worker) -> bool:
        self._step += 1
        self._completed.clear()
        self._pending.clear()
        self._handled.clear()
        try:
            progressed = await worker.run_once()
        except InjectedCrash:
            # A process that died leaves what it claimed to its leases: nothing is given back.
            self._history.extend(self._pending)
            return True
        self._history.extend(self._pending)
        if progressed and self._handled:
            await self._deliver_again(worker)
        return progressed

    async def _deliver_again(self, worker: Worker) -> None:
        """Deliver again, as :attr:`Faults.twice` and :attr:`Faults.duplicates` call for, what
        the worker's last batch handled (its unit of work has committed)."""
        faults = self.faults
        if not faults.twice and faults.duplicates <= 0:
            return
        consumer = worker.spec.name
        chosen: list[Delivery] = []
        for delivery in self._handled:
            key = (consumer, delivery.envelope.message_id)
            if key in self._redelivered:
                continue
            if faults.twice or self.rng.random() < faults.duplicates:
                self._redelivered.add(key)
                chosen.append(delivery)
        if chosen:
            assert self._schedule is not None
            await self._schedule.redeliver(worker.spec, chosen)

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
            # Called again when the batch is handled again message by message: the last call
            # is the one that commits.
            self._pending.clear()
            self._handled.clear()
            for delivery, (outcome, _) in zip(batch.deliveries, outcomes, strict=True):
                envelope = delivery.envelope
                if crash:
                    said = "crashed"
                elif outcome is Outcome.ACK:
                    done = (consumer, envelope.message_id) in self._completed
                    said = "handled" if done else "duplicate"
                    if done:
                        self._handled.append(delivery)
                else:
                    said = _OUTCOMES[outcome]
                self._pending.append(
                    Delivered(
                        consumer,
                        envelope.message_type,
                        envelope.correlation_id,
                        said,
                        envelope.message_id,
                    )
                )
            if crash:
                self._crashed.update(ids)
                raise InjectedCrash(f"{consumer}: crashed before committing {len(ids)} deliveries")

        return before_commit

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
