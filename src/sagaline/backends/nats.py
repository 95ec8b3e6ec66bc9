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
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import time
import zlib
from bisect import insort
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, unquote

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from sagaline.backends._broker import take_prefix
from sagaline.config import redact, redact_url
from sagaline.errors import (
    BusUnavailable,
    ConfigurationError,
    InvalidMessage,
    UnknownMessageType,
)
from sagaline.messages import Envelope, registry, utc_timestamp
from sagaline.ports import Batch, BrokerBus, ConsumerSpec, Delivery, Outcome, StoredEvent

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

log = logging.getLogger("sagaline.nats")

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
_DUPLICATE_WINDOW = 120.0
#: Seconds a lane's pulls bring nothing before the server is asked about its consumer.
_NUDGE_AFTER = 5.0
_REPLAY_BATCH = 1000


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


def rebalance(
    document: Mapping[str, Any], member: str, now: float, lease: float, partitions: int
) -> tuple[list[int], dict[str, Any]]:
    """One member's turn on a consumer's lease document: heartbeat, then hold a fair share.

    Returns the partitions ``member`` now holds and the document to write back. Members and
    leases whose expiry time has passed are dropped; a member holding more than
    ``ceil(partitions / live members)`` gives the surplus up, one holding fewer takes free ones.
    """
    members = {
        str(name): float(expires)
        for name, expires in dict(document.get("members", {})).items()
        if float(expires) > now
    }
    members[member] = now + lease
    owners: dict[int, tuple[str, float]] = {}
    for part, (owner, expires) in dict(document.get("owners", {})).items():
        if float(expires) > now and owner in members and int(part) < partitions:
            owners[int(part)] = (str(owner), float(expires))
    share = math.ceil(partitions / len(members))
    mine = sorted(part for part, (owner, _) in owners.items() if owner == member)
    if len(mine) > share:
        for part in mine[share:]:
            del owners[part]
        mine = mine[:share]
    elif len(mine) < share:
        free = [part for part in range(partitions) if part not in owners]
        mine = sorted(mine + free[: share - len(mine)])
    for part in mine:
        owners[part] = (member, now + lease)
    return mine, {
        "members": members,
        "owners": {
            str(part): [owner, expires] for part, (owner, expires) in sorted(owners.items())
        },
    }


def _without(document: Mapping[str, Any], member: str) -> dict[str, Any]:
    """The lease document with ``member`` and its leases removed."""
    members = {k: v for k, v in dict(document.get("members", {})).items() if k != member}
    owners = {k: v for k, v in dict(document.get("owners", {})).items() if v[0] != member}
    return {"members": members, "owners": owners}


@dataclass(eq=False, slots=True)
class _Item:
    """A message in a member's hands: pulled, not yet handed to the worker or settled."""

    msg: Msg | None
    sequence: int
    delivered: int
    key: str
    envelope: Envelope
    touched: float


@dataclass(eq=False, slots=True)
class _Lane:
    """One partition of one consumer, while a member of this process holds it."""

    partition: int
    stream: str
    consumer: str
    next_subject: str
    #: In stream order: what is ready to be handed out.
    ready: list[_Item] = field(default_factory=list)
    #: Per key, the messages waiting behind a retried one.
    held: dict[str, list[_Item]] = field(default_factory=dict)
    #: Per key, the stream sequence of the retried message that must come back first.
    blocked: dict[str, int] = field(default_factory=dict)
    #: Every message in hand (ready or held), by stream sequence.
    items: dict[int, _Item] = field(default_factory=dict)
    #: Messages handed to the worker and not settled yet, by stream sequence.
    out: dict[int, _Item] = field(default_factory=dict)
    incoming: list[Msg] = field(default_factory=list)
    #: Stream sequences the server gave up on (max deliveries), to be dead-lettered.
    exhausted: list[tuple[int, int]] = field(default_factory=list)
    #: Taken over: nothing is handed out until every message left unsettled is back in hand.
    fenced: bool = True
    released: bool = False
    pull: _Pull | None = None
    #: Since when the lane's pulls brought nothing (None: the last one brought messages).
    empty_since: float | None = None
    #: When the server was last asked about the consumer of an empty lane.
    nudged: float = 0.0


@dataclass(eq=False, slots=True)
class _Group:
    """A member's membership of one consumer: the lanes it holds."""

    spec: ConsumerSpec
    member: str
    lease_key: str
    lanes: dict[int, _Lane] = field(default_factory=dict)
    refreshed: float = -math.inf
    valid_until: float = -math.inf
    rotation: int = 0


@dataclass(slots=True)
class _Token:
    lane: _Lane
    item: _Item


@dataclass(eq=False, slots=True)
class _Pull:
    remaining: int
    done: asyncio.Future[None]


class NatsBus:
    """A :class:`~sagaline.ports.BrokerBus` on NATS JetStream; one connection per process."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sagaline",
        partitions: int = 8,
        lease_seconds: float = 10.0,
        ack_wait: float = 10.0,
        max_ack_pending: int = 20_000,
        publish_timeout: float = 10.0,
        fetch_timeout: float = 1.0,
        replicas: int = 1,
        connect_timeout: float | None = None,
    ) -> None:
        if not _TOKEN.match(prefix):
            raise ConfigurationError(f"NATS prefix {prefix!r}: use letters, digits, - and _")
        if partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        self.url = url
        #: The URL as logs and errors show it (without its password).
        self.shown_url = redact_url(url)
        #: Seconds :meth:`open` tries to connect before it raises :class:`BusUnavailable`; None
        #: tries until it connects (a long-running service waits for its server).
        self.connect_timeout = connect_timeout
        self.prefix = prefix
        self.partitions = partitions
        self.lease_seconds = lease_seconds
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.publish_timeout = publish_timeout
        self.fetch_timeout = fetch_timeout
        self.replicas = replicas
        self.refresh_interval = min(1.0, lease_seconds / 4)
        self.command_stream = f"{prefix}_commands"
        self.event_stream = f"{prefix}_events"
        self.lease_bucket = prefix
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._inbox = ""
        self._ids = itertools.count(1)
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._pulls: dict[int, _Pull] = {}
        self._groups: dict[tuple[str, str, str], _Group] = {}
        self._wakeups: dict[tuple[str, str], asyncio.Event] = {}
        self._prepared: set[ConsumerSpec] = set()
        self._streams_ready = False
        self._setup_lock = asyncio.Lock()
        self._multi_filter = False
        self._tokens: set[str] = set()
        self._closing = False
        self._open_lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self._connect_failure: BaseException | None = None

    # Connection ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect; the client reconnects by itself, forever, and pulls go on afterwards.

        Optional: the first prepare, publish, claim or replay connects too. With a
        ``connect_timeout``, a server that cannot be reached (or refuses the connection) in that
        time raises :class:`BusUnavailable` naming it and the last reason.
        """
        async with self._open_lock:
            if self._nc is None:
                await self._connect()

    async def _connect(self) -> None:
        client = Client()
        self._connect_failure = None
        options: dict[str, Any] = {
            "name": "sagaline",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": min(2.0, self.connect_timeout or 2.0),
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        connecting = client.connect(self.url, **options)
        try:
            if self.connect_timeout is None:
                await connecting
            else:
                await asyncio.wait_for(connecting, self.connect_timeout)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with suppress(Exception):
                await client.close()
            raise self._unavailable(self._connect_failure or exc) from None
        self._nc = client
        self._js = client.jetstream(timeout=5.0)
        version = str(client._server_info.get("version", "0.0.0"))
        self._multi_filter = tuple(int(p) for p in re.findall(r"\d+", version)[:2]) >= (2, 10)
        self._inbox = client.new_inbox()
        await client.subscribe(f"{self._inbox}.*", cb=self._on_pulled)
        for stream in (self.command_stream, self.event_stream):
            await client.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*", cb=self._on_exhausted
            )

    def _unavailable(self, failure: BaseException) -> BusUnavailable:
        """The error that says, without the password, why the server could not be connected to."""
        text = failure.strerror if isinstance(failure, OSError) else None
        reason = redact(text or str(failure).strip() or type(failure).__name__, self.url)
        reason = reason.removeprefix("nats: ").strip("'")
        if isinstance(failure, OSError | TimeoutError):
            problem = "is unreachable"
        else:
            problem = "refused the connection"
        waited = f" (gave up after {self.connect_timeout:g}s)" if self.connect_timeout else ""
        return BusUnavailable(f"NATS at {self.shown_url} {problem}: {reason}{waited}")

    async def close(self) -> None:
        """Give back what this process still holds, then close the connection."""
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        for group in list(self._groups.values()):
            with suppress(Exception):
                await self.leave(group.spec, group.member)
        if self._nc is not None and not self._nc.is_closed:
            self._closing = True
            with suppress(Exception):
                await self._nc.flush(timeout=2)
            await self._nc.close()

    @property
    def connection(self) -> Client:
        """The NATS connection (opened by :meth:`open`)."""
        if self._nc is None:
            raise ConfigurationError("the NATS bus is not open: call open() first")
        return self._nc

    @property
    def jetstream(self) -> JetStreamContext:
        """The JetStream context of the connection."""
        if self._js is None:
            raise ConfigurationError("the NATS bus is not open: call open() first")
        return self._js

    @property
    def max_payload(self) -> int:
        """The largest message (body and headers) the server accepts."""
        return self.connection.max_payload

    async def _on_error(self, error: Exception) -> None:
        message = redact(str(error) or type(error).__name__, self.url)
        if self._nc is None:
            # Still connecting: open() reports the last failure when it gives up.
            self._connect_failure = error
            level = logging.DEBUG if self.connect_timeout is not None else logging.WARNING
            log.log(level, "NATS: cannot connect to %s yet: %s", self.shown_url, message)
            return
        log.warning("NATS: %s", message)

    async def _on_disconnected(self) -> None:
        if self._closing or self._nc is None:
            return
        log.warning("NATS: disconnected from %s, reconnecting", self.shown_url)

    async def _on_reconnected(self) -> None:
        log.warning("NATS: reconnected to %s", self.shown_url)

    def _connected(self) -> Client:
        nc = self.connection
        if not nc.is_connected:
            raise BusUnavailable(f"not connected to NATS at {self.shown_url}")
        return nc

    # Topology -----------------------------------------------------------------------------------

    def _token(self, value: str, what: str) -> str:
        if value not in self._tokens:
            if not _TOKEN.match(value):
                raise ConfigurationError(
                    f"{what} {value!r} cannot be a NATS subject token: use letters, digits, - and _"
                )
            self._tokens.add(value)
        return value

    async def _ensure_streams(self) -> None:
        if self._streams_ready:
            return
        async with self._setup_lock:
            if self._streams_ready:
                return
            js = self.jetstream
            common: dict[str, Any] = {
                "storage": StorageType.FILE,
                "duplicate_window": _DUPLICATE_WINDOW,
                "num_replicas": self.replicas,
                "discard": DiscardPolicy.OLD,
            }
            for config in (
                StreamConfig(
                    name=self.command_stream,
                    subjects=[f"{self.prefix}.cmd.>"],
                    retention=RetentionPolicy.WORK_QUEUE,
                    description="sagaline command queues",
                    **common,
                ),
                StreamConfig(
                    name=self.event_stream,
                    subjects=[f"{self.prefix}.evt.>"],
                    retention=RetentionPolicy.LIMITS,
                    description="sagaline event log",
                    **common,
                ),
            ):
                try:
                    await js.add_stream(config)
                except APIError as exc:
                    # Another process created it first, or with other limits: use it as it is.
                    assert config.name is not None
                    await js.stream_info(config.name)
                    log.info("NATS stream %s exists (%s); using it", config.name, exc)
            try:
                self._kv = await js.key_value(self.lease_bucket)
            except NotFoundError:
                self._kv = await js.create_key_value(
                    KeyValueConfig(
                        bucket=self.lease_bucket,
                        history=1,
                        storage=StorageType.FILE,
                        replicas=self.replicas,
                        description="sagaline partition leases",
                    )
                )
            self._streams_ready = True

    def _consumer_name(self, spec: ConsumerSpec, partition: int) -> str:
        kind = "q" if spec.source == "queue" else "s"
        return f"{kind}-{self._token(spec.name, 'consumer name')}-{partition}"

    def _consumer_config(self, spec: ConsumerSpec, partition: int) -> ConsumerConfig:
        config = ConsumerConfig(
            durable_name=self._consumer_name(spec, partition),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_deliver=spec.retry.delivery_limit,
            max_ack_pending=self.max_ack_pending,
            description=f"sagaline {spec.source} {spec.name}, partition {partition}",
        )
        if spec.source == "queue":
            config.filter_subject = f"{self.prefix}.cmd.{spec.name}.{partition}"
        elif len(spec.message_types) == 1:
            (name,) = spec.message_types
            name = self._token(name, "event type")
            config.filter_subject = f"{self.prefix}.evt.{name}.{partition}"
        elif self._multi_filter:
            config.filter_subjects = [
                f"{self.prefix}.evt.{self._token(name, 'event type')}.{partition}"
                for name in sorted(spec.message_types)
            ]
        else:
            config.filter_subject = f"{self.prefix}.evt.*.{partition}"
        return config

    async def delete_topology(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        """Delete this prefix's streams (with their messages and consumers) and its lease bucket.

        For tearing down a deployment or a test; ``consumers`` is accepted for symmetry with the
        other buses (their consumers live in the streams). What does not exist is passed over.
        """
        for group in list(self._groups.values()):
            with suppress(Exception):
                await self.leave(group.spec, group.member)
        if self._nc is None:
            await self.open()
        js = self.jetstream
        for stream in (self.command_stream, self.event_stream):
            with suppress(NotFoundError):
                await js.delete_stream(stream)
        with suppress(NotFoundError, BucketNotFoundError):
            await js.delete_key_value(self.lease_bucket)
        self._streams_ready = False
        self._kv = None
        self._prepared.clear()

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Create the streams, the lease bucket and every consumer's durable pull consumers.

        Idempotent and safe from several processes at once: creating what exists with the same
        configuration is a no-op on the server, and a changed one (a new retry limit) is updated.
        """
        await self.open()
        self._connected()
        for queue in set(routes.values()):
            self._token(queue, "queue name")
        await self._ensure_streams()
        todo = [spec for spec in consumers if spec not in self._prepared]
        js = self.jetstream
        await asyncio.gather(
            *(
                js.add_consumer(
                    self.command_stream if spec.source == "queue" else self.event_stream,
                    self._consumer_config(spec, partition),
                )
                for spec in todo
                for partition in range(self.partitions)
            )
        )
        self._prepared.update(todo)

    # Publishing ---------------------------------------------------------------------------------

    def partition_of(self, correlation_id: str) -> int:
        """The partition of a correlation key."""
        return zlib.crc32(correlation_id.encode()) % self.partitions

    def subject_of(self, envelope: Envelope, routes: Mapping[str, str]) -> str:
        """Where a message is published: its queue's subject, or its event type's."""
        partition = self.partition_of(envelope.correlation_id)
        queue = routes.get(envelope.message_type)
        if queue is not None:
            return f"{self.prefix}.cmd.{self._token(queue, 'queue name')}.{partition}"
        try:
            kind = registry.get(envelope.message_type).kind
        except UnknownMessageType:
            kind = "event"
        if kind == "command":
            raise ConfigurationError(f"no service handles {envelope.message_type}")
        name = self._token(envelope.message_type, "event type")
        return f"{self.prefix}.evt.{name}.{partition}"

    async def publish(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Publish every message and return once JetStream has acknowledged each one.

        The messages are sent at once and their acknowledgements gathered. Raises
        :class:`BusUnavailable` when the server cannot be reached (or does not answer within
        ``publish_timeout``), :class:`MessageTooLarge` before sending anything when a message
        would exceed the server's ``max_payload``.
        """
        if not envelopes:
            return
        await self.open()
        nc = self._connected()
        await self._ensure_streams()
        limit = nc.max_payload
        outgoing: list[tuple[str, bytes, dict[str, str]]] = []
        for envelope in envelopes:
            headers = _headers_of(envelope)
            size = len(envelope.body) + _headers_size(headers)
            if size > limit:
                raise MessageTooLarge(
                    f"{envelope.message_type} {envelope.message_id}: {size} bytes with its headers"
                    f" ({len(envelope.body)} of body) exceed the NATS server's max_payload of"
                    f" {limit} bytes; raise max_payload in the server's configuration"
                )
            outgoing.append((self.subject_of(envelope, routes), envelope.body, headers))
        js = self.jetstream
        futures: list[asyncio.Future[Any]] = []
        try:
            for subject, body, headers in outgoing:
                futures.append(await js.publish_async(subject, body, headers=headers))
            _, pending = await asyncio.wait(futures, timeout=self.publish_timeout)
            if pending:
                raise BusUnavailable(
                    f"NATS at {self.shown_url} did not acknowledge {len(pending)} of"
                    f" {len(futures)} messages within {self.publish_timeout}s"
                )
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()
        for event in self._wakeups.values():
            event.set()

    # Claiming -----------------------------------------------------------------------------------

    def _group(self, spec: ConsumerSpec, member: str) -> _Group:
        key = (spec.source, spec.name, member)
        group = self._groups.get(key)
        if group is None or group.spec != spec:
            kind = "q" if spec.source == "queue" else "s"
            group = _Group(spec, member, f"{kind}.{self._token(spec.name, 'consumer name')}")
            self._groups[key] = group
        return group

    def partitions_held(self, consumer: ConsumerSpec, member: str) -> list[int]:
        """The partitions of ``consumer`` that ``member`` holds in this process."""
        group = self._groups.get((consumer.source, consumer.name, member))
        return sorted(group.lanes) if group else []

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Up to ``limit`` deliveries from the partitions ``member`` holds; empty when none."""
        self._wakeup(consumer).clear()
        await self.open()
        nc = self._nc
        if nc is None or not nc.is_connected:
            return Batch(consumer, [])
        await self._ensure_streams()
        group = self._group(consumer, member)
        now = time.monotonic()
        if now - group.refreshed >= self.refresh_interval:
            await self._refresh(group)
        if now >= group.valid_until:
            await self._drop_lanes(group)
            return Batch(consumer, [])
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_alive())
        for lane in group.lanes.values():
            if lane.out:
                # The previous batch was never completed (its transaction failed): it is handed
                # out again, ahead of what came after it, each attempt counted.
                for item in sorted(lane.out.values(), key=lambda i: i.sequence):
                    item.delivered += 1
                    self._take_back(lane, item)
                lane.out.clear()
        for _ in range(8):
            lanes = list(group.lanes.values())
            await self._pull(lanes, limit)
            moved = sum(len(lane.incoming) for lane in lanes)
            for lane in lanes:
                await self._absorb(group, lane)
            await self._lift_fences(lanes)
            deliveries = await self._form(group, lanes, limit)
            if deliveries or not moved:
                if not deliveries:
                    await self._nudge(lanes)
                return Batch(consumer, deliveries)
        return Batch(consumer, [])

    async def _nudge(self, lanes: Sequence[_Lane]) -> None:
        """Ask the server about the consumers of lanes whose pulls have brought nothing for a
        while. NATS 2.9 can lose count of a filtered pull consumer's pending messages and answer
        every pull with "no messages" while some wait; reading the consumer's info recounts
        them, and the next pull brings them."""
        now = time.monotonic()
        idle = [
            lane
            for lane in lanes
            if not lane.fenced
            and lane.empty_since is not None
            and now - lane.empty_since >= _NUDGE_AFTER
            and now - lane.nudged >= _NUDGE_AFTER
        ]
        if not idle:
            return
        for lane in idle:
            lane.nudged = now
        await asyncio.gather(
            *(self.jetstream.consumer_info(lane.stream, lane.consumer) for lane in idle),
            return_exceptions=True,
        )

    async def _pull(self, lanes: Sequence[_Lane], limit: int) -> None:
        """Ask each lane short of work for messages at once; return when all have answered."""
        in_hand = sum(len(lane.ready) for lane in lanes if not lane.fenced)
        requests: list[tuple[_Lane, int]] = []
        for lane in lanes:
            if lane.fenced:
                requests.append((lane, max(16, limit - len(lane.ready))))
            elif in_hand < limit:
                requests.append((lane, limit - in_hand))
        if not requests:
            return
        nc = self.connection
        loop = asyncio.get_running_loop()
        pulls: dict[int, _Pull] = {}
        try:
            for lane, count in requests:
                pull_id = next(self._ids)
                pull = pulls[pull_id] = self._pulls[pull_id] = _Pull(count, loop.create_future())
                lane.pull = pull
                await nc.publish(
                    lane.next_subject,
                    json.dumps({"batch": count, "no_wait": True}).encode(),
                    reply=f"{self._inbox}.{pull_id}",
                )
            await asyncio.wait([pull.done for pull in pulls.values()], timeout=self.fetch_timeout)
        finally:
            for pull_id in pulls:
                self._pulls.pop(pull_id, None)
            now = time.monotonic()
            for lane, count in requests:
                if lane.pull is not None and lane.pull.remaining < count:
                    lane.empty_since = None
                elif lane.empty_since is None:
                    lane.empty_since = now
                lane.pull = None

    async def _on_pulled(self, msg: Msg) -> None:
        """Route a pulled message to its lane; a status message ends its pull."""
        if not msg.reply:
            status = msg.headers.get("Status") if msg.headers else None
            pull = self._pulls.get(int(msg.subject.rsplit(".", 1)[1]))
            if status != _STATUS_HEARTBEAT and pull is not None and not pull.done.done():
                pull.done.set_result(None)
            return
        tokens = msg.reply.split(".")
        stream, consumer = (tokens[2], tokens[3]) if len(tokens) == 9 else (tokens[4], tokens[5])
        lane = self._lanes.get((stream, consumer))
        if lane is None:
            # Pulled for a partition given up meanwhile: back to the server at once.
            with suppress(Exception):
                await msg.nak()
            return
        lane.incoming.append(msg)
        pull = lane.pull
        if pull is not None:
            pull.remaining -= 1
            if pull.remaining <= 0 and not pull.done.done():
                pull.done.set_result(None)

    async def _absorb(self, group: _Group, lane: _Lane) -> None:
        """Take the lane's pulled messages into hand, in stream order, without duplicates."""
        incoming, lane.incoming = lane.incoming, []
        spec = group.spec
        now = time.monotonic()
        for msg in incoming:
            delivered, sequence = _ack_numbers(msg.reply)
            if spec.source == "subscription" and msg.headers:
                kind = unquote(msg.headers.get(HEADER_TYPE) or UNKNOWN_TYPE)
                if kind != UNKNOWN_TYPE and kind not in spec.message_types:
                    await msg.ack()  # another subscriber's type (a NATS 2.9 filter is one wildcard)
                    continue
            envelope = _envelope_of(msg, lane.stream, sequence)
            known = lane.items.get(sequence)
            if known is not None:  # delivered again while in hand: keep the newest delivery
                known.msg, known.delivered, known.touched = msg, delivered, now
                continue
            key = envelope.correlation_id or f"nats:{lane.stream}:{sequence}"
            item = _Item(msg, sequence, delivered, key, envelope, now)
            lane.items[sequence] = item
            insort(lane.ready, item, key=lambda i: i.sequence)
        for sequence, deliveries in lane.exhausted:
            if sequence in lane.items:
                continue
            try:
                raw = await self.jetstream.get_msg(lane.stream, sequence)
            except NotFoundError:
                continue
            envelope = Envelope(
                message_id=unquote((raw.headers or {}).get(HEADER_MESSAGE_ID, ""))
                or f"nats:{lane.stream}:{sequence}",
                message_type=unquote((raw.headers or {}).get(HEADER_TYPE, UNKNOWN_TYPE)),
                body=raw.data or b"",
                correlation_id=unquote((raw.headers or {}).get(HEADER_CORRELATION, "")),
                causation_id=unquote((raw.headers or {}).get(HEADER_CAUSATION, "")) or None,
                timestamp=(raw.headers or {}).get(HEADER_TIMESTAMP) or utc_timestamp(),
                traceparent=(raw.headers or {}).get(HEADER_TRACEPARENT),
                source=unquote((raw.headers or {}).get(HEADER_SOURCE, "")) or None,
            ).screen_id(f"nats:{lane.stream}:{sequence}")
            key = envelope.correlation_id or f"nats:{lane.stream}:{sequence}"
            item = _Item(None, sequence, deliveries + 1, key, envelope, now)
            lane.items[sequence] = item
            insort(lane.ready, item, key=lambda i: i.sequence)
        lane.exhausted.clear()

    async def _lift_fences(self, lanes: Sequence[_Lane]) -> None:
        """Open the lanes taken over whose predecessor's unsettled messages are all in hand."""
        fenced = [lane for lane in lanes if lane.fenced]
        if not fenced:
            return
        infos = await asyncio.gather(
            *(self.jetstream.consumer_info(lane.stream, lane.consumer) for lane in fenced),
            return_exceptions=True,
        )
        for lane, info in zip(fenced, infos, strict=True):
            if isinstance(info, BaseException):
                log.warning("NATS: consumer %s unavailable: %s", lane.consumer, info)
                continue
            if info.num_ack_pending <= len(lane.items) + len(lane.blocked):
                lane.fenced = False

    async def _form(self, group: _Group, lanes: Sequence[_Lane], limit: int) -> list[Delivery]:
        """The next batch: up to ``limit`` in stream order per lane (the worker sets apart a
        message delivered again that may be what killed a consumer)."""
        open_lanes = [lane for lane in lanes if not lane.fenced]
        if not open_lanes:
            return []
        group.rotation = (group.rotation + 1) % len(open_lanes)
        open_lanes = open_lanes[group.rotation :] + open_lanes[: group.rotation]
        for lane in open_lanes:
            self._hold_blocked(lane)
        deliveries: list[Delivery] = []
        for lane in open_lanes:
            taken = 0
            for item in lane.ready:
                if len(deliveries) >= limit:
                    break
                deliveries.append(self._hand_out(lane, item))
                taken += 1
            del lane.ready[:taken]
            if len(deliveries) >= limit:
                break
        return deliveries

    def _hold_blocked(self, lane: _Lane) -> None:
        """Move the ready messages of keys waiting for a retry behind it, in hand."""
        if not lane.blocked:
            return
        keep: list[_Item] = []
        for item in lane.ready:
            head = lane.blocked.get(item.key)
            if head is not None and item.sequence > head:
                insort(lane.held.setdefault(item.key, []), item, key=lambda i: i.sequence)
            else:
                keep.append(item)
        lane.ready = keep

    def _hand_out(self, lane: _Lane, item: _Item) -> Delivery:
        lane.items.pop(item.sequence, None)
        lane.out[item.sequence] = item
        return Delivery(
            envelope=item.envelope,
            attempt=item.delivered,
            ordering_key=item.key,
            token=_Token(lane, item),
        )

    async def _keep_alive(self) -> None:
        """Every ``ack_wait / 4``, tell the server that the messages in hand and those being
        handled are still being worked on, so that it does not deliver them again however long
        a batch takes (``ack_wait`` is then only how long what a dead member held waits)."""
        while self._nc is not None and not self._nc.is_closed:
            await asyncio.sleep(self.ack_wait / 4)
            now = time.monotonic()
            stale = now - self.ack_wait / 3
            try:
                for group in list(self._groups.values()):
                    for lane in list(group.lanes.values()):
                        for item in [*lane.items.values(), *lane.out.values()]:
                            if item.touched < stale and item.msg is not None:
                                item.touched = now
                                await item.msg.in_progress()
            except Exception as exc:
                log.debug("NATS: progress acknowledgements failed: %s", exc)

    # Settling -----------------------------------------------------------------------------------

    async def complete(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """Settle a batch whose handling committed: ack, nack with delay, or hold behind a retry."""
        policy = batch.consumer.retry
        for delivery, (outcome, _) in zip(batch.deliveries, outcomes, strict=True):
            token = cast(_Token, delivery.token)
            lane, item = token.lane, token.item
            lane.out.pop(item.sequence, None)
            if outcome is Outcome.ACK or outcome is Outcome.DEAD:
                await self._acknowledge(lane, item)
                if lane.blocked.get(item.key) == item.sequence:
                    del lane.blocked[item.key]
                    for waiting in lane.held.pop(item.key, []):
                        insort(lane.ready, waiting, key=lambda i: i.sequence)
            elif outcome is Outcome.RETRY:
                delay = policy.delay(delivery.attempt)
                if item.msg is not None:
                    await item.msg.nak(delay=delay)
                else:
                    # Given up on by the server (max deliveries): it comes back from here.
                    item.delivered += 1
                    asyncio.get_running_loop().call_later(delay, self._take_back, lane, item)
                lane.blocked[item.key] = item.sequence
            else:
                self._take_back(lane, item)
        with suppress(Exception):
            await self.connection.flush(timeout=5)

    async def _acknowledge(self, lane: _Lane, item: _Item) -> None:
        if item.msg is not None:
            await item.msg.ack()
        elif lane.stream == self.command_stream:
            # Given up on by the server (max deliveries) and now dead-lettered: off the queue.
            with suppress(NotFoundError):
                await self.jetstream.delete_msg(lane.stream, item.sequence)

    def _take_back(self, lane: _Lane, item: _Item) -> None:
        """A skipped delivery: held behind its key's retry, or ready again in its place."""
        if lane.released:
            return
        lane.items[item.sequence] = item
        head = lane.blocked.get(item.key)
        if head is not None and item.sequence > head:
            insort(lane.held.setdefault(item.key, []), item, key=lambda i: i.sequence)
        else:
            insort(lane.ready, item, key=lambda i: i.sequence)

    # Leases -------------------------------------------------------------------------------------

    async def _refresh(self, group: _Group) -> None:
        """Heartbeat on the consumer's lease document and hold a fair share of its partitions."""
        started = time.monotonic()
        kv = self._kv
        assert kv is not None
        try:
            for _ in range(10):
                wall = time.time()
                try:
                    entry = await kv.get(group.lease_key)
                    document = json.loads(entry.value or b"{}")
                    revision = entry.revision or 0
                except KeyNotFoundError:
                    document, revision = {}, 0
                owned, updated = rebalance(
                    document, group.member, wall, self.lease_seconds, self.partitions
                )
                try:
                    await kv.update(group.lease_key, json.dumps(updated).encode(), last=revision)
                except KeyWrongLastSequenceError:
                    continue
                break
            else:
                return
        except Exception as exc:
            log.warning("NATS: lease refresh of %s failed: %s", group.lease_key, exc)
            return
        group.refreshed = started
        group.valid_until = started + self.lease_seconds - self.refresh_interval
        for partition in [p for p in group.lanes if p not in owned]:
            await self._release(group.lanes.pop(partition))
        for partition in owned:
            if partition not in group.lanes:
                group.lanes[partition] = self._new_lane(group.spec, partition)

    def _new_lane(self, spec: ConsumerSpec, partition: int) -> _Lane:
        stream = self.command_stream if spec.source == "queue" else self.event_stream
        consumer = self._consumer_name(spec, partition)
        lane = _Lane(
            partition=partition,
            stream=stream,
            consumer=consumer,
            next_subject=f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        )
        self._lanes[(stream, consumer)] = lane
        return lane

    async def _release(self, lane: _Lane) -> None:
        """Give a partition up: every message in hand goes back to the server, in order."""
        lane.released = True
        if self._lanes.get((lane.stream, lane.consumer)) is lane:
            del self._lanes[(lane.stream, lane.consumer)]
        for item in sorted(lane.items.values(), key=lambda i: i.sequence):
            if item.msg is not None:
                with suppress(Exception):
                    await item.msg.nak()
        for msg in lane.incoming:
            with suppress(Exception):
                await msg.nak()
        lane.items.clear()
        lane.out.clear()
        lane.ready.clear()
        lane.held.clear()
        lane.incoming.clear()

    async def _drop_lanes(self, group: _Group) -> None:
        for partition in list(group.lanes):
            await self._release(group.lanes.pop(partition))

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Give back at once the partitions ``member`` holds and what it has in hand."""
        group = self._groups.pop((consumer.source, consumer.name, member), None)
        if group is None or self._nc is None or self._nc.is_closed:
            return
        await self._drop_lanes(group)
        kv = self._kv
        if kv is None:
            return
        try:
            for _ in range(10):
                try:
                    entry = await kv.get(group.lease_key)
                except KeyNotFoundError:
                    break
                document = _without(json.loads(entry.value or b"{}"), member)
                try:
                    await kv.update(
                        group.lease_key, json.dumps(document).encode(), last=entry.revision
                    )
                except KeyWrongLastSequenceError:
                    continue
                break
            await self.connection.flush(timeout=2)
        except Exception as exc:
            log.warning("NATS: could not give back the leases of %s: %s", member, exc)

    async def _on_exhausted(self, msg: Msg) -> None:
        """A MAX_DELIVERIES advisory: the owner of the partition dead-letters the message."""
        try:
            advisory = json.loads(msg.data)
            stream, consumer = str(advisory["stream"]), str(advisory["consumer"])
            sequence, deliveries = int(advisory["stream_seq"]), int(advisory["deliveries"])
        except (ValueError, KeyError, TypeError):
            return
        lane = self._lanes.get((stream, consumer))
        if lane is not None:
            lane.exhausted.append((sequence, deliveries))
            return
        log.warning(
            "NATS: %s/%s gave up on sequence %d after %d deliveries; no member here holds"
            " its partition",
            stream,
            consumer,
            sequence,
            deliveries,
        )

    # Waiting and replay -------------------------------------------------------------------------

    async def wait_for_work(self, consumer: ConsumerSpec, timeout: float) -> None:
        """Return when this process published something, or after ``timeout`` seconds."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup(consumer).wait(), timeout)

    def _wakeup(self, consumer: ConsumerSpec) -> asyncio.Event:
        key = (consumer.name, consumer.source)
        event = self._wakeups.get(key)
        if event is None:
            event = self._wakeups[key] = asyncio.Event()
        return event

    async def replay(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """The retained events after stream sequence ``after``, up to the last one at the start.

        Read through an ephemeral consumer in batches; positions are stream sequences.
        """
        await self.open()
        await self._ensure_streams()
        js = self.jetstream
        nc = self.connection
        last = (await js.stream_info(self.event_stream)).state.last_seq
        if last <= after:
            return
        info = await js.add_consumer(
            self.event_stream,
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
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.event_stream}.{info.name}",
                    json.dumps({"batch": _REPLAY_BATCH, "no_wait": True}).encode(),
                    reply=inbox,
                )
                received = 0
                while True:
                    msg = await sub.next_msg(timeout=self.publish_timeout)
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
                    envelope = _envelope_of(msg, self.event_stream, sequence)
                    yield StoredEvent(sequence, None, None, envelope)
                if not received:
                    break
        finally:
            with suppress(Exception):
                await sub.unsubscribe()
            with suppress(Exception):
                await js.delete_consumer(self.event_stream, info.name)


if TYPE_CHECKING:

    def _implements_port(bus: NatsBus) -> BrokerBus:
        return bus


def open_bus(url: str, *, instance: tuple[int, int] | None = None, **options: Any) -> NatsBus:
    """The NATS JetStream bus ``url`` names (the scheme registry's factory; see
    :mod:`sagaline.config`): ``?prefix=NAME`` in the URL is taken as that option (an explicit
    option wins). Its members share partitions by leases, so ``instance`` is not needed."""
    options = dict(options)
    url = take_prefix(url, options)
    return NatsBus(url, **options)
