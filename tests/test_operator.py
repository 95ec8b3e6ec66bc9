"""An operator's actions on sagas, from Python and from the CLI: each recorded in the saga's
history with who and why, each refused when the saga's state does not allow it, each done once.

The app is a job saga whose compensation fails while its vendor is "down" (a file in the app's
directory): the compensation is dead-lettered, the saga is STUCK until an operator acts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sagaline import Deployment
from sagaline.app import load_app
from sagaline.errors import ActionRefused, SagaNotFound
from sagaline.handling import Runtime, System
from sagaline.saga import SagaStatus
from sagaline.saga.operator import find_saga, request_action

TIMEOUT = 60.0

JOBS = '''
"""A job saga for the operator tests: its undo fails while the file DOWN exists."""

from pathlib import Path
from typing import ClassVar

from sagaline import (
    App, Command, Context, Event, NonRetryableError, Orchestrator, SagaDefinition, Service,
    Step, StepKind, System,
)

HERE = Path(__file__).resolve().parent


class Keyed:
    __slots__ = ()
    correlation: ClassVar[str] = "job_id"


class StartJobCommand(Keyed, Command, kw_only=True, frozen=True):
    job_id: str
    outcome: str = "ok"


class JobStartedEvent(Keyed, Event, kw_only=True, frozen=True):
    job_id: str
    outcome: str


class WorkCommand(Keyed, Command, kw_only=True, frozen=True):
    job_id: str
    outcome: str


class WorkedEvent(Keyed, Event, kw_only=True, frozen=True):
    job_id: str


class WorkFailedEvent(Keyed, Event, kw_only=True, frozen=True):
    job_id: str
    reason: str


class UndoStartCommand(Keyed, Command, kw_only=True, frozen=True):
    job_id: str


class StartUndoneEvent(Keyed, Event, kw_only=True, frozen=True):
    job_id: str


class HoldCommand(Keyed, Command, kw_only=True, frozen=True):
    job_id: str


class HeldEvent(Keyed, Event, kw_only=True, frozen=True):
    job_id: str


class ReleaseCommand(Keyed, Command, kw_only=True, frozen=True):
    job_id: str


class ReleasedEvent(Keyed, Event, kw_only=True, frozen=True):
    job_id: str


def _jobs() -> Service:
    service = Service("jobs")

    @service.handles(StartJobCommand)
    async def start(ctx: Context, command: StartJobCommand) -> None:
        ctx.publish(JobStartedEvent(job_id=command.job_id, outcome=command.outcome))

    @service.handles(UndoStartCommand)
    async def undo(ctx: Context, command: UndoStartCommand) -> None:
        ctx.publish(StartUndoneEvent(job_id=command.job_id))

    return service


def _vendor() -> Service:
    service = Service("vendor")

    @service.handles(HoldCommand)
    async def hold(ctx: Context, command: HoldCommand) -> None:
        ctx.publish(HeldEvent(job_id=command.job_id))

    @service.handles(ReleaseCommand)
    async def release(ctx: Context, command: ReleaseCommand) -> None:
        if (HERE / "DOWN").exists():
            raise NonRetryableError("the vendor is down")
        ctx.publish(ReleasedEvent(job_id=command.job_id))

    @service.handles(WorkCommand)
    async def work(ctx: Context, command: WorkCommand) -> None:
        if command.outcome == "fail":
            ctx.publish(WorkFailedEvent(job_id=command.job_id, reason="no capacity"))
        elif command.outcome == "ok":
            ctx.publish(WorkedEvent(job_id=command.job_id))
        # "hang": no answer

    return service


JOB_SAGA = SagaDefinition(
    name="job",
    start=JobStartedEvent,
    steps=(
        Step(
            name="start",
            compensation=lambda d: UndoStartCommand(job_id=d["jobId"]),
            compensated=StartUndoneEvent,
        ),
        Step(
            name="hold",
            command=lambda d: HoldCommand(job_id=d["jobId"]),
            success=HeldEvent,
            compensation=lambda d: ReleaseCommand(job_id=d["jobId"]),
            compensated=ReleasedEvent,
        ),
        Step(
            name="work",
            command=lambda d: WorkCommand(job_id=d["jobId"], outcome=d["outcome"]),
            success=WorkedEvent,
            failures=(WorkFailedEvent,),
            kind=StepKind.PIVOT,
        ),
    ),
)


def build(settings: object) -> System:
    return System(
        [_jobs(), _vendor(), Orchestrator([JOB_SAGA]).service], accepts=[StartJobCommand]
    )


app = App(name="jobs", build=build)
'''


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "jobs.py").write_text(JOBS)
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("jobs", None)


def _system() -> System:
    return load_app("jobs:app").build({})


async def _status(deployment: Deployment, system: System, saga_id: str) -> str:
    try:
        return (await find_saga(deployment, system, saga_id)).status
    except SagaNotFound:
        return ""


async def _until(check: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not so after {TIMEOUT} s: {what}")
        await asyncio.sleep(0.02)


def test_a_stuck_compensation_waits_for_an_operator_who_retries_it(jobs_dir: Path) -> None:
    async def scenario() -> None:
        system = _system()
        deployment = Deployment(f"sqlite:///{jobs_dir}/s.db", services=list(system.services))
        await deployment.open()
        store = deployment.distinct_stores()[0]
        start_job = system.registry.get("StartJobCommand")
        (jobs_dir / "DOWN").touch()
        await system.submit(store, start_job(job_id="J-1", outcome="fail"))
        runtime = Runtime(store, system, poll_interval=0.02)
        task = asyncio.create_task(runtime.run())
        try:

            async def stuck() -> bool:
                return await _status(deployment, system, "job:J-1") == SagaStatus.STUCK

            await _until(stuck, "the saga STUCK")
            record = await find_saga(deployment, system, "job:J-1")
            assert record.data["_stuck"]["step"] == "hold"
            assert "the vendor is down" in record.data["_stuck"]["reason"]
            assert re.fullmatch(
                r"saga:job:J-1:hold\.[0-9a-f]{8}:u1", record.data["_stuck"]["deadLetter"]
            )
            # Refused: a STUCK saga cannot be compensated (it is compensating already).
            with pytest.raises(ActionRefused, match="only a RUNNING saga"):
                await request_action(
                    deployment, system, "job:J-1", "compensate", by="ann", reason="x"
                )
            (jobs_dir / "DOWN").unlink()
            asked = await request_action(
                deployment, system, "job:J-1", "retry", by="ann", reason="vendor is back"
            )
            # Asked again before the saga moved: the same request, done once.
            again = await request_action(
                deployment, system, "job:J-1", "retry", by="ann", reason="vendor is back"
            )
            assert again.message_id == asked.message_id

            async def compensated() -> bool:
                return await _status(deployment, system, "job:J-1") == SagaStatus.COMPENSATED

            await _until(compensated, "the saga compensated")
        finally:
            runtime.stop()
            await task
        record = await find_saga(deployment, system, "job:J-1")
        asked_entries = [e for e in record.history if e.get("by") == "ann"]
        assert [(e["reason"], e["event"]) for e in asked_entries] == [
            ("vendor is back", "SagaActionRequested")
        ]
        assert record.data["_steps"]["hold"] == {"s": "compensated", "n": 1, "c": 2}
        with pytest.raises(ActionRefused, match="has ended COMPENSATED"):
            await request_action(deployment, system, "job:J-1", "retry", by="ann", reason="x")
        await deployment.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ the CLI


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_")}
    env.update(COLUMNS="200", SAGALINE_APP="jobs:app", SAGALINE_STORE_URL=f"sqlite:///{cwd}/s.db")
    return env


def cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(cwd),
        timeout=TIMEOUT,
        check=False,
    )


def start_worker(cwd: Path) -> subprocess.Popen[bytes]:
    """``sagaline run``: every service of the job app, until terminated."""
    return subprocess.Popen(
        [sys.executable, "-m", "sagaline", "run"],
        cwd=cwd,
        env=_env(cwd),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def show(cwd: Path, saga_id: str) -> dict[str, Any]:
    shown = cli("saga", "show", saga_id, "--json", cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    result: dict[str, Any] = json.loads(shown.stdout)
    return result


def wait_for(cwd: Path, saga_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        shown = cli("saga", "show", saga_id, "--json", cwd=cwd)
        if shown.returncode == 0:
            record: dict[str, Any] = json.loads(shown.stdout)
            if record["status"] == status:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"{saga_id} not {status} after {TIMEOUT} s: {shown.stdout}")
        time.sleep(0.1)


def test_every_operator_action_through_the_cli(jobs_dir: Path) -> None:
    cwd = jobs_dir
    (cwd / "DOWN").touch()
    submitted = cli(
        "submit",
        "-",
        cwd=cwd,
        stdin='[{"commandType": "StartJobCommand", "jobId": "J-1", "outcome": "fail"},'
        ' {"commandType": "StartJobCommand", "jobId": "J-2", "outcome": "hang"},'
        ' {"commandType": "StartJobCommand", "jobId": "J-3", "outcome": "fail"},'
        ' {"commandType": "StartJobCommand", "jobId": "J-4", "outcome": "hang"}]',
    )
    assert submitted.returncode == 0, submitted.stderr
    worker = start_worker(cwd)
    try:
        for saga_id in ("job:J-1", "job:J-3"):
            wait_for(cwd, saga_id, "STUCK")
        listed = cli("sagas", "--status", "STUCK", "--json", cwd=cwd)
        assert sorted(r["sagaId"] for r in json.loads(listed.stdout)["sagas"]) == [
            "job:J-1",
            "job:J-3",
        ]
        # The table names each instance's definition and the version it runs on; the status
        # is a choice of any case.
        table = cli("sagas", "--status", "stuck", cwd=cwd)
        assert table.returncode == 0, table.stderr
        assert "job v1" in table.stdout and "STUCK" in table.stdout
        wrong = cli("sagas", "--status", "hung", cwd=cwd)
        assert wrong.returncode == 2 and "hung" in wrong.stderr
        # skip: the release is done by hand; the saga goes on compensating.
        skipped = cli(
            "saga", "skip", "job:J-1", "--reason", "released by phone", "--by", "bo", cwd=cwd
        )
        assert skipped.returncode == 0, skipped.stderr
        record = wait_for(cwd, "job:J-1", "COMPENSATED")
        assert record["steps"]["hold"]["state"] == "skipped"
        assert any(
            e.get("by") == "bo" and e.get("reason") == "released by phone"
            for e in record["history"]
        )
        # compensate: the hanging job is given up on.
        (cwd / "DOWN").unlink()
        wait_for(cwd, "job:J-2", "RUNNING")
        given_up = cli("saga", "compensate", "job:J-2", "--reason", "customer left", cwd=cwd)
        assert given_up.returncode == 0, given_up.stderr
        wait_for(cwd, "job:J-2", "COMPENSATED")
        # retry: the vendor is back, the STUCK compensation goes through.
        retried = cli("saga", "retry", "job:J-3", "--reason", "vendor back", cwd=cwd)
        assert retried.returncode == 0, retried.stderr
        wait_for(cwd, "job:J-3", "COMPENSATED")
        # abort asks first; "no" leaves the saga as it was.
        declined = cli("saga", "abort", "job:J-4", "--reason", "test", cwd=cwd, stdin="n\n")
        assert declined.returncode == 1 and show(cwd, "job:J-4")["status"] == "RUNNING"
        aborted = cli("saga", "abort", "job:J-4", "--reason", "test", "--yes", cwd=cwd)
        assert aborted.returncode == 0, aborted.stderr
        record = wait_for(cwd, "job:J-4", "FAILED")
        assert record["steps"]["work"]["state"] == "running"  # nothing compensated
        # Refusals: clear, exit 2, nothing sent.
        for args, words in (
            (("retry", "job:J-1"), "has ended COMPENSATED"),
            (("skip", "job:J-4"), "has ended FAILED"),
            (("compensate", "job:J-9"), "no saga job:J-9"),
            (("retry", "nosuch:J-1"), "no service of the system keeps sagas named 'nosuch'"),
        ):
            refused = cli("saga", *args, "--reason", "x", cwd=cwd)
            assert refused.returncode in (1, 2) and words in refused.stderr, refused.stderr
    finally:
        worker.terminate()
        worker.wait(timeout=TIMEOUT)


def test_dead_letters_are_replayed_and_discarded_through_the_cli(jobs_dir: Path) -> None:
    cwd = jobs_dir
    (cwd / "DOWN").touch()
    submitted = cli(
        "submit",
        "-",
        cwd=cwd,
        stdin='[{"commandType": "StartJobCommand", "jobId": "J-1", "outcome": "fail"},'
        ' {"commandType": "StartJobCommand", "jobId": "J-2", "outcome": "fail"}]',
    )
    assert submitted.returncode == 0, submitted.stderr
    worker = start_worker(cwd)
    try:
        for saga_id in ("job:J-1", "job:J-2"):
            wait_for(cwd, saga_id, "STUCK")
        listed = json.loads(cli("dead-letters", "--json", cwd=cwd).stdout)
        # A saga's command is named after the saga, the step (tagged with its instance) and try.
        by_message = {re.sub(r"\.[0-9a-f]{8}:", ":", row["messageId"]): row for row in listed}
        assert set(by_message) == {"saga:job:J-1:hold:u1", "saga:job:J-2:hold:u1"}
        one, two = by_message["saga:job:J-1:hold:u1"], by_message["saga:job:J-2:hold:u1"]
        assert one["consumer"] == "vendor" and "the vendor is down" in one["reason"]

        # Still down: the replay fails again, and the message is a dead letter anew.
        again = cli("dead-letters", "replay", str(one["id"]), "--reason", "try", cwd=cwd)
        assert again.returncode == 0 and "failed again" in again.stdout, again.stderr
        (cwd / "DOWN").unlink()
        [renewed] = [
            row
            for row in json.loads(cli("dead-letters", "--json", cwd=cwd).stdout)
            if row["messageId"] == one["messageId"]
        ]
        replayed = cli(
            "dead-letters",
            "replay",
            str(renewed["id"]),
            "--reason",
            "vendor back",
            "--by",
            "cy",
            cwd=cwd,
        )
        assert replayed.returncode == 0 and "replayed" in replayed.stdout, replayed.stderr
        # The release went through: the saga, STUCK on it, compensates to the end.
        wait_for(cwd, "job:J-1", "COMPENSATED")

        discarded = cli(
            "dead-letters", "discard", str(two["id"]), "--reason", "done by hand", cwd=cwd
        )
        assert discarded.returncode == 0, discarded.stderr
        assert json.loads(cli("dead-letters", "--json", cwd=cwd).stdout) == []
        assert show(cwd, "job:J-2")["status"] == "STUCK"  # discarding moves no saga

        # Both actions are in the transactions' audit trails, with who and why.
        trace = cli("trace", "J-1", "--json", cwd=cwd)
        assert trace.returncode == 0, trace.stderr
        assert '"DeadLetterResolved"' in trace.stdout and "vendor back" in trace.stdout
        missing = cli("dead-letters", "discard", "999", "--reason", "x", cwd=cwd)
        assert missing.returncode == 1 and "no dead letter 999" in missing.stderr
    finally:
        worker.terminate()
        worker.wait(timeout=TIMEOUT)
