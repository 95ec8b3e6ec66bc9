"""``sagaline describe``: a saga's steps, kinds, commands and compensations, and its diagram."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from sagaline.handling import System
from sagaline.orders import ORDER_SAGA, build_system
from sagaline.orders.messages import (
    InventoryReleasedEvent,
    InventoryReservationFailedEvent,
    InventoryReservedEvent,
    OrderCreatedEvent,
    OrderItem,
    PaymentFailedEvent,
    PaymentProcessedEvent,
    ProcessPaymentCommand,
    ReleaseInventoryCommand,
    ReserveInventoryCommand,
)
from sagaline.saga import Orchestrator, SagaDefinition, Step, StepKind
from sagaline.saga.describe import UNKNOWN, describe, sagas_of

ORDER_COMMANDS = (
    "ReserveInventoryCommand",
    "ProcessPaymentCommand",
    "ReleaseInventoryCommand",
    "CancelOrderCommand",
)


def sagaline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
        check=False,
    )


def _unannotated_failure(data: Mapping[str, Any]) -> Any:
    raise RuntimeError("needs a live system")


def _annotated_failure(data: Mapping[str, Any]) -> ReleaseInventoryCommand:
    raise RuntimeError("needs a live system")


# Builders as users write them: lambdas that declare nothing, and that convert saga data.
LAMBDA_SAGA = SagaDefinition(
    name="lambdas",
    start=OrderCreatedEvent,
    steps=(
        Step(
            "reserve",
            command=lambda data: ReserveInventoryCommand(
                order_id=data["orderId"],
                items=[
                    OrderItem(product_id=i["productId"], quantity=i["quantity"])
                    for i in data["items"]
                ],
            ),
            success=InventoryReservedEvent,
            failures=(InventoryReservationFailedEvent,),
            compensation=lambda data: ReleaseInventoryCommand(order_id=data["orderId"], items=[]),
            compensated=InventoryReleasedEvent,
        ),
        Step(
            "pay",
            command=lambda data: ProcessPaymentCommand(
                order_id=data["orderId"],
                customer_id=data["customerId"],
                amount=Decimal(data["totalAmount"]),
            ),
            success=PaymentProcessedEvent,
            failures=(PaymentFailedEvent,),
            kind=StepKind.PIVOT,
        ),
        Step(
            "annotated",
            command=_annotated_failure,
            success=InventoryReleasedEvent,
            kind=StepKind.RETRIABLE,
        ),
        Step(
            "opaque",
            command=_unannotated_failure,
            success=InventoryReleasedEvent,
            kind=StepKind.RETRIABLE,
        ),
    ),
)


def test_the_command_of_a_lambda_builder_is_found_and_drawn() -> None:
    described = describe(LAMBDA_SAGA)
    commands = {step.name: (step.command, step.compensation) for step in described.steps}
    assert commands == {
        "reserve": ("ReserveInventoryCommand", "ReleaseInventoryCommand"),
        "pay": ("ProcessPaymentCommand", None),
        "annotated": ("ReleaseInventoryCommand", None),  # raised on the sample: its annotation
        "opaque": (UNKNOWN, None),
    }
    assert [step.kind for step in described.steps] == [
        "compensatable",
        "pivot",
        "retriable",
        "retriable",
    ]
    assert "reserve: reserve sends ReserveInventoryCommand" in described.mermaid
    assert "pay: pay sends ProcessPaymentCommand" in described.mermaid
    assert "undo reserve (ReleaseInventoryCommand, then InventoryReleasedEvent)" in (
        described.mermaid
    )
    assert LAMBDA_SAGA.to_mermaid() == described.mermaid


def test_a_command_no_service_of_the_system_handles_is_a_problem() -> None:
    system = System([Orchestrator([LAMBDA_SAGA]).service])
    problems = describe(LAMBDA_SAGA, system).problems
    assert any("'reserve'" in p and "ReserveInventoryCommand" in p for p in problems)
    assert describe(ORDER_SAGA, build_system()).problems == ()


def test_the_sagas_of_a_system_are_those_its_orchestrators_host() -> None:
    assert sagas_of(build_system()) == [ORDER_SAGA]
    system = System([Orchestrator([LAMBDA_SAGA, ORDER_SAGA], name="sagas").service])
    assert [saga.name for saga in sagas_of(system)] == ["lambdas", "order"]


def test_describe_lists_each_saga_with_its_steps(tmp_path: Path) -> None:
    shown = sagaline("describe", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout
    assert "saga order v1" in table
    rows = {line.split("│")[2].strip(): line for line in table.splitlines() if line.count("│") > 6}
    assert "compensatable" in rows["create_order"] and "CancelOrderCommand" in rows["create_order"]
    reserve = rows["reserve_inventory"]
    for expected in (
        "compensatable",
        "ReserveInventoryCommand",
        "InventoryReservedEvent",
        "InventoryReservationFailedEvent",
        "ReleaseInventoryCommand",
    ):
        assert expected in reserve
    assert "pivot" in rows["process_payment"] and "ProcessPaymentCommand" in rows["process_payment"]
    assert "on completion: OrderConfirmedEvent" in table
    assert not (tmp_path / "sagaline.db").exists()  # describing opens no store


def test_describe_mermaid_prints_only_the_diagram_with_the_command_names(tmp_path: Path) -> None:
    drawn = sagaline("describe", "order", "--mermaid", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.splitlines()[0] == "stateDiagram-v2"
    assert drawn.stdout == ORDER_SAGA.to_mermaid() + "\n"
    for command in ORDER_COMMANDS:
        assert command in drawn.stdout


def test_describe_json_is_the_saga_as_data(tmp_path: Path) -> None:
    one = sagaline("describe", "order", "--json", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    saga = json.loads(one.stdout)
    assert [step["command"] for step in saga["steps"]] == [
        None,
        "ReserveInventoryCommand",
        "ProcessPaymentCommand",
    ]
    assert saga["steps"][1]["compensateOnFailure"] is True
    assert saga["problems"] == []
    every = sagaline("describe", "--json", cwd=tmp_path)
    assert [s["name"] for s in json.loads(every.stdout)] == ["order"]


def test_an_unknown_saga_exits_2_naming_the_known_ones(tmp_path: Path) -> None:
    unknown = sagaline("describe", "shipping", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "unknown saga 'shipping'" in unknown.stderr and "known: order" in unknown.stderr
    assert unknown.stdout == ""


def test_an_invalid_saga_definition_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "from sagaline import App, SagaDefinition, System\n"
        "from sagaline.orders.messages import OrderCreatedEvent\n"
        "def build(settings):\n"
        "    SagaDefinition(name='broken', start=OrderCreatedEvent, steps=())\n"
        "    return System([])\n"
        "app = App(name='broken', build=build)\n"
    )
    result = sagaline("--app", "broken:app", "describe", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid saga definition: saga 'broken' has no steps" in result.stderr
    assert "Traceback" not in result.stderr
