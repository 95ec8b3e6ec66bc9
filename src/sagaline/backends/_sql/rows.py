"""Rows to objects and back, in any SQL dialect: envelopes, saga records, JSON with exact money,
partitions."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import msgspec

from sagaline.backends._sql.constants import PARTITIONS
from sagaline.messages import Envelope
from sagaline.ports import DeadLetter, SagaRecord

__all__ = [
    "DEAD_LETTER_COLUMNS",
    "DECODER",
    "ENVELOPE_COLUMNS",
    "JSON",
    "body_value",
    "dead_letter_from_row",
    "decode_json",
    "envelope_from_row",
    "envelope_params",
    "partition_of",
    "saga_from_row",
]

JSON = msgspec.json.Encoder(decimal_format="number")
DECODER: msgspec.json.Decoder[Any] = msgspec.json.Decoder(float_hook=Decimal)
ENVELOPE_COLUMNS = (
    "message_id, type, body, correlation_id, causation_id, timestamp, traceparent, source"
)


#: The columns :func:`dead_letter_from_row` reads, in its order.
DEAD_LETTER_COLUMNS = (
    "id, consumer, message_id, type, body, correlation_id, causation_id, timestamp, source,"
    " reason, attempts, failed_at"
)


def dead_letter_from_row(row: Sequence[Any]) -> DeadLetter:
    """The dead letter in ``row`` (see :data:`DEAD_LETTER_COLUMNS`)."""
    body = row[4]
    return DeadLetter(
        id=row[0],
        consumer=row[1],
        envelope=Envelope(
            message_id=row[2],
            message_type=row[3],
            body=body.encode() if isinstance(body, str) else body,
            correlation_id=row[5],
            causation_id=row[6],
            timestamp=row[7],
            source=row[8],
        ),
        reason=row[9],
        attempts=row[10],
        failed_at=row[11],
    )


def decode_json(text: str | bytes) -> Any:
    """JSON with numbers that have a fraction read as Decimal (money never goes through float)."""
    return DECODER.decode(text)


def partition_of(key: str) -> int:
    """The partition of a correlation key: stable across processes and runs."""
    return zlib.crc32(key.encode()) % PARTITIONS


def envelope_from_row(row: Sequence[Any], offset: int = 0) -> Envelope:
    """The envelope in ``row`` from column ``offset`` on (see :data:`ENVELOPE_COLUMNS`)."""
    body = row[offset + 2]
    return Envelope(
        message_id=row[offset],
        message_type=row[offset + 1],
        body=body.encode() if isinstance(body, str) else body,
        correlation_id=row[offset + 3],
        causation_id=row[offset + 4],
        timestamp=row[offset + 5],
        traceparent=row[offset + 6],
        source=row[offset + 7],
    )


def body_value(body: bytes) -> str | bytes:
    """A body as stored: text, or a blob when it is not text (a foreign producer's bytes), so
    that it is kept, and dead-lettered, exactly as it came."""
    try:
        return body.decode()
    except UnicodeDecodeError:
        return body


def envelope_params(envelope: Envelope) -> tuple[Any, ...]:
    """An envelope as the parameters of :data:`ENVELOPE_COLUMNS`."""
    body = body_value(envelope.body)
    return (
        envelope.message_id,
        envelope.message_type,
        body,
        envelope.correlation_id,
        envelope.causation_id,
        envelope.timestamp,
        envelope.traceparent,
        envelope.source,
    )


def saga_from_row(row: Sequence[Any]) -> SagaRecord:
    """A saga record from a row of the sagas table (its history is loaded separately)."""
    return SagaRecord(
        saga_id=row[0],
        definition=row[1],
        definition_version=row[2],
        status=row[3],
        step=row[4],
        data=decode_json(row[5]),
        loaded_status=row[3],
        version=row[6],
        created_at=row[7],
        updated_at=row[8],
    )
