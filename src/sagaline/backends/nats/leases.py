"""Partition leases: how the members of a consumer share its partitions through one lease
document in a key-value bucket (see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def rebalance(
    document: Mapping[str, Any], member: str, now: float, lease: float, partitions: int
) -> tuple[list[int], dict[str, Any]]:
    """One member's turn on a consumer's lease document: heartbeat, then hold a fair share.

    Returns the partitions ``member`` now holds and the document to write back. Members and
    leases whose expiry time has passed are dropped; a member holding more than
    ``ceil(partitions / live members)`` gives the surplus up, one holding fewer takes free ones.
    """
    members = {
        str(name): float(expires)
        for name, expires in dict(document.get("members", {})).items()
        if float(expires) > now
    }
    members[member] = now + lease
    owners: dict[int, tuple[str, float]] = {}
    for part, (owner, expires) in dict(document.get("owners", {})).items():
        if float(expires) > now and owner in members and int(part) < partitions:
            owners[int(part)] = (str(owner), float(expires))
    share = math.ceil(partitions / len(members))
    mine = sorted(part for part, (owner, _) in owners.items() if owner == member)
    if len(mine) > share:
        for part in mine[share:]:
            del owners[part]
        mine = mine[:share]
    elif len(mine) < share:
        free = [part for part in range(partitions) if part not in owners]
        mine = sorted(mine + free[: share - len(mine)])
    for part in mine:
        owners[part] = (member, now + lease)
    return mine, {
        "members": members,
        "owners": {
            str(part): [owner, expires] for part, (owner, expires) in sorted(owners.items())
        },
    }


def _without(document: Mapping[str, Any], member: str) -> dict[str, Any]:
    """The lease document with ``member`` and its leases removed."""
    members = {k: v for k, v in dict(document.get("members", {})).items() if k != member}
    owners = {k: v for k, v in dict(document.get("owners", {})).items() if v[0] != member}
    return {"members": members, "owners": owners}
