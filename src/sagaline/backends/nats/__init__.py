"""NATS JetStream as sagaline's bus (``nats://host:4222``), fed by each service's outbox relay.

Wire format. A message's body is the envelope's body, the message JSON exactly. Its metadata
travels in NATS headers: ``Nats-Msg-Id`` (the message id, so JetStream drops a message published
again within the stream's duplicate window), ``Sagaline-Type``, ``Sagaline-Correlation-Id``,
``Sagaline-Causation-Id``, ``Sagaline-Timestamp``, ``Sagaline-Source`` and the W3C
``traceparent``. Header values are written as they are when they are printable ASCII; anything else
is percent-encoded UTF-8 (RFC 3986). A message that lacks these headers (published by a foreign
client) is still delivered, as type ``unknown``, so that the worker dead-letters it with a reason.

Streams, both with file storage:

- ``{prefix}_commands``: subjects ``{prefix}.cmd.{queue}.{partition}``, work-queue retention (an
  acknowledged command is deleted; the services' stores keep the audit trail).
- ``{prefix}_events``: subjects ``{prefix}.evt.{type}.{partition}``, limits retention: events stay,
  so a subscriber that joins late reads them from the start and :meth:`NatsBus.replay` rebuilds
  projections from them.

The partition of a message is ``zlib.crc32(correlation_id) % partitions``, as in the SQLite bus.

Consumers. Every consumer (a service's command queue, a service's subscription) has one durable pull
consumer per partition, with explicit acks, ``max_deliver`` = the retry policy's ``delivery_limit``
as a backstop and ``ack_wait`` as the time after which a delivery that nobody settled is delivered
again (10 s by default). A member keeps what it holds and what it is handling alive with progress
acknowledgements every ``ack_wait / 4``, so however long a batch takes nothing is delivered again
while it lives (a batch whose transaction failed is handed out again at its next claim), and
``ack_wait`` is how long what a member that died held waits. A subscription's consumers see only the
event types it subscribes to: a subscription of one type filters on its subjects, one of several on
all of theirs (``filter_subjects``, NATS 2.10 on). Before 2.10 a consumer has a single filter, so a
subscription of several types is sent every type and the bus acknowledges the others itself as they
arrive, which costs a delivery and an ack each. The worker counts in its store the times it handed a
redelivered message to its handler and dead-letters the one that keeps killing its consumer long
before ``max_deliver``. A message that reaches ``max_deliver`` anyway is announced by the server
with a ``MAX_DELIVERIES`` advisory: the member owning its partition reads it back from the stream
and hands it to the worker once more, which handles it or records it as a dead letter.

Partition ownership. The members of a consumer share its partitions through one lease document per
consumer in the KV bucket named ``{prefix}`` (compare-and-set on its revision): each live member
heartbeats and holds a fair share, ``ceil(partitions / live members)``; a member that stops
heartbeating loses its leases ``lease_seconds`` later (wall-clock expiry times: the members' clocks
must agree to well within that), and :meth:`NatsBus.leave` gives them back at once. Only the owner
pulls from a partition, so at any time one member handles a key.

Ordering. Within a partition JetStream delivers in stream order. When a delivery must be retried
it is nacked with the retry policy's delay; the later messages of its key that the member has or
pulls meanwhile are held in the member's hands (unacknowledged, kept alive with progress acks) until
the retried message has come back and been settled. A member that takes over a partition first
waits until every message its predecessor left unacknowledged has been delivered to it again
(``num_ack_pending`` of the partition's consumer equals what it holds), then goes on in stream
order. So the partitions of a member that died with deliveries in hand wait for the server to
deliver them again, ``ack_wait`` after it last touched them; a process that ``sagaline up``
restarts in its place holds its leases at once (it keeps its member name). Change consumer
settings (a new sagaline version, another retry policy: :meth:`NatsBus.prepare` updates them)
with ``sagaline migrate`` while the services are stopped. The worker counts in its store the times
it handed out a message delivered before, and one handed out before without being settled goes
to its handler alone, so that a message that kills its consumer never takes a batch of others
with it.

A NATS 2.9 fault: after redeliveries, the server can lose count of a filtered pull consumer's
pending messages and answer every pull with "no messages" while some wait (its consumer info
still lists them, and reading that info recounts them). A member whose lane has brought nothing
for 5 s therefore reads its consumer's info, at most every 5 s, and the next pull brings what
was stuck.

Durability. JetStream acknowledges a publish once the message is in the stream's file, but by
default the server fsyncs only every two minutes (``sync_interval``, configurable since NATS 2.10):
an acknowledged message can be lost to a power failure or an OS crash. sagaline marks an outbox
entry sent when the publish is acknowledged, so production servers must run with::

    jetstream { store_dir: /var/lib/nats, sync_interval: always }

(NATS >= 2.10), which fsyncs before acknowledging. The machine these tests run on has NATS 2.9.10,
which has no such setting and fsyncs on its default interval: the bus works there, without that
guarantee against power loss.

Size. NATS refuses a message larger than the server's ``max_payload`` (1 MiB by default, headers
included), so a body of exactly sagaline's limit (1 MiB) does not fit next to its headers on a
default server. :meth:`NatsBus.publish` refuses such a message before sending anything, with
:class:`MessageTooLarge` naming both sizes; raise ``max_payload`` in the server's configuration
(up to 8 MiB is reasonable) to carry bodies up to sagaline's own limit.

The package is split by responsibility: :mod:`.wire` (an envelope as headers and back),
:mod:`.topology` (streams, subjects, the lease bucket and the durable consumers), :mod:`.leases`
(sharing a consumer's partitions), :mod:`.lanes` (what a member holds of each partition),
:mod:`.consumer` (pulling into the lanes, forming batches, settling), :mod:`.replay` (the event log
read back, and messages the server gave up on) and :mod:`.bus` (:class:`NatsBus`: the connection,
publishing, and the port's methods over the rest). Leases and in-process intervals are read from
the bus's ``clock`` (:data:`~sagaline.clock.SYSTEM_CLOCK` unless one is given).
"""

from __future__ import annotations

from sagaline.backends.nats.bus import NatsBus, open_bus
from sagaline.backends.nats.wire import (
    HEADER_CAUSATION,
    HEADER_CORRELATION,
    HEADER_MESSAGE_ID,
    HEADER_SOURCE,
    HEADER_TIMESTAMP,
    HEADER_TRACEPARENT,
    HEADER_TYPE,
    UNKNOWN_TYPE,
    MessageTooLarge,
)
from sagaline.errors import BusUnavailable

__all__ = [
    "HEADER_CAUSATION",
    "HEADER_CORRELATION",
    "HEADER_MESSAGE_ID",
    "HEADER_SOURCE",
    "HEADER_TIMESTAMP",
    "HEADER_TRACEPARENT",
    "HEADER_TYPE",
    "UNKNOWN_TYPE",
    "BusUnavailable",
    "MessageTooLarge",
    "NatsBus",
    "open_bus",
]
