"""The runner: the invariants any app keeps, then the app's own, over a snapshot of its stores.

A fault test of an app ends with ``assert not await check_app(app, store)`` (one store holding
every service and the bus) or ``assert not await check_app_deployment(app, deployment)`` (a
database per service, a bus between them). Run it on a quiescent system (no worker running): a
system still at work shows undelivered messages (I9) and sagas not yet ended (I1), and the checks
that compare a saga's outcome with the services' state then report what is merely late.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sagaline.app import App, Invariant, Settings
from sagaline.handling import System
from sagaline.projection import Projection
from sagaline.testing.invariants.checks import (
    check_delivered,
    check_no_loss,
    check_once,
    check_started,
    check_terminal,
    check_versions,
)
from sagaline.testing.invariants.rebuild import check_read_model
from sagaline.testing.invariants.records import Violation
from sagaline.testing.invariants.snapshot import Answers, AuditSnapshot

if TYPE_CHECKING:
    from sagaline.deploy import Deployment
    from sagaline.ports import AuditRows

__all__ = [
    "check_app",
    "check_app_deployment",
    "check_app_snapshot",
    "check_generic",
]

#: What is checked: an app (its system, projections and own invariants), or a bare system.
Checked = App | System


def _system(checked: Checked, system: System | None, settings: Settings | None) -> System:
    if system is not None:
        return system
    if isinstance(checked, System):
        return checked
    return checked.default if settings is None else checked.system(settings)


def _answers(checked: Checked) -> Answers:
    return checked.answers if isinstance(checked, App) else {}


async def check_generic(
    snapshot: AuditSnapshot, system: System, projections: Sequence[Projection] = ()
) -> list[Violation]:
    """The invariants any system keeps (I1, I5 .. I9), each read model rebuilt (I7)."""
    violations: list[Violation] = []
    violations.extend(check_started(snapshot, system))
    violations.extend(check_terminal(snapshot, system))
    violations.extend(check_once(snapshot))
    violations.extend(check_versions(snapshot, system))
    for projection in projections:
        violations.extend(await check_read_model(snapshot, projection))
    violations.extend(check_no_loss(snapshot))
    violations.extend(check_delivered(snapshot, system))
    return violations


async def check_app_snapshot(
    checked: Checked,
    snapshot: AuditSnapshot,
    *,
    system: System | None = None,
    settings: Settings | None = None,
    invariants: Sequence[Invariant] | None = None,
) -> list[Violation]:
    """Every invariant ``checked`` breaks in ``snapshot``: the generic ones, then its own.

    ``invariants`` replaces the app's own (``App.invariants``), to check them with options of a
    test (an initial state the test knows). The violations come grouped by invariant id, the
    generic ones first within each.
    """
    built = _system(checked, system, settings)
    projections: Sequence[Projection] = checked.projections if isinstance(checked, App) else ()
    own: Sequence[Invariant] = (
        invariants
        if invariants is not None
        else checked.invariants
        if isinstance(checked, App)
        else ()
    )
    violations = await check_generic(snapshot, built, projections)
    for invariant in own:
        violations.extend(invariant(snapshot))
    return sorted(violations, key=lambda violation: violation.invariant)


async def check_app(
    checked: Checked,
    store: AuditRows,
    *,
    system: System | None = None,
    settings: Settings | None = None,
    invariants: Sequence[Invariant] | None = None,
) -> list[Violation]:
    """Every invariant ``checked`` breaks in ``store``; an empty list when it keeps them all.

    ``store`` holds every service's state and the bus (the embedded default). ``system`` (else
    the app's, built with ``settings``) gives the routes, subscribers and sagas.
    """
    built = _system(checked, system, settings)
    snapshot = await AuditSnapshot.from_store(store, built)
    return await check_app_snapshot(checked, snapshot, system=built, invariants=invariants)


async def check_app_deployment(
    checked: Checked,
    deployment: Deployment,
    *,
    system: System | None = None,
    settings: Settings | None = None,
    invariants: Sequence[Invariant] | None = None,
) -> list[Violation]:
    """Every invariant ``checked`` breaks across the stores (and bus) of ``deployment``.

    Works for a database per service with any bus (the bus's own rows are checked too when it
    is a database, as a SQLite or PostgreSQL bus is) and for stores co-located with their bus.
    """
    built = _system(checked, system, settings)
    snapshot = await AuditSnapshot.from_deployment(deployment, built, answers=_answers(checked))
    return await check_app_snapshot(checked, snapshot, system=built, invariants=invariants)
