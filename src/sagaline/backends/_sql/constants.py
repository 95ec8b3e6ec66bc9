"""The constants the database backends share: partitions, leases, and how far a claim reads."""

from __future__ import annotations

from sagaline.config import DEFAULT_LEASE_SECONDS

__all__ = ["LEASE_SECONDS", "MEMBERSHIP_INTERVAL", "PARTITIONS", "SCAN_FACTOR"]

#: Partitions of the log and of each subscription; a correlation key always maps to the same one.
PARTITIONS = 8
LEASE_SECONDS = DEFAULT_LEASE_SECONDS
#: How often a subscriber refreshes its membership and partition leases.
MEMBERSHIP_INTERVAL = 1.0
#: A subscription claim reads at most this many wanted log rows per delivery it may return
#: (rows of partitions another member leases are read and passed over).
SCAN_FACTOR = 8
