"""The messages of sagaline's own that move a saga besides its steps' events.

A timer that fires (:class:`SagaTimerFired`), an operator's action (:class:`SagaActionRequested`)
and a dead-lettered message (:class:`~sagaline.handling.notices.MessageDeadLettered`, published by
the worker that dead-letters it) are events like any other: they travel through the bus, the
orchestrator handles them in a unit of work with its inbox, and the saga's history and audit
trail record them. They carry the business key as their correlation, so a transaction's trace
shows them among its own messages.
"""

from __future__ import annotations

from typing import ClassVar

from sagaline.messages import Event

__all__ = ["SagaActionRequested", "SagaTimerFired"]


class SagaTimerFired(Event, kw_only=True, frozen=True):
    """Timer ``timer_id`` of saga ``saga_id`` fired: ``purpose`` is ``timeout`` (of try
    ``attempt`` of ``step``, or of its compensation when ``undo``), ``retry`` (the next try is
    due) or ``deadline`` (of the whole saga)."""

    correlation: ClassVar[str] = "key"

    saga_id: str
    key: str
    timer_id: str
    purpose: str
    step: str = ""
    attempt: int = 0
    undo: bool = False


class SagaActionRequested(Event, kw_only=True, frozen=True):
    """An operator asks ``action`` (retry, compensate, skip, abort) of saga ``saga_id``: who
    (``by``) and why (``reason``) go to its history."""

    correlation: ClassVar[str] = "key"

    saga_id: str
    key: str
    action: str
    by: str
    reason: str
