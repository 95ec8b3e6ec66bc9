"""The test kit's harness with saga timers: the order app with a timeout on every step, its
payment service failing past that timeout. On the fake clock the payments time out, the orders
are cancelled, and the charges made when payment recovers are refunded; the order flow's
invariants hold, and one seed replays the same rows, timers included. No test sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import NamedTuple

from sagaline.clock import FakeClock
from sagaline.orders import app
from sagaline.orders.invariants import order_invariants
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.testing import Faults, Harness

STOCK = {"PROD-A": 40}
ORDERS_APP = dataclasses.replace(app, invariants=order_invariants(STOCK))
#: Every ProcessPayment fails its first three deliveries: its retries (0.05 s, 0.1 s, 0.2 s) take
#: longer than the step's timeout of a tenth of a second.
SLOW_PAYMENT = Faults(failing={"ProcessPaymentCommand": 3})


class Run(NamedTuple):
    counts: dict[str, int]
    violations: list[str]
    reasons: list[str]
    refunds: int
    audit: str


def _run(seed: int) -> Run:
    async def run() -> Run:
        clock = FakeClock(start=1_750_000_000.0)
        harness = Harness(
            ORDERS_APP,
            seed=seed,
            faults=SLOW_PAYMENT,
            clock=clock,
            settings={"step_timeout": "0.1"},
        )
        async with harness:
            async with harness.db.transaction() as tx:
                await set_stock(tx, "PROD-A", STOCK["PROD-A"])
            for n in range(4):
                await harness.submit(
                    CreateOrderCommand(
                        order_id=f"ORD-{n}",
                        customer_id="CUST-1",
                        items=[OrderItem(product_id="PROD-A", quantity=1)],
                        total_amount=Decimal("10.00"),
                    )
                )
            await harness.run_until_quiet()
            reasons = sorted(
                str(row["reason"])
                for row in await harness.db.query_documents("read.order")
                if row["status"] == "CANCELLED"
            )
            refunds = sum(1 for d in harness.history() if d.message_type == "RefundPaymentCommand")
            return Run(
                await harness.db.saga_counts(),
                [str(v) for v in await harness.check()],
                reasons,
                refunds,
                repr(await harness.audit()),
            )

    return asyncio.run(run())


def test_payments_that_outlast_their_timeout_are_cancelled_and_refunded() -> None:
    run = _run(seed=3)
    assert run.violations == []
    assert run.counts == {"COMPENSATED": 4}
    assert run.reasons == ["Payment failed: step process_payment timed out after 0.1 s"] * 4
    assert run.refunds == 4


def test_one_seed_replays_the_timers_too() -> None:
    first, again = _run(seed=3), _run(seed=3)
    assert again.audit == first.audit
