"""When the work a SQLite bus holds falls due, and how to deliver again what it settled.

The test kit's harness steps a system with a fake clock: when no consumer has work, it asks the
store for the next moment something falls due (a retry after its backoff, a lease that expires)
and moves its clock there. Its duplicate-delivery faults go through :meth:`redeliver`, which
makes the bus hand out again what it had settled, as a bus that lost the acknowledgement would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

from sagaline.backends._sql.schedule import rewound_positions
from sagaline.backends.sqlite.rows import immediate
from sagaline.clock import Clock
from sagaline.ports import ConsumerSpec, Delivery

__all__ = ["SqliteSchedule"]


class SqliteSchedule:
    """The due times and redeliveries of a :class:`~sagaline.backends.sqlite.SqliteDatabase`."""

    connection: sqlite3.Connection
    clock: Clock
    _lock: asyncio.Lock

    def _notify(self) -> None:
        raise NotImplementedError

    async def next_due(self, after: float) -> float | None:
        """The earliest moment later than ``after`` (seconds since the epoch) at which pending
        work falls due: a command's retry or the expiry of its lease, a subscriber's retry of
        a partition, a timer; None when nothing pending waits for a moment after ``after``."""
        async with self._lock:
            row = self.connection.execute(
                "SELECT (SELECT MIN(MAX(available_at, COALESCE(lease_expires, 0))) FROM commands"
                "  WHERE done = 0 AND MAX(available_at, COALESCE(lease_expires, 0)) > ?1),"
                " (SELECT MIN(available_at) FROM subscriptions WHERE available_at > ?1),"
                " (SELECT MIN(due_at) FROM timers WHERE due_at > ?1)",
                (after,),
            ).fetchone()
        due = [float(moment) for moment in row if moment is not None]
        return min(due) if due else None

    async def redeliver(self, consumer: ConsumerSpec, deliveries: Sequence[Delivery]) -> None:
        """Deliver again ``deliveries`` that ``consumer`` settled, as a bus that lost their
        acknowledgement would.

        Commands go back on their queue, due now, their attempts cleared. A subscriber's
        partition moves back to just before the earliest of them: the events after it in that
        partition come again with them.
        """
        if not deliveries:
            return
        conn = self.connection
        async with self._lock:
            with immediate(conn):
                if consumer.source == "queue":
                    now = self.clock.time()
                    conn.executemany(
                        "UPDATE commands SET done = 0, outcome = NULL, last_error = NULL,"
                        " attempts = 0, available_at = ?, lease_owner = NULL,"
                        " lease_expires = NULL WHERE id = ? AND queue = ?",
                        [(now, d.token, consumer.name) for d in deliveries],
                    )
                else:
                    conn.executemany(
                        "UPDATE subscriptions SET position = MIN(position, ?)"
                        " WHERE subscriber = ? AND part = ?",
                        [
                            (position, consumer.name, part)
                            for part, position in rewound_positions(deliveries).items()
                        ],
                    )
        self._notify()
