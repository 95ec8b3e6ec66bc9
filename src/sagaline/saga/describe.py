"""A saga definition described as plain data: its steps, their kinds, commands and compensations,
the problems found against the system that hosts it, and its Mermaid diagram.

A step's command is made by a builder (often a lambda) that declares nothing about what it
returns. Its type is learnt by calling the builder with sample saga data: the start event's
fields filled with values of their declared types (a builder may convert them), and the fields a
step keeps from its success event. Commands are msgspec structs, which do not validate when
constructed, so the builder's result is only inspected, never sent. Builders are meant to be pure
functions of the saga data; one that raises on the sample falls back to its return annotation,
and one with neither is shown as ``?``.
"""

from __future__ import annotations

import datetime
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec

from sagaline.handling import System
from sagaline.messages import Command, Event, Message
from sagaline.saga.definition import Parallel, SagaDefinition, Step, StepKind
from sagaline.saga.state import SagaView

__all__ = [
    "UNKNOWN",
    "SagaDescription",
    "StepDescription",
    "built_type",
    "describe",
    "sagas_of",
    "to_mermaid",
]

#: Shown for a builder whose message type could not be learnt.
UNKNOWN = "?"

_DEPTH = 8


@dataclass(frozen=True)
class StepDescription:
    """One step: its kind, the command it sends and the events that answer, its compensation."""

    name: str
    kind: str
    command: str | None
    success: str | None
    failures: tuple[str, ...]
    compensation: str | None
    compensated: str | None
    compensate_on_failure: bool
    keep: tuple[str, ...]
    #: The parallel group the step belongs to (None: a step of its own).
    group: str | None = None
    timeout: float | None = None
    #: How many times its command may be sent (0: until it succeeds).
    attempts: int = 1
    compensation_timeout: float | None = None
    compensation_attempts: int = 1

    def to_json(self) -> dict[str, Any]:
        """The step as JSON-ready data (camelCase keys, as the wire's)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "group": self.group,
            "command": self.command,
            "success": self.success,
            "failures": list(self.failures),
            "compensation": self.compensation,
            "compensated": self.compensated,
            "compensateOnFailure": self.compensate_on_failure,
            "keep": list(self.keep),
            "timeout": self.timeout,
            "attempts": self.attempts,
            "compensationTimeout": self.compensation_timeout,
            "compensationAttempts": self.compensation_attempts,
        }


@dataclass(frozen=True)
class SagaDescription:
    """A saga definition as data, with the problems found and its Mermaid diagram."""

    name: str
    version: int
    description: str
    start: str
    correlation_field: str
    steps: tuple[StepDescription, ...]
    on_completed: str | None
    problems: tuple[str, ...]
    mermaid: str
    deadline: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The saga as JSON-ready data (camelCase keys, as the wire's)."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "start": self.start,
            "correlationField": self.correlation_field,
            "steps": [step.to_json() for step in self.steps],
            "onCompleted": self.on_completed,
            "deadline": self.deadline,
            "problems": list(self.problems),
            "mermaid": self.mermaid,
        }


def sagas_of(system: System) -> list[SagaDefinition]:
    """The saga definitions the system's services keep (orchestrators), in the order given."""
    return list(system.sagas.values())


def describe(definition: SagaDefinition, system: System | None = None) -> SagaDescription:
    """Describe ``definition``; with ``system``, also check that a service handles each of its
    commands (a problem otherwise)."""
    data = sample_data(definition)
    steps = []
    groups = {s.name: g.name for g in definition.steps if isinstance(g, Parallel) for s in g.steps}
    for step in definition.all_steps():
        steps.append(
            StepDescription(
                name=step.name,
                kind=step.kind.value,
                command=_name_of(definition, step.command, data, step, Command),
                success=_type_name(step.success),
                failures=tuple(failure.type_name() for failure in step.failures),
                compensation=_name_of(definition, step.compensation, data, step, Command),
                compensated=_type_name(step.compensated),
                compensate_on_failure=step.compensate_on_failure,
                keep=step.keep,
                group=groups.get(step.name),
                timeout=step.timeout,
                attempts=step.tries(),
                compensation_timeout=step.compensation_timeout,
                compensation_attempts=step.compensation_tries(),
            )
        )
    on_completed = (
        _name_of(definition, definition.on_completed, data, definition.all_steps()[-1], Event)
        if definition.on_completed is not None
        else None
    )
    problems: list[str] = []
    if system is not None:
        for described in steps:
            for role, command in (
                ("command", described.command),
                ("compensation", described.compensation),
            ):
                if command not in (None, UNKNOWN) and command not in system.routes:
                    problems.append(
                        f"step {described.name!r}: no service of the system handles its"
                        f" {role} {command}"
                    )
    return SagaDescription(
        name=definition.name,
        version=definition.version,
        description=definition.description,
        start=definition.start.type_name(),
        correlation_field=definition.correlation_field,
        steps=tuple(steps),
        on_completed=on_completed,
        problems=tuple(problems),
        mermaid=to_mermaid(definition, steps),
        deadline=definition.deadline,
    )


def built_type(
    builder: Callable[[Mapping[str, Any]], Message],
    data: Mapping[str, Any],
    base: type[Message] = Command,
    *,
    annotated: Callable[..., Any] | None = None,
) -> type[Message] | None:
    """The message type ``builder`` makes: that of what it builds from ``data``, else the return
    annotation of ``annotated`` (``builder`` itself by default); None when neither tells."""
    try:
        built = builder(_Probe(data))
    except Exception:
        built = None
    if isinstance(built, base):
        return type(built)
    try:
        returned = typing.get_type_hints(annotated or builder).get("return")
    except Exception:
        return None
    if isinstance(returned, type) and issubclass(returned, base):
        return returned
    return None


def sample_data(definition: SagaDefinition) -> dict[str, Any]:
    """Saga data as an instance of ``definition`` would hold it, with sample values: the start
    event's fields, the fields steps keep from their success events, and the engine's own."""
    data: dict[str, Any] = dict(_sample_struct(definition.start))
    data.pop(definition.start.discriminator, None)
    for step in definition.all_steps():
        if step.keep and step.success is not None:
            success = _sample_struct(step.success)
            for name in step.keep:
                data.setdefault(name, success.get(name, "x"))
    data["_compensations"] = []
    return data


def to_mermaid(definition: SagaDefinition, steps: Iterable[StepDescription] | None = None) -> str:
    """The saga as a Mermaid state diagram: each step with the command it sends, the events
    that move it on or fail it, a parallel group as a fork and a join, and the compensations
    with their commands."""
    described = {s.name: s for s in (steps if steps is not None else describe(definition).steps)}
    entries = [_entry(item) for item in definition.steps]
    lines = ["stateDiagram-v2", f"    [*] --> {entries[0]}: {definition.start.type_name()}"]
    for position, item in enumerate(definition.steps):
        following = entries[position + 1] if position + 1 < len(entries) else "completed"
        members = item.steps if isinstance(item, Parallel) else (item,)
        if isinstance(item, Parallel):
            lines.append(f"    state {item.name}_fork <<fork>>")
            lines.append(f"    state {item.name}_join <<join>>")
            lines.append(f"    {item.name}_join --> {following}")
        for step in members:
            target = f"{item.name}_join" if isinstance(item, Parallel) else following
            if isinstance(item, Parallel):
                lines.append(f"    {item.name}_fork --> {step.name}")
            command = described[step.name].command
            if command is not None:
                timing = _timing(step.timeout, step.tries())
                lines.append(f"    {step.name}: {step.name} sends {command}{timing}")
            if step.command is not None and step.success is not None:
                lines.append(f"    {step.name} --> {target}: {step.success.type_name()}")
            else:
                lines.append(f"    {step.name} --> {target}")
            for failure in step.failures:
                lines.append(f"    {step.name} --> compensating: {failure.type_name()}")
            if step.timeout is not None:
                lines.append(f"    {step.name} --> compensating: no answer in {step.timeout:g} s")
    lines.append("    completed --> [*]")
    for step in reversed(definition.all_steps()):
        if step.compensation is None or step.compensated is None:
            continue
        command = described[step.name].compensation or UNKNOWN
        when = " after a late success" if step.kind is StepKind.PIVOT else ""
        lines.append(
            f"    compensating --> compensating: undo {step.name}{when}"
            f" ({command}, then {step.compensated.type_name()})"
        )
    lines.append("    compensating --> compensated: every compensation confirmed")
    lines.append("    compensating --> stuck: a compensation failed past its policy")
    lines.append("    compensated --> [*]")
    return "\n".join(lines)


def _entry(item: Step | Parallel) -> str:
    return f"{item.name}_fork" if isinstance(item, Parallel) else item.name


def _timing(timeout: float | None, tries: int) -> str:
    parts = []
    if timeout is not None:
        parts.append(f"timeout {timeout:g} s")
    if tries != 1:
        parts.append("tried until it succeeds" if tries == 0 else f"up to {tries} tries")
    return f" ({', '.join(parts)})" if parts else ""


def _type_name(cls: type[Message] | None) -> str | None:
    return cls.type_name() if cls is not None else None


def _name_of(
    definition: SagaDefinition,
    builder: Callable[..., Message] | None,
    data: Mapping[str, Any],
    step: Step,
    base: type[Message],
) -> str | None:
    if builder is None:
        return None
    # Compensations run after a failure: the engine has recorded which step failed, and why.
    failure = {"step": step.name, "event": "", "reason": "x"}
    probe = {**data, "_failure": failure}
    view = SagaView(f"{definition.name}:x", step.name, 1, f"saga:{definition.name}:x", failure)
    found = built_type(
        lambda state: definition.build(builder, state, view), probe, base, annotated=builder
    )
    return found.type_name() if found is not None else UNKNOWN


class _Probe(dict[str, Any]):
    """Saga data that answers any key it lacks with a sample string."""

    def __missing__(self, key: str) -> Any:
        return "x"


def _sample_struct(cls: type[msgspec.Struct]) -> dict[str, Any]:
    sample = _sample(msgspec.inspect.type_info(cls), 0)
    return sample if isinstance(sample, dict) else {}


def _sample(info: msgspec.inspect.Type, depth: int) -> Any:
    """A value of the type ``info`` describes, as its builtins (what saga data holds)."""
    inspect = msgspec.inspect
    if depth > _DEPTH:
        return None
    if isinstance(info, inspect.Metadata):
        return _sample(info.type, depth)
    if isinstance(info, inspect.StrType):
        return "x" * max(1, info.min_length or 0)
    if isinstance(info, inspect.BoolType):
        return True
    if isinstance(info, inspect.IntType):
        return _bounded(1, info)
    if isinstance(info, inspect.FloatType):
        return float(_bounded(1, info))
    if isinstance(info, inspect.DecimalType):
        return Decimal(1)
    if isinstance(info, inspect.DateTimeType):
        return datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC).isoformat()
    if isinstance(info, inspect.DateType):
        return "2000-01-01"
    if isinstance(info, inspect.UUIDType):
        return str(uuid.UUID(int=1))
    if isinstance(info, inspect.LiteralType):
        return info.values[0]
    if isinstance(info, inspect.EnumType):
        return next(iter(info.cls)).value
    if isinstance(info, (inspect.ListType, inspect.SetType, inspect.FrozenSetType)):
        return [_sample(info.item_type, depth + 1)] * max(1, info.min_length or 0)
    if isinstance(info, inspect.VarTupleType):
        return [_sample(info.item_type, depth + 1)] * max(1, info.min_length or 0)
    if isinstance(info, inspect.TupleType):
        return [_sample(item, depth + 1) for item in info.item_types]
    if isinstance(info, inspect.DictType):
        return {_sample(info.key_type, depth + 1): _sample(info.value_type, depth + 1)}
    if isinstance(info, (inspect.StructType, inspect.DataclassType, inspect.TypedDictType)):
        fields: dict[str, Any] = {
            field.encode_name: _sample(field.type, depth + 1) for field in info.fields
        }
        if isinstance(info, inspect.StructType) and info.tag_field and info.tag is not None:
            fields[info.tag_field] = info.tag
        return fields
    if isinstance(info, inspect.UnionType):
        options = [t for t in info.types if not isinstance(t, inspect.NoneType)]
        return _sample(options[0], depth) if options else None
    if isinstance(info, inspect.NoneType):
        return None
    return "x"


def _bounded(value: int, info: msgspec.inspect.IntType | msgspec.inspect.FloatType) -> int:
    if info.ge is not None:
        value = max(value, int(info.ge))
    if info.gt is not None:
        value = max(value, int(info.gt) + 1)
    if info.le is not None:
        value = min(value, int(info.le))
    if info.lt is not None:
        value = min(value, int(info.lt) - 1)
    return value
