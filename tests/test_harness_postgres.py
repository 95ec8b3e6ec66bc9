"""The test kit's harness on PostgreSQL: the trip saga of ``examples/trip`` in a schema of the
harness's own (dropped when it closes), with the same fake clock and seeded faults as on SQLite:
retries wait out their backoffs on the clock, one seed replays the same rows byte for byte, and
every message delivered twice changes nothing."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest
import servers

from sagaline import App
from sagaline.app import load_app
from sagaline.clock import FakeClock
from sagaline.ports import RetryPolicy
from sagaline.testing import Delivered, Faults, Harness

TRIP = Path(__file__).resolve().parent.parent / "examples" / "trip"
TRIPS = [
    (f"T-{n}", traveller, destination)
    for n, (traveller, destination) in enumerate([("ANN", "ROME"), ("BOB", "NOWHERE")] * 3)
]
ENDS = {"COMPLETED": 3, "COMPENSATED": 3}
FAULTS = Faults(duplicates=0.3, crashes=0.2, flaky=0.2, flaky_times=2)


@pytest.fixture(scope="module")
def trip_app() -> Iterator[App]:
    sys.path.insert(0, str(TRIP))
    try:
        yield load_app("trip:app")
    finally:
        sys.path.remove(str(TRIP))


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A database of this module's own; each harness makes a schema of its own in it."""
    yield from servers.postgres_database()


def _harness_schemas(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sagaline_harness_%'"
        ).fetchall()
    return [row[0] for row in rows]


class Run(NamedTuple):
    history: list[Delivered]
    counts: dict[str, int]
    violations: list[str]
    audit: str
    schemas: list[str]


def _run(app: App, url: str, seed: int, faults: Faults = FAULTS) -> Run:
    book: Any = app.registry.get("BookTripCommand")

    async def run() -> Run:
        async with Harness(app, seed=seed, faults=faults, url=url) as harness:
            for trip_id, traveller, destination in TRIPS:
                await harness.submit(
                    book(trip_id=trip_id, traveller=traveller, destination=destination)
                )
            await harness.run_until_quiet()
            return Run(
                harness.history(),
                await harness.db.saga_counts(),
                [str(v) for v in await harness.check()],
                repr(await harness.audit()),
                _harness_schemas(url),
            )

    return asyncio.run(run())


def test_a_failing_handler_is_retried_after_its_backoff_on_postgresql(
    trip_app: App, pg_url: str
) -> None:
    book: Any = trip_app.registry.get("BookTripCommand")
    clock = FakeClock(start=1_800_000_000.0)
    backoff = RetryPolicy(max_attempts=5, initial_delay=600.0, multiplier=2.0, max_delay=3600.0)

    async def run() -> tuple[list[str], dict[str, int], list[str]]:
        faults = Faults(failing={"ReserveHotelCommand": 2})
        harness = Harness(trip_app, clock=clock, faults=faults, url=pg_url)
        harness.system.services["hotel"].retry = backoff
        async with harness:
            await harness.submit(book(trip_id="T-1", traveller="ANN", destination="ROME"))
            await harness.run_until_quiet()
            hotel = [
                d.outcome for d in harness.history() if d.message_type == "ReserveHotelCommand"
            ]
            violations = [str(v) for v in await harness.check()]
            return hotel, await harness.db.saga_counts(), violations

    hotel, counts, violations = asyncio.run(run())
    assert hotel == ["retry", "retry", "handled"]
    assert counts == {"COMPLETED": 1}
    assert violations == []
    # Ten minutes, then twenty: the store named each due time and the clock moved to it.
    assert clock.time() - 1_800_000_000.0 >= backoff.delay(1) + backoff.delay(2)


def test_one_seed_replays_one_history_on_postgresql_and_its_schema_is_dropped(
    trip_app: App, pg_url: str
) -> None:
    first = _run(trip_app, pg_url, seed=1)
    again = _run(trip_app, pg_url, seed=1)
    other = _run(trip_app, pg_url, seed=2)

    assert first.counts == other.counts == ENDS
    assert first.violations == other.violations == []
    outcomes = Counter(d.outcome for d in first.history)
    assert outcomes["duplicate"] > 0 and outcomes["crashed"] > 0 and outcomes["retry"] > 0
    assert again.history == first.history
    assert again.audit == first.audit
    assert other.history != first.history
    assert other.audit != first.audit
    # Each run had a schema of its own while open, and dropped it when it closed.
    assert len(first.schemas) == 1
    assert first.schemas != again.schemas
    assert _harness_schemas(pg_url) == []


def test_every_message_twice_on_postgresql_leaves_each_effect_once(
    trip_app: App, pg_url: str
) -> None:
    plain = _run(trip_app, pg_url, seed=4, faults=Faults())
    twice = _run(trip_app, pg_url, seed=4, faults=Faults(twice=True))

    assert twice.counts == plain.counts == ENDS
    assert twice.violations == []
    per_message = Counter((d.consumer, d.message_id, d.outcome) for d in twice.history)
    assert set(per_message.values()) == {1}
    handled = {(c, m) for c, m, outcome in per_message if outcome == "handled"}
    absorbed = {(c, m) for c, m, outcome in per_message if outcome == "duplicate"}
    assert handled == absorbed
    assert len(handled) == sum(1 for d in plain.history if d.outcome == "handled")
