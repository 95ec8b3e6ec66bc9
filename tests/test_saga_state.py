"""The saga state machine alone: every signal, every policy, no I/O.

Each test plays signals (events, timers, dead letters, operator actions) into one record and
checks what the transitions call for: commands, timers, status.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import msgspec
import pytest

from sagaline import Command, Event
from sagaline.errors import SagaDefinitionError
from sagaline.ports import SagaRecord
from sagaline.saga import (
    Parallel,
    SagaDefinition,
    SagaStatus,
    Step,
    StepKind,
    StepRetry,
)
from sagaline.saga.state import (
    SagaView,
    Transition,
    action_refused,
    advance,
    on_action,
    on_dead_letter,
    on_timer,
)


class Keyed:
    __slots__ = ()
    correlation: ClassVar[str] = "job_id"


class JobStarted(Keyed, Event, kw_only=True, frozen=True):
    job_id: str
    size: int = 1


def _command(name: str) -> type[Command]:
    return msgspec.defstruct(name, [("job_id", str)], bases=(Keyed, Command), kw_only=True)  # type: ignore[return-value]


def _event(name: str) -> type[Event]:
    fields: list[Any] = [("job_id", str), ("reason", str, "")]
    return msgspec.defstruct(name, fields, bases=(Keyed, Event), kw_only=True, frozen=True)  # type: ignore[return-value]


Do = {n: _command(f"StateTest{n}Command") for n in ("A", "B", "C", "Pay", "Ship")}
Undo = {n: _command(f"StateTestUndo{n}Command") for n in ("Start", "A", "B", "C", "Pay")}
Done = {n: _event(f"StateTest{n}DoneEvent") for n in ("A", "B", "C", "Pay", "Ship")}
Failed = {n: _event(f"StateTest{n}FailedEvent") for n in ("A", "B", "C", "Pay")}
Undone = {n: _event(f"StateTest{n}UndoneEvent") for n in ("Start", "A", "B", "C", "Pay")}


def step(name: str, /, **changes: Any) -> Step:
    fields: dict[str, Any] = {
        "name": name.lower(),
        "command": lambda d, n=name: Do[n](job_id=d["jobId"]),
        "success": Done[name],
        "failures": (Failed[name],),
        "compensation": lambda d, n=name: Undo[n](job_id=d["jobId"]),
        "compensated": Undone[name],
    }
    fields.update(changes)
    return Step(**fields)


START = Step(
    name="start",
    compensation=lambda d: Undo["Start"](job_id=d["jobId"]),
    compensated=Undone["Start"],
)


def define(*steps: Step | Parallel, **options: Any) -> SagaDefinition:
    return SagaDefinition(name="job", start=JobStarted, steps=(START, *steps), **options)


class Play:
    """One saga instance and the signals played into it."""

    def __init__(self, definition: SagaDefinition) -> None:
        self.definition = definition
        self.record: SagaRecord | None = None
        self.count = 0

    def _ids(self) -> dict[str, Any]:
        self.count += 1
        return {"at": f"t{self.count}", "message_id": f"m-{self.count}"}

    def _after(self, moved: Transition) -> Transition:
        assert moved.record is not None
        self.record = moved.record
        self.record.history.extend(self.record.new_history)
        self.record.new_history = []
        return moved

    def start(self) -> Transition:
        return self.event(JobStarted(job_id="J-1"))

    def event(self, event: Event) -> Transition:
        return self._after(advance(self.definition, "J-1", self.record, event, **self._ids()))

    def done(self, name: str) -> Transition:
        return self.event(Done[name](job_id="J-1"))

    def failed(self, name: str, reason: str = "no") -> Transition:
        return self.event(Failed[name](job_id="J-1", reason=reason))

    def undone(self, name: str) -> Transition:
        return self.event(Undone[name](job_id="J-1"))

    def fire(self, moved: Transition, kind: str, step: str = "") -> Transition:
        """Fire the timer of ``kind`` (for ``step``) that ``moved`` set."""
        [timer] = [t for t in moved.timers if t.kind == kind and t.step == step]
        assert self.record is not None
        return self._after(
            on_timer(
                self.definition,
                self.record,
                kind=timer.kind,
                step=timer.step,
                attempt=timer.attempt,
                undo=timer.undo,
                timer_id=timer.timer_id,
                **self._ids(),
            )
        )

    def dead(self, step: str, *, undo: bool = False) -> Transition:
        assert self.record is not None
        return self._after(
            on_dead_letter(
                self.definition,
                self.record,
                step=step,
                undo=undo,
                reason="poison",
                dead_letter="saga:job:J-1:x:1",
                **self._ids(),
            )
        )

    def act(self, action: str, definition: SagaDefinition | None = None) -> Transition:
        assert self.record is not None
        return self._after(
            on_action(
                definition or self.definition,
                self.record,
                action=action,
                by="ops",
                reason="ticket 7",
                **self._ids(),
            )
        )

    @property
    def status(self) -> Any:
        """The saga's status now (typed loosely: it changes between two reads)."""
        assert self.record is not None
        return SagaStatus(self.record.status)

    @property
    def transitions(self) -> Iterator[str]:
        assert self.record is not None
        return (entry["transition"] for entry in self.record.history)


def sends(moved: Transition) -> list[tuple[str, bool, int]]:
    return [(s.step, s.undo, s.attempt) for s in moved.sends]


def test_a_saga_runs_its_steps_and_completes_without_timers() -> None:
    play = Play(
        define(step("A"), step("Pay", kind=StepKind.PIVOT, compensation=None, compensated=None))
    )
    assert sends(play.start()) == [("a", False, 1)]
    assert sends(play.done("A")) == [("pay", False, 1)]
    moved = play.done("Pay")
    assert moved.completed and play.status is SagaStatus.COMPLETED
    assert moved.timers == [] and moved.cancels == []


def test_a_step_timeout_fails_the_step_and_compensates() -> None:
    play = Play(define(step("A"), step("B", timeout=30)))
    play.start()
    moved = play.done("A")
    [timer] = moved.timers
    assert (timer.kind, timer.step, timer.after) == ("timeout", "b", 30)
    moved = play.fire(moved, "timeout", "b")
    assert play.status == SagaStatus.COMPENSATING
    assert sends(moved) == [("a", True, 1)]
    assert play.record is not None
    assert play.record.data["_failure"]["reason"] == "step b timed out after 30 s"
    play.undone("A")
    play.undone("Start")
    assert play.status == SagaStatus.COMPENSATED


def test_an_answer_in_time_cancels_the_timeout() -> None:
    play = Play(define(step("A", timeout=30)))
    set_by = play.start()
    moved = play.done("A")
    assert moved.cancels == [set_by.timers[0].timer_id]
    assert moved.completed


def test_a_late_success_after_a_timeout_is_compensated_too() -> None:
    pay = step("Pay", kind=StepKind.PIVOT, timeout=10)
    play = Play(define(step("A"), pay))
    play.start()
    moved = play.fire(play.done("A"), "timeout", "pay")
    assert sends(moved) == [("a", True, 1)]
    play.undone("A")
    play.undone("Start")
    assert play.status == SagaStatus.COMPENSATED
    # The payment service answers after all: the charge is refunded.
    late = play.done("Pay")
    assert sends(late) == [("pay", True, 1)]
    assert play.status == SagaStatus.COMPENSATED
    play.undone("Pay")
    assert "step pay compensated (after its late success)" in list(play.transitions)


def test_a_transient_failure_is_retried_and_succeeds_on_the_third_try() -> None:
    policy = StepRetry(attempts=3, backoff=2, multiplier=2, jitter=0, transient=("busy",))
    play = Play(define(step("A", retry=policy)))
    play.start()
    moved = play.failed("A", "provider busy")
    assert moved.sends == [] and [(t.kind, t.after) for t in moved.timers] == [("retry", 2)]
    assert sends(play.fire(moved, "retry", "a")) == [("a", False, 2)]
    moved = play.failed("A", "provider busy")
    assert [(t.kind, t.after) for t in moved.timers] == [("retry", 4)]
    assert sends(play.fire(moved, "retry", "a")) == [("a", False, 3)]
    assert play.done("A").completed


def test_retries_give_up_after_their_attempts_and_a_permanent_failure_is_not_retried() -> None:
    policy = StepRetry(attempts=2, backoff=1, jitter=0, transient=("busy",))
    play = Play(define(step("A", retry=policy)))
    play.start()
    play.fire(play.failed("A", "busy"), "retry", "a")
    moved = play.failed("A", "busy")
    assert play.status == SagaStatus.COMPENSATING and sends(moved) == [("start", True, 1)]

    again = Play(define(step("A", retry=policy)))
    again.start()
    again.failed("A", "card stolen")
    assert again.status == SagaStatus.COMPENSATING


def test_jitter_is_the_same_for_the_same_saga_step_and_try() -> None:
    policy = StepRetry(backoff=10, jitter=0.5)
    assert policy.delay(1, "job:J-1a") == policy.delay(1, "job:J-1a")
    assert policy.delay(1, "job:J-1a") != policy.delay(1, "job:J-2a")
    assert all(5 <= policy.delay(1, f"s{n}") <= 15 for n in range(50))
    assert StepRetry(backoff=10, multiplier=3, cap=50, jitter=0).delay(4) == 50


def test_a_dead_lettered_command_fails_the_step_and_compensates() -> None:
    play = Play(define(step("A"), step("B")))
    play.start()
    play.done("A")
    moved = play.dead("b")
    assert play.status == SagaStatus.COMPENSATING
    assert sends(moved) == [("a", True, 1)]
    assert play.record is not None
    assert "dead-lettered: poison" in play.record.data["_failure"]["reason"]


def test_a_compensation_failing_past_its_policy_leaves_the_saga_stuck_until_retried() -> None:
    a = step("A", compensation_retry=StepRetry(attempts=2, backoff=5, jitter=0))
    play = Play(define(a, step("B")))
    play.start()
    play.done("A")
    play.failed("B")
    moved = play.dead("a", undo=True)
    assert play.status == SagaStatus.COMPENSATING and [t.kind for t in moved.timers] == ["retry"]
    assert sends(play.fire(moved, "retry", "a")) == [("a", True, 2)]
    play.dead("a", undo=True)
    assert play.status == SagaStatus.STUCK
    assert play.record is not None
    stuck = play.record.data["_stuck"]
    assert stuck["step"] == "a" and stuck["deadLetter"] == "saga:job:J-1:x:1"
    assert "compensation of a failed" in stuck["reason"]
    # Nothing moves it on its own; an operator retries, and this time it works.
    assert sends(play.act("retry")) == [("a", True, 3)]
    assert play.status == SagaStatus.COMPENSATING
    play.undone("A")
    play.undone("Start")
    assert play.status == SagaStatus.COMPENSATED


def test_a_compensation_timeout_without_retries_leaves_the_saga_stuck() -> None:
    play = Play(define(step("A", compensation_timeout=60), step("B")))
    play.start()
    play.done("A")
    moved = play.failed("B")
    play.fire(moved, "timeout", "a")
    assert play.status == SagaStatus.STUCK


def test_operator_skip_marks_the_compensation_done_by_hand() -> None:
    play = Play(define(step("A"), step("B")))
    play.start()
    play.done("A")
    play.failed("B")
    play.dead("a", undo=True)
    assert play.status == SagaStatus.STUCK
    moved = play.act("skip")
    assert sends(moved) == [("start", True, 1)]
    play.undone("Start")
    assert play.status == SagaStatus.COMPENSATED
    assert play.record is not None
    assert play.record.data["_steps"]["a"]["s"] == "skipped"
    [entry] = [e for e in play.record.history if "skipped by" in e["transition"]]
    assert (entry["by"], entry["reason"]) == ("ops", "ticket 7")


def test_operator_compensate_gives_up_on_a_running_saga() -> None:
    play = Play(define(step("A"), step("B")))
    play.start()
    play.done("A")
    moved = play.act("compensate")
    assert play.status == SagaStatus.COMPENSATING and sends(moved) == [("a", True, 1)]
    # B answers after all: it is compensated too, after A's compensation.
    play.done("B")
    assert play.record is not None and play.record.data["_compensations"] == ["a", "b", "start"]


def test_operator_abort_ends_the_saga_failed_and_cancels_its_timers() -> None:
    play = Play(define(step("A", timeout=5), deadline=600))
    started = play.start()
    moved = play.act("abort")
    assert play.status == SagaStatus.FAILED
    assert sorted(moved.cancels) == sorted(t.timer_id for t in started.timers)
    assert play.done("A").sends == []


@pytest.mark.parametrize(
    ("setup", "action", "words"),
    [
        ("completed", "retry", "has ended COMPLETED"),
        ("running", "skip", "only a compensation can be skipped"),
        ("compensating", "compensate", "only a RUNNING saga can be compensated"),
        ("running", "dance", "unknown action"),
    ],
)
def test_operator_actions_the_state_does_not_allow_are_refused(
    setup: str, action: str, words: str
) -> None:
    play = Play(define(step("A"), step("B")))
    play.start()
    if setup == "completed":
        play.done("A")
        play.done("B")
    if setup == "compensating":
        play.failed("A")
    assert play.record is not None
    assert words in action_refused(action, play.record, play.definition)
    before = (play.status, dict(play.record.data))
    moved = play.act(action)
    assert moved.sends == [] and (play.status, play.record.data) == before
    assert list(play.transitions)[-1].startswith(f"refused {action} by ops")


def test_the_deadline_fails_a_running_saga() -> None:
    play = Play(define(step("A"), deadline=120))
    started = play.start()
    moved = play.fire(started, "deadline")
    assert play.status == SagaStatus.COMPENSATING
    assert play.record is not None
    assert play.record.data["_failure"]["reason"] == "the saga's deadline of 120 s passed"
    assert sends(moved) == [("start", True, 1)]


def test_a_parallel_group_with_one_failure_and_one_late_success() -> None:
    group = Parallel("book", (step("A"), step("B"), step("C")))
    play = Play(
        define(group, step("Pay", kind=StepKind.PIVOT, compensation=None, compensated=None))
    )
    assert sends(play.start()) == [("a", False, 1), ("b", False, 1), ("c", False, 1)]
    play.done("A")
    moved = play.failed("B")
    # A succeeded: compensated; C is still running: compensated when it answers.
    assert play.status == SagaStatus.COMPENSATING and sends(moved) == [("a", True, 1)]
    moved = play.done("C")
    play.undone("A")
    assert play.record is not None and play.record.data["_compensations"][0] == "c"
    play.undone("C")
    play.undone("Start")
    assert play.status == SagaStatus.COMPENSATED
    assert play.record.data["_steps"]["c"]["s"] == "compensated"


def test_a_parallel_group_succeeds_when_every_member_has() -> None:
    group = Parallel("book", (step("A"), step("B")))
    play = Play(define(group, step("C")))
    play.start()
    assert play.done("B").sends == []
    assert sends(play.done("A")) == [("c", False, 1)]


def test_a_retriable_step_is_sent_again_on_timeout() -> None:
    ship = Step(
        name="ship",
        command=lambda d: Do["Ship"](job_id=d["jobId"]),
        success=Done["Ship"],
        kind=StepKind.RETRIABLE,
        timeout=60,
    )
    pay = step("Pay", kind=StepKind.PIVOT, compensation=None, compensated=None)
    play = Play(define(pay, ship))
    play.start()
    moved = play.done("Pay")
    moved = play.fire(moved, "timeout", "ship")
    assert sends(moved) == [("ship", False, 2)] and play.status is SagaStatus.RUNNING
    assert play.done("Ship").completed


def test_builders_get_typed_state_and_the_view() -> None:
    class JobState(msgspec.Struct, rename="camel"):
        job_id: str
        size: int

    seen: list[tuple[Any, SagaView]] = []

    def build(state: JobState, view: SagaView) -> Command:
        seen.append((state, view))
        return Do["A"](job_id=state.job_id)

    definition = define(step("A", command=build), state=JobState)
    play = Play(definition)
    moved = play.start()
    assert play.record is not None
    view = SagaView("job:J-1", "a", 1, "saga:job:J-1:a")
    assert definition.build(build, play.record.data, view) == Do["A"](job_id="J-1")
    [(state, got)] = seen
    assert state == JobState(job_id="J-1", size=1) and got == view
    assert sends(moved) == [("a", False, 1)]


@pytest.mark.parametrize(
    ("steps", "words"),
    [
        ((Parallel("g", (step("A"),)),), "at least two"),
        ((Parallel("g", (step("A"), step("A", name="a2"))),), "event types of their own"),
        ((step("A", timeout=0),), "timeout must be positive"),
        (
            (
                step(
                    "A",
                    compensation=None,
                    compensated=None,
                    kind=StepKind.PIVOT,
                    compensation_retry=StepRetry(),
                ),
            ),
            "no compensation",
        ),
    ],
)
def test_definitions_with_bad_timing_or_groups_are_refused(
    steps: tuple[Step | Parallel, ...], words: str
) -> None:
    with pytest.raises(SagaDefinitionError, match=words):
        define(*steps)


def test_describe_draws_a_group_as_a_fork_and_a_join_with_its_timing() -> None:
    from sagaline.saga.describe import describe

    group = Parallel("book", (step("A", timeout=30), step("B", retry=StepRetry(attempts=4))))
    described = describe(define(group, step("C"), deadline=600))
    lines = described.mermaid.splitlines()
    assert "    state book_fork <<fork>>" in lines
    assert "    state book_join <<join>>" in lines
    assert "    start --> book_fork" in lines
    assert {"    book_fork --> a", "    book_fork --> b", "    book_join --> c"} <= set(lines)
    assert "    a --> book_join: StateTestADoneEvent" in lines
    assert "    a: a sends StateTestACommand (timeout 30 s)" in lines
    assert "    b: b sends StateTestBCommand (up to 4 tries)" in lines
    assert "    a --> compensating: no answer in 30 s" in lines
    by_name = {s.name: s for s in described.steps}
    assert (by_name["a"].group, by_name["a"].timeout) == ("book", 30)
    assert (by_name["b"].group, by_name["b"].attempts) == ("book", 4)
    assert by_name["c"].group is None and described.deadline == 600
