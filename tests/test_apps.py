"""Apps other than the order system, through everything a user has: the CLI and the public API.

The trip booking of ``examples/trip`` is run as a user runs it (``sagaline --app trip:app``) on
SQLite, and as separate processes on PostgreSQL with a broker. A user's message named like one of
the reference app's lives beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import servers

from sagaline import App, Command, Context, Event, Runtime, Service, System, parse_document
from sagaline import registry as every_class
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.errors import ConfigurationError, UnknownMessageType

TRIP = Path(__file__).resolve().parent.parent / "examples" / "trip"
TIMEOUT = 60.0

TRIPS = [
    {"commandType": "BookTripCommand", "tripId": "T-1", "traveller": "ANN", "destination": "ROME"},
    {
        "commandType": "BookTripCommand",
        "tripId": "T-2",
        "traveller": "BOB",
        "destination": "NOWHERE",
    },
    {
        "commandType": "BookTripCommand",
        "tripId": "T-3",
        "traveller": "MINOR",
        "destination": "PARIS",
    },
]
OUTCOMES = {"trip:T-1": "COMPLETED", "trip:T-2": "COMPENSATED", "trip:T-3": "COMPENSATED"}


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_")}
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


def sagaline(
    *args: str, cwd: Path, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(env),
        timeout=TIMEOUT,
        check=False,
    )


def start(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(env),
    )


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, then what it printed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT * 2
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the services stopped before {what}: {stop(process)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {stop(process)[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def trip_dir(tmp_path: Path) -> Path:
    """A copy of the example, as a user would start from it."""
    folder = tmp_path / "trip"
    folder.mkdir()
    (folder / "trip.py").write_text((TRIP / "trip.py").read_text())
    for trip in TRIPS:
        (folder / f"{trip['tripId']}.json").write_text(json.dumps(trip))
    return folder


def _sagas(folder: Path, *urls: str) -> dict[str, str]:
    result = sagaline("--app", "trip:app", "sagas", "--json", *urls, cwd=folder)
    if result.returncode != 0:
        return {}
    return {row["sagaId"]: row["status"] for row in json.loads(result.stdout)["sagas"]}


def _drive_trips(folder: Path, urls: list[str], runner: list[str]) -> None:
    """Submit the three trips, run the app's services until they ended, and check them."""
    for trip in TRIPS:
        submitted = sagaline(
            "--app", "trip:app", "submit", f"{trip['tripId']}.json", *urls, cwd=folder
        )
        assert submitted.returncode == 0, submitted.stderr
    services = start("--app", "trip:app", *runner, *urls, cwd=folder)
    try:
        wait_for(lambda: _sagas(folder, *urls) == OUTCOMES, "every trip to end", services)
    finally:
        output = stop(services)
    assert "Traceback" not in output, output[-3000:]
    traced = sagaline("--app", "trip:app", "trace", "T-3", *urls, cwd=folder)
    assert traced.returncode == 0, traced.stderr
    assert "saga trip:T-3 COMPENSATED; failed at rent_car: no car for a minor" in traced.stdout
    # Undone in reverse: the hotel, the flight, then the trip request.
    order = [traced.stdout.index(name) for name in ("CancelHotelCommand", "CancelFlightCommand")]
    assert order == sorted(order) and "CancelTripCommand" in traced.stdout
    as_json = sagaline("--app", "trip:app", "trace", "T-1", "--json", *urls, cwd=folder)
    assert json.loads(as_json.stdout)["saga"]["status"] == "COMPLETED"


def test_the_trip_example_runs_through_the_cli_on_sqlite(trip_dir: Path) -> None:
    store = ["--store", f"sqlite:///{trip_dir}/trip.db"]
    _drive_trips(trip_dir, store, ["run"])
    listed = sagaline("--app", "trip:app", "sagas", "--status", "COMPENSATED", *store, cwd=trip_dir)
    assert "trip:T-2" in listed.stdout and "trip:T-1" not in listed.stdout
    described = sagaline("--app", "trip:app", "describe", "trip", "--mermaid", cwd=trip_dir)
    assert described.returncode == 0, described.stderr
    for name in ("ReserveFlightCommand", "ReserveHotelCommand", "RentCarCommand"):
        assert name in described.stdout  # named although the saga builds them in lambdas
    schema = sagaline("--app", "trip:app", "schema", "BookTripCommand", cwd=trip_dir)
    assert json.loads(schema.stdout)["$defs"]["BookTripCommand"]["required"]
    # The reference app's business commands are not the CLI's: they are the order app's.
    for command in (["demo"], ["stock", "list"], ["orders"]):
        refused = sagaline("--app", "trip:app", *command, *store, cwd=trip_dir)
        assert refused.returncode == 2 and "No such command" in refused.stderr


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from servers.postgres_database()


@pytest.fixture
def nats_url() -> Iterator[str]:
    yield from servers.nats_prefix()


def test_the_trip_example_runs_as_processes_on_postgresql_and_nats(
    trip_dir: Path, postgres_url: str, nats_url: str
) -> None:
    urls = ["--store", postgres_url, "--bus", nats_url]
    _drive_trips(trip_dir, urls, ["up", "--lease-seconds", "2"])


def test_the_app_is_found_in_the_environment_and_in_pyproject(trip_dir: Path) -> None:
    from_env = sagaline("schema", "BookTripCommand", cwd=trip_dir, env={"SAGALINE_APP": "trip:app"})
    assert from_env.returncode == 0, from_env.stderr
    (trip_dir / "pyproject.toml").write_text('[tool.sagaline]\napp = "trip:app"\n')
    from_file = sagaline("schema", "BookTripCommand", cwd=trip_dir)
    assert from_file.returncode == 0, from_file.stderr
    # The order system is the app when none is named.
    (trip_dir / "pyproject.toml").unlink()
    default = sagaline("schema", "CreateOrderCommand", cwd=trip_dir)
    assert default.returncode == 0, default.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "no_such_module:app", "sagas"], "cannot import the app module"),
        (["--app", "trip:nothing", "sagas"], "has no attribute 'nothing'"),
        (["--app", "trip:TRIP_SAGA", "sagas"], "not a sagaline App"),
        (["--app", "trip:app", "run", "--set", "speed=3"], "has no setting 'speed'"),
        (["--app", "trip:app", "run", "--set", "oops"], "is not NAME=VALUE"),
    ],
)
def test_a_wrong_app_or_setting_is_a_clear_error(
    trip_dir: Path, args: list[str], message: str
) -> None:
    result = sagaline(*args, cwd=trip_dir)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------- names of two apps


class CancelOrderCommand(Command, kw_only=True, frozen=True):
    """A user's command named like the reference app's, with fields of its own."""

    correlation: ClassVar[str] = "booking"
    booking: str
    why: str


class BookingCancelledEvent(Event, kw_only=True, frozen=True):
    correlation: ClassVar[str] = "booking"
    booking: str


def test_a_users_message_named_like_the_reference_apps_does_not_collide(tmp_path: Path) -> None:
    import sagaline.orders.messages as reference

    bookings = Service("bookings")

    @bookings.handles(CancelOrderCommand)
    async def cancel(ctx: Context, command: CancelOrderCommand) -> None:
        await ctx.tx.put_document("bookings", command.booking, {"why": command.why}, 0)
        ctx.publish(BookingCancelledEvent(booking=command.booking))

    system = System([bookings], accepts=[CancelOrderCommand])
    assert system.registry.get("CancelOrderCommand") is CancelOrderCommand
    # Both classes exist in the process; only an ambiguous lookup there is refused.
    with pytest.raises(UnknownMessageType, match="defined by several classes"):
        every_class.get("CancelOrderCommand")
    parsed = parse_document(
        b'{"commandType":"CancelOrderCommand","booking":"B-1","why":"changed plans"}',
        system.registry,
    )
    assert parsed == CancelOrderCommand(booking="B-1", why="changed plans")

    async def scenario() -> None:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/bookings.db")
        try:
            await system.submit(db, parsed)
            await Runtime(db, system).run_until(
                lambda: db.sync.get_document("bookings", "B-1") is not None, timeout=30
            )
            assert db.sync.dead_letters() == []
        finally:
            await db.close()

    asyncio.run(scenario())
    # The reference app's system still reads its own.
    from sagaline.orders import build_system

    assert build_system().registry.get("CancelOrderCommand") is reference.CancelOrderCommand


def test_a_system_refuses_two_classes_of_one_name() -> None:
    import sagaline.orders.messages as reference

    mine, theirs = Service("mine"), Service("theirs")
    mine.handles(CancelOrderCommand)(_nothing)
    theirs.handles(reference.CancelOrderCommand)(_nothing)
    with pytest.raises(ConfigurationError):
        System([mine, theirs])


async def _nothing(ctx: Context, message: Any) -> None:
    return None


def test_an_app_builds_its_system_with_the_settings_it_declares() -> None:
    built: list[Mapping[str, str]] = []

    def build(settings: Mapping[str, str]) -> System:
        built.append(settings)
        return System([])

    app = App(name="tiny", build=build, settings={"speed": "how fast"})
    app.system({"speed": "3"})
    assert built == [{"speed": "3"}]
    with pytest.raises(ConfigurationError, match="no setting 'colour'"):
        app.system({"colour": "red"})
