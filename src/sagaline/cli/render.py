"""Rendering for the terminal: untrusted text made inert, errors, JSON on stdout, status
colours, and the rich views of traces, saga histories, dead letters and saga definitions."""

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from sagaline.errors import InvalidMessage
from sagaline.observability import TransactionTrace, saga_failure, strip_control, to_json
from sagaline.ports import SagaRecord
from sagaline.saga.describe import SagaDescription

# Emoji codes (``:x:``) and highlighting would alter untrusted text; styles are set explicitly.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)


# --------------------------------------------------------------------------- helpers


def inert(value: object) -> str:
    """Untrusted text made safe for rich markup and for the terminal."""
    return escape(strip_control(str(value)))


def quoted(value: object, limit: int = 120) -> str:
    """Untrusted text quoted as a Python literal: control characters show as escapes.

    Long values are cut: an error message need not repeat a megabyte of input.
    """
    text = str(value)
    literal = repr(text[:limit]) + ("..." if len(text) > limit else "")
    return escape(strip_control(literal))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` (already inert markup) on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def emit_json(value: Any) -> None:
    sys.stdout.write(to_json(value) + "\n")
    sys.stdout.flush()


def _arrow() -> str:
    return "→" if out.encoding.lower().startswith("utf") else "->"


def describe_invalid(exc: InvalidMessage) -> str:
    field = exc.field
    prefix = f"invalid message, field {inert(field)}: " if field else "invalid message: "
    return prefix + inert(exc.reason)


def clock(timestamp: object) -> str:
    """``HH:MM:SS.mmm`` of an ISO-8601 timestamp (the whole text when it is not one)."""
    text = str(timestamp or "")
    match = re.fullmatch(r"\d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d)(\.\d{1,3})?\d*Z?", text)
    if match is None:
        return inert(text)
    return match.group(1) + (match.group(2) or "")


#: The colour of a status word; an app adds its own words (its read model's statuses).
STATUS_STYLES: dict[str, str] = {
    "COMPLETED": "green",
    "COMPENSATED": "red",
    "COMPENSATING": "yellow",
    "RUNNING": "yellow",
    "STUCK": "bold red",
    "FAILED": "bold red",
}


def status_style(status: object) -> str:
    return STATUS_STYLES.get(str(status), "white")


def styled_status(status: object) -> str:
    return f"[{status_style(status)}]{inert(status)}[/]"


def cell(value: object) -> str:
    return "" if value is None else inert(value)


# ----------------------------------------------------------------- rendering


def _message_label(row: Mapping[str, Any]) -> str:
    """Three lines at most: what was sent by whom and when; who handled it; its reason."""
    arrow = _arrow()
    kind = str(row.get("kind"))
    style = "bold cyan" if kind == "command" else "bold magenta"
    lines = [
        f"[{style}]{inert(row.get('type'))}[/] [dim]{inert(kind)}[/]"
        f" from [blue]{inert(row.get('source') or '?')}[/] at {clock(row.get('timestamp'))}"
    ]
    handled = [h for h in row.get("handledBy") or [] if isinstance(h, Mapping)]
    if handled:
        lines.append(
            f"{arrow} handled by "
            + ", ".join(
                f"[green]{inert(h.get('consumer'))}[/] at {clock(h.get('at'))}" for h in handled
            )
        )
    elif kind == "command":
        outcome = row.get("outcome")
        if outcome == "dead":
            lines.append(f"[red]{arrow} dead-lettered[/]")
        elif outcome is None:
            lines.append(f"[yellow]{arrow} pending in queue {inert(row.get('queue'))}[/]")
    else:
        lines.append(f"[dim]{arrow} no subscriber[/]")
    body = row.get("body")
    if isinstance(body, Mapping):
        details = [
            f"{key} [italic]{inert(body[key])}[/]"
            for key in ("reason", "transactionId")
            if body.get(key) is not None
        ]
        if details:
            lines.append("  ".join(details))
    return "\n".join(lines)


def _saga_line(trace: TransactionTrace, notes: Sequence[str] = ()) -> str:
    parts = [f"[bold]{inert(trace.correlation_id)}[/]"]
    record = trace.saga
    if record is None:
        parts.append("no saga")
    else:
        parts.append(f"saga {inert(record.saga_id)} {styled_status(record.status)}")
        failure = saga_failure(record)
        if failure is not None:
            parts.append(
                f"failed at {inert(failure.get('step'))}: [red]{inert(failure.get('reason'))}[/]"
            )
    parts.extend(notes)
    return f"{parts[0]}: " + "; ".join(parts[1:])


def print_trace(trace: TransactionTrace, notes: Sequence[str] = ()) -> None:
    """The saga line (with ``notes``, markup already inert) and the causal tree of messages."""
    out.print(_saga_line(trace, notes), soft_wrap=True)
    tree = Tree("", hide_root=True, guide_style="dim")
    parents: list[Tree] = [tree]
    for depth, row in trace.messages:
        del parents[depth + 1 :]
        node = parents[-1].add(_message_label(row))
        parents.append(node)
    out.print(tree)


def history_table(record: SagaRecord) -> Table:
    table = Table(title=f"saga {inert(record.saga_id)} transitions", title_justify="left")
    for column in ("at", "event", "transition", "sent", "status"):
        table.add_column(column)
    for entry in record.history:
        if not isinstance(entry, Mapping):
            continue
        sent = entry.get("sent")
        table.add_row(
            clock(entry.get("at")),
            cell(entry.get("event")),
            cell(entry.get("transition")),
            ", ".join(inert(s) for s in sent) if isinstance(sent, list) else "",
            styled_status(entry["status"]) if entry.get("status") else "",
        )
    return table


def dead_letter_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Dead letters", title_justify="left")
    for column in ("failedAt", "consumer", "type", "messageId", "attempts"):
        table.add_column(column, no_wrap=True)
    # A long word (a truncated body's SHA-256) is folded, not cut.
    table.add_column("reason", overflow="fold")
    for row in rows:
        table.add_row(
            *(cell(row.get(c)) for c in ("failedAt", "consumer", "type")),
            cell(row.get("messageId")),
            cell(row.get("attempts")),
            cell(row.get("reason")),
        )
    return table


def saga_table(saga: SagaDescription) -> Table:
    """One saga's steps as a table, its start and outcome in the title and caption."""
    title = f"saga {inert(saga.name)} v{saga.version}" + (
        f": {inert(saga.description)}" if saga.description else ""
    )
    table = Table(
        title=title,
        title_justify="left",
        caption=f"starts on {inert(saga.start)}, correlated by {inert(saga.correlation_field)};"
        f" on completion: {inert(saga.on_completed or 'nothing published')}",
        caption_justify="left",
    )
    columns = ("#", "step", "kind", "command", "success", "failures", "compensation", "timing")
    for column in columns:
        # Names are folded, never cut: a cut name would not say which message it is.
        table.add_column(column, overflow="fold")
    for position, step in enumerate(saga.steps, 1):
        undo = ""
        if step.compensation is not None:
            undo = f"{inert(step.compensation)}\n{_arrow()} {inert(step.compensated or '?')}"
            if step.compensate_on_failure:
                undo += "\n(also when the step fails)"
        timing = []
        if step.timeout is not None:
            timing.append(f"timeout {step.timeout:g} s")
        if step.attempts != 1:
            timing.append(
                "tries until it succeeds" if not step.attempts else f"{step.attempts} tries"
            )
        if step.compensation_timeout is not None:
            timing.append(f"undo timeout {step.compensation_timeout:g} s")
        if step.compensation_attempts != 1:
            timing.append(f"undo {step.compensation_attempts} tries")
        table.add_row(
            str(position),
            inert(f"{step.group}/{step.name}" if step.group else step.name),
            inert(step.kind),
            inert(step.command) if step.command else "[dim](the start event)[/]",
            cell(step.success),
            "\n".join(inert(failure) for failure in step.failures),
            undo,
            "\n".join(timing),
        )
    return table
