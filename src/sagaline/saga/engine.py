"""The orchestrator: a service that drives saga instances through their definitions.

Every transition is one message handled through the unit of work: the saga row (with its
version), the history entry and the commands it sends commit together, so the orchestrator is as
crash-safe as any handler, and a redelivered event finds its inbox mark and changes nothing. The
transitions themselves are :func:`sagaline.saga.state.advance`, shared with the passive monitor
of a choreography; the orchestrator adds the commands they call for.
"""

from __future__ import annotations

from collections.abc import Iterable

from sagaline.handling import Context
from sagaline.ports import RetryPolicy
from sagaline.saga.definition import SagaDefinition
from sagaline.saga.state import SagaFollower, Transition, saga_id

__all__ = ["Orchestrator", "saga_id"]


class Orchestrator(SagaFollower):
    """Hosts saga definitions as the event handlers of one service, and sends their commands:
    each step's command when it is due, each compensation in the order of the plan, and the
    definition's completion event."""

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        name: str = "orchestrator",
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(definitions, name=name, retry=retry)

    def act(self, ctx: Context, definition: SagaDefinition, transition: Transition) -> None:
        """Send the command, compensation or completion event ``transition`` calls for."""
        record = transition.record
        assert record is not None
        if transition.run is not None:
            command = definition.steps[transition.run].command
            assert command is not None
            sent = ctx.send(command(record.data))
            record.new_history[-1].setdefault("sent", []).append(sent.message_type)
        elif transition.compensate is not None:
            compensation = definition.steps[transition.compensate].compensation
            assert compensation is not None
            sent = ctx.send(compensation(record.data))
            record.new_history[-1].setdefault("sent", []).append(sent.message_type)
        elif transition.completed and definition.on_completed is not None:
            published = ctx.publish(definition.on_completed(record.data))
            record.new_history[-1].setdefault("sent", []).append(published.message_type)
