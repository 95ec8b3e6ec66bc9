"""Partition leases: how the members of a consumer share its partitions through one lease
document in a key-value bucket (see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from sagaline.backends.nats.lanes import _Group
from sagaline.clock import Clock

log = logging.getLogger("sagaline.nats")


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


class Leases:
    """A member's turns on its consumers' lease documents: heartbeat and fair share, give back.

    Expiry times in the documents are wall-clock times (:meth:`Clock.time`), compared by every
    member; how long this process may go on without a refresh is measured on the monotonic clock.
    """

    def __init__(self, partitions: int, lease_seconds: float, clock: Clock) -> None:
        self.partitions = partitions
        self.lease_seconds = lease_seconds
        self.clock = clock
        #: Seconds between two refreshes of a member's leases.
        self.refresh_interval = min(1.0, lease_seconds / 4)

    def due(self, group: _Group, now: float) -> bool:
        """Whether ``group``'s leases are to be refreshed at monotonic time ``now``."""
        return now - group.refreshed >= self.refresh_interval

    async def refresh(self, kv: KeyValue, group: _Group) -> list[int] | None:
        """Heartbeat on the consumer's lease document and hold a fair share of its partitions.

        Returns the partitions the member now holds, or None when the document could not be
        written (what the member holds stays as it is until its validity runs out).
        """
        started = self.clock.monotonic()
        try:
            for _ in range(10):
                wall = self.clock.time()
                try:
                    entry = await kv.get(group.lease_key)
                    document = json.loads(entry.value or b"{}")
                    revision = entry.revision or 0
                except KeyNotFoundError:
                    document, revision = {}, 0
                owned, updated = rebalance(
                    document, group.member, wall, self.lease_seconds, self.partitions
                )
                try:
                    await kv.update(group.lease_key, json.dumps(updated).encode(), last=revision)
                except KeyWrongLastSequenceError:
                    continue
                break
            else:
                return None
        except Exception as exc:
            log.warning("NATS: lease refresh of %s failed: %s", group.lease_key, exc)
            return None
        group.refreshed = started
        group.valid_until = started + self.lease_seconds - self.refresh_interval
        return owned

    async def give_back(self, kv: KeyValue, group: _Group) -> None:
        """Remove the member and its leases from the consumer's lease document."""
        for _ in range(10):
            try:
                entry = await kv.get(group.lease_key)
            except KeyNotFoundError:
                break
            document = _without(json.loads(entry.value or b"{}"), group.member)
            try:
                await kv.update(group.lease_key, json.dumps(document).encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            break
