"""I7 of RELIABILITY.md: every read model equals a fresh rebuild from the logged events.

Nothing is written: the rebuild replays the snapshot's events into memory with the projection's
own handlers, and compares the documents with the live ones.
"""

from __future__ import annotations

from typing import Any, cast

from sagaline.backends._sql.rows import JSON, decode_json
from sagaline.errors import ConcurrencyError, InvalidMessage
from sagaline.ports import Document, StoreTransaction
from sagaline.projection import Projection, Views
from sagaline.testing.invariants.records import Violation
from sagaline.testing.invariants.snapshot import AuditSnapshot

__all__ = ["check_read_model"]


class _ScratchDocuments:
    """Documents of one namespace in memory, behind the two calls a projection's views make."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[bytes, int]] = {}

    async def get_document(self, namespace: str, key: str) -> Document | None:
        """The document (a fresh copy, as a store reads it), or None."""
        found = self.rows.get(key)
        return None if found is None else Document(decode_json(found[0]), found[1])

    async def put_document(
        self, namespace: str, key: str, data: dict[str, Any], expected_version: int
    ) -> int:
        """Store the document as JSON, as a store does; the version must match."""
        version = self.rows[key][1] if key in self.rows else 0
        if version != expected_version:
            raise ConcurrencyError(f"scratch {namespace}/{key} is not at {expected_version}")
        self.rows[key] = (JSON.encode(data), version + 1)
        return version + 1


async def check_read_model(snapshot: AuditSnapshot, projection: Projection) -> list[Violation]:
    """I7: the projection's read model equals a fresh rebuild from the logged events.

    The rebuild applies the projection's handlers to every logged event, in log order, into
    documents kept in memory.
    """
    scratch = _ScratchDocuments()
    views = Views(cast(StoreTransaction, scratch), f"{projection.namespace}.audit")
    violations = []
    for event in snapshot.events:
        try:
            await projection.apply(views, event.envelope())
        except InvalidMessage as exc:
            violations.append(
                Violation(
                    "I7",
                    f"{event.type} at {event.at} cannot be replayed: {exc}",
                    {"position": event.at, "messageId": event.message_id},
                )
            )
    rebuilt = {key: decode_json(raw) for key, (raw, _) in scratch.rows.items()}
    live = snapshot.documents.get(projection.namespace, {})
    for key in sorted(set(live) | set(rebuilt)):
        row, fresh = live.get(key), rebuilt.get(key)
        if row == fresh:
            continue
        if row is None or fresh is None:
            message = "missing from the read model" if row is None else "not in the rebuild"
        else:
            fields = sorted(k for k in set(row) | set(fresh) if row.get(k) != fresh.get(k))
            message = "differs from the rebuild in " + ", ".join(fields)
        violations.append(
            Violation(
                "I7",
                f"read model row {key} {message}",
                {
                    "namespace": projection.namespace,
                    "key": key,
                    "live": row,
                    "rebuilt": fresh,
                },
            )
        )
    return violations
