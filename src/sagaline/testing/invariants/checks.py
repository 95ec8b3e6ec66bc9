"""The invariants any app keeps (RELIABILITY.md), checked over an audit snapshot.

Each check needs no business word: it reads the snapshot, and the system for its routes,
subscribers and saga definitions. A violation names the message, stream or position at fault
(``correlationId`` is the transaction the message belongs to). An app adds the rules of its own
domain as :attr:`sagaline.App.invariants`; :mod:`sagaline.testing.invariants.runner` runs both.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

from sagaline.handling import System
from sagaline.saga.definition import SagaStatus
from sagaline.saga.state import saga_id
from sagaline.testing.invariants.records import (
    CLIENT_SOURCE,
    DEAD,
    HANDLED,
    OUTBOX,
    PENDING,
    AuditCommand,
    AuditEvent,
    BusEvent,
    Violation,
)
from sagaline.testing.invariants.snapshot import AuditSnapshot

__all__ = [
    "check_delivered",
    "check_no_loss",
    "check_once",
    "check_started",
    "check_terminal",
    "check_versions",
]


def _subscribers(system: System) -> dict[str, list[str]]:
    """Subscriber name -> the event types it consumes."""
    return {
        service.name: sorted(service.event_handlers)
        for service in system.services.values()
        if service.event_handlers
    }


def check_started(snapshot: AuditSnapshot, system: System) -> Iterator[Violation]:
    """I1: every start event in the log has its saga.

    For each saga definition the system's services keep (an orchestrator's, a choreography's
    monitor's), every event of the definition's start type has the instance
    ``saga_id(definition, key)`` of the key it carries: a transaction whose saga never started
    is one no saga will ever end.
    """
    started = {record.saga_id for record in snapshot.sagas}
    for definition in system.sagas.values():
        start = definition.start.type_name()
        field = definition.correlation_field
        for event in snapshot.events:
            if event.type != start:
                continue
            key = event.body.get(field)
            expected = saga_id(definition, key) if isinstance(key, str) else None
            if expected is not None and expected in started:
                continue
            problem = f"has no saga {expected}" if expected else f"carries no {field}"
            yield Violation(
                "I1",
                f"{start} {event.message_id} for {event.correlation_id} {problem}: no"
                f" {definition.name} saga started for it",
                {
                    "sagaId": expected,
                    "messageId": event.message_id,
                    "correlationId": event.correlation_id,
                    "stream": event.stream,
                    "position": event.at,
                },
            )


def check_terminal(snapshot: AuditSnapshot, system: System) -> Iterator[Violation]:
    """I1: every saga of the system's definitions ended COMPLETED or COMPENSATED."""
    definitions = system.sagas
    for record in sorted(snapshot.sagas, key=lambda r: r.saga_id):
        if record.definition in definitions and not SagaStatus(record.status).terminal:
            yield Violation(
                "I1",
                f"the saga {record.saga_id} has not ended: it is {record.status}",
                {"sagaId": record.saga_id, "status": str(record.status)},
            )


def check_once(snapshot: AuditSnapshot) -> Iterator[Violation]:
    """I5: at most one effect per (consumer, message id)."""
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
                        "correlationId": command.correlation_id,
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


def check_versions(snapshot: AuditSnapshot, system: System) -> Iterator[Violation]:
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
                        "correlationId": logged.correlation_id,
                    },
                )


def check_no_loss(snapshot: AuditSnapshot) -> Iterator[Violation]:
    """I8: every handled command caused an event; every failed one is a recorded dead letter."""
    caused: dict[str, set[str]] = defaultdict(set)
    for event in snapshot.events:
        if event.causation_id is not None:
            caused[event.causation_id].add(event.type)
    dead = {(d.consumer, d.message_id) for d in snapshot.dead_letters}
    for command in snapshot.commands:
        if command.state == PENDING:
            continue
        type_, correlation_id = command.type, command.correlation_id
        evidence = {
            "commandId": command.id,
            "queue": command.queue,
            "type": type_,
            "correlationId": correlation_id,
            "messageId": command.message_id,
        }
        if command.state == DEAD:
            if (command.queue, command.message_id) not in dead:
                yield Violation(
                    "I8", f"{type_} for {correlation_id} failed without a dead letter", evidence
                )
            continue
        if not caused.get(command.message_id):
            yield Violation(
                "I8", f"{type_} for {correlation_id} was handled but caused no event", evidence
            )


def check_delivered(snapshot: AuditSnapshot, system: System) -> Iterator[Violation]:
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
                    "correlationId": command.correlation_id,
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
                "correlationId": entry.correlation_id,
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
                        "correlationId": event.correlation_id,
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
                        "correlationId": message.correlation_id,
                    },
                )
