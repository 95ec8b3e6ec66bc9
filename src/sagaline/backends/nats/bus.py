"""The NATS JetStream bus: the connection, publishing, claims over leased partitions, settling
and replay, each part in a module of its own (see :mod:`sagaline.backends.nats`)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing, suppress
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from sagaline.backends._broker import take_prefix
from sagaline.backends.nats.consumer import Consumers
from sagaline.backends.nats.leases import Leases
from sagaline.backends.nats.replay import replay_stream
from sagaline.backends.nats.topology import Topology
from sagaline.backends.nats.wire import MessageTooLarge, _headers_of, _headers_size
from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.config import DEFAULT_LEASE_SECONDS, redact, redact_url
from sagaline.errors import BusUnavailable, ConfigurationError
from sagaline.messages import Envelope
from sagaline.ports import Batch, BrokerBus, ConsumerSpec, Outcome, StoredEvent

log = logging.getLogger("sagaline.nats")


class NatsBus:
    """A :class:`~sagaline.ports.BrokerBus` on NATS JetStream; one connection per process.

    ``clock`` is what lease expiry times and in-process intervals are read from.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sagaline",
        partitions: int = 8,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        ack_wait: float = 10.0,
        max_ack_pending: int = 20_000,
        publish_timeout: float = 10.0,
        fetch_timeout: float = 1.0,
        replicas: int = 1,
        connect_timeout: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._topology = Topology(
            prefix,
            partitions,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            replicas=replicas,
        )
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
        self.clock = clock
        self.command_stream = self._topology.command_stream
        self.event_stream = self._topology.event_stream
        self.lease_bucket = self._topology.lease_bucket
        self._leases = Leases(partitions, lease_seconds, clock)
        self.refresh_interval = self._leases.refresh_interval
        self._consumers = Consumers(
            self._topology, clock, ack_wait=ack_wait, fetch_timeout=fetch_timeout
        )
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._wakeups: dict[tuple[str, str], asyncio.Event] = {}
        self._closing = False
        self._open_lock = asyncio.Lock()
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
        release = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
        self._topology.multi_filter = release >= (2, 10)
        await self._consumers.attach(client, self._js)

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
        self._consumers.stop()
        for group in list(self._consumers.groups.values()):
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

    async def delete_topology(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        """Delete this prefix's streams (with their messages and consumers) and its lease bucket.

        For tearing down a deployment or a test; ``consumers`` is accepted for symmetry with the
        other buses (their consumers live in the streams). What does not exist is passed over.
        """
        for group in list(self._consumers.groups.values()):
            with suppress(Exception):
                await self.leave(group.spec, group.member)
        if self._nc is None:
            await self.open()
        await self._topology.delete(self.jetstream)

    @property
    def prepared_consumers(self) -> list[ConsumerSpec]:
        """The consumers this process created durable pull consumers for."""
        return self._topology.prepared_consumers

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Create the streams, the lease bucket and every consumer's durable pull consumers.

        Idempotent and safe from several processes at once: creating what exists with the same
        configuration is a no-op on the server, and a changed one (a new retry limit) is updated.
        """
        await self.open()
        self._connected()
        await self._topology.prepare(self.jetstream, consumers, routes)

    # Publishing ---------------------------------------------------------------------------------

    def partition_of(self, correlation_id: str) -> int:
        """The partition of a correlation key."""
        return self._topology.partition_of(correlation_id)

    def subject_of(self, envelope: Envelope, routes: Mapping[str, str]) -> str:
        """Where a message is published: its queue's subject, or its event type's."""
        return self._topology.subject_of(envelope, routes)

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
        await self._topology.ensure_streams(self.jetstream)
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

    # Claiming and settling ----------------------------------------------------------------------

    def partitions_held(self, consumer: ConsumerSpec, member: str) -> list[int]:
        """The partitions of ``consumer`` that ``member`` holds in this process."""
        group = self._consumers.groups.get((consumer.source, consumer.name, member))
        return sorted(group.lanes) if group else []

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Up to ``limit`` deliveries from the partitions ``member`` holds; empty when none."""
        self._wakeup(consumer).clear()
        await self.open()
        nc = self._nc
        if nc is None or not nc.is_connected:
            return Batch(consumer, [])
        await self._topology.ensure_streams(self.jetstream)
        group = self._consumers.group(consumer, member)
        now = self.clock.monotonic()
        if self._leases.due(group, now):
            kv = self._topology.kv
            assert kv is not None
            owned = await self._leases.refresh(kv, group)
            if owned is not None:
                await self._consumers.hold(group, owned)
        if now >= group.valid_until:
            await self._consumers.drop_lanes(group)
            return Batch(consumer, [])
        return Batch(consumer, await self._consumers.next_batch(group, limit))

    async def complete(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """Settle a batch whose handling committed: ack, nack with delay, or hold behind a retry."""
        await self._consumers.settle(batch, outcomes)
        with suppress(Exception):
            await self.connection.flush(timeout=5)

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Give back at once the partitions ``member`` holds and what it has in hand."""
        group = self._consumers.groups.pop((consumer.source, consumer.name, member), None)
        if group is None or self._nc is None or self._nc.is_closed:
            return
        await self._consumers.drop_lanes(group)
        kv = self._topology.kv
        if kv is None:
            return
        try:
            await self._leases.give_back(kv, group)
            await self.connection.flush(timeout=2)
        except Exception as exc:
            log.warning("NATS: could not give back the leases of %s: %s", member, exc)

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
        await self._topology.ensure_streams(self.jetstream)
        events = replay_stream(
            self.connection, self.jetstream, self.event_stream, after, self.publish_timeout
        )
        async with aclosing(events):
            async for event in events:
                yield event


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
