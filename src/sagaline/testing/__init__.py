"""Tools for testing systems built with sagaline: the invariant checker of RELIABILITY.md.

``check_invariants`` checks one store (the embedded default, bus included); ``check_deployment``
checks a deployment of a store per service and a bus (SQLite, PostgreSQL, RabbitMQ, NATS).
"""

from __future__ import annotations

from sagaline.testing.invariants import (
    Violation,
    check_deployment,
    check_deployment_async,
    check_invariants,
    check_invariants_async,
    format_violations,
)

__all__ = [
    "Violation",
    "check_deployment",
    "check_deployment_async",
    "check_invariants",
    "check_invariants_async",
    "format_violations",
]
