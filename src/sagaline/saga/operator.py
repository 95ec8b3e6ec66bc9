"""Operator actions on saga instances, from Python (the CLI's ``saga`` commands use these).

An action (:data:`~sagaline.saga.state.ACTIONS`) is checked against the saga's state here, so
that one the state does not allow is refused at once with the reason, then sent to the saga's
orchestrator as a :class:`~sagaline.saga.messages.SagaActionRequested` event. The orchestrator
checks it again in the unit of work that carries it out (the saga may have moved meanwhile) and
records it in the saga's history with who asked, when and why, so the audit trail shows it.

An action is idempotent: its message id is made of the saga, the action and the version of the
saga record it was asked against, so asking twice before the saga moves is one action.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sagaline.deploy import Deployment
from sagaline.errors import ActionRefused, DuplicateMessageId, SagaNotFound
from sagaline.handling import System
from sagaline.messages import message_id_problem
from sagaline.ports import SagaRecord
from sagaline.saga.definition import SagaDefinition
from sagaline.saga.messages import SagaActionRequested
from sagaline.saga.state import action_refused

__all__ = ["Asked", "find_saga", "request_action"]


@dataclass(frozen=True)
class Asked:
    """An action sent: the saga as it was when asked, and the id of the request."""

    record: SagaRecord
    message_id: str


def keeper_of(system: System, saga_id: str) -> tuple[str, dict[int, SagaDefinition]]:
    """The service that keeps the saga ``saga_id`` and the versions of its definition."""
    name = saga_id.partition(":")[0]
    for service in system.services.values():
        versions = {d.version: d for d in service.sagas if d.name == name}
        if versions:
            return service.name, versions
    raise SagaNotFound(f"no service of the system keeps sagas named {name!r} ({saga_id})")


async def find_saga(deployment: Deployment, system: System, saga_id: str) -> SagaRecord:
    """The saga instance ``saga_id`` with its history; :class:`SagaNotFound` when none."""
    service, _ = keeper_of(system, saga_id)
    record = await deployment.queries(service).get_saga(saga_id, history=True)
    if record is None:
        raise SagaNotFound(f"no saga {saga_id}")
    return record


def _request_id(saga_id: str, action: str, version: int) -> str:
    candidate = f"op:{saga_id}:{action}:{version}"
    if message_id_problem(candidate) is None:
        return candidate
    return f"op:h{hashlib.blake2b(candidate.encode(), digest_size=16).hexdigest()}"


async def request_action(
    deployment: Deployment,
    system: System,
    saga_id: str,
    action: str,
    *,
    by: str,
    reason: str,
) -> Asked:
    """Ask ``action`` of saga ``saga_id``, by ``by`` for ``reason``.

    Raises :class:`SagaNotFound`, or :class:`ActionRefused` when the saga's state does not allow
    the action (or the same action was asked with another reason at this state).
    """
    service, versions = keeper_of(system, saga_id)
    record = await find_saga(deployment, system, saga_id)
    sends = system.services[service].drives_sagas
    problem = action_refused(action, record, versions.get(record.definition_version), sends=sends)
    if problem:
        raise ActionRefused(problem)
    if not by.strip() or not reason.strip():
        raise ActionRefused("an action needs who asks (by) and why (reason)")
    message_id = _request_id(saga_id, action, record.version)
    asked = SagaActionRequested(
        saga_id=saga_id,
        key=saga_id.partition(":")[2],
        action=action,
        by=by,
        reason=reason,
    )
    try:
        await system.submit_internal(
            deployment.entry, [asked], source=service, message_ids=[message_id]
        )
    except DuplicateMessageId:
        raise ActionRefused(
            f"{action} of {saga_id} was already asked at this state, with another reason"
        ) from None
    return Asked(record, message_id)
