"""Commands that run the app's services (run, serve, up) and prepare or delete their
stores and bus (migrate, teardown)."""

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from typing import Annotated
from urllib.parse import urlsplit

import typer

from sagaline.app import APP_ENV, find_app
from sagaline.backends import BrokerTopology
from sagaline.cli.common import (
    DEFAULT_STORE_URL,
    BatchOption,
    BusOption,
    LeaseOption,
    SetOption,
    StoreOption,
    _settings,
    app,
    check_urls,
    configure_logging,
    current_app,
    log,
    with_deployment,
)
from sagaline.cli.render import fail, inert, out, quoted
from sagaline.config import ADAPTERS, redact, redact_url
from sagaline.deploy import Deployment, Supervisor, open_bus, serve_argv, url_environment
from sagaline.errors import BusUnavailable, ConfigurationError, StoreUnavailable
from sagaline.handling import DEFAULT_BATCH, Runtime, System


def _service_names(services: str | None) -> list[str]:
    known = current_app().services
    if services is None:
        return list(known)
    names: list[str] = []
    for name in (part.strip() for part in services.split(",")):
        if not name or name in names:
            continue
        if name not in known:
            fail(f"unknown service {quoted(name)}; choose from {', '.join(known)}", 2)
        names.append(name)
    if not names:
        fail(f"no service to run; choose from {', '.join(known)}", 2)
    return names


def _app_settings(pairs: Sequence[str] | None) -> dict[str, str]:
    """``--set NAME=VALUE`` options as settings, checked against those the app declares."""
    settings: dict[str, str] = {}
    declared = current_app().settings
    for pair in pairs or ():
        name, equals, value = pair.partition("=")
        name = name.strip()
        if not equals or not name:
            fail(f"--set: {quoted(pair)} is not NAME=VALUE", 2)
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            fail(f"--set: the app has no setting {quoted(name)}; it has: {inert(known)}", 2)
        settings[name] = value
    return settings


def _system(settings: Mapping[str, str]) -> System:
    """The app's system built with ``settings``; a setting it refuses is exit status 2."""
    try:
        return current_app().system(settings)
    except (ConfigurationError, ValueError) as exc:
        fail(f"--set: {inert(exc)}", 2)


def _serve_in_process(
    store: str,
    bus: str | None,
    names: list[str],
    *,
    settings: Mapping[str, str],
    batch_size: int,
    lease_seconds: float | None,
    title: str,
    instance: tuple[int, int] | None = None,
    member: str | None = None,
) -> None:
    """Run ``names`` in this process until SIGINT or SIGTERM; in-flight batches finish first."""
    system = _system(settings)
    configure_logging(logging.INFO)
    shown = redact_url(store) + (f" with bus {redact_url(bus)}" if bus else "")

    async def serve(deployment: Deployment) -> int:
        runtimes = deployment.runtimes(system, names, batch_size=batch_size, member=member)
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            log.info("%s received: finishing the batches in hand", signum.name)
            for runtime in runtimes:
                runtime.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        out.print(
            f"sagaline {title}: {', '.join(names)} on {inert(shown)} (pid {os.getpid()})",
            soft_wrap=True,
        )
        log.info("running %s on %s", ",".join(names), shown)
        reporter = asyncio.create_task(_report_progress(runtimes))
        try:
            await asyncio.gather(*(runtime.run() for runtime in runtimes))
        finally:
            reporter.cancel()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        return sum(runtime.handled for runtime in runtimes)

    handled = with_deployment(
        store,
        bus,
        serve,
        must_exist=None,
        services=names,
        lease_seconds=lease_seconds,
        wait_for_servers=True,
        instance=instance,
    )
    log.info("stopped after handling %d deliveries", handled)


@app.command()
def run(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    services: Annotated[
        str | None,
        typer.Option(
            "--services",
            metavar="NAMES",
            help="Comma-separated services to run in this process (default: all of the app's).",
        ),
    ] = None,
    set_: SetOption = None,
    batch_size: BatchOption = DEFAULT_BATCH,
    lease_seconds: LeaseOption = None,
) -> None:
    """Run services in this process until SIGINT or SIGTERM; in-flight batches finish first.

    Several processes may run on one store: they share the work of each service.
    """
    _serve_in_process(
        store,
        bus,
        _service_names(services),
        settings=_app_settings(set_),
        batch_size=batch_size,
        lease_seconds=lease_seconds,
        title="run",
    )


def _supervise(commands: dict[str, list[str]], title: str, env: Mapping[str, str]) -> None:
    """Run ``commands`` as supervised child processes, with environment ``env``, until SIGINT
    or SIGTERM."""
    configure_logging(logging.INFO)

    async def go() -> None:
        supervisor = Supervisor(commands, env=env)
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            log.info("%s received: stopping %d processes", signum.name, len(commands))
            supervisor.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        out.print(f"sagaline {title}: {len(commands)} processes (pid {os.getpid()})")
        await supervisor.run()

    asyncio.run(go())


def _parse_instance(value: str | None) -> tuple[int, int] | None:
    """``I/N`` as a pair, with a clear error naming the option."""
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        fail(f"--instance: {inert(value)!r} is not I/N with 1 <= I <= N (e.g. 2/3)", 2)
    return int(index), int(count)


def _child_options(
    settings: Mapping[str, str], batch_size: int, lease_seconds: float | None
) -> list[str]:
    extra = ["--batch-size", str(batch_size)]
    for name, value in settings.items():
        extra += ["--set", f"{name}={value}"]
    if lease_seconds is not None:
        extra += ["--lease-seconds", str(lease_seconds)]
    return extra


@app.command()
def serve(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="One of the app's services.")],
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    instances: Annotated[
        int,
        typer.Option(
            "--instances", min=1, max=64, help="Processes of this service, competing for work."
        ),
    ] = 1,
    set_: SetOption = None,
    batch_size: BatchOption = DEFAULT_BATCH,
    lease_seconds: LeaseOption = None,
    instance: Annotated[
        str | None,
        typer.Option(
            "--instance",
            metavar="I/N",
            help="This process is instance I of N of the service (set by --instances): on"
            " RabbitMQ each instance takes its share of the partitions first.",
        ),
    ] = None,
    member: Annotated[
        str | None,
        typer.Option(
            "--member",
            metavar="NAME",
            help="The name this process holds leases under (default: its pid and a random"
            " suffix). `up` and --instances name each process they start; one restarted after a"
            " crash takes its name, so it resumes its predecessor's leases at once. Two live"
            " processes must never share a name.",
        ),
    ] = None,
) -> None:
    """Run one service; with --instances N, N supervised processes of it share its work."""
    names = _service_names(service)
    if len(names) != 1:
        fail("serve runs one service; use `sagaline up` for all of them", 2)
    check_urls(store, bus)
    settings = _app_settings(set_)
    _system(settings)
    if instances == 1:
        _serve_in_process(
            store,
            bus,
            names,
            settings=settings,
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            title="serve",
            instance=_parse_instance(instance),
            member=member,
        )
        return
    extra = _child_options(settings, batch_size, lease_seconds)
    _supervise(
        {
            f"{names[0]}-{n}": serve_argv(
                names[0], extra, (n, instances), _member(f"{names[0]}-{n}")
            )
            for n in range(1, instances + 1)
        },
        f"serve {names[0]}",
        _child_environment(store, bus),
    )


@app.command()
def up(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
    instances: Annotated[
        int, typer.Option("--instances", min=1, max=64, help="Processes per service.")
    ] = 1,
    set_: SetOption = None,
    batch_size: BatchOption = DEFAULT_BATCH,
    lease_seconds: LeaseOption = None,
) -> None:
    """Run every service of the app as its own process; a crashed one is restarted; Ctrl-C
    stops all."""
    check_urls(store, bus)
    settings = _app_settings(set_)
    _system(settings)
    # Create every schema once, before the processes race to do it (waiting for the servers).
    with_deployment(store, bus, _prepare, must_exist=None, wait_for_servers=True)
    extra = _child_options(settings, batch_size, lease_seconds)
    _supervise(
        {
            f"{service}-{n}": serve_argv(service, extra, (n, instances), _member(f"{service}-{n}"))
            for service in current_app().services
            for n in range(1, instances + 1)
        },
        "up",
        _child_environment(store, bus),
    )


def _child_environment(store: str, bus: str | None) -> dict[str, str]:
    """The environment of a supervised process: the URLs, and the app it runs."""
    env = url_environment(store, bus)
    env[APP_ENV] = _settings.app_spec or find_app()
    return env


def _member(slot: str) -> str:
    """The lease name of a supervised process: this host and supervisor, and its slot (the same
    for the process that replaces it after a crash, and for no other live process)."""
    return f"{socket.gethostname()}-{os.getpid()}-{slot}"


async def _prepare(deployment: Deployment) -> None:
    """Create the stores' schemas and the bus's topology for the whole system."""
    if deployment.bus is not None:
        system = current_app().default
        consumers = [spec for svc in system.services.values() for spec in svc.consumers()]
        await deployment.bus.prepare(consumers, system.routes)


@app.command()
def migrate(
    store: StoreOption = DEFAULT_STORE_URL,
    bus: BusOption = None,
) -> None:
    """Create or upgrade every service's store schema and the bus's queues and streams.

    A SQLite database that is not a sagaline store yet is adopted: sagaline's tables are added
    to it (other commands refuse such a file).
    """
    with_deployment(store, bus, _prepare, must_exist=None, adopt=True)
    out.print(
        f"migrated the stores of {', '.join(current_app().services)} on"
        f" {inert(redact_url(store))}" + (f" and the bus {inert(redact_url(bus))}" if bus else ""),
        soft_wrap=True,
    )


@app.command()
def teardown(
    bus: BusOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Delete without asking for confirmation.")
    ] = False,
) -> None:
    """Delete a broker bus's queues, exchanges and streams (under its prefix), with their messages.

    For RabbitMQ (amqp://) and NATS (nats://); `migrate` or the services create them again.
    """
    if bus is None:
        fail("--bus URL: the broker whose topology to delete (amqp:// or nats://)", 2)
    shown = inert(redact_url(bus))
    brokers = dict.fromkeys(adapter for adapter in ADAPTERS.values() if adapter.broker)
    if urlsplit(bus).scheme.lower() not in [s for broker in brokers for s in broker.schemes]:
        listed = " or ".join(f"{broker.schemes[0]}://" for broker in brokers)
        fail(f"--bus {shown}: teardown deletes a broker's topology ({listed})", 2)
    if not yes and not typer.confirm(
        f"Delete the queues, exchanges and streams of {redact_url(bus)}, with their messages?"
    ):
        fail("nothing deleted", 1)

    async def delete() -> None:
        opened = open_bus(bus, connect_timeout=_settings.connect_timeout)
        assert isinstance(opened, BrokerTopology)
        system = current_app().default
        consumers = [spec for svc in system.services.values() for spec in svc.consumers()]
        try:
            await opened.open()
            await opened.delete_topology(consumers)
        finally:
            await opened.close()

    try:
        asyncio.run(delete())
    except (StoreUnavailable, BusUnavailable) as exc:
        fail(inert(redact(str(exc), bus)), 1)
    except Exception as exc:
        fail(f"cannot delete the topology of {shown}: {inert(redact(str(exc), bus))}", 1)
    out.print(f"deleted the queues, exchanges and streams of {shown}", soft_wrap=True)


async def _report_progress(runtimes: Sequence[Runtime], every: float = 10.0) -> None:
    """Log, while there is work, how much was handled."""
    reported = 0
    while not all(runtime.stop_event.is_set() for runtime in runtimes):
        await asyncio.sleep(every)
        handled = sum(runtime.handled for runtime in runtimes)
        if handled != reported:
            reported = handled
            log.info("handled %d deliveries so far", reported)
