"""The invariant checker of RELIABILITY.md for the order flow, on one store or a deployment.

The checker is a pure function over an :class:`AuditSnapshot`: the final contents of the stores
(event streams, outboxes, inboxes, dead letters, saga table, the services' documents and the read
model) and, where the bus keeps them, its queues, log and subscription cursors. It returns every
broken invariant as a :class:`Violation` with its evidence (stream, position, order id, message
id); it never raises for a violation. A fault test ends with ``assert not check_invariants(db)``
(one SQLite file holding every service and the bus) or ``assert not check_deployment(d)`` (a
database per service, a bus between them).

Each store gives its rows through one query method, ``audit_rows()`` (see
:meth:`sagaline.backends.sqlite.queries.SqliteQueries.audit_rows` for the contract); the snapshot
is built from those rows alone, in one of two layouts:

* co-located (``"colocated"``): the store's database is the bus. Commands are the rows of its
  queues, acknowledged or not; events are its log; subscribers have cursors on that log.
* database per service (``"outbox"``): each store emits through its outbox and a relay carries
  the messages. Events are the streams' appends plus the events of the outboxes; commands are the
  outboxes' commands, each ``handled`` when the inbox of the service that handles its type has
  it, ``dead`` when that service dead-lettered it, else ``pending``. The orders clients submit
  are in no outbox: they are found in the order service's inbox and dead letters, and through the
  OrderCreated / OrderRejected events they caused. When the bus exposes ``audit_rows`` too (a
  SQLite bus), its acknowledgements, log and cursors are checked against the stores.

Run it on a quiescent system (no worker running): a system still at work shows undelivered
messages (I9) and sagas not yet ended (I1), and the checks that compare a saga's outcome with the
services' state then report what is merely late. Nothing is written: the rebuild of I7 replays
the events into memory with the projection's own handlers.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from sagaline.backends.sqlite.rows import JSON, decode_json
from sagaline.errors import ConcurrencyError, ConfigurationError, InvalidMessage
from sagaline.handling import System
from sagaline.messages import Envelope
from sagaline.orders import ORDER_SAGA, build_system
from sagaline.orders.inventory import RESERVATIONS, STOCK
from sagaline.orders.messages import (
    CreateOrderCommand,
    OrderCancelledEvent,
    OrderConfirmationRecordedEvent,
    OrderConfirmedEvent,
    OrderCreatedEvent,
    OrderRejectedEvent,
    PaymentProcessedEvent,
)
from sagaline.orders.payment import PAYMENTS
from sagaline.orders.read import ORDER_VIEW, build_order_projection
from sagaline.ports import Document, SagaRecord, StoreTransaction
from sagaline.projection import Projection, Views
from sagaline.saga.definition import SagaStatus

if TYPE_CHECKING:
    from sagaline.backends.sqlite import SqliteDatabase
    from sagaline.deploy import Deployment

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
    "AuditSnapshot",
    "BusEvent",
    "BusView",
    "UnsentEntry",
    "Violation",
    "check_deployment",
    "check_deployment_async",
    "check_invariants",
    "check_invariants_async",
    "check_snapshot",
    "format_violations",
]

_CREATED = OrderCreatedEvent.type_name()
_REJECTED = OrderRejectedEvent.type_name()
_CONFIRMED = OrderConfirmedEvent.type_name()
_CONFIRMATION_RECORDED = OrderConfirmationRecordedEvent.type_name()
_CANCELLED = OrderCancelledEvent.type_name()
_PAYMENT_PROCESSED = PaymentProcessedEvent.type_name()
_CREATE_ORDER = CreateOrderCommand.type_name()
_STOCK_FIELDS = ("available", "reserved", "sold", "stocked")

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


# ---------------------------------------------------------------- snapshot


def _decode(value: Any) -> Any:
    """A stored JSON value, numbers with a fraction as Decimal (as the stores read them)."""
    if isinstance(value, str | bytes):
        return decode_json(value)
    return value


def _as_dict(value: Any) -> dict[str, Any]:
    decoded = _decode(value)
    return dict(decoded) if isinstance(decoded, Mapping) else {}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    return JSON.encode(value).decode()


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


@dataclass
class AuditSnapshot:
    """The final contents of a system's stores (and bus), independent of the backends.

    ``events`` are in log order (by position in a co-located store; by timestamp, then message
    id, across the stores of a deployment). ``inbox`` holds (consumer, message id) pairs;
    ``documents`` maps namespace to key to document. ``bus`` is None when the bus keeps nothing
    the checker can read (a broker).
    """

    layout: str
    events: list[AuditEvent] = field(default_factory=list)
    commands: list[AuditCommand] = field(default_factory=list)
    inbox: set[tuple[str, str]] = field(default_factory=set)
    documents: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    sagas: list[SagaRecord] = field(default_factory=list)
    dead_letters: list[AuditDeadLetter] = field(default_factory=list)
    unsent: list[UnsentEntry] = field(default_factory=list)
    bus: BusView | None = None

    @classmethod
    async def from_store(cls, db: Any, system: System | None = None) -> AuditSnapshot:
        """The snapshot of one store that is also the bus (``db.audit_rows()``)."""
        routes = (system or build_system()).routes
        return cls.from_rows([("log", await _audit_rows(db))], routes=routes)

    @classmethod
    async def from_deployment(
        cls, deployment: Deployment, system: System | None = None
    ) -> AuditSnapshot:
        """The snapshot of every distinct store of ``deployment``, and of its bus if readable."""
        routes = (system or build_system()).routes
        names: dict[int, list[str]] = defaultdict(list)
        for service, store in deployment.stores.items():
            names[id(store)].append(service)
        sources = [
            ("+".join(names[id(store)]), await _audit_rows(store))
            for store in deployment.distinct_stores()
        ]
        if deployment.bus is None:
            return cls.from_rows(sources, routes=routes)
        bus_rows = None
        if callable(getattr(deployment.bus, "audit_rows", None)):
            bus_rows = await _audit_rows(deployment.bus)
        return cls.from_rows(sources, routes=routes, bus_rows=bus_rows, outbox=True)

    @classmethod
    def from_rows(
        cls,
        sources: Sequence[tuple[str, Rows]],
        *,
        routes: Mapping[str, str],
        bus_rows: Rows | None = None,
        outbox: bool = False,
    ) -> AuditSnapshot:
        """Build the snapshot from ``audit_rows()`` results: ``(label, rows)`` per store.

        ``routes`` maps each command type to the service that handles it. With ``outbox`` the
        stores emitted through their outboxes and ``bus_rows`` (when not None) are the bus's own
        rows; without it, the stores' databases are the bus.
        """
        snapshot = cls(layout=OUTBOX if outbox else COLOCATED)
        for _, rows in sources:
            snapshot._take_state(rows)
        if not outbox:
            snapshot.bus = BusView()
            for label, rows in sources:
                snapshot._take_log(rows, "log" if len(sources) == 1 else f"{label} events")
                _fill_bus(snapshot.bus, rows)
            snapshot.commands = list(snapshot.bus.commands)
            snapshot.events.sort(key=lambda e: e.position)
            return snapshot
        for label, rows in sources:
            snapshot._take_log(rows, f"{label} events")
        for label, rows in sources:
            snapshot._take_outbox(rows, f"{label} outbox", routes)
        if bus_rows is not None:
            snapshot.bus = BusView()
            _fill_bus(snapshot.bus, bus_rows)
        snapshot._take_clients(routes)
        snapshot._derive_states()
        snapshot.events.sort(key=lambda e: (e.timestamp, e.message_id))
        return snapshot

    def _take_state(self, rows: Rows) -> None:
        self.inbox.update((str(c), str(m)) for c, m in rows.get("inbox", ()))
        known = {(d.consumer, d.message_id, d.reason) for d in self.dead_letters}
        for (
            _,
            consumer,
            message_id,
            type_,
            order_id,
            cause,
            source,
            reason,
            attempts,
            _,
        ) in rows.get("dead_letters", ()):
            if (consumer, message_id, reason) not in known:
                self.dead_letters.append(
                    AuditDeadLetter(
                        consumer, message_id, type_, order_id, cause, source, reason, attempts
                    )
                )
        for namespace, key, data, _ in rows.get("documents", ()):
            self.documents.setdefault(str(namespace), {}).setdefault(str(key), _as_dict(data))
        history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for saga_id, _, _, data in rows.get("saga_history", ()):
            history[str(saga_id)].append(_as_dict(data))
        seen = {record.saga_id for record in self.sagas}
        for row in rows.get("sagas", ()):
            saga_id, definition, definition_version, status, step, data, version, made, at = row
            if saga_id in seen:
                continue
            self.sagas.append(
                SagaRecord(
                    saga_id=saga_id,
                    definition=definition,
                    definition_version=definition_version,
                    status=status,
                    step=step,
                    data=_as_dict(data),
                    history=history.get(saga_id, []),
                    version=version,
                    created_at=made,
                    updated_at=at,
                    loaded_status=status,
                )
            )

    def _known_events(self) -> dict[str, int]:
        return {event.message_id: n for n, event in enumerate(self.events)}

    def _take_log(self, rows: Rows, origin: str) -> None:
        known = self._known_events()
        for row in rows.get("events", ()):
            position, stream, version, part, message_id, type_, body, order_id = row[:8]
            cause, timestamp, traceparent, source = row[8:12]
            event = AuditEvent(
                position=position,
                stream=stream,
                version=version,
                message_id=message_id,
                type=type_,
                correlation_id=order_id,
                causation_id=cause,
                source=source,
                body=_as_dict(body),
                raw=_text(body),
                timestamp=timestamp,
                traceparent=traceparent,
                part=part,
                origin=origin,
            )
            index = known.get(message_id)
            if index is None:
                known[message_id] = len(self.events)
                self.events.append(event)
            elif event.stream is not None and self.events[index].stream is None:
                self.events[index] = event

    def _take_outbox(self, rows: Rows, origin: str, routes: Mapping[str, str]) -> None:
        events = self._known_events()
        commands = {command.message_id for command in self.commands}
        for row in rows.get("outbox", ()):
            entry_id, message_id, type_, body, order_id, cause, timestamp, traceparent = row[:8]
            source, sent = row[8], row[9]
            if not sent:
                self.unsent.append(UnsentEntry(origin, entry_id, message_id, type_, order_id))
            queue = routes.get(type_)
            if queue is not None:
                if message_id not in commands:
                    commands.add(message_id)
                    self.commands.append(
                        AuditCommand(
                            message_id,
                            queue,
                            type_,
                            order_id,
                            cause,
                            source,
                            PENDING,
                            id=entry_id,
                            origin=origin,
                        )
                    )
            elif message_id not in events:
                events[message_id] = len(self.events)
                self.events.append(
                    AuditEvent(
                        position=entry_id,
                        stream=None,
                        version=None,
                        message_id=message_id,
                        type=type_,
                        correlation_id=order_id,
                        causation_id=cause,
                        source=source,
                        body=_as_dict(body),
                        raw=_text(body),
                        timestamp=timestamp,
                        traceparent=traceparent,
                        origin=origin,
                    )
                )

    def _take_clients(self, routes: Mapping[str, str]) -> None:
        """Add what clients submitted: it is in no outbox, but its effects show it."""
        known = {c.message_id for c in self.commands} | {e.message_id for e in self.events}
        bus = self.bus
        if bus is not None:
            for command in bus.commands:
                if command.source == CLIENT_SOURCE and command.message_id not in known:
                    known.add(command.message_id)
                    self.commands.append(
                        AuditCommand(
                            command.message_id,
                            command.queue,
                            command.type,
                            command.correlation_id,
                            command.causation_id,
                            command.source,
                            PENDING,
                            id=command.id,
                            origin=CLIENT_SOURCE,
                        )
                    )
        queue = routes.get(_CREATE_ORDER)
        answers: dict[str, AuditEvent] = {}
        for event in self.events:
            if event.type in (_CREATED, _REJECTED) and event.causation_id is not None:
                answers.setdefault(event.causation_id, event)
        found: dict[str, str] = {}
        for consumer, message_id in sorted(self.inbox):
            if consumer == queue and message_id in answers:
                found.setdefault(message_id, answers[message_id].correlation_id)
        for message_id, event in answers.items():
            if event.source == queue:
                found.setdefault(message_id, event.correlation_id)
        for dead in self.dead_letters:
            if dead.consumer == queue and dead.type == _CREATE_ORDER:
                found.setdefault(dead.message_id, dead.correlation_id)
        for message_id, order_id in found.items():
            if message_id not in known:
                known.add(message_id)
                self.commands.append(
                    AuditCommand(
                        message_id,
                        queue,
                        _CREATE_ORDER,
                        order_id,
                        None,
                        CLIENT_SOURCE,
                        PENDING,
                        origin=CLIENT_SOURCE,
                    )
                )

    def _derive_states(self) -> None:
        """Each command's state from its handler's inbox and dead letters; bus counts if known."""
        dead = {(d.consumer, d.message_id) for d in self.dead_letters}
        on_bus = {c.message_id: c for c in self.bus.commands} if self.bus is not None else {}
        derived = []
        for command in self.commands:
            key = (command.queue or "", command.message_id)
            state = HANDLED if key in self.inbox else DEAD if key in dead else PENDING
            bus = on_bus.get(command.message_id)
            derived.append(
                AuditCommand(
                    command.message_id,
                    command.queue,
                    command.type,
                    command.correlation_id,
                    command.causation_id,
                    command.source,
                    state,
                    attempts=bus.attempts if bus is not None else None,
                    last_error=bus.last_error if bus is not None else None,
                    id=command.id,
                    origin=command.origin,
                )
            )
        self.commands = derived

    def message_ids(self) -> set[str]:
        """Every message id the snapshot knows: logged events, commands, the bus's messages."""
        ids = {e.message_id for e in self.events} | {c.message_id for c in self.commands}
        if self.bus is not None:
            ids.update(c.message_id for c in self.bus.commands)
            ids.update(e.message_id for e in self.bus.events)
        return ids


def _fill_bus(bus: BusView, rows: Rows) -> None:
    """Add a bus's queues, log and cursors (rows of ``audit_rows()``) to ``bus``."""
    commands = {c.message_id for c in bus.commands}
    for row in rows.get("commands", ()):
        command_id, queue, message_id, type_, order_id, cause, _, source = row[:8]
        done, outcome, attempts, last_error = row[8:12]
        if message_id in commands:
            continue
        commands.add(message_id)
        state = PENDING if not done else DEAD if outcome == DEAD else HANDLED
        bus.commands.append(
            AuditCommand(
                message_id,
                queue,
                type_,
                order_id,
                cause,
                source,
                state,
                attempts=attempts,
                last_error=last_error,
                id=command_id,
                origin="bus",
            )
        )
    events = {e.message_id for e in bus.events}
    for row in rows.get("events", ()):
        position, _, _, part, message_id, type_, _, order_id = row[:8]
        if message_id not in events:
            events.add(message_id)
            bus.events.append(BusEvent(position, part, message_id, type_, order_id, row[11]))
    for subscriber, part, position in rows.get("subscriptions", ()):
        bus.cursors.setdefault((str(subscriber), int(part)), int(position))


async def _audit_rows(store: Any) -> Rows:
    """``store.audit_rows()``, awaited when the backend answers asynchronously."""
    method = getattr(store, "audit_rows", None)
    if method is None:
        raise ConfigurationError(
            f"{type(store).__name__} has no audit_rows(): the invariant checker cannot read it"
        )
    rows = method()
    if inspect.isawaitable(rows):
        rows = await rows
    return cast(Rows, rows)


# ------------------------------------------------------------ entry points


def _run(make: Callable[[], Coroutine[Any, Any, list[Violation]]], name: str) -> list[Violation]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop in this thread: run one
    else:
        raise RuntimeError(f"{name}() runs its own event loop: use {name}_async")
    return asyncio.run(make())


def check_invariants(
    db: SqliteDatabase,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant the order flow breaks in ``db``; an empty list when it keeps them all.

    ``db`` holds every service's state and the bus. ``initial_stock`` (product id to units
    stocked) adds the check that no unit appeared or vanished. ``system`` gives the routes and
    the subscribers (the order flow's services by default). Call :func:`check_invariants_async`
    from a running event loop.
    """
    return _run(
        lambda: check_invariants_async(db, initial_stock=initial_stock, system=system),
        "check_invariants",
    )


async def check_invariants_async(
    db: SqliteDatabase,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """The same as :func:`check_invariants`, for callers inside an event loop."""
    snapshot = await AuditSnapshot.from_store(db, system)
    return await check_snapshot(snapshot, initial_stock=initial_stock, system=system)


def check_deployment(
    deployment: Deployment,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant the order flow breaks across the stores (and bus) of ``deployment``.

    Works for a database per service with any bus (the bus's own rows are checked too when it
    has ``audit_rows``, as a SQLite bus does) and for stores co-located with their bus. Call
    :func:`check_deployment_async` from a running event loop.
    """
    return _run(
        lambda: check_deployment_async(deployment, initial_stock=initial_stock, system=system),
        "check_deployment",
    )


async def check_deployment_async(
    deployment: Deployment,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """The same as :func:`check_deployment`, for callers inside an event loop."""
    snapshot = await AuditSnapshot.from_deployment(deployment, system)
    return await check_snapshot(snapshot, initial_stock=initial_stock, system=system)


async def check_snapshot(
    snapshot: AuditSnapshot,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant of RELIABILITY.md the order flow breaks in ``snapshot``."""
    system = system or build_system()
    facts = _Facts.load(snapshot)
    violations: list[Violation] = []
    violations.extend(_check_terminal(facts))
    violations.extend(_check_stock(snapshot, facts, initial_stock))
    violations.extend(_check_exclusive(snapshot, facts))
    violations.extend(_check_money(snapshot, facts))
    violations.extend(_check_once(snapshot, facts))
    violations.extend(_check_versions(snapshot, system))
    violations.extend(await _check_read_model(snapshot, build_order_projection()))
    violations.extend(_check_no_loss(snapshot, facts))
    violations.extend(_check_delivered(snapshot, system))
    return violations


# ------------------------------------------------------------------ facts


@dataclass
class _Facts:
    """What several checks share, read once."""

    #: order id -> saga status, for instances of the order saga.
    outcomes: dict[str, str]
    #: order id -> event type -> the order's events of that type, in log order.
    events: dict[str, dict[str, list[AuditEvent]]]

    @classmethod
    def load(cls, snapshot: AuditSnapshot) -> _Facts:
        outcomes: dict[str, str] = {}
        for record in snapshot.sagas:
            if record.definition == ORDER_SAGA.name:
                order_id = record.data.get("orderId") or record.saga_id.partition(":")[2]
                outcomes[str(order_id)] = str(record.status)
        types = {_CREATED, _CONFIRMED, _CONFIRMATION_RECORDED, _CANCELLED, _PAYMENT_PROCESSED}
        events: dict[str, dict[str, list[AuditEvent]]] = defaultdict(lambda: defaultdict(list))
        for event in snapshot.events:
            if event.type in types:
                events[event.correlation_id][event.type].append(event)
        return cls(outcomes, events)

    def of(self, order_id: str, event_type: str) -> list[AuditEvent]:
        """The order's events of one type (empty when none)."""
        by_type = self.events.get(order_id)
        return [] if by_type is None else by_type.get(event_type, [])

    def created_orders(self) -> list[str]:
        """Every order id with an OrderCreatedEvent."""
        return sorted(order_id for order_id in self.events if self.of(order_id, _CREATED))


def _documents(snapshot: AuditSnapshot, namespace: str) -> dict[str, dict[str, Any]]:
    return snapshot.documents.get(namespace, {})


def _subscribers(system: System) -> dict[str, list[str]]:
    """Subscriber name -> the event types it consumes."""
    return {
        service.name: sorted(service.event_handlers)
        for service in system.services.values()
        if service.event_handlers
    }


# ------------------------------------------------------------- invariants


def _check_terminal(facts: _Facts) -> Iterator[Violation]:
    """I1: every saga ended COMPLETED or COMPENSATED; every created order has its saga."""
    for order_id, status in sorted(facts.outcomes.items()):
        if not SagaStatus(status).terminal:
            yield Violation(
                "I1",
                f"the saga of {order_id} has not ended: it is {status}",
                {"orderId": order_id, "status": status},
            )
    for order_id in facts.created_orders():
        if order_id not in facts.outcomes:
            created = facts.of(order_id, _CREATED)[0]
            yield Violation(
                "I1",
                f"{order_id} was created but no saga started for it",
                {"orderId": order_id, "stream": created.stream, "position": created.at},
            )


def _check_stock(
    snapshot: AuditSnapshot, facts: _Facts, initial_stock: Mapping[str, int] | None
) -> Iterator[Violation]:
    """I2: each product's ledger balances, matches its reservations and the sagas' outcomes."""
    stocks = _documents(snapshot, STOCK)
    reservations = _documents(snapshot, RESERVATIONS)
    held: Counter[str] = Counter()
    sold: Counter[str] = Counter()
    for reservation in reservations.values():
        target = {"RESERVED": held, "SOLD": sold}.get(reservation.get("status", ""))
        if target is not None:
            for item in reservation.get("items", []):
                target[str(item["productId"])] += int(item["quantity"])
    for product_id, stock in stocks.items():
        evidence = {"productId": product_id, **{name: stock.get(name) for name in _STOCK_FIELDS}}
        values = [stock.get(name) for name in _STOCK_FIELDS]
        numbers = [value for value in values if isinstance(value, int)]
        if len(numbers) != len(values):
            yield Violation(
                "I2", f"{product_id} has a ledger field that is not an integer", evidence
            )
            continue
        available, reserved, sold_units, stocked = numbers
        if available + reserved + sold_units != stocked:
            yield Violation(
                "I2",
                f"{product_id}: available + reserved + sold = "
                f"{available + reserved + sold_units}, but {stocked} were stocked",
                evidence,
            )
        negative = [name for name, value in zip(_STOCK_FIELDS, numbers, strict=True) if value < 0]
        if negative:
            yield Violation("I2", f"{product_id}: negative {', '.join(negative)}", evidence)
        if initial_stock is not None and stocked != initial_stock.get(product_id, stocked):
            yield Violation(
                "I2",
                f"{product_id}: {stocked} stocked, but {initial_stock[product_id]} were put in",
                evidence,
            )
        if reserved != held[product_id]:
            yield Violation(
                "I2",
                f"{product_id}: {reserved} reserved, but the RESERVED reservations hold"
                f" {held[product_id]}",
                evidence,
            )
        if sold_units != sold[product_id]:
            yield Violation(
                "I2",
                f"{product_id}: {sold_units} sold, but the SOLD reservations hold"
                f" {sold[product_id]}",
                evidence,
            )
    for product_id in sorted({*held, *sold} - set(stocks)):
        yield Violation(
            "I2",
            f"reservations name {product_id}, which has no stock ledger",
            {"productId": product_id},
        )
    if initial_stock is not None:
        for product_id in sorted(set(initial_stock) - set(stocks)):
            yield Violation(
                "I2", f"{product_id} was stocked but has no ledger", {"productId": product_id}
            )
        for product_id in sorted(set(stocks) - set(initial_stock)):
            yield Violation(
                "I2", f"{product_id} has a ledger but was never stocked", {"productId": product_id}
            )
    # An ended saga leaves the order's units sold (completed) or back on the shelf (compensated).
    expected = {SagaStatus.COMPLETED: "SOLD", SagaStatus.COMPENSATED: "RELEASED"}
    for order_id, status in sorted(facts.outcomes.items()):
        wanted = expected.get(SagaStatus(status))
        if wanted is None:
            continue
        found = reservations.get(order_id, {}).get("status")
        if found != wanted:
            yield Violation(
                "I2",
                f"the saga of {order_id} is {status}, but its reservation is {found or 'absent'}"
                f" (expected {wanted})",
                {"orderId": order_id, "saga": status, "reservation": found},
            )


def _check_exclusive(snapshot: AuditSnapshot, facts: _Facts) -> Iterator[Violation]:
    """I3: no order both confirmed and cancelled; write side and read model agree with the saga."""
    rows = _documents(snapshot, ORDER_VIEW)
    for order_id in sorted(facts.events):
        recorded = facts.of(order_id, _CONFIRMATION_RECORDED)
        confirmed = facts.of(order_id, _CONFIRMED)
        cancelled = facts.of(order_id, _CANCELLED)
        in_stream = [e for e in cancelled if e.stream == f"Order-{order_id}"]
        if recorded and in_stream:
            yield Violation(
                "I3",
                f"stream Order-{order_id} records both a confirmation and a cancellation",
                {
                    "orderId": order_id,
                    "stream": f"Order-{order_id}",
                    "positions": [e.at for e in (*recorded, *in_stream)],
                },
            )
        if confirmed and cancelled:
            yield Violation(
                "I3",
                f"{order_id} was published as both confirmed and cancelled",
                {"orderId": order_id, "positions": [e.at for e in (*confirmed, *cancelled)]},
            )
    for order_id, status in sorted(facts.outcomes.items()):
        stream = f"Order-{order_id}"
        row_status = rows.get(order_id, {}).get("status")
        if status == SagaStatus.COMPLETED:
            if not facts.of(order_id, _CONFIRMATION_RECORDED):
                yield Violation(
                    "I3",
                    f"the saga of {order_id} completed, but {stream} records no confirmation",
                    {"orderId": order_id, "stream": stream},
                )
            if row_status != "CONFIRMED":
                yield Violation(
                    "I3",
                    f"the saga of {order_id} completed, but the read model says {row_status}",
                    {"orderId": order_id, "saga": status, "readModel": row_status},
                )
        elif status == SagaStatus.COMPENSATED:
            if not any(e.stream == stream for e in facts.of(order_id, _CANCELLED)):
                yield Violation(
                    "I3",
                    f"the saga of {order_id} compensated, but {stream} records no cancellation",
                    {"orderId": order_id, "stream": stream},
                )
            if row_status != "CANCELLED":
                yield Violation(
                    "I3",
                    f"the saga of {order_id} compensated, but the read model says {row_status}",
                    {"orderId": order_id, "saga": status, "readModel": row_status},
                )


def _check_money(snapshot: AuditSnapshot, facts: _Facts) -> Iterator[Violation]:
    """I4: one payment per order, of the order's amount; no charge of an order not confirmed.

    The order saga takes payment as its pivot and last step, so a processed payment means the
    saga completed and nothing is ever refunded: a charge of a compensated order is a loss.
    """
    payments = _documents(snapshot, PAYMENTS)
    for order_id, payment in payments.items():
        evidence = {"orderId": order_id, "payment": payment.get("status")}
        if payment.get("orderId") != order_id:
            yield Violation(
                "I4", f"payment document {order_id} names order {payment.get('orderId')}", evidence
            )
        created = facts.of(order_id, _CREATED)
        if not created:
            yield Violation("I4", f"{order_id} was charged but never created", evidence)
        elif Decimal(payment.get("amount", -1)) != Decimal(created[0].body["totalAmount"]):
            yield Violation(
                "I4",
                f"{order_id} was charged {payment.get('amount')}, but its total is"
                f" {created[0].body['totalAmount']}",
                evidence,
            )
        outcome = facts.outcomes.get(order_id)
        if payment.get("status") == "PROCESSED" and outcome != SagaStatus.COMPLETED:
            yield Violation(
                "I4",
                f"{order_id} was charged, but its saga is {outcome}",
                {**evidence, "saga": outcome},
            )
    for order_id in sorted(facts.events):
        processed = facts.of(order_id, _PAYMENT_PROCESSED)
        if not processed:
            if facts.outcomes.get(order_id) == SagaStatus.COMPLETED:
                yield Violation(
                    "I4",
                    f"the saga of {order_id} completed without a payment",
                    {"orderId": order_id},
                )
            continue
        payment = payments.get(order_id, {})
        positions = [e.at for e in processed]
        if facts.outcomes.get(order_id) == SagaStatus.COMPENSATED:
            yield Violation(
                "I4",
                f"{order_id} was charged (PaymentProcessedEvent) but its saga compensated",
                {"orderId": order_id, "positions": positions},
            )
        transactions = {e.body.get("transactionId") for e in processed}
        if payment.get("status") != "PROCESSED" or transactions != {payment.get("transactionId")}:
            yield Violation(
                "I4",
                f"{order_id}: PaymentProcessedEvent transactions {sorted(map(str, transactions))}"
                f" do not match its one payment ({payment.get('status')},"
                f" {payment.get('transactionId')})",
                {"orderId": order_id, "positions": positions},
            )


def _check_once(snapshot: AuditSnapshot, facts: _Facts) -> Iterator[Violation]:
    """I5: at most one effect per message and per business intent."""
    for order_id in sorted(facts.events):
        created = facts.of(order_id, _CREATED)
        if len(created) > 1:
            yield Violation(
                "I5",
                f"{order_id} was created {len(created)} times",
                {"orderId": order_id, "positions": [e.at for e in created]},
            )
    for order_id, reservation in _documents(snapshot, RESERVATIONS).items():
        if reservation.get("orderId") != order_id:
            yield Violation(
                "I5",
                f"reservation {order_id} names order {reservation.get('orderId')}",
                {"orderId": order_id},
            )
        if not facts.of(order_id, _CREATED):
            yield Violation(
                "I5", f"{order_id} has a reservation but was never created", {"orderId": order_id}
            )
    inbox = snapshot.inbox
    # A handled command has its inbox mark (same transaction); an unhandled one has none.
    if snapshot.bus is not None:
        for command in snapshot.bus.commands:
            marked = (command.queue or "", command.message_id) in inbox
            if (command.state == HANDLED) != marked:
                yield Violation(
                    "I5",
                    f"{command.type} {command.message_id} for {command.correlation_id}: its inbox"
                    " mark and its acknowledgement disagree",
                    {
                        "commandId": command.id,
                        "queue": command.queue,
                        "messageId": command.message_id,
                        "orderId": command.correlation_id,
                    },
                )
    # A message a handler sent commits with the inbox mark of the message it handled.
    effects: dict[tuple[str, str], list[str]] = defaultdict(list)
    sent_by: list[AuditEvent | AuditCommand] = [*snapshot.events, *snapshot.commands]
    for message in sent_by:
        if message.source not in (None, CLIENT_SOURCE) and message.causation_id is not None:
            key = (str(message.source), message.causation_id)
            if key not in inbox:
                effects[key].append(message.message_id)
    for (consumer, cause), caused in sorted(effects.items()):
        yield Violation(
            "I5",
            f"{consumer} acted on {cause} (sent {len(caused)} message(s)) but has no inbox mark"
            " for it: a redelivery would act again",
            {"consumer": consumer, "messageId": cause, "caused": caused},
        )
    # Each handling in the order system sends one message (an answer, the saga's next command, a
    # confirmation): two caused by one message from one consumer (both OrderCreatedEvent and
    # OrderRejectedEvent for one CreateOrderCommand) mean the message was handled twice.
    answers: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for message in sent_by:
        if message.source not in (None, CLIENT_SOURCE) and message.causation_id is not None:
            answers[str(message.source), message.causation_id][message.message_id] = message.type
    for (consumer, cause), caused_by in sorted(answers.items()):
        if len(caused_by) > 1:
            yield Violation(
                "I5",
                f"{consumer} acted on {cause} more than once: it sent"
                f" {', '.join(sorted(caused_by.values()))}",
                {"consumer": consumer, "messageId": cause, "caused": sorted(caused_by)},
            )
    # The orchestrator sends each command of the order saga at most once per order.
    sent = Counter(
        (command.correlation_id, command.type)
        for command in snapshot.commands
        if command.source == "orchestrator"
    )
    for (order_id, type_), count in sorted(sent.items()):
        if count > 1:
            yield Violation(
                "I5",
                f"the orchestrator sent {type_} {count} times for {order_id}",
                {"orderId": order_id, "type": type_, "count": count},
            )
    # A saga applies each message once: its history names each handled messageId once.
    for record in sorted(snapshot.sagas, key=lambda r: r.saga_id):
        seen = Counter(str(entry.get("messageId")) for entry in record.history)
        for message_id, count in seen.items():
            if count > 1:
                yield Violation(
                    "I5",
                    f"saga {record.saga_id} applied message {message_id} {count} times",
                    {"sagaId": record.saga_id, "messageId": message_id},
                )
    known = snapshot.message_ids()
    for consumer, message_id in sorted(inbox):
        if message_id not in known:
            yield Violation(
                "I5",
                f"{consumer} marked {message_id} processed, but no such message was sent",
                {"consumer": consumer, "messageId": message_id},
            )


def _check_versions(snapshot: AuditSnapshot, system: System) -> Iterator[Violation]:
    """I6: stream versions are 1..n without gaps; no subscriber passed over an event."""
    streams: dict[str, list[int]] = defaultdict(list)
    for event in snapshot.events:
        if event.stream is not None and event.version is not None:
            streams[event.stream].append(event.version)
        elif (event.stream is None) != (event.version is None):
            yield Violation(
                "I6",
                f"event at {event.at} has a stream without a version or a version without a stream",
                {"position": event.at, "stream": event.stream, "version": event.version},
            )
    for stream, versions in sorted(streams.items()):
        low, high = min(versions), max(versions)
        if low != 1 or high != len(versions) or len(set(versions)) != len(versions):
            yield Violation(
                "I6",
                f"stream {stream} has {len(versions)} events with versions {low}..{high}",
                {"stream": stream, "count": len(versions), "versions": [low, high]},
            )
    positions = Counter((event.origin, event.position) for event in snapshot.events)
    for (origin, position), count in sorted(positions.items()):
        if count > 1:
            yield Violation(
                "I6",
                f"{count} events share position {position} of {origin}",
                {"origin": origin, "position": position, "count": count},
            )
    bus = snapshot.bus
    if bus is None:
        return
    # Below its cursor, every event a subscriber wants was handled (inbox) or dead-lettered.
    dead = {(d.consumer, d.message_id) for d in snapshot.dead_letters}
    for name, types in _subscribers(system).items():
        wanted = set(types)
        for logged in sorted(bus.events, key=lambda e: e.position):
            cursor = bus.cursors.get((name, logged.part))
            if cursor is None or logged.position > cursor or logged.type not in wanted:
                continue
            key = (name, logged.message_id)
            if key not in snapshot.inbox and key not in dead:
                yield Violation(
                    "I6",
                    f"subscriber {name} moved past {logged.type} at {logged.position} without"
                    " handling it",
                    {
                        "subscriber": name,
                        "position": logged.position,
                        "partition": logged.part,
                        "cursor": cursor,
                        "messageId": logged.message_id,
                        "orderId": logged.correlation_id,
                    },
                )


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


async def _check_read_model(snapshot: AuditSnapshot, projection: Projection) -> list[Violation]:
    """I7: the order read model equals a fresh rebuild from the logged events.

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
    live = _documents(snapshot, projection.namespace)
    for order_id in sorted(set(live) | set(rebuilt)):
        row, fresh = live.get(order_id), rebuilt.get(order_id)
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
                f"read model row {order_id} {message}",
                {"orderId": order_id, "live": row, "rebuilt": fresh},
            )
        )
    return violations


def _check_no_loss(snapshot: AuditSnapshot, facts: _Facts) -> Iterator[Violation]:
    """I8: every handled command caused an event; every failed one is a recorded dead letter."""
    caused: dict[str, set[str]] = defaultdict(set)
    for event in snapshot.events:
        if event.causation_id is not None:
            caused[event.causation_id].add(event.type)
    dead = {(d.consumer, d.message_id) for d in snapshot.dead_letters}
    for command in snapshot.commands:
        if command.state == PENDING:
            continue
        type_, order_id = command.type, command.correlation_id
        evidence = {
            "commandId": command.id,
            "queue": command.queue,
            "type": type_,
            "orderId": order_id,
            "messageId": command.message_id,
        }
        if command.state == DEAD:
            if (command.queue, command.message_id) not in dead:
                yield Violation(
                    "I8", f"{type_} for {order_id} failed without a dead letter", evidence
                )
            continue
        answers = caused.get(command.message_id, set())
        if type_ == _CREATE_ORDER and not answers & {_CREATED, _REJECTED}:
            yield Violation(
                "I8",
                f"{type_} for {order_id} was handled but neither created nor rejected the order",
                evidence,
            )
        elif not answers:
            yield Violation(
                "I8", f"{type_} for {order_id} was handled but caused no event", evidence
            )
    for order_id in facts.created_orders():
        created = facts.of(order_id, _CREATED)[0]
        if created.stream != f"Order-{order_id}":
            yield Violation(
                "I8",
                f"OrderCreatedEvent of {order_id} is not in its order's stream",
                {"orderId": order_id, "position": created.at, "stream": created.stream},
            )


def _check_delivered(snapshot: AuditSnapshot, system: System) -> Iterator[Violation]:
    """I9: every message emitted was published and delivered; nothing else was published.

    Co-located, the bus tables are the outbox: a message is published when its row commits, and
    delivered when its consumer acknowledged it (command) or its subscriber's cursor passed it.
    With a database per service, an outbox entry must be marked sent, a command must be in its
    handler's inbox or dead letters, an event in the inbox or dead letters of every subscriber of
    its type; and a bus that keeps its messages must hold none that no store emitted.
    """
    for command in snapshot.commands:
        if command.state == PENDING:
            yield Violation(
                "I9",
                f"{command.type} for {command.correlation_id} is still pending on queue"
                f" {command.queue}",
                {
                    "commandId": command.id,
                    "origin": command.origin,
                    "queue": command.queue,
                    "messageId": command.message_id,
                    "orderId": command.correlation_id,
                    "attempts": command.attempts,
                    "lastError": command.last_error,
                },
            )
    subscribers = _subscribers(system)
    bus = snapshot.bus
    if bus is not None:
        for name, types in subscribers.items():
            wanted = set(types)
            behind: dict[int, list[int]] = defaultdict(list)
            for logged in bus.events:
                cursor = bus.cursors.get((name, logged.part))
                if logged.type in wanted and (cursor is None or logged.position > cursor):
                    behind[logged.part].append(logged.position)
            for part, positions in sorted(behind.items()):
                yield Violation(
                    "I9",
                    f"subscriber {name} has {len(positions)} undelivered event(s) in partition"
                    f" {part}",
                    {
                        "subscriber": name,
                        "partition": part,
                        "position": min(positions),
                        "count": len(positions),
                    },
                )
    if snapshot.layout != OUTBOX:
        return
    for entry in snapshot.unsent:
        yield Violation(
            "I9",
            f"{entry.type} for {entry.correlation_id} was never published from {entry.origin}",
            {
                "origin": entry.origin,
                "id": entry.id,
                "messageId": entry.message_id,
                "orderId": entry.correlation_id,
            },
        )
    dead = {(d.consumer, d.message_id) for d in snapshot.dead_letters}
    for event in snapshot.events:
        for name, types in subscribers.items():
            key = (name, event.message_id)
            if event.type in types and key not in snapshot.inbox and key not in dead:
                yield Violation(
                    "I9",
                    f"{event.type} for {event.correlation_id} never reached subscriber {name}",
                    {
                        "subscriber": name,
                        "position": event.at,
                        "messageId": event.message_id,
                        "orderId": event.correlation_id,
                    },
                )
    if bus is not None:
        emitted = {e.message_id for e in snapshot.events} | {
            c.message_id for c in snapshot.commands
        }
        carried: list[AuditCommand | BusEvent] = [*bus.commands, *bus.events]
        for message in carried:
            if message.source != CLIENT_SOURCE and message.message_id not in emitted:
                yield Violation(
                    "I9",
                    f"the bus carries {message.type} {message.message_id}, which no store emitted",
                    {
                        "messageId": message.message_id,
                        "type": message.type,
                        "orderId": message.correlation_id,
                    },
                )
