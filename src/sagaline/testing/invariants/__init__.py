"""The invariant checker of RELIABILITY.md, for any app, on one store or a deployment.

The checker is a pure function over an :class:`AuditSnapshot`: the final contents of the stores
(event streams, outboxes, inboxes, dead letters, saga table, the services' documents and the read
models) and, where the bus keeps them, its queues, log and subscription cursors. It returns every
broken invariant as a :class:`Violation` with its evidence (stream, position, correlation id,
message id); it never raises for a violation.

* :mod:`~sagaline.testing.invariants.snapshot` (records in ``records``): the snapshot, loaded
  from a store or a deployment through each store's ``audit_rows()``;
* :mod:`~sagaline.testing.invariants.checks` and ``rebuild``: what any app keeps (every start
  event has its saga and every saga ended, each message's effect once, streams without gaps, each
  read model equal to a rebuild, nothing lost, everything delivered), parametrised by the system
  only;
* :mod:`~sagaline.testing.invariants.runner`: :func:`check_app` and
  :func:`check_app_deployment` (coroutines), the generic checks then the app's own
  (``App.invariants``).
"""

from __future__ import annotations

from sagaline.app import Invariant
from sagaline.testing.invariants.records import (
    CLIENT_SOURCE,
    COLOCATED,
    DEAD,
    HANDLED,
    OUTBOX,
    PENDING,
    AuditCommand,
    AuditDeadLetter,
    AuditEvent,
    BusEvent,
    BusView,
    UnsentEntry,
    Violation,
    format_violations,
)
from sagaline.testing.invariants.runner import (
    check_app,
    check_app_deployment,
    check_app_snapshot,
    check_generic,
)
from sagaline.testing.invariants.snapshot import Answers, AuditSnapshot

__all__ = [
    "CLIENT_SOURCE",
    "COLOCATED",
    "DEAD",
    "HANDLED",
    "OUTBOX",
    "PENDING",
    "Answers",
    "AuditCommand",
    "AuditDeadLetter",
    "AuditEvent",
    "AuditSnapshot",
    "BusEvent",
    "BusView",
    "Invariant",
    "UnsentEntry",
    "Violation",
    "check_app",
    "check_app_deployment",
    "check_app_snapshot",
    "check_generic",
    "format_violations",
]
