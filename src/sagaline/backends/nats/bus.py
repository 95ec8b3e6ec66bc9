"""The NATS JetStream bus: connection, streams and consumers, publishing, claims over leased
lanes, settling, and replay of the event stream (see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import zlib
from bisect import insort
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

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
from sagaline.backends.nats.lanes import _Group, _Item, _Lane, _Pull, _Token
from sagaline.backends.nats.leases import _without, rebalance
from sagaline.backends.nats.wire import (
    _STATUS_HEARTBEAT,
    _TOKEN,
    HEADER_CAUSATION,
    HEADER_CORRELATION,
    HEADER_MESSAGE_ID,
    HEADER_SOURCE,
    HEADER_TIMESTAMP,
    HEADER_TRACEPARENT,
    HEADER_TYPE,
    UNKNOWN_TYPE,
    MessageTooLarge,
    _ack_numbers,
    _envelope_of,
    _headers_of,
    _headers_size,
)
from sagaline.config import redact, redact_url
from sagaline.errors import BusUnavailable, ConfigurationError
from sagaline.messages import Envelope, registry, utc_timestamp
from sagaline.ports import Batch, BrokerBus, ConsumerSpec, Delivery, Outcome, StoredEvent

log = logging.getLogger("sagaline.nats")

_DUPLICATE_WINDOW = 120.0
#: Seconds a lane's pulls bring nothing before the server is asked about its consumer.
_NUDGE_AFTER = 5.0
_REPLAY_BATCH = 1000


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
                try:
                    self._kv = await js.create_key_value(
                        KeyValueConfig(
                            bucket=self.lease_bucket,
                            history=1,
                            storage=StorageType.FILE,
                            replicas=self.replicas,
                            description="sagaline partition leases",
                        )
                    )
                except APIError:
                    # Another process created the bucket between the look-up and the creation
                    # (the server refuses a second one: its subjects overlap): use that one.
                    self._kv = await js.key_value(self.lease_bucket)
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
        if registry.kind_of(envelope.message_type) == "command":
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

    def database(self) -> None:
        """None: a broker, not a database (it keeps no record of what clients submitted)."""
        return None

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
