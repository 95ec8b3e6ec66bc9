"""Planning a redelivery, the same for every SQL dialect (see the backends' ``schedule``)."""

from __future__ import annotations

from collections.abc import Sequence

from sagaline.ports import Delivery

__all__ = ["rewound_positions"]


def rewound_positions(deliveries: Sequence[Delivery]) -> dict[int, int]:
    """Per partition, the log position just before the earliest of a subscriber's
    ``deliveries`` in it: where its cursor goes back to for them to come again."""
    before: dict[int, int] = {}
    for delivery in deliveries:
        part, position = delivery.ordering_key, delivery.token - 1
        before[part] = min(before.get(part, position), position)
    return before
