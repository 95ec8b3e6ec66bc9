"""The passive saga monitor of a choreography: it follows the events, it sends nothing.

In a choreography each service reacts to the others' events and no one drives the transaction.
The monitor subscribes to the events of the same :class:`~sagaline.saga.definition.SagaDefinition`
an orchestrator would run and keeps, per transaction, the saga record an orchestrator would keep
(status, step, data, a history entry per event with its message id), through the same state
machine (:mod:`sagaline.saga.state`). So the saga queries, the trace and the invariant
checks read one kind of record whichever style ran the transaction. The one difference: the
services of a choreography compensate as they hear of a failure, not one after the other on
request, so the monitor accepts the planned compensations in any order.

What only a party that sends can do is refused in its definitions: step timeouts, step and
compensation retries and a saga deadline each call for a command sent again or a compensation
started, and the monitor sends nothing. In a choreography the services time their own waits.
"""

from __future__ import annotations

from collections.abc import Iterable

from sagaline.errors import SagaDefinitionError
from sagaline.ports import RetryPolicy
from sagaline.saga.definition import SagaDefinition
from sagaline.saga.follower import SagaFollower

__all__ = ["SagaMonitor"]


class SagaMonitor(SagaFollower):
    """Keeps the saga record of each transaction of ``definitions`` from the events alone.

    It never sends a command or publishes an event: what the orchestrator would send, the
    choreography's services do by themselves. ``name`` is the name of its service (and of its
    store in a deployment of a store per service).
    """

    compensations_in_order = False
    sends = False

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        name: str = "monitor",
        retry: RetryPolicy | None = None,
    ) -> None:
        definitions = list(definitions)
        for definition in definitions:
            _refuse_what_needs_a_sender(definition)
        super().__init__(definitions, name=name, retry=retry)


def _refuse_what_needs_a_sender(definition: SagaDefinition) -> None:
    """Raise :class:`SagaDefinitionError` naming the first timeout, retry or deadline."""
    found = "a deadline" if definition.deadline is not None else None
    for step in definition.all_steps():
        if found is not None:
            break
        fields = {
            "timeout": step.timeout,
            "retry": step.retry,
            "compensation_timeout": step.compensation_timeout,
            "compensation_retry": step.compensation_retry,
        }
        named = [name for name, value in fields.items() if value is not None]
        if named:
            found = f"step {step.name}'s {named[0]}"
    if found is not None:
        raise SagaDefinitionError(
            f"saga {definition.name!r} has {found}: a choreography's monitor sends nothing and"
            " sets no timers, so it cannot time, retry or give up on a step (run the saga under"
            " an Orchestrator, or let the services time their own waits)"
        )
