"""What a store holds, as the ports hand it out: logged events, documents, saga instances,
outbox entries and dead letters."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from sagaline.messages import Envelope

__all__ = [
    "DEAD_LETTERED",
    "DEAD_LETTER_BODY_BYTES",
    "DeadLetter",
    "Document",
    "OutboxEntry",
    "SagaRecord",
    "StoredEvent",
    "bounded_dead_letter",
]


#: The handling count of a message in the dead letters (see ``handling_ended``).
DEAD_LETTERED = 1 << 30


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the log holds it: envelope, stream, version and global position."""

    position: int
    stream: str | None
    version: int | None
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Document:
    """A JSON document with the version it was read at (for optimistic concurrency)."""

    data: dict[str, Any]
    version: int


@dataclass(slots=True)
class SagaRecord:
    """The persisted state of one saga instance.

    ``history`` holds the transitions read back (left empty when the instance is loaded to make a
    transition); ``new_history`` the ones the current unit of work adds.
    """

    saga_id: str
    definition: str
    definition_version: int
    status: str
    step: int
    data: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0
    created_at: str = ""
    updated_at: str = ""
    new_history: list[dict[str, Any]] = field(default_factory=list)
    loaded_status: str = ""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A message a unit of work emitted, waiting in the store's outbox to be published."""

    id: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be processed, with the reason."""

    id: int
    consumer: str
    envelope: Envelope
    reason: str
    attempts: int
    failed_at: str


#: The most bytes of a body a dead letter keeps; a larger body is kept as this long a prefix,
#: with its size and SHA-256 in the reason.
DEAD_LETTER_BODY_BYTES = 64 * 1024


def bounded_dead_letter(
    body: bytes, reason: str, limit: int = DEAD_LETTER_BODY_BYTES
) -> tuple[bytes, str]:
    """The body and reason a store records for a dead letter: a body over ``limit`` bytes is cut
    to its first ``limit`` bytes (fewer, not to split a UTF-8 character of a text body) and the
    reason says so, with the whole body's size and SHA-256.
    """
    if len(body) <= limit:
        return body, reason
    prefix = body[:limit]
    # Drop a UTF-8 character cut in two (at most 3 bytes), so that a text body stays text.
    for cut in range(4):
        try:
            prefix[: limit - cut].decode()
        except UnicodeDecodeError:
            continue
        prefix = prefix[: limit - cut]
        break
    digest = hashlib.sha256(body).hexdigest()
    return prefix, (
        f"{reason}; body of {len(body):,} bytes stored truncated to its first"
        f" {len(prefix):,} bytes, sha256 {digest}"
    )
