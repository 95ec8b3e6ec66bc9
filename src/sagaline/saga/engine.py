"""The orchestrator: a service that drives saga instances through their definitions.

Every transition is one message handled through the unit of work: the saga row (with its
version), the history entry, the commands it sends and the timers it sets or cancels commit
together, so the orchestrator is as crash-safe as any handler, and a redelivered signal finds
its inbox mark and changes nothing. The transitions themselves are :mod:`sagaline.saga.state`,
shared with the passive monitor of a choreography; the orchestrator does what they call for.

Each command it sends has an id made of the saga, the step and the try
(:func:`~sagaline.saga.follower.command_id`), and so an idempotency key made of the saga and the
step (``ctx.idempotency_key`` in the handler): every try of one step shares it, which is what a
handler passes to an outside provider so that a step tried again does its work once.
"""

from __future__ import annotations

from collections.abc import Iterable

from sagaline.handling import Context
from sagaline.messages import idempotency_key_of
from sagaline.ports import RetryPolicy
from sagaline.saga.definition import SagaDefinition
from sagaline.saga.follower import SagaFollower, command_id, timer_message_id
from sagaline.saga.messages import SagaTimerFired
from sagaline.saga.state import SagaView, Transition, saga_id

__all__ = ["Orchestrator", "saga_id"]


class Orchestrator(SagaFollower):
    """Hosts saga definitions (every version given) as the handlers of one service, and sends
    their commands: each step's command when it is due (a group's at once), each compensation
    in the order of the plan, the definition's completion event; and sets the timers of step
    timeouts, retries and deadlines."""

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        name: str = "orchestrator",
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(definitions, name=name, retry=retry)

    def act(self, ctx: Context, definition: SagaDefinition, transition: Transition) -> None:
        """Send the commands, set and cancel the timers, publish the completion ``transition``
        calls for."""
        record = transition.record
        if record is None:
            return
        sent: list[str] = []
        data = record.data
        for send in transition.sends:
            step = definition.step(send.step)
            builder = step.compensation if send.undo else step.command
            assert builder is not None
            message_id = command_id(record.saga_id, send, data.get("_tag", ""))
            view = None
            if definition.takes_view(builder):
                view = SagaView(
                    saga_id=record.saga_id,
                    step=send.step,
                    attempt=send.attempt,
                    idempotency_key=idempotency_key_of(message_id),
                    failure=data.get("_failure"),
                )
            command = definition.build(builder, data, view)
            ctx.send(command, message_id=message_id)
            sent.append(command.wire_name)
        for timer in transition.timers:
            fired = SagaTimerFired(
                saga_id=record.saga_id,
                key=record.saga_id.partition(":")[2],
                timer_id=timer.timer_id,
                purpose=timer.kind,
                step=timer.step,
                attempt=timer.attempt,
                undo=timer.undo,
            )
            ctx.schedule(
                fired,
                after=timer.after,
                timer_id=timer.timer_id,
                message_id=timer_message_id(timer.timer_id),
            )
        for timer_id in transition.cancels:
            ctx.cancel(timer_id)
        if transition.completed and definition.on_completed is not None:
            finish = definition.on_completed
            view = None
            if definition.takes_view(finish):
                view = SagaView(record.saga_id, "", 0, "", data.get("_failure"))
            completion = definition.build(finish, data, view)
            ctx.publish(completion)
            sent.append(completion.wire_name)
        if sent and record.new_history:
            record.new_history[-1].setdefault("sent", []).extend(sent)
