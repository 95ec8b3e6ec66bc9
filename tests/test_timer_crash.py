"""Timers survive a SIGKILL: set by a worker that is then killed while it fires them, they fire
once after the restart. The order flow runs without its payment service and a one-second step
timeout: every payment times out, the orders are cancelled, and when payment comes back the late
charges are refunded. The invariants of RELIABILITY.md hold over the store afterwards.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter

from conftest import OrderStore, ServiceProcesses

from sagaline.orders.checks import check_invariants
from sagaline.orders.read import ORDER_VIEW
from sagaline.testing import format_violations

ORDERS = 30
INITIAL_STOCK = {"PROD-A": 300, "PROD-B": 10}
TIMEOUT = 60.0
WITHOUT_PAYMENT = ["--services", "order,inventory,orchestrator,read"]
TIMED = ["--set", "step_timeout=1", *WITHOUT_PAYMENT]


def cancelled_when_all_ended(
    order_store: OrderStore,
    service_processes: ServiceProcesses,
    worker: subprocess.Popen[bytes],
    sagas: int,
) -> dict[str, str]:
    """Wait until ``sagas`` sagas ended, stop ``worker``; each cancelled order's reason."""
    service_processes.wait_for(
        lambda: order_store.ended_sagas() == sagas,
        timeout=TIMEOUT,
        what="every saga ended",
        alive=[worker],
    )
    assert service_processes.stop(worker) == 0, service_processes.output(worker)
    return {
        row["orderId"]: row["reason"]
        for row in order_store.db.sync.query_documents(ORDER_VIEW)
        if row["status"] == "CANCELLED"
    }


def test_timers_set_before_a_sigkill_fire_once_after_the_restart(
    order_store: OrderStore, service_processes: ServiceProcesses
) -> None:
    order_store.stock(INITIAL_STOCK)
    order_store.submit(order_store.mix(0, ORDERS))
    # The worker sets a timer per payment it asks for, then dies as it fires the first ones.
    doomed = service_processes.start(
        order_store.path, crash_at="timers-before-commit:1", lease_seconds=2, options=TIMED
    )
    assert service_processes.wait_exit(doomed, TIMEOUT) == -signal.SIGKILL
    waiting = order_store.db.sync.execute("SELECT count(*) FROM timers")[0][0]
    assert waiting > 0, "the timers were lost with the process"

    worker = service_processes.start(order_store.path, lease_seconds=2, options=TIMED)
    # (The payments asked for stay queued: their service is not running.)
    cancelled = cancelled_when_all_ended(order_store, service_processes, worker, ORDERS)
    timed_out = [r for r in cancelled.values() if "timed out after 1 s" in r]
    assert timed_out, cancelled
    # Each timer fired once: one message per timer id on the log, none left set.
    fired = Counter(
        row[0]
        for row in order_store.db.sync.execute(
            "SELECT message_id FROM events WHERE type = 'SagaTimerFired'"
        )
    )
    assert fired and set(fired.values()) == {1}, fired
    assert order_store.db.sync.execute("SELECT count(*) FROM timers")[0][0] == 0

    # Payment comes back: what it charges now, for orders already cancelled, is refunded.
    everything = service_processes.start(order_store.path, lease_seconds=2)
    service_processes.wait_for(
        lambda: order_store.settled(ORDERS),
        timeout=TIMEOUT,
        what="payment's backlog handled",
        alive=[everything],
    )
    assert service_processes.stop(everything) == 0, service_processes.output(everything)
    violations = asyncio.run(check_invariants(order_store.db, initial_stock=INITIAL_STOCK))
    assert not violations, format_violations(violations)
    counts = dict(
        order_store.db.sync.execute(
            "SELECT type, count(*) FROM events WHERE type IN"
            " ('PaymentProcessedEvent', 'PaymentFailedEvent', 'PaymentRefundedEvent')"
            " GROUP BY type"
        )
    )
    # Every late charge refunded; the late declines (above the limit) had nothing to refund.
    assert counts["PaymentRefundedEvent"] == counts["PaymentProcessedEvent"] > 0
    assert counts["PaymentProcessedEvent"] + counts["PaymentFailedEvent"] == len(timed_out)


def test_the_deadline_setting_cancels_the_orders_that_outlast_it(
    order_store: OrderStore, service_processes: ServiceProcesses
) -> None:
    """`sagaline run --set deadline=1` without the payment service: every order is cancelled
    when its saga's deadline passes, with a reason that says so, and nothing stays set."""
    order_store.stock(INITIAL_STOCK)
    order_store.submit(order_store.mix(0, 5))
    worker = service_processes.start(
        order_store.path, options=["--set", "deadline=1", *WITHOUT_PAYMENT]
    )
    reasons = cancelled_when_all_ended(order_store, service_processes, worker, 5)
    # Each of the five has its stock and waits for its payment in vain.
    assert len(reasons) == 5, reasons
    assert all("the saga's deadline of 1 s passed" in r for r in reasons.values()), reasons
    assert order_store.db.sync.execute("SELECT count(*) FROM timers")[0][0] == 0
