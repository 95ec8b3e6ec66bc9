"""The planning the database buses share, and the poison isolation rule every bus applies, on
rows made by hand: no database needed."""

from __future__ import annotations

from typing import Any

from sagaline.backends._sql.planner import (
    SubscriptionCursor,
    SubscriptionState,
    plan_subscription_claim,
    scan_length,
    settle_queue,
    settle_subscription,
    share_partitions,
)
from sagaline.backends._sql.rows import envelope_params
from sagaline.handling.isolation import _isolated, _suspects, claim_alone, isolated
from sagaline.messages import Envelope
from sagaline.ports import Batch, ConsumerSpec, Delivery, Outcome, RetryPolicy

POLICY = RetryPolicy(max_attempts=5, initial_delay=1.0, multiplier=2.0, max_delay=30.0)


def _envelope(n: int) -> Envelope:
    return Envelope(
        message_id=f"00000000-0000-4000-8000-{n:012d}",
        message_type="Happened",
        body=b"{}",
        correlation_id=f"K-{n}",
        causation_id=None,
        timestamp="2024-01-01T00:00:00Z",
        traceparent=None,
        source="test",
    )


def _log(*entries: tuple[int, int]) -> list[tuple[Any, ...]]:
    """Log rows ``(position, part, *envelope)`` for ``(position, part)`` pairs."""
    return [(position, part, *envelope_params(_envelope(position))) for position, part in entries]


def _state(*rows: tuple[int, int, int, float, int], wall: float = 100.0) -> SubscriptionState:
    """From ``(part, position, attempts, available_at, claimed)`` rows."""
    return SubscriptionState.of(rows, wall)


# ------------------------------------------------------------------------ poison isolation


def test_a_claim_hands_out_the_first_suspect_alone_or_everything() -> None:
    candidates = [(1, 0), (2, 1), (3, 2), (4, 0)]
    assert claim_alone(candidates, lambda row: row[1]) == [(2, 1)]
    fresh = [(1, 0), (4, 0)]
    assert claim_alone(fresh, lambda row: row[1]) == fresh


def test_a_delivered_batch_is_cut_so_that_each_suspect_is_alone_in_order() -> None:
    assert isolated("abXcdYZe", str.isupper) == [["a", "b"], ["X"], ["c", "d"], ["Y"], ["Z"], ["e"]]
    assert isolated("ab", str.isupper) == [["a", "b"]]
    assert isolated("", str.isupper) == []


def test_a_broker_batch_is_cut_at_the_messages_handed_to_a_handler_before() -> None:
    spec = ConsumerSpec(name="alpha", source="queue", message_types=frozenset({"Happened"}))
    deliveries = [Delivery(_envelope(n), 2, f"K-{n}", n) for n in range(4)]
    ids = [d.envelope.message_id for d in deliveries]
    suspects = _suspects(ids, [0, 1, 0, 0])
    assert suspects == {ids[1]}
    parts = _isolated(Batch(spec, deliveries, cursor="c"), suspects)
    assert [[d.token for d in part.deliveries] for part in parts] == [[0], [1], [2, 3]]
    assert {part.cursor for part in parts} == {"c"}


# ------------------------------------------------------------------------ partition sharing


def test_a_member_takes_free_partitions_up_to_its_share_and_gives_back_the_surplus() -> None:
    now = 50.0
    leases: list[tuple[int, str | None, float | None]] = [(part, None, None) for part in range(8)]
    alone = share_partitions(leases, "m1", 1, now)
    assert (alone.owned, alone.released) == (list(range(8)), [])

    held = [(part, "m1", now + 5) for part in range(8)]
    halved = share_partitions(held, "m1", 2, now)
    assert (halved.owned, halved.released) == ([0, 1, 2, 3], [4, 5, 6, 7])

    # Another member's live lease is not free; an expired one is, even the member's own.
    mixed = [(0, "m2", now + 5), (1, "m2", now - 1), (2, "m1", now - 1), (3, "m1", now + 1)]
    mixed += [(part, "m2", now + 5) for part in range(4, 8)]
    share = share_partitions(mixed, "m1", 2, now)
    assert (share.owned, share.released) == ([1, 2, 3], [])


# ------------------------------------------------------------------------ subscription claims


def test_a_claim_hands_out_what_lies_past_each_partitions_cursor() -> None:
    state = _state((0, 10, 0, 0.0, 0), (1, 12, 0, 0.0, 0), (2, 0, 0, 500.0, 0))
    assert state.eligible == {0: 10, 1: 12} and state.start == 10
    rows = _log((11, 0), (12, 1), (13, 2), (14, 1), (15, 0))
    plan = plan_subscription_claim(rows, state, head=15, limit=10)
    assert [(d.token, d.ordering_key, d.attempt) for d in plan.deliveries] == [
        (11, 0, 1),
        (14, 1, 1),
        (15, 0, 1),
    ]
    assert plan.marks == [(0, 11, 0), (1, 14, 0)]
    assert plan.cursor.scanned_to == 15 and plan.cursor.positions == {0: 10, 1: 12}
    assert not plan.empty


def test_a_full_batch_or_a_short_scan_ends_where_it_stopped_reading() -> None:
    rows = _log(*((position, 0) for position in range(1, 10)))
    plan = plan_subscription_claim(rows, _state((0, 0, 0, 0.0, 0)), head=100, limit=3)
    assert [d.token for d in plan.deliveries] == [1, 2, 3]
    assert plan.cursor.scanned_to == 3
    # Every row read belongs to a partition of another member: the scan ends at its last row.
    others = _log(*((position, 1) for position in range(1, scan_length(1) + 1)))
    short = plan_subscription_claim(others, _state((0, 0, 0, 0.0, 0)), head=100, limit=1)
    assert short.deliveries == [] and short.cursor.scanned_to == scan_length(1)
    assert not short.empty


def test_nothing_past_the_cursors_is_an_empty_claim() -> None:
    plan = plan_subscription_claim([], _state((0, 7, 0, 0.0, 0)), head=7, limit=10)
    assert plan.empty and plan.deliveries == []


def test_a_head_handed_out_before_and_never_settled_counts_an_attempt_and_goes_alone() -> None:
    # Partition 1's head (position 12) was claimed before and its consumer died.
    state = _state((0, 10, 0, 0.0, 0), (1, 10, 1, 0.0, 12))
    rows = _log((11, 0), (12, 1), (13, 0), (14, 1))
    plan = plan_subscription_claim(rows, state, head=14, limit=10)
    [suspect] = plan.deliveries
    assert (suspect.token, suspect.ordering_key, suspect.attempt) == (12, 1, 3)
    assert plan.marks == [(1, 12, 2)]
    assert plan.cursor.positions == {1: 10} and plan.cursor.scanned_to == 12


# ------------------------------------------------------------------------ settlement


def test_settling_commands_sorts_them_by_what_their_outcome_writes() -> None:
    deliveries = [Delivery(_envelope(n), n, None, n) for n in range(1, 5)]
    outcomes = [
        (Outcome.ACK, None),
        (Outcome.RETRY, "boom"),
        (Outcome.DEAD, "bad"),
        (Outcome.SKIP, None),
    ]
    settled = settle_queue(deliveries, outcomes, POLICY, 1000.0)
    assert settled.done == [(1, "handled", None), (3, "dead", "bad")]
    assert settled.retry == [(2, 1000.0 + POLICY.delay(2), "boom")]
    assert settled.release == [4]


def test_a_partition_stops_at_its_first_retry_and_the_others_move_to_the_scans_end() -> None:
    cursor = SubscriptionCursor(positions={0: 10, 1: 10, 2: 10}, attempts={2: 3}, scanned_to=20)
    deliveries = [
        Delivery(_envelope(11), 2, 0, 11),
        Delivery(_envelope(12), 1, 1, 12),
        Delivery(_envelope(13), 1, 0, 13),
        Delivery(_envelope(14), 4, 2, 14),
    ]
    outcomes = [(Outcome.RETRY, "boom"), (Outcome.ACK, None), (Outcome.ACK, None)]
    outcomes.append((Outcome.SKIP, None))
    updates = settle_subscription(deliveries, outcomes, cursor, POLICY, 1000.0)
    assert updates == [
        (0, 10, 2, 1000.0 + POLICY.delay(2), "boom"),
        (1, 20, 0, 0.0, None),
        (2, 13, 3, 0.0, None),  # skipped, not failed: no attempt spent
    ]
