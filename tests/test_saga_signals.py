"""Sagas moved by more than their steps' events, through the real message path on the test kit's
clock: retries before compensating, a dead-lettered command, parallel steps with a late answer,
and versions of a saga changing while instances are in flight. No test sleeps: the fake clock is
moved, and the tests wait for what the store shows.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sagaline import (
    Command,
    Context,
    Event,
    NonRetryableError,
    Orchestrator,
    SagaDefinition,
    Service,
    Step,
    System,
)
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.clock import FakeClock
from sagaline.handling import Runtime
from sagaline.ports import SagaRecord
from sagaline.saga import Parallel, SagaStatus, StepRetry


class Keyed:
    __slots__ = ()
    correlation: ClassVar[str] = "trip_id"


class TripAsked(Keyed, Event, kw_only=True, frozen=True):
    trip_id: str


class Book(Keyed, Command, kw_only=True, frozen=True):
    trip_id: str
    what: str


class Booked(Keyed, Event, kw_only=True, frozen=True):
    trip_id: str
    what: str


class Refused(Keyed, Event, kw_only=True, frozen=True):
    trip_id: str
    what: str
    reason: str


class Cancel(Keyed, Command, kw_only=True, frozen=True):
    trip_id: str
    what: str


class Cancelled(Keyed, Event, kw_only=True, frozen=True):
    trip_id: str
    what: str


class Ask(Keyed, Command, kw_only=True, frozen=True):
    trip_id: str


def _typed(name: str, base: type[Any]) -> type[Any]:
    """A message class of its own for one booking (``FlightBooked``, ...)."""
    return type(f"Signals{name}", (base,), {"__module__": __name__})


KINDS = ("flight", "hotel", "car")
BOOKED = {k: _typed(f"{k.title()}Booked", Booked) for k in KINDS}
REFUSED = {k: _typed(f"{k.title()}Refused", Refused) for k in KINDS}
CANCELLED = {k: _typed(f"{k.title()}Cancelled", Cancelled) for k in KINDS}
BOOK = {k: _typed(f"Book{k.title()}", Book) for k in KINDS}
CANCEL = {k: _typed(f"Cancel{k.title()}", Cancel) for k in KINDS}


@dataclass
class Vendors:
    """What each vendor does with the next bookings asked of it: answers in order, then ok."""

    plans: dict[str, list[str]] = field(default_factory=dict)
    held: dict[str, list[Event]] = field(default_factory=dict)
    calls: dict[str, list[str]] = field(default_factory=dict)

    def service(self) -> Service:
        service = Service("vendors")
        for kind in KINDS:
            self._register(service, kind)
        return service

    def _register(self, service: Service, kind: str) -> None:
        @service.handles(BOOK[kind])
        async def book(ctx: Context, command: Book) -> None:
            self.calls.setdefault(kind, []).append(ctx.idempotency_key)
            plan = self.plans.get(kind) or ["ok"]
            step = plan.pop(0) if len(plan) > 1 else plan[0]
            if step == "poison":
                raise NonRetryableError(f"{kind} vendor cannot read this")
            if step == "hold":  # answered later, by the test
                self.held.setdefault(kind, []).append(
                    BOOKED[kind](trip_id=command.trip_id, what=kind)
                )
                return
            if step.startswith("refuse"):
                ctx.publish(
                    REFUSED[kind](trip_id=command.trip_id, what=kind, reason=step.partition(":")[2])
                )
                return
            ctx.publish(BOOKED[kind](trip_id=command.trip_id, what=kind))

        @service.handles(CANCEL[kind])
        async def cancel(ctx: Context, command: Cancel) -> None:
            ctx.publish(CANCELLED[kind](trip_id=command.trip_id, what=kind))

    async def release(self, db: SqliteDatabase, system: System, kind: str) -> None:
        """The held answer of ``kind`` arrives now."""
        await system.submit_internal(db, self.held.pop(kind), source="vendors")


class Start(Keyed, Command, kw_only=True, frozen=True):
    trip_id: str


def step(kind: str, **changes: Any) -> Step:
    fields: dict[str, Any] = {
        "name": kind,
        "command": lambda d, k=kind: BOOK[k](trip_id=d["tripId"], what=k),
        "success": BOOKED[kind],
        "failures": (REFUSED[kind],),
        "compensation": lambda d, k=kind: CANCEL[k](trip_id=d["tripId"], what=k),
        "compensated": CANCELLED[kind],
    }
    fields.update(changes)
    return Step(**fields)


def definition(*steps: Step | Parallel, version: int = 1) -> SagaDefinition:
    return SagaDefinition(name="trip", start=TripAsked, steps=steps, version=version)


def system_of(vendors: Vendors, *definitions: SagaDefinition) -> System:
    asker = Service("asker")

    @asker.handles(Start)
    async def start(ctx: Context, command: Start) -> None:
        ctx.publish(TripAsked(trip_id=command.trip_id))

    return System([asker, vendors.service(), Orchestrator(definitions).service])


async def saga(db: SqliteDatabase, trip: str) -> SagaRecord | None:
    return db.sync.get_saga(f"trip:{trip}")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not so after {timeout} s: {what}")
        await asyncio.sleep(0.01)


def status(db: SqliteDatabase, trip: str, wanted: SagaStatus) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        record = await saga(db, trip)
        return record is not None and record.status == wanted

    return check


def step_state(
    db: SqliteDatabase, trip: str, name: str, wanted: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        record = await saga(db, trip)
        steps = record.data.get("_steps", {}) if record else {}
        return bool(steps.get(name, {}).get("s") == wanted)

    return check


def holding(vendors: Vendors, kind: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return kind in vendors.held

    return check


def called(vendors: Vendors, kind: str, times: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(vendors.calls.get(kind, [])) == times

    return check


@asynccontextmanager
async def running(db: SqliteDatabase, system: System) -> AsyncIterator[Runtime]:
    runtime = Runtime(db, system, poll_interval=0.01)
    task = asyncio.create_task(runtime.run())
    try:
        yield runtime
    finally:
        runtime.stop()
        await task


def start(db: SqliteDatabase, system: System, trips: Sequence[str]) -> Awaitable[Any]:
    return system.submit_many(db, [Start(trip_id=t) for t in trips])


def test_a_transient_failure_is_retried_with_backoff_and_succeeds_on_the_third_try(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db", clock=clock)
        vendors = Vendors(plans={"flight": ["refuse:busy", "refuse:busy", "ok"]})
        policy = StepRetry(attempts=3, backoff=10, multiplier=2, jitter=0, transient=("busy",))
        system = system_of(vendors, definition(step("flight", retry=policy), step("hotel")))
        await start(db, system, ["T-1"])
        async with running(db, system):
            await until(step_state(db, "T-1", "flight", "retrying"), "the first retry due")
            assert await db.next_timer_due() == clock.time() + 10
            clock.advance(10)
            await until(called(vendors, "flight", 2), "the second try")
            await until(step_state(db, "T-1", "flight", "retrying"), "the second retry due")
            assert await db.next_timer_due() == clock.time() + 20
            clock.advance(20)
            await until(status(db, "T-1", SagaStatus.COMPLETED), "the trip booked")
        # Every try carried the step's one idempotency key.
        [key] = set(vendors.calls["flight"])
        assert len(vendors.calls["flight"]) == 3
        assert re.fullmatch(r"saga:trip:T-1:flight\.[0-9a-f]{8}", key)

    asyncio.run(scenario())


def test_a_dead_lettered_command_fails_its_step_and_the_saga_compensates(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db", clock=FakeClock())
        vendors = Vendors(plans={"hotel": ["poison"]})
        system = system_of(vendors, definition(step("flight"), step("hotel")))
        await start(db, system, ["T-1"])
        async with running(db, system):
            await until(status(db, "T-1", SagaStatus.COMPENSATED), "the trip compensated")
        record = await saga(db, "T-1")
        assert record is not None
        assert record.data["_failure"]["step"] == "hotel"
        assert "hotel vendor cannot read this" in record.data["_failure"]["reason"]
        assert record.data["_steps"]["flight"]["s"] == "compensated"
        [dead] = db.sync.dead_letters()
        assert re.fullmatch(r"saga:trip:T-1:hotel\.[0-9a-f]{8}:1", dead.envelope.message_id)

    asyncio.run(scenario())


def test_a_parallel_group_with_one_failure_and_one_late_success(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db", clock=FakeClock())
        vendors = Vendors(plans={"hotel": ["refuse:full"], "car": ["hold"]})
        group = Parallel("book", (step("flight"), step("hotel"), step("car")))
        system = system_of(vendors, definition(group))
        await start(db, system, ["T-1"])
        async with running(db, system):
            await until(status(db, "T-1", SagaStatus.COMPENSATED), "the group compensated")
            record = await saga(db, "T-1")
            assert record is not None
            assert record.data["_steps"]["flight"]["s"] == "compensated"
            assert record.data["_steps"]["car"]["s"] == "abandoned"
            # The car answers after all: it is cancelled too.
            await vendors.release(db, system, "car")
            await until(step_state(db, "T-1", "car", "compensated"), "the late car cancelled")
        record = await saga(db, "T-1")
        assert record is not None and record.status == SagaStatus.COMPENSATED
        sent = [name for entry in record.history for name in entry.get("sent", [])]
        assert sorted(sent) == sorted(
            [
                *("SignalsBookFlight", "SignalsBookHotel", "SignalsBookCar"),
                *("SignalsCancelFlight", "SignalsCancelCar"),
            ]
        )

    asyncio.run(scenario())


def test_instances_finish_on_the_version_they_started_with(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/s.db", clock=FakeClock())
        vendors = Vendors(plans={"hotel": ["hold"]})
        v1 = definition(step("flight"), step("hotel"), step("car"), version=1)
        v2 = definition(step("hotel"), step("flight"), version=2)
        # Version 1 runs T-1 to its hotel, which does not answer yet.
        first = system_of(vendors, v1)
        await start(db, first, ["T-1"])
        async with running(db, first):
            await until(holding(vendors, "hotel"), "T-1 waits for its hotel")
        # The orchestrator comes back with both versions: T-1 goes on with version 1's steps
        # (the car after the hotel), T-2 starts on version 2.
        vendors.plans["hotel"] = ["ok"]
        both = system_of(vendors, v1, v2)
        await start(db, both, ["T-2"])
        async with running(db, both):
            await vendors.release(db, both, "hotel")
            await until(status(db, "T-1", SagaStatus.COMPLETED), "T-1 completed")
            await until(status(db, "T-2", SagaStatus.COMPLETED), "T-2 completed")
        one, two = await saga(db, "T-1"), await saga(db, "T-2")
        assert one is not None and two is not None
        assert (one.definition_version, two.definition_version) == (1, 2)
        assert set(one.data["_steps"]) == {"flight", "hotel", "car"}
        assert set(two.data["_steps"]) == {"hotel", "flight"}
        # Only version 2 is deployed now: an instance of version 1 is STUCK, never run by v2.
        vendors.plans["hotel"] = ["hold"]
        await start(db, first, ["T-3"])
        async with running(db, first):
            await until(holding(vendors, "hotel"), "T-3 waits for its hotel")
        only_v2 = system_of(vendors, v2)
        async with running(db, only_v2):
            await vendors.release(db, only_v2, "hotel")
            await until(status(db, "T-3", SagaStatus.STUCK), "T-3 STUCK")
        three = await saga(db, "T-3")
        assert three is not None
        assert three.data["_stuck"]["reason"] == (
            "version 1 of saga 'trip' is not deployed (deployed: 2)"
        )
        assert "car" not in three.data["_steps"]

    asyncio.run(scenario())
