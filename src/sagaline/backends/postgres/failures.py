"""Which PostgreSQL errors mean the store is unavailable, as opposed to a failing message.

A lost connection, a server shutting down, a full disk, an I/O error or a database turned
read-only are the store's condition, not the message's: the unit of work is rolled back whole and
tried again once the server answers, and no message is charged an attempt for it. Any other error
(a constraint, bad data) stays the handler's failure.
"""

from __future__ import annotations

import psycopg

from sagaline.errors import StoreUnavailable

__all__ = ["unavailable"]

# SQLSTATE classes: connection exception, insufficient resources (disk full, out of memory, too
# many connections), system error (I/O).
_CLASSES = {"08", "53", "58"}
# Operator intervention (57: admin or crash shutdown, cannot connect now), except a cancelled
# statement (57014), which can be the work's own doing; and a read-only transaction (25006).
_CODES = {"57000", "57P01", "57P02", "57P03", "57P04", "57P05", "25006"}


def unavailable(exc: BaseException, where: str) -> StoreUnavailable | None:
    """``exc`` (or the error that caused it) as :class:`StoreUnavailable`, when it is one."""
    for error in (exc, exc.__cause__):
        if isinstance(error, StoreUnavailable):
            return error
        if not isinstance(error, psycopg.Error):
            continue
        state = error.sqlstate
        if (state is None and isinstance(error, psycopg.OperationalError)) or (
            state is not None and (state[:2] in _CLASSES or state in _CODES)
        ):
            first = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            return StoreUnavailable(f"the store {where} is unavailable: {first}")
    return None
