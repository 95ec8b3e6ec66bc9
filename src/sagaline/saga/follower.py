"""The service that follows saga instances: it reads each instance a signal is for, moves it
through the state machine (:mod:`sagaline.saga.state`) and writes it back, in the signal's unit of
work. The orchestrator and the monitor of a choreography are followers; the orchestrator also
does what each transition calls for.

A follower hosts every version of a saga given to it. A new instance starts on the newest; an
instance goes on with the version it started with, and one whose version is no longer hosted
becomes STUCK with that reason, never running another version's steps.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from sagaline.errors import ConfigurationError
from sagaline.handling import Context, Service
from sagaline.handling.notices import MessageDeadLettered
from sagaline.messages import SAGA_COMMAND_PREFIX, Event, message_id_problem
from sagaline.ports import Reads, RetryPolicy, SagaRecord
from sagaline.saga.definition import SagaDefinition, SagaStatus
from sagaline.saga.messages import SagaActionRequested, SagaTimerFired
from sagaline.saga.state import (
    Send,
    Transition,
    advance,
    correlation_key,
    on_action,
    on_dead_letter,
    on_timer,
    saga_id,
    version_gone,
)

__all__ = ["SagaFollower", "command_id", "parse_command_id"]

log = logging.getLogger("sagaline.saga")


def command_id(saga: str, send: Send, tag: str = "") -> str:
    """The message id of the command ``send`` calls for: ``saga:<saga>:<step>.<tag>:<try>``
    (``u<try>`` for a compensation; ``tag`` names the instance), the same whenever the
    transition is made again, so that a unit of work redone after a crash sends the same
    message. A saga id that cannot be part of an id is hashed."""
    attempt = f"u{send.attempt}" if send.undo else str(send.attempt)
    step = f"{send.step}.{tag}" if tag else send.step
    candidate = f"{SAGA_COMMAND_PREFIX}{saga}:{step}:{attempt}"
    if message_id_problem(candidate) is None:
        return candidate
    digest = hashlib.blake2b(saga.encode(), digest_size=12).hexdigest()
    return f"{SAGA_COMMAND_PREFIX}h{digest}:{step}:{attempt}"


def parse_command_id(message_id: str) -> tuple[str, str, bool] | None:
    """``(saga id or "h<hash>", step, undo)`` of a saga command's id; None for any other id."""
    if not message_id.startswith(SAGA_COMMAND_PREFIX):
        return None
    head, _, attempt = message_id[len(SAGA_COMMAND_PREFIX) :].rpartition(":")
    saga, _, step = head.rpartition(":")
    step = step.partition(".")[0]
    if not saga or not step or not attempt:
        return None
    return saga, step, attempt.startswith("u")


def timer_message_id(timer_id: str) -> str:
    """The message id of the event a timer fires (its id, hashed when it cannot be one)."""
    candidate = f"timer:{timer_id}"
    if message_id_problem(candidate) is None:
        return candidate
    return "timer:h" + hashlib.blake2b(timer_id.encode(), digest_size=16).hexdigest()


class SagaFollower:
    """A service that follows the signals of saga definitions, one saga record per transaction.

    It subscribes to every event type of its definitions (every version) and to sagaline's own
    saga signals, reads the instance each signal is for (declared, so a batch loads them in one
    round trip), moves it, lets :meth:`act` do what the transition calls for, and writes the
    record back, all in the unit of work of the signal.
    """

    #: Whether compensations are confirmed only in the order of the plan (see ``advance``).
    compensations_in_order = True
    #: Whether it sends what its transitions call for (an orchestrator), or only records them.
    sends = True

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        name: str,
        retry: RetryPolicy | None = None,
    ) -> None:
        ordered = sorted(definitions, key=lambda d: (d.name, d.version))
        self.versions: dict[str, dict[int, SagaDefinition]] = {}
        for definition in ordered:
            hosted = self.versions.setdefault(definition.name, {})
            if definition.version in hosted:
                raise ConfigurationError(
                    f"saga {definition.name!r} version {definition.version} is given twice"
                )
            hosted[definition.version] = definition
        #: The newest version of each saga: what new instances start on.
        self.definitions = {name: hosted[max(hosted)] for name, hosted in self.versions.items()}
        self.service = Service(
            name, retry=retry or RetryPolicy(), sagas=tuple(ordered), drives_sagas=self.sends
        )
        by_type: dict[str, list[str]] = {}
        event_types: dict[str, type[Event]] = {}
        for definition in ordered:
            for event_type in definition.event_types():
                names = by_type.setdefault(event_type.type_name(), [])
                if definition.name not in names:
                    names.append(definition.name)
                event_types[event_type.type_name()] = event_type
        self._by_type = by_type
        for event_type in event_types.values():
            self.service.subscribes(event_type, reads=self._reads)(self._on_event)
        self.service.subscribes(SagaTimerFired, reads=self._reads_signal)(self._on_timer)
        self.service.subscribes(SagaActionRequested, reads=self._reads_signal)(self._on_action)
        self.service.subscribes(MessageDeadLettered, reads=self._reads_dead)(self._on_dead)

    # ------------------------------------------------------------------ reads

    def _reads(self, event: Any, reads: Reads) -> None:
        """An event reads the saga instance of each definition it correlates with."""
        for name in self._by_type.get(event.wire_name, ()):
            definition = self.definitions[name]
            key = getattr(event, definition.correlation_attribute, None)
            if isinstance(key, str):
                reads.saga(saga_id(definition, key))

    def _reads_signal(self, signal: Any, reads: Reads) -> None:
        if self._hosts(signal.saga_id):
            reads.saga(signal.saga_id)

    def _reads_dead(self, notice: Any, reads: Reads) -> None:
        found = self._saga_of(notice)
        if found is not None:
            reads.saga(found[0])

    # ------------------------------------------------------------------ lookups

    def _hosts(self, saga: str) -> bool:
        return saga.partition(":")[0] in self.versions

    def _saga_of(self, notice: MessageDeadLettered) -> tuple[str, str, bool] | None:
        """The saga, step and whether a compensation, of a dead-lettered command of ours."""
        parsed = parse_command_id(notice.message_id)
        if parsed is None:
            return None
        saga, step, undo = parsed
        if self._hosts(saga):
            return saga, step, undo
        # A hashed saga id: the saga of the command's business key with a step of that name.
        for name, definition in self.definitions.items():
            if any(s.name == step for s in definition.all_steps()):
                return f"{name}:{notice.correlation_id}", step, undo
        return None

    def definition_of(self, record: SagaRecord) -> SagaDefinition | None:
        """The definition version ``record`` runs on, None when it is not hosted here."""
        return self.versions.get(record.definition, {}).get(record.definition_version)

    def _gone(self, ctx: Context, record: SagaRecord, what: str) -> None:
        """``record``'s version is not hosted: it becomes STUCK (once), and waits."""
        status = SagaStatus(record.status)
        entry = {"at": ctx.tx.now, "event": what, "messageId": ctx.envelope.message_id}
        if status.settled:
            record.new_history.append({**entry, "transition": "ignored: version not deployed"})
            return
        reason = version_gone(record, list(self.versions.get(record.definition, {})))
        record.data["_stuck"] = {"step": "", "reason": reason, "deadLetter": ""}
        record.status = SagaStatus.STUCK
        record.new_history.append({**entry, "transition": reason, "status": record.status})
        log.warning("saga %s is STUCK: %s", record.saga_id, reason)

    # ------------------------------------------------------------------ signals

    async def _on_event(self, ctx: Context, event: Any) -> None:
        for name in self._by_type.get(event.wire_name, ()):
            newest = self.definitions[name]
            key = correlation_key(newest, event)
            record = await ctx.tx.get_saga(saga_id(newest, key))
            definition = newest if record is None else self.definition_of(record)
            if definition is None:
                assert record is not None
                self._gone(ctx, record, event.wire_name)
                await ctx.tx.put_saga(record)
                continue
            if record is not None and not definition.handles(event.wire_name):
                continue  # an event of another version of the saga
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

    async def _on_timer(self, ctx: Context, fired: SagaTimerFired) -> None:
        record = await self._record(ctx, fired.saga_id)
        if record is None:
            return
        definition = self.definition_of(record)
        if definition is None:
            self._gone(ctx, record, fired.wire_name)
        else:
            moved = on_timer(
                definition,
                record,
                kind=fired.purpose,
                step=fired.step,
                attempt=fired.attempt,
                undo=fired.undo,
                timer_id=fired.timer_id,
                at=ctx.tx.now,
                message_id=ctx.envelope.message_id,
            )
            self.act(ctx, definition, moved)
        await ctx.tx.put_saga(record)

    async def _on_action(self, ctx: Context, asked: SagaActionRequested) -> None:
        record = await self._record(ctx, asked.saga_id)
        if record is None:
            return
        definition = self.definition_of(record)
        moved = on_action(
            definition,
            record,
            sends=self.sends,
            action=asked.action,
            by=asked.by,
            reason=asked.reason,
            at=ctx.tx.now,
            message_id=ctx.envelope.message_id,
        )
        if definition is not None:
            self.act(ctx, definition, moved)
        await ctx.tx.put_saga(record)

    async def _on_dead(self, ctx: Context, notice: MessageDeadLettered) -> None:
        found = self._saga_of(notice)
        if found is None:
            return
        saga, step, undo = found
        record = await self._record(ctx, saga)
        if record is None:
            return
        definition = self.definition_of(record)
        if definition is None or not any(s.name == step for s in definition.all_steps()):
            return
        moved = on_dead_letter(
            definition,
            record,
            step=step,
            undo=undo,
            reason=f"{notice.reason} (at {notice.consumer}, message {notice.message_id})",
            dead_letter=notice.message_id,
            at=ctx.tx.now,
            message_id=ctx.envelope.message_id,
        )
        self.act(ctx, definition, moved)
        await ctx.tx.put_saga(record)

    async def _record(self, ctx: Context, saga: str) -> SagaRecord | None:
        if not self._hosts(saga):
            return None
        record = await ctx.tx.get_saga(saga)
        if record is None:
            log.warning(
                "%s for %s matches no saga instance: ignored", ctx.envelope.message_type, saga
            )
        return record

    def act(self, ctx: Context, definition: SagaDefinition, transition: Transition) -> None:
        """Do what ``transition`` calls for, in the signal's unit of work (nothing here)."""
