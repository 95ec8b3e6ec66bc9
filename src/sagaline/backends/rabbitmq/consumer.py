"""Consuming a RabbitMQ bus: the deliveries one member holds, its partition channels, the
retries kept in this process and the partitions given back to their home instance (see
:mod:`sagaline.backends.rabbitmq`)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel, DeliveredMessage

from sagaline.backends.rabbitmq.wire import _delivery_count, messages_of
from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.messages import Envelope
from sagaline.ports import ConsumerSpec, Delivery, Outcome

log = logging.getLogger("sagaline.rabbitmq")


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


def home_partitions(instance: tuple[int, int] | None, partitions: int) -> frozenset[int] | None:
    """The partitions instance ``i`` of ``n`` consumes first: ``p % n == i - 1`` (None: without
    an instance number, or alone, all of them at once)."""
    if instance is None or instance[1] == 1:
        return None
    index, count = instance
    return frozenset(p for p in range(partitions) if p % count == (index - 1) % count)


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

    Retry holds and the counts of members present are timed on ``clock``'s monotonic reading.
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
        *,
        dead_queue: str = "",
        clock: Clock = SYSTEM_CLOCK,
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
        #: The consumer's queue of the broker's own dead letters (past ``x-delivery-limit``),
        #: consumed too: what the broker gave up on goes to the worker once more.
        self.dead_queue = dead_queue
        self.probe_interval = probe_interval
        self.clock = clock
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
        self._probed = -math.inf
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
                if self.dead_queue:
                    await raw.basic_consume(self.dead_queue, self._on_dead_letter, no_ack=False)
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
            now = self.clock.monotonic()
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

    async def _on_delivery(self, message: DeliveredMessage, *, dead: bool = False) -> None:
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
        if dead:
            # Delivered before, however its count reads now: the worker counts in its store how
            # often it was handed to its handler, and handles it or records it as a dead letter.
            redelivered = max(redelivered, 1)
        bundle = _Unsettled(len(envelopes)) if len(envelopes) > 1 else None
        for envelope in envelopes:
            self.ready.append(
                _Received(next(self._seq), tag, channel, envelope, redelivered, bundle)
            )
        self.wakeup.set()

    async def _on_dead_letter(self, message: DeliveredMessage) -> None:
        """A message the broker dead-lettered (its delivery limit reached before the worker could
        record it as one): handed out once more, as a message delivered before."""
        await self._on_delivery(message, dead=True)

    def _release_holds(self, now: float) -> None:
        for key in [key for key, due in self.held.items() if due <= now]:
            del self.held[key]

    def has_work(self) -> bool:
        """Whether a claim would hand out something now."""
        if not self.ready:
            return False
        self._release_holds(self.clock.monotonic())
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
        self._release_holds(self.clock.monotonic())
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
        now = self.clock.monotonic()
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
