"""The reference system of the seed: order write, inventory, payment, the saga, order read."""

from __future__ import annotations

from collections.abc import Mapping

from sagaline import App, Orchestrator, System
from sagaline.orders.invariants import ORDER_ANSWERS, order_invariants
from sagaline.orders.inventory import build_inventory_service
from sagaline.orders.messages import MESSAGES, CreateOrderCommand
from sagaline.orders.order import build_order_service
from sagaline.orders.payment import (
    SETTINGS,
    PaymentRules,
    build_payment_service,
    rules_from_settings,
    seconds_from_settings,
)
from sagaline.orders.provider import PaymentProvider
from sagaline.orders.read import build_order_projection
from sagaline.orders.saga import ORDER_SAGA, order_saga

__all__ = [
    "ORDER_SAGA",
    "SERVICE_NAMES",
    "SUBSCRIBER_NAMES",
    "PaymentRules",
    "app",
    "build_system",
]

#: The five services, in the order the CLI lists them.
SERVICE_NAMES = ("order", "inventory", "payment", "orchestrator", "read")
#: The services that subscribe to events, each with its cursor on the log.
SUBSCRIBER_NAMES = ("order", "inventory", "orchestrator", "read")


def build_system(
    payment_rules: PaymentRules | None = None,
    *,
    step_timeout: float | None = None,
    deadline: float | None = None,
    provider: PaymentProvider | None = None,
) -> System:
    """The five services of the order flow, wired for one bus.

    Clients may submit a ``CreateOrderCommand`` and nothing else: reserving, paying, cancelling,
    releasing and refunding are the saga's own commands, and every event is a service's.
    ``step_timeout`` gives each step of the saga that many seconds, ``deadline`` the whole saga;
    ``provider`` is the payment provider charged (one in memory by default).
    """
    return System(
        [
            build_order_service(),
            build_inventory_service(),
            build_payment_service(payment_rules, provider),
            Orchestrator([order_saga(step_timeout, deadline)]).service,
            build_order_projection().service(),
        ],
        accepts=[CreateOrderCommand],
    )


def _from_settings(settings: Mapping[str, str]) -> System:
    provider = settings.get("payment_provider")
    return build_system(
        rules_from_settings(settings),
        step_timeout=seconds_from_settings(settings, "step_timeout"),
        deadline=seconds_from_settings(settings, "deadline"),
        provider=PaymentProvider(provider) if provider else None,
    )


#: The order system as an app: what ``sagaline`` runs when no other app is named.
app = App(
    name="orders",
    build=_from_settings,
    projections=(build_order_projection(),),
    commands="sagaline.orders.cli:commands",
    description="The seed's order flow: order write, inventory, payment, the saga, order read.",
    settings=SETTINGS,
    messages=MESSAGES,
    invariants=order_invariants(),
    answers=ORDER_ANSWERS,
)
