"""What a prefix is made of on the broker: its exchanges, the log stream, each consumer's partition
queues and dead-letter queue, where each message is routed, and their declaration (see
:mod:`sagaline.backends.rabbitmq`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import AbstractChannel

from sagaline.backends.rabbitmq.wire import _Route, partition_of
from sagaline.errors import ConfigurationError
from sagaline.messages import Envelope
from sagaline.ports import ConsumerSpec

log = logging.getLogger("sagaline.rabbitmq")


class Topology:
    """The names of one prefix's exchanges and queues, and what of them this process declared."""

    def __init__(self, prefix: str, partitions: int) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self._lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._prepared: dict[str, ConsumerSpec] = {}

    # Names ----------------------------------------------------------------------------------

    @property
    def commands_exchange(self) -> str:
        """The direct exchange commands are published to."""
        return f"{self.prefix}.commands"

    @property
    def events_exchange(self) -> str:
        """The fanout exchange events are published to (it feeds the stream and the routing)."""
        return f"{self.prefix}.events"

    @property
    def log_stream(self) -> str:
        """The stream queue that retains every event for replay."""
        return f"{self.prefix}.log"

    @property
    def events_route(self) -> str:
        """The internal direct exchange that routes events to their subscribers' partitions."""
        return f"{self.prefix}.events.route"

    @property
    def dead_exchange(self) -> str:
        """The direct exchange of the broker's dead letters."""
        return f"{self.prefix}.dead"

    def base(self, consumer: ConsumerSpec) -> str:
        """The name every queue of a consumer starts with."""
        kind = "cmd" if consumer.source == "queue" else "sub"
        return f"{self.prefix}.{kind}.{consumer.name}"

    def queue_names(self, consumer: ConsumerSpec) -> list[str]:
        """The partition queues of a consumer, partition 0 first."""
        base = self.base(consumer)
        return [f"{base}.{part}" for part in range(self.partitions)]

    def dead_letter_queue(self, consumer: ConsumerSpec) -> str:
        """The queue where the broker puts a consumer's messages past their delivery limit."""
        return f"{self.base(consumer)}.dead"

    def members_queue(self, consumer: ConsumerSpec) -> str:
        """The queue whose consumer count is the number of a consumer's instances present."""
        return f"{self.base(consumer)}.members"

    def route(self, envelope: Envelope, routes: Mapping[str, str]) -> _Route:
        """Where a message is published: (exchange, routing key, mandatory). A command goes to
        its service's partition queue, mandatory; an event to its type's partition."""
        part = partition_of(envelope.correlation_id, self.partitions)
        service = routes.get(envelope.message_type)
        if service is not None:
            return (self.commands_exchange, f"{service}.{part}", True)
        return (self.events_exchange, f"{envelope.message_type}.{part}", False)

    # Declaration ----------------------------------------------------------------------------

    @property
    def exchanges_declared(self) -> bool:
        """Whether this process declared the exchanges (publishing to a missing one would close
        the channel)."""
        return "exchanges" in self._declared

    @property
    def prepared_consumers(self) -> list[ConsumerSpec]:
        """The consumers this process has declared queues for."""
        return list(self._prepared.values())

    def forget(self, consumer: ConsumerSpec | None = None) -> None:
        """Declare ``consumer``'s queues again at the next prepare (everything, without one)."""
        if consumer is None:
            self._declared.clear()
        else:
            self._declared.discard(self._declaration_key(consumer))

    async def prepare(
        self,
        connect: Callable[[], Awaitable[AbstractRobustConnection]],
        consumers: Sequence[ConsumerSpec],
    ) -> None:
        """Declare the exchanges, the stream, and every consumer's queues and bindings not
        declared yet, on a connection from ``connect`` (asked for only when something is to be
        declared)."""
        async with self._lock:
            for consumer in consumers:
                self._prepared.setdefault(self._declaration_key(consumer), consumer)
            steps = self._declarations(consumers)
            if not steps:
                return
            connection = await connect()
            for attempt in range(1, 4):
                channel = await connection.channel(publisher_confirms=False)
                try:
                    raw = await channel.get_underlay_channel()
                    for key, declare in steps:
                        if key not in self._declared:
                            await declare(raw)
                            self._declared.add(key)
                    return
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    raise ConfigurationError(
                        f"RabbitMQ refused a declaration that differs from what exists: {exc}."
                        " Queue arguments (partitions, max_attempts) cannot change in place."
                    ) from exc
                except aiormq.exceptions.ChannelClosed:
                    # Two processes declaring the same new quorum queue may collide: try again.
                    if attempt == 3:
                        raise
                    log.debug("declaration failed, trying again", exc_info=True)
                    await asyncio.sleep(0.1 * attempt)
                finally:
                    with suppress(Exception):
                        await channel.close()

    async def delete(
        self, connection: AbstractRobustConnection, consumers: Sequence[ConsumerSpec]
    ) -> None:
        """Delete the queues of ``consumers`` and of every consumer declared here, the stream and
        the exchanges; what does not exist is passed over."""
        wanted = {self._declaration_key(c): c for c in [*self._prepared.values(), *consumers]}
        queues = [self.log_stream]
        for consumer in wanted.values():
            queues.extend(self.queue_names(consumer))
            queues.append(self.dead_letter_queue(consumer))
        exchanges = [
            self.events_route,
            self.events_exchange,
            self.commands_exchange,
            self.dead_exchange,
        ]
        channel = await connection.channel(publisher_confirms=False)
        try:
            raw = await channel.get_underlay_channel()
            for queue in queues:
                await raw.queue_delete(queue)
            for exchange in exchanges:
                await raw.exchange_delete(exchange)
        finally:
            with suppress(Exception):
                await channel.close()
        self._declared.clear()
        self._prepared.clear()

    def _declarations(self, consumers: Sequence[ConsumerSpec]) -> list[tuple[str, Any]]:
        """What :meth:`prepare` declares, in order, each under a key remembered once done."""
        steps: list[tuple[str, Any]] = []

        def step(key: str, declare: Any) -> None:
            if key not in self._declared:
                steps.append((key, declare))

        step("exchanges", self._declare_exchanges)
        for consumer in consumers:
            step(
                self._declaration_key(consumer),
                lambda raw, consumer=consumer: self._declare_consumer(raw, consumer),
            )
        return steps

    @staticmethod
    def _declaration_key(consumer: ConsumerSpec) -> str:
        return f"{consumer.source}:{consumer.name}:{sorted(consumer.message_types)}"

    def _partition_arguments(self, consumer: ConsumerSpec) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": consumer.retry.delivery_limit,
            "x-dead-letter-exchange": self.dead_exchange,
            "x-dead-letter-routing-key": self.base(consumer),
        }

    async def _declare_exchanges(self, raw: AbstractChannel) -> None:
        await raw.exchange_declare(self.commands_exchange, exchange_type="direct", durable=True)
        await raw.exchange_declare(self.events_exchange, exchange_type="fanout", durable=True)
        await raw.exchange_declare(
            self.events_route, exchange_type="direct", durable=True, internal=True
        )
        await raw.exchange_declare(self.dead_exchange, exchange_type="direct", durable=True)
        await raw.exchange_bind(self.events_route, self.events_exchange, "")
        await raw.queue_declare(self.log_stream, durable=True, arguments={"x-queue-type": "stream"})
        await raw.queue_bind(self.log_stream, self.events_exchange, "")

    async def _declare_consumer(self, raw: AbstractChannel, consumer: ConsumerSpec) -> None:
        base = self.base(consumer)
        dead = self.dead_letter_queue(consumer)
        await raw.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
        await raw.queue_bind(dead, self.dead_exchange, base)
        arguments = self._partition_arguments(consumer)
        for part, queue in enumerate(self.queue_names(consumer)):
            await raw.queue_declare(queue, durable=True, arguments=arguments)
            if consumer.source == "queue":
                await raw.queue_bind(queue, self.commands_exchange, f"{consumer.name}.{part}")
            else:
                for message_type in sorted(consumer.message_types):
                    await raw.queue_bind(queue, self.events_route, f"{message_type}.{part}")
