"""The public surface of ``sagaline``: what users import must not change by accident."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

import sagaline
import sagaline.orders.demo as demo
from sagaline.orders import SUBSCRIBER_NAMES, build_system

PUBLIC = [
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


def test_the_exports_are_the_expected_ones() -> None:
    # Adding or removing a public name is a decision: update this list with it.
    assert sorted(sagaline.__all__) == PUBLIC
    assert len(set(sagaline.__all__)) == len(sagaline.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_importable_and_documented(name: str) -> None:
    module = importlib.import_module("sagaline")
    value = getattr(module, name)
    assert value is getattr(sagaline, name)
    doc = inspect.getdoc(value)
    assert doc is not None and doc.strip(), f"sagaline.{name} has no docstring"


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isclass(getattr(sagaline, n))])
def test_the_public_methods_of_public_classes_are_documented(name: str) -> None:
    cls = getattr(sagaline, name)
    for attribute, member in vars(cls).items():
        if attribute.startswith("_"):
            continue
        function = getattr(member, "__func__", member)
        if callable(function) or isinstance(member, property):
            assert (inspect.getdoc(function) or "").strip(), f"{name}.{attribute} has no docstring"


def test_every_error_shares_one_root_and_has_its_own_code() -> None:
    values = [getattr(sagaline, n) for n in PUBLIC]
    errors = [v for v in values if inspect.isclass(v) and issubclass(v, sagaline.SagalineError)]
    exceptions = [v for v in values if inspect.isclass(v) and issubclass(v, BaseException)]
    assert len(exceptions) == len(errors)
    assert {e.__name__ for e in errors} >= {"SagalineError", "ConcurrencyError", "InvalidMessage"}
    codes = [e.code for e in errors]
    assert len(set(codes)) == len(codes)


def test_the_package_has_a_version() -> None:
    assert isinstance(sagaline.__version__, str)
    assert sagaline.__version__.count(".") >= 1


def test_the_order_flow_names_its_subscribers() -> None:
    assert sorted(SUBSCRIBER_NAMES) == sorted(build_system().subscribers)


def test_the_order_demo_imports_only_the_public_api() -> None:
    """An app imports ``sagaline``, ``sagaline.testing`` and its own modules, nothing else."""
    tree = ast.parse(inspect.getsource(demo))
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    private = {
        name
        for name in imported
        if name.startswith("sagaline")
        and name != "sagaline"
        and not name.startswith(("sagaline.testing", "sagaline.orders"))
    }
    assert not private, f"sagaline.orders.demo imports private modules: {sorted(private)}"
