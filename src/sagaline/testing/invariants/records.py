"""What the invariant checker reads and reports: the records of an audit snapshot, and violations.

The records are independent of the backends: each is built from the rows a store's (or a bus's)
``audit_rows()`` returns (see :mod:`sagaline.testing.invariants.snapshot`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaline.messages import Envelope

__all__ = [
    "CLIENT_SOURCE",
    "COLOCATED",
    "DEAD",
    "HANDLED",
    "OUTBOX",
    "PENDING",
    "AuditCommand",
    "AuditDeadLetter",
    "AuditEvent",
    "BusEvent",
    "BusView",
    "Rows",
    "UnsentEntry",
    "Violation",
    "format_violations",
]

#: The source of the messages clients submit (CLI, HTTP, tests).
CLIENT_SOURCE = "client"
#: Layout of a snapshot: the stores' database is the bus.
COLOCATED = "colocated"
#: Layout of a snapshot: a database per service, messages carried from outboxes by a relay.
OUTBOX = "outbox"

#: State of a command: its handler ran (inbox mark) or the bus acknowledged it as handled.
HANDLED = "handled"
#: State of a command: its consumer dead-lettered it.
DEAD = "dead"
#: State of a command: not handled yet.
PENDING = "pending"

#: What ``audit_rows()`` returns: table name to rows.
Rows = Mapping[str, Sequence[Sequence[Any]]]


@dataclass(frozen=True)
class Violation:
    """One broken invariant: its id (``I1`` .. ``I9``), what is wrong, and the evidence."""

    invariant: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        details = ", ".join(f"{key}={value!r}" for key, value in self.evidence.items())
        return f"{self.invariant} {self.message}" + (f" [{details}]" if details else "")


def format_violations(violations: list[Violation], limit: int = 25) -> str:
    """A readable list of violations for an assertion message (the first ``limit`` of them)."""
    if not violations:
        return "no violation"
    by_invariant = Counter(v.invariant for v in violations)
    lines = [
        f"{len(violations)} violation(s): "
        + ", ".join(f"{name}: {count}" for name, count in sorted(by_invariant.items()))
    ]
    lines.extend(f"  {violation}" for violation in violations[:limit])
    if len(violations) > limit:
        lines.append(f"  ... and {len(violations) - limit} more")
    return "\n".join(lines)


@dataclass(frozen=True)
class AuditEvent:
    """One logged event: an append to a stream, or an event a service published.

    ``position`` is its place in the log it was read from, ``origin``: ``"log"`` for the shared
    log of a co-located store, else ``"<store> events"`` (a stream append) or
    ``"<store> outbox"`` (published through that store's outbox).
    """

    position: int
    stream: str | None
    version: int | None
    message_id: str
    type: str
    correlation_id: str
    causation_id: str | None
    source: str | None
    body: dict[str, Any]
    raw: str
    timestamp: str
    traceparent: str | None = None
    part: int | None = None
    origin: str = "log"

    @property
    def at(self) -> int | str:
        """Where to find it: its log position, prefixed by its origin unless it is the log."""
        return self.position if self.origin == "log" else f"{self.origin}#{self.position}"

    def envelope(self) -> Envelope:
        """The event as its consumers receive it."""
        return Envelope(
            message_id=self.message_id,
            message_type=self.type,
            body=self.raw.encode(),
            correlation_id=self.correlation_id,
            causation_id=self.causation_id,
            timestamp=self.timestamp,
            traceparent=self.traceparent,
            source=self.source,
        )


@dataclass(frozen=True)
class AuditCommand:
    """One command sent, with its state: :data:`HANDLED`, :data:`DEAD` or :data:`PENDING`.

    ``queue`` is the service that handles its type; ``id`` its sequence number where it was
    read (bus queue or outbox), ``origin`` where that is (``"bus"``, ``"<store> outbox"``,
    ``"client"`` for a submitted order found through its effects). ``attempts`` and
    ``last_error`` are known when the bus keeps them.
    """

    message_id: str
    queue: str | None
    type: str
    correlation_id: str
    causation_id: str | None
    source: str | None
    state: str
    attempts: int | None = None
    last_error: str | None = None
    id: int | None = None
    origin: str = "bus"


@dataclass(frozen=True)
class AuditDeadLetter:
    """One dead letter: the consumer that gave up on a message, and why."""

    consumer: str
    message_id: str
    type: str
    correlation_id: str
    causation_id: str | None
    source: str | None
    reason: str
    attempts: int


@dataclass(frozen=True)
class BusEvent:
    """An event in the bus's own log, at a position of a partition."""

    position: int
    part: int
    message_id: str
    type: str
    correlation_id: str
    source: str | None


@dataclass
class BusView:
    """What the bus knows: its queues (state as acknowledged), its log, its subscribers' cursors.

    ``cursors`` maps (subscriber, partition) to the last position that subscriber settled.
    """

    commands: list[AuditCommand] = field(default_factory=list)
    events: list[BusEvent] = field(default_factory=list)
    cursors: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass(frozen=True)
class UnsentEntry:
    """An outbox entry its relay has not published yet."""

    origin: str
    id: int
    message_id: str
    type: str
    correlation_id: str
