"""The invariant checker of RELIABILITY.md for the order flow on the SQLite store and bus.

:func:`check_invariants` reads a store's final contents (event log, command queues, inbox,
subscription cursors, dead letters, saga table, the services' documents and the read model) and
returns every broken invariant as a :class:`Violation` with its evidence: stream, position,
order id, message id. It never raises for a violation; a fault test ends with
``assert not check_invariants(db)``.

Run it on a quiescent store (no worker running): a store still at work shows undelivered
messages (I9) and sagas not yet ended (I1), and the checks that compare a saga's outcome with the
services' state then report what is merely late. The only write is the scratch copy of the read
model that the rebuild of I7 makes; it is removed before the checker returns.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import System
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
from sagaline.projection import rebuild
from sagaline.saga.definition import SagaStatus

__all__ = ["Violation", "check_invariants", "check_invariants_async", "format_violations"]

_CREATED = OrderCreatedEvent.type_name()
_REJECTED = OrderRejectedEvent.type_name()
_CONFIRMED = OrderConfirmedEvent.type_name()
_CONFIRMATION_RECORDED = OrderConfirmationRecordedEvent.type_name()
_CANCELLED = OrderCancelledEvent.type_name()
_PAYMENT_PROCESSED = PaymentProcessedEvent.type_name()
_CREATE_ORDER = CreateOrderCommand.type_name()
_STOCK_FIELDS = ("available", "reserved", "sold", "stocked")


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


def check_invariants(
    db: SqliteDatabase,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant the order flow breaks in ``db``; an empty list when it keeps them all.

    ``initial_stock`` (product id to units stocked) adds the check that no unit appeared or
    vanished. ``system`` gives the subscribers whose cursors are checked (the order flow's
    services by default). Call :func:`check_invariants_async` from a running event loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop in this thread: run one
    else:
        raise RuntimeError("check_invariants() runs its own event loop: use check_invariants_async")
    return asyncio.run(check_invariants_async(db, initial_stock=initial_stock, system=system))


async def check_invariants_async(
    db: SqliteDatabase,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """The same as :func:`check_invariants`, for callers inside an event loop."""
    facts = _Facts.load(db)
    system = system or build_system()
    violations: list[Violation] = []
    violations.extend(_check_terminal(facts))
    violations.extend(_check_stock(db, facts, initial_stock))
    violations.extend(_check_exclusive(db, facts))
    violations.extend(_check_money(db, facts))
    violations.extend(_check_once(db, facts))
    violations.extend(_check_versions(db, system))
    violations.extend(await _check_read_model(db))
    violations.extend(_check_no_loss(db, facts))
    violations.extend(_check_delivered(db, system))
    return violations


# ------------------------------------------------------------------ facts


def _decode(text: str) -> Any:
    """A stored JSON document, numbers with a fraction as Decimal (as the store reads them)."""
    return json.loads(text, parse_float=Decimal)


@dataclass
class _OrderEvent:
    position: int
    stream: str | None
    message_id: str
    body: dict[str, Any]


@dataclass
class _Facts:
    """What several checks share, read once."""

    #: order id -> saga status, for instances of the order saga.
    outcomes: dict[str, str]
    #: order id -> event type -> the order's events of that type, in log order.
    events: dict[str, dict[str, list[_OrderEvent]]]

    @classmethod
    def load(cls, db: SqliteDatabase) -> _Facts:
        outcomes: dict[str, str] = {}
        for record in db.list_sagas():
            if record.definition == ORDER_SAGA.name:
                order_id = record.data.get("orderId") or record.saga_id.partition(":")[2]
                outcomes[str(order_id)] = str(record.status)
        types = (_CREATED, _CONFIRMED, _CONFIRMATION_RECORDED, _CANCELLED, _PAYMENT_PROCESSED)
        events: dict[str, dict[str, list[_OrderEvent]]] = defaultdict(lambda: defaultdict(list))
        for position, stream, message_id, type_, correlation_id, body in db.execute(
            "SELECT position, stream, message_id, type, correlation_id, body FROM events"
            f" WHERE type IN ({','.join('?' * len(types))}) ORDER BY position",
            types,
        ):
            events[correlation_id][type_].append(
                _OrderEvent(position, stream, message_id, _decode(body))
            )
        return cls(outcomes, events)

    def of(self, order_id: str, event_type: str) -> list[_OrderEvent]:
        """The order's events of one type (empty when none)."""
        by_type = self.events.get(order_id)
        return [] if by_type is None else by_type.get(event_type, [])

    def created_orders(self) -> list[str]:
        """Every order id with an OrderCreatedEvent."""
        return sorted(order_id for order_id in self.events if self.of(order_id, _CREATED))


def _documents(db: SqliteDatabase, namespace: str) -> dict[str, dict[str, Any]]:
    return {
        str(key): _decode(data)
        for key, data in db.execute(
            "SELECT key, data FROM documents WHERE namespace = ? ORDER BY key", (namespace,)
        )
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
                {"orderId": order_id, "stream": created.stream, "position": created.position},
            )


def _check_stock(
    db: SqliteDatabase, facts: _Facts, initial_stock: Mapping[str, int] | None
) -> Iterator[Violation]:
    """I2: each product's ledger balances, matches its reservations and the sagas' outcomes."""
    stocks = _documents(db, STOCK)
    reservations = _documents(db, RESERVATIONS)
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


def _check_exclusive(db: SqliteDatabase, facts: _Facts) -> Iterator[Violation]:
    """I3: no order both confirmed and cancelled; write side and read model agree with the saga."""
    rows = _documents(db, ORDER_VIEW)
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
                    "positions": [e.position for e in (*recorded, *in_stream)],
                },
            )
        if confirmed and cancelled:
            yield Violation(
                "I3",
                f"{order_id} was published as both confirmed and cancelled",
                {
                    "orderId": order_id,
                    "positions": [e.position for e in (*confirmed, *cancelled)],
                },
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


def _check_money(db: SqliteDatabase, facts: _Facts) -> Iterator[Violation]:
    """I4: one payment per order, of the order's amount; no charge of an order not confirmed.

    The order saga takes payment as its pivot and last step, so a processed payment means the
    saga completed and nothing is ever refunded: a charge of a compensated order is a loss.
    """
    payments = _documents(db, PAYMENTS)
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
        positions = [e.position for e in processed]
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


def _check_once(db: SqliteDatabase, facts: _Facts) -> Iterator[Violation]:
    """I5: at most one effect per message and per business intent."""
    for order_id in sorted(facts.events):
        created = facts.of(order_id, _CREATED)
        if len(created) > 1:
            yield Violation(
                "I5",
                f"{order_id} was created {len(created)} times",
                {"orderId": order_id, "positions": [e.position for e in created]},
            )
    for order_id, reservation in _documents(db, RESERVATIONS).items():
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
    # A handled command has its inbox mark (same transaction); an unhandled one has none.
    for command_id, queue, type_, order_id, message_id in db.execute(
        "SELECT c.id, c.queue, c.type, c.correlation_id, c.message_id FROM commands c"
        " WHERE (c.done = 1 AND c.outcome = 'handled') != EXISTS (SELECT 1 FROM inbox i"
        "  WHERE i.message_id = c.message_id AND i.consumer = c.queue)"
        " ORDER BY c.id"
    ):
        yield Violation(
            "I5",
            f"{type_} {message_id} for {order_id}: its inbox mark and its acknowledgement disagree",
            {"commandId": command_id, "queue": queue, "messageId": message_id, "orderId": order_id},
        )
    # The orchestrator sends each command of the order saga at most once per order.
    for order_id, type_, count in db.execute(
        "SELECT correlation_id, type, COUNT(*) FROM commands WHERE source = ?"
        " GROUP BY correlation_id, type HAVING COUNT(*) > 1 ORDER BY correlation_id",
        ("orchestrator",),
    ):
        yield Violation(
            "I5",
            f"the orchestrator sent {type_} {count} times for {order_id}",
            {"orderId": order_id, "type": type_, "count": count},
        )
    # A saga applies each message once: its history names each handled messageId once.
    for (saga_id,) in db.execute("SELECT saga_id FROM sagas ORDER BY saga_id"):
        record = db.get_saga_sync(saga_id)
        history = record.history if record is not None else []
        seen = Counter(str(entry.get("messageId")) for entry in history)
        for message_id, count in seen.items():
            if count > 1:
                yield Violation(
                    "I5",
                    f"saga {saga_id} applied message {message_id} {count} times",
                    {"sagaId": saga_id, "messageId": message_id},
                )
    for message_id, consumer in db.execute(
        "SELECT i.message_id, i.consumer FROM inbox i"
        " WHERE NOT EXISTS (SELECT 1 FROM commands c WHERE c.message_id = i.message_id)"
        " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.message_id = i.message_id)"
    ):
        yield Violation(
            "I5",
            f"{consumer} marked {message_id} processed, but no such message was sent",
            {"consumer": consumer, "messageId": message_id},
        )


def _check_versions(db: SqliteDatabase, system: System) -> Iterator[Violation]:
    """I6: stream versions are 1..n without gaps; no subscriber passed over an event."""
    for stream, count, low, high in db.execute(
        "SELECT stream, COUNT(*), MIN(version), MAX(version) FROM events"
        " WHERE stream IS NOT NULL GROUP BY stream"
        " HAVING MIN(version) != 1 OR MAX(version) != COUNT(*) ORDER BY stream"
    ):
        yield Violation(
            "I6",
            f"stream {stream} has {count} events with versions {low}..{high}",
            {"stream": stream, "count": count, "versions": [low, high]},
        )
    for position, stream, version in db.execute(
        "SELECT position, stream, version FROM events"
        " WHERE (stream IS NULL) != (version IS NULL) ORDER BY position"
    ):
        yield Violation(
            "I6",
            f"event at {position} has a stream without a version or a version without a stream",
            {"position": position, "stream": stream, "version": version},
        )
    # Below its cursor, every event a subscriber wants was handled (inbox) or dead-lettered.
    for name, types in _subscribers(system).items():
        for position, message_id, type_, order_id, part, cursor in db.execute(
            "SELECT e.position, e.message_id, e.type, e.correlation_id, e.part, s.position"
            " FROM events e JOIN subscriptions s ON s.subscriber = ? AND s.part = e.part"
            f" WHERE e.position <= s.position AND e.type IN ({','.join('?' * len(types))})"
            " AND NOT EXISTS (SELECT 1 FROM inbox i"
            "  WHERE i.message_id = e.message_id AND i.consumer = ?)"
            " AND NOT EXISTS (SELECT 1 FROM dead_letters d"
            "  WHERE d.message_id = e.message_id AND d.consumer = ?)"
            " ORDER BY e.position",
            (name, *types, name, name),
        ):
            yield Violation(
                "I6",
                f"subscriber {name} moved past {type_} at {position} without handling it",
                {
                    "subscriber": name,
                    "position": position,
                    "partition": part,
                    "cursor": cursor,
                    "messageId": message_id,
                    "orderId": order_id,
                },
            )


async def _check_read_model(db: SqliteDatabase) -> list[Violation]:
    """I7: the order read model equals a fresh rebuild from the event log."""
    shadow = await rebuild(db, build_order_projection(), swap=False)
    try:
        rebuilt = _documents(db, shadow)
        live = _documents(db, ORDER_VIEW)
    finally:
        async with db.transaction() as tx:
            await tx.delete_namespace(shadow)
    violations = []
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


def _check_no_loss(db: SqliteDatabase, facts: _Facts) -> Iterator[Violation]:
    """I8: every handled command caused an event; every failed one is a recorded dead letter."""
    caused: dict[str, set[str]] = defaultdict(set)
    for causation_id, type_ in db.execute(
        "SELECT causation_id, type FROM events WHERE causation_id IS NOT NULL"
    ):
        caused[causation_id].add(type_)
    dead = {
        (consumer, message_id)
        for consumer, message_id in db.execute("SELECT consumer, message_id FROM dead_letters")
    }
    for command_id, queue, type_, order_id, message_id, outcome in db.execute(
        "SELECT id, queue, type, correlation_id, message_id, outcome FROM commands"
        " WHERE done = 1 ORDER BY id"
    ):
        evidence = {
            "commandId": command_id,
            "queue": queue,
            "type": type_,
            "orderId": order_id,
            "messageId": message_id,
        }
        if outcome == "dead":
            if (queue, message_id) not in dead:
                yield Violation(
                    "I8", f"{type_} for {order_id} failed without a dead letter", evidence
                )
            continue
        answers = caused.get(message_id, set())
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
                {"orderId": order_id, "position": created.position, "stream": created.stream},
            )


def _check_delivered(db: SqliteDatabase, system: System) -> Iterator[Violation]:
    """I9: every message on the bus was delivered: no command pending, no subscriber behind.

    With the bus in the store's database, the bus tables are the outbox: a message is published
    when its row commits, and delivered when its consumer acknowledged it.
    """
    for command_id, queue, type_, order_id, attempts, error in db.execute(
        "SELECT id, queue, type, correlation_id, attempts, last_error FROM commands"
        " WHERE done = 0 ORDER BY id"
    ):
        yield Violation(
            "I9",
            f"{type_} for {order_id} is still pending on queue {queue}",
            {
                "commandId": command_id,
                "queue": queue,
                "orderId": order_id,
                "attempts": attempts,
                "lastError": error,
            },
        )
    for name, types in _subscribers(system).items():
        for part, count, first in db.execute(
            "SELECT e.part, COUNT(*), MIN(e.position) FROM events e"
            " LEFT JOIN subscriptions s ON s.subscriber = ? AND s.part = e.part"
            f" WHERE e.type IN ({','.join('?' * len(types))})"
            " AND (s.position IS NULL OR e.position > s.position)"
            " GROUP BY e.part ORDER BY e.part",
            (name, *types),
        ):
            yield Violation(
                "I9",
                f"subscriber {name} has {count} undelivered event(s) in partition {part}",
                {"subscriber": name, "partition": part, "position": first, "count": count},
            )


def _subscribers(system: System) -> dict[str, list[str]]:
    """Subscriber name -> the event types it consumes."""
    return {
        service.name: sorted(service.event_handlers)
        for service in system.services.values()
        if service.event_handlers
    }
