"""What the framework tells the system about its own handling: a message dead-lettered.

When a worker dead-letters a message (its retries exhausted, a poison, an unknown type, a body
that does not decode), it publishes :class:`MessageDeadLettered` in the same unit of work, so
whoever waits for that message learns it never will be handled: a saga whose command is
dead-lettered fails that step and compensates. A notice about a notice is never published.
"""

from __future__ import annotations

from typing import ClassVar

from sagaline.messages import Envelope, Event

__all__ = ["DeadLetterResolved", "MessageDeadLettered", "dead_letter_notice"]


class MessageDeadLettered(Event, kw_only=True, frozen=True):
    """Message ``message_id`` (of type ``message_type``, for business key ``correlation_id``)
    was dead-lettered by consumer ``consumer`` after ``attempts`` tries, for ``reason``."""

    correlation: ClassVar[str] = "correlation_id"

    message_id: str
    message_type: str
    correlation_id: str
    consumer: str
    reason: str
    attempts: int


class DeadLetterResolved(Event, kw_only=True, frozen=True):
    """An operator ``action`` (``replayed`` or ``discarded``) on dead letter ``message_id`` of
    ``consumer``, by ``by`` for ``reason``: in the audit trail of the message's transaction."""

    correlation: ClassVar[str] = "correlation_id"

    message_id: str
    message_type: str
    correlation_id: str
    consumer: str
    action: str
    by: str
    reason: str
    outcome: str


def dead_letter_notice(
    consumer: str, envelope: Envelope, reason: str, attempts: int
) -> Event | None:
    """The notice of ``envelope`` dead-lettered by ``consumer``; None for a notice itself."""
    if envelope.message_type in _NOTICES:
        return None
    return MessageDeadLettered(
        message_id=envelope.message_id,
        message_type=envelope.message_type,
        correlation_id=envelope.correlation_id,
        consumer=consumer,
        reason=reason[:2000],
        attempts=attempts,
    )


_NOTICES = {MessageDeadLettered.type_name(), DeadLetterResolved.type_name()}
