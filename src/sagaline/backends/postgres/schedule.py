"""When the work a PostgreSQL bus holds falls due, and how to deliver again what it settled.

The test kit's harness steps a system with a fake clock: when no consumer has work, it asks the
store for the next moment something falls due (a retry after its backoff, a lease that expires)
and moves its clock there. Its duplicate-delivery faults go through :meth:`redeliver`, which
makes the bus hand out again what it had settled, as a bus that lost the acknowledgement would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sagaline.backends._sql.schedule import rewound_positions
from sagaline.backends.postgres.schema import Names
from sagaline.clock import Clock
from sagaline.ports import ConsumerSpec, Delivery

__all__ = ["PostgresSchedule"]


class PostgresSchedule:
    """The due times and redeliveries of a
    :class:`~sagaline.backends.postgres.PostgresDatabase`."""

    names: Names
    clock: Clock

    async def _ready(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        raise NotImplementedError

    async def next_due(self, after: float) -> float | None:
        """The earliest moment later than ``after`` (seconds since the epoch) at which pending
        work falls due: a command's retry or the expiry of its lease, a subscriber's retry of
        a partition; None when nothing pending waits for a moment after ``after``."""
        pool = await self._ready()
        b = self.names.bus
        async with pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT LEAST("
                " (SELECT min(GREATEST(available_at, COALESCE(lease_expires, 0)))"
                f"  FROM {b}.commands WHERE NOT done"
                "  AND GREATEST(available_at, COALESCE(lease_expires, 0)) > %(after)s),"
                f" (SELECT min(available_at) FROM {b}.subscriptions"
                "  WHERE available_at > %(after)s))",
                {"after": after},
            )
            row = await cursor.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def redeliver(self, consumer: ConsumerSpec, deliveries: Sequence[Delivery]) -> None:
        """Deliver again ``deliveries`` that ``consumer`` settled, as a bus that lost their
        acknowledgement would.

        Commands go back on their queue, due now, their attempts cleared. A subscriber's
        partition moves back to just before the earliest of them: the events after it in that
        partition come again with them.
        """
        if not deliveries:
            return
        pool = await self._ready()
        b = self.names.bus
        async with pool.connection() as conn, conn.transaction():
            if consumer.source == "queue":
                await conn.execute(
                    f"UPDATE {b}.commands SET done = false, outcome = NULL, last_error = NULL,"
                    " attempts = 0, available_at = %s, lease_owner = NULL, lease_expires = NULL"
                    " WHERE id = ANY(%s::bigint[]) AND queue = %s",
                    (self.clock.time(), [d.token for d in deliveries], consumer.name),
                )
                payload = f"q:{consumer.name}"
            else:
                before = rewound_positions(deliveries)
                await conn.execute(
                    f"UPDATE {b}.subscriptions s SET position = LEAST(s.position, u.position)"
                    " FROM unnest(%s::int[], %s::bigint[]) AS u(part, position)"
                    " WHERE s.subscriber = %s AND s.part = u.part",
                    (list(before), list(before.values()), consumer.name),
                )
                payload = "e"
            await conn.execute("SELECT pg_notify(%s, %s)", (self.names.channel, payload))
