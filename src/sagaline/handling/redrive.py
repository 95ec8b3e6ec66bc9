"""An operator's work on dead letters: replay one through its consumer's handler, or discard it.

Replaying handles the dead letter now, in this process, as its consumer would: through the unit
of work (inbox, handler, outgoing messages and timers), in the store of the consumer's service.
The dead letter is removed in that same unit of work, so it is replayed once. A handler that
fails again dead-letters the message again, with the new reason. Discarding removes it.

Either is told to the system with a :class:`~sagaline.handling.notices.DeadLetterResolved` event
(who, why, what came of it), which joins the audit trail of the message's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagaline.errors import ActionRefused, SagalineError
from sagaline.handling.notices import DeadLetterResolved
from sagaline.handling.system import System
from sagaline.handling.worker import Worker
from sagaline.messages import Envelope
from sagaline.ports import (
    Backend,
    BrokerBus,
    ConsumerSpec,
    DeadLetter,
    Delivery,
    Outcome,
    StoreTransaction,
)

__all__ = ["DeadLetterNotFound", "Redriven", "discard", "replay"]


class DeadLetterNotFound(SagalineError):
    """No dead letter has the id an operator named (or another operator took it first)."""

    code = "dead_letter_not_found"


@dataclass(frozen=True)
class Redriven:
    """What became of one dead letter: ``replayed`` (handled now), ``failed again`` (dead-
    lettered anew, with ``reason``) or ``discarded``."""

    letter: DeadLetter
    outcome: str
    reason: str = ""


async def replay(
    db: Backend,
    system: System,
    letter_id: int,
    *,
    by: str,
    reason: str,
    bus: BrokerBus | None = None,
) -> Redriven:
    """Handle dead letter ``letter_id`` of store ``db`` again now, through its consumer.

    ``bus`` is the deployment's separate bus, if any (what the handler emits then goes out
    through the store's outbox, as a service's would). Raises :class:`DeadLetterNotFound`.
    """
    _check(by, reason)
    async with db.transaction() as tx:
        [letter] = await _take(tx, letter_id)
        service = system.services.get(letter.consumer)
        specs: dict[str, ConsumerSpec] = (
            {spec.source: spec for spec in service.consumers()} if service else {}
        )
        source = "queue" if letter.envelope.message_type in system.routes else "subscription"
        spec = specs.get(source)
        if service is None or spec is None:
            raise DeadLetterNotFound(
                f"dead letter {letter_id}: {letter.consumer!r} does not handle"
                f" {letter.envelope.message_type} in this system"
            )
        worker = Worker(db, system, service, spec, member="operator", bus=bus)
        envelope = letter.envelope
        # The last try its policy allows: a handler that fails again dead-letters it anew.
        delivery = Delivery(envelope, spec.retry.max_attempts, letter.envelope.correlation_id, None)
        outgoing: list[Envelope] = []
        # Handled before it was dead-lettered, it is no longer a dead letter there.
        await tx.handling_ended(spec.name, envelope.message_id)
        outcome, why = await worker.handle_now(tx, delivery, outgoing)
        result = "replayed" if outcome is Outcome.ACK else "failed again"
        notice = _notice(letter, "replayed", by, reason, result)
        outgoing.append(Envelope.wrap(notice, causation=envelope, source=spec.name))
        await worker.emit(tx, outgoing)
    return Redriven(letter, result, why or "")


async def discard(db: Backend, system: System, letter_id: int, *, by: str, reason: str) -> Redriven:
    """Remove dead letter ``letter_id`` of store ``db`` for good. Raises
    :class:`DeadLetterNotFound`."""
    _check(by, reason)
    async with db.transaction() as tx:
        [letter] = await _take(tx, letter_id)
        notice = _notice(letter, "discarded", by, reason, "discarded")
        await tx.emit(
            [Envelope.wrap(notice, causation=letter.envelope, source=letter.consumer)],
            system.routes,
        )
    return Redriven(letter, "discarded")


def _check(by: str, reason: str) -> None:
    if not by.strip() or not reason.strip():
        raise ActionRefused("an action on a dead letter needs who asks (by) and why (reason)")


async def _take(tx: StoreTransaction, letter_id: int) -> list[DeadLetter]:
    removed = await tx.remove_dead_letters([letter_id])
    if not removed:
        raise DeadLetterNotFound(f"no dead letter {letter_id}")
    return removed


def _notice(
    letter: DeadLetter, action: str, by: str, reason: str, outcome: str
) -> DeadLetterResolved:
    return DeadLetterResolved(
        message_id=letter.envelope.message_id,
        message_type=letter.envelope.message_type,
        correlation_id=letter.envelope.correlation_id,
        consumer=letter.consumer,
        action=action,
        by=by,
        reason=reason,
        outcome=outcome,
    )
