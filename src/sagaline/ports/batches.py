"""What a bus hands a consumer and how each delivery ends: consumers, batches, retries."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from sagaline.messages import Envelope

__all__ = ["Batch", "ConsumerSpec", "Delivery", "Outcome", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed handling is retried: exponential backoff, then the dead letters."""

    max_attempts: int = 5
    initial_delay: float = 0.05
    multiplier: float = 2.0
    max_delay: float = 30.0

    @property
    def delivery_limit(self) -> int:
        """How many times a broker delivers a message before its own dead letters take it.

        A backstop, far above ``max_attempts``: the worker dead-letters a message that keeps
        failing or killing its consumer, counting the times it really handed it to its handler,
        while a broker counts a delivery for every message a dying consumer held.
        """
        return 5 * (self.max_attempts + 2)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before delivery number ``attempt + 1``."""
        return float(
            min(self.max_delay, self.initial_delay * self.multiplier ** max(0, attempt - 1))
        )


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """One consumer: a service's command queue, or its subscription to event types."""

    name: str
    source: Literal["queue", "subscription"]
    message_types: frozenset[str]
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer. ``ordering_key`` groups what must stay in order."""

    envelope: Envelope
    attempt: int
    ordering_key: Any
    token: Any


@dataclass(slots=True)
class Batch:
    """What one claim returned; ``cursor`` is adapter state needed to settle it."""

    consumer: ConsumerSpec
    deliveries: list[Delivery]
    cursor: Any = None


class Outcome(enum.Enum):
    """How one delivery of a batch ended."""

    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"
    SKIP = "skip"
