"""sagaline: sagas on CQRS with durable command and event buses, for Python."""

from __future__ import annotations

from sagaline.aggregate import Aggregate
from sagaline.app import App
from sagaline.deploy import Deployment
from sagaline.errors import (
    BusUnavailable,
    ConcurrencyError,
    ConfigurationError,
    DuplicateMessageId,
    InvalidMessage,
    MessageRefused,
    NonRetryableError,
    NotAcceptedFromClients,
    SagaDefinitionError,
    SagalineError,
    StoreUnavailable,
    UnknownMessageType,
)
from sagaline.handling import Context, Runtime, Service, System
from sagaline.messages import Command, Envelope, Event, parse_document, registry
from sagaline.ports import Reads, RetryPolicy
from sagaline.projection import Projection, Views, rebuild
from sagaline.saga import (
    Orchestrator,
    SagaDefinition,
    SagaMonitor,
    SagaStatus,
    Step,
    StepKind,
)

__all__ = [
    "Aggregate",
    "App",
    "BusUnavailable",
    "Command",
    "ConcurrencyError",
    "ConfigurationError",
    "Context",
    "Deployment",
    "DuplicateMessageId",
    "Envelope",
    "Event",
    "InvalidMessage",
    "MessageRefused",
    "NonRetryableError",
    "NotAcceptedFromClients",
    "Orchestrator",
    "Projection",
    "Reads",
    "RetryPolicy",
    "Runtime",
    "SagaDefinition",
    "SagaDefinitionError",
    "SagaMonitor",
    "SagaStatus",
    "SagalineError",
    "Service",
    "Step",
    "StepKind",
    "StoreUnavailable",
    "System",
    "UnknownMessageType",
    "Views",
    "parse_document",
    "rebuild",
    "registry",
]

__version__ = "0.1.0"
