"""The order flow as a choreography: each service reacts to the others' events, no orchestrator.

The services, their business rules and the messages are the orchestrated flow's; only who
decides what happens next changes. Each service subscribes to the events that trigger it and
calls the same function its command handler calls (so the same idempotency on business keys):

* inventory reserves the order's items when it hears OrderCreated (InventoryReserved or
  InventoryReservationFailed);
* payment keeps the terms of each OrderCreated and charges them when it hears InventoryReserved
  (PaymentProcessed or PaymentFailed);
* the order service publishes OrderConfirmed when it hears PaymentProcessed, and records it in
  the order's stream when it hears it back, as in the orchestrated flow; it cancels the order
  (OrderCancelled, with the orchestrated flow's reason) when it hears InventoryReservationFailed
  or PaymentFailed;
* inventory releases the order's reservation when it hears OrderCancelled (InventoryReleased),
  and sells it when it hears OrderConfirmed;
* the read model follows OrderCreated, OrderConfirmed and OrderCancelled, as before.

The compensations are the orchestrated flow's (cancel the order, release its reservation) but
they run in the order the events cause them: the order is cancelled first, then inventory
releases. A passive :class:`~sagaline.saga.monitor.SagaMonitor` follows the events of the same
:data:`~sagaline.orders.saga.ORDER_SAGA` definition the orchestrator runs and keeps each order's
saga record. Its service keeps the name ``orchestrator``: the name says where a deployment keeps
the saga records (the service's store, schema ``sagaline_orchestrator``), so ``sagaline sagas``,
``sagaline trace`` and the invariant checks find them the same way for both styles.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from sagaline import App, Context, Reads, SagaMonitor, Service, System
from sagaline.orders.invariants import ORDER_ANSWERS, order_invariants
from sagaline.orders.inventory import (
    RESERVATIONS,
    STOCK,
    release_order,
    reserve_order,
    sell_order,
)
from sagaline.orders.messages import (
    MESSAGES,
    CreateOrderCommand,
    InventoryReservationFailedEvent,
    InventoryReservedEvent,
    OrderCancelledEvent,
    OrderConfirmedEvent,
    OrderCreatedEvent,
    PaymentFailedEvent,
    PaymentProcessedEvent,
)
from sagaline.orders.order import (
    Order,
    OrderStatus,
    build_order_service,
    cancel_order,
    record_confirmation,
)
from sagaline.orders.payment import (
    PAYMENTS,
    SETTINGS,
    PaymentRules,
    charge,
    rules_from_settings,
)
from sagaline.orders.provider import PaymentProvider
from sagaline.orders.read import build_order_projection
from sagaline.orders.saga import ORDER_SAGA, cancellation_reason

__all__ = ["PAYMENT_TERMS", "SAGA_SERVICE", "app", "build_choreography_system"]

log = logging.getLogger("sagaline.orders.choreography")

#: The payment service's copy of each order's terms (customer, amount), kept from OrderCreated
#: until InventoryReserved asks for the charge: that event carries only the order id.
PAYMENT_TERMS = "payment.terms"

#: The service that keeps the saga records: the monitor here, the orchestrator when orchestrated.
SAGA_SERVICE = "orchestrator"


class TermsNotKnownYet(LookupError):
    """InventoryReserved came before the OrderCreated it answers; retried until that arrives."""


def build_choreography_system(payment_rules: PaymentRules | None = None) -> System:
    """The five services of the order flow run as a choreography, wired for one bus.

    As with :func:`~sagaline.orders.build_system`, clients may submit a ``CreateOrderCommand``
    and nothing else; here no service sends a command at all.
    """
    return System(
        [
            _order_service(),
            _inventory_service(),
            _payment_service(payment_rules or PaymentRules()),
            SagaMonitor([ORDER_SAGA], name=SAGA_SERVICE).service,
            build_order_projection().service(),
        ],
        accepts=[CreateOrderCommand],
    )


# ------------------------------------------------------------------- order


def _order_stream(
    event: PaymentProcessedEvent
    | InventoryReservationFailedEvent
    | PaymentFailedEvent
    | OrderConfirmedEvent,
    reads: Reads,
) -> None:
    reads.stream(Order.stream_name(event.order_id))


def _order_service() -> Service:
    seed = build_order_service()
    service = Service("order")
    create = CreateOrderCommand.type_name()
    # Creating an order is the client's command, handled as in the orchestrated flow.
    service.handles(CreateOrderCommand, reads=seed.reads.get(create))(seed.command_handlers[create])

    @service.subscribes(PaymentProcessedEvent, reads=_order_stream)
    async def payment_processed(ctx: Context, event: PaymentProcessedEvent) -> None:
        order = await ctx.load(Order, event.order_id)
        if order.status != OrderStatus.PENDING:
            log.error("cannot confirm %s: it is %s", order.id, order.status)
            return
        ctx.publish(OrderConfirmedEvent(order_id=event.order_id))

    @service.subscribes(OrderConfirmedEvent, reads=_order_stream)
    async def order_confirmed(ctx: Context, event: OrderConfirmedEvent) -> None:
        await record_confirmation(ctx, event.order_id)

    @service.subscribes(InventoryReservationFailedEvent, PaymentFailedEvent, reads=_order_stream)
    async def step_failed(
        ctx: Context, event: InventoryReservationFailedEvent | PaymentFailedEvent
    ) -> None:
        step = (
            "reserve_inventory"
            if isinstance(event, InventoryReservationFailedEvent)
            else "process_payment"
        )
        await cancel_order(ctx, event.order_id, cancellation_reason(step, event.reason))

    return service


# --------------------------------------------------------------- inventory


def _reservation_and_stock(event: OrderCreatedEvent, reads: Reads) -> None:
    reads.document(RESERVATIONS, event.order_id)
    for item in event.items:
        reads.document(STOCK, item.product_id)


def _reservation(event: OrderCancelledEvent | OrderConfirmedEvent, reads: Reads) -> None:
    reads.document(RESERVATIONS, event.order_id)


def _inventory_service() -> Service:
    service = Service("inventory")

    @service.subscribes(OrderCreatedEvent, reads=_reservation_and_stock)
    async def order_created(ctx: Context, event: OrderCreatedEvent) -> None:
        await reserve_order(ctx, event.order_id, event.items)

    @service.subscribes(OrderCancelledEvent, reads=_reservation)
    async def order_cancelled(ctx: Context, event: OrderCancelledEvent) -> None:
        await release_order(ctx, event.order_id)

    @service.subscribes(OrderConfirmedEvent, reads=_reservation)
    async def order_confirmed(ctx: Context, event: OrderConfirmedEvent) -> None:
        await sell_order(ctx, event.order_id)

    return service


# ----------------------------------------------------------------- payment


def _terms(event: OrderCreatedEvent, reads: Reads) -> None:
    reads.document(PAYMENT_TERMS, event.order_id)


def _terms_and_payment(event: InventoryReservedEvent, reads: Reads) -> None:
    reads.document(PAYMENT_TERMS, event.order_id)
    reads.document(PAYMENTS, event.order_id)


def _payment_service(rules: PaymentRules) -> Service:
    service = Service("payment")
    provider = PaymentProvider()

    @service.subscribes(OrderCreatedEvent, reads=_terms)
    async def order_created(ctx: Context, event: OrderCreatedEvent) -> None:
        if await ctx.tx.get_document(PAYMENT_TERMS, event.order_id) is None:
            terms = {
                "orderId": event.order_id,
                "customerId": event.customer_id,
                # As text: the charge (and a decline's reason) shows the order's own scale.
                "amount": str(event.total_amount),
            }
            await ctx.tx.put_document(PAYMENT_TERMS, event.order_id, terms, 0)

    @service.subscribes(InventoryReservedEvent, reads=_terms_and_payment)
    async def inventory_reserved(ctx: Context, event: InventoryReservedEvent) -> None:
        terms = await ctx.tx.get_document(PAYMENT_TERMS, event.order_id)
        if terms is None:
            # Both events travel in the order's partition, so this takes a bus that reorders
            # them; failing retries the event once the order's terms are here.
            raise TermsNotKnownYet(f"the terms of {event.order_id} have not arrived yet")
        await charge(
            ctx,
            rules,
            event.order_id,
            str(terms.data["customerId"]),
            Decimal(str(terms.data["amount"])),
            provider=provider,
        )

    return service


#: The order flow as a choreography, as an app: ``sagaline --app
#: sagaline.orders.choreography:app run``.
app = App(
    name="orders-choreography",
    build=lambda settings: build_choreography_system(rules_from_settings(settings)),
    projections=(build_order_projection(),),
    commands="sagaline.orders.cli:commands",
    description="The seed's order flow as a choreography, followed by a saga monitor.",
    # A choreography has no orchestrator to time its steps: only the payment rules apply.
    settings={"payment_limit": SETTINGS["payment_limit"]},
    messages=MESSAGES,
    invariants=order_invariants(),
    answers=ORDER_ANSWERS,
)
