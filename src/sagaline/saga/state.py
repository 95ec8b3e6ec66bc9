"""How a saga instance moves: the one state machine of the orchestrator and the monitor.

Four kinds of signal move an instance: an event of one of its steps (:func:`advance`), one of its
timers firing (a step's timeout, a retry's backoff, the saga's deadline: :func:`on_timer`), one
of its commands dead-lettered (:func:`on_dead_letter`), and an operator's action
(:func:`on_action`). Each changes the record in place (status, stage, data, a history entry) and
returns a :class:`Transition` saying what it calls for: commands to send (a step's, a
compensation's), timers to set and to cancel, the completion event. It does no I/O. The
orchestrator (:mod:`sagaline.saga.engine`) does what it calls for; the passive monitor of a
choreography (:mod:`sagaline.saga.monitor`) only records it.

What a record keeps of its steps, and the machine itself, are in :mod:`sagaline.saga.machine`;
what a transition calls for in :mod:`sagaline.saga.transition`.
"""

from __future__ import annotations

from sagaline.errors import ConfigurationError
from sagaline.messages import Event
from sagaline.ports import SagaRecord
from sagaline.saga.definition import SagaDefinition, SagaStatus
from sagaline.saga.machine import Machine
from sagaline.saga.transition import (
    ACTIONS,
    SagaView,
    Send,
    Timer,
    Transition,
    saga_id,
)

__all__ = [
    "ACTIONS",
    "SagaView",
    "Send",
    "Timer",
    "Transition",
    "action_refused",
    "advance",
    "correlation_key",
    "on_action",
    "on_dead_letter",
    "on_timer",
    "saga_id",
    "version_gone",
]


def correlation_key(definition: SagaDefinition, event: Event) -> str:
    """The business key ``event`` carries for ``definition`` (its ``correlation_field``)."""
    key = getattr(event, definition.correlation_attribute, None)
    if not isinstance(key, str):
        raise ConfigurationError(
            f"{event.type_name()} has no {definition.correlation_field} to correlate"
            f" saga {definition.name!r}"
        )
    return key


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
            return Machine.start(definition, key, event, at, message_id)
        return Transition(None)
    machine = Machine(definition, record, at, message_id, event_type)
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
    machine = Machine(definition, record, at, message_id, "SagaTimerFired")
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
    machine = Machine(definition, record, at, message_id, "MessageDeadLettered")
    machine.on_dead_letter(step, undo, reason, dead_letter)
    return machine.transition


#: The actions that send a command (only a saga's orchestrator sends).
SENDING_ACTIONS = ("retry", "compensate")


def action_refused(
    action: str, record: SagaRecord, definition: SagaDefinition | None, *, sends: bool = True
) -> str:
    """Why ``action`` cannot be done to ``record`` now ("" when it can); ``sends``: the saga
    is kept by an orchestrator (not by a choreography's monitor, which sends nothing)."""
    status = SagaStatus(record.status)
    if action not in ACTIONS:
        return f"unknown action {action!r} (one of {', '.join(ACTIONS)})"
    if not sends and action in SENDING_ACTIONS:
        return (
            f"saga {record.saga_id} is followed by a choreography's monitor, which sends"
            f" nothing: {action} needs an orchestrator (skip and abort apply)"
        )
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
    sends: bool = True,
) -> Transition:
    """An operator's ``action`` (:data:`ACTIONS`) on ``record``, by ``by`` for ``reason``.

    ``retry`` sends the current step's command or compensation again; ``compensate`` gives up
    on a RUNNING saga and compensates what completed; ``skip`` marks the current compensation
    done by hand; ``abort`` ends the saga FAILED without compensating. Each is noted in the
    history with who and why; one the state does not allow is noted as refused.
    """
    machine = Machine(definition, record, at, message_id, "SagaActionRequested")  # type: ignore[arg-type]
    refused = action_refused(action, record, definition, sends=sends)
    if refused:
        machine.note(f"refused {action} by {by}: {refused}", by=by, reason=reason)
        return machine.transition
    machine.on_action(action, by, reason)
    return machine.transition
