"""Publishing to a RabbitMQ bus: bundles pipelined on the confirming channel, their confirms awaited
together and each failure told apart (see :mod:`sagaline.backends.rabbitmq`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import aiormq
from aio_pika.abc import AbstractRobustChannel
from pamqp.commands import Basic

from sagaline.backends.bundles import Bundle
from sagaline.backends.rabbitmq.wire import (
    _MARKER_HEADER,
    UnroutableMessage,
    _body_and_properties,
    _Route,
)
from sagaline.errors import BusUnavailable


async def publish_confirmed(
    publisher: AbstractRobustChannel, outgoing: Sequence[Bundle[_Route]], timeout: float
) -> None:
    """Publish every bundle in order on ``publisher`` and return once the broker confirmed each.

    Raises :class:`UnroutableMessage` for a mandatory one no queue is bound for, and
    :class:`BusUnavailable` when the broker refuses one or does not confirm within ``timeout``.
    """
    try:
        async with asyncio.timeout(timeout):
            await publisher.ready()
            raw = cast(aiormq.Channel, await publisher.get_underlay_channel())
            results = await asyncio.gather(
                *(
                    raw.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=mandatory,
                        wait=False,
                    )
                    for publication in outgoing
                    for (exchange, routing_key, mandatory) in [publication.route]
                    for body, properties in [_body_and_properties(publication)]
                ),
                return_exceptions=True,
            )
    except TimeoutError as exc:
        raise BusUnavailable(f"RabbitMQ did not confirm within {timeout} seconds") from exc
    for publication, result in zip(outgoing, results, strict=True):
        if isinstance(result, aiormq.exceptions.PublishError):
            raise UnroutableMessage(
                f"{publication.describe()} was returned: no queue is bound for"
                f" {publication.route[1]!r} (declare the topology with prepare())"
            )
        if isinstance(result, aiormq.exceptions.DeliveryError):
            raise BusUnavailable(f"RabbitMQ refused {publication.describe()}: {result}")
        if isinstance(result, BaseException):
            raise BusUnavailable(f"publishing failed: {result!r}") from result


async def publish_marker(
    publisher: AbstractRobustChannel, stream: str, marker: str, timeout: float
) -> None:
    """Publish a marker into ``stream`` (every reader passes over it but the replay that looks
    for it: it tells that replay where the stream ended when it began)."""
    async with asyncio.timeout(timeout):
        await publisher.ready()
        raw = await publisher.get_underlay_channel()
        await raw.basic_publish(
            b"",
            exchange="",
            routing_key=stream,
            properties=Basic.Properties(
                delivery_mode=2, message_id=marker, headers={_MARKER_HEADER: marker}
            ),
            mandatory=True,
        )
