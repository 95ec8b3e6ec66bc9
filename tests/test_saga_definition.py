"""Saga definitions are data: checked when built, planned for compensation, drawn."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest

from sagaline.errors import SagaDefinitionError
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
    ProcessPaymentCommand,
    ReleaseInventoryCommand,
    ReserveInventoryCommand,
)
from sagaline.orders.saga import ORDER_SAGA
from sagaline.saga import SagaDefinition, Step, StepKind

ITEMS = [OrderItem(product_id="PROD-A", quantity=2)]


def reserve(data: Mapping[str, Any]) -> ReserveInventoryCommand:
    return ReserveInventoryCommand(order_id=data["orderId"], items=ITEMS)


def release(data: Mapping[str, Any]) -> ReleaseInventoryCommand:
    return ReleaseInventoryCommand(order_id=data["orderId"], items=ITEMS)


def pay(data: Mapping[str, Any]) -> ProcessPaymentCommand:
    return ProcessPaymentCommand(order_id=data["orderId"], customer_id="C", amount=Decimal(1))


def cancel(data: Mapping[str, Any]) -> CancelOrderCommand:
    return CancelOrderCommand(order_id=data["orderId"], reason="compensated")


def reserve_step(**changes: Any) -> Step:
    fields: dict[str, Any] = {
        "name": "reserve",
        "command": reserve,
        "success": InventoryReservedEvent,
        "failures": (InventoryReservationFailedEvent,),
        "compensation": release,
        "compensated": InventoryReleasedEvent,
    }
    fields.update(changes)
    return Step(**fields)


def pay_step(**changes: Any) -> Step:
    fields: dict[str, Any] = {
        "name": "pay",
        "command": pay,
        "success": PaymentProcessedEvent,
        "failures": (PaymentFailedEvent,),
        "kind": StepKind.PIVOT,
    }
    fields.update(changes)
    return Step(**fields)


def define(*steps: Step) -> SagaDefinition:
    return SagaDefinition(name="test", start=OrderCreatedEvent, steps=steps)


def test_a_valid_definition_is_accepted() -> None:
    definition = define(reserve_step(), pay_step())
    assert [s.name for s in definition.steps] == ["reserve", "pay"]
    assert definition.handles("InventoryReservedEvent") == [("reserve", "success")]
    assert definition.handles("PaymentFailedEvent") == [("pay", "failure")]
    assert definition.handles("OrderCreatedEvent") == [("", "start")]


@pytest.mark.parametrize(
    ("steps", "words"),
    [
        pytest.param(
            (reserve_step(compensation=None, compensated=None), pay_step()),
            "compensation",
            id="compensatable-without-compensation",
        ),
        pytest.param(
            (reserve_step(compensated=None), pay_step()),
            "compensation",
            id="compensatable-without-confirming-event",
        ),
        pytest.param(
            (
                reserve_step(),
                pay_step(),
                pay_step(name="ship", kind=StepKind.RETRIABLE),
            ),
            "retriable",
            id="retriable-with-failure-events",
        ),
        pytest.param(
            (reserve_step(), pay_step(), pay_step(name="pay-again")),
            "pivot",
            id="two-pivots",
        ),
        pytest.param(
            (pay_step(), reserve_step()),
            "pivot",
            id="compensatable-after-pivot",
        ),
        pytest.param(
            (reserve_step(success=None), pay_step()),
            "success",
            id="command-without-success-event",
        ),
        pytest.param(
            (reserve_step(), pay_step(compensate_on_failure=True)),
            "compensate_on_failure",
            id="compensate-on-failure-without-compensation",
        ),
        pytest.param((reserve_step(), reserve_step()), "repeats", id="repeated-step-name"),
        pytest.param((), "no steps", id="no-steps"),
    ],
)
def test_an_invalid_definition_is_refused_when_built(steps: tuple[Step, ...], words: str) -> None:
    with pytest.raises(SagaDefinitionError) as caught:
        define(*steps)
    message = str(caught.value)
    assert words in message
    assert "'test'" in message


def test_a_retriable_step_without_failures_is_accepted() -> None:
    definition = define(
        reserve_step(), pay_step(), pay_step(name="ship", kind=StepKind.RETRIABLE, failures=())
    )
    assert definition.all_steps()[2].kind is StepKind.RETRIABLE


def test_the_order_saga_is_the_seed_flow() -> None:
    steps = ORDER_SAGA.all_steps()
    assert ORDER_SAGA.start is OrderCreatedEvent
    assert [s.name for s in steps] == ["create_order", "reserve_inventory", "process_payment"]
    assert [s.kind for s in steps] == [
        StepKind.COMPENSATABLE,
        StepKind.COMPENSATABLE,
        StepKind.PIVOT,
    ]
    data = {
        "orderId": "ORD-12345",
        "customerId": "CUST-987",
        "items": [{"productId": "PROD-A", "quantity": 2}],
        "totalAmount": Decimal("75.50"),
        "_failure": {"step": "reserve_inventory", "reason": "Insufficient stock for PROD-A"},
    }
    assert steps[1].command is not None and steps[2].command is not None
    assert steps[1].command(data) == ReserveInventoryCommand(
        order_id="ORD-12345", items=[OrderItem(product_id="PROD-A", quantity=2)]
    )
    payment = steps[2].command(data)
    assert payment == ProcessPaymentCommand(
        order_id="ORD-12345", customer_id="CUST-987", amount=Decimal("75.50")
    )
    assert steps[0].compensation is not None and steps[1].compensation is not None
    cancellation = steps[0].compensation(data)
    assert isinstance(cancellation, CancelOrderCommand)
    assert "Inventory reservation failed" in cancellation.reason
    assert "Insufficient stock for PROD-A" in cancellation.reason
    assert isinstance(steps[1].compensation(data), ReleaseInventoryCommand)
    assert steps[0].compensated is OrderCancelledEvent
    assert steps[1].compensated is InventoryReleasedEvent


@pytest.mark.parametrize(
    ("failed", "plan"),
    [
        # The start step cannot fail: nothing ran before it.
        ("create_order", []),
        # A failed reservation may be partial: release it, then cancel the order.
        ("reserve_inventory", ["reserve_inventory", "create_order"]),
        # A declined payment: release the reservation, then cancel the order.
        ("process_payment", ["reserve_inventory", "create_order"]),
    ],
)
def test_the_order_saga_compensates_in_reverse_order(failed: str, plan: list[str]) -> None:
    names = ORDER_SAGA.compensation_plan(failed)
    assert names == plan
    commands = [ORDER_SAGA.step(name).compensation for name in names]
    data = {"orderId": "O-1", "items": [{"productId": "P", "quantity": 1}]}
    assert [type(c(data)).type_name() for c in commands if c is not None] == [
        {"reserve_inventory": "ReleaseInventoryCommand", "create_order": "CancelOrderCommand"}[n]
        for n in plan
    ]


def test_nothing_after_the_pivot_is_compensated() -> None:
    definition = define(
        reserve_step(),
        pay_step(),
        pay_step(name="ship", kind=StepKind.RETRIABLE, failures=()),
    )
    assert definition.compensation_plan("pay") == ["reserve"]
    assert definition.compensation_plan("ship") == ["reserve"]


def test_the_saga_subscribes_to_every_event_it_reacts_to() -> None:
    assert {t.type_name() for t in ORDER_SAGA.event_types()} == {
        "OrderCreatedEvent",
        "InventoryReservedEvent",
        "InventoryReservationFailedEvent",
        "InventoryReleasedEvent",
        "PaymentProcessedEvent",
        "PaymentFailedEvent",
        "PaymentRefundedEvent",
        "OrderCancelledEvent",
    }


def mermaid_labels(diagram: str) -> set[str]:
    """Every identifier the diagram shows (states and transition labels)."""
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", diagram))


def test_the_diagram_names_every_step_and_forward_event() -> None:
    diagram = ORDER_SAGA.to_mermaid()
    assert diagram.splitlines()[0] == "stateDiagram-v2"
    words = mermaid_labels(diagram)
    for step in ORDER_SAGA.all_steps():
        assert step.name in words
        if step.success is not None:
            assert step.success.type_name() in words
        for failure in step.failures:
            assert failure.type_name() in words
    assert ORDER_SAGA.start.type_name() in words
    # Transitions go from each step to the next in order, and end completed or compensated.
    assert "[*] --> create_order: OrderCreatedEvent" in diagram
    assert "reserve_inventory --> process_payment: InventoryReservedEvent" in diagram
    assert "process_payment --> completed: PaymentProcessedEvent" in diagram
    assert "process_payment --> compensating: PaymentFailedEvent" in diagram


def test_the_diagram_names_every_event_of_the_saga() -> None:
    words = mermaid_labels(ORDER_SAGA.to_mermaid())
    missing = {t.type_name() for t in ORDER_SAGA.event_types()} - words
    assert missing == set()
