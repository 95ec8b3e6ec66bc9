"""The payment service: charges once per order, declines above the customer's limit, refunds
a charge the saga gave up on.

It charges through a :class:`~sagaline.orders.provider.PaymentProvider` (an outside system) with
the step's idempotency key, so that a ProcessPayment handled twice (redelivered after a crash
between the provider's answer and the commit, or retried by the saga) charges once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from sagaline import Context, Reads, Service
from sagaline.orders.messages import (
    PaymentFailedEvent,
    PaymentProcessedEvent,
    PaymentRefundedEvent,
    ProcessPaymentCommand,
    RefundPaymentCommand,
)
from sagaline.orders.provider import PaymentProvider

__all__ = [
    "PAYMENTS",
    "SETTINGS",
    "PaymentRules",
    "build_payment_service",
    "charge",
    "rules_from_settings",
    "seconds_from_settings",
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


def _payment(command: ProcessPaymentCommand | RefundPaymentCommand, reads: Reads) -> None:
    reads.document(PAYMENTS, command.order_id)


def build_payment_service(
    rules: PaymentRules | None = None, provider: PaymentProvider | None = None
) -> Service:
    """ProcessPayment answered by PaymentProcessed (with a transactionId) or PaymentFailed;
    RefundPayment by PaymentRefunded."""
    chosen = rules or PaymentRules()
    outside = provider or PaymentProvider()
    service = Service("payment")

    @service.handles(ProcessPaymentCommand, reads=_payment)
    async def process(ctx: Context, command: ProcessPaymentCommand) -> None:
        await charge(
            ctx, chosen, command.order_id, command.customer_id, command.amount, provider=outside
        )

    @service.handles(RefundPaymentCommand, reads=_payment)
    async def refund(ctx: Context, command: RefundPaymentCommand) -> None:
        existing = await ctx.tx.get_document(PAYMENTS, command.order_id)
        if existing is not None and existing.data.get("status") == "PROCESSED":
            outside.refund(str(existing.data.get("providerKey", command.order_id)))
            payment = {**existing.data, "status": "REFUNDED"}
            await ctx.tx.put_document(PAYMENTS, command.order_id, payment, existing.version)
        # Nothing charged (declined, or never asked): nothing to give back.
        ctx.publish(PaymentRefundedEvent(order_id=command.order_id))

    return service


async def charge(
    ctx: Context,
    rules: PaymentRules,
    order_id: str,
    customer_id: str,
    amount: Decimal,
    *,
    provider: PaymentProvider,
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
            # The provider is outside this unit of work: the key makes a second call (this
            # message again after a crash, or a retry of the step) return the first charge.
            key = ctx.idempotency_key
            transaction = provider.charge(key, customer_id, amount)
            payment.update(status="PROCESSED", transactionId=transaction, providerKey=key)
        else:
            payment.update(status="FAILED", reason=reason)
        await ctx.tx.put_document(PAYMENTS, order_id, payment, 0)
    if payment["status"] == "PROCESSED":
        ctx.publish(
            PaymentProcessedEvent(order_id=order_id, transaction_id=str(payment["transactionId"]))
        )
    else:
        ctx.publish(PaymentFailedEvent(order_id=order_id, reason=str(payment["reason"])))


#: The order apps' settings (``sagaline run --set payment_limit=500``).
SETTINGS = {
    "payment_limit": "payments above this amount are declined (default 1000.00)",
    "step_timeout": "seconds each step of the order saga may take before it fails (default: none)",
    "deadline": "seconds the whole order saga may take before it is compensated (default: none)",
    "payment_provider": "a file where the simulated payment provider keeps its charges",
}


def seconds_from_settings(settings: Mapping[str, str], name: str) -> float | None:
    """A setting in seconds, such as ``step_timeout`` (None when unset); ValueError when bad."""
    text = settings.get(name)
    if text is None or text == "":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, not {text!r}")
    return seconds


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
