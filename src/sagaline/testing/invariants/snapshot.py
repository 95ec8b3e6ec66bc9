"""The snapshot the invariant checker reads: the final contents of a system's stores (and bus).

Each store gives its rows through one query method, ``audit_rows()`` (see
:meth:`sagaline.backends.sqlite.queries.SqliteReader.audit_rows` for the contract); the snapshot
is built from those rows alone, in one of two layouts:

* co-located (``"colocated"``): the store's database is the bus. Commands are the rows of its
  queues, acknowledged or not; events are its log; subscribers have cursors on that log.
* database per service (``"outbox"``): each store emits through its outbox and a relay carries
  the messages. Events are the streams' appends plus the events of the outboxes; commands are the
  outboxes' commands, each ``handled`` when the inbox of the service that handles its type has
  it, ``dead`` when that service dead-lettered it, else ``pending``. The commands clients submit
  are in no outbox: they are found in their handler's inbox and dead letters, and through the
  events that answer them (``answers``: an app declares, for each command clients submit, the
  events its handler answers with). When the bus is a database too (SQLite, PostgreSQL), its
  acknowledgements, log and cursors are checked against the stores.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagaline.backends._sql.rows import JSON, decode_json
from sagaline.handling import System
from sagaline.ports import AuditRows, SagaRecord
from sagaline.testing.invariants.records import (
    CLIENT_SOURCE,
    COLOCATED,
    DEAD,
    HANDLED,
    OUTBOX,
    PENDING,
    AuditCommand,
    AuditDeadLetter,
    AuditEvent,
    BusEvent,
    BusView,
    Rows,
    UnsentEntry,
)

if TYPE_CHECKING:
    from sagaline.deploy import Deployment

__all__ = ["Answers", "AuditSnapshot"]

#: For each command type clients submit, the event types its handler answers it with.
Answers = Mapping[str, Collection[str]]

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
    async def from_store(cls, db: AuditRows, system: System) -> AuditSnapshot:
        """The snapshot of one store that is also the bus (``db.audit_rows()``)."""
        return cls.from_rows([("log", await db.audit_rows())], routes=system.routes)

    @classmethod
    async def from_deployment(
        cls, deployment: Deployment, system: System, *, answers: Answers | None = None
    ) -> AuditSnapshot:
        """The snapshot of every distinct store of ``deployment``, and of its bus if readable.

        ``answers`` tells how to find what clients submitted (see :meth:`from_rows`).
        """
        routes = system.routes
        names: dict[int, list[str]] = defaultdict(list)
        for service, store in deployment.stores.items():
            names[id(store)].append(service)
        sources = [
            ("+".join(names[id(store)]), await store.audit_rows())
            for store in deployment.distinct_stores()
        ]
        if deployment.bus is None:
            return cls.from_rows(sources, routes=routes)
        # A bus that is a database (SQLite, PostgreSQL) keeps rows to check; a broker none.
        database = deployment.bus.database()
        bus_rows = await database.audit_rows() if database is not None else None
        return cls.from_rows(
            sources, routes=routes, bus_rows=bus_rows, outbox=True, answers=answers
        )

    @classmethod
    def from_rows(
        cls,
        sources: Sequence[tuple[str, Rows]],
        *,
        routes: Mapping[str, str],
        bus_rows: Rows | None = None,
        outbox: bool = False,
        answers: Answers | None = None,
    ) -> AuditSnapshot:
        """Build the snapshot from ``audit_rows()`` results: ``(label, rows)`` per store.

        ``routes`` maps each command type to the service that handles it. With ``outbox`` the
        stores emitted through their outboxes and ``bus_rows`` (when not None) are the bus's own
        rows; without it, the stores' databases are the bus. ``answers`` maps each command type
        clients submit to the event types that answer it: with a database per service, a
        submission is in no outbox, and is found through its answers, its handler's inbox and
        dead letters (and the bus, when readable).
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
        snapshot._take_clients(routes, answers or {})
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
            correlation_id,
            cause,
            source,
            reason,
            attempts,
            _,
        ) in rows.get("dead_letters", ()):
            if (consumer, message_id, reason) not in known:
                self.dead_letters.append(
                    AuditDeadLetter(
                        consumer, message_id, type_, correlation_id, cause, source, reason, attempts
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
            position, stream, version, part, message_id, type_, body, correlation_id = row[:8]
            cause, timestamp, traceparent, source = row[8:12]
            event = AuditEvent(
                position=position,
                stream=stream,
                version=version,
                message_id=message_id,
                type=type_,
                correlation_id=correlation_id,
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
            entry_id, message_id, type_, body, correlation_id, cause, timestamp, traceparent = row[
                :8
            ]
            source, sent = row[8], row[9]
            if not sent:
                self.unsent.append(UnsentEntry(origin, entry_id, message_id, type_, correlation_id))
            queue = routes.get(type_)
            if queue is not None:
                if message_id not in commands:
                    commands.add(message_id)
                    self.commands.append(
                        AuditCommand(
                            message_id,
                            queue,
                            type_,
                            correlation_id,
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
                        correlation_id=correlation_id,
                        causation_id=cause,
                        source=source,
                        body=_as_dict(body),
                        raw=_text(body),
                        timestamp=timestamp,
                        traceparent=traceparent,
                        origin=origin,
                    )
                )

    def _take_clients(self, routes: Mapping[str, str], answered_by: Answers) -> None:
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
        for command_type, answer_types in answered_by.items():
            self._take_answered(routes.get(command_type), command_type, answer_types, known)

    def _take_answered(
        self, queue: str | None, command_type: str, answer_types: Collection[str], known: set[str]
    ) -> None:
        """Add the submissions of one command type, found through their answers."""
        answers: dict[str, AuditEvent] = {}
        for event in self.events:
            if event.type in answer_types and event.causation_id is not None:
                answers.setdefault(event.causation_id, event)
        found: dict[str, str] = {}
        for consumer, message_id in sorted(self.inbox):
            if consumer == queue and message_id in answers:
                found.setdefault(message_id, answers[message_id].correlation_id)
        for message_id, event in answers.items():
            if event.source == queue:
                found.setdefault(message_id, event.correlation_id)
        for dead in self.dead_letters:
            if dead.consumer == queue and dead.type == command_type:
                found.setdefault(dead.message_id, dead.correlation_id)
        for message_id, correlation_id in found.items():
            if message_id not in known:
                known.add(message_id)
                self.commands.append(
                    AuditCommand(
                        message_id,
                        queue,
                        command_type,
                        correlation_id,
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
        command_id, queue, message_id, type_, correlation_id, cause, _, source = row[:8]
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
                correlation_id,
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
        position, _, _, part, message_id, type_, _, correlation_id = row[:8]
        if message_id not in events:
            events.add(message_id)
            bus.events.append(BusEvent(position, part, message_id, type_, correlation_id, row[11]))
    for subscriber, part, position in rows.get("subscriptions", ()):
        bus.cursors.setdefault((str(subscriber), int(part)), int(position))
