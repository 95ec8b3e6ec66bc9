"""The RabbitMQ bus: quorum queues, publisher confirms, single-active-consumer partitions.

A :class:`RabbitBus` is a :class:`~sagaline.ports.BrokerBus`: services keep their state in their
own store, whose outbox relay publishes here; a worker claims deliveries, handles them in one store
transaction and completes them after the commit.

Topology (all durable, declared by :meth:`RabbitBus.prepare`, idempotent)::

    <prefix>.commands   direct exchange, routing key "<service>.<partition>"
    <prefix>.events     fanout exchange -> <prefix>.log (stream) and -> <prefix>.events.route
    <prefix>.events.route  direct exchange (internal), routing key "<eventType>.<partition>"
    <prefix>.dead       direct exchange of the broker's dead letters
    <prefix>.cmd.<service>.<p>     quorum queue p of a service's commands
    <prefix>.sub.<subscriber>.<p>  quorum queue p of a subscriber, bound for each of its event types
    <prefix>.cmd.<service>.dead / <prefix>.sub.<subscriber>.dead   the broker's dead letters

Wire format: the body is the message's JSON, byte for byte. The metadata travels beside it: the
AMQP ``message_id``, ``type`` and ``correlation_id`` properties, and the headers ``causationId``,
``timestamp`` (ISO-8601 UTC), ``traceparent`` and ``source``. Messages are persistent and published
with confirms; commands are ``mandatory``, so a command no queue is bound for is an error, never a
silent loss. A delivery without sagaline's metadata (published by another program) becomes a
delivery of type ``unknown``, which the worker dead-letters with the reason.

Bundles: what one publication holds for the same route (a service's partition for commands, an
event type's partition for events) travels as one AMQP message, up to ``bundle`` messages
(default 100) and :data:`BUNDLE_BYTES` of bodies: content type :data:`BUNDLE_CONTENT_TYPE`, header
``x-sagaline-bundle`` (the count), body a MessagePack array of ``[messageId, type, correlationId,
causationId, timestamp, traceparent, source, body]``. A quorum queue's cost is per AMQP message,
and so are a client's frames, confirms and acks: the outbox relay publishes hundreds of messages
at a time, so under load a saga step costs the broker a fraction of a message (see the README's
figures). Order is kept: a message never joins a bundle published before the last one holding a
message of its correlation key, and a consumer hands a bundle's messages out in order. A bundle is
acknowledged once every message of it is settled, so a redelivery (its consumer died, or let go
of it with one of its messages waiting for a retry) brings back the whole bundle, and the inbox
absorbs the messages already handled; a batch takes whole bundles, so that a member stopping
between batches leaves none half done. The broker counts deliveries and applies its delivery limit
per AMQP message: a bundle redelivered past the limit is dead-lettered whole, each message of it
listed by :meth:`RabbitBus.broker_dead_letters`. With ``bundle=1`` every message is an AMQP
message of its own (for consumers that are not sagaline).

Ordering: a correlation key belongs to partition ``crc32(key) % partitions``. Each partition queue
has ``x-single-active-consumer``: every instance of a service consumes every partition queue and
RabbitMQ delivers a queue to one of them at a time, failing over to the next when it goes away
(its unacknowledged messages return to the queue, ahead of newer ones). Instance ``i`` of ``n``
(``instance=(i, n)``) consumes its home partitions (``p % n == i - 1``) on one channel at once and
the others on a second channel ``share_delay`` later, so instances started together split the
work. Each instance also consumes ``<base>.members``, an auto-delete queue that never holds a
message, whose consumer count is the number of instances present. An instance that finds itself
delivered from borrowed partitions while all ``n`` are present gives them back: it stops handing
their messages out, waits until those handed out are settled, and closes that channel, so the
broker returns what it held ahead of newer messages and the next consumer in line goes on; it
then stands by again. A partition passes on until its home instance has it, so an instance that
restarts gets its share back within seconds.

Retry: a delivery to retry stays unacknowledged in this process. Its key is held for the backoff
delay: the messages of that key behind it (``SKIP``) wait in order in the buffer, while other keys,
of the same partition too, go on. When the delay is over the same delivery is handed out again with
``attempt + 1``. Nothing goes back to the broker, so no later message can overtake it, and the
broker's delivery count keeps counting only real redeliveries (a consumer that died or left).
``attempt`` is that count (``x-delivery-count``, absent on the first delivery) plus one, plus the
retries done here. The worker counts in its store how many times it handed out a message
delivered before (the broker's count also grows for every message a dying consumer merely held):
one handed out before without completing goes to its handler alone, so that a message that kills
its consumer cannot take a batch of others down with it, and the one that keeps dying is
dead-lettered in the store with its reason, then acknowledged. As a backstop, the partition
queues have a dead-letter exchange and ``x-delivery-limit`` = the retry policy's
``delivery_limit``, so a message that crashes every consumer before its dead letter is recorded
ends in the consumer's ``.dead`` queue (see :meth:`RabbitBus.broker_dead_letters`); it is that
generous so that the messages held by a process that a poison message kills again and again do
not get there first.

Replay: every event is also routed into the stream ``<prefix>.log``, read back from any position
by :meth:`RabbitBus.replay` (a position is the stream offset x :data:`POSITIONS_PER_OFFSET` + the
index in its bundle + 1, so ``after=0`` is the beginning; the log keeps each key's order, and
events of different keys in the order their bundles were routed).
Why a stream rather than replaying the owning services' event logs: with a broker bus the events
of a system are spread over one store per service, each with its own positions; a projection
rebuild would have to reach every store (some of which may not even be event-sourced, e.g. a
saga orchestrator's emitted events live only in its outbox) and merge them in an order that never
existed on the bus. The stream holds exactly what subscribers received, in the order the broker
routed it, with one position space, and is read through AMQP 0.9.1 with no plugin. Retention is
unlimited by default; set ``max-age`` or ``max-length-bytes`` by policy to bound it, knowing that a
rebuild can only replay what is retained. To know where "the end" is, a replay publishes a small
marker message into the stream (ignored by every reader) and stops when it reads it back.

Limitations compared with the database buses: events published before a subscriber's queues were
declared are not delivered to it (a new subscriber catches up through :meth:`RabbitBus.replay`);
without ``instance`` the first member to subscribe is active on every partition and the others
only stand by (RabbitMQ 3.10 has no consumer priorities for single active consumer); messages
buffered but not handled when a consumer leaves count one delivery each at the broker (the
worker's own count, in its store, is what dead-letters a message). Changing ``partitions`` or a
consumer's ``max_attempts`` for an existing system changes queue arguments: RabbitMQ refuses the
declaration (:class:`~sagaline.errors.ConfigurationError`) until the old queues are drained and
deleted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from sagaline.backends._broker import take_bundle, take_prefix
from sagaline.backends.bundles import (
    BUNDLE_BYTES,
    POSITIONS_PER_OFFSET,
    Bundle,
    bundled,
    decode_bundle,
    encode_bundle,
)
from sagaline.config import redact, redact_url
from sagaline.errors import BusUnavailable, ConfigurationError, SagalineError
from sagaline.messages import Envelope, new_message_id, utc_timestamp
from sagaline.ports import Batch, ConsumerSpec, Delivery, Outcome, StoredEvent

__all__ = [
    "BUNDLE_BYTES",
    "BUNDLE_CONTENT_TYPE",
    "POSITIONS_PER_OFFSET",
    "BrokerDeadLetter",
    "BusUnavailable",
    "RabbitBus",
    "UnroutableMessage",
    "decode_bundle",
    "encode_bundle",
    "open_bus",
]

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


class _Unsettled:
    """How many messages of one received bundle are not settled yet (it is acked at zero)."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


class _Received:
    """A message received by a consumption and not acknowledged yet."""

    __slots__ = ("bundle", "channel", "delivery", "failures", "redelivered", "seq", "tag")

    def __init__(
        self,
        seq: int,
        tag: int,
        channel: AbstractChannel,
        envelope: Envelope,
        redelivered: int,
        bundle: _Unsettled | None = None,
    ) -> None:
        self.seq = seq
        self.tag = tag
        self.channel = channel
        self.redelivered = redelivered
        #: Shared by the messages of one bundle: its AMQP message is acked once all are settled.
        self.bundle = bundle
        self.failures = 0
        self.delivery = Delivery(
            envelope=envelope,
            attempt=redelivered + 1,
            ordering_key=envelope.correlation_id,
            token=self,
        )

    @property
    def attempt(self) -> int:
        """This delivery's number: the broker's earlier deliveries, the retries here, plus one."""
        return self.redelivered + self.failures + 1


async def _ignore(_message: DeliveredMessage) -> None:
    """Nothing is ever published to a members queue."""


class _Consumption:
    """One member consuming one consumer: ``basic.consume`` on each partition queue.

    Received messages wait in ``ready`` in arrival order (delivery tag order). A claim hands out
    the oldest ones whose key is not held; a retried key is held until its backoff delay is over.

    Without an instance number every queue is consumed on one channel. Instance ``i`` of ``n``
    consumes its home partitions on one channel and, ``share_delay`` later, the others on a second
    one, the spare channel, where it stands by (single active consumer) or is active while their
    home instance is away. When it is active there and all ``n`` instances are present (the
    consumers of the members queue), it gives the borrowed partitions back: it stops handing out
    their messages, waits until those handed out are settled, and closes the spare channel, so that
    the broker returns what it still held ahead of newer messages and the next consumer in line
    takes over; it then stands by again on a new spare channel. A partition passes from instance to
    instance until its home instance has it.
    """

    def __init__(
        self,
        spec: ConsumerSpec,
        member: str,
        queues: list[str],
        prefetch: int,
        wakeup: asyncio.Event,
        home: frozenset[int] | None = None,
        share_delay: float = 0.0,
        instances: int = 1,
        members_queue: str = "",
        probe_interval: float = 1.0,
    ) -> None:
        self.spec = spec
        self.member = member
        self.prefetch = prefetch
        self.wakeup = wakeup
        self.share_delay = share_delay
        self.instances = instances
        #: A queue without messages that each instance consumes while it lives: its consumer
        #: count is the number of instances present (a single-active-consumer queue counts only
        #: its active consumer).
        self.members_queue = members_queue
        self.probe_interval = probe_interval
        #: The queues of the partitions this member consumes at once (``home``; all without it),
        #: and the others, consumed on the spare channel after ``share_delay``.
        self.first = [q for n, q in enumerate(queues) if home is None or n in home]
        self.rest = [q for q in queues if q not in self.first]
        self._later: asyncio.Task[None] | None = None
        self.channel: AbstractRobustChannel | None = None
        self.raw: AbstractChannel | None = None
        #: The channel of the borrowed partitions (None without an instance number).
        self.spare: AbstractRobustChannel | None = None
        self.spare_raw: AbstractChannel | None = None
        #: Whether the broker delivered from a borrowed queue since the last count of members.
        self.borrowing = False
        #: Giving the borrowed partitions back: their messages are not handed out any more.
        self.returning = False
        self._probed = 0.0
        self.ready: list[_Received] = []
        self.inflight: dict[int, _Received] = {}
        self.held: dict[str, float] = {}
        self.broken = False
        self.closed = False
        self._seq = itertools.count()
        self._attach_lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Open the channel(s), set the prefetch of each consumer and start consuming."""
        self._connection = connection
        self.channel = await self._open_channel(connection)
        if self.rest:
            self.spare = await self._open_channel(connection)
        await self._attach()

    async def _open_channel(self, connection: AbstractRobustConnection) -> AbstractRobustChannel:
        channel = await connection.channel(publisher_confirms=False)
        # Per consumer (not global): a partition held by a retry fills only its own window.
        await channel.set_qos(prefetch_count=self.prefetch)
        channel.reopen_callbacks.add(self._on_reopen)
        return channel

    def _live(self, channel: AbstractChannel) -> bool:
        return (channel is self.raw or channel is self.spare_raw) and not channel.is_closed

    async def _attach(self, delay: float | None = None) -> None:
        """Consume the home queues on the home channel's current AMQP channel, and the others on
        the spare one after ``delay`` (default ``share_delay``), each once per AMQP channel."""
        async with self._attach_lock:
            if self.channel is None or self.closed:
                return
            raw = await self.channel.get_underlay_channel()
            spare_raw = await self.spare.get_underlay_channel() if self.spare else None
            if raw is self.raw and spare_raw is self.spare_raw:
                return
            fresh, spare_fresh = raw is not self.raw, spare_raw is not self.spare_raw
            self.raw, self.spare_raw = raw, spare_raw
            # Whatever came on an earlier channel went back to the queue when that channel died.
            self.ready = [item for item in self.ready if self._live(item.channel)]
            if fresh:
                raw.on_consumer_cancel_callbacks.add(self._on_cancel)
                for queue in self.first:
                    await raw.basic_consume(queue, self._on_delivery, no_ack=False)
                if self.rest and self.members_queue:
                    await raw.queue_declare(self.members_queue, durable=False, auto_delete=True)
                    await raw.basic_consume(self.members_queue, _ignore, no_ack=True)
            if spare_fresh and spare_raw is not None:
                spare_raw.on_consumer_cancel_callbacks.add(self._on_cancel)
                self.borrowing = False
                if self._later is not None:
                    self._later.cancel()
                wait = self.share_delay if delay is None else delay
                self._later = asyncio.create_task(self._consume_later(spare_raw, wait))

    async def _consume_later(self, raw: AbstractChannel, delay: float) -> None:
        """Consume the partitions of other members, after theirs had the time to come first.

        With single active consumer the broker gives a queue to the first consumer registered on
        it: instances started together each become active on their own partitions, and stand by
        on the others (taking them over when their owner goes away).
        """
        await asyncio.sleep(delay)
        async with self._attach_lock:
            if raw is not self.spare_raw or raw.is_closed or self.closed:
                return
            try:
                for queue in self.rest:
                    await raw.basic_consume(queue, self._on_delivery, no_ack=False)
            except Exception:
                self._start_over("standing by on other partitions failed")

    async def give_back(self) -> None:
        """Hand borrowed partitions back to their home instance once all instances are here.

        Called at each claim: while the broker delivers from borrowed queues, at most every
        ``probe_interval`` it counts the instances present; once all ``instances`` are, the
        borrowed partitions are given back as soon as none of their messages is being handled.
        """
        spare_raw = self.spare_raw
        if spare_raw is None or self.closed:
            return
        if not self.returning and self.borrowing:
            now = asyncio.get_running_loop().time()
            if now - self._probed < self.probe_interval:
                return
            self._probed = now
            self.borrowing = False
            try:
                declared = await spare_raw.queue_declare(
                    self.members_queue, durable=False, auto_delete=True
                )
            except Exception:
                log.debug("counting the members of %s failed", self.spec.name, exc_info=True)
                return
            self.returning = (declared.consumer_count or 0) >= self.instances
        if self.returning and not any(i.channel is spare_raw for i in self.inflight.values()):
            await self._renew_spare()

    async def _renew_spare(self) -> None:
        """Close the spare channel (the broker takes back what it held, ahead of newer messages,
        and the next consumer in line goes on), then stand by again on a new one."""
        spare = self.spare
        if spare is None:
            return
        spare.reopen_callbacks.discard(self._on_reopen)
        if self._later is not None:
            self._later.cancel()
            self._later = None
        with suppress(Exception):
            await spare.close()
        self.ready = [item for item in self.ready if item.channel is not self.spare_raw]
        self.spare, self.spare_raw, self.returning = None, None, False
        log.info("%s/%s: borrowed partitions given back", self.spec.name, self.spec.source)
        try:
            if self._connection is None or self.closed:
                return
            self.spare = await self._open_channel(self._connection)
            await self._attach(delay=0.0)
        except Exception:
            self._start_over("standing by again on other partitions failed")

    async def reattach(self) -> None:
        """Consume again if a channel came back without telling (a safety net for reopen)."""
        for robust, raw in ((self.channel, self.raw), (self.spare, self.spare_raw)):
            if raw is not None and raw.is_closed and robust and not robust.is_closed:
                await self._on_reopen(robust)
                return

    async def _on_reopen(self, _sender: Any) -> None:
        """The connection came back: consume again on the new channel (the prefetch is restored)."""
        try:
            await self._attach()
        except Exception:
            self._start_over("consuming again after a reconnection failed")

    def _on_cancel(self, _frame: Any) -> None:
        """The broker cancelled a consumer (its queue was deleted): start over on the next claim."""
        self._start_over()

    def _start_over(self, problem: str | None = None) -> None:
        """Mark the consumption broken (the next claim makes a new one), logging ``problem``."""
        if problem is not None:
            log.warning("%s/%s: %s", self.spec.name, self.spec.source, problem, exc_info=True)
        self.broken = True
        self.wakeup.set()

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        channel = message.channel
        if self.closed or not (channel is self.raw or channel is self.spare_raw):
            return
        deliver = message.delivery
        tag = getattr(deliver, "delivery_tag", None)
        if not isinstance(tag, int):
            return
        if channel is self.spare_raw:
            self.borrowing = True
        properties = message.header.properties
        envelopes = messages_of(properties, message.body)
        redelivered = _delivery_count(properties)
        bundle = _Unsettled(len(envelopes)) if len(envelopes) > 1 else None
        for envelope in envelopes:
            self.ready.append(
                _Received(next(self._seq), tag, channel, envelope, redelivered, bundle)
            )
        self.wakeup.set()

    def _release_holds(self, now: float) -> None:
        for key in [key for key, due in self.held.items() if due <= now]:
            del self.held[key]

    def has_work(self) -> bool:
        """Whether a claim would hand out something now."""
        if not self.ready:
            return False
        self._release_holds(asyncio.get_running_loop().time())
        return any(item.delivery.ordering_key not in self.held for item in self.ready)

    def take(self, limit: int) -> list[Delivery]:
        """Hand out up to ``limit`` of the oldest deliveries whose key is not held (and the rest
        of the last one's bundle)."""
        if self.inflight:
            # The previous batch was never completed (its transaction failed): hand it out again,
            # counting the attempt, ahead of what came after it.
            for item in self.inflight.values():
                item.failures += 1
            self.ready = sorted([*self.inflight.values(), *self.ready], key=lambda i: i.seq)
            self.inflight.clear()
        raw = self.raw
        if raw is None or raw.is_closed:
            return []
        spare_raw = None if self.returning else self.spare_raw
        self._release_holds(asyncio.get_running_loop().time())
        chosen: list[_Received] = []
        for item in self.ready:
            if len(chosen) >= limit and (
                item.bundle is None or item.bundle is not chosen[-1].bundle
            ):
                # A bundle is handed out whole (limit or not), so that a member that stops
                # between batches leaves no bundle half settled, to be delivered again whole.
                break
            channel = item.channel
            if (
                not (channel is raw or channel is spare_raw)
                or item.delivery.ordering_key in self.held
            ):
                continue
            chosen.append(item)
        if not chosen:
            return []
        taken = {item.seq for item in chosen}
        self.ready = [item for item in self.ready if item.seq not in taken]
        for item in chosen:
            item.delivery.attempt = item.attempt
            self.inflight[item.seq] = item
        return [item.delivery for item in chosen]

    async def settle(
        self, deliveries: Sequence[Delivery], outcomes: Sequence[tuple[Outcome, str | None]]
    ) -> None:
        """Acknowledge ACK and DEAD; hold RETRY's key for its delay; put SKIP back in order."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        acks: dict[AbstractChannel, list[int]] = {}
        back: list[_Received] = []
        for delivery, (outcome, _error) in zip(deliveries, outcomes, strict=True):
            item = delivery.token
            if not isinstance(item, _Received) or self.inflight.pop(item.seq, None) is None:
                continue
            if not self._live(item.channel):
                continue  # the broker took it back with its channel; it comes again
            if outcome is Outcome.ACK or outcome is Outcome.DEAD:
                bundle = item.bundle
                if bundle is not None:
                    bundle.count -= 1
                    if bundle.count:
                        continue  # acked with the last of its bundle
                acks.setdefault(item.channel, []).append(item.tag)
            elif outcome is Outcome.RETRY:
                delay = self.spec.retry.delay(delivery.attempt)
                item.failures += 1
                key = delivery.ordering_key
                self.held[key] = max(self.held.get(key, 0.0), now + delay)
                loop.call_later(delay, self.wakeup.set)
                back.append(item)
            else:
                back.append(item)
        if back:
            self.ready = sorted([*back, *self.ready], key=lambda i: i.seq)
        for channel, tags in acks.items():
            await self._acknowledge(channel, tags)

    async def _acknowledge(self, raw: AbstractChannel, tags: list[int]) -> None:
        """Ack ``tags``: one ``multiple`` ack for those below every tag still outstanding."""
        tags.sort()
        pending = [i.tag for i in self.ready if i.channel is raw]
        pending += [i.tag for i in self.inflight.values() if i.channel is raw]
        lowest = min(pending, default=None)
        below = [tag for tag in tags if lowest is None or tag < lowest]
        try:
            if below:
                await raw.basic_ack(below[-1], multiple=len(below) > 1, wait=False)
            for tag in tags[len(below) :]:
                await raw.basic_ack(tag, wait=False)
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError):
            # The channel died: the broker gives the messages out again; inboxes absorb them.
            log.debug("acknowledgement lost with its channel", exc_info=True)

    async def close(self) -> None:
        """Stop consuming; every unacknowledged message goes back to its queue, in order."""
        self.closed = True
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self.ready.clear()
        self.inflight.clear()
        channels = (self.channel, self.spare)
        self.channel = self.spare = None
        for channel in channels:
            if channel is not None:
                channel.reopen_callbacks.discard(self._on_reopen)
                with suppress(Exception):
                    await channel.close()


class RabbitBus:
    """A :class:`~sagaline.ports.BrokerBus` on RabbitMQ (``amqp://user:pass@host:5672/vhost``).

    One connection per bus object (reconnecting by itself), one confirming channel to publish and
    one channel per consumer and member to consume. The connection opens on first use, or with
    :meth:`open`.
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
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._open_lock = asyncio.Lock()
        self._prepare_lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._prepared: dict[str, ConsumerSpec] = {}
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
    def _events_route(self) -> str:
        return f"{self.prefix}.events.route"

    @property
    def _dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    def _base(self, name: str, source: str) -> str:
        return f"{self.prefix}.{'cmd' if source == 'queue' else 'sub'}.{name}"

    def queue_names(self, consumer: ConsumerSpec) -> list[str]:
        """The partition queues of a consumer, partition 0 first."""
        base = self._base(consumer.name, consumer.source)
        return [f"{base}.{part}" for part in range(self.partitions)]

    def dead_letter_queue(self, consumer: ConsumerSpec) -> str:
        """The queue where the broker puts a consumer's messages past their delivery limit."""
        return f"{self._base(consumer.name, consumer.source)}.dead"

    def partition_of(self, key: str) -> int:
        """The partition of a correlation key."""
        return partition_of(key, self.partitions)

    def home_partitions(self) -> frozenset[int] | None:
        """The partitions this instance consumes first (None: all of them at once)."""
        if self.instance is None or self.instance[1] == 1:
            return None
        index, count = self.instance
        return frozenset(p for p in range(self.partitions) if p % count == (index - 1) % count)

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
        self._declared.clear()
        if connection is not None:
            with suppress(Exception):
                await connection.close()

    # Topology -------------------------------------------------------------------------------

    def _partition_arguments(self, consumer: ConsumerSpec) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": consumer.retry.delivery_limit,
            "x-dead-letter-exchange": self._dead_exchange,
            "x-dead-letter-routing-key": self._base(consumer.name, consumer.source),
        }

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Declare the exchanges, the stream, and every consumer's queues and bindings.

        Idempotent, and safe from several processes at once (declarations of equal things agree).
        ``routes`` is not needed to declare: commands are routed by their service's name.
        """
        async with self._prepare_lock:
            for consumer in consumers:
                self._prepared.setdefault(self._declaration_key(consumer), consumer)
            steps = self._declarations(consumers)
            if not steps:
                return
            connection = await self._connected()
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

    @property
    def prepared_consumers(self) -> list[ConsumerSpec]:
        """The consumers this bus object has declared queues for."""
        return list(self._prepared.values())

    async def delete_topology(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        """Delete this prefix's queues (with the messages in them), its stream and exchanges.

        For tearing down a deployment or a test: the queues of ``consumers`` and of every consumer
        this bus object declared go, with the event stream and the exchanges. A queue or exchange
        that does not exist is passed over. Consumers still attached elsewhere are cancelled.
        """
        for state in list(self._consumptions.values()):
            await state.close()
        self._consumptions.clear()
        wanted = {self._declaration_key(c): c for c in [*self._prepared.values(), *consumers]}
        queues = [self.log_stream]
        for consumer in wanted.values():
            queues.extend(self.queue_names(consumer))
            queues.append(self.dead_letter_queue(consumer))
        exchanges = [
            self._events_route,
            self.events_exchange,
            self.commands_exchange,
            self._dead_exchange,
        ]
        connection = await self._connected()
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

    async def _declare_exchanges(self, raw: AbstractChannel) -> None:
        await raw.exchange_declare(self.commands_exchange, exchange_type="direct", durable=True)
        await raw.exchange_declare(self.events_exchange, exchange_type="fanout", durable=True)
        await raw.exchange_declare(
            self._events_route, exchange_type="direct", durable=True, internal=True
        )
        await raw.exchange_declare(self._dead_exchange, exchange_type="direct", durable=True)
        await raw.exchange_bind(self._events_route, self.events_exchange, "")
        await raw.queue_declare(self.log_stream, durable=True, arguments={"x-queue-type": "stream"})
        await raw.queue_bind(self.log_stream, self.events_exchange, "")

    async def _declare_consumer(self, raw: AbstractChannel, consumer: ConsumerSpec) -> None:
        base = self._base(consumer.name, consumer.source)
        dead = self.dead_letter_queue(consumer)
        await raw.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
        await raw.queue_bind(dead, self._dead_exchange, base)
        arguments = self._partition_arguments(consumer)
        for part, queue in enumerate(self.queue_names(consumer)):
            await raw.queue_declare(queue, durable=True, arguments=arguments)
            if consumer.source == "queue":
                await raw.queue_bind(queue, self.commands_exchange, f"{consumer.name}.{part}")
            else:
                for message_type in sorted(consumer.message_types):
                    await raw.queue_bind(queue, self._events_route, f"{message_type}.{part}")

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
        routed: list[tuple[Envelope, _Route]] = []
        for envelope in envelopes:
            part = self.partition_of(envelope.correlation_id)
            service = routes.get(envelope.message_type)
            if service is not None:
                routed.append((envelope, (self.commands_exchange, f"{service}.{part}", True)))
            else:
                key = f"{envelope.message_type}.{part}"
                routed.append((envelope, (self.events_exchange, key, False)))
        outgoing = bundled(routed, self.bundle)
        await self._connected()
        if "exchanges" not in self._declared:
            # Publishing to an exchange that does not exist would close the channel.
            await self.prepare([], routes)
        publisher = self._publisher
        if publisher is None:
            raise BusUnavailable("the bus is closed")
        try:
            async with asyncio.timeout(self.publish_timeout):
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
            raise BusUnavailable(
                f"RabbitMQ did not confirm within {self.publish_timeout} seconds"
            ) from exc
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
            self._declared.discard(self._declaration_key(consumer))
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
            f"{self._base(consumer.name, consumer.source)}.members",
        )
        try:
            await state.start(connection)
        except BaseException:
            self._declared.discard(self._declaration_key(consumer))
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

    async def replay(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event retained in the stream at position > ``after``, up to the end as of now.

        An event's position is its stream offset x :data:`POSITIONS_PER_OFFSET` + its index in
        its bundle + 1: increasing, not dense. The stream's end is found by publishing a marker
        into it and reading up to that marker.
        """
        connection = await self._connected()
        await self.prepare([], {})
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
                self.log_stream,
                on_message,
                no_ack=False,
                arguments={"x-stream-offset": offset},
            )
            await self._publish_marker(marker)
            closing = raw.closing
            while True:
                message = await self._next_message(received, closing)
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

    @staticmethod
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

    async def _publish_marker(self, marker: str) -> None:
        await self._connected()
        publisher = self._publisher
        if publisher is None:
            raise BusUnavailable("the bus is closed")
        async with asyncio.timeout(self.publish_timeout):
            await publisher.ready()
            raw = await publisher.get_underlay_channel()
            await raw.basic_publish(
                b"",
                exchange="",
                routing_key=self.log_stream,
                properties=Basic.Properties(
                    delivery_mode=2, message_id=marker, headers={_MARKER_HEADER: marker}
                ),
                mandatory=True,
            )

    async def broker_dead_letters(self, consumer: ConsumerSpec) -> list[BrokerDeadLetter]:
        """The messages the broker dead-lettered for ``consumer`` (looked at, left in place)."""
        connection = await self._connected()
        await self.prepare([consumer], {})
        channel = await connection.channel(publisher_confirms=False)
        queue = self.dead_letter_queue(consumer)
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


def open_bus(url: str, **options: Any) -> RabbitBus:
    """The RabbitMQ bus ``url`` names (the scheme registry's factory; see
    :mod:`sagaline.config`): ``?prefix=NAME`` and ``?bundle=N`` in the URL are taken as those
    options (an explicit option wins)."""
    options = dict(options)
    url = take_bundle(take_prefix(url, options), options)
    return RabbitBus(url, **options)
