"""A property of the order saga under any schedule of faults (hypothesis): messages delivered in
any order, twice, late or never (dead-lettered), timeouts firing whenever the clock allows.

The saga's state machine runs against a model of the order app's services (each idempotent, as
the real ones are). Whatever the schedule, once everything is delivered: the saga ended
COMPLETED, COMPENSATED or STUCK, it ended once (a final status never changes), and the world is
consistent with how it ended: a completed order is paid and holds its stock; a compensated one
is cancelled, holds no stock and keeps no charge (a charge that came late was refunded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sagaline.messages import Command, Event
from sagaline.orders.messages import (
    CancelOrderCommand,
    InventoryReleasedEvent,
    InventoryReservationFailedEvent,
    InventoryReservedEvent,
    OrderCancelledEvent,
    OrderCreatedEvent,
    OrderItem,
    PaymentFailedEvent,
    PaymentProcessedEvent,
    PaymentRefundedEvent,
    ProcessPaymentCommand,
    RefundPaymentCommand,
    ReleaseInventoryCommand,
    ReserveInventoryCommand,
)
from sagaline.orders.saga import order_saga
from sagaline.ports import SagaRecord
from sagaline.saga import SagaStatus, SagaView
from sagaline.saga.state import Transition, advance, on_dead_letter, on_timer

SAGA = order_saga(step_timeout=10)
ORDER = "ORD-P"
FINAL = {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.STUCK}


@dataclass
class World:
    """The order app's services as a model: what they did, and what they answer."""

    in_stock: bool
    pays: bool
    reserved: bool = False
    charged: bool = False
    refunded: bool = False
    cancelled: bool = False

    def handle(self, command: Command) -> Event:
        """Handle ``command`` (again, perhaps) and answer as the service would."""
        if isinstance(command, ReserveInventoryCommand):
            if self.in_stock and not self.cancelled:
                self.reserved = True
                return InventoryReservedEvent(order_id=ORDER)
            return InventoryReservationFailedEvent(order_id=ORDER, reason="Insufficient stock")
        if isinstance(command, ReleaseInventoryCommand):
            self.reserved = False
            return InventoryReleasedEvent(order_id=ORDER)
        if isinstance(command, ProcessPaymentCommand):
            if self.pays:
                self.charged = True
                return PaymentProcessedEvent(order_id=ORDER, transaction_id="TRN-1")
            return PaymentFailedEvent(order_id=ORDER, reason="Payment declined")
        if isinstance(command, RefundPaymentCommand):
            self.refunded = self.charged
            return PaymentRefundedEvent(order_id=ORDER)
        assert isinstance(command, CancelOrderCommand)
        self.cancelled = True
        return OrderCancelledEvent(order_id=ORDER, reason=command.reason)


SERVICE: dict[type[Command], str] = {
    ReserveInventoryCommand: "inventory",
    ReleaseInventoryCommand: "inventory",
    ProcessPaymentCommand: "payment",
    RefundPaymentCommand: "payment",
    CancelOrderCommand: "order",
}
STEP: dict[type[Command], tuple[str, bool]] = {
    ReserveInventoryCommand: ("reserve_inventory", False),
    ReleaseInventoryCommand: ("reserve_inventory", True),
    ProcessPaymentCommand: ("process_payment", False),
    RefundPaymentCommand: ("process_payment", True),
    CancelOrderCommand: ("create_order", True),
}


@dataclass
class Run:
    """One saga instance, the messages in flight and the timers set, driven step by step.

    As on sagaline's buses, each service takes its commands of one order in the order they were
    sent, and the orchestrator reads the events in the order they were published; any of them
    may come again (an at-least-once delivery), and a command may be dead-lettered instead.
    """

    world: World
    record: SagaRecord | None = None
    now: float = 0.0
    queues: dict[str, list[Command]] = field(default_factory=dict)
    log: list[Event] = field(default_factory=list)
    last: dict[str, Command | Event] = field(default_factory=dict)
    timers: dict[str, tuple[float, Any]] = field(default_factory=dict)
    statuses: list[str] = field(default_factory=list)
    count: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.log) or any(self.queues.values())

    def ids(self) -> dict[str, Any]:
        self.count += 1
        return {"at": f"t{self.count}", "message_id": f"m-{self.count}"}

    def apply(self, moved: Transition) -> None:
        assert moved.record is not None
        self.record = moved.record
        self.record.history += self.record.new_history
        self.record.new_history = []
        self.statuses.append(self.record.status)
        for timer_id in moved.cancels:
            self.timers.pop(timer_id, None)
        for timer in moved.timers:
            self.timers[timer.timer_id] = (self.now + timer.after, timer)
        for send in moved.sends:
            step = SAGA.step(send.step)
            builder = step.compensation if send.undo else step.command
            assert builder is not None
            view = SagaView(self.record.saga_id, send.step, send.attempt, "k")
            command = SAGA.build(builder, self.record.data, view)
            self.queues.setdefault(SERVICE[type(command)], []).append(command)

    def _handle(self, where: str, message: Command | Event) -> None:
        self.last[where] = message
        if isinstance(message, Command):
            self.log.append(self.world.handle(message))
        else:
            self.apply(advance(SAGA, ORDER, self.record, message, **self.ids()))

    def step(self, which: int) -> None:
        """The ``which``-th of those with work (a service, or the orchestrator) takes its next."""
        ready = [name for name, queue in sorted(self.queues.items()) if queue]
        ready += ["orchestrator"] if self.log else []
        if not ready:
            return
        where = ready[which % len(ready)]
        source = self.log if where == "orchestrator" else self.queues[where]
        self._handle(where, source.pop(0))

    def again(self, which: int) -> None:
        """A message handled before is delivered again (its ack was lost)."""
        if self.last:
            where = sorted(self.last)[which % len(self.last)]
            self._handle(where, self.last[where])

    def dead_letter(self, which: int) -> None:
        """The next command of a service is dead-lettered instead of handled."""
        ready = [name for name, queue in sorted(self.queues.items()) if queue]
        if not ready or self.record is None:
            return
        command = self.queues[ready[which % len(ready)]].pop(0)
        step, undo = STEP[type(command)]
        moved = on_dead_letter(
            SAGA, self.record, step=step, undo=undo, reason="poison", dead_letter="d", **self.ids()
        )
        self.apply(moved)

    def fire_next_timer(self) -> None:
        if not self.timers or self.record is None:
            return
        timer_id, (due, timer) = min(self.timers.items(), key=lambda item: item[1][0])
        self.now = max(self.now, due)
        del self.timers[timer_id]
        moved = on_timer(
            SAGA,
            self.record,
            kind=timer.kind,
            step=timer.step,
            attempt=timer.attempt,
            undo=timer.undo,
            timer_id=timer_id,
            **self.ids(),
        )
        self.apply(moved)


Action = tuple[str, int]
ACTIONS = st.lists(
    st.tuples(st.sampled_from(["step", "again", "dead", "timer"]), st.integers(0, 50)),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(in_stock=st.booleans(), pays=st.booleans(), schedule=ACTIONS)
def test_every_order_saga_ends_once_and_the_world_agrees(
    in_stock: bool, pays: bool, schedule: list[Action]
) -> None:
    run = Run(World(in_stock=in_stock, pays=pays))
    created = OrderCreatedEvent(
        order_id=ORDER,
        customer_id="C",
        items=[OrderItem(product_id="P", quantity=1)],
        total_amount=Decimal("10.00"),
    )
    run.apply(advance(SAGA, ORDER, None, created, **run.ids()))
    for action, index in schedule:
        {"timer": lambda _: run.fire_next_timer(), "step": run.step, "again": run.again}.get(
            action, run.dead_letter
        )(index)
    # Then everything in flight is delivered, and every timer fires, until nothing is left.
    for _ in range(200):
        if run.busy:
            run.step(0)
        elif run.timers:
            run.fire_next_timer()
        else:
            break
    assert not run.busy and not run.timers
    record = run.record
    assert record is not None
    status = SagaStatus(record.status)
    assert status in FINAL, record.history
    # Ended once: from the first final status on, the status never changes.
    finals = [s for s in run.statuses if SagaStatus(s) in FINAL]
    assert set(finals) == {status}, run.statuses
    assert run.statuses[run.statuses.index(finals[0]) :] == finals
    world = run.world
    if status is SagaStatus.COMPLETED:
        assert world.charged and world.reserved and not world.refunded and not world.cancelled
    elif status is SagaStatus.COMPENSATED:
        assert world.cancelled and not world.reserved
        assert world.refunded or not world.charged
    else:
        # STUCK only when a compensation itself could not be delivered.
        assert record.data["_stuck"]["reason"].startswith("compensation of"), record.data
