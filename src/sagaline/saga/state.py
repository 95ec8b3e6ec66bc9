"""How an event moves a saga instance: the one state machine of the orchestrator and the monitor.

:func:`advance` applies an event to a saga record (status, step, data, a history entry) and says
what the transition calls for: the step whose command is now due, the compensation now due, or
the saga's completion. It does no I/O and sends nothing. The orchestrator
(:mod:`sagaline.saga.engine`) sends what it calls for; the passive monitor
(:mod:`sagaline.saga.monitor`) only records it, since in a choreography the services themselves
react to each other's events. Both host their definitions the same way (:class:`SagaFollower`),
so a saga record has the same shape, ids and history whichever mode ran the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec

from sagaline.errors import ConfigurationError
from sagaline.handling import Context, Service
from sagaline.messages import Event, Message
from sagaline.ports import Reads, RetryPolicy, SagaRecord
from sagaline.saga.definition import SagaDefinition, SagaStatus

__all__ = ["SagaFollower", "Transition", "advance", "correlation_key", "saga_id"]

log = logging.getLogger("sagaline.saga")


def saga_id(definition: SagaDefinition, key: str) -> str:
    """The id of the instance of ``definition`` for business key ``key``."""
    return f"{definition.name}:{key}"


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
class Transition:
    """What one event did to a saga instance, and what it calls for.

    ``record`` is the instance to write back (None when the event matched no instance and starts
    none). ``run`` is the index of the step whose command is now due, ``compensate`` the index of
    the step whose compensation is now due, ``completed`` whether the saga just completed.
    """

    record: SagaRecord | None
    run: int | None = None
    compensate: int | None = None
    completed: bool = False


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

    The record is changed in place and a history entry (``at``, the event, ``message_id``, the
    transition) appended to its ``new_history``; an event the instance does not expect is noted
    as ignored. ``compensations_in_order``: a compensation is confirmed only in the order of the
    plan (the orchestrator, which asks for one at a time); otherwise any planned compensation may
    be confirmed first (a choreography, where services compensate as they hear of the failure).
    """
    event_type = event.wire_name
    roles = definition.handles(event_type)
    if record is None:
        if any(role == "start" for _, role in roles):
            return _start(definition, key, event, at, message_id)
        return Transition(None)
    status = SagaStatus(record.status)
    if status.terminal:
        _note(record, at, event_type, message_id, "ignored: the saga has ended")
        return Transition(record)
    if status is SagaStatus.RUNNING:
        for position, role in roles:
            if position != record.step:
                continue
            if role == "success":
                return _succeed(definition, record, event, at, message_id)
            if role == "failure":
                return _fail(definition, record, event, at, message_id)
    elif status is SagaStatus.COMPENSATING:
        plan: list[int] = record.data["_compensations"]
        for position in plan[:1] if compensations_in_order else plan:
            if (position, "compensated") in roles:
                plan.remove(position)
                done = definition.steps[position]
                _note(record, at, event_type, message_id, f"step {done.name} compensated")
                return _compensate_next(record)
    _note(record, at, event_type, message_id, "ignored: not expected in this state")
    return Transition(record)


def _start(
    definition: SagaDefinition, key: str, event: Event, at: str, message_id: str
) -> Transition:
    data: dict[str, Any] = msgspec.to_builtins(event, builtin_types=(Decimal,))
    data.pop(event.discriminator, None)
    data["_compensations"] = []
    record = SagaRecord(
        saga_id=saga_id(definition, key),
        definition=definition.name,
        definition_version=definition.version,
        status=SagaStatus.RUNNING,
        step=0,
        data=data,
    )
    _note(record, at, event.type_name(), message_id, "started")
    if definition.steps[0].command is None:
        return _next(definition, record, 0)
    return Transition(record, run=0)


def _succeed(
    definition: SagaDefinition, record: SagaRecord, event: Event, at: str, message_id: str
) -> Transition:
    step = definition.steps[record.step]
    if step.keep:
        body = msgspec.to_builtins(event, builtin_types=(Decimal,))
        for name in step.keep:
            record.data[name] = body.get(name)
    _note(record, at, event.type_name(), message_id, f"step {step.name} succeeded")
    return _next(definition, record, record.step)


def _next(definition: SagaDefinition, record: SagaRecord, done: int) -> Transition:
    following = done + 1
    if following < len(definition.steps):
        record.step = following
        return Transition(record, run=following)
    record.status = SagaStatus.COMPLETED
    record.step = len(definition.steps)
    record.new_history[-1]["status"] = record.status
    return Transition(record, completed=True)


def _fail(
    definition: SagaDefinition, record: SagaRecord, event: Event, at: str, message_id: str
) -> Transition:
    step = definition.steps[record.step]
    reason = _reason(event)
    record.data["_failure"] = {"step": step.name, "event": event.type_name(), "reason": reason}
    record.data["_compensations"] = definition.compensation_plan(record.step)
    record.status = SagaStatus.COMPENSATING
    _note(record, at, event.type_name(), message_id, f"step {step.name} failed: {reason}")
    return _compensate_next(record)


def _compensate_next(record: SagaRecord) -> Transition:
    plan: list[int] = record.data["_compensations"]
    if not plan:
        record.status = SagaStatus.COMPENSATED
        record.new_history[-1]["status"] = record.status
        return Transition(record)
    record.step = plan[0]
    return Transition(record, compensate=plan[0])


def _reason(event: Message) -> str:
    reason = getattr(event, "reason", None)
    return reason if isinstance(reason, str) else type(event).type_name()


def _note(record: SagaRecord, at: str, event_type: str, message_id: str, transition: str) -> None:
    record.new_history.append(
        {"at": at, "event": event_type, "messageId": message_id, "transition": transition}
    )


class SagaFollower:
    """A service that follows the events of saga definitions, one saga record per transaction.

    It subscribes to every event type of its definitions, reads the instance each event
    correlates with (declared, so a batch loads them in one round trip), applies the event with
    :func:`advance`, lets :meth:`act` do what the transition calls for, and writes the record
    back, all in the unit of work of the event.
    """

    #: Whether compensations are confirmed only in the order of the plan (see :func:`advance`).
    compensations_in_order = True

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        name: str,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.definitions = {d.name: d for d in definitions}
        self.service = Service(
            name, retry=retry or RetryPolicy(), sagas=tuple(self.definitions.values())
        )
        by_type: dict[str, list[SagaDefinition]] = {}
        event_types: dict[str, type[Event]] = {}
        for definition in self.definitions.values():
            for event_type in definition.event_types():
                by_type.setdefault(event_type.type_name(), []).append(definition)
                event_types[event_type.type_name()] = event_type
        self._by_type = by_type
        for event_type in event_types.values():
            self.service.subscribes(event_type, reads=self._reads)(self._on_event)

    def _reads(self, event: Any, reads: Reads) -> None:
        """An event reads the saga instance of each definition it correlates with."""
        for definition in self._by_type.get(event.wire_name, ()):
            key = getattr(event, definition.correlation_attribute, None)
            if isinstance(key, str):
                reads.saga(saga_id(definition, key))

    async def _on_event(self, ctx: Context, event: Any) -> None:
        for definition in self._by_type.get(event.wire_name, ()):
            key = correlation_key(definition, event)
            record = await ctx.tx.get_saga(saga_id(definition, key))
            moved = advance(
                definition,
                key,
                record,
                event,
                at=ctx.tx.now,
                message_id=ctx.envelope.message_id,
                compensations_in_order=self.compensations_in_order,
            )
            if moved.record is None:
                log.warning("%s for %s matches no saga instance: ignored", event.wire_name, key)
                continue
            self.act(ctx, definition, moved)
            await ctx.tx.put_saga(moved.record)

    def act(self, ctx: Context, definition: SagaDefinition, transition: Transition) -> None:
        """Do what ``transition`` calls for, in the event's unit of work (nothing here)."""
