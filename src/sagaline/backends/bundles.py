"""Bundles: several messages of one route carried by one broker message.

A broker's cost, and its client's, is per broker message (a quorum queue's log entry, the
frames, confirms and acknowledgements in the client). The outbox relay publishes hundreds of
messages at a time, most of them to a few routes (a service's partition, an event type's
partition), so the RabbitMQ bus carries what one publication holds for one route as one
message. Each correlation key keeps its order (see :func:`bundled`); consumers unpack a bundle
and settle it once every message of it is settled.

Body: a MessagePack array of ``[messageId, type, correlationId, causationId, timestamp,
traceparent, source, body]``, each body the message's JSON, byte for byte.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec

from sagaline.messages import Envelope, new_message_id

__all__ = [
    "BUNDLE_BYTES",
    "POSITIONS_PER_OFFSET",
    "Bundle",
    "bundled",
    "decode_bundle",
    "encode_bundle",
]

#: The most bytes of bodies one bundle carries (a larger message travels alone).
BUNDLE_BYTES = 256 * 1024
#: Positions of bundled messages in a log: the entry's offset x this + the index in its bundle;
#: so a bundle holds fewer messages than this.
POSITIONS_PER_OFFSET = 1024

# One bundled message: id, type, correlation id, causation id, timestamp, traceparent, source, body.
_Entry = tuple[str, str, str, str | None, str, str | None, str | None, bytes]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[_Entry])

R = TypeVar("R", bound=Hashable)


def encode_bundle(envelopes: Sequence[Envelope]) -> bytes:
    """The body of a bundle of ``envelopes`` (see the module's documentation)."""
    return _encoder.encode(
        [
            (
                e.message_id,
                e.message_type,
                e.correlation_id,
                e.causation_id,
                e.timestamp,
                e.traceparent,
                e.source,
                e.body,
            )
            for e in envelopes
        ]
    )


def decode_bundle(body: bytes) -> list[Envelope]:
    """The messages of a bundle, in order; raises ``ValueError`` when ``body`` is not one."""
    try:
        entries = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a sagaline bundle: {exc}") from None
    if not entries:
        raise ValueError("not a sagaline bundle: it holds no message")
    return [
        Envelope(
            message_id=message_id,
            message_type=message_type,
            body=payload,
            correlation_id=correlation,
            causation_id=causation,
            timestamp=timestamp,
            traceparent=traceparent,
            source=source,
        ).screen_id(new_message_id)
        for (
            message_id,
            message_type,
            correlation,
            causation,
            timestamp,
            traceparent,
            source,
            payload,
        ) in entries
    ]


@dataclass(slots=True)
class Bundle(Generic[R]):
    """The messages to publish as one broker message to ``route`` (one alone, or several)."""

    route: R
    envelopes: list[Envelope] = field(default_factory=list)
    size: int = 0

    def describe(self) -> str:
        """The bundle in an error message."""
        first = self.envelopes[0]
        if len(self.envelopes) == 1:
            return f"{first.message_type} {first.message_id}"
        return (
            f"a bundle of {len(self.envelopes)} messages"
            f" (the first {first.message_type} {first.message_id})"
        )


def bundled(
    routed: Sequence[tuple[Envelope, R]], limit: int, max_bytes: int = BUNDLE_BYTES
) -> list[Bundle[R]]:
    """Group messages ``(envelope, route)`` into bundles, to publish in the returned order.

    Messages of one route share a bundle, up to ``limit`` messages and ``max_bytes`` of bodies
    (a larger message travels alone). Every correlation key's messages keep their order: a
    message never joins a bundle older than the last one holding a message of its key.
    """
    bundles: list[Bundle[R]] = []
    open_: dict[R, int] = {}
    last: dict[str, int] = {}
    for envelope, route in routed:
        size = len(envelope.body)
        key = envelope.correlation_id
        index = open_.get(route)
        if (
            index is None
            or index < last.get(key, -1)
            or len(bundles[index].envelopes) >= limit
            or bundles[index].size + size > max_bytes
        ):
            index = len(bundles)
            bundles.append(Bundle(route))
            if size <= max_bytes:
                open_[route] = index
            else:
                open_.pop(route, None)
        bundle = bundles[index]
        bundle.envelopes.append(envelope)
        bundle.size += size
        last[key] = index
    return bundles
