"""What is read back from a RabbitMQ bus rather than consumed: the event log replayed from the
stream, and the messages the broker dead-lettered (see :mod:`sagaline.backends.rabbitmq`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import suppress
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from sagaline.backends.bundles import POSITIONS_PER_OFFSET
from sagaline.backends.rabbitmq.wire import (
    _MARKER_HEADER,
    BrokerDeadLetter,
    _count,
    _text,
    messages_of,
)
from sagaline.errors import BusUnavailable
from sagaline.ports import StoredEvent


async def replay_log(
    connection: AbstractRobustConnection,
    stream: str,
    after: int,
    mark: Callable[[str], Awaitable[None]],
) -> AsyncGenerator[StoredEvent, None]:
    """Every event retained in ``stream`` at position > ``after``, up to the end as of now.

    An event's position is its stream offset x :data:`POSITIONS_PER_OFFSET` + its index in its
    bundle + 1. The end is found by publishing a marker into the stream (with ``mark``) and
    reading up to that marker.
    """
    channel = await connection.channel(publisher_confirms=False)
    received: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
    marker = uuid.uuid4().hex
    try:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=1000)

        async def on_message(message: DeliveredMessage) -> None:
            received.put_nowait(message)

        start = max(0, after) // POSITIONS_PER_OFFSET
        offset: int | str = start if start > 0 else "first"
        await raw.basic_consume(
            stream,
            on_message,
            no_ack=False,
            arguments={"x-stream-offset": offset},
        )
        await mark(marker)
        closing = raw.closing
        while True:
            message = await _next_message(received, closing)
            tag = getattr(message.delivery, "delivery_tag", None)
            if isinstance(tag, int):
                await raw.basic_ack(tag, wait=False)
            properties = message.header.properties
            headers = properties.headers if isinstance(properties.headers, dict) else {}
            seen = headers.get(_MARKER_HEADER)
            if seen is not None:
                if _text(seen) == marker:
                    return
                continue
            stream_offset = headers.get("x-stream-offset")
            if not isinstance(stream_offset, int) or stream_offset < start:
                continue
            first = stream_offset * POSITIONS_PER_OFFSET + 1
            for index, envelope in enumerate(messages_of(properties, message.body)):
                if first + index > after:
                    yield StoredEvent(
                        position=first + index, stream=None, version=None, envelope=envelope
                    )
    finally:
        with suppress(Exception):
            await channel.close()


async def _next_message(
    received: asyncio.Queue[DeliveredMessage], closing: asyncio.Future[Any]
) -> DeliveredMessage:
    if not received.empty():
        return received.get_nowait()
    getter = asyncio.ensure_future(received.get())
    await asyncio.wait({getter, closing}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    raise BusUnavailable("the channel closed during a replay")


async def read_dead_letters(
    connection: AbstractRobustConnection, queue: str
) -> list[BrokerDeadLetter]:
    """The messages in the dead-letter queue ``queue``, looked at and left in place."""
    channel = await connection.channel(publisher_confirms=False)
    found: list[BrokerDeadLetter] = []
    try:
        raw = await channel.get_underlay_channel()
        while True:
            message = await raw.basic_get(queue, no_ack=False)
            if not isinstance(message.delivery, Basic.GetOk):
                break
            properties = message.header.properties
            headers = properties.headers if isinstance(properties.headers, dict) else {}
            deaths = headers.get("x-death")
            death = deaths[0] if isinstance(deaths, list) and deaths else {}
            death = death if isinstance(death, dict) else {}
            found.extend(
                BrokerDeadLetter(
                    queue=_text(death.get("queue")) or "",
                    envelope=envelope,
                    reason=_text(headers.get("x-first-death-reason"))
                    or _text(death.get("reason"))
                    or "",
                    count=_count(death.get("count")),
                )
                for envelope in messages_of(properties, message.body)
            )
    finally:
        # Closing the channel puts every message it got back into the queue.
        with suppress(Exception):
            await channel.close()
    return found
