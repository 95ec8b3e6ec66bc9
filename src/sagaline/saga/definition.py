"""Declarative saga definitions: a start event, a correlation key and ordered steps.

Steps follow Garcia-Molina & Salem (1987): compensatable steps come first, then at most one
pivot, then retriable steps. When a step fails, every completed compensatable step is compensated
in reverse order (and the failed step too when it may have left a partial effect). A
:class:`Parallel` group sends its members' commands at once and succeeds when all of them do.

A step may have a timeout and a :class:`StepRetry` policy (retries before the saga gives up on
it), its compensation the same; the saga as a whole may have a deadline. A definition is
validated when it is built, and can be drawn as a Mermaid diagram.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from sagaline.errors import SagaDefinitionError
from sagaline.messages import Command, Event

__all__ = [
    "Parallel",
    "SagaDefinition",
    "SagaStatus",
    "Step",
    "StepKind",
    "StepRetry",
]

SagaData = dict[str, Any]
#: Builds a message from the saga's state (a mapping, or the definition's typed ``state``), and
#: optionally from the :class:`~sagaline.saga.state.SagaView` of the instance as second argument.
CommandBuilder = Callable[..., Command]
EventBuilder = Callable[..., Event]


class StepKind(enum.Enum):
    """Where a step stands relative to the point of no return."""

    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


class SagaStatus(enum.StrEnum):
    """The life of a saga instance.

    COMPLETED, COMPENSATED and FAILED are final. STUCK is not: a compensation could not succeed
    within its policy (or the instance's definition version is gone), and the saga waits for an
    operator (retry, skip, abort). FAILED is an operator's abort: ended without compensating.
    """

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    STUCK = "STUCK"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        """Whether nothing more will happen to the saga."""
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)

    @property
    def settled(self) -> bool:
        """Whether the saga needs nothing more from the system: ended, or waiting for an
        operator (STUCK)."""
        return self.terminal or self is SagaStatus.STUCK


@dataclass(frozen=True)
class StepRetry:
    """How often a step (or its compensation) is tried before the saga gives up on it.

    ``attempts`` counts every try, the first included. Try ``n + 1`` waits ``backoff *
    multiplier ** (n - 1)`` seconds after try ``n`` failed, at most ``cap``, moved by up to
    ``jitter`` of itself either way (the same for the same saga, step and try, so a replay waits
    the same). A failure event is retried only when it is ``transient``: one of the event classes
    listed, or with a ``reason`` containing one of the strings listed; the others fail the step at
    once. ``on_timeout`` retries a timed-out try too. This is distinct from message redelivery:
    a retry is a new command, with the step's idempotency key.
    """

    attempts: int = 3
    backoff: float = 1.0
    multiplier: float = 2.0
    cap: float = 60.0
    jitter: float = 0.1
    transient: tuple[type[Event] | str, ...] = ()
    on_timeout: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise SagaDefinitionError(f"StepRetry.attempts must be at least 1, not {self.attempts}")
        if self.backoff < 0 or self.cap < 0 or self.multiplier < 1:
            raise SagaDefinitionError(
                "StepRetry: backoff and cap must not be negative, multiplier at least 1"
            )
        if not 0 <= self.jitter <= 1:
            raise SagaDefinitionError(f"StepRetry.jitter must be within 0..1, not {self.jitter}")

    def delay(self, attempt: int, seed: str = "") -> float:
        """Seconds to wait after try ``attempt`` failed, before the next."""
        base = min(self.cap, self.backoff * self.multiplier ** max(0, attempt - 1))
        if not self.jitter or not base:
            return base
        digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8).digest()
        spread = int.from_bytes(digest) / float(1 << 64) * 2 - 1  # in [-1, 1)
        return max(0.0, base * (1 + self.jitter * spread))

    def is_transient(self, event: Event, reason: str) -> bool:
        """Whether failure ``event`` (with ``reason``) is worth another try."""
        for mark in self.transient:
            if isinstance(mark, str):
                if mark in reason:
                    return True
            elif isinstance(event, mark):
                return True
        return False


@dataclass(frozen=True)
class Step:
    """One step of a saga.

    ``command`` builds the step's command from the saga state; ``None`` means the start event
    itself is this step's success (the transaction's first local step already happened).
    ``success`` is the event that completes the step and ``failures`` the events that fail it.
    ``compensation`` builds the command that undoes the step and ``compensated`` is the event
    that confirms it. ``compensate_on_failure`` compensates the failed step too, for steps that
    may leave a partial effect when they fail. ``keep`` lists fields of the success event copied
    into the saga data.

    ``timeout`` (seconds) fails a try that got no answer in time: a compensatable step or pivot
    then fails (unless ``retry`` retries timeouts), a retriable step is sent again. ``retry``
    is the step's :class:`StepRetry` policy. A pivot may have a compensation: it is never part
    of a failure's plan, but undoes a success that arrived after the step timed out (a late
    payment is refunded). ``compensation_timeout`` and ``compensation_retry`` do the same for
    the compensation; one that cannot succeed within them leaves the saga STUCK.
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
    timeout: float | None = None
    retry: StepRetry | None = None
    compensation_timeout: float | None = None
    compensation_retry: StepRetry | None = None

    def tries(self) -> int:
        """How many times its command may be sent before the step fails (retriable: forever)."""
        if self.retry is not None:
            return self.retry.attempts
        return 0 if self.kind is StepKind.RETRIABLE else 1

    def compensation_tries(self) -> int:
        """How many times its compensation may be sent before the saga is STUCK."""
        return self.compensation_retry.attempts if self.compensation_retry is not None else 1


@dataclass(frozen=True)
class Parallel:
    """A group of steps whose commands are sent at once.

    It succeeds when every member has; when one fails, the members that succeeded are
    compensated with the steps before the group, and those still running are compensated when
    they answer. Members are all compensatable (the group comes before the pivot) or all
    retriable (after it), and answer with event types of their own.
    """

    name: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class SagaDefinition:
    """A saga as data: validated on construction.

    ``steps`` are :class:`Step` and :class:`Parallel` groups, run in order. ``deadline``
    (seconds from the start) fails a saga still running then, and compensates it. ``state``, a
    msgspec struct, gives builders typed access to the saga data (fields by their wire names, as
    the start event's); without it builders get the data as a mapping. ``version``: an instance
    finishes on the version it started with (see :class:`~sagaline.saga.engine.Orchestrator`).
    """

    name: str
    start: type[Event]
    steps: tuple[Step | Parallel, ...]
    on_completed: EventBuilder | None = None
    version: int = 1
    #: The field of the saga's events that names its transaction (wire name, ``tripId``);
    #: by default the start event's declared ``correlation``.
    correlation_field: str = ""
    description: str = ""
    deadline: float | None = None
    state: type[msgspec.Struct] | None = None
    #: Each stage (a step, or a group's members) in order.
    stages: tuple[tuple[Step, ...], ...] = field(default=(), init=False, compare=False)
    _by_event: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _by_name: dict[str, tuple[int, Step]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _correlation_attribute: str = field(default="", init=False, repr=False, compare=False)
    _extended: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        stages = tuple(item.steps if isinstance(item, Parallel) else (item,) for item in self.steps)
        object.__setattr__(self, "stages", stages)
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
        index.setdefault(self.start.type_name(), []).append(("", "start"))
        for position, stage in enumerate(stages):
            for step in stage:
                self._by_name[step.name] = (position, step)
                if step.success is not None and step.command is not None:
                    index.setdefault(step.success.type_name(), []).append((step.name, "success"))
                for failure in step.failures:
                    index.setdefault(failure.type_name(), []).append((step.name, "failure"))
                if step.compensated is not None:
                    index.setdefault(step.compensated.type_name(), []).append(
                        (step.name, "compensated")
                    )
        builders = [self.on_completed] + [
            b for step in self.all_steps() for b in (step.command, step.compensation)
        ]
        for builder in builders:
            if builder is not None and _takes_view(builder):
                self._extended.add(id(builder))

    def _validate(self) -> None:
        if not self.steps:
            raise SagaDefinitionError(f"saga {self.name!r} has no steps")
        names = [step.name for stage in self.stages for step in stage]
        names += [item.name for item in self.steps if isinstance(item, Parallel)]
        if len(set(names)) != len(names):
            raise SagaDefinitionError(f"saga {self.name!r} repeats a step name: {names}")
        for name in names:
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise SagaDefinitionError(
                    f"saga {self.name!r}: step name {name!r} must be letters, digits, '_' or '-'"
                )
        if self.deadline is not None and self.deadline <= 0:
            raise SagaDefinitionError(f"saga {self.name!r}: deadline must be positive")
        if self.state is not None and not (
            isinstance(self.state, type) and issubclass(self.state, msgspec.Struct)
        ):
            raise SagaDefinitionError(f"saga {self.name!r}: state must be a msgspec Struct class")
        pivots = [s for stage in self.stages for s in stage if s.kind is StepKind.PIVOT]
        if len(pivots) > 1:
            raise SagaDefinitionError(f"saga {self.name!r} has more than one pivot step")
        seen_pivot = False
        for position, item in enumerate(self.steps):
            if isinstance(item, Parallel):
                self._validate_group(item)
            for step in self.stages[position]:
                seen_pivot = self._validate_step(step, position, seen_pivot)

    def _validate_group(self, group: Parallel) -> None:
        where = f"saga {self.name!r}, group {group.name!r}"
        if len(group.steps) < 2:
            raise SagaDefinitionError(f"{where}: a parallel group needs at least two steps")
        kinds = {step.kind for step in group.steps}
        if StepKind.PIVOT in kinds or len(kinds) > 1:
            raise SagaDefinitionError(
                f"{where}: members are all compensatable or all retriable, never a pivot"
            )
        answers: list[str] = []
        for step in group.steps:
            if step.command is None:
                raise SagaDefinitionError(f"{where}: member {step.name!r} sends no command")
            answers += [t.type_name() for t in (step.success, step.compensated) if t is not None]
            answers += [t.type_name() for t in step.failures]
        if len(set(answers)) != len(answers):
            raise SagaDefinitionError(f"{where}: members must answer with event types of their own")

    def _validate_step(self, step: Step, position: int, seen_pivot: bool) -> bool:
        where = f"saga {self.name!r}, step {step.name!r}"
        if step.command is None and position != 0:
            raise SagaDefinitionError(f"{where}: only the first step may be the start event")
        if step.command is not None and step.success is None:
            raise SagaDefinitionError(f"{where}: a step that sends a command needs a success event")
        if step.kind is StepKind.COMPENSATABLE:
            if seen_pivot:
                raise SagaDefinitionError(f"{where}: a compensatable step cannot follow the pivot")
            if step.compensation is None or step.compensated is None:
                raise SagaDefinitionError(
                    f"{where}: a compensatable step needs a compensation command and the"
                    " event that confirms it"
                )
        if step.kind is StepKind.RETRIABLE and step.failures:
            raise SagaDefinitionError(
                f"{where}: a retriable step may not fail; it is retried until it succeeds"
            )
        if step.compensation is not None and step.compensated is None:
            raise SagaDefinitionError(f"{where}: a compensation needs the event that confirms it")
        if step.compensate_on_failure and step.compensation is None:
            raise SagaDefinitionError(f"{where}: compensate_on_failure needs a compensation")
        for what, seconds in (
            ("timeout", step.timeout),
            ("compensation_timeout", step.compensation_timeout),
        ):
            if seconds is not None and seconds <= 0:
                raise SagaDefinitionError(f"{where}: {what} must be positive")
        if step.command is None and (step.timeout is not None or step.retry is not None):
            raise SagaDefinitionError(f"{where}: the start step sends nothing to time or retry")
        if step.compensation is None and (
            step.compensation_timeout is not None or step.compensation_retry is not None
        ):
            raise SagaDefinitionError(f"{where}: no compensation to time or retry")
        return seen_pivot or step.kind is StepKind.PIVOT

    @property
    def correlation_attribute(self) -> str:
        """The Python attribute of ``correlation_field`` (``tripId`` -> ``trip_id``)."""
        return self._correlation_attribute

    def all_steps(self) -> list[Step]:
        """Every step, group members included, in order."""
        return [step for stage in self.stages for step in stage]

    def step(self, name: str) -> Step:
        """The step named ``name``."""
        return self._by_name[name][1]

    def stage_of(self, name: str) -> int:
        """The index of the stage the step named ``name`` belongs to."""
        return self._by_name[name][0]

    def handles(self, event_type: str) -> list[tuple[str, str]]:
        """The (step name, role) pairs an event type plays in this saga (``""`` for start)."""
        return self._by_event.get(event_type, [])

    def event_types(self) -> list[type[Event]]:
        """Every event type the orchestrator must subscribe to for this saga."""
        types: list[type[Event]] = [self.start]
        for step in self.all_steps():
            if step.command is not None and step.success is not None:
                types.append(step.success)
            types.extend(step.failures)
            if step.compensated is not None:
                types.append(step.compensated)
        unique: dict[str, type[Event]] = {t.type_name(): t for t in types}
        return list(unique.values())

    def compensation_plan(self, failed: str) -> list[str]:
        """Names of the steps to compensate, in order, when step ``failed`` failed after every
        step before it succeeded."""
        name = failed
        position = self.stage_of(name)
        done = [step.name for stage in self.stages[:position] for step in stage]
        return self.plan_for(done, [name])

    def plan_for(self, succeeded: list[str], failed: list[str]) -> list[str]:
        """The compensations due when the steps ``succeeded`` have and ``failed`` failed: the
        failed ones that compensate on failure first, then the succeeded compensatable ones,
        latest first."""
        plan = [n for n in failed if self.step(n).compensate_on_failure]
        order = {step.name: i for i, step in enumerate(self.all_steps())}
        for name in sorted(succeeded, key=order.__getitem__, reverse=True):
            step = self.step(name)
            if step.kind is StepKind.COMPENSATABLE and step.compensation is not None:
                plan.append(name)
        return plan

    def takes_view(self, builder: Callable[..., Any]) -> bool:
        """Whether ``builder`` (one of this definition's) takes the view as a second argument."""
        return id(builder) in self._extended

    def build(self, builder: Callable[..., Any], data: Mapping[str, Any], view: Any) -> Any:
        """Call ``builder`` with the saga's state (typed when the definition declares ``state``)
        and, if it takes a second argument, ``view`` (which may be None when it does not)."""
        state: Any = data
        if self.state is not None:
            public = {k: v for k, v in data.items() if not k.startswith("_")}
            state = msgspec.convert(public, self.state, strict=False)
        if id(builder) in self._extended:
            return builder(state, view)
        return builder(state)

    def with_timeouts(
        self, step: float | None = None, *, compensation: float | None = None
    ) -> SagaDefinition:
        """This definition with ``step`` as the timeout of every step that sends a command and
        has none of its own, and ``compensation`` that of every compensation (a setting of an
        app, so that timeouts need no code)."""

        def timed(one: Step) -> Step:
            changes: dict[str, Any] = {}
            if step is not None and one.command is not None and one.timeout is None:
                changes["timeout"] = step
            if (
                compensation is not None
                and one.compensation is not None
                and one.compensation_timeout is None
            ):
                changes["compensation_timeout"] = compensation
            return replace(one, **changes) if changes else one

        steps = tuple(
            Parallel(item.name, tuple(timed(s) for s in item.steps))
            if isinstance(item, Parallel)
            else timed(item)
            for item in self.steps
        )
        return replace(self, steps=steps)

    def to_mermaid(self) -> str:
        """The saga as a Mermaid state diagram, naming the command each step sends (see
        :func:`sagaline.saga.describe.to_mermaid`)."""
        from sagaline.saga.describe import to_mermaid

        return to_mermaid(self)


def _takes_view(builder: Callable[..., Any]) -> bool:
    """Whether ``builder`` wants a second positional argument (the saga's view): one without a
    default (a lambda's ``k=kind`` binding a loop variable is not asking for it)."""
    try:
        parameters = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.default is inspect.Parameter.empty
    ]
    return len(required) >= 2
