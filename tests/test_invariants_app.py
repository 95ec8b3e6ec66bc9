"""The test kit's invariants for an app of a user's own: the trip booking of ``examples/trip``.

Run on one SQLite file to the end, the app keeps the invariants any app keeps; each kind of
damage below is reported by them, and an invariant the app declares (``App.invariants``) runs
after them, its violations reported with theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sagaline import App
from sagaline.app import load_app
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import Runtime
from sagaline.testing import AuditSnapshot, Violation, check_app, format_violations

TRIP = Path(__file__).resolve().parent.parent / "examples" / "trip"
TIMEOUT = 60.0
# Booked, no flight, no car: the saga completes once and compensates twice.
TRIPS = [("T-1", "ANN", "ROME"), ("T-2", "BOB", "NOWHERE"), ("T-3", "MINOR", "PARIS")]


@pytest.fixture(scope="module")
def trip_app() -> Iterator[App]:
    sys.path.insert(0, str(TRIP))
    try:
        yield load_app("trip:app")
    finally:
        sys.path.remove(str(TRIP))


@pytest.fixture(scope="module")
def settled(trip_app: App, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store on which the trip app ran to the end, every trip's saga ended."""
    path = tmp_path_factory.mktemp("trips") / "trips.db"
    system = trip_app.default
    book: Any = trip_app.registry.get("BookTripCommand")

    def ended(db: SqliteDatabase) -> bool:
        counts = db.sync.saga_counts()
        done = counts.get("COMPLETED", 0) + counts.get("COMPENSATED", 0)
        return done == len(TRIPS) == sum(counts.values()) and db.sync.is_idle(system.subscribers)

    async def run() -> None:
        db = SqliteDatabase(f"sqlite:///{path}")
        try:
            for trip_id, traveller, destination in TRIPS:
                await system.submit(
                    db, book(trip_id=trip_id, traveller=traveller, destination=destination)
                )
            await Runtime(db, system).run_until(lambda: ended(db), timeout=TIMEOUT)
            assert db.sync.saga_counts() == {"COMPLETED": 1, "COMPENSATED": 2}
        finally:
            await db.close()

    asyncio.run(run())
    return path


@pytest.fixture
def copy(settled: Path, tmp_path: Path) -> Path:
    """A private copy of the settled store, to damage."""
    target = tmp_path / "damaged.db"
    with sqlite3.connect(settled) as source, sqlite3.connect(target) as copied:
        source.backup(copied)
    return target


def _check(
    app: App, path: Path, damage: Callable[[sqlite3.Connection], None] | None = None
) -> list[Violation]:
    db = SqliteDatabase(f"sqlite:///{path}")
    try:
        if damage is not None:
            damage(db.connection)
        return asyncio.run(check_app(app, db))
    finally:
        asyncio.run(db.close())


def _saga_left_running(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE sagas SET status = 'RUNNING' WHERE saga_id = 'trip:T-1'")


def _inbox_mark_removed(conn: sqlite3.Connection) -> None:
    conn.execute(
        "DELETE FROM inbox WHERE message_id ="
        " (SELECT message_id FROM commands WHERE type = 'ReserveHotelCommand' LIMIT 1)"
    )


def _saga_row_deleted(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM saga_history WHERE saga_id = 'trip:T-1'")
    conn.execute("DELETE FROM sagas WHERE saga_id = 'trip:T-1'")


def _read_model_row_changed(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE documents SET data = json_set(data, '$.status', 'BOOKED')"
        " WHERE namespace = 'trips.trip' AND key = 'T-2'"
    )


def test_a_settled_app_keeps_the_invariants_any_app_keeps(trip_app: App, copy: Path) -> None:
    violations = _check(trip_app, copy)
    assert not violations, format_violations(violations)


@pytest.mark.parametrize(
    ("damage", "invariant"),
    [(_saga_left_running, "I1"), (_inbox_mark_removed, "I5"), (_read_model_row_changed, "I7")],
    ids=lambda value: value.__name__.strip("_") if callable(value) else str(value),
)
def test_the_generic_checks_report_damage_to_an_app(
    trip_app: App, copy: Path, damage: Callable[[sqlite3.Connection], None], invariant: str
) -> None:
    violations = _check(trip_app, copy, damage)
    assert invariant in {v.invariant for v in violations}, format_violations(violations)
    assert all(v.evidence for v in violations), format_violations(violations)


def test_a_start_event_without_its_saga_is_reported(trip_app: App, copy: Path) -> None:
    # The trip was requested (its start event is in the log), but its saga row is gone: no
    # saga will ever end it. Only the generic check sees this, through the saga definition.
    violations = _check(trip_app, copy, _saga_row_deleted)
    [violation] = [v for v in violations if v.invariant == "I1"]
    assert violation.evidence["sagaId"] == "trip:T-1", format_violations(violations)
    assert violation.evidence["correlationId"] == "T-1"
    assert "TripRequestedEvent" in violation.message and "no trip saga" in violation.message


def _no_trip_cancelled(snapshot: AuditSnapshot) -> Iterator[Violation]:
    """A rule of the test's own: no trip ends cancelled (two of the three do)."""
    for trip_id, row in sorted(snapshot.documents.get("trips.trip", {}).items()):
        if row.get("status") == "CANCELLED":
            yield Violation("TRIP1", f"trip {trip_id} was cancelled", {"tripId": trip_id})


def test_the_app_s_own_invariants_run_after_the_generic_ones(trip_app: App, copy: Path) -> None:
    strict = dataclasses.replace(trip_app, invariants=(_no_trip_cancelled,))
    violations = _check(strict, copy)
    assert [(v.invariant, v.evidence) for v in violations] == [
        ("TRIP1", {"tripId": "T-2"}),
        ("TRIP1", {"tripId": "T-3"}),
    ], format_violations(violations)
    # With damage, the generic checks' violations and the app's come together.
    violations = _check(strict, copy, _saga_left_running)
    assert {v.invariant for v in violations} == {"I1", "TRIP1"}, format_violations(violations)
