"""Wiring a system to its stores and its bus by URL, and running services as processes.

Database per service: each service owns its store. A store URL may name the service with the
placeholder ``{service}`` (``sqlite:///./data/{service}.db``: one file per service); a PostgreSQL
URL gives each service its own schema (``sagaline_order``, ...) in that database. A bus URL names
where messages travel:

* no bus URL, or the store's own database: the bus lives beside the stores and outgoing messages
  and acknowledgements join each unit of work (SQLite file, PostgreSQL schema ``sagaline_bus``);
* any other bus (``amqp://`` RabbitMQ, ``nats://`` NATS JetStream, or another SQLite file or
  PostgreSQL database): stores are opened in outbox mode and a relay publishes what they emit.

Which adapter opens a URL is looked up in the scheme registry (:mod:`sagaline.config`), so a
new adapter needs no change here.

Starting afresh: :meth:`Deployment.connect` with ``replace=MARK`` (what ``sagaline demo`` does)
deletes the data an earlier deployment marked ``MARK`` left at the same URLs (SQLite files,
PostgreSQL schemas; see :meth:`Deployment.reset`), then marks its own, and refuses
(:class:`~sagaline.errors.NotResettable`) data that does not carry the mark.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaline.backends import open_bus
from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.config import BUS_URL_ENV, STORE_URL_ENV, adapter_for, redact_url, scheme_of
from sagaline.errors import ConfigurationError, NotResettable
from sagaline.handling import DEFAULT_BATCH, Runtime, System
from sagaline.ports import BrokerBus, Database, StoreQueries

__all__ = [
    "SERVICE_PLACEHOLDER",
    "Deployment",
    "Supervisor",
    "connect",
    "open_bus",
    "scheme_of",
    "service_url",
    "url_environment",
]

log = logging.getLogger("sagaline.deploy")

#: Replaced by the service's name in a store URL.
SERVICE_PLACEHOLDER = "{service}"


def service_url(url: str, service: str) -> str:
    """``url`` with the service placeholder filled in."""
    return url.replace(SERVICE_PLACEHOLDER, service)


@dataclass
class Deployment:
    """The stores of a set of services and the bus between them, opened from URLs.

    ``connect_timeout`` (seconds) bounds how long :meth:`open` waits for each database and
    broker before it raises :class:`~sagaline.errors.StoreUnavailable` or
    :class:`~sagaline.errors.BusUnavailable`; None leaves the drivers' own limits (a NATS bus
    then waits until its server answers).

    ``clock`` reaches every store and the bus it opens (what their leases and retry due times
    are read from) and the runtimes of :meth:`runtimes` (what their workers back off on): one
    :class:`~sagaline.clock.FakeClock` given here moves the whole deployment's time.
    """

    store_url: str
    bus_url: str | None = None
    services: Sequence[str] = ()
    store_options: Mapping[str, Any] = field(default_factory=dict)
    bus_options: Mapping[str, Any] = field(default_factory=dict)
    connect_timeout: float | None = None
    clock: Clock = SYSTEM_CLOCK
    stores: dict[str, Database] = field(default_factory=dict, init=False)
    bus: BrokerBus | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        adapter = adapter_for(self.store_url, "store")
        self.bus_url = _bus_between(self.store_url, self.bus_url)
        colocated = self.bus_url is None
        # The system clock is every factory's default: an adapter's factory written before the
        # ``clock`` option is called as it always was, unless a clock of another kind is given.
        timing: dict[str, Any] = {} if self.clock is SYSTEM_CLOCK else {"clock": self.clock}
        # One store object per distinct database: services sharing a SQLite file share it,
        # while an adapter that gives each service its own schema opens one per service.
        opened: dict[str, Database] = {}
        for service in self.services:
            url = service_url(self.store_url, service)
            key = f"{url}#{service}" if adapter.store_per_service else url
            store = opened.get(key)
            if store is None:
                store = opened[key] = adapter.factory("store", url)(
                    url,
                    service=service,
                    outbox=not colocated,
                    colocated_bus=colocated,
                    connect_timeout=self.connect_timeout,
                    **timing,
                    **self.store_options,
                )
            self.stores[service] = store
        if self.bus_url is not None:
            self.bus = open_bus(
                self.bus_url, connect_timeout=self.connect_timeout, **timing, **self.bus_options
            )

    def __repr__(self) -> str:
        bus = redact_url(self.bus_url) if self.bus_url is not None else None
        return (
            f"Deployment({redact_url(self.store_url)!r}, {bus!r}, services={list(self.services)})"
        )

    @classmethod
    def of(
        cls, store: Database, services: Sequence[str], *, clock: Clock = SYSTEM_CLOCK
    ) -> Deployment:
        """A deployment of ``services`` all on one already opened store that is also the bus
        (``clock``: the one the store was opened with, for the runtimes)."""
        deployment = cls.__new__(cls)
        deployment.store_url = store.url
        deployment.bus_url = None
        deployment.services = list(services)
        deployment.store_options = {}
        deployment.bus_options = {}
        deployment.connect_timeout = None
        deployment.clock = clock
        deployment.stores = dict.fromkeys(services, store)
        deployment.bus = None
        return deployment

    @classmethod
    async def connect(
        cls,
        store_url: str,
        bus_url: str | None = None,
        *,
        services: Sequence[str],
        connect_timeout: float | None = None,
        replace: str | None = None,
    ) -> Deployment:
        """The stores of ``services`` and the bus between them, opened (see :meth:`open`).

        ``replace=MARK`` starts from nothing, for a demo or a scratch run: what an earlier
        deployment marked ``MARK`` left at these URLs is deleted first (:meth:`reset`, which
        refuses data without the mark), and the new stores and database bus are marked ``MARK``
        (:meth:`mark`), so that the next such call replaces them in turn.
        """
        if replace is not None:
            await cls.reset(
                store_url,
                bus_url,
                services=services,
                mark=replace,
                connect_timeout=connect_timeout,
            )
        deployment = cls(store_url, bus_url, services, connect_timeout=connect_timeout)
        try:
            await deployment.open()
            if replace is not None:
                await deployment.mark(replace)
        except BaseException:
            await deployment.close()
            raise
        return deployment

    @classmethod
    async def reset(
        cls,
        store_url: str,
        bus_url: str | None = None,
        *,
        services: Sequence[str],
        mark: str,
        connect_timeout: float | None = None,
    ) -> None:
        """Delete the data of the deployment of ``services`` at these URLs, to start afresh:
        its SQLite files, its PostgreSQL schemas, a database bus's too.

        Each store and a database bus may go only if it carries the metadata mark ``mark`` (see
        :meth:`mark`), holds no data yet, or does not exist; otherwise
        :class:`~sagaline.errors.NotResettable` is raised before anything is deleted. A
        message broker (RabbitMQ, NATS) is left as it is: it has no mark to tell a scratch
        run's queues from another system's.
        """
        bus_url = _bus_between(store_url, bus_url)
        store = adapter_for(store_url, "store")
        targets: dict[str, _Data] = {}
        for service in services:
            url = service_url(store_url, service)
            key = url
            where = redact_url(url)
            if store.store_per_service:
                key, where = f"{url}#{service}", f"{where} (service {service})"
            if key not in targets:
                targets[key] = _Data(store.resetter(url), url, where, service, bus_url is None)
        if bus_url is not None:
            bus = adapter_for(bus_url, "bus")
            if not bus.broker and bus_url not in targets:
                targets[bus_url] = _Data(bus.resetter(bus_url), bus_url, redact_url(bus_url))
        # Every one is asked first: a refusal deletes nothing.
        for delete in (False, True):
            for data in targets.values():
                resettable = await data.reset(
                    data.url,
                    service=data.service,
                    colocated_bus=data.colocated_bus,
                    mark=mark,
                    delete=delete,
                    connect_timeout=connect_timeout,
                )
                if not resettable:
                    raise NotResettable(
                        f"{data.where} holds data not marked {mark!r} as resettable; it was"
                        " left as it was",
                        data.where,
                    )

    async def mark(self, key: str) -> None:
        """Mark the data of every store, and of a database bus, as resettable under ``key``
        (metadata ``key`` = ``"1"``): :meth:`reset` with that mark may delete it."""
        for store in self.distinct_stores():
            await store.set_meta(key, "1")
        database = self.bus.database() if self.bus is not None else None
        if database is not None:
            await database.set_meta(key, "1")

    @property
    def colocated(self) -> bool:
        """Whether the bus lives in the stores' database (no relay, acks in the unit of work)."""
        return self.bus is None

    def distinct_stores(self) -> list[Database]:
        """Each store once (services on one SQLite file share one)."""
        seen: dict[int, Database] = {}
        for store in self.stores.values():
            seen.setdefault(id(store), store)
        return list(seen.values())

    def store(self, service: str) -> Database:
        """The store ``service`` owns."""
        try:
            return self.stores[service]
        except KeyError:
            raise ConfigurationError(f"no store opened for service {service!r}") from None

    def queries(self, service: str) -> StoreQueries:
        """The query tools of the store ``service`` owns."""
        return self.store(service)

    def audit_sources(self) -> list[StoreQueries]:
        """The query tools of every distinct store, and of a bus that is a database (it also
        holds the commands that clients submitted, where an audit trail starts)."""
        sources: list[StoreQueries] = list(self.distinct_stores())
        database = self.bus.database() if self.bus is not None else None
        if database is not None:
            sources.append(database)
        return sources

    @property
    def entry(self) -> Database | BrokerBus:
        """Where messages from outside are submitted: the bus."""
        if self.bus is not None:
            return self.bus
        return self.distinct_stores()[0]

    async def open(self) -> None:
        """Connect every store and the bus (creating their schemas)."""
        for store in self.distinct_stores():
            await store.open()
        if self.bus is not None:
            await self.bus.open()

    async def prepare_bus(self, system: System) -> None:
        """Declare on a separate bus what ``system`` needs (queues, streams, bindings), as
        ``sagaline migrate`` does; idempotent. A broker refuses a command no queue is bound for
        yet, so a client must do this before it submits to a bus no service has prepared."""
        if self.bus is not None:
            consumers = [spec for svc in system.services.values() for spec in svc.consumers()]
            await self.bus.prepare(consumers, system.routes)

    async def close(self) -> None:
        """Close the bus and every store."""
        if self.bus is not None:
            await self.bus.close()
        for store in self.distinct_stores():
            await store.close()

    def runtimes(
        self,
        system: System,
        services: Iterable[str] | None = None,
        *,
        member: str | None = None,
        batch_size: int = DEFAULT_BATCH,
        poll_interval: float = 0.1,
    ) -> list[Runtime]:
        """One runtime per distinct store, running the named services (default: all opened)."""
        names = list(services) if services is not None else list(self.services)
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(id(self.store(name)), []).append(name)
        return [
            Runtime(
                self.store(group[0]),
                system,
                group,
                bus=self.bus,
                member=member,
                batch_size=batch_size,
                poll_interval=poll_interval,
                clock=self.clock,
            )
            for group in groups.values()
        ]


async def connect(
    store_url: str,
    bus_url: str | None = None,
    *,
    services: Sequence[str],
    connect_timeout: float | None = None,
    replace: str | None = None,
) -> Deployment:
    """The stores of ``services`` and the bus between them, opened: see
    :meth:`Deployment.connect` (``replace=MARK`` starts from nothing)."""
    return await Deployment.connect(
        store_url,
        bus_url,
        services=services,
        connect_timeout=connect_timeout,
        replace=replace,
    )


@dataclass(frozen=True)
class _Data:
    """One database of a deployment to reset: its adapter's ``reset`` and how to call it."""

    reset: Callable[..., Awaitable[bool]]
    url: str
    where: str
    #: None: a database used as the bus of stores elsewhere.
    service: str | None = None
    colocated_bus: bool = False


def _bus_between(store_url: str, bus_url: str | None) -> str | None:
    """The bus URL, None when the bus lives in the stores' database; a store URL with the
    service placeholder needs a bus of its own."""
    if bus_url is not None and bus_url == store_url:
        bus_url = None
    if bus_url is None and SERVICE_PLACEHOLDER in store_url:
        raise ConfigurationError(
            "a store URL with {service} gives each service its own file: pass --bus URL"
            " for the bus between them"
        )
    return bus_url


async def run_runtimes(runtimes: Sequence[Runtime]) -> None:
    """Run several runtimes until each is stopped."""
    await asyncio.gather(*(runtime.run() for runtime in runtimes))


@dataclass
class _Child:
    name: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0


class Supervisor:
    """Runs commands as child processes, restarts any that dies, stops them all on request.

    A child that exits while the supervisor is not stopping is restarted after a backoff that
    grows with its recent crashes. :meth:`stop` sends SIGTERM to every child (they finish their
    batches), then SIGKILL to those still alive after ``grace`` seconds.
    """

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        grace: float = 15.0,
        max_backoff: float = 10.0,
    ) -> None:
        self.children = [_Child(name, list(argv)) for name, argv in commands.items()]
        self.env = dict(os.environ if env is None else env)
        self.grace = grace
        self.max_backoff = max_backoff
        self.stopping = asyncio.Event()

    async def _start(self, child: _Child) -> None:
        child.process = await asyncio.create_subprocess_exec(*child.argv, env=self.env)
        log.info("started %s (pid %d)", child.name, child.process.pid)

    async def _watch(self, child: _Child) -> None:
        while True:
            await self._start(child)
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping.is_set():
                return
            child.restarts += 1
            delay = min(self.max_backoff, 0.25 * 2 ** min(child.restarts, 8))
            log.warning("%s exited with %s; restarting in %.2fs", child.name, code, delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                continue

    def pids(self) -> dict[str, int]:
        """The running children's process ids."""
        return {
            child.name: child.process.pid
            for child in self.children
            if child.process is not None and child.process.returncode is None
        }

    async def run(self) -> None:
        """Start every child and keep them running until :meth:`stop`."""
        watchers = [asyncio.create_task(self._watch(child)) for child in self.children]
        await self.stopping.wait()
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        waits = [
            child.process.wait()
            for child in self.children
            if child.process is not None and child.process.returncode is None
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.grace)
        except TimeoutError:
            for child in self.children:
                if child.process is not None and child.process.returncode is None:
                    log.warning("%s did not stop in %.0fs: killing it", child.name, self.grace)
                    child.process.kill()
                    await child.process.wait()
        for watcher in watchers:
            watcher.cancel()

    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after the grace period)."""
        self.stopping.set()


def serve_argv(
    service: str,
    extra: Sequence[str] = (),
    instance: tuple[int, int] | None = None,
    member: str | None = None,
) -> list[str]:
    """The command line of one ``sagaline serve`` process for ``service``.

    It names no URL: those may hold passwords, and any user of the machine can read a process's
    command line. The process reads them from its environment (:func:`url_environment`).
    ``instance=(i, n)``: the process is instance i of n of the service (``--instance i/n``);
    ``member``: the name it holds leases under (``--member``).
    """
    argv = [sys.executable, "-m", "sagaline", "serve", service]
    if instance is not None and instance[1] > 1:
        argv += ["--instance", f"{instance[0]}/{instance[1]}"]
    if member is not None:
        argv += ["--member", member]
    return [*argv, *extra]


def url_environment(
    store_url: str, bus_url: str | None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``base`` (default: this process's environment) with the store and bus URLs set, for the
    child processes of :func:`serve_argv` (only their owner can read their environment)."""
    env = dict(os.environ if base is None else base)
    env[STORE_URL_ENV] = store_url
    if bus_url is None:
        env.pop(BUS_URL_ENV, None)
    else:
        env[BUS_URL_ENV] = bus_url
    return env
