"""The order app's checks, by the names its tests and benchmarks use.

``await check_invariants(db, initial_stock=...)`` is :func:`sagaline.testing.check_app` for the
order app (``sagaline.orders:app``) with its own invariants given the stock put in; ``system``
(the choreography's, say) replaces the orchestrated flow's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sagaline import App, Invariant, System
from sagaline.orders import app
from sagaline.orders.invariants import order_invariants
from sagaline.testing import Violation, check_app, check_app_deployment
from sagaline.testing.invariants import AuditSnapshot, check_app_snapshot

if TYPE_CHECKING:
    from sagaline import Database, Deployment

__all__ = ["check_deployment", "check_invariants", "check_snapshot"]


def _orders(initial_stock: Mapping[str, int] | None) -> tuple[App, Sequence[Invariant]]:
    return app, order_invariants(initial_stock)


async def check_invariants(
    db: Database,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant the order flow breaks in ``db``; an empty list when it keeps them all.

    ``db`` holds every service's state and the bus. ``initial_stock`` (product id to units
    stocked) adds the check that no unit appeared or vanished. ``system`` gives the routes and
    the subscribers (the order flow's services by default).
    """
    app, invariants = _orders(initial_stock)
    return await check_app(app, db, system=system, invariants=invariants)


async def check_deployment(
    deployment: Deployment,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant the order flow breaks across the stores (and bus) of ``deployment``.

    Works for a database per service with any bus (the bus's own rows are checked too when it
    is a database) and for stores co-located with their bus.
    """
    app, invariants = _orders(initial_stock)
    return await check_app_deployment(app, deployment, system=system, invariants=invariants)


async def check_snapshot(
    snapshot: AuditSnapshot,
    *,
    initial_stock: Mapping[str, int] | None = None,
    system: System | None = None,
) -> list[Violation]:
    """Every invariant of RELIABILITY.md the order flow breaks in ``snapshot``."""
    app, invariants = _orders(initial_stock)
    return await check_app_snapshot(app, snapshot, system=system, invariants=invariants)
