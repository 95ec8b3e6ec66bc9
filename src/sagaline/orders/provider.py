"""A simulated payment provider: the outside system the payment service charges.

It stands for a card processor that lives outside the service's store: a charge it made stays
made whatever happens to the unit of work that asked for it. So it is called with the
idempotency key of the saga step (``ctx.idempotency_key``): a ProcessPayment handled again (a
redelivery after a crash between the call and the commit, or a retry of the step) gets the
charge made the first time, never a second one. A file keeps its charges across processes;
without one they live as long as the process.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

__all__ = ["Charge", "PaymentProvider"]


@dataclass(frozen=True)
class Charge:
    """One charge the provider made: its key, customer, amount, id, and whether refunded."""

    key: str
    customer_id: str
    amount: Decimal
    transaction_id: str
    refunded: bool = False


def _transaction_id(key: str) -> str:
    """The id of the charge made under ``key``: named after it, so as unique as the key, and a
    run that replays its ids (the test kit's harness, under one seed) replays it too."""
    return f"TRN-{hashlib.sha256(key.encode()).hexdigest()[:12].upper()}"


class PaymentProvider:
    """Charges once per idempotency key; refunds a charge once."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        target = ":memory:" if path is None else str(path)
        self._conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, customer_id TEXT NOT NULL,"
            " amount TEXT NOT NULL, transaction_id TEXT NOT NULL, refunded INTEGER NOT NULL)"
        )

    def charge(self, key: str, customer_id: str, amount: Decimal) -> str:
        """Charge ``amount`` under ``key``; the transaction id (that of the first charge made
        under ``key``, when there was one)."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO charges VALUES (?, ?, ?, ?, 0) ON CONFLICT (key) DO NOTHING",
                (key, customer_id, str(amount), _transaction_id(key)),
            )
            row = self._conn.execute(
                "SELECT transaction_id FROM charges WHERE key = ?", (key,)
            ).fetchone()
        return str(row[0])

    def refund(self, key: str) -> bool:
        """Refund the charge made under ``key``; False when there is none or it was refunded."""
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE charges SET refunded = 1 WHERE key = ? AND refunded = 0", (key,)
            )
        return cursor.rowcount == 1

    def charges(self) -> list[Charge]:
        """Every charge made, by key."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM charges ORDER BY key").fetchall()
        return [Charge(r[0], r[1], Decimal(r[2]), r[3], bool(r[4])) for r in rows]

    def close(self) -> None:
        """Release the file."""
        self._conn.close()
