"""The NATS wire format: an envelope as a message's headers (percent-encoded where needed) and
back, and what a JetStream delivery's ack subject tells (see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote, unquote

from nats.aio.msg import Msg

from sagaline.errors import InvalidMessage
from sagaline.messages import Envelope, utc_timestamp

HEADER_MESSAGE_ID = "Nats-Msg-Id"
HEADER_TYPE = "Sagaline-Type"
HEADER_CORRELATION = "Sagaline-Correlation-Id"
HEADER_CAUSATION = "Sagaline-Causation-Id"
HEADER_TIMESTAMP = "Sagaline-Timestamp"
HEADER_SOURCE = "Sagaline-Source"
HEADER_TRACEPARENT = "traceparent"

#: The type of a delivery whose message carries no ``Sagaline-Type`` header.
UNKNOWN_TYPE = "unknown"

#: Printable ASCII but the space and ``%``: header values made of these are sent as they are.
_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != "%")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_STATUS_HEARTBEAT = "100"


class MessageTooLarge(InvalidMessage):
    """A message bigger than the NATS server accepts (its ``max_payload``, headers included)."""

    code = "message_too_large"


def _encode(value: str) -> str:
    return quote(value, safe=_SAFE)


def _ack_numbers(reply: str) -> tuple[int, int]:
    """(times delivered, stream sequence) from a JetStream delivery's ack subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
        return int(tokens[4]), int(tokens[5])
    return int(tokens[6]), int(tokens[7])  # with domain and account hash


def _envelope_of(msg: Msg, stream: str, sequence: int) -> Envelope:
    """The envelope a delivered message carries; ``unknown`` when sagaline's headers are missing."""
    headers = msg.headers or {}
    message_id = headers.get(HEADER_MESSAGE_ID)
    message_type = headers.get(HEADER_TYPE)
    correlation = headers.get(HEADER_CORRELATION)
    causation = headers.get(HEADER_CAUSATION)
    source = headers.get(HEADER_SOURCE)
    return Envelope(
        message_id=unquote(message_id) if message_id else f"nats:{stream}:{sequence}",
        message_type=unquote(message_type) if message_type else UNKNOWN_TYPE,
        body=msg.data,
        correlation_id=unquote(correlation) if correlation is not None else "",
        causation_id=unquote(causation) if causation else None,
        timestamp=headers.get(HEADER_TIMESTAMP) or utc_timestamp(),
        traceparent=headers.get(HEADER_TRACEPARENT) or None,
        source=unquote(source) if source else f"nats:{msg.subject}",
    ).screen_id(lambda: f"nats:{stream}:{sequence}")


def _headers_of(envelope: Envelope) -> dict[str, str]:
    headers = {
        HEADER_MESSAGE_ID: _encode(envelope.message_id),
        HEADER_TYPE: _encode(envelope.message_type),
        HEADER_CORRELATION: _encode(envelope.correlation_id),
        HEADER_TIMESTAMP: _encode(envelope.timestamp),
    }
    if envelope.causation_id:
        headers[HEADER_CAUSATION] = _encode(envelope.causation_id)
    if envelope.source:
        headers[HEADER_SOURCE] = _encode(envelope.source)
    if envelope.traceparent:
        headers[HEADER_TRACEPARENT] = _encode(envelope.traceparent)
    return headers


def _headers_size(headers: Mapping[str, str]) -> int:
    """Bytes the headers take on the wire (``NATS/1.0`` line, ``Key: value`` lines, blank line)."""
    return 12 + sum(len(key) + len(value) + 4 for key, value in headers.items())
