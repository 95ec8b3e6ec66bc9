"""Commands that submit commands and look at what happened: submit, trace, sagas,
dead-letters, schema, rebuild, describe."""

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sagaline.cli.common import (
    DEFAULT_STORE_URL,
    BusOption,
    JsonOption,
    StoreOption,
    app,
    check_urls,
    current_app,
    with_deployment,
)
from sagaline.cli.render import (
    cell,
    dead_letter_table,
    describe_invalid,
    emit_json,
    err,
    fail,
    history_table,
    inert,
    out,
    print_trace,
    quoted,
    saga_table,
    styled_status,
)
from sagaline.deploy import Deployment
from sagaline.documents import (
    DEFAULT_SUBMIT_BATCH,
    DocumentProblem,
    check_submittable,
    parse_documents,
    read_input,
    submit_in_batches,
)
from sagaline.errors import (
    ConfigurationError,
    InvalidMessage,
    SagaDefinitionError,
    UnknownMessageType,
)
from sagaline.messages import Envelope, check_message_id, json_schema
from sagaline.observability import TransactionTrace, dead_letter_summary, load_trace, saga_summary
from sagaline.projection import rebuild as rebuild_projection
from sagaline.saga.definition import SagaStatus
from sagaline.saga.describe import describe as describe_saga
from sagaline.saga.describe import sagas_of
from sagaline.saga.engine import saga_id


@app.command()
def submit(
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="Commands in the seed's JSON: one document, a JSON array of them, or JSON Lines"
            " (one per line); - reads stdin.",
        ),
    ],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    message_id: Annotated[
        str | None,
        typer.Option(
            "--message-id",
            metavar="ID",
            help="Your own id for the message (up to 128 of A-Z a-z 0-9 . _ : -), so that"
            " submitting again after a failure is the same message, accepted once; another"
            " message under a used id is refused. For one document only.",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print no message ids (a summary only).")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar on stderr (default: when stderr is a terminal).",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Put commands a client may submit onto the bus; prints their message ids, one per line.

    Every command is checked before any is written: one that is invalid, internal to the
    system, or an event fails the whole input (exit 2, naming its line or index and the field).
    Then they are submitted in batches of 1,000.
    """
    _submit_documents(file, store, bus, message_id, quiet, progress, json_output)


def _submit_documents(
    file: str,
    store: str,
    bus: str | None,
    message_id: str | None,
    quiet: bool,
    progress: bool | None,
    json_output: bool,
) -> None:
    check_urls(store, bus)
    try:
        data = read_input(file)
    except OSError as exc:
        fail(f"cannot read {inert(file)}: {inert(exc.strerror or exc)}", 2)
    except InvalidMessage as exc:
        fail(inert(exc), 2)
    system = current_app().default
    # Validate everything before the store is even opened: a bad input leaves no trace.
    try:
        commands = check_submittable(system, parse_documents(data, types=system.registry))
        if message_id is not None:
            check_message_id(message_id)
    except DocumentProblem as exc:
        where = f"{inert(exc.position)}: " if exc.position else ""
        if isinstance(exc.error, InvalidMessage):
            fail(where + describe_invalid(exc.error), 2)
        fail(f"{where}refused: {inert(exc.error)}", 2)
    except InvalidMessage as exc:
        fail(describe_invalid(exc), 2)
    single = len(commands) == 1
    if message_id is not None and not single:
        fail(
            f"--message-id names one message, and {inert(file)} holds {len(commands)}:"
            " submit them without it",
            2,
        )
    show_progress = not single and (progress if progress is not None else err.is_terminal)
    submitted: list[Envelope] = []

    async def send(deployment: Deployment) -> None:
        # A broker refuses a command no queue is bound for yet: declare them first.
        await deployment.prepare_bus(system)
        with Progress(
            TextColumn("submitting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("commands"),
            TimeElapsedColumn(),
            console=err,
            disable=not show_progress,
        ) as bar:
            task = bar.add_task("submit", total=len(commands))

            def done(envelopes: list[Envelope]) -> None:
                submitted.extend(envelopes)
                bar.advance(task, len(envelopes))
                if not (single or quiet or json_output):
                    sys.stdout.write("".join(f"{e.message_id}\n" for e in envelopes))
                    sys.stdout.flush()

            await submit_in_batches(
                system,
                deployment.entry,
                commands,
                batch_size=DEFAULT_SUBMIT_BATCH,
                message_ids=[message_id] if message_id is not None else None,
                on_batch=done,
            )

    # A separate bus needs no store: only the bus is opened. A bus URL equal to the store's is
    # the store's own database (as without one): then the stores hold the bus.
    separate = bus is not None and bus != store
    try:
        with_deployment(store, bus, send, must_exist=None, services=() if separate else None)
    finally:
        if submitted and not single and len(submitted) < len(commands):
            err.print(
                f"[bold red]only {len(submitted)} of {len(commands)} commands were submitted[/]"
                " (their ids are printed); the others were not",
                soft_wrap=True,
            )
    summaries = [
        {"messageId": e.message_id, "type": e.message_type, "correlationId": e.correlation_id}
        for e in submitted
    ]
    if json_output:
        emit_json(summaries[0] if single else summaries)
    elif single and not quiet:
        out.print(submitted[0].message_id)
    if not single:
        err.print(f"submitted {len(submitted)} commands", soft_wrap=True)


@app.command()
def trace(
    key: Annotated[
        str, typer.Argument(metavar="ID", help="The business key: a transaction's correlation id.")
    ],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """The audit trail of one transaction: every command and event as a causal tree, its saga."""
    keepers = current_app().default.saga_services()

    async def query(deployment: Deployment) -> TransactionTrace:
        return await load_transaction(deployment, key, keepers)

    found = with_deployment(store, bus, query, read_only=True)
    if not found.found:
        fail(f"nothing is known about {quoted(key)}", 1)
    if json_output:
        emit_json(found.to_json())
        return
    print_trace(found)
    if found.saga is not None:
        out.print(history_table(found.saga))
    if found.dead_letters:
        out.print(dead_letter_table([dead_letter_summary(d) for d in found.dead_letters]))


async def load_transaction(
    deployment: Deployment, key: str, keepers: Sequence[str] | None = None
) -> TransactionTrace:
    """The audit trail of ``key`` with its saga: the first instance found of one of the app's
    sagas, in the store of a service that keeps saga instances."""
    app = current_app()
    sources = deployment.audit_sources()
    keepers = app.default.saga_services() if keepers is None else keepers
    found: TransactionTrace | None = None
    for definition in app.sagas.values():
        for keeper in keepers:
            found = await load_trace(
                sources, key, saga_id(definition, key), saga_store=deployment.queries(keeper)
            )
            if found.saga is not None:
                return found
    return found if found is not None else await load_trace(sources, key)


@app.command()
def schema(
    type_name: Annotated[
        str | None, typer.Argument(metavar="TYPE", help="A message type; all when left out.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """The JSON Schema of a message type, or of every type keyed by name (always JSON)."""
    registry = current_app().registry
    if type_name is None:
        emit_json({name: json_schema(registry.get(name)) for name in registry.names()})
        return
    try:
        cls = registry.get(type_name)
    except UnknownMessageType:
        fail(f"unknown message type {quoted(type_name)}; known: {', '.join(registry.names())}", 2)
    emit_json(json_schema(cls))


@app.command()
def describe(
    name: Annotated[
        str | None, typer.Argument(metavar="SAGA", help="A saga's name; every saga when left out.")
    ] = None,
    mermaid: Annotated[
        bool, typer.Option("--mermaid", help="Print only the saga's Mermaid diagram.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Validate and show the system's sagas: steps, kinds, commands, compensations, diagram.

    Exits with 1 when a saga sends a command no service handles, 2 when one is not valid.
    """
    try:
        system = current_app().default
    except SagaDefinitionError as exc:
        fail(f"invalid saga definition: {inert(exc)}", 2)
    definitions = {definition.name: definition for definition in sagas_of(system)}
    known = ", ".join(definitions) or "none"
    if name is not None and name not in definitions:
        fail(f"unknown saga {quoted(name)}; known: {inert(known)}", 2)
    wanted = [definitions[name]] if name is not None else list(definitions.values())
    if mermaid and len(wanted) != 1:
        fail(f"--mermaid draws one saga: name it (known: {inert(known)})", 2)
    described = [describe_saga(definition, system) for definition in wanted]
    if mermaid:
        sys.stdout.write(described[0].mermaid + "\n")
    elif json_output:
        emit_json(described[0].to_json() if name is not None else [d.to_json() for d in described])
    else:
        for saga in described:
            out.print(saga_table(saga))
            if name is not None:
                out.print(f"[bold]Mermaid[/] (sagaline describe {inert(saga.name)} --mermaid):")
                for line in saga.mermaid.splitlines():
                    out.print(inert(line), soft_wrap=True)
        if not described:
            out.print("the system has no sagas")
    problems = [problem for saga in described for problem in saga.problems]
    for problem in problems:
        err.print(f"[bold red]problem:[/] {inert(problem)}", soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@app.command()
def sagas(
    status: Annotated[
        SagaStatus | None,
        typer.Option("--status", case_sensitive=False, help="Only sagas in this status."),
    ] = None,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    json_output: JsonOption = False,
) -> None:
    """Saga instances with their definition version and status, and how many are in each
    status."""
    wanted = status.value if status is not None else None

    keepers = current_app().default.saga_services()
    if not keepers:
        fail("the app keeps no sagas", 1)

    async def query(deployment: Deployment) -> tuple[list[dict[str, Any]], dict[str, int]]:
        rows: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        for db in {id(q): q for q in (deployment.queries(k) for k in keepers)}.values():
            rows += [saga_summary(record) for record in await db.list_sagas(wanted)]
            for name, count in (await db.saga_counts()).items():
                counts[name] = counts.get(name, 0) + count
        return rows, counts

    rows, counts = with_deployment(
        store, bus, query, must_exist=keepers[0], services=keepers, read_only=True
    )
    if json_output:
        emit_json({"counts": counts, "sagas": rows})
        return
    table = Table(title="Sagas", title_justify="left")
    table.add_column("sagaId", no_wrap=True)
    table.add_column("saga", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("failedStep")
    table.add_column("reason", min_width=20, ratio=1)
    table.add_column("updatedAt")
    for row in rows:
        table.add_row(
            cell(row["sagaId"]),
            cell(f"{row['definition']} v{row['definitionVersion']}"),
            styled_status(row["status"]),
            cell(row["step"]),
            cell(row["failedStep"]),
            cell(row["reason"]),
            cell(row["updatedAt"]),
        )
    if rows:
        out.print(table)
    summary = ", ".join(f"{inert(name)} {count}" for name, count in sorted(counts.items()))
    out.print(f"sagas: {summary or 'none'}", soft_wrap=True)


@app.command()
def rebuild(
    name: Annotated[
        str | None,
        typer.Argument(metavar="PROJECTION", help="Which read model (default: the app's first)."),
    ] = None,
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
) -> None:
    """Rebuild a read model from the event log; queries go on meanwhile."""
    app_ = current_app()
    if not app_.projections:
        fail("the app has no projection to rebuild", 1)
    try:
        projection = app_.projection(name) if name is not None else app_.projections[0]
    except ConfigurationError as exc:
        fail(inert(exc), 2)
    service = projection.name

    async def go(deployment: Deployment) -> tuple[str, int, int]:
        db = deployment.store(service)
        queries = deployment.queries(service)
        with Progress(
            TextColumn(f"rebuilding {inert(projection.namespace)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("events"),
            TimeElapsedColumn(),
            console=err,
        ) as progress:
            head = await queries.head_position() if deployment.bus is None else None
            task = progress.add_task("rebuild", total=head)

            def advance(position: int, head: int) -> None:
                progress.update(task, completed=position, total=head)

            namespace = await rebuild_projection(
                db, projection, bus=deployment.bus, progress=advance
            )
            progress.update(task, completed=progress.tasks[0].completed)
        count = len(await queries.query_documents(namespace))
        return namespace, count, int(progress.tasks[0].completed)

    namespace, count, position = with_deployment(store, bus, go, services=[service])
    out.print(
        f"rebuilt {inert(namespace)}: {count} rows from the event log up to position {position}",
        soft_wrap=True,
    )
