"""Saga definitions, the orchestrator that runs them and the monitor that follows a choreography."""

from __future__ import annotations

from sagaline.saga.definition import SagaDefinition, SagaStatus, Step, StepKind
from sagaline.saga.engine import Orchestrator, saga_id
from sagaline.saga.monitor import SagaMonitor

__all__ = [
    "Orchestrator",
    "SagaDefinition",
    "SagaMonitor",
    "SagaStatus",
    "Step",
    "StepKind",
    "saga_id",
]
