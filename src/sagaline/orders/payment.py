"""The payment service: charges once per order, declines above the customer's limit."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from sagaline.handling import Context, Service
from sagaline.orders.messages import (
    PaymentFailedEvent,
    PaymentProcessedEvent,
    ProcessPaymentCommand,
)
from sagaline.ports import Reads

__all__ = [
    "PAYMENTS",
    "SETTINGS",
    "PaymentRules",
    "build_payment_service",
    "charge",
    "rules_from_settings",
]

PAYMENTS = "payment.payment"


@dataclass(frozen=True)
class PaymentRules:
    """Which payments are declined: any above the customer's limit (or the default limit)."""

    default_limit: Decimal = Decimal("1000.00")
    limits: Mapping[str, Decimal] = field(default_factory=dict)

    def decline_reason(self, customer_id: str, amount: Decimal) -> str | None:
        """Why a payment is declined, or None when it goes through."""
        limit = self.limits.get(customer_id, self.default_limit)
        if amount > limit:
            return f"Payment declined: {amount} exceeds the limit of {limit} for {customer_id}"
        return None


def _payment(command: ProcessPaymentCommand, reads: Reads) -> None:
    reads.document(PAYMENTS, command.order_id)


def build_payment_service(rules: PaymentRules | None = None) -> Service:
    """ProcessPayment answered by PaymentProcessed (with a transactionId) or PaymentFailed."""
    chosen = rules or PaymentRules()
    service = Service("payment")

    @service.handles(ProcessPaymentCommand, reads=_payment)
    async def process(ctx: Context, command: ProcessPaymentCommand) -> None:
        await charge(ctx, chosen, command.order_id, command.customer_id, command.amount)

    return service


async def charge(
    ctx: Context, rules: PaymentRules, order_id: str, customer_id: str, amount: Decimal
) -> None:
    """Charge the order once (or decline it under ``rules``) and answer PaymentProcessed or
    PaymentFailed; an order charged or declined before is answered the same way again."""
    existing = await ctx.tx.get_document(PAYMENTS, order_id)
    if existing is not None:
        # The same intent again: answer as before, never charge twice.
        payment = existing.data
    else:
        reason = rules.decline_reason(customer_id, amount)
        payment = {"orderId": order_id, "customerId": customer_id, "amount": amount}
        if reason is None:
            payment.update(status="PROCESSED", transactionId=_transaction_id(ctx))
        else:
            payment.update(status="FAILED", reason=reason)
        await ctx.tx.put_document(PAYMENTS, order_id, payment, 0)
    if payment["status"] == "PROCESSED":
        ctx.publish(
            PaymentProcessedEvent(order_id=order_id, transaction_id=str(payment["transactionId"]))
        )
    else:
        ctx.publish(PaymentFailedEvent(order_id=order_id, reason=str(payment["reason"])))


def _transaction_id(ctx: Context) -> str:
    """The id of the charge asked for by the message being handled: named after that message,
    it is as unique as the message's id, and a run that replays the ids (the test kit's
    harness, under one seed) replays it too."""
    digest = hashlib.sha256(ctx.envelope.message_id.encode()).hexdigest()
    return f"TRN-{digest[:12].upper()}"


#: The order apps' settings (``sagaline run --set payment_limit=500``).
SETTINGS = {"payment_limit": "payments above this amount are declined (default 1000.00)"}


def rules_from_settings(settings: Mapping[str, str]) -> PaymentRules:
    """The payment rules an app's settings ask for; ValueError naming a bad setting."""
    limit = settings.get("payment_limit")
    if limit is None:
        return PaymentRules()
    try:
        amount = Decimal(limit)
    except InvalidOperation:
        raise ValueError(
            f"payment_limit must be a decimal amount such as 1000.00, not {limit!r}"
        ) from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"payment_limit must be a finite, non-negative amount, not {limit!r}")
    return PaymentRules(default_limit=amount)
