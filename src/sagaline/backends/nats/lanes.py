"""What a member holds of a consumer: a lane per leased partition, with the messages pulled,
handed out, held behind a retry or given up by the server (see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from sagaline.messages import Envelope
from sagaline.ports import ConsumerSpec


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
    #: When the server was last asked about the consumer of an empty lane.
    nudged: float = 0.0


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
