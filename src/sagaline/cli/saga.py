"""``sagaline saga``: one saga instance shown, and an operator's actions on it.

``show`` prints the instance: status, version, each step's state and tries, why it failed or is
STUCK, its timers and its history. ``retry``, ``compensate``, ``skip`` and ``abort`` ask its
orchestrator to act (see :mod:`sagaline.saga.operator`); each is recorded in the saga's history
with who asked (``--by``, your login name by default), when and why (``--reason``), is refused
with the reason when the saga's state does not allow it, and is done once however often it is
asked at one state. ``abort`` ends the saga FAILED without compensating: it asks first.
"""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.table import Table

from sagaline.cli.common import (
    DEFAULT_STORE_URL,
    BusOption,
    JsonOption,
    StoreOption,
    app,
    current_app,
    with_deployment,
)
from sagaline.cli.render import (
    cell,
    emit_json,
    fail,
    history_table,
    inert,
    out,
    quoted,
    styled_status,
)
from sagaline.deploy import Deployment
from sagaline.errors import SagaNotFound
from sagaline.observability import saga_summary
from sagaline.ports import SagaRecord
from sagaline.saga.operator import Asked, find_saga, keeper_of, request_action

saga_app = typer.Typer(
    help="One saga instance: show it, or act on it (retry, compensate, skip, abort).",
    no_args_is_help=True,
)
app.add_typer(saga_app, name="saga")

SagaId = Annotated[str, typer.Argument(metavar="SAGA_ID", help="The saga's id (order:ORD-1).")]
ByOption = Annotated[
    str | None, typer.Option("--by", help="Who asks (recorded); your login name by default.")
]


def _keepers(saga_id: str) -> list[str]:
    try:
        service, _ = keeper_of(current_app().default, saga_id)
    except SagaNotFound as exc:
        fail(inert(exc), 2)
    return [service]


@saga_app.command()
def show(
    saga_id: SagaId,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show one saga: status, version, steps, why it failed or is STUCK, timers, history."""
    system = current_app().default
    keepers = _keepers(saga_id)

    async def query(deployment: Deployment) -> SagaRecord | None:
        try:
            return await find_saga(deployment, system, saga_id)
        except SagaNotFound:
            return None

    record = with_deployment(store, bus, query, services=keepers, must_exist=keepers[0])
    if record is None:
        fail(f"no saga {quoted(saga_id)}", 1)
    summary = saga_summary(record, history=True)
    if json_output:
        emit_json(summary)
        return
    out.print(
        f"saga {inert(record.saga_id)} {styled_status(record.status)}"
        f" ({inert(record.definition)} v{record.definition_version})",
        soft_wrap=True,
    )
    if summary["reason"]:
        out.print(f"failed at {cell(summary['failedStep'])}: {cell(summary['reason'])}")
    if summary["stuck"]:
        stuck = summary["stuck"]
        out.print(
            f"[bold red]STUCK[/] at {cell(stuck.get('step') or '-')}: {cell(stuck.get('reason'))}"
            + (f" (dead letter {cell(stuck['deadLetter'])})" if stuck.get("deadLetter") else "")
        )
    table = Table(title="steps", title_justify="left")
    for column in ("step", "state", "tries", "compensation tries"):
        table.add_column(column)
    for name, state in summary["steps"].items():
        table.add_row(
            inert(name), cell(state["state"]), cell(state["tries"]), cell(state["undoTries"])
        )
    out.print(table)
    if summary["timers"]:
        out.print("timers set: " + ", ".join(inert(t) for t in summary["timers"]))
    out.print(history_table(record))


def _act(
    saga_id: str, action: str, store: str, bus: str | None, by: str | None, reason: str
) -> None:
    system = current_app().default
    keepers = _keepers(saga_id)
    who = by or getpass.getuser()

    async def ask(deployment: Deployment) -> Asked:
        return await request_action(deployment, system, saga_id, action, by=who, reason=reason)

    asked = with_deployment(store, bus, ask, services=keepers, must_exist=keepers[0])
    out.print(
        f"{action} of {inert(saga_id)} asked by {inert(who)} (request {inert(asked.message_id)});"
        f" the saga was {styled_status(asked.record.status)}",
        soft_wrap=True,
    )


ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why (recorded in the saga's history).")
]


def _action_command(action: str, doc: str) -> None:
    """Register ``saga ACTION``: an action that needs no more than who and why."""

    def command(
        saga_id: SagaId,
        reason: ReasonOption,
        by: ByOption = None,
        store: StoreOption = DEFAULT_STORE_URL,
        bus: BusOption = None,
    ) -> None:
        _act(saga_id, action, store, bus, by, reason)

    command.__doc__ = doc
    saga_app.command(action)(command)


_action_command(
    "retry",
    "Send the current step's command, or the current compensation, again (a STUCK saga"
    " compensates again).",
)
_action_command("compensate", "Give up on a RUNNING saga: compensate what it completed.")
_action_command("skip", "Mark the current compensation as done by hand, and go on compensating.")


@saga_app.command()
def abort(
    saga_id: SagaId,
    reason: ReasonOption,
    by: ByOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
) -> None:
    """End the saga FAILED without compensating what it did (asks for confirmation)."""
    if not yes and not typer.confirm(
        f"End {saga_id} as FAILED without compensating what it did?", default=False
    ):
        fail("not aborted", 1)
    _act(saga_id, "abort", store, bus, by, reason)
