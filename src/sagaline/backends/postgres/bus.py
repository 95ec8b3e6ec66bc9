"""The bus half of the PostgreSQL backend: command queues with leases, partitioned subscriptions.

The same design as the SQLite bus. Commands are a work queue per service: a claim leases the
oldest pending message of each correlation key (``FOR UPDATE SKIP LOCKED`` keeps competing members
apart, one message in flight per key keeps per-key order); an expired lease makes a message
claimable again. Events are a retained log read by each subscriber through a cursor per
partition; partitions are leased to the live members of a subscriber. The log is gap-safe:
positions are given in commit order (see :mod:`.transaction`), so a cursor never passes a
position that a later commit could still fill.

Wake-ups: committing units of work ``pg_notify`` the bus's channel (payload ``q:<queue>`` or
``e`` for the log); one listening connection per process turns them into :class:`asyncio.Event`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sagaline.backends._sql.planner import (
    Membership,
    SubscriptionCursor,
    SubscriptionState,
    plan_subscription_claim,
    scan_length,
    settle_queue,
    settle_subscription,
    share_partitions,
)
from sagaline.backends._sql.rows import ENVELOPE_COLUMNS, envelope_from_row
from sagaline.backends.postgres.failures import unavailable
from sagaline.backends.postgres.schema import MEMBERSHIP_INTERVAL, PARTITIONS, Names
from sagaline.backends.postgres.transaction import PostgresTransaction
from sagaline.clock import Clock
from sagaline.messages import Envelope, check_message_id
from sagaline.ports import Batch, ConsumerSpec, Delivery, Outcome, StoredEvent

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

__all__ = ["PostgresBus"]

log = logging.getLogger("sagaline.backends.postgres")

_QUALIFIED = ", ".join(f"c.{name.strip()}" for name in ENVELOPE_COLUMNS.split(","))


class PostgresBus:
    """Claims, settlement, wake-ups and the broker-bus methods of a :class:`PostgresDatabase`."""

    url: str
    names: Names
    lease_seconds: float
    clock: Clock
    _wakeups: dict[tuple[str, str], asyncio.Event]
    _members: dict[tuple[str, str], Membership]

    async def _ready(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        raise NotImplementedError

    def transaction(self) -> AbstractAsyncContextManager[PostgresTransaction]:
        raise NotImplementedError

    # ----------------------------------------------------------------- claims

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Lease up to ``limit`` deliveries for ``consumer``."""
        pool = await self._ready()
        # Arm the wake-up before looking: a commit from now on wakes a later wait_for_work.
        self._wakeup(consumer).clear()
        try:
            async with pool.connection() as conn:
                if consumer.source == "queue":
                    return await self._claim_queue(conn, consumer, member, limit)
                return await self._claim_subscription(conn, consumer, member, limit)
        except psycopg.Error as exc:
            translated = unavailable(exc, f"in PostgreSQL schema {self.names.bus_name}")
            if translated is None:
                raise
            raise translated from exc

    async def _claim_queue(
        self, conn: AsyncConnection[Any], consumer: ConsumerSpec, member: str, limit: int
    ) -> Batch:
        b = self.names.bus
        now = self.clock.time()
        # One statement, one implicit transaction, one round trip. The CTE ``suspect`` is the
        # poison isolation rule of sagaline.handling.isolation (claim_alone) in SQL: the first
        # candidate handed out before and not completed (attempts > 0) goes alone.
        cursor = await conn.execute(
            "WITH candidates AS ("
            f" SELECT c.id, c.attempts FROM {b}.commands c"
            " WHERE c.queue = %(queue)s AND NOT c.done AND c.available_at <= %(now)s"
            "  AND (c.lease_expires IS NULL OR c.lease_expires < %(now)s)"
            f"  AND NOT EXISTS (SELECT 1 FROM {b}.commands p WHERE p.queue = c.queue"
            "   AND p.key = c.key AND NOT p.done AND p.id < c.id)"
            " ORDER BY c.id LIMIT %(limit)s FOR UPDATE OF c SKIP LOCKED"
            "), suspect AS ("
            " SELECT id FROM candidates WHERE attempts > 0 ORDER BY id LIMIT 1"
            "), chosen AS ("
            " SELECT id FROM suspect UNION ALL"
            " SELECT id FROM candidates WHERE NOT EXISTS (SELECT 1 FROM suspect)"
            f") UPDATE {b}.commands c SET lease_owner = %(member)s,"
            " lease_expires = %(expires)s, attempts = c.attempts + 1"
            " FROM chosen WHERE c.id = chosen.id"
            f" RETURNING c.id, c.attempts, c.key, {_QUALIFIED}",
            {
                "queue": consumer.name,
                "now": now,
                "limit": limit,
                "member": member,
                "expires": now + self.lease_seconds,
            },
        )
        rows = sorted(await cursor.fetchall(), key=lambda row: int(row[0]))
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

    async def _refresh_membership(
        self, conn: AsyncConnection[Any], consumer: ConsumerSpec, member: str, now: float
    ) -> list[int]:
        """Heartbeat, then hold a fair share of the subscriber's partitions."""
        b = self.names.bus
        name = consumer.name
        async with conn.transaction():
            # Refreshes of one subscriber run one at a time, so two members never both take
            # a free partition.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.names.bus_name}/{name}",)
            )
            cursor = await conn.execute(
                f"WITH beat AS (INSERT INTO {b}.members (consumer, member, heartbeat)"
                " VALUES (%(name)s, %(member)s, %(now)s) ON CONFLICT (consumer, member)"
                " DO UPDATE SET heartbeat = excluded.heartbeat),"
                f" gone AS (DELETE FROM {b}.members WHERE consumer = %(name)s"
                "  AND heartbeat < %(stale)s AND member <> %(member)s RETURNING member),"
                f" parts AS (INSERT INTO {b}.subscriptions (subscriber, part)"
                "  SELECT %(name)s, g FROM generate_series(0, %(last)s) AS g"
                "  ON CONFLICT DO NOTHING)"
                f" SELECT (SELECT count(*) FROM {b}.members WHERE consumer = %(name)s"
                "   AND heartbeat >= %(stale)s AND member <> %(member)s) + 1,"
                "  (SELECT count(*) FROM gone)",
                {
                    "name": name,
                    "member": member,
                    "now": now,
                    "stale": now - self.lease_seconds,
                    "last": PARTITIONS - 1,
                },
            )
            row = await cursor.fetchone()
            live = int(row[0]) if row else 1
            cursor = await conn.execute(
                f"SELECT part, lease_owner, lease_expires FROM {b}.subscriptions"
                " WHERE subscriber = %s ORDER BY part",
                (name,),
            )
            share = share_partitions(await cursor.fetchall(), member, live, now)
            if share.released:
                await conn.execute(
                    f"UPDATE {b}.subscriptions SET lease_owner = NULL, lease_expires = NULL"
                    " WHERE subscriber = %s AND part = ANY(%s::int[]) AND lease_owner = %s",
                    (name, share.released, member),
                )
            if share.owned:
                await conn.execute(
                    f"UPDATE {b}.subscriptions SET lease_owner = %s, lease_expires = %s"
                    " WHERE subscriber = %s AND part = ANY(%s::int[])",
                    (member, now + self.lease_seconds, name, share.owned),
                )
        return share.owned

    async def _claim_subscription(
        self, conn: AsyncConnection[Any], consumer: ConsumerSpec, member: str, limit: int
    ) -> Batch:
        b = self.names.bus
        now = self.clock.monotonic()
        wall = self.clock.time()
        membership = self._members.setdefault((consumer.name, member), Membership())
        if now - membership.refreshed > MEMBERSHIP_INTERVAL:
            membership.owned = await self._refresh_membership(conn, consumer, member, wall)
            membership.refreshed = now
        if not membership.owned:
            return Batch(consumer=consumer, deliveries=[])
        cursor = await conn.execute(
            "SELECT part, position, attempts, available_at, claimed,"
            f" (SELECT position FROM {b}.log_head) FROM {b}.subscriptions"
            " WHERE subscriber = %s AND lease_owner = %s AND part = ANY(%s::int[])",
            (consumer.name, member, membership.owned),
        )
        rows = await cursor.fetchall()
        state = SubscriptionState.of(rows, wall)
        if not state.eligible:
            return Batch(consumer=consumer, deliveries=[])
        head = int(rows[0][5])
        start = state.start
        if head <= start:
            return Batch(consumer=consumer, deliveries=[])
        wanted = sorted(consumer.message_types)
        cursor = await conn.execute(
            f"SELECT position, part, {ENVELOPE_COLUMNS} FROM {b}.events"
            " WHERE position > %s AND position <= %s AND type = ANY(%s::text[])"
            " AND part = ANY(%s::smallint[]) ORDER BY position LIMIT %s",
            (start, head, wanted, sorted(state.eligible), scan_length(limit)),
        )
        plan = plan_subscription_claim(await cursor.fetchall(), state, head, limit)
        if plan.marks:
            await conn.execute(
                f"UPDATE {b}.subscriptions s SET claimed = u.claimed, attempts = u.attempts"
                " FROM unnest(%s::int[], %s::bigint[], %s::int[]) AS u(part, claimed, attempts)"
                " WHERE s.subscriber = %s AND s.part = u.part",
                (
                    [m[0] for m in plan.marks],
                    [m[1] for m in plan.marks],
                    [m[2] for m in plan.marks],
                    consumer.name,
                ),
            )
        if plan.empty:
            return Batch(consumer=consumer, deliveries=[])
        return Batch(consumer=consumer, deliveries=plan.deliveries, cursor=plan.cursor)

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Hand back what ``member`` holds at once: its membership and partition leases."""
        if consumer.source != "subscription":
            return
        self._members.pop((consumer.name, member), None)
        pool = await self._ready()
        b = self.names.bus
        async with pool.connection() as conn:
            await conn.execute(
                f"WITH gone AS (DELETE FROM {b}.members WHERE consumer = %(name)s"
                "  AND member = %(member)s)"
                f" UPDATE {b}.subscriptions SET lease_owner = NULL, lease_expires = NULL"
                " WHERE subscriber = %(name)s AND lease_owner = %(member)s",
                {"name": consumer.name, "member": member},
            )

    # ------------------------------------------------------------- settlement

    async def settle(
        self,
        tx: Any,
        batch: Batch,
        outcomes: Sequence[tuple[Outcome, str | None]],
    ) -> None:
        """Acknowledge, schedule retries and dead-letter inside the handling transaction.

        The statements are written with the unit of work's other writes, at its commit.
        """
        unit: PostgresTransaction = tx
        b = self.names.bus
        wall = self.clock.time()
        policy = batch.consumer.retry
        if batch.consumer.source == "queue":
            settled = settle_queue(batch.deliveries, outcomes, policy, wall)
            done, retry = settled.done, settled.retry
            if done:
                unit.defer(
                    f"UPDATE {b}.commands c SET done = true, outcome = u.outcome,"
                    " last_error = u.error, lease_owner = NULL, lease_expires = NULL"
                    " FROM unnest(%b::bigint[], %b::text[], %b::text[]) AS u(id, outcome, error)"
                    " WHERE c.id = u.id",
                    ([d[0] for d in done], [d[1] for d in done], [d[2] for d in done]),
                )
            if retry:
                unit.defer(
                    f"UPDATE {b}.commands c SET available_at = u.due, last_error = u.error,"
                    " lease_owner = NULL, lease_expires = NULL"
                    " FROM unnest(%b::bigint[], %s::float8[], %b::text[]) AS u(id, due, error)"
                    " WHERE c.id = u.id",
                    ([r[0] for r in retry], [r[1] for r in retry], [r[2] for r in retry]),
                )
            if settled.release:
                unit.defer(
                    f"UPDATE {b}.commands SET lease_owner = NULL, lease_expires = NULL,"
                    " attempts = attempts - 1 WHERE id = ANY(%b::bigint[])",
                    (settled.release,),
                )
            return
        cursor: SubscriptionCursor = batch.cursor
        updates = settle_subscription(batch.deliveries, outcomes, cursor, policy, wall)
        unit.defer(
            f"UPDATE {b}.subscriptions s SET position = GREATEST(s.position, u.position),"
            " attempts = u.attempts, available_at = u.due, last_error = u.error, claimed = 0"
            " FROM unnest(%b::int[], %b::bigint[], %b::int[], %s::float8[], %b::text[])"
            " AS u(part, position, attempts, due, error)"
            " WHERE s.subscriber = %s AND s.part = u.part",
            (
                [u[0] for u in updates],
                [u[1] for u in updates],
                [u[2] for u in updates],
                [u[3] for u in updates],
                [u[4] for u in updates],
                batch.consumer.name,
            ),
        )

    # --------------------------------------------------------------- wake-ups

    async def wait_for_work(self, consumer: ConsumerSpec, timeout: float) -> None:
        """Wait for a NOTIFY of new work for ``consumer``, or poll after ``timeout``."""
        await self._ready()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup(consumer).wait(), timeout)

    def _wakeup(self, consumer: ConsumerSpec) -> asyncio.Event:
        key = (consumer.name, consumer.source)
        event = self._wakeups.get(key)
        if event is None:
            event = self._wakeups[key] = asyncio.Event()
        return event

    def _wake(self, queues: set[str], events: bool) -> None:
        """Set the wake-ups of the named queues, and of every subscription if ``events``."""
        for (name, source), event in self._wakeups.items():
            if (source == "queue" and name in queues) or (source == "subscription" and events):
                event.set()

    def _dispatch(self, payload: str) -> None:
        if payload == "e":
            self._wake(set(), True)
        elif payload.startswith("q:"):
            self._wake({payload[2:]}, False)

    async def _listen(self, conn: AsyncConnection[Any]) -> None:
        """Turn the bus channel's notifications into wake-ups until cancelled.

        A lost connection (the server restarted) wakes every consumer once and is made again,
        with a growing pause; the consumers' timeouts cover the time in between.
        """
        pause = 0.5
        while True:
            try:
                async for notify in conn.notifies():
                    self._dispatch(notify.payload)
                    pause = 0.5
            except psycopg.Error:
                log.warning("the LISTEN connection of %s was lost", self.names.bus_name)
            self._wake({name for name, _ in self._wakeups}, True)
            while True:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
                try:
                    conn = await self._connect_listener()
                    break
                except psycopg.Error:
                    continue

    async def _connect_listener(self) -> AsyncConnection[Any]:
        raise NotImplementedError

    # ------------------------------------------------------------ broker bus

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Create the bus schema if need be; queues and subscriptions need nothing more."""
        await self._ready()

    async def publish(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Write messages to the queues and the log in one transaction; an id already there
        with the same message is ignored, so a relay that publishes again after a crash
        publishes nothing twice. An id there with another message raises
        :class:`DuplicateMessageId`, and an id that is not one :class:`InvalidMessage`: nothing
        is written."""
        if not envelopes:
            return
        for envelope in envelopes:
            check_message_id(envelope.message_id)
        async with self.transaction() as tx:
            await tx.emit_to_bus(envelopes, routes)

    async def complete(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """Settle a batch in its own transaction (the store that handled it is elsewhere)."""
        async with self.transaction() as tx:
            await self.settle(tx, batch, outcomes)

    async def replay(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """The bus's event log from a position, read in pages."""
        while True:
            page = await self.read_bus_log(after, 1000)
            if not page:
                return
            for event in page:
                yield event
            after = page[-1].position

    async def read_bus_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """The bus's event log after ``after``, at most ``limit`` events."""
        pool = await self._ready()
        async with pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT position, stream, version, {ENVELOPE_COLUMNS} FROM {self.names.bus}.events"
                " WHERE position > %s ORDER BY position LIMIT %s",
                (after, limit),
            )
            rows = await cursor.fetchall()
        return [StoredEvent(row[0], row[1], row[2], envelope_from_row(row, 3)) for row in rows]
