"""Saga definitions and the orchestrator that runs them."""

from __future__ import annotations

from sagaline.saga.definition import SagaDefinition, SagaStatus, Step, StepKind
from sagaline.saga.engine import Orchestrator, saga_id

__all__ = ["Orchestrator", "SagaDefinition", "SagaStatus", "Step", "StepKind", "saga_id"]
