"""Declarative saga definitions: a start event, a correlation key and ordered steps.

Steps follow Garcia-Molina & Salem (1987): compensatable steps come first, then at most one
pivot, then retriable steps. When a step fails, every completed compensatable step is compensated
in reverse order (and the failed step too when it may have left a partial effect). A definition is
validated when it is built, and can be drawn as a Mermaid diagram.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sagaline.errors import SagaDefinitionError
from sagaline.messages import Command, Event

__all__ = ["SagaDefinition", "SagaStatus", "Step", "StepKind"]

SagaData = dict[str, Any]
CommandBuilder = Callable[[Mapping[str, Any]], Command]


class StepKind(enum.Enum):
    """Where a step stands relative to the point of no return."""

    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


class SagaStatus(enum.StrEnum):
    """The life of a saga instance."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"

    @property
    def terminal(self) -> bool:
        """Whether nothing more will happen to the saga."""
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)


@dataclass(frozen=True)
class Step:
    """One step of a saga.

    ``command`` builds the step's command from the saga data; ``None`` means the start event
    itself is this step's success (the transaction's first local step already happened).
    ``success`` is the event that completes the step and ``failures`` the events that fail it.
    ``compensation`` builds the command that undoes the step and ``compensated`` is the event
    that confirms it. ``compensate_on_failure`` compensates the failed step too, for steps that
    may leave a partial effect when they fail. ``keep`` lists fields of the success event copied
    into the saga data.
    """

    name: str
    command: CommandBuilder | None = None
    success: type[Event] | None = None
    failures: tuple[type[Event], ...] = ()
    compensation: CommandBuilder | None = None
    compensated: type[Event] | None = None
    kind: StepKind = StepKind.COMPENSATABLE
    compensate_on_failure: bool = False
    keep: tuple[str, ...] = ()


@dataclass(frozen=True)
class SagaDefinition:
    """A saga as data: validated on construction."""

    name: str
    start: type[Event]
    steps: tuple[Step, ...]
    on_completed: Callable[[Mapping[str, Any]], Event] | None = None
    version: int = 1
    #: The field of the saga's events that names its transaction (wire name, ``tripId``);
    #: by default the start event's declared ``correlation``.
    correlation_field: str = ""
    description: str = ""
    _by_event: dict[str, list[tuple[int, str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _correlation_attribute: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        if not self.correlation_field:
            declared = self.start.correlation
            if not declared:
                raise SagaDefinitionError(
                    f"saga {self.name!r}: its start event {self.start.type_name()} declares no"
                    " correlation; pass correlation_field or declare the event's correlation"
                )
            head, *rest = declared.split("_")
            object.__setattr__(
                self, "correlation_field", head + "".join(p.capitalize() for p in rest)
            )
        snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in self.correlation_field)
        object.__setattr__(self, "_correlation_attribute", snake.lstrip("_"))
        index = self._by_event
        index.setdefault(self.start.type_name(), []).append((-1, "start"))
        for position, step in enumerate(self.steps):
            if step.success is not None and step.command is not None:
                index.setdefault(step.success.type_name(), []).append((position, "success"))
            for failure in step.failures:
                index.setdefault(failure.type_name(), []).append((position, "failure"))
            if step.compensated is not None:
                index.setdefault(step.compensated.type_name(), []).append((position, "compensated"))

    def _validate(self) -> None:
        if not self.steps:
            raise SagaDefinitionError(f"saga {self.name!r} has no steps")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise SagaDefinitionError(f"saga {self.name!r} repeats a step name: {names}")
        pivots = [s for s in self.steps if s.kind is StepKind.PIVOT]
        if len(pivots) > 1:
            raise SagaDefinitionError(f"saga {self.name!r} has more than one pivot step")
        seen_pivot = False
        for position, step in enumerate(self.steps):
            where = f"saga {self.name!r}, step {step.name!r}"
            if step.command is None and position != 0:
                raise SagaDefinitionError(f"{where}: only the first step may be the start event")
            if step.command is not None and step.success is None:
                raise SagaDefinitionError(
                    f"{where}: a step that sends a command needs a success event"
                )
            if step.kind is StepKind.COMPENSATABLE:
                if seen_pivot:
                    raise SagaDefinitionError(
                        f"{where}: a compensatable step cannot follow the pivot"
                    )
                if step.compensation is None or step.compensated is None:
                    raise SagaDefinitionError(
                        f"{where}: a compensatable step needs a compensation command and the"
                        " event that confirms it"
                    )
            if step.kind is StepKind.RETRIABLE and step.failures:
                raise SagaDefinitionError(
                    f"{where}: a retriable step may not fail; it is retried until it succeeds"
                )
            if step.kind is StepKind.PIVOT:
                seen_pivot = True
            if step.compensate_on_failure and step.compensation is None:
                raise SagaDefinitionError(f"{where}: compensate_on_failure needs a compensation")

    @property
    def correlation_attribute(self) -> str:
        """The Python attribute of ``correlation_field`` (``tripId`` -> ``trip_id``)."""
        return self._correlation_attribute

    def handles(self, event_type: str) -> list[tuple[int, str]]:
        """The (step index, role) pairs an event type plays in this saga."""
        return self._by_event.get(event_type, [])

    def event_types(self) -> list[type[Event]]:
        """Every event type the orchestrator must subscribe to for this saga."""
        types: list[type[Event]] = [self.start]
        for step in self.steps:
            if step.command is not None and step.success is not None:
                types.append(step.success)
            types.extend(step.failures)
            if step.compensated is not None:
                types.append(step.compensated)
        unique: dict[str, type[Event]] = {t.type_name(): t for t in types}
        return list(unique.values())

    def compensation_plan(self, failed_step: int) -> list[int]:
        """Indexes of the steps to compensate after ``failed_step`` failed, in order."""
        plan = []
        if self.steps[failed_step].compensate_on_failure:
            plan.append(failed_step)
        for position in range(failed_step - 1, -1, -1):
            step = self.steps[position]
            if step.kind is StepKind.COMPENSATABLE and step.compensation is not None:
                plan.append(position)
        return plan

    def to_mermaid(self) -> str:
        """The saga as a Mermaid state diagram, naming the command each step sends (see
        :func:`sagaline.saga.describe.to_mermaid`)."""
        from sagaline.saga.describe import to_mermaid

        return to_mermaid(self)
