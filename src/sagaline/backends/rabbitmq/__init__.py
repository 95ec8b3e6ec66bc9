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
ends in the consumer's ``.dead`` queue; it is that generous so that the messages held by a
process that a poison message kills again and again do not get there first. The consumer's
members consume its ``.dead`` queue too: what the broker gave up on is handed to the worker once
more, as a message delivered before, which handles it or records it as a dead letter (and tells
the saga whose command it was). Nothing stays in the broker's dead letters unseen;
:meth:`RabbitBus.broker_dead_letters` lists what no member has taken yet.

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

The package is split by responsibility: :mod:`.wire` (envelopes and bundles as AMQP messages),
:mod:`.topology` (names, routes and declarations), :mod:`.publish` (publishing with confirms),
:mod:`.consumer` (a member's partition channels, retries, home partitions and give-backs),
:mod:`.replay` (the log stream read back, and the broker's dead letters) and :mod:`.bus`
(:class:`RabbitBus`: the connection, and the port's methods over the rest). Retry holds and the
counts of members present are timed on the bus's ``clock`` (:data:`~sagaline.clock.SYSTEM_CLOCK`
unless one is given).
"""

from __future__ import annotations

from sagaline.backends.bundles import (
    BUNDLE_BYTES,
    POSITIONS_PER_OFFSET,
    decode_bundle,
    encode_bundle,
)
from sagaline.backends.rabbitmq.bus import RabbitBus, open_bus
from sagaline.backends.rabbitmq.wire import BUNDLE_CONTENT_TYPE, BrokerDeadLetter, UnroutableMessage
from sagaline.errors import BusUnavailable

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
