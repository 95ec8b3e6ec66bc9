"""Where a message's id and timestamp come from, and which ids are acceptable.

New ids are time-ordered UUIDs (version 7) and timestamps ISO-8601 UTC, both read from a clock;
:class:`MessageStamps` (entered with :func:`stamping`) swaps in a clock and a seeded random source,
so that the test kit replays the same ids and timestamps under one seed. An id given from outside
is checked (:func:`check_message_id`); the ids of the commands sagas send are reserved, and carry
the idempotency key of their step (:func:`idempotency_key_of`).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.errors import InvalidMessage

__all__ = [
    "MAX_MESSAGE_ID_LENGTH",
    "SAGA_COMMAND_PREFIX",
    "MessageStamps",
    "check_client_message_id",
    "check_message_id",
    "idempotency_key_of",
    "message_id_problem",
    "new_message_id",
    "stamping",
    "utc_now",
    "utc_timestamp",
]

#: Longest message id accepted anywhere. Ids are keys of unique indexes (inbox, queues, logs)
#: and travel in broker headers: a bound keeps them cheap and within every index's row limit.
MAX_MESSAGE_ID_LENGTH = 128
_MESSAGE_ID = re.compile(r"[A-Za-z0-9._:-]+")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (by the clock of the :func:`stamping` in force)."""
    stamps = _STAMPS.get()
    if stamps is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(stamps.clock.time(), UTC)


def utc_timestamp(moment: datetime | float | None = None) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix, as the wire contract writes timestamps.

    ``moment`` is a datetime or seconds since the epoch (a store's clock reading); without it, the
    current time by the clock of the :func:`stamping` in force.
    """
    if moment is None:
        stamps = _STAMPS.get()
        now = time.time() if stamps is None else stamps.clock.time()
    elif isinstance(moment, datetime):
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    else:
        now = moment
    second = int(now)
    if second != _SECOND[0]:
        _SECOND[0] = second
        _SECOND[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_SECOND[1]}.{int((now - second) * 1_000_000):06d}Z"


# The formatted current second, reused while it lasts (timestamps are on every message).
_SECOND: list[Any] = [-1, ""]


def new_message_id() -> str:
    """A fresh message id: a UUID version 7 (RFC 9562), time-ordered.

    Time-ordered ids keep the inbox and the logs' unique indexes appending at their right edge
    instead of touching a random page per insert. The 74 random bits come from the process's
    PRNG, which Python reseeds in a forked child. Under a :func:`stamping`, the id is its stamps'.
    """
    stamps = _STAMPS.get()
    if stamps is not None:
        return stamps.message_id()
    return _uuid7(time.time_ns() // 1_000_000, random.getrandbits(74))


def _uuid7(millisecond: int, bits: int) -> str:
    """The UUIDv7 text of a Unix millisecond and 74 random bits."""
    value = (
        (millisecond & _MILLISECONDS) << 80
        | 0x7 << 76
        | (bits >> 62) << 64
        | 0x2 << 62
        | (bits & _LOW_62)
    )
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_LOW_62 = (1 << 62) - 1
_MILLISECONDS = (1 << 48) - 1


class MessageStamps:
    """Where new messages take their ids and timestamps from, under a :func:`stamping`.

    Ids are UUIDv7s of ``clock``'s milliseconds and 74 bits of ``rng`` (by default the process's
    PRNG); timestamps (:func:`utc_timestamp`, :func:`utc_now`, an envelope's) are ``clock``'s
    time. The test kit's harness stamps with its fake clock and a PRNG seeded from its seed, so
    that one seed gives the same ids and timestamps on every run. ``ids`` replaces the UUIDs by
    ids of one's own (each is checked against the id rules, :func:`message_id_problem`).
    """

    __slots__ = ("_ids", "_random", "clock")

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        *,
        ids: Callable[[], str] | None = None,
    ) -> None:
        self.clock = clock
        self._random = rng
        self._ids = ids

    def message_id(self) -> str:
        """A fresh message id."""
        if self._ids is not None:
            return check_message_id(self._ids())
        bits = random.getrandbits(74) if self._random is None else self._random.getrandbits(74)
        return _uuid7(int(self.clock.time() * 1000), bits)

    def __repr__(self) -> str:
        return f"MessageStamps({self.clock!r})"


#: The stamps in force in this context (a task and the tasks it starts); None: the machine's.
_STAMPS: ContextVar[MessageStamps | None] = ContextVar("sagaline_message_stamps", default=None)


@contextmanager
def stamping(stamps: MessageStamps) -> Iterator[MessageStamps]:
    """Within the block, new message ids and timestamps come from ``stamps``: in this task, and
    in the tasks started from it (they copy the context they were started in).

    This reaches what no caller passes a clock to: the ids and timestamps :meth:`Envelope.wrap`
    gives, and a message field whose default is :func:`utc_now`.
    """
    token = _STAMPS.set(stamps)
    try:
        yield stamps
    finally:
        # Left in another context than entered (a generator closed elsewhere), there is
        # nothing to undo: that context never saw these stamps.
        with suppress(ValueError):
            _STAMPS.reset(token)


def message_id_problem(message_id: object) -> str | None:
    """Why ``message_id`` is not an acceptable message id, or None when it is.

    An id is 1 to :data:`MAX_MESSAGE_ID_LENGTH` characters among ASCII letters, digits and
    ``. _ : -`` (a UUID, ``nats:stream:7``, ``order-12345.retry-2``).
    """
    if not isinstance(message_id, str):
        return f"a message id must be a string, not {type(message_id).__name__}"
    if not message_id:
        return "a message id must not be empty"
    if len(message_id) > MAX_MESSAGE_ID_LENGTH:
        return (
            f"a message id of {len(message_id)} characters is longer than the limit of"
            f" {MAX_MESSAGE_ID_LENGTH}"
        )
    if _MESSAGE_ID.fullmatch(message_id) is None:
        return (
            f"message id {message_id!r} may only hold ASCII letters, digits and the"
            " characters . _ : -"
        )
    return None


#: The prefix of the ids of the commands sagas send (``saga:<saga id>:<step>:<try>``); a client
#: may not use it (see :func:`check_client_message_id`).
SAGA_COMMAND_PREFIX = "saga:"


def idempotency_key_of(message_id: str) -> str:
    """The idempotency key of the message with id ``message_id``: for a saga's command the id
    without its try (every try of one step shares it); for any other message its id."""
    if message_id.startswith(SAGA_COMMAND_PREFIX):
        return message_id.rpartition(":")[0]
    return message_id


def check_client_message_id(message_id: str) -> str:
    """:func:`check_message_id`, and not one of the ids reserved for sagas' commands."""
    check_message_id(message_id)
    if message_id.startswith(SAGA_COMMAND_PREFIX):
        raise InvalidMessage(
            f"message ids starting with {SAGA_COMMAND_PREFIX!r} are reserved for the commands"
            " sagas send",
            field="messageId",
        )
    return message_id


def check_message_id(message_id: str) -> str:
    """Return ``message_id`` if it is acceptable; raise :class:`InvalidMessage` otherwise."""
    problem = message_id_problem(message_id)
    if problem is not None:
        raise InvalidMessage(problem, field="messageId")
    return message_id
