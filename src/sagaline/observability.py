"""The audit trail as data: a transaction's messages in causal order, sagas and dead letters.

Everything here returns plain data (dicts, lists, dataclasses) for the CLI, the HTTP API and tests
to render; nothing prints. The helpers at the end make text safe to show: control characters out
of untrusted payloads, passwords out of URLs.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import msgspec

from sagaline.config import redact_url
from sagaline.ports import DeadLetter, SagaRecord

__all__ = [
    "SagaSource",
    "TraceSource",
    "TransactionTrace",
    "causal_order",
    "dead_letter_summary",
    "load_trace",
    "merge_trace_rows",
    "redact_url",
    "saga_failure",
    "saga_summary",
    "strip_control",
    "to_json",
]


def _sort_key(row: Mapping[str, Any]) -> tuple[str, int, str]:
    return (str(row.get("timestamp") or ""), int(row.get("sequence") or 0), str(row["messageId"]))


def causal_order(rows: Iterable[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """Order messages as a tree along ``causationId``, depth first: ``[(depth, row), ...]``.

    Roots are the rows whose ``causationId`` is not among the rows (the submitted command, or a
    message whose cause belongs to another transaction); siblings are sorted by timestamp, then
    by sequence. Every row appears exactly once, even when causation ids form a cycle (which a
    forged message could claim): rows left unreached become roots of their own.
    """
    rows = list(rows)
    ids = {row["messageId"] for row in rows}
    children: dict[str, list[Mapping[str, Any]]] = {}
    roots: list[Mapping[str, Any]] = []
    for row in rows:
        cause = row.get("causationId")
        if cause is not None and cause in ids and cause != row["messageId"]:
            children.setdefault(cause, []).append(row)
        else:
            roots.append(row)
    for siblings in children.values():
        siblings.sort(key=_sort_key)
    ordered: list[tuple[int, Mapping[str, Any]]] = []
    visited: set[str] = set()

    def walk(start: Mapping[str, Any]) -> None:
        # An explicit stack: a long causal chain must not hit the recursion limit.
        stack: list[tuple[int, Mapping[str, Any]]] = [(0, start)]
        while stack:
            depth, row = stack.pop()
            if row["messageId"] in visited:
                continue
            visited.add(row["messageId"])
            ordered.append((depth, row))
            for child in reversed(children.get(row["messageId"], [])):
                stack.append((depth + 1, child))

    for root in sorted(roots, key=_sort_key):
        walk(root)
    for row in sorted(rows, key=_sort_key):
        if row["messageId"] not in visited:
            walk(row)
    return ordered


def saga_failure(record: SagaRecord) -> dict[str, Any] | None:
    """Where and why a saga failed (``step``, ``event``, ``reason``), or None when it did not."""
    failure = record.data.get("_failure")
    return dict(failure) if isinstance(failure, Mapping) else None


def saga_summary(record: SagaRecord, *, history: bool = False) -> dict[str, Any]:
    """One saga instance as a JSON-ready mapping (with its transitions when ``history``)."""
    failure = saga_failure(record)
    summary: dict[str, Any] = {
        "sagaId": record.saga_id,
        "definition": record.definition,
        "definitionVersion": record.definition_version,
        "status": record.status,
        "step": record.step,
        "failedStep": failure.get("step") if failure else None,
        "reason": failure.get("reason") if failure else None,
        "stuck": record.data.get("_stuck"),
        "steps": {
            name: {"state": state.get("s"), "tries": state.get("n"), "undoTries": state.get("c")}
            for name, state in (record.data.get("_steps") or {}).items()
        },
        "timers": list(record.data.get("_timers") or []),
        "createdAt": record.created_at,
        "updatedAt": record.updated_at,
    }
    if history:
        summary["history"] = list(record.history)
    return summary


def dead_letter_summary(letter: DeadLetter) -> dict[str, Any]:
    """One dead letter as a JSON-ready mapping (the body is left out: it may be large)."""
    envelope = letter.envelope
    return {
        "id": letter.id,
        "consumer": letter.consumer,
        "type": envelope.message_type,
        "messageId": envelope.message_id,
        "correlationId": envelope.correlation_id,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "failedAt": letter.failed_at,
    }


@dataclass(frozen=True)
class TransactionTrace:
    """The whole story of one business transaction: its messages, saga and dead letters."""

    correlation_id: str
    messages: list[tuple[int, Mapping[str, Any]]]
    saga: SagaRecord | None = None
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Whether anything at all is known about the transaction."""
        return bool(self.messages or self.saga or self.dead_letters)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping: messages in causal order, each with its ``depth``."""
        return {
            "correlationId": self.correlation_id,
            "saga": saga_summary(self.saga, history=True) if self.saga else None,
            "messages": [{"depth": depth, **row} for depth, row in self.messages],
            "deadLetters": [dead_letter_summary(letter) for letter in self.dead_letters],
        }


class TraceSource(Protocol):
    """What a store offers for tracing (every backend's query methods)."""

    async def trace_rows(self, correlation_id: str) -> list[dict[str, Any]]: ...

    async def handled_by(self, message_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]: ...

    async def dead_letters(self) -> list[DeadLetter]: ...


class SagaSource(Protocol):
    """A store that holds saga instances."""

    async def get_saga(self, saga_id: str, *, history: bool = True) -> SagaRecord | None: ...


async def merge_trace_rows(
    sources: Sequence[TraceSource], correlation_id: str
) -> list[dict[str, Any]]:
    """One row per message from the stores of several services.

    With a database per service, a message is recorded by the store of the service that emitted
    it (its outbox or log) and handled in the stores of the services that consumed it (their
    inboxes); the rows are merged by message id, and every store is asked who handled what.
    """
    merged: dict[str, dict[str, Any]] = {}
    for source in sources:
        for row in await source.trace_rows(correlation_id):
            known = merged.get(row["messageId"])
            if known is None:
                merged[row["messageId"]] = dict(row)
            else:
                for key, value in row.items():
                    if known.get(key) is None and value is not None:
                        known[key] = value
    if len(sources) > 1:
        ids = list(merged)
        for row in merged.values():
            row["handledBy"] = []
        for source in sources:
            for message_id, handlers in (await source.handled_by(ids)).items():
                merged[message_id]["handledBy"].extend(
                    {"consumer": consumer, "at": at} for consumer, at in handlers
                )
        for row in merged.values():
            row["handledBy"].sort(key=lambda entry: entry["at"])
    return list(merged.values())


async def load_trace(
    db: TraceSource | Sequence[TraceSource],
    correlation_id: str,
    saga_id: str | None = None,
    *,
    saga_store: SagaSource | None = None,
) -> TransactionTrace:
    """Read the audit trail of ``correlation_id`` (and the saga ``saga_id``) from the stores.

    ``db`` is one store, or the stores of every service; the saga is read from ``saga_store``
    (default: the only store given).
    """
    sources = [db] if not isinstance(db, Sequence) else list(db)
    if saga_store is None and len(sources) == 1:
        saga_store = cast(SagaSource, sources[0])
    messages = causal_order(await merge_trace_rows(sources, correlation_id))
    saga = None
    if saga_id is not None and saga_store is not None:
        saga = await saga_store.get_saga(saga_id)
    dead_letters = [
        letter
        for source in sources
        for letter in await source.dead_letters()
        if letter.envelope.correlation_id == correlation_id
    ]
    return TransactionTrace(correlation_id, messages, saga, dead_letters)


_JSON = msgspec.json.Encoder(decimal_format="number")


def to_json(value: Any, *, indent: int = 2) -> str:
    """JSON text for output: money stays a number with its scale (``75.50``), never a float.

    Every character that is not printable (C1 controls, bidirectional overrides, ...) is
    written as a ``\\uXXXX`` escape, so the JSON is inert on a terminal and parses the same.
    """
    text = msgspec.json.format(_JSON.encode(value), indent=indent).decode()
    if text.isascii() and "\x7f" not in text:
        return text
    # Outside strings JSON holds only ASCII, so every such character is inside a string.
    return "".join(
        char if char.isprintable() or char in "\n\t\r" else _json_escape(char) for char in text
    )


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


# Bidirectional overrides and isolates reorder what a terminal shows (the "Trojan Source" trick);
# they are format characters (Cf), removed with the C0/C1 controls.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf"})


def strip_control(text: str, replacement: str = "?") -> str:
    """``text`` with every control and format character replaced, so it cannot drive a terminal.

    Escape sequences (ESC, CSI, OSC), carriage returns, bells and bidirectional overrides are
    replaced by ``replacement``; tabs and line breaks by a space, keeping each value on its line.
    """
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char in "\t\n\r\v\f":
            out.append(" ")
        elif char.isprintable() or unicodedata.category(char) not in _UNSAFE_CATEGORIES:
            out.append(char)
        else:
            out.append(replacement)
    return "".join(out)
