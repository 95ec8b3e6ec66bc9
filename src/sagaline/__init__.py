"""sagaline: sagas on CQRS with durable command and event buses, for Python."""

from __future__ import annotations

from sagaline.aggregate import Aggregate
from sagaline.app import App, Invariant
from sagaline.deploy import Deployment, connect
from sagaline.errors import (
    ActionRefused,
    BusUnavailable,
    ConcurrencyError,
    ConfigurationError,
    DuplicateMessageId,
    InvalidMessage,
    MessageRefused,
    NonRetryableError,
    NotAcceptedFromClients,
    NotAStore,
    NotResettable,
    SagaDefinitionError,
    SagalineError,
    SagaNotFound,
    StoreUnavailable,
    UnknownMessageType,
)
from sagaline.handling import Context, Runtime, Service, System
from sagaline.handling.notices import MessageDeadLettered
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
    Parallel,
    SagaActionRequested,
    SagaDefinition,
    SagaMonitor,
    SagaStatus,
    SagaTimerFired,
    SagaView,
    Step,
    StepKind,
    StepRetry,
    saga_id,
)
from sagaline.saga.operator import find_saga, request_action

__all__ = [
    "ActionRefused",
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
    "MessageDeadLettered",
    "MessageRefused",
    "NonRetryableError",
    "NotAStore",
    "NotAcceptedFromClients",
    "NotResettable",
    "Orchestrator",
    "Parallel",
    "Projection",
    "Reads",
    "RetryPolicy",
    "Runtime",
    "SagaActionRequested",
    "SagaDefinition",
    "SagaDefinitionError",
    "SagaMonitor",
    "SagaNotFound",
    "SagaStatus",
    "SagaTimerFired",
    "SagaView",
    "SagalineError",
    "Service",
    "Step",
    "StepKind",
    "StepRetry",
    "StoreTransaction",
    "StoreUnavailable",
    "System",
    "UnknownMessageType",
    "Views",
    "check_money",
    "connect",
    "find_saga",
    "parse_document",
    "rebuild",
    "registry",
    "request_action",
    "saga_id",
    "utc_now",
    "utc_timestamp",
]

__version__ = "0.1.0"
