"""The RabbitMQ wire format: envelopes as AMQP properties and headers, bundles as one AMQP
message, and the delivery counts the broker keeps (see :mod:`sagaline.backends.rabbitmq`)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pamqp.commands import Basic

from sagaline.backends.bundles import Bundle, decode_bundle, encode_bundle
from sagaline.errors import SagalineError
from sagaline.messages import Envelope, new_message_id, utc_timestamp

log = logging.getLogger("sagaline.rabbitmq")

#: The type a delivery gets when it lacks sagaline's metadata (the worker dead-letters it).
UNKNOWN_TYPE = "unknown"

_MARKER_HEADER = "x-sagaline-marker"
_SHORTSTR = 255

#: The content type of a bundle: several messages of one route carried by one AMQP message.
BUNDLE_CONTENT_TYPE = "application/vnd.sagaline.bundle+msgpack"
#: The header giving how many messages a bundle holds.
_BUNDLE_HEADER = "x-sagaline-bundle"
#: The type a bundle has as an AMQP message (a reader that does not unpack it sees this).
_BUNDLE_TYPE = "sagaline.bundle"


class UnroutableMessage(SagalineError):
    """A command was published that no queue is bound for: it was returned, not lost."""

    code = "unroutable_message"


@dataclass(frozen=True, slots=True)
class BrokerDeadLetter:
    """A message the broker dead-lettered (its delivery limit was reached), as RabbitMQ tells it."""

    queue: str
    envelope: Envelope
    reason: str
    count: int


def partition_of(key: str, partitions: int) -> int:
    """The partition of a correlation key: ``crc32(key) % partitions``, stable everywhere."""
    return zlib.crc32(key.encode()) % partitions


def _text(value: Any) -> str | None:
    """A header or property as text (pamqp hands out ``bytes`` for non-UTF-8 strings)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _properties(envelope: Envelope) -> Basic.Properties:
    headers: dict[str, Any] = {"timestamp": envelope.timestamp}
    if envelope.causation_id is not None:
        headers["causationId"] = envelope.causation_id
    if envelope.traceparent is not None:
        headers["traceparent"] = envelope.traceparent
    if envelope.source is not None:
        headers["source"] = envelope.source
    correlation: str | None = envelope.correlation_id
    if correlation is not None and len(correlation.encode()) > _SHORTSTR:
        # A property is a short string; a longer key travels in a header only.
        headers["correlationId"] = correlation
        correlation = None
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=envelope.message_id,
        correlation_id=correlation,
        message_type=envelope.message_type,
        headers=headers,
    )


def envelope_of(properties: Basic.Properties, body: bytes) -> Envelope:
    """The envelope of a received message; never raises.

    A message without a message id or a type was not published by sagaline: it becomes an
    envelope of type ``unknown`` (with a fresh id), which the worker dead-letters with the reason.
    """
    try:
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        message_id = _text(properties.message_id)
        message_type = _text(properties.message_type)
        if not message_id or not message_type:
            message_id = message_id or new_message_id()
            message_type = UNKNOWN_TYPE
        correlation = _text(headers.get("correlationId")) or _text(properties.correlation_id)
        timestamp = _text(headers.get("timestamp"))
        if timestamp is None:
            sent = properties.timestamp
            timestamp = utc_timestamp(sent) if isinstance(sent, datetime) else utc_timestamp()
        return Envelope(
            message_id=message_id,
            message_type=message_type,
            body=bytes(body),
            correlation_id=correlation or "",
            causation_id=_text(headers.get("causationId")),
            timestamp=timestamp,
            traceparent=_text(headers.get("traceparent")),
            source=_text(headers.get("source")),
        ).screen_id(new_message_id)
    except Exception:
        log.exception("unreadable message properties; treated as a message of unknown type")
        return Envelope(
            message_id=new_message_id(),
            message_type=UNKNOWN_TYPE,
            body=bytes(body) if isinstance(body, bytes | bytearray) else b"",
            correlation_id="",
            causation_id=None,
            timestamp=utc_timestamp(),
        )


def _bundle_properties(envelopes: Sequence[Envelope]) -> Basic.Properties:
    return Basic.Properties(
        content_type=BUNDLE_CONTENT_TYPE,
        delivery_mode=2,
        message_id=new_message_id(),
        message_type=_BUNDLE_TYPE,
        headers={_BUNDLE_HEADER: len(envelopes)},
    )


def messages_of(properties: Basic.Properties, body: bytes) -> list[Envelope]:
    """The envelopes one received AMQP message carries: one, or a bundle's; never raises.

    A bundle that cannot be unpacked becomes one envelope of type ``unknown`` holding its body,
    which the worker dead-letters with the reason.
    """
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    if _BUNDLE_HEADER not in headers and _text(properties.content_type) != BUNDLE_CONTENT_TYPE:
        return [envelope_of(properties, body)]
    try:
        return decode_bundle(bytes(body))
    except ValueError:
        log.warning("a bundle that cannot be unpacked is treated as a message of unknown type")
        return [
            Envelope(
                message_id=_text(properties.message_id) or new_message_id(),
                message_type=UNKNOWN_TYPE,
                body=bytes(body),
                correlation_id="",
                causation_id=None,
                timestamp=utc_timestamp(),
            ).screen_id(new_message_id)
        ]


#: Where a message is published: exchange, routing key, mandatory.
_Route = tuple[str, str, bool]


def _body_and_properties(bundle: Bundle[_Route]) -> tuple[bytes, Basic.Properties]:
    if len(bundle.envelopes) == 1:
        [envelope] = bundle.envelopes
        return envelope.body, _properties(envelope)
    return encode_bundle(bundle.envelopes), _bundle_properties(bundle.envelopes)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _delivery_count(properties: Basic.Properties) -> int:
    """How many times the broker delivered this message before (quorum queues count them)."""
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    return _count(headers.get("x-delivery-count"))
