"""Poison isolation: one message that fails, or that killed a consumer, never costs the rest of
its batch their work.

A handler error in the fast pass (:class:`_RetryBatch`) rolls the batch back, to be handled again
message by message under savepoints. A message a broker delivered again after a batch of it never
completed goes alone (:func:`_isolated`), so only the one that keeps killing its consumer reaches
the dead letters.
"""

from __future__ import annotations

from collections.abc import Set

from sagaline.ports import Batch, Delivery


class _RetryBatch(Exception):
    """A handler failed in the fast pass: handle the batch again under savepoints."""


def _isolated(batch: Batch, suspects: Set[str]) -> list[Batch]:
    """``batch`` in parts, in order: each of ``suspects`` (handed out before since a broker
    delivered it again, and not completed) alone, as it may be what killed a consumer; the
    others together, as few parts as that allows."""
    parts: list[list[Delivery]] = [[]]
    for delivery in batch.deliveries:
        if delivery.envelope.message_id in suspects:
            parts += [[delivery], []]
        else:
            parts[-1].append(delivery)
    return [
        Batch(consumer=batch.consumer, deliveries=part, cursor=batch.cursor)
        for part in parts
        if part
    ]
