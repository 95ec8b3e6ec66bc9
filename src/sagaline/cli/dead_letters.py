"""``sagaline dead-letters``: the messages that could not be processed, and an operator's work
on them.

Without a subcommand it lists them (from every service's store). ``replay`` handles one again now
through its consumer's handler (or every one of a consumer, with ``--consumer``), ``discard``
removes one for good; each is recorded (who, why, what came of it) in the audit trail of the
message's transaction (see :mod:`sagaline.handling.redrive`).
"""

from __future__ import annotations

import getpass
from typing import Annotated, Any

import typer

from sagaline.cli.common import (
    DEFAULT_STORE_URL,
    BusOption,
    JsonOption,
    StoreOption,
    app,
    current_app,
    with_deployment,
)
from sagaline.cli.render import dead_letter_table, emit_json, fail, inert, out, quoted
from sagaline.deploy import Deployment
from sagaline.handling.redrive import Redriven, discard, replay
from sagaline.observability import dead_letter_summary

dead_letters_app = typer.Typer(
    help="Messages that could not be processed: list them, replay or discard one.",
    invoke_without_command=True,
)
app.add_typer(dead_letters_app, name="dead-letters")

ByOption = Annotated[
    str | None, typer.Option("--by", help="Who asks (recorded); your login name by default.")
]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit trail).")]
ConsumerOption = Annotated[
    str | None,
    typer.Option("--consumer", help="The consumer (service) whose dead letters these are."),
]


@dead_letters_app.callback()
def dead_letters(
    ctx: typer.Context,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """Messages that could not be processed, with the reason (from every service's store)."""
    if ctx.invoked_subcommand is not None:
        return

    async def query(deployment: Deployment) -> list[dict[str, Any]]:
        letters = [
            letter
            for queries in deployment.audit_sources()
            for letter in await queries.dead_letters()
        ]
        letters.sort(key=lambda letter: letter.failed_at)
        return [dead_letter_summary(letter) for letter in letters]

    rows = with_deployment(store, bus, query, read_only=True)
    if json_output:
        emit_json(rows)
    elif rows:
        out.print(dead_letter_table(rows))
    else:
        out.print("no dead letters")


def _redrive(
    action: str,
    letter_id: int | None,
    consumer: str | None,
    store: str,
    bus: str | None,
    by: str | None,
    reason: str,
) -> list[Redriven]:
    system = current_app().default
    if consumer is not None and consumer not in system.services:
        fail(f"--consumer: {quoted(consumer)} is not a service of the app", 2)
    if letter_id is None and (consumer is None or action != "replay"):
        fail("name a dead letter by its id (replay also takes --consumer alone: all of its)", 2)
    who = by or getpass.getuser()

    async def work(deployment: Deployment) -> list[Redriven] | str:
        # The dead letters wanted, each with the service whose store holds it (an id is its
        # store's own: two stores may each have a dead letter 1).
        targets: list[tuple[str, int]] = []
        for service in [consumer] if consumer else list(deployment.services):
            for letter in await deployment.queries(service).dead_letters():
                if letter.consumer == service and letter_id in (None, letter.id):
                    targets.append((service, letter.id))
        targets = list(dict.fromkeys(targets))
        stores = {id(deployment.store(service)) for service, _ in targets}
        if letter_id is not None and len(stores) > 1:
            return f"dead letter {letter_id} is in several stores: name its --consumer"
        if not targets:
            return f"no dead letter {letter_id}" if letter_id is not None else "no dead letters"
        done = []
        for service, number in targets:
            db = deployment.store(service)
            if action == "replay":
                done.append(
                    await replay(db, system, number, by=who, reason=reason, bus=deployment.bus)
                )
            else:
                done.append(await discard(db, system, number, by=who, reason=reason))
        return done

    result = with_deployment(store, bus, work, services=[consumer] if consumer else None)
    if isinstance(result, str):
        fail(inert(result), 1)
    return result


@dead_letters_app.command("replay")
def replay_command(
    reason: ReasonOption,
    letter_id: Annotated[
        int | None, typer.Argument(metavar="[ID]", help="The dead letter's id (see the list).")
    ] = None,
    consumer: ConsumerOption = None,
    by: ByOption = None,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
) -> None:
    """Handle a dead letter again now, through its consumer's handler (or every dead letter
    of ``--consumer``); one that fails again is dead-lettered anew."""
    for done in _redrive("replay", letter_id, consumer, store, bus, by, reason):
        letter = done.letter
        line = (
            f"{inert(letter.envelope.message_type)} {inert(letter.envelope.message_id)}"
            f" (dead letter {letter.id} of {inert(letter.consumer)}): {done.outcome}"
        )
        out.print(line + (f": {inert(done.reason)}" if done.reason else ""), soft_wrap=True)


@dead_letters_app.command("discard")
def discard_command(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="The dead letter's id.")],
    reason: ReasonOption,
    consumer: ConsumerOption = None,
    by: ByOption = None,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
) -> None:
    """Remove a dead letter for good (recorded, with who and why)."""
    for done in _redrive("discard", letter_id, consumer, store, bus, by, reason):
        out.print(
            f"dead letter {done.letter.id} ({inert(done.letter.envelope.message_type)}"
            f" {inert(done.letter.envelope.message_id)}) discarded",
            soft_wrap=True,
        )
