"""How a saga instance moves: the one state machine of the orchestrator and the monitor.

Four kinds of signal move an instance: an event of one of its steps (:func:`advance`), one of its
timers firing (a step's timeout, a retry's backoff, the saga's deadline: :func:`on_timer`), one
of its commands dead-lettered (:func:`on_dead_letter`), and an operator's action
(:func:`on_action`). Each changes the record in place (status, stage, data, a history entry) and
returns a :class:`Transition` saying what it calls for: commands to send (a step's, a
compensation's), timers to set and to cancel, the completion event. It does no I/O. The
orchestrator (:mod:`sagaline.saga.engine`) does what it calls for; the passive monitor of a
choreography (:mod:`sagaline.saga.monitor`) only records it.

Per step the record keeps, in ``data["_steps"]``, its state and how many times its command and
its compensation were sent (``{"s": "running", "n": 1, "c": 0}``); ``data["_compensations"]``
holds the compensations still due, in order, ``data["_failure"]`` why the saga is compensating,
``data["_stuck"]`` why it is STUCK, ``data["_timers"]`` the ids of its timers still set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from sagaline.errors import ConfigurationError
from sagaline.messages import Event, Message
from sagaline.ports import SagaRecord
from sagaline.saga.definition import SagaDefinition, SagaStatus, Step, StepKind

__all__ = [
    "ACTIONS",
    "SagaView",
    "Send",
    "Timer",
    "Transition",
    "action_refused",
    "advance",
    "correlation_key",
    "idempotency_key",
    "on_action",
    "on_dead_letter",
    "on_timer",
    "saga_id",
    "version_gone",
]

#: What an operator may do to a saga (see :func:`on_action`).
ACTIONS = ("retry", "compensate", "skip", "abort")

# A step's states, as ``data["_steps"][name]["s"]`` holds them.
RUNNING = "running"  # its command sent, no answer yet
RETRYING = "retrying"  # a try failed; the next is due when its retry timer fires
SUCCEEDED = "succeeded"
FAILED = "failed"
ABANDONED = "abandoned"  # sent, given up on (timed out, or the saga failed meanwhile)
COMPENSATING = "compensating"  # its compensation sent
UNDO_RETRYING = "undo-retrying"  # a compensation try failed; the next is due on its timer
COMPENSATED = "compensated"
SKIPPED = "skipped"  # compensated by hand, an operator said
STUCK = "stuck"  # its compensation could not succeed within its policy


def saga_id(definition: SagaDefinition, key: str) -> str:
    """The id of the instance of ``definition`` for business key ``key``."""
    return f"{definition.name}:{key}"


def idempotency_key(saga: str, step: str, *, undo: bool = False) -> str:
    """The key every try of one step's command (or compensation) carries: the saga and the
    step, never the attempt, so that a provider called again with it does the work once."""
    return f"{saga}:{step}:undo" if undo else f"{saga}:{step}"


def correlation_key(definition: SagaDefinition, event: Event) -> str:
    """The business key ``event`` carries for ``definition`` (its ``correlation_field``)."""
    key = getattr(event, definition.correlation_attribute, None)
    if not isinstance(key, str):
        raise ConfigurationError(
            f"{event.type_name()} has no {definition.correlation_field} to correlate"
            f" saga {definition.name!r}"
        )
    return key


@dataclass(frozen=True, slots=True)
class Send:
    """A command due: step ``step``'s (or, ``undo``, its compensation), try ``attempt``."""

    step: str
    undo: bool
    attempt: int


@dataclass(frozen=True, slots=True)
class Timer:
    """A timer to set: ``kind`` (``timeout``, ``retry`` or ``deadline``) for ``step`` (empty for
    the deadline) and try ``attempt`` (of the compensation when ``undo``), due ``after`` seconds
    from the unit of work that sets it."""

    timer_id: str
    kind: str
    step: str
    attempt: int
    undo: bool
    after: float


@dataclass(frozen=True, slots=True)
class SagaView:
    """What a builder may learn of the instance besides its state (its optional second
    argument): the saga id, the step and try it builds for, the key of that command, and why
    the saga is compensating (``{"step", "event", "reason"}``) once it is."""

    saga_id: str
    step: str
    attempt: int
    idempotency_key: str
    failure: Mapping[str, str] | None = None


@dataclass(slots=True)
class Transition:
    """What one signal did to a saga instance, and what it calls for.

    ``record`` is the instance to write back (None when an event matched no instance and starts
    none). ``sends`` are the commands now due, ``timers`` the timers to set and ``cancels`` the
    ids of those to cancel; ``completed`` says whether the saga just completed.
    """

    record: SagaRecord | None
    sends: list[Send] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    completed: bool = False

    @property
    def run(self) -> list[str]:
        """The steps whose command is now due."""
        return [s.step for s in self.sends if not s.undo]

    @property
    def compensate(self) -> list[str]:
        """The steps whose compensation is now due."""
        return [s.step for s in self.sends if s.undo]


def version_gone(record: SagaRecord, versions: list[int]) -> str:
    """Why ``record`` cannot go on: its definition version is not among ``versions``."""
    deployed = ", ".join(str(v) for v in sorted(versions)) or "none"
    return (
        f"version {record.definition_version} of saga {record.definition!r} is not deployed"
        f" (deployed: {deployed})"
    )


# ------------------------------------------------------------------ the signals


def advance(
    definition: SagaDefinition,
    key: str,
    record: SagaRecord | None,
    event: Event,
    *,
    at: str,
    message_id: str,
    compensations_in_order: bool = True,
) -> Transition:
    """Apply ``event`` to ``record`` (the instance of ``definition`` for ``key``, None if none).

    ``compensations_in_order``: a compensation is confirmed only in the order of the plan (the
    orchestrator, which asks for one at a time); otherwise any planned compensation may be
    confirmed first (a choreography, where services compensate as they hear of the failure).
    """
    event_type = event.wire_name
    roles = definition.handles(event_type)
    if record is None:
        if any(role == "start" for _, role in roles):
            return _Machine.start(definition, key, event, at, message_id)
        return Transition(None)
    machine = _Machine(definition, record, at, message_id, event_type)
    machine.on_event(event, roles, compensations_in_order)
    return machine.transition


def on_timer(
    definition: SagaDefinition,
    record: SagaRecord,
    *,
    kind: str,
    step: str,
    attempt: int,
    undo: bool,
    timer_id: str,
    at: str,
    message_id: str,
) -> Transition:
    """The timer ``timer_id`` of ``record`` fired: a try timed out, a retry is due, or the
    deadline passed. A timer that no longer matches what the instance waits for is noted only."""
    machine = _Machine(definition, record, at, message_id, "SagaTimerFired")
    machine.on_timer(kind, step, attempt, undo, timer_id)
    return machine.transition


def on_dead_letter(
    definition: SagaDefinition,
    record: SagaRecord,
    *,
    step: str,
    undo: bool,
    reason: str,
    dead_letter: str,
    at: str,
    message_id: str,
) -> Transition:
    """A command of ``record`` (step ``step``'s, or its compensation) was dead-lettered: the
    step fails (a compensation is tried again within its policy, else the saga is STUCK)."""
    machine = _Machine(definition, record, at, message_id, "MessageDeadLettered")
    machine.on_dead_letter(step, undo, reason, dead_letter)
    return machine.transition


def action_refused(action: str, record: SagaRecord, definition: SagaDefinition | None) -> str:
    """Why ``action`` cannot be done to ``record`` now ("" when it can)."""
    status = SagaStatus(record.status)
    if action not in ACTIONS:
        return f"unknown action {action!r} (one of {', '.join(ACTIONS)})"
    if status.terminal:
        return f"saga {record.saga_id} has ended {status.value}; nothing to {action}"
    if definition is None:
        if action == "abort":
            return ""
        return (
            f"saga {record.saga_id} runs version {record.definition_version} of"
            f" {record.definition!r}, which is not deployed: deploy it, or abort the saga"
        )
    if action == "compensate" and status is not SagaStatus.RUNNING:
        return f"saga {record.saga_id} is {status.value}: only a RUNNING saga can be compensated"
    if action == "skip":
        plan = record.data.get("_compensations") or []
        if status not in (SagaStatus.COMPENSATING, SagaStatus.STUCK) or not plan:
            return (
                f"saga {record.saga_id} is {status.value}: only a compensation can be skipped"
                " (COMPENSATING or STUCK)"
            )
    if action == "retry" and status is SagaStatus.STUCK and not record.data.get("_compensations"):
        return f"saga {record.saga_id} is STUCK with no compensation to retry"
    return ""


def on_action(
    definition: SagaDefinition | None,
    record: SagaRecord,
    *,
    action: str,
    by: str,
    reason: str,
    at: str,
    message_id: str,
) -> Transition:
    """An operator's ``action`` (:data:`ACTIONS`) on ``record``, by ``by`` for ``reason``.

    ``retry`` sends the current step's command or compensation again; ``compensate`` gives up
    on a RUNNING saga and compensates what completed; ``skip`` marks the current compensation
    done by hand; ``abort`` ends the saga FAILED without compensating. Each is noted in the
    history with who and why; one the state does not allow is noted as refused.
    """
    machine = _Machine(definition, record, at, message_id, "SagaActionRequested")  # type: ignore[arg-type]
    refused = action_refused(action, record, definition)
    if refused:
        machine.note(f"refused {action} by {by}: {refused}", by=by, reason=reason)
        return machine.transition
    machine.on_action(action, by, reason)
    return machine.transition


# ------------------------------------------------------------------ the machine


class _Machine:
    """One signal's work on one record: the record changes in place, the transition collects
    what it calls for."""

    def __init__(
        self,
        definition: SagaDefinition,
        record: SagaRecord,
        at: str,
        message_id: str,
        what: str,
    ) -> None:
        self.definition = definition
        self.record = record
        self.at = at
        self.message_id = message_id
        self.what = what
        self.transition = Transition(record)
        data = record.data
        self.steps: dict[str, dict[str, Any]] = data.setdefault("_steps", {})
        self.timers: list[str] = data.setdefault("_timers", [])
        plan = data.setdefault("_compensations", [])
        if plan and isinstance(plan[0], int) and definition is not None:
            # A record written before plans named their steps: the same steps, by name.
            everything = definition.all_steps()
            data["_compensations"] = [everything[i].name for i in plan]
        if definition is not None and not self.steps and record.step > 0:
            # A record written before steps kept their states: the stages before its own ran.
            for stage in definition.stages[: record.step]:
                for step in stage:
                    self.steps[step.name] = {"s": SUCCEEDED, "n": 1, "c": 0}

    @property
    def status(self) -> SagaStatus:
        return SagaStatus(self.record.status)

    @property
    def plan(self) -> list[str]:
        plan: list[str] = self.record.data["_compensations"]
        return plan

    # -------------------------------------------------------------- history

    def note(self, transition: str, **extra: Any) -> None:
        entry = {
            "at": self.at,
            "event": self.what,
            "messageId": self.message_id,
            "transition": transition,
        }
        entry.update(extra)
        self.record.new_history.append(entry)

    def _set_status(self, status: SagaStatus) -> None:
        self.record.status = status
        if self.record.new_history:
            self.record.new_history[-1]["status"] = status

    def state(self, name: str) -> dict[str, Any]:
        return self.steps.setdefault(name, {"s": "", "n": 0, "c": 0})

    # -------------------------------------------------------------- start

    @classmethod
    def start(
        cls, definition: SagaDefinition, key: str, event: Event, at: str, message_id: str
    ) -> Transition:
        data: dict[str, Any] = msgspec.to_builtins(event, builtin_types=(Decimal,))
        data.pop(event.discriminator, None)
        record = SagaRecord(
            saga_id=saga_id(definition, key),
            definition=definition.name,
            definition_version=definition.version,
            status=SagaStatus.RUNNING,
            step=0,
            data=data,
        )
        machine = cls(definition, record, at, message_id, event.type_name())
        machine.note("started")
        if definition.deadline is not None:
            machine.set_timer("deadline", "", 0, False, definition.deadline)
        machine.run_stage(0)
        return machine.transition

    # -------------------------------------------------------------- timers

    def timer_id(self, kind: str, step: str, attempt: int, undo: bool) -> str:
        if kind == "deadline":
            return f"{self.record.saga_id}:deadline"
        return f"{self.record.saga_id}:{step}:{'u' if undo else ''}{attempt}:{kind}"

    def set_timer(self, kind: str, step: str, attempt: int, undo: bool, after: float) -> None:
        timer_id = self.timer_id(kind, step, attempt, undo)
        self.transition.timers.append(Timer(timer_id, kind, step, attempt, undo, after))
        if timer_id not in self.timers:
            self.timers.append(timer_id)

    def cancel_timer(self, timer_id: str) -> None:
        if timer_id not in self.timers:
            return
        self.timers.remove(timer_id)
        setting = [t for t in self.transition.timers if t.timer_id == timer_id]
        if setting:  # set by this very transition: it is simply not set
            self.transition.timers.remove(setting[0])
        else:
            self.transition.cancels.append(timer_id)

    def cancel_step_timers(self, name: str) -> None:
        prefix = f"{self.record.saga_id}:{name}:"
        for timer_id in [t for t in self.timers if t.startswith(prefix)]:
            self.cancel_timer(timer_id)

    def cancel_all_timers(self) -> None:
        for timer_id in list(self.timers):
            self.cancel_timer(timer_id)

    # -------------------------------------------------------------- forward

    def run_stage(self, position: int) -> None:
        """Send every command of stage ``position`` (or complete the saga past the last)."""
        stages = self.definition.stages
        while position < len(stages) and all(s.command is None for s in stages[position]):
            for step in stages[position]:
                self.state(step.name).update(s=SUCCEEDED)
            position += 1
        if position >= len(stages):
            self.record.step = len(stages)
            self.cancel_all_timers()
            self._set_status(SagaStatus.COMPLETED)
            self.transition.completed = True
            return
        self.record.step = position
        for step in stages[position]:
            self.send(step)

    def send(self, step: Step) -> None:
        state = self.state(step.name)
        state["n"] += 1
        state["s"] = RUNNING
        self.transition.sends.append(Send(step.name, False, state["n"]))
        if step.timeout is not None:
            self.set_timer("timeout", step.name, state["n"], False, step.timeout)

    def succeed(self, step: Step, event: Event) -> None:
        state = self.state(step.name)
        self.cancel_step_timers(step.name)
        state["s"] = SUCCEEDED
        if step.keep:
            body = msgspec.to_builtins(event, builtin_types=(Decimal,))
            for name in step.keep:
                self.record.data[name] = body.get(name)
        stage = self.definition.stages[self.record.step]
        waiting = [s.name for s in stage if self.state(s.name)["s"] != SUCCEEDED]
        if waiting:
            self.note(f"step {step.name} succeeded; waiting for {', '.join(waiting)}")
            return
        self.note(f"step {step.name} succeeded")
        self.run_stage(self.record.step + 1)

    def try_failed(self, step: Step, cause: str, reason: str, *, transient: bool) -> None:
        """A try of ``step`` failed: another try if the policy allows, else the step fails."""
        state = self.state(step.name)
        tries = step.tries()
        if transient and (tries == 0 or state["n"] < tries):
            self.cancel_step_timers(step.name)
            policy = step.retry
            delay = policy.delay(state["n"], self.record.saga_id + step.name) if policy else 0.0
            self.note(f"step {step.name} try {state['n']} failed ({reason}); retrying")
            if delay > 0:
                state["s"] = RETRYING
                self.set_timer("retry", step.name, state["n"], False, delay)
            else:
                self.send(step)
            return
        if step.kind is StepKind.RETRIABLE:
            self.cancel_step_timers(step.name)
            state["s"] = FAILED
            self.stuck(step.name, f"retriable step {step.name} gave up: {reason}", "")
            return
        self.fail([step.name], cause, reason, abandoned=cause == "timeout")

    def fail(self, names: list[str], cause: str, reason: str, *, abandoned: bool = False) -> None:
        """Steps ``names`` of the current stage failed: compensate what succeeded."""
        for name in names:
            self.cancel_step_timers(name)
            self.state(name)["s"] = ABANDONED if abandoned else FAILED
        stage = self.definition.stages[self.record.step]
        for step in stage:
            state = self.state(step.name)
            if state["s"] in (RUNNING, RETRYING):
                self.cancel_step_timers(step.name)
                state["s"] = ABANDONED
        succeeded = [n for n, s in self.steps.items() if s["s"] == SUCCEEDED]
        first = names[0] if names else stage[0].name
        self.record.data["_failure"] = {"step": first, "event": cause, "reason": reason}
        self.record.data["_compensations"] = self.definition.plan_for(succeeded, names)
        self.cancel_timer(self.timer_id("deadline", "", 0, False))
        self.note(f"step {first} failed: {reason}")
        self._set_status(SagaStatus.COMPENSATING)
        self.compensate_next()

    # -------------------------------------------------------------- compensation

    def compensate_next(self) -> None:
        plan = self.plan
        if not plan:
            self._set_status(SagaStatus.COMPENSATED)
            return
        head = plan[0]
        self.record.step = self.definition.stage_of(head)
        if self.state(head)["s"] not in (COMPENSATING, UNDO_RETRYING):
            self.send_compensation(self.definition.step(head))

    def send_compensation(self, step: Step) -> None:
        state = self.state(step.name)
        state["c"] += 1
        state["s"] = COMPENSATING
        self.transition.sends.append(Send(step.name, True, state["c"]))
        if step.compensation_timeout is not None:
            self.set_timer("timeout", step.name, state["c"], True, step.compensation_timeout)

    def compensated(self, step: Step) -> None:
        self.cancel_step_timers(step.name)
        self.state(step.name)["s"] = COMPENSATED
        if step.name in self.plan:
            self.plan.remove(step.name)
            self.note(f"step {step.name} compensated")
            if self.status is SagaStatus.COMPENSATING:
                self.compensate_next()
            return
        self.note(f"step {step.name} compensated (after its late success)")

    def compensation_failed(self, step: Step, reason: str, dead_letter: str) -> None:
        state = self.state(step.name)
        self.cancel_step_timers(step.name)
        policy = step.compensation_retry
        if policy is not None and state["c"] < policy.attempts:
            self.note(f"compensation of {step.name} try {state['c']} failed ({reason}); retrying")
            delay = policy.delay(state["c"], self.record.saga_id + step.name + ":undo")
            if delay > 0:
                state["s"] = UNDO_RETRYING
                self.set_timer("retry", step.name, state["c"], True, delay)
            else:
                self.send_compensation(step)
            return
        state["s"] = STUCK
        if step.name not in self.plan:
            # A late success's compensation: the saga had ended; note it, the dead letter stays.
            self.note(f"compensation of {step.name} (after its late success) failed: {reason}")
            return
        self.stuck(step.name, f"compensation of {step.name} failed: {reason}", dead_letter)

    def stuck(self, name: str, reason: str, dead_letter: str) -> None:
        self.record.data["_stuck"] = {"step": name, "reason": reason, "deadLetter": dead_letter}
        self.cancel_timer(self.timer_id("deadline", "", 0, False))
        self.note(reason)
        self._set_status(SagaStatus.STUCK)

    def late_success(self, step: Step) -> None:
        """``step`` succeeded after the saga gave up on it: undo that too, if it can be."""
        state = self.state(step.name)
        state["s"] = SUCCEEDED
        if step.compensation is None:
            self.note(f"step {step.name} succeeded late; it has nothing to undo")
            return
        self.note(f"step {step.name} succeeded late; compensating it")
        if self.status is SagaStatus.COMPENSATING and self.plan:
            self.plan.insert(1, step.name)
            if self.state(self.plan[0])["s"] not in (COMPENSATING, UNDO_RETRYING):
                self.compensate_next()
            return
        if self.status is SagaStatus.COMPENSATING:
            self.plan.append(step.name)
            self.compensate_next()
            return
        self.send_compensation(step)

    # -------------------------------------------------------------- signals

    def on_event(self, event: Event, roles: list[tuple[str, str]], in_order: bool) -> None:
        status = self.status
        current = self.definition.stages[self.record.step] if status.value == "RUNNING" else ()
        current_names = {s.name for s in current}
        for name, role in roles:
            if not name:
                continue
            step = self.definition.step(name)
            state = self.state(name)["s"]
            if role == "success" and state == ABANDONED:
                self.late_success(step)
                return
            if status is SagaStatus.RUNNING and name in current_names:
                if role == "success" and state in (RUNNING, RETRYING):
                    self.succeed(step, event)
                    return
                if role == "failure" and state == RUNNING:
                    reason = _reason(event)
                    transient = step.retry is not None and step.retry.is_transient(event, reason)
                    self.try_failed(step, event.type_name(), reason, transient=transient)
                    return
            if role == "compensated" and self.accepts_compensated(name, state, in_order):
                if status is SagaStatus.STUCK and name in self.plan:
                    # Compensated after all (by hand, or by a try that outlived its timeout).
                    self.record.data.pop("_stuck", None)
                    self._set_status(SagaStatus.COMPENSATING)
                self.compensated(step)
                return
        if status.terminal:
            self.note("ignored: the saga has ended")
        else:
            self.note("ignored: not expected in this state")

    def accepts_compensated(self, name: str, state: str, in_order: bool) -> bool:
        """Whether a confirmation that step ``name`` (in ``state``) is compensated is due."""
        status = self.status
        if name not in self.plan:
            return state in (COMPENSATING, UNDO_RETRYING, STUCK)  # a late success's undoing
        if status is SagaStatus.STUCK:
            return self.plan[0] == name
        if status is not SagaStatus.COMPENSATING:
            return False
        # The orchestrator asks for one compensation at a time; the services of a
        # choreography compensate as they hear of the failure, in any order.
        return not in_order or self.plan[0] == name

    def on_timer(self, kind: str, name: str, attempt: int, undo: bool, timer_id: str) -> None:
        if timer_id in self.timers:
            self.timers.remove(timer_id)
        status = self.status
        if kind == "deadline":
            if status is SagaStatus.RUNNING:
                stage = self.definition.stages[self.record.step]
                waiting = [s.name for s in stage if self.state(s.name)["s"] != SUCCEEDED]
                assert self.definition.deadline is not None
                self.fail(
                    waiting,
                    "deadline",
                    f"the saga's deadline of {self.definition.deadline:g} s passed",
                    abandoned=True,
                )
                return
            self.note("ignored: the deadline passed after the saga moved on")
            return
        step = self.definition.step(name)
        state = self.state(name)
        if undo:
            if attempt != state["c"]:
                self.note("ignored: an earlier compensation try's timer")
                return
            if kind == "timeout" and state["s"] == COMPENSATING:
                assert step.compensation_timeout is not None
                reason = f"no answer within {step.compensation_timeout:g} s"
                self.compensation_failed(step, reason, "")
                return
            if kind == "retry" and state["s"] == UNDO_RETRYING:
                self.note(f"compensation of {name}: try {attempt + 1}")
                self.send_compensation(step)
                return
        else:
            if attempt != state["n"]:
                self.note("ignored: an earlier try's timer")
                return
            if kind == "timeout" and state["s"] == RUNNING and status is SagaStatus.RUNNING:
                assert step.timeout is not None
                reason = f"step {name} timed out after {step.timeout:g} s"
                transient = step.kind is StepKind.RETRIABLE or (
                    step.retry is not None and step.retry.on_timeout
                )
                self.try_failed(step, "timeout", reason, transient=transient)
                return
            if kind == "retry" and state["s"] == RETRYING and status is SagaStatus.RUNNING:
                self.note(f"step {name}: try {attempt + 1}")
                self.send(step)
                return
        self.note("ignored: the saga moved on")

    def on_dead_letter(self, name: str, undo: bool, reason: str, dead_letter: str) -> None:
        step = self.definition.step(name)
        state = self.state(name)
        reason = f"its {'compensation' if undo else 'command'} was dead-lettered: {reason}"
        if undo:
            if state["s"] == COMPENSATING:
                self.compensation_failed(step, reason, dead_letter)
                return
        elif state["s"] in (RUNNING, RETRYING) and self.status is SagaStatus.RUNNING:
            self.cancel_step_timers(name)
            if step.kind is StepKind.RETRIABLE:
                state["s"] = FAILED
                self.stuck(
                    name, f"retriable step {name} cannot be delivered: {reason}", dead_letter
                )
                return
            # Abandoned, not failed: an operator may yet replay the dead letter, and a success
            # that comes of it is compensated like any late one.
            self.fail([name], "dead letter", f"step {name} failed: {reason}", abandoned=True)
            return
        self.note(f"ignored: {reason}, but the saga no longer waits for it")

    def on_action(self, action: str, by: str, reason: str) -> None:
        who = {"by": by, "reason": reason}
        status = self.status
        if action == "abort":
            self.cancel_all_timers()
            self.note(f"aborted by {by}: {reason}", **who)
            self._set_status(SagaStatus.FAILED)
            return
        if action == "compensate":
            stage = self.definition.stages[self.record.step]
            waiting = [s.name for s in stage if self.state(s.name)["s"] != SUCCEEDED]
            self.note(f"compensation asked by {by}: {reason}", **who)
            self.fail(waiting, "operator", f"compensation asked by {by}: {reason}", abandoned=True)
            return
        if action == "skip":
            head = self.plan[0]
            self.cancel_step_timers(head)
            self.state(head)["s"] = SKIPPED
            self.plan.pop(0)
            self.record.data.pop("_stuck", None)
            self.note(f"compensation of {head} skipped by {by}: {reason}", **who)
            self._set_status(SagaStatus.COMPENSATING)
            self.compensate_next()
            return
        # retry
        if status is SagaStatus.RUNNING:
            stage = self.definition.stages[self.record.step]
            again = [s for s in stage if self.state(s.name)["s"] in (RUNNING, RETRYING)]
            self.note(f"retry asked by {by}: {reason}", **who)
            for step in again:
                self.cancel_step_timers(step.name)
                self.send(step)
            return
        undo = self.definition.step(self.plan[0])
        self.record.data.pop("_stuck", None)
        self.note(f"retry of compensation {undo.name} asked by {by}: {reason}", **who)
        self._set_status(SagaStatus.COMPENSATING)
        self.cancel_step_timers(undo.name)
        self.send_compensation(undo)


def _reason(event: Message) -> str:
    reason = getattr(event, "reason", None)
    return reason if isinstance(reason, str) else type(event).type_name()
