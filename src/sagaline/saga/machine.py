"""The saga state machine's work on one record: what each signal does, step by step.

:class:`Machine` holds one record and the :class:`~sagaline.saga.transition.Transition` being
built; the signal functions of :mod:`sagaline.saga.state` make one per signal. Per step the
record keeps, in ``data["_steps"]``, its state and how many times its command and its
compensation were sent (``{"s": "running", "n": 1, "c": 0}``); ``data["_compensations"]`` holds
the compensations still due, in order, ``data["_failure"]`` why the saga is compensating,
``data["_stuck"]`` why it is STUCK, ``data["_timers"]`` the ids of its timers still set.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

import msgspec

from sagaline.messages import Event, Message
from sagaline.ports import SagaRecord
from sagaline.saga.definition import SagaDefinition, SagaStatus, Step, StepKind
from sagaline.saga.transition import (
    ABANDONED,
    COMPENSATED,
    COMPENSATING,
    FAILED,
    RETRYING,
    RUNNING,
    SKIPPED,
    STUCK,
    SUCCEEDED,
    UNDO_RETRYING,
    Send,
    Timer,
    Transition,
    saga_id,
)

__all__ = ["Machine"]


class Machine:
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
        # A tag of this instance, in the ids of its commands and timers: an instance started
        # again under the same saga id (its store reset) never sends an id a broker remembers.
        data["_tag"] = hashlib.blake2b(message_id.encode(), digest_size=4).hexdigest()
        machine.note("started")
        if definition.deadline is not None:
            machine.set_timer("deadline", "", 0, False, definition.deadline)
        machine.run_stage(0)
        return machine.transition

    # -------------------------------------------------------------- timers

    @property
    def base(self) -> str:
        """The saga id with its instance's tag: what its timers' ids start with."""
        tag = self.record.data.get("_tag")
        return f"{self.record.saga_id}.{tag}" if tag else self.record.saga_id

    def timer_id(self, kind: str, step: str, attempt: int, undo: bool) -> str:
        if kind == "deadline":
            return f"{self.base}:deadline"
        return f"{self.base}:{step}:{'u' if undo else ''}{attempt}:{kind}"

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
        prefix = f"{self.base}:{name}:"
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
