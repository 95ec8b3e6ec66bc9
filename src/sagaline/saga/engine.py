"""The orchestrator: a service that drives saga instances through their definitions.

Every transition is one message handled through the unit of work: the saga row (with its
version), the history entry and the commands it sends commit together, so the orchestrator is as
crash-safe as any handler, and a redelivered event finds its inbox mark and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import msgspec

from sagaline.errors import ConfigurationError
from sagaline.handling import Context, Service
from sagaline.messages import Event, Message
from sagaline.ports import Reads, RetryPolicy, SagaRecord
from sagaline.saga.definition import SagaDefinition, SagaStatus

__all__ = ["Orchestrator", "saga_id"]

log = logging.getLogger("sagaline.saga")


def saga_id(definition: SagaDefinition, key: str) -> str:
    """The id of the instance of ``definition`` for business key ``key``."""
    return f"{definition.name}:{key}"


def _reason(event: Message) -> str:
    reason = getattr(event, "reason", None)
    return reason if isinstance(reason, str) else type(event).type_name()


class Orchestrator:
    """Hosts saga definitions as the event handlers of one service."""

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        name: str = "orchestrator",
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
            await self._advance(ctx, definition, event)

    async def _advance(self, ctx: Context, definition: SagaDefinition, event: Event) -> None:
        key = getattr(event, definition.correlation_attribute, None)
        if not isinstance(key, str):
            raise ConfigurationError(
                f"{event.type_name()} has no {definition.correlation_field} to correlate"
                f" saga {definition.name!r}"
            )
        record = await ctx.tx.get_saga(saga_id(definition, key))
        event_type = event.wire_name
        roles = definition.handles(event_type)
        if record is None:
            if any(role == "start" for _, role in roles):
                await self._start(ctx, definition, key, event)
            else:
                log.warning("%s for %s matches no saga instance: ignored", event_type, key)
            return
        status = SagaStatus(record.status)
        if status.terminal:
            self._note(record, ctx, event_type, "ignored: the saga has ended")
            await ctx.tx.put_saga(record)
            return
        if status is SagaStatus.RUNNING:
            for position, role in roles:
                if position != record.step:
                    continue
                if role == "success":
                    await self._succeed(ctx, definition, record, event)
                    return
                if role == "failure":
                    await self._fail(ctx, definition, record, event)
                    return
        elif status is SagaStatus.COMPENSATING:
            plan: list[int] = record.data["_compensations"]
            if plan and (plan[0], "compensated") in roles:
                await self._compensated(ctx, definition, record, event)
                return
        self._note(record, ctx, event_type, "ignored: not expected in this state")
        await ctx.tx.put_saga(record)

    async def _start(
        self, ctx: Context, definition: SagaDefinition, key: str, event: Event
    ) -> None:
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
        self._note(record, ctx, event.type_name(), "started")
        if definition.steps[0].command is None:
            await self._next(ctx, definition, record, 0)
        else:
            self._send_step(ctx, definition, record, 0)
        await ctx.tx.put_saga(record)

    async def _succeed(
        self, ctx: Context, definition: SagaDefinition, record: SagaRecord, event: Event
    ) -> None:
        step = definition.steps[record.step]
        body = msgspec.to_builtins(event, builtin_types=(Decimal,))
        for name in step.keep:
            record.data[name] = body.get(name)
        self._note(record, ctx, event.type_name(), f"step {step.name} succeeded")
        await self._next(ctx, definition, record, record.step)
        await ctx.tx.put_saga(record)

    async def _next(
        self, ctx: Context, definition: SagaDefinition, record: SagaRecord, done: int
    ) -> None:
        following = done + 1
        if following < len(definition.steps):
            self._send_step(ctx, definition, record, following)
            return
        record.status = SagaStatus.COMPLETED
        record.step = len(definition.steps)
        if definition.on_completed is not None:
            published = ctx.publish(definition.on_completed(record.data))
            record.new_history[-1].setdefault("sent", []).append(published.message_type)
        record.new_history[-1]["status"] = record.status

    def _send_step(
        self, ctx: Context, definition: SagaDefinition, record: SagaRecord, position: int
    ) -> None:
        step = definition.steps[position]
        assert step.command is not None
        record.step = position
        sent = ctx.send(step.command(record.data))
        record.new_history[-1].setdefault("sent", []).append(sent.message_type)

    async def _fail(
        self, ctx: Context, definition: SagaDefinition, record: SagaRecord, event: Event
    ) -> None:
        step = definition.steps[record.step]
        reason = _reason(event)
        record.data["_failure"] = {"step": step.name, "event": event.type_name(), "reason": reason}
        plan = definition.compensation_plan(record.step)
        record.data["_compensations"] = plan
        record.status = SagaStatus.COMPENSATING
        self._note(record, ctx, event.type_name(), f"step {step.name} failed: {reason}")
        self._send_compensation(ctx, definition, record)
        await ctx.tx.put_saga(record)

    async def _compensated(
        self, ctx: Context, definition: SagaDefinition, record: SagaRecord, event: Event
    ) -> None:
        plan: list[int] = record.data["_compensations"]
        done = definition.steps[plan.pop(0)]
        self._note(record, ctx, event.type_name(), f"step {done.name} compensated")
        self._send_compensation(ctx, definition, record)
        await ctx.tx.put_saga(record)

    def _send_compensation(
        self, ctx: Context, definition: SagaDefinition, record: SagaRecord
    ) -> None:
        plan: list[int] = record.data["_compensations"]
        if not plan:
            record.status = SagaStatus.COMPENSATED
            record.new_history[-1]["status"] = record.status
            return
        step = definition.steps[plan[0]]
        assert step.compensation is not None
        record.step = plan[0]
        sent = ctx.send(step.compensation(record.data))
        record.new_history[-1].setdefault("sent", []).append(sent.message_type)

    @staticmethod
    def _note(record: SagaRecord, ctx: Context, event_type: str, transition: str) -> None:
        record.new_history.append(
            {
                "at": ctx.tx.now,
                "event": event_type,
                "messageId": ctx.envelope.message_id,
                "transition": transition,
            }
        )
