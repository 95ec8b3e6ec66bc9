"""sagaline: sagas on CQRS with durable command and event buses, for Python."""

from __future__ import annotations

from sagaline.aggregate import Aggregate
from sagaline.app import App, Invariant
from sagaline.deploy import Deployment, connect
from sagaline.errors import (
    BusUnavailable,
    ConcurrencyError,
    ConfigurationError,
    DuplicateMessageId,
    InvalidMessage,
    MessageRefused,
    NonRetryableError,
    NotAcceptedFromClients,
    NotResettable,
    SagaDefinitionError,
    SagalineError,
    StoreUnavailable,
    UnknownMessageType,
)
from sagaline.handling import Context, Runtime, Service, System
from sagaline.messages import (
    Command,
    Envelope,
    Event,
    check_money,
    parse_document,
    registry,
    utc_now,
    utc_timestamp,
)
from sagaline.ports import BrokerBus, Database, Document, Reads, RetryPolicy, StoreTransaction
from sagaline.projection import Projection, Views, rebuild
from sagaline.saga import (
    Orchestrator,
    SagaDefinition,
    SagaMonitor,
    SagaStatus,
    Step,
    StepKind,
    saga_id,
)

__all__ = [
    "Aggregate",
    "App",
    "BrokerBus",
    "BusUnavailable",
    "Command",
    "ConcurrencyError",
    "ConfigurationError",
    "Context",
    "Database",
    "Deployment",
    "Document",
    "DuplicateMessageId",
    "Envelope",
    "Event",
    "InvalidMessage",
    "Invariant",
    "MessageRefused",
    "NonRetryableError",
    "NotAcceptedFromClients",
    "NotResettable",
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
    "StoreTransaction",
    "StoreUnavailable",
    "System",
    "UnknownMessageType",
    "Views",
    "check_money",
    "connect",
    "parse_document",
    "rebuild",
    "registry",
    "saga_id",
    "utc_now",
    "utc_timestamp",
]

__version__ = "0.1.0"
