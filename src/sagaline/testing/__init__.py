"""Tools for testing systems built with sagaline: the invariant checker of RELIABILITY.md.

``await check_app(app, store)`` checks any app on one store (the embedded default, bus included),
and ``await check_app_deployment(app, deployment)`` on a deployment of a store per service and a
bus (SQLite, PostgreSQL, RabbitMQ, NATS): the invariants any app keeps, then the app's own
(``App.invariants``).

:class:`Harness` runs an app on a temporary store (a SQLite file, or a PostgreSQL schema) with a
:class:`~sagaline.clock.FakeClock` it moves to each next due retry, and with :class:`Faults` a
seed decides (duplicate deliveries, every message twice, crashes before commit, failing
handlers): one seed replays one history, down to the ids and timestamps of every row.
"""

from __future__ import annotations

from sagaline.testing.harness import Delivered, Faults, Harness, InjectedCrash, InjectedFailure
from sagaline.testing.invariants import (
    AuditSnapshot,
    Violation,
    check_app,
    check_app_deployment,
    format_violations,
)

__all__ = [
    "AuditSnapshot",
    "Delivered",
    "Faults",
    "Harness",
    "InjectedCrash",
    "InjectedFailure",
    "Violation",
    "check_app",
    "check_app_deployment",
    "format_violations",
]
