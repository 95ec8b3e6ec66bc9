"""The planning of a database bus's claims and settlements, whatever the SQL dialect.

Each function takes rows as a bus read them and the bus's state, and returns what to hand out
and what to write; the buses (:mod:`sagaline.backends.sqlite.bus`,
:mod:`sagaline.backends.postgres.bus`) keep only their SQL and their I/O.

* Partition sharing: the live members of a subscriber hold a fair share of its partitions each
  (:func:`share_partitions`).
* A subscription claim reads the log past the lowest cursor of the partitions this member holds
  and is due to read, and hands out what lies past each partition's own cursor
  (:func:`plan_subscription_claim`). A partition's head handed out before and never settled
  (its consumer died) counts an attempt; a head with unfinished attempts goes alone, by the poison
  isolation rule of :mod:`sagaline.handling.isolation`, the same as a command queue's claim.
* Settling a batch: which outcome completes a command, schedules a retry at the policy's delay,
  or gives it back uncounted (:func:`settle_queue`); how far each partition's cursor moves and
  with which attempts and due time (:func:`settle_subscription`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaline.backends._sql.constants import PARTITIONS, SCAN_FACTOR
from sagaline.backends._sql.rows import envelope_from_row
from sagaline.handling.isolation import claim_alone, first_suspect
from sagaline.ports import Delivery, Outcome, RetryPolicy

__all__ = [
    "Membership",
    "PartitionShare",
    "QueueSettlement",
    "SubscriptionClaim",
    "SubscriptionCursor",
    "SubscriptionState",
    "claim_alone",
    "plan_subscription_claim",
    "scan_length",
    "settle_queue",
    "settle_subscription",
    "share_partitions",
]


# ------------------------------------------------------------------------ partition sharing


@dataclass(slots=True)
class Membership:
    """What a member of a subscriber last learnt of its partitions, and when (monotonic)."""

    # Never refreshed: due at once, whatever the clock's monotonic reading (a fake one starts at 0).
    refreshed: float = -math.inf
    owned: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PartitionShare:
    """The partitions a member holds after a refresh, and those it hands back."""

    owned: list[int]
    released: list[int]


def share_partitions(
    leases: Iterable[Sequence[Any]], member: str, live: int, now: float
) -> PartitionShare:
    """A fair share of a subscriber's partitions for ``member``, one of ``live`` members.

    ``leases``: every partition's ``(part, lease_owner, lease_expires)``, in partition order.
    The member keeps what it holds up to its share and hands back the rest; short of its share,
    it takes the free partitions (never leased, or their lease expired) with the lowest numbers.
    """
    share = math.ceil(PARTITIONS / max(1, live))
    owned: list[int] = []
    free: list[int] = []
    for part, owner, expires in leases:
        if owner == member and expires is not None and expires >= now:
            owned.append(part)
        elif owner is None or expires is None or expires < now:
            free.append(part)
    released: list[int] = []
    if len(owned) > share:
        released = owned[share:]
        owned = owned[:share]
    elif len(owned) < share:
        owned.extend(free[: share - len(owned)])
    return PartitionShare(owned=sorted(owned), released=released)


# ------------------------------------------------------------------------ subscription claims


@dataclass(slots=True)
class SubscriptionCursor:
    """Adapter state for settling a subscription batch: the cursors of the partitions it read,
    their attempts, and how far the scan went."""

    positions: dict[int, int]
    attempts: dict[int, int]
    scanned_to: int


@dataclass(slots=True)
class SubscriptionState:
    """The partitions a member holds, as their rows were read at a claim."""

    #: The cursor of each partition due to be read now (not waiting for a retry).
    eligible: dict[int, int]
    #: The attempts spent on each partition's head.
    attempts: dict[int, int]
    #: The position of each partition's head as last handed out and not settled (0: none).
    claimed: dict[int, int]

    @classmethod
    def of(cls, rows: Iterable[Sequence[Any]], wall: float) -> SubscriptionState:
        """From rows of ``(part, position, attempts, available_at, claimed, ...)``."""
        eligible: dict[int, int] = {}
        attempts: dict[int, int] = {}
        claimed: dict[int, int] = {}
        for row in rows:
            part = row[0]
            if row[3] <= wall:
                eligible[part] = int(row[1])
            attempts[part] = int(row[2])
            claimed[part] = int(row[4])
        return cls(eligible, attempts, claimed)

    @property
    def start(self) -> int:
        """Where the scan of the log starts: the lowest cursor due to be read."""
        return min(self.eligible.values())


@dataclass(slots=True)
class SubscriptionClaim:
    """What a subscription claim hands out and writes."""

    deliveries: list[Delivery]
    #: ``(part, position, attempts)``: the head handed out of each partition, to record as
    #: claimed with its attempts, so that a consumer's death on it is counted next time.
    marks: list[tuple[int, int, int]]
    cursor: SubscriptionCursor
    #: The scan found nothing past the cursors: there is no batch.
    empty: bool


def scan_length(limit: int) -> int:
    """How many log rows of the wanted types a claim of ``limit`` deliveries reads at most."""
    return limit * SCAN_FACTOR


def plan_subscription_claim(
    rows: Iterable[Sequence[Any]], state: SubscriptionState, head: int, limit: int
) -> SubscriptionClaim:
    """Plan a claim from the log rows past ``state.start`` (``(position, part, *envelope)`` in
    position order, at most :func:`scan_length` of them; the iteration stops as soon as the
    batch is full) with the log's head at ``head``.
    """
    eligible = state.eligible
    attempts = state.attempts
    claimed = state.claimed
    scan = scan_length(limit)
    deliveries: list[Delivery] = []
    heads: list[Delivery] = []
    first_seen: set[int] = set()
    marks: list[tuple[int, int, int]] = []
    scanned_to = head
    seen = 0
    position = 0
    for row in rows:
        seen += 1
        position, part = row[0], row[1]
        cursor = eligible.get(part)
        if cursor is None or position <= cursor:
            continue
        attempt = 1
        is_head = part not in first_seen
        if is_head:
            first_seen.add(part)
            if claimed.get(part) == position:  # handed out before, never settled
                attempts[part] = attempts.get(part, 0) + 1
            attempt = attempts.get(part, 0) + 1
            marks.append((part, position, attempts.get(part, 0)))
        delivery = Delivery(
            envelope=envelope_from_row(row, 2),
            attempt=attempt,
            ordering_key=part,
            token=position,
        )
        if is_head:
            heads.append(delivery)
        deliveries.append(delivery)
        if len(deliveries) >= limit:
            scanned_to = position
            break
    else:
        if seen == scan:  # the scan stopped short of the head
            scanned_to = position
    # Only a partition's head can have been handed out before: the first of them with
    # unfinished attempts goes alone, and the other partitions keep their cursors.
    suspect = first_suspect(heads, _unfinished)
    if suspect is not None:
        part = suspect.ordering_key
        deliveries = [suspect]
        eligible = {part: eligible[part]}
        scanned_to = suspect.token
        marks = [mark for mark in marks if mark[0] == part]
    return SubscriptionClaim(
        deliveries=deliveries,
        marks=marks,
        cursor=SubscriptionCursor(positions=eligible, attempts=attempts, scanned_to=scanned_to),
        empty=scanned_to == state.start,
    )


def _unfinished(delivery: Delivery) -> int:
    """How many times a database bus handed ``delivery`` out before without it completing."""
    return delivery.attempt - 1


# ------------------------------------------------------------------------ settlement


@dataclass(slots=True)
class QueueSettlement:
    """What settling a batch of commands writes."""

    #: ``(token, outcome, error)``: completed, ``"handled"`` or ``"dead"`` (dead-lettered).
    done: list[tuple[Any, str, str | None]]
    #: ``(token, due, error)``: to be delivered again from ``due`` on (the policy's backoff).
    retry: list[tuple[Any, float, str | None]]
    #: Tokens given back uncounted (skipped behind a failure, or a store failure's batch).
    release: list[Any]


def settle_queue(
    deliveries: Sequence[Delivery],
    outcomes: Sequence[tuple[Outcome, str | None]],
    policy: RetryPolicy,
    wall: float,
) -> QueueSettlement:
    """Sort a batch of commands by what its outcomes write (``wall``: the time now)."""
    done: list[tuple[Any, str, str | None]] = []
    retry: list[tuple[Any, float, str | None]] = []
    release: list[Any] = []
    for delivery, (outcome, error) in zip(deliveries, outcomes, strict=True):
        if outcome is Outcome.ACK:
            done.append((delivery.token, "handled", error))
        elif outcome is Outcome.DEAD:
            done.append((delivery.token, "dead", error))
        elif outcome is Outcome.RETRY:
            retry.append((delivery.token, wall + policy.delay(delivery.attempt), error))
        else:
            release.append(delivery.token)
    return QueueSettlement(done=done, retry=retry, release=release)


def settle_subscription(
    deliveries: Sequence[Delivery],
    outcomes: Sequence[tuple[Outcome, str | None]],
    cursor: SubscriptionCursor,
    policy: RetryPolicy,
    wall: float,
) -> list[tuple[int, int, int, float, str | None]]:
    """Each partition the batch read, in order, as ``(part, position, attempts, due, error)``.

    A partition stops before its first delivery retried or skipped; before that it moves to the
    end of the scan. A retried head spends an attempt and waits for the policy's delay; one
    skipped behind another key's failure spends none. ``position`` only ever moves forward (the
    SQL keeps the greater of it and the stored one).
    """
    stop: dict[int, tuple[int, int, str | None]] = {}
    for delivery, (outcome, error) in zip(deliveries, outcomes, strict=True):
        part = delivery.ordering_key
        if part in stop:
            continue
        if outcome is Outcome.RETRY or outcome is Outcome.SKIP:
            stop[part] = (delivery.token - 1, delivery.attempt, error)
    updates: list[tuple[int, int, int, float, str | None]] = []
    for part in sorted(cursor.positions):
        if part in stop:
            position, attempt, error = stop[part]
            if error is None:  # skipped behind another key's failure: no attempt spent
                updates.append((part, position, cursor.attempts.get(part, 0), 0.0, None))
            else:
                updates.append((part, position, attempt, wall + policy.delay(attempt), error))
        else:
            updates.append((part, cursor.scanned_to, 0, 0.0, None))
    return updates
