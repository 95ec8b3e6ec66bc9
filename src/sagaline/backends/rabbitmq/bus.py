"""The RabbitMQ bus: the connection, and the port's methods over the topology, publishing,
consumption and what is read back (see :mod:`sagaline.backends.rabbitmq`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from sagaline.backends._broker import take_bundle, take_prefix
from sagaline.backends.bundles import POSITIONS_PER_OFFSET, bundled
from sagaline.backends.rabbitmq.consumer import _Consumption, home_partitions
from sagaline.backends.rabbitmq.publish import publish_confirmed, publish_marker
from sagaline.backends.rabbitmq.replay import read_dead_letters, replay_log
from sagaline.backends.rabbitmq.topology import Topology
from sagaline.backends.rabbitmq.wire import BrokerDeadLetter, _Route, partition_of
from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.config import redact, redact_url
from sagaline.errors import BusUnavailable, ConfigurationError
from sagaline.messages import Envelope
from sagaline.ports import Batch, ConsumerSpec, Outcome, StoredEvent

if TYPE_CHECKING:
    from sagaline.ports import BrokerBus

log = logging.getLogger("sagaline.rabbitmq")


class RabbitBus:
    """A :class:`~sagaline.ports.BrokerBus` on RabbitMQ (``amqp://user:pass@host:5672/vhost``).

    One connection per bus object (reconnecting by itself), one confirming channel to publish and
    one channel per consumer and member to consume. The connection opens on first use, or with
    :meth:`open`. ``clock`` is what retry holds and member counts are timed by.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sagaline",
        partitions: int = 8,
        prefetch: int = 128,
        publish_timeout: float = 30.0,
        reconnect_interval: float = 1.0,
        connection_name: str | None = None,
        instance: tuple[int, int] | None = None,
        share_delay: float = 5.0,
        bundle: int = 100,
        connect_timeout: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        if not 1 <= bundle < POSITIONS_PER_OFFSET:
            raise ConfigurationError(
                f"bundle {bundle}: from 1 (every message alone) to {POSITIONS_PER_OFFSET - 1}"
            )
        if instance is not None and not 1 <= instance[0] <= instance[1]:
            raise ConfigurationError(
                f"instance {instance[0]}/{instance[1]}: not I/N with 1 <= I <= N"
            )
        scheme = urlsplit(url).scheme
        if scheme not in ("amqp", "amqps"):
            raise ConfigurationError(
                f"a RabbitMQ URL starts with amqp:// or amqps://, not {redact_url(url)!r}"
            )
        self.url = url
        #: The URL as logs and errors show it (without its password).
        self.shown_url = redact_url(url)
        #: Seconds :meth:`open` waits for the broker to accept the connection (None: the
        #: driver's own limits); a failure raises :class:`BusUnavailable` either way.
        self.connect_timeout = connect_timeout
        self.prefix = prefix
        self.partitions = partitions
        #: Unacknowledged AMQP messages in flight per consumer, spread over its partition queues
        #: (at least 4 each). A bundle is one of them: 128 lets a consumer hold up to 12,800
        #: messages when bundles are full, and keeps a single-message consumer busy too.
        self.prefetch = prefetch
        self.publish_timeout = publish_timeout
        self.reconnect_interval = reconnect_interval
        self.connection_name = connection_name or f"sagaline {prefix}"
        #: ``(i, n)``: this process is instance i of n of its services. Each consumes its own
        #: share of the partitions at once and the others ``share_delay`` seconds later, so that
        #: instances started together split the work instead of one taking every partition.
        self.instance = instance
        self.share_delay = share_delay
        #: The most messages of one route (and ``BUNDLE_BYTES`` of bodies) published as one AMQP
        #: message; 1 publishes every message as an AMQP message of its own.
        self.bundle = bundle
        #: What retry holds and the counts of members present are timed by.
        self.clock = clock
        self._topology = Topology(prefix, partitions)
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._open_lock = asyncio.Lock()
        self._consumptions: dict[tuple[str, str, str], _Consumption] = {}
        self._wakeups: dict[tuple[str, str], asyncio.Event] = {}

    def __repr__(self) -> str:
        return (
            f"RabbitBus({self.shown_url!r}, prefix={self.prefix!r}, partitions={self.partitions})"
        )

    # Names ----------------------------------------------------------------------------------

    @property
    def commands_exchange(self) -> str:
        """The direct exchange commands are published to."""
        return self._topology.commands_exchange

    @property
    def events_exchange(self) -> str:
        """The fanout exchange events are published to (it feeds the stream and the routing)."""
        return self._topology.events_exchange

    @property
    def log_stream(self) -> str:
        """The stream queue that retains every event for replay."""
        return self._topology.log_stream

    def queue_names(self, consumer: ConsumerSpec) -> list[str]:
        """The partition queues of a consumer, partition 0 first."""
        return self._topology.queue_names(consumer)

    def dead_letter_queue(self, consumer: ConsumerSpec) -> str:
        """The queue where the broker puts a consumer's messages past their delivery limit."""
        return self._topology.dead_letter_queue(consumer)

    def partition_of(self, key: str) -> int:
        """The partition of a correlation key."""
        return partition_of(key, self.partitions)

    def home_partitions(self) -> frozenset[int] | None:
        """The partitions this instance consumes first (None: all of them at once)."""
        return home_partitions(self.instance, self.partitions)

    # Connection -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (idempotent); later connection losses are repaired in the background."""
        async with self._open_lock:
            if self._connection is not None:
                return
            options: dict[str, Any] = {}
            if self.connect_timeout is not None:
                options["timeout"] = self.connect_timeout
            try:
                connection = await aio_pika.connect_robust(
                    self.url,
                    reconnect_interval=self.reconnect_interval,
                    client_properties={"connection_name": self.connection_name},
                    **options,
                )
            except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
                raise self._unavailable(exc) from None
            try:
                self._publisher = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            except BaseException:
                await connection.close()
                raise
            self._connection = connection

    def _unavailable(self, exc: BaseException) -> BusUnavailable:
        """The error that says on one line, without the password, why the broker cannot be used."""
        parts = urlsplit(self.url)
        if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
            reason = str(exc.args[0] if exc.args else exc)
            reason = reason.partition(". For details")[0]
            problem = f"refused the connection: {reason}"
        elif isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(
            exc
        ):
            # RabbitMQ answers the opening of a virtual host it lacks, or that the user may not
            # use, by closing the connection (NOT_ALLOWED); the driver keeps only the frame's name.
            vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
            problem = (
                f"refused the connection: virtual host {vhost!r} not found, or not open to"
                " this user (NOT_ALLOWED)"
            )
        elif isinstance(exc, aiormq.exceptions.ConnectionClosed):
            problem = f"refused the connection: {exc.args[-1] if exc.args else exc}"
        elif isinstance(exc, TimeoutError):
            waited = f" within {self.connect_timeout:g}s" if self.connect_timeout else ""
            problem = f"is unreachable: no answer{waited}"
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problem = f"is unreachable: {reason or type(exc).__name__}"
        return BusUnavailable(f"RabbitMQ at {self.shown_url} {redact(problem, self.url)}")

    async def _connected(self) -> AbstractRobustConnection:
        if self._connection is None:
            await self.open()
        assert self._connection is not None
        return self._connection

    async def close(self) -> None:
        """Stop every consumption (unacknowledged messages go back) and close the connection."""
        for state in list(self._consumptions.values()):
            await state.close()
        self._consumptions.clear()
        connection, self._connection = self._connection, None
        self._publisher = None
        self._topology.forget()
        if connection is not None:
            with suppress(Exception):
                await connection.close()

    # Topology -------------------------------------------------------------------------------

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Declare the exchanges, the stream, and every consumer's queues and bindings.

        Idempotent, and safe from several processes at once (declarations of equal things agree).
        ``routes`` is not needed to declare: commands are routed by their service's name.
        """
        await self._topology.prepare(self._connected, consumers)

    @property
    def prepared_consumers(self) -> list[ConsumerSpec]:
        """The consumers this bus object has declared queues for."""
        return self._topology.prepared_consumers

    async def delete_topology(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        """Delete this prefix's queues (with the messages in them), its stream and exchanges.

        For tearing down a deployment or a test: the queues of ``consumers`` and of every consumer
        this bus object declared go, with the event stream and the exchanges. A queue or exchange
        that does not exist is passed over. Consumers still attached elsewhere are cancelled.
        """
        for state in list(self._consumptions.values()):
            await state.close()
        self._consumptions.clear()
        connection = await self._connected()
        await self._topology.delete(connection, consumers)

    # Publishing -----------------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Publish persistently; returns once the broker confirmed every message.

        Commands (types in ``routes``) go to their service's partition queue, ``mandatory``;
        events to every subscriber's partition queue and to the stream. The publications are
        pipelined in order on one channel and their confirms awaited together. Raises
        :class:`UnroutableMessage` for a command no queue is bound for, and
        :class:`BusUnavailable` when the broker does not confirm within ``publish_timeout``
        (disconnected): the caller keeps the messages and publishes them again.
        """
        if not envelopes:
            return
        routed: list[tuple[Envelope, _Route]] = [
            (envelope, self._topology.route(envelope, routes)) for envelope in envelopes
        ]
        outgoing = bundled(routed, self.bundle)
        await self._connected()
        if not self._topology.exchanges_declared:
            # Publishing to an exchange that does not exist would close the channel.
            await self.prepare([], routes)
        publisher = self._publisher
        if publisher is None:
            raise BusUnavailable("the bus is closed")
        await publish_confirmed(publisher, outgoing, self.publish_timeout)

    # Consuming ------------------------------------------------------------------------------

    def _wakeup(self, consumer: ConsumerSpec) -> asyncio.Event:
        key = (consumer.name, consumer.source)
        event = self._wakeups.get(key)
        if event is None:
            event = self._wakeups[key] = asyncio.Event()
        return event

    async def _consumption(self, consumer: ConsumerSpec, member: str) -> _Consumption:
        key = (consumer.name, consumer.source, member)
        state = self._consumptions.get(key)
        if state is not None and not state.broken:
            return state
        if state is not None:
            # Its queues may have been deleted: declare them again before consuming.
            del self._consumptions[key]
            self._topology.forget(consumer)
            await state.close()
        connection = await self._connected()
        # The queues must exist before consuming them (a robust channel would retry forever).
        await self.prepare([consumer], {})
        per_queue = max(4, -(-self.prefetch // self.partitions))
        state = _Consumption(
            consumer,
            member,
            self.queue_names(consumer),
            per_queue,
            self._wakeup(consumer),
            self.home_partitions(),
            self.share_delay,
            self.instance[1] if self.instance else 1,
            self._topology.members_queue(consumer),
            dead_queue=self.dead_letter_queue(consumer),
            clock=self.clock,
        )
        try:
            await state.start(connection)
        except BaseException:
            self._topology.forget(consumer)
            await state.close()
            raise
        self._consumptions[key] = state
        return state

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Up to ``limit`` deliveries already received for ``consumer``; empty when none.

        The first claim of a member starts consuming the consumer's partition queues.
        """
        self._wakeup(consumer).clear()
        state = await self._consumption(consumer, member)
        await state.reattach()
        await state.give_back()
        deliveries = state.take(limit)
        if not deliveries:
            return Batch(consumer=consumer, deliveries=[])
        return Batch(consumer=consumer, deliveries=deliveries, cursor=state)

    async def complete(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """Settle a batch whose handling committed: ACK and DEAD are acknowledged, RETRY comes
        back after ``retry.delay(attempt)`` ahead of its key's later messages, SKIP after it."""
        state = batch.cursor
        if isinstance(state, _Consumption) and not state.closed:
            await state.settle(batch.deliveries, outcomes)

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Stop ``member`` consuming ``consumer``; what it had not acknowledged goes back."""
        state = self._consumptions.pop((consumer.name, consumer.source, member), None)
        if state is not None:
            await state.close()

    async def wait_for_work(self, consumer: ConsumerSpec, timeout: float) -> None:
        """Return when a delivery can be claimed (or a retry delay ends), or after ``timeout``."""
        for (name, source, _member), state in list(self._consumptions.items()):
            if name == consumer.name and source == consumer.source and state.has_work():
                return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup(consumer).wait(), timeout)

    # Replay and inspection ------------------------------------------------------------------

    @property
    def max_payload(self) -> None:
        """None: the broker carries what sagaline's own message limit allows."""
        return None

    def database(self) -> None:
        """None: a broker, not a database (it keeps no record of what clients submitted)."""
        return None

    async def replay(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event retained in the stream at position > ``after``, up to the end as of now.

        An event's position is its stream offset x :data:`POSITIONS_PER_OFFSET` + its index in
        its bundle + 1: increasing, not dense. The stream's end is found by publishing a marker
        into it and reading up to that marker.
        """
        connection = await self._connected()
        await self.prepare([], {})
        events = replay_log(connection, self.log_stream, after, self._publish_marker)
        async with aclosing(events):
            async for event in events:
                yield event

    async def _publish_marker(self, marker: str) -> None:
        await self._connected()
        publisher = self._publisher
        if publisher is None:
            raise BusUnavailable("the bus is closed")
        await publish_marker(publisher, self.log_stream, marker, self.publish_timeout)

    async def broker_dead_letters(self, consumer: ConsumerSpec) -> list[BrokerDeadLetter]:
        """The messages the broker dead-lettered for ``consumer`` that no member has taken back
        yet (looked at, left in place)."""
        connection = await self._connected()
        await self.prepare([consumer], {})
        return await read_dead_letters(connection, self.dead_letter_queue(consumer))


if TYPE_CHECKING:

    def _implements_port(bus: RabbitBus) -> BrokerBus:
        return bus


def open_bus(url: str, **options: Any) -> RabbitBus:
    """The RabbitMQ bus ``url`` names (the scheme registry's factory; see
    :mod:`sagaline.config`): ``?prefix=NAME`` and ``?bundle=N`` in the URL are taken as those
    options (an explicit option wins)."""
    options = dict(options)
    url = take_bundle(take_prefix(url, options), options)
    return RabbitBus(url, **options)
