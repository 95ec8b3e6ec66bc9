"""Reading a stream directly, outside the durable consumers: the event log replayed from any
position, and a message the server gave up on (a ``MAX_DELIVERIES`` advisory) read back so that
the worker dead-letters it (see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import suppress
from urllib.parse import unquote

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from sagaline.backends.nats.wire import (
    _STATUS_HEARTBEAT,
    HEADER_CAUSATION,
    HEADER_CORRELATION,
    HEADER_MESSAGE_ID,
    HEADER_SOURCE,
    HEADER_TIMESTAMP,
    HEADER_TRACEPARENT,
    HEADER_TYPE,
    UNKNOWN_TYPE,
    _ack_numbers,
    _envelope_of,
)
from sagaline.messages import Envelope, utc_timestamp
from sagaline.ports import StoredEvent

_REPLAY_BATCH = 1000


async def replay_stream(
    nc: Client, js: JetStreamContext, stream: str, after: int, timeout: float
) -> AsyncGenerator[StoredEvent, None]:
    """The retained messages of ``stream`` after sequence ``after``, up to the last one at the
    start; read through an ephemeral consumer in batches, each answer awaited ``timeout``
    seconds. Positions are stream sequences."""
    last = (await js.stream_info(stream)).state.last_seq
    if last <= after:
        return
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            description="sagaline replay",
        ),
    )
    assert info.name is not None
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        position = after
        while position < last:
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{info.name}",
                json.dumps({"batch": _REPLAY_BATCH, "no_wait": True}).encode(),
                reply=inbox,
            )
            received = 0
            while True:
                msg = await sub.next_msg(timeout=timeout)
                if not msg.reply:
                    if msg.headers and msg.headers.get("Status") == _STATUS_HEARTBEAT:
                        continue
                    break
                _, sequence = _ack_numbers(msg.reply)
                received += 1
                if sequence > last:
                    # Published after the replay began: past its end.
                    position = last
                    continue
                position = sequence
                envelope = _envelope_of(msg, stream, sequence)
                yield StoredEvent(sequence, None, None, envelope)
            if not received:
                break
    finally:
        with suppress(Exception):
            await sub.unsubscribe()
        with suppress(Exception):
            await js.delete_consumer(stream, info.name)


def exhaustion_of(msg: Msg) -> tuple[str, str, int, int] | None:
    """What a ``MAX_DELIVERIES`` advisory tells: (stream, consumer, stream sequence, deliveries);
    None for an advisory that cannot be read."""
    try:
        advisory = json.loads(msg.data)
        stream, consumer = str(advisory["stream"]), str(advisory["consumer"])
        sequence, deliveries = int(advisory["stream_seq"]), int(advisory["deliveries"])
    except (ValueError, KeyError, TypeError):
        return None
    return stream, consumer, sequence, deliveries


async def read_back(js: JetStreamContext, stream: str, sequence: int) -> Envelope | None:
    """The envelope of a message the server gave up on, read from its stream; None when it is
    gone (settled, or removed, meanwhile)."""
    try:
        raw = await js.get_msg(stream, sequence)
    except NotFoundError:
        return None
    return Envelope(
        message_id=unquote((raw.headers or {}).get(HEADER_MESSAGE_ID, ""))
        or f"nats:{stream}:{sequence}",
        message_type=unquote((raw.headers or {}).get(HEADER_TYPE, UNKNOWN_TYPE)),
        body=raw.data or b"",
        correlation_id=unquote((raw.headers or {}).get(HEADER_CORRELATION, "")),
        causation_id=unquote((raw.headers or {}).get(HEADER_CAUSATION, "")) or None,
        timestamp=(raw.headers or {}).get(HEADER_TIMESTAMP) or utc_timestamp(),
        traceparent=(raw.headers or {}).get(HEADER_TRACEPARENT),
        source=unquote((raw.headers or {}).get(HEADER_SOURCE, "")) or None,
    ).screen_id(f"nats:{stream}:{sequence}")
