"""What a member holds of a consumer: a lane per leased partition, with the messages pulled,
handed out, held behind a retry or given up by the server, and the moves between those states
(see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import asyncio
import math
from bisect import insort
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from sagaline.messages import Envelope
from sagaline.ports import ConsumerSpec, Delivery


@dataclass(eq=False, slots=True)
class _Item:
    """A message in a member's hands: pulled, not yet handed to the worker or settled."""

    msg: Msg | None
    sequence: int
    delivered: int
    key: str
    envelope: Envelope
    touched: float


@dataclass(eq=False, slots=True)
class _Lane:
    """One partition of one consumer, while a member of this process holds it."""

    partition: int
    stream: str
    consumer: str
    next_subject: str
    #: In stream order: what is ready to be handed out.
    ready: list[_Item] = field(default_factory=list)
    #: Per key, the messages waiting behind a retried one.
    held: dict[str, list[_Item]] = field(default_factory=dict)
    #: Per key, the stream sequence of the retried message that must come back first.
    blocked: dict[str, int] = field(default_factory=dict)
    #: Every message in hand (ready or held), by stream sequence.
    items: dict[int, _Item] = field(default_factory=dict)
    #: Messages handed to the worker and not settled yet, by stream sequence.
    out: dict[int, _Item] = field(default_factory=dict)
    incoming: list[Msg] = field(default_factory=list)
    #: Stream sequences the server gave up on (max deliveries), to be dead-lettered.
    exhausted: list[tuple[int, int]] = field(default_factory=list)
    #: Taken over: nothing is handed out until every message left unsettled is back in hand.
    fenced: bool = True
    released: bool = False
    pull: _Pull | None = None
    #: Since when the lane's pulls brought nothing (None: the last one brought messages).
    empty_since: float | None = None
    #: When the server was last asked about the consumer of an empty lane (monotonic).
    nudged: float = -math.inf


@dataclass(eq=False, slots=True)
class _Group:
    """A member's membership of one consumer: the lanes it holds."""

    spec: ConsumerSpec
    member: str
    lease_key: str
    lanes: dict[int, _Lane] = field(default_factory=dict)
    refreshed: float = -math.inf
    valid_until: float = -math.inf
    rotation: int = 0


@dataclass(slots=True)
class _Token:
    lane: _Lane
    item: _Item


@dataclass(eq=False, slots=True)
class _Pull:
    remaining: int
    done: asyncio.Future[None]


def take_back(lane: _Lane, item: _Item) -> None:
    """A skipped delivery: held behind its key's retry, or ready again in its place."""
    if lane.released:
        return
    lane.items[item.sequence] = item
    head = lane.blocked.get(item.key)
    if head is not None and item.sequence > head:
        insort(lane.held.setdefault(item.key, []), item, key=lambda i: i.sequence)
    else:
        insort(lane.ready, item, key=lambda i: i.sequence)


def hold_blocked(lane: _Lane) -> None:
    """Move the ready messages of keys waiting for a retry behind it, in hand."""
    if not lane.blocked:
        return
    keep: list[_Item] = []
    for item in lane.ready:
        head = lane.blocked.get(item.key)
        if head is not None and item.sequence > head:
            insort(lane.held.setdefault(item.key, []), item, key=lambda i: i.sequence)
        else:
            keep.append(item)
    lane.ready = keep


def hand_out(lane: _Lane, item: _Item) -> Delivery:
    """The delivery of a ready message, now out with the worker until it is settled."""
    lane.items.pop(item.sequence, None)
    lane.out[item.sequence] = item
    return Delivery(
        envelope=item.envelope,
        attempt=item.delivered,
        ordering_key=item.key,
        token=_Token(lane, item),
    )


def unblock(lane: _Lane, item: _Item) -> None:
    """``item`` is settled: if its key waited for it, what waited behind it is ready again."""
    if lane.blocked.get(item.key) == item.sequence:
        del lane.blocked[item.key]
        for waiting in lane.held.pop(item.key, []):
            insort(lane.ready, waiting, key=lambda i: i.sequence)
