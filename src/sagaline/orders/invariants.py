"""The order flow's own invariants (RELIABILITY.md I2 stock, I3 exclusive, I4 money, and the
order rules of I5 and I8), registered on the order apps as ``App.invariants``.

The test kit (:mod:`sagaline.testing`) checks what any app keeps (every start event has its saga
and every saga ended, each message handled once, streams without gaps, read model equal to a
rebuild, nothing lost or undelivered) and then these, over the same snapshot of the stores: each
product's stock ledger balances and matches the reservations and the sagas' outcomes; no order is
both confirmed and cancelled; one payment per order, of its amount, and none for an order not
confirmed; one creation and one reservation per order; each message one answer; each command of
the saga sent once per order; each CreateOrderCommand created or rejected its order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sagaline import (
    Invariant,
    MessageDeadLettered,
    SagaActionRequested,
    SagaStatus,
    SagaTimerFired,
)
from sagaline.orders.inventory import RESERVATIONS, STOCK
from sagaline.orders.messages import (
    CreateOrderCommand,
    OrderCancelledEvent,
    OrderConfirmationRecordedEvent,
    OrderConfirmedEvent,
    OrderCreatedEvent,
    OrderRejectedEvent,
    PaymentProcessedEvent,
    PaymentRefundedEvent,
)
from sagaline.orders.payment import PAYMENTS
from sagaline.orders.read import ORDER_VIEW
from sagaline.orders.saga import ORDER_SAGA
from sagaline.testing.invariants import (
    CLIENT_SOURCE,
    HANDLED,
    AuditCommand,
    AuditEvent,
    AuditSnapshot,
    Violation,
)

__all__ = ["ORDER_ANSWERS", "order_invariants"]

_CREATED = OrderCreatedEvent.type_name()
_REJECTED = OrderRejectedEvent.type_name()
_CONFIRMED = OrderConfirmedEvent.type_name()
_CONFIRMATION_RECORDED = OrderConfirmationRecordedEvent.type_name()
_CANCELLED = OrderCancelledEvent.type_name()
_PAYMENT_PROCESSED = PaymentProcessedEvent.type_name()
_PAYMENT_REFUNDED = PaymentRefundedEvent.type_name()
_FRAMEWORK_NOTICES = {
    SagaTimerFired.type_name(),
    SagaActionRequested.type_name(),
    MessageDeadLettered.type_name(),
}
_CREATE_ORDER = CreateOrderCommand.type_name()
_STOCK_FIELDS = ("available", "reserved", "sold", "stocked")

#: The events that answer what clients submit: how the test kit finds, in a deployment with a
#: database per service, the CreateOrderCommands no outbox holds.
ORDER_ANSWERS: Mapping[str, tuple[str, ...]] = {_CREATE_ORDER: (_CREATED, _REJECTED)}


def order_invariants(initial_stock: Mapping[str, int] | None = None) -> tuple[Invariant, ...]:
    """The order flow's invariants, as ``App.invariants``.

    ``initial_stock`` (product id to units stocked) adds the check that no unit appeared or
    vanished; without it, each ledger is checked against itself and the reservations.
    """

    def check_orders(snapshot: AuditSnapshot) -> Iterator[Violation]:
        facts = _Facts.load(snapshot)
        yield from _check_stock(snapshot, facts, initial_stock)
        yield from _check_exclusive(snapshot, facts)
        yield from _check_money(snapshot, facts)
        yield from _check_once(snapshot, facts)
        yield from _check_no_loss(snapshot, facts)

    return (check_orders,)


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
        types = {
            _CREATED,
            _CONFIRMED,
            _CONFIRMATION_RECORDED,
            _CANCELLED,
            _PAYMENT_PROCESSED,
            _PAYMENT_REFUNDED,
        }
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
    """I4: one payment per order, of the order's amount; no charge kept of an order not
    confirmed.

    The order saga takes payment as its pivot and last step, so a processed payment means the
    saga completed, unless the payment came after its step timed out: then the saga compensated
    and the charge must be refunded. A charge kept by a compensated order is a loss.
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
        if payment.get("status") == "REFUNDED" and outcome == SagaStatus.COMPLETED:
            yield Violation(
                "I4",
                f"{order_id} was refunded, but its saga completed",
                {**evidence, "saga": outcome},
            )
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
        refunded = facts.of(order_id, _PAYMENT_REFUNDED)
        if facts.outcomes.get(order_id) == SagaStatus.COMPENSATED and not refunded:
            yield Violation(
                "I4",
                f"{order_id} was charged (PaymentProcessedEvent) but its saga compensated and"
                " nothing was refunded",
                {"orderId": order_id, "positions": positions},
            )
        transactions = {e.body.get("transactionId") for e in processed}
        kept = "REFUNDED" if refunded else "PROCESSED"
        if payment.get("status") != kept or transactions != {payment.get("transactionId")}:
            yield Violation(
                "I4",
                f"{order_id}: PaymentProcessedEvent transactions {sorted(map(str, transactions))}"
                f" do not match its one payment ({payment.get('status')},"
                f" {payment.get('transactionId')})",
                {"orderId": order_id, "positions": positions},
            )


def _check_once(snapshot: AuditSnapshot, facts: _Facts) -> Iterator[Violation]:
    """I5: one creation and one reservation per order, one answer per message, each command of
    the order saga sent once per order."""
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
    sent_by: list[AuditEvent | AuditCommand] = [*snapshot.events, *snapshot.commands]
    # Each handling in the order system sends one message (an answer, the saga's next command, a
    # confirmation): two caused by one message from one consumer (both OrderCreatedEvent and
    # OrderRejectedEvent for one CreateOrderCommand) mean the message was handled twice. What
    # sagaline itself sends besides (a timer a handling set, fired later; the notice of a dead
    # letter) is not an answer.
    answers: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for message in sent_by:
        if message.type in _FRAMEWORK_NOTICES:
            continue
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


def _check_no_loss(snapshot: AuditSnapshot, facts: _Facts) -> Iterator[Violation]:
    """I8: each handled CreateOrderCommand created or rejected its order, in the order's stream.

    (A handled command that caused no event at all is the kit's own I8 violation.)
    """
    caused: dict[str, set[str]] = defaultdict(set)
    for event in snapshot.events:
        if event.causation_id is not None:
            caused[event.causation_id].add(event.type)
    for command in snapshot.commands:
        if command.state != HANDLED or command.type != _CREATE_ORDER:
            continue
        answers = caused.get(command.message_id, set())
        if answers and not answers & {_CREATED, _REJECTED}:
            yield Violation(
                "I8",
                f"{command.type} for {command.correlation_id} was handled but neither created nor"
                " rejected the order",
                {
                    "commandId": command.id,
                    "queue": command.queue,
                    "type": command.type,
                    "orderId": command.correlation_id,
                    "messageId": command.message_id,
                },
            )
    for order_id in facts.created_orders():
        created = facts.of(order_id, _CREATED)[0]
        if created.stream != f"Order-{order_id}":
            yield Violation(
                "I8",
                f"OrderCreatedEvent of {order_id} is not in its order's stream",
                {"orderId": order_id, "position": created.at, "stream": created.stream},
            )
