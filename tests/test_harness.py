"""The test kit's harness: the trip saga of ``examples/trip`` on a temporary store, a fake clock
the harness moves to each next due retry (no test sleeps through a backoff), and seeded faults
(duplicate deliveries, every message twice, crashes before commit, failing handlers) that one
seed replays, down to the message ids and timestamps of every row."""

from __future__ import annotations

import ast
import asyncio
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from sagaline import App
from sagaline.app import load_app
from sagaline.clock import SYSTEM_CLOCK, FakeClock
from sagaline.ports import RetryPolicy
from sagaline.testing import Delivered, Faults, Harness

TRIP = Path(__file__).resolve().parent.parent / "examples" / "trip"
# Each destination ends one way whatever the faults: booked, no flight, no car for a minor.
TRIPS = [
    (f"T-{n}", traveller, destination)
    for n, (traveller, destination) in enumerate(
        [("ANN", "ROME"), ("BOB", "NOWHERE"), ("MINOR", "PARIS")] * 4
    )
]
ENDS = {"COMPLETED": 4, "COMPENSATED": 8}
FAULTS = Faults(duplicates=0.3, crashes=0.2, flaky=0.2, flaky_times=2)


@pytest.fixture(scope="module")
def trip_app() -> Iterator[App]:
    sys.path.insert(0, str(TRIP))
    try:
        yield load_app("trip:app")
    finally:
        sys.path.remove(str(TRIP))


async def _book_all(harness: Harness, app: App) -> None:
    book: Any = app.registry.get("BookTripCommand")
    for trip_id, traveller, destination in TRIPS:
        await harness.submit(book(trip_id=trip_id, traveller=traveller, destination=destination))


async def _violations(harness: Harness) -> list[str]:
    return [str(violation) for violation in await harness.check()]


class Run(NamedTuple):
    """What a harness run left: its deliveries, the sagas' ends, the invariants' violations, and
    every row of its store as text."""

    history: list[Delivered]
    counts: dict[str, int]
    violations: list[str]
    audit: str


def _run_seeded(app: App, seed: int, faults: Faults = FAULTS) -> Run:
    """Every trip booked under ``faults`` with ``seed``."""

    async def run() -> Run:
        async with Harness(app, seed=seed, faults=faults) as harness:
            await _book_all(harness, app)
            await harness.run_until_quiet()
            violations = await _violations(harness)
            audit = repr(await harness.audit())
            return Run(harness.history(), await harness.db.saga_counts(), violations, audit)

    return asyncio.run(run())


def test_a_failing_handler_is_retried_after_its_backoff_by_moving_the_clock(
    trip_app: App,
) -> None:
    book: Any = trip_app.registry.get("BookTripCommand")
    clock = FakeClock(start=1_800_000_000.0)
    backoff = RetryPolicy(max_attempts=5, initial_delay=600.0, multiplier=2.0, max_delay=3600.0)

    async def run() -> tuple[list[Delivered], dict[str, int], list[str]]:
        harness = Harness(trip_app, clock=clock, faults=Faults(failing={"ReserveHotelCommand": 2}))
        # Ten minutes, then twenty, before the hotel is asked again.
        harness.system.services["hotel"].retry = backoff
        async with harness:
            await harness.submit(book(trip_id="T-1", traveller="ANN", destination="ROME"))
            await harness.run_until_quiet()
            return harness.history(), await harness.db.saga_counts(), await _violations(harness)

    started = time.monotonic()
    history, counts, violations = asyncio.run(run())
    elapsed = time.monotonic() - started

    hotel = [d.outcome for d in history if d.message_type == "ReserveHotelCommand"]
    assert hotel == ["retry", "retry", "handled"]
    assert counts == {"COMPLETED": 1}
    assert violations == []
    # The clock moved through both backoffs; the test did not wait for them.
    assert clock.time() - 1_800_000_000.0 >= backoff.delay(1) + backoff.delay(2)
    assert elapsed < backoff.delay(1)


def test_under_seeded_faults_every_saga_ends_and_the_invariants_hold(trip_app: App) -> None:
    run = _run_seeded(trip_app, seed=1)

    assert run.counts == ENDS
    assert run.violations == []
    outcomes = Counter(d.outcome for d in run.history)
    # Each fault happened, and went through the real path: absorbed, redelivered, retried.
    assert outcomes["duplicate"] > 0
    assert outcomes["crashed"] > 0
    assert outcomes["retry"] > 0
    assert outcomes["dead"] == 0


def test_one_seed_replays_one_history_and_another_seed_another(trip_app: App) -> None:
    first = _run_seeded(trip_app, seed=1)
    again = _run_seeded(trip_app, seed=1)
    other = _run_seeded(trip_app, seed=2)

    assert again.history == first.history
    assert other.history != first.history
    assert other.counts == first.counts == ENDS
    assert other.violations == []
    # Byte for byte the same rows: message ids and bodies, timestamps, saga records and their
    # histories, documents, the inbox. Another seed makes other ids.
    assert again.audit == first.audit
    assert other.audit != first.audit
    ids = {d.message_id for d in first.history}
    assert ids == {d.message_id for d in again.history}
    # The commands a saga sends are named after the saga, the step and the try, whatever the
    # seed (so a unit of work redone sends the same message); every other id is the seed's.
    drawn = {i for i in ids if not i.startswith("saga:")}
    assert drawn and not drawn & {d.message_id for d in other.history}
    # Stamped by the fake clock, which started in 2023 and moved only through backoffs.
    assert "'2023-11-1" in first.audit
    assert f"'{datetime.now(UTC).year}-" not in first.audit


def test_every_message_twice_leaves_each_effect_once(trip_app: App) -> None:
    plain = _run_seeded(trip_app, seed=3, faults=Faults())
    twice = _run_seeded(trip_app, seed=3, faults=Faults(twice=True))

    assert twice.counts == plain.counts == ENDS
    assert twice.violations == []
    # Every message each consumer handled came to it a second time, and was absorbed then.
    outcomes: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
    for delivery in twice.history:
        outcomes[delivery.consumer, delivery.message_id].append(delivery.outcome)
    assert set(map(tuple, outcomes.values())) == {("handled", "duplicate")}
    assert len(outcomes) == sum(1 for d in plain.history if d.outcome == "handled")
    # The effects are the fault-free run's: the same messages sent, the same documents, the
    # same saga histories (the ids differ: the runs drew them in another order).
    assert _effects(twice) == _effects(plain)


def _effects(run: Run) -> tuple[Counter[tuple[str, str, str]], list[Any], list[Any], list[Any]]:
    """What a run did, whatever the message ids: the messages it sent (type, key, body), its
    documents (with their versions: how often each was written), its sagas and their steps."""
    rows: dict[str, list[tuple[Any, ...]]] = ast.literal_eval(run.audit)
    sent = Counter((row[5], row[7], row[6]) for row in rows["events"])
    sent.update((row[3], row[4], "") for row in rows["commands"])
    documents = sorted(rows["documents"])
    steps = sorted((row[0], row[1], row[2], _without_ids(row[3])) for row in rows["saga_history"])
    return sent, documents, sorted(rows["sagas"]), steps


def _without_ids(entry: str) -> str:
    return re.sub(r'"[a-zA-Z]*[iI]d":"[0-9a-f-]{36}"', "", entry)


def test_the_fake_clock_moves_only_forward() -> None:
    clock = FakeClock(start=100.0)
    assert clock.advance(5.0) == clock.time() == 105.0
    assert clock.monotonic() == 5.0
    assert clock.set(200.0) == 200.0
    assert clock.monotonic() == 100.0
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    with pytest.raises(ValueError):
        clock.set(150.0)
    assert abs(SYSTEM_CLOCK.time() - time.time()) < 5.0
