"""Saga definitions, the orchestrator that runs them and the monitor that follows a choreography."""

from __future__ import annotations

from sagaline.saga.definition import (
    Parallel,
    SagaDefinition,
    SagaStatus,
    Step,
    StepKind,
    StepRetry,
)
from sagaline.saga.engine import Orchestrator, saga_id
from sagaline.saga.messages import SagaActionRequested, SagaTimerFired
from sagaline.saga.monitor import SagaMonitor
from sagaline.saga.state import SagaView

__all__ = [
    "Orchestrator",
    "Parallel",
    "SagaActionRequested",
    "SagaDefinition",
    "SagaMonitor",
    "SagaStatus",
    "SagaTimerFired",
    "SagaView",
    "Step",
    "StepKind",
    "StepRetry",
    "saga_id",
]
