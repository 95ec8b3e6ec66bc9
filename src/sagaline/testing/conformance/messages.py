"""The messages the conformance suites send, and ways to make them as a broken producer would.

They join the process-wide message registry when this module is imported; their wire names start
with ``Conformance`` so that they cannot take a name of an application's own messages.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TypeVar

from sagaline.messages import Command, Envelope, Event, encode_body, new_message_id, utc_timestamp

__all__ = [
    "ConformanceCommand",
    "ConformanceEvent",
    "ConformanceOtherCommand",
    "ConformanceOtherEvent",
    "ConformanceStoreEvent",
    "events",
    "hand_made",
    "padded",
]


class ConformanceCommand(Command, kw_only=True, frozen=True):
    """A command of the bus suites, keyed by ``key``; ``payload`` pads it to a size."""

    key: str
    seq: int
    payload: str = ""

    def correlation_key(self) -> str:
        return self.key


class ConformanceOtherCommand(Command, kw_only=True, frozen=True):
    """A command routed to another queue than :class:`ConformanceCommand`."""

    key: str
    seq: int

    def correlation_key(self) -> str:
        return self.key


class ConformanceEvent(Event, kw_only=True, frozen=True):
    """An event of the bus suites, keyed by ``key``; ``payload`` pads it to a size."""

    key: str
    seq: int
    payload: str = ""

    def correlation_key(self) -> str:
        return self.key


class ConformanceOtherEvent(Event, kw_only=True, frozen=True):
    """An event only some subscribers want."""

    key: str
    seq: int

    def correlation_key(self) -> str:
        return self.key


class ConformanceStoreEvent(Event, kw_only=True, frozen=True):
    """An event of the store suite, with an amount of money to keep exact."""

    key: str
    seq: int
    amount: Decimal = Decimal("0")

    def correlation_key(self) -> str:
        return self.key


def events(key: str, *seqs: int) -> list[Envelope]:
    """One :class:`ConformanceStoreEvent` envelope of ``key`` per seq, in order."""
    return [Envelope.wrap(ConformanceStoreEvent(key=key, seq=seq)) for seq in seqs]


def hand_made(message_type: str, key: str, body: bytes) -> Envelope:
    """An envelope around ``body`` as it is, unchecked: what a broken or hostile client sends."""
    return Envelope(
        message_id=new_message_id(),
        message_type=message_type,
        body=body,
        correlation_id=key,
        causation_id=None,
        timestamp=utc_timestamp(),
        source="client",
    )


Padded = TypeVar("Padded", ConformanceCommand, ConformanceEvent)


def padded(cls: type[Padded], key: str, size: int) -> Padded:
    """A message of ``cls`` whose encoded body is exactly ``size`` bytes."""
    overhead = len(encode_body(cls(key=key, seq=0, payload="")))
    message = cls(key=key, seq=0, payload="x" * (size - overhead))
    if len(encode_body(message)) != size:
        raise ValueError(f"cannot pad {cls.__name__} to {size} bytes")
    return message
