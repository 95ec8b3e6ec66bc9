"""The test kit's harness on the reference order app: its saga under a fake clock and seeded
faults keeps the order flow's own invariants (stock, payments, orders), one seed replays the
same rows byte for byte, and every message delivered twice changes nothing."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
from collections import Counter
from decimal import Decimal
from typing import Any, NamedTuple

from sagaline.clock import FakeClock
from sagaline.orders import app
from sagaline.orders.invariants import order_invariants
from sagaline.orders.inventory import set_stock
from sagaline.orders.messages import CreateOrderCommand, OrderItem
from sagaline.testing import Delivered, Faults, Harness

STOCK = {"PROD-A": 40, "PROD-B": 3}
#: Seven confirmed; two out of PROD-B (the first order of it takes two of its three units) and
#: three declined at payment, compensated.
ENDS = {"COMPLETED": 7, "COMPENSATED": 5}
#: Checked with the stock it started with: no unit appears or vanishes.
ORDERS_APP = dataclasses.replace(app, invariants=order_invariants(STOCK))
FAULTS = Faults(duplicates=0.3, crashes=0.15, flaky=0.2, flaky_times=2)
START = 1_750_000_000.0


def _orders() -> list[CreateOrderCommand]:
    """Twelve orders that take every path of the saga: confirmed, out of stock (PROD-B runs
    out), declined at payment (above the limit of 1000.00)."""
    orders = []
    for n in range(12):
        items = [OrderItem(product_id="PROD-A", quantity=1 + n % 2)]
        amount = Decimal(f"{20 + n}.50")
        if n % 4 == 1:
            items = [OrderItem(product_id="PROD-B", quantity=2)]
        elif n % 4 == 3:
            amount = Decimal("1500.00")
        orders.append(
            CreateOrderCommand(
                order_id=f"ORD-{n:03d}",
                customer_id=f"CUST-{n % 5}",
                items=items,
                total_amount=amount,
            )
        )
    return orders


class Run(NamedTuple):
    history: list[Delivered]
    counts: dict[str, int]
    violations: list[str]
    audit: str
    moved: float


def _run(seed: int, faults: Faults = FAULTS) -> Run:
    async def run() -> Run:
        clock = FakeClock(start=START)
        async with Harness(ORDERS_APP, seed=seed, faults=faults, clock=clock) as harness:
            async with harness.db.transaction() as tx:
                for product, units in STOCK.items():
                    await set_stock(tx, product, units)
            for order in _orders():
                await harness.submit(order)
            await harness.run_until_quiet()
            return Run(
                harness.history(),
                await harness.db.saga_counts(),
                [str(v) for v in await harness.check()],
                repr(await harness.audit()),
                clock.time() - START,
            )

    return asyncio.run(run())


def test_the_order_saga_under_seeded_faults_keeps_the_order_flow_s_invariants() -> None:
    run = _run(seed=11)

    assert run.violations == []
    assert run.counts == ENDS
    outcomes = Counter(d.outcome for d in run.history)
    assert outcomes["duplicate"] > 0 and outcomes["crashed"] > 0 and outcomes["retry"] > 0
    assert outcomes["dead"] == 0
    # The retries waited out their backoffs on the fake clock: it moved, the test did not wait.
    assert run.moved > 0


def test_one_seed_replays_the_order_flow_byte_for_byte() -> None:
    first, again, other = _run(seed=11), _run(seed=11), _run(seed=12)

    assert again.history == first.history
    assert again.audit == first.audit
    assert other.history != first.history
    assert other.audit != first.audit
    assert other.counts == first.counts == ENDS
    # The events' own timestamps (a body field whose default is utc_now) are the fake clock's.
    assert '"timestamp":"2025-06-15T' in first.audit


def test_every_order_message_twice_leaves_each_effect_once() -> None:
    plain = _run(seed=5, faults=Faults())
    twice = _run(seed=5, faults=Faults(twice=True))

    assert twice.violations == []
    assert twice.counts == plain.counts == ENDS
    per_message = Counter((d.consumer, d.message_id, d.outcome) for d in twice.history)
    assert set(per_message.values()) == {1}
    handled = {(c, m) for c, m, outcome in per_message if outcome == "handled"}
    absorbed = {(c, m) for c, m, outcome in per_message if outcome == "duplicate"}
    assert handled == absorbed
    assert len(handled) == sum(1 for d in plain.history if d.outcome == "handled")
    assert _stock_and_orders(twice) == _stock_and_orders(plain)


def _stock_and_orders(run: Run) -> list[tuple[str, str, Any, int]]:
    """Every document as written (its data, and its version: how often it was written): stock
    ledgers, reservations, payments, the read model. A payment's transaction id is left out:
    it is named after the message that asked for it, whose id the runs drew in another order."""
    rows: dict[str, list[tuple[Any, ...]]] = ast.literal_eval(run.audit)
    documents = []
    for namespace, key, data, version in rows["documents"]:
        fields = json.loads(data)
        fields.pop("transactionId", None)
        documents.append((namespace, key, fields, version))
    return sorted(documents, key=lambda document: document[:2])
