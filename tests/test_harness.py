"""The test kit's harness: the trip saga of ``examples/trip`` on a temporary store, a fake clock
the harness moves to each next due retry (no test sleeps through a backoff), and seeded faults
(duplicate deliveries, crashes before commit, failing handlers) that one seed replays."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _run_seeded(app: App, seed: int) -> tuple[list[Delivered], dict[str, int], list[str]]:
    """Every trip booked under ``FAULTS`` with ``seed``: the history, the sagas' ends and the
    invariants' violations."""

    async def run() -> tuple[list[Delivered], dict[str, int], list[str]]:
        async with Harness(app, seed=seed, faults=FAULTS) as harness:
            await _book_all(harness, app)
            await harness.run_until_quiet()
            violations = await _violations(harness)
            return harness.history(), harness.db.sync.saga_counts(), violations

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
            return harness.history(), harness.db.sync.saga_counts(), await _violations(harness)

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
    history, counts, violations = _run_seeded(trip_app, seed=1)

    assert counts == ENDS
    assert violations == []
    outcomes = Counter(d.outcome for d in history)
    # Each fault happened, and went through the real path: absorbed, redelivered, retried.
    assert outcomes["duplicate"] > 0
    assert outcomes["crashed"] > 0
    assert outcomes["retry"] > 0
    assert outcomes["dead"] == 0


def test_one_seed_replays_one_history_and_another_seed_another(trip_app: App) -> None:
    first = _run_seeded(trip_app, seed=1)
    again = _run_seeded(trip_app, seed=1)
    other = _run_seeded(trip_app, seed=2)

    assert again[0] == first[0]
    assert other[0] != first[0]
    assert other[1] == first[1] == ENDS
    assert other[2] == []


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
