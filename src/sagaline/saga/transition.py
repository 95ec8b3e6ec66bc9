"""What a saga's state machine calls for, and the names it gives things.

A signal (see :mod:`sagaline.saga.state`) moves a saga instance and returns a
:class:`Transition`: the commands now due (:class:`Send`), the timers to set (:class:`Timer`) and
to cancel. :class:`SagaView` is what a step's builder may learn of the instance besides its state.
The ids of instances and idempotency keys are made here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sagaline.ports import SagaRecord
from sagaline.saga.definition import SagaDefinition

__all__ = ["ACTIONS", "SagaView", "Send", "Timer", "Transition", "saga_id"]

#: What an operator may do to a saga (see :func:`sagaline.saga.state.on_action`).
ACTIONS = ("retry", "compensate", "skip", "abort")

# A step's states, as ``data["_steps"][name]["s"]`` holds them.
RUNNING = "running"  # its command sent, no answer yet
RETRYING = "retrying"  # a try failed; the next is due when its retry timer fires
SUCCEEDED = "succeeded"
FAILED = "failed"
ABANDONED = "abandoned"  # sent, given up on (timed out, or the saga failed meanwhile)
COMPENSATING = "compensating"  # its compensation sent
UNDO_RETRYING = "undo-retrying"  # a compensation try failed; the next is due on its timer
COMPENSATED = "compensated"
SKIPPED = "skipped"  # compensated by hand, an operator said
STUCK = "stuck"  # its compensation could not succeed within its policy


def saga_id(definition: SagaDefinition, key: str) -> str:
    """The id of the instance of ``definition`` for business key ``key``."""
    return f"{definition.name}:{key}"


@dataclass(slots=True)
class Send:
    """A command due: step ``step``'s (or, ``undo``, its compensation), try ``attempt``."""

    step: str
    undo: bool
    attempt: int


@dataclass(slots=True)
class Timer:
    """A timer to set: ``kind`` (``timeout``, ``retry`` or ``deadline``) for ``step`` (empty for
    the deadline) and try ``attempt`` (of the compensation when ``undo``), due ``after`` seconds
    from the unit of work that sets it."""

    timer_id: str
    kind: str
    step: str
    attempt: int
    undo: bool
    after: float


@dataclass(frozen=True, slots=True)
class SagaView:
    """What a builder may learn of the instance besides its state (its optional second
    argument): the saga id, the step and try it builds for, the key of that command, and why
    the saga is compensating (``{"step", "event", "reason"}``) once it is."""

    saga_id: str
    step: str
    attempt: int
    idempotency_key: str
    failure: Mapping[str, str] | None = None


@dataclass(slots=True)
class Transition:
    """What one signal did to a saga instance, and what it calls for.

    ``record`` is the instance to write back (None when an event matched no instance and starts
    none). ``sends`` are the commands now due, ``timers`` the timers to set and ``cancels`` the
    ids of those to cancel; ``completed`` says whether the saga just completed.
    """

    record: SagaRecord | None
    sends: list[Send] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    completed: bool = False

    @property
    def run(self) -> list[str]:
        """The steps whose command is now due."""
        return [s.step for s in self.sends if not s.undo]

    @property
    def compensate(self) -> list[str]:
        """The steps whose compensation is now due."""
        return [s.step for s in self.sends if s.undo]
