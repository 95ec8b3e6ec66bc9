"""The bus half of the SQLite backend: command queues with leases, partitioned subscriptions.

Commands are a work queue per service with leases: a claim leases the oldest pending message of
each correlation key (one in flight per key keeps per-key order); a dead consumer's lease expires
and the message is delivered again. Events are a retained log (the event store itself) read by each
subscriber through a cursor per partition; partitions are leased to the live members of a
subscriber so that several processes share the work while each key stays in order.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from sagaline.backends._sql.constants import MEMBERSHIP_INTERVAL, PARTITIONS
from sagaline.backends._sql.planner import (
    Membership,
    SubscriptionCursor,
    SubscriptionState,
    claim_alone,
    plan_subscription_claim,
    scan_length,
    settle_queue,
    settle_subscription,
    share_partitions,
)
from sagaline.backends._sql.rows import ENVELOPE_COLUMNS, envelope_from_row
from sagaline.backends.sqlite.failures import unavailable
from sagaline.backends.sqlite.rows import immediate
from sagaline.clock import Clock
from sagaline.ports import Batch, ConsumerSpec, Delivery, Outcome

__all__ = ["SqliteBus"]


class SqliteBus:
    """Claims, settlement and wake-ups, on the connection of a :class:`SqliteDatabase`."""

    connection: sqlite3.Connection
    path: str
    url: str
    lease_seconds: float
    clock: Clock
    _lock: asyncio.Lock
    _wakeups: dict[tuple[str, str], asyncio.Event]
    _members: dict[tuple[str, str], Membership]

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
        with immediate(conn):
            candidates = conn.execute(
                "SELECT c.id, c.attempts FROM commands c"
                " WHERE c.queue = ? AND c.done = 0 AND c.available_at <= ?"
                "  AND (c.lease_expires IS NULL OR c.lease_expires < ?)"
                "  AND NOT EXISTS (SELECT 1 FROM commands p WHERE p.queue = c.queue"
                "   AND p.key = c.key AND p.done = 0 AND p.id < c.id)"
                " ORDER BY c.id LIMIT ?",
                (consumer.name, now, now, limit),
            ).fetchall()
            # Poison isolation (sagaline.handling.isolation): a command handed out before and
            # not completed goes alone.
            ids = [row[0] for row in claim_alone(candidates, _attempts)]
            rows = []
            if ids:
                rows = conn.execute(
                    "UPDATE commands SET lease_owner = ?, lease_expires = ?,"
                    f" attempts = attempts + 1 WHERE id IN ({','.join('?' * len(ids))})"
                    f" RETURNING id, attempts, key, {ENVELOPE_COLUMNS}",
                    (member, now + self.lease_seconds, *ids),
                ).fetchall()
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
        leases = conn.execute(
            "SELECT part, lease_owner, lease_expires FROM subscriptions WHERE subscriber = ?"
            " ORDER BY part",
            (name,),
        ).fetchall()
        share = share_partitions(leases, member, live, now)
        conn.executemany(
            "UPDATE subscriptions SET lease_owner = NULL, lease_expires = NULL"
            " WHERE subscriber = ? AND part = ? AND lease_owner = ?",
            [(name, part, member) for part in share.released],
        )
        conn.executemany(
            "UPDATE subscriptions SET lease_owner = ?, lease_expires = ?"
            " WHERE subscriber = ? AND part = ?",
            [(member, now + self.lease_seconds, name, part) for part in share.owned],
        )
        return share.owned

    def _claim_subscription(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        with self._without_fsync():
            return self._claim_subscription_rows(consumer, member, limit)

    def _claim_subscription_rows(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        conn = self.connection
        now = self.clock.monotonic()
        wall = self.clock.time()
        membership = self._members.setdefault((consumer.name, member), Membership())
        with immediate(conn):
            if now - membership.refreshed > MEMBERSHIP_INTERVAL:
                membership.owned = self._refresh_membership(consumer, member, wall)
                membership.refreshed = now
            if not membership.owned:
                return Batch(consumer=consumer, deliveries=[])  # committed on leaving the block
            marks = ",".join("?" * len(membership.owned))
            state = SubscriptionState.of(
                conn.execute(
                    "SELECT part, position, attempts, available_at, claimed FROM subscriptions"
                    f" WHERE subscriber = ? AND lease_owner = ? AND part IN ({marks})",
                    (consumer.name, member, *membership.owned),
                ),
                wall,
            )
            if not state.eligible:
                return Batch(consumer=consumer, deliveries=[])
            head = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
            wanted = sorted(consumer.message_types)
            rows = conn.execute(
                f"SELECT position, part, {ENVELOPE_COLUMNS} FROM events"
                f" WHERE position > ? AND type IN ({','.join('?' * len(wanted))})"
                " ORDER BY position LIMIT ?",
                (state.start, *wanted, scan_length(limit)),
            )
            plan = plan_subscription_claim(rows, state, head, limit)
            rows.close()
            conn.executemany(
                "UPDATE subscriptions SET claimed = ?2, attempts = ?3"
                " WHERE subscriber = ?4 AND part = ?1",
                [(*mark, consumer.name) for mark in plan.marks],
            )
        if plan.empty:
            return Batch(consumer=consumer, deliveries=[])
        return Batch(consumer=consumer, deliveries=plan.deliveries, cursor=plan.cursor)

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Hand back what ``member`` holds at once: its membership and partition leases.

        A stopping worker calls it, so its successor does not wait for the leases to expire;
        claimed commands are left to expire (their batch was settled, or it was cut short).
        """
        if consumer.source != "subscription":
            return
        async with self._lock:
            conn = self.connection
            with immediate(conn):
                conn.execute(
                    "DELETE FROM members WHERE consumer = ? AND member = ?",
                    (consumer.name, member),
                )
                conn.execute(
                    "UPDATE subscriptions SET lease_owner = NULL, lease_expires = NULL"
                    " WHERE subscriber = ? AND lease_owner = ?",
                    (consumer.name, member),
                )
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
            settled = settle_queue(batch.deliveries, outcomes, policy, wall)
            conn.executemany(
                "UPDATE commands SET done = 1, outcome = ?2, last_error = ?3, lease_owner = NULL,"
                " lease_expires = NULL WHERE id = ?1",
                settled.done,
            )
            conn.executemany(
                "UPDATE commands SET available_at = ?2, last_error = ?3, lease_owner = NULL,"
                " lease_expires = NULL WHERE id = ?1",
                settled.retry,
            )
            conn.executemany(
                "UPDATE commands SET lease_owner = NULL, lease_expires = NULL,"
                " attempts = attempts - 1 WHERE id = ?",
                [(token,) for token in settled.release],
            )
            return
        cursor: SubscriptionCursor = batch.cursor
        updates = settle_subscription(batch.deliveries, outcomes, cursor, policy, wall)
        conn.executemany(
            "UPDATE subscriptions SET position = MAX(position, ?2), attempts = ?3,"
            " available_at = ?4, last_error = ?5, claimed = 0 WHERE subscriber = ?6 AND part = ?1",
            [(*update, batch.consumer.name) for update in updates],
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


def _attempts(row: tuple[Any, ...]) -> int:
    """A queue candidate's ``(id, attempts)``: how many times it was handed out before."""
    return int(row[1])
