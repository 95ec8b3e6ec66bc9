"""The bus half of the SQLite backend: command queues with leases, partitioned subscriptions.

Commands are a work queue per service with leases: a claim leases the oldest pending message of
each correlation key (one in flight per key keeps per-key order); a dead consumer's lease expires
and the message is delivered again. Events are a retained log (the event store itself) read by each
subscriber through a cursor per partition; partitions are leased to the live members of a
subscriber so that several processes share the work while each key stays in order.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from sagaline.backends._sql.constants import MEMBERSHIP_INTERVAL, PARTITIONS, SCAN_FACTOR
from sagaline.backends._sql.rows import ENVELOPE_COLUMNS, envelope_from_row
from sagaline.backends.sqlite.failures import unavailable
from sagaline.clock import Clock
from sagaline.ports import Batch, ConsumerSpec, Delivery, Outcome

__all__ = ["SqliteBus"]


@dataclass(slots=True)
class _SubscriptionCursor:
    """Adapter state for settling a subscription batch."""

    positions: dict[int, int]
    attempts: dict[int, int]
    scanned_to: int


@dataclass(slots=True)
class _Membership:
    # Never refreshed: due at once, whatever the clock's monotonic reading (a fake one starts at 0).
    refreshed: float = -math.inf
    owned: list[int] = field(default_factory=list)


class SqliteBus:
    """Claims, settlement and wake-ups, on the connection of a :class:`SqliteDatabase`."""

    connection: sqlite3.Connection
    path: str
    url: str
    lease_seconds: float
    clock: Clock
    _lock: asyncio.Lock
    _wakeups: dict[tuple[str, str], asyncio.Event]
    _members: dict[tuple[str, str], _Membership]

    def _init_bus(self) -> None:
        """The bus's in-process state: wake-ups per consumer, memberships per subscriber."""
        self._wakeups = {}
        self._members = {}

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Lease up to ``limit`` deliveries for ``consumer``."""
        # Arm the wake-up before looking: a commit from now on wakes a later wait_for_work.
        self._wakeup(consumer).clear()
        async with self._lock:
            try:
                if consumer.source == "queue":
                    return self._claim_queue(consumer, member, limit)
                return self._claim_subscription(consumer, member, limit)
            except sqlite3.Error as exc:
                translated = unavailable(exc, self.url, self.path)
                if translated is None:
                    raise
                raise translated from exc

    @contextmanager
    def _without_fsync(self) -> Iterator[None]:
        """Commit without waiting for the disk: only for bookkeeping that may be lost.

        A lease or membership row lost to a power cut only makes a message claimable again
        sooner; the next FULL commit flushes these WAL frames along with its own.
        """
        self.connection.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self.connection.execute("PRAGMA synchronous=FULL")

    def _claim_queue(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        with self._without_fsync():
            return self._claim_queue_rows(consumer, member, limit)

    def _claim_queue_rows(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        conn = self.connection
        now = self.clock.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            candidates = conn.execute(
                "SELECT c.id, c.attempts FROM commands c"
                " WHERE c.queue = ? AND c.done = 0 AND c.available_at <= ?"
                "  AND (c.lease_expires IS NULL OR c.lease_expires < ?)"
                "  AND NOT EXISTS (SELECT 1 FROM commands p WHERE p.queue = c.queue"
                "   AND p.key = c.key AND p.done = 0 AND p.id < c.id)"
                " ORDER BY c.id LIMIT ?",
                (consumer.name, now, now, limit),
            ).fetchall()
            # A message delivered before and not completed may be one that kills its consumer:
            # it goes alone, so that it never takes a batch of others down with it.
            suspect = next((row[0] for row in candidates if row[1] > 0), None)
            ids = [suspect] if suspect is not None else [row[0] for row in candidates]
            rows = []
            if ids:
                rows = conn.execute(
                    "UPDATE commands SET lease_owner = ?, lease_expires = ?,"
                    f" attempts = attempts + 1 WHERE id IN ({','.join('?' * len(ids))})"
                    f" RETURNING id, attempts, key, {ENVELOPE_COLUMNS}",
                    (member, now + self.lease_seconds, *ids),
                ).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        rows.sort(key=lambda row: row[0])
        deliveries = [
            Delivery(
                envelope=envelope_from_row(row, 3),
                attempt=row[1],
                ordering_key=row[2],
                token=row[0],
            )
            for row in rows
        ]
        return Batch(consumer=consumer, deliveries=deliveries)

    def _refresh_membership(self, consumer: ConsumerSpec, member: str, now: float) -> list[int]:
        """Heartbeat, then hold a fair share of the subscriber's partitions (in a transaction)."""
        conn = self.connection
        name = consumer.name
        conn.execute(
            "INSERT INTO members (consumer, member, heartbeat) VALUES (?, ?, ?)"
            " ON CONFLICT (consumer, member) DO UPDATE SET heartbeat = excluded.heartbeat",
            (name, member, now),
        )
        conn.execute(
            "DELETE FROM members WHERE consumer = ? AND heartbeat < ?",
            (name, now - self.lease_seconds),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO subscriptions (subscriber, part) VALUES (?, ?)",
            [(name, part) for part in range(PARTITIONS)],
        )
        live = conn.execute("SELECT COUNT(*) FROM members WHERE consumer = ?", (name,)).fetchone()[
            0
        ]
        share = math.ceil(PARTITIONS / max(1, live))
        expires = now + self.lease_seconds
        owned = [
            row[0]
            for row in conn.execute(
                "SELECT part FROM subscriptions WHERE subscriber = ? AND lease_owner = ?"
                " AND lease_expires >= ? ORDER BY part",
                (name, member, now),
            )
        ]
        if len(owned) > share:
            surplus = owned[share:]
            owned = owned[:share]
            conn.executemany(
                "UPDATE subscriptions SET lease_owner = NULL, lease_expires = NULL"
                " WHERE subscriber = ? AND part = ? AND lease_owner = ?",
                [(name, part, member) for part in surplus],
            )
        elif len(owned) < share:
            free = [
                row[0]
                for row in conn.execute(
                    "SELECT part FROM subscriptions WHERE subscriber = ?"
                    " AND (lease_owner IS NULL OR lease_expires < ?) ORDER BY part LIMIT ?",
                    (name, now, share - len(owned)),
                )
            ]
            owned.extend(free)
        conn.executemany(
            "UPDATE subscriptions SET lease_owner = ?, lease_expires = ?"
            " WHERE subscriber = ? AND part = ?",
            [(member, expires, name, part) for part in owned],
        )
        return sorted(owned)

    def _claim_subscription(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        with self._without_fsync():
            return self._claim_subscription_rows(consumer, member, limit)

    def _claim_subscription_rows(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        conn = self.connection
        now = self.clock.monotonic()
        wall = self.clock.time()
        membership = self._members.setdefault((consumer.name, member), _Membership())
        conn.execute("BEGIN IMMEDIATE")
        try:
            if now - membership.refreshed > MEMBERSHIP_INTERVAL:
                membership.owned = self._refresh_membership(consumer, member, wall)
                membership.refreshed = now
            if not membership.owned:
                conn.execute("COMMIT")
                return Batch(consumer=consumer, deliveries=[])
            marks = ",".join("?" * len(membership.owned))
            state = conn.execute(
                "SELECT part, position, attempts, available_at, claimed FROM subscriptions"
                f" WHERE subscriber = ? AND lease_owner = ? AND part IN ({marks})",
                (consumer.name, member, *membership.owned),
            ).fetchall()
            eligible = {part: position for part, position, _, due, _ in state if due <= wall}
            attempts = {part: tries for part, _, tries, _, _ in state}
            claimed = {part: first for part, _, _, _, first in state}
            if not eligible:
                conn.execute("COMMIT")
                return Batch(consumer=consumer, deliveries=[])
            start = min(eligible.values())
            head = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
            wanted = sorted(consumer.message_types)
            rows = conn.execute(
                f"SELECT position, part, {ENVELOPE_COLUMNS} FROM events"
                f" WHERE position > ? AND type IN ({','.join('?' * len(wanted))})"
                " ORDER BY position LIMIT ?",
                (start, *wanted, limit * SCAN_FACTOR),
            )
            deliveries: list[Delivery] = []
            first_seen: set[int] = set()
            marks_claimed: list[tuple[int, int, str, int]] = []
            first_of: dict[int, int] = {}
            scanned_to = head
            seen = 0
            for row in rows:
                seen += 1
                position, part = row[0], row[1]
                cursor = eligible.get(part)
                if cursor is None or position <= cursor:
                    continue
                attempt = 1
                if part not in first_seen:
                    first_seen.add(part)
                    if claimed.get(part) == position:  # handed out before, never settled
                        attempts[part] = attempts.get(part, 0) + 1
                    attempt = attempts.get(part, 0) + 1
                    marks_claimed.append((position, attempts.get(part, 0), consumer.name, part))
                    first_of[part] = position
                deliveries.append(
                    Delivery(
                        envelope=envelope_from_row(row, 2),
                        attempt=attempt,
                        ordering_key=part,
                        token=position,
                    )
                )
                if len(deliveries) >= limit:
                    scanned_to = position
                    break
            else:
                if seen == limit * SCAN_FACTOR:  # the scan stopped short of the head
                    scanned_to = position
            rows.close()
            suspect = next(
                (
                    d
                    for d in deliveries
                    if d.attempt > 1 and d.token == first_of.get(d.ordering_key)
                ),
                None,
            )
            if suspect is not None:
                # The head of a partition that failed or killed its consumer goes alone: the
                # other partitions keep their cursors and are claimed again afterwards.
                part = suspect.ordering_key
                deliveries = [suspect]
                eligible = {part: eligible[part]}
                scanned_to = suspect.token
                marks_claimed = [m for m in marks_claimed if m[3] == part]
            conn.executemany(
                "UPDATE subscriptions SET claimed = ?, attempts = ?"
                " WHERE subscriber = ? AND part = ?",
                marks_claimed,
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if scanned_to == start:
            return Batch(consumer=consumer, deliveries=[])
        return Batch(
            consumer=consumer,
            deliveries=deliveries,
            cursor=_SubscriptionCursor(
                positions=eligible, attempts=attempts, scanned_to=scanned_to
            ),
        )

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Hand back what ``member`` holds at once: its membership and partition leases.

        A stopping worker calls it, so its successor does not wait for the leases to expire;
        claimed commands are left to expire (their batch was settled, or it was cut short).
        """
        if consumer.source != "subscription":
            return
        async with self._lock:
            conn = self.connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "DELETE FROM members WHERE consumer = ? AND member = ?",
                    (consumer.name, member),
                )
                conn.execute(
                    "UPDATE subscriptions SET lease_owner = NULL, lease_expires = NULL"
                    " WHERE subscriber = ? AND lease_owner = ?",
                    (consumer.name, member),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        self._members.pop((consumer.name, member), None)

    async def settle(
        self,
        tx: Any,
        batch: Batch,
        outcomes: Sequence[tuple[Outcome, str | None]],
    ) -> None:
        """Acknowledge, schedule retries and dead-letter inside the handling transaction."""
        conn = self.connection
        wall = self.clock.time()
        policy = batch.consumer.retry
        if batch.consumer.source == "queue":
            done: list[tuple[Any, ...]] = []
            retry: list[tuple[Any, ...]] = []
            release: list[tuple[Any, ...]] = []
            for delivery, (outcome, error) in zip(batch.deliveries, outcomes, strict=True):
                if outcome is Outcome.ACK or outcome is Outcome.DEAD:
                    done.append(
                        ("handled" if outcome is Outcome.ACK else "dead", error, delivery.token)
                    )
                elif outcome is Outcome.RETRY:
                    retry.append((wall + policy.delay(delivery.attempt), error, delivery.token))
                else:
                    release.append((delivery.token,))
            conn.executemany(
                "UPDATE commands SET done = 1, outcome = ?, last_error = ?, lease_owner = NULL,"
                " lease_expires = NULL WHERE id = ?",
                done,
            )
            conn.executemany(
                "UPDATE commands SET available_at = ?, last_error = ?, lease_owner = NULL,"
                " lease_expires = NULL WHERE id = ?",
                retry,
            )
            conn.executemany(
                "UPDATE commands SET lease_owner = NULL, lease_expires = NULL,"
                " attempts = attempts - 1 WHERE id = ?",
                release,
            )
            return
        state: _SubscriptionCursor = batch.cursor
        # A partition stops at its first retried delivery; before that it moves to the scan's end.
        stop: dict[int, tuple[int, int, str | None]] = {}
        for delivery, (outcome, error) in zip(batch.deliveries, outcomes, strict=True):
            part = delivery.ordering_key
            if part in stop:
                continue
            if outcome is Outcome.RETRY or outcome is Outcome.SKIP:
                stop[part] = (delivery.token - 1, delivery.attempt, error)
        updates: list[tuple[Any, ...]] = []
        for part in state.positions:
            if part in stop:
                position, attempt, error = stop[part]
                if error is None:  # skipped behind another key's failure: no attempt spent
                    updates.append((position, state.attempts.get(part, 0), 0.0, None, part))
                else:
                    updates.append((position, attempt, wall + policy.delay(attempt), error, part))
            else:
                updates.append((state.scanned_to, 0, 0.0, None, part))
        conn.executemany(
            "UPDATE subscriptions SET position = MAX(position, ?), attempts = ?,"
            " available_at = ?, last_error = ?, claimed = 0 WHERE subscriber = ? AND part = ?",
            [(p, a, due, err, batch.consumer.name, part) for p, a, due, err, part in updates],
        )

    async def wait_for_work(self, consumer: ConsumerSpec, timeout: float) -> None:
        """Wait for an in-process commit that wrote messages, or poll after ``timeout``."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup(consumer).wait(), timeout)

    def _wakeup(self, consumer: ConsumerSpec) -> asyncio.Event:
        key = (consumer.name, consumer.source)
        event = self._wakeups.get(key)
        if event is None:
            event = self._wakeups[key] = asyncio.Event()
        return event

    def reset_subscription(self, subscriber: str, position: int) -> None:
        """Move every partition cursor of ``subscriber`` to ``position`` (inside a transaction)."""
        self.connection.executemany(
            "INSERT OR IGNORE INTO subscriptions (subscriber, part) VALUES (?, ?)",
            [(subscriber, part) for part in range(PARTITIONS)],
        )
        self.connection.execute(
            "UPDATE subscriptions SET position = ?, attempts = 0, available_at = 0, claimed = 0,"
            " last_error = NULL WHERE subscriber = ?",
            (position, subscriber),
        )
