"""The checks of the reference order app, by the names its tests and benchmarks have used.

``check_invariants(db, initial_stock=...)`` is :func:`~sagaline.testing.check_app` for the order
app (``sagaline.orders:app``) with its own invariants given the stock put in; ``system`` (the
choreography's, say) replaces the orchestrated flow's. The order app is imported when a check
runs, never by the kit itself: the kit knows no app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sagaline.app import App, Invariant
from sagaline.handling import System
from sagaline.testing.invariants.records import Violation
from sagaline.testing.invariants.runner import (
    check_app_async,
    check_app_deployment_async,
    check_app_snapshot,
    run_checks,
)
from sagaline.testing.invariants.snapshot import AuditSnapshot

if TYPE_CHECKING:
    from sagaline.backends.sqlite import SqliteDatabase
    from sagaline.deploy import Deployment

__all__ = [
    "check_deployment",
    "check_deployment_async",
    "check_invariants",
    "check_invariants_async",
    "check_snapshot",
]


def _orders(initial_stock: Mapping[str, int] | None) -> tuple[App, Sequence[Invariant]]:
    from sagaline.orders import app
    from sagaline.orders.invariants import order_invariants

    return app, order_invariants(initial_stock)


def check_invariants(
    db: SqliteDatabase,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant the order flow breaks in ``db``; an empty list when it keeps them all.

    ``db`` holds every service's state and the bus. ``initial_stock`` (product id to units
    stocked) adds the check that no unit appeared or vanished. ``system`` gives the routes and
    the subscribers (the order flow's services by default). Call :func:`check_invariants_async`
    from a running event loop.
    """
    return run_checks(
        lambda: check_invariants_async(db, initial_stock=initial_stock, system=system),
        "check_invariants",
    )


async def check_invariants_async(
    db: SqliteDatabase,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """The same as :func:`check_invariants`, for callers inside an event loop."""
    app, invariants = _orders(initial_stock)
    return await check_app_async(app, db, system=system, invariants=invariants)


def check_deployment(
    deployment: Deployment,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant the order flow breaks across the stores (and bus) of ``deployment``.

    Works for a database per service with any bus (the bus's own rows are checked too when it
    has ``audit_rows``, as a SQLite bus does) and for stores co-located with their bus. Call
    :func:`check_deployment_async` from a running event loop.
    """
    return run_checks(
        lambda: check_deployment_async(deployment, initial_stock=initial_stock, system=system),
        "check_deployment",
    )


async def check_deployment_async(
    deployment: Deployment,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """The same as :func:`check_deployment`, for callers inside an event loop."""
    app, invariants = _orders(initial_stock)
    return await check_app_deployment_async(app, deployment, system=system, invariants=invariants)


async def check_snapshot(
    snapshot: AuditSnapshot,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant of RELIABILITY.md the order flow breaks in ``snapshot``."""
    app, invariants = _orders(initial_stock)
    return await check_app_snapshot(app, snapshot, system=system, invariants=invariants)
