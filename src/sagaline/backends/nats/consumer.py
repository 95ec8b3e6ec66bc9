"""Consuming a NATS bus: the members of this process, the lanes of the partitions they hold, the
pulls on one inbox that fill them, and settling (see :mod:`sagaline.backends.nats`).

A claim pulls for every lane short of work at once, takes what came into hand in stream order,
opens the lanes taken over once their predecessor's unsettled messages are all back, and forms
a batch in stream order per lane. Every ``ack_wait / 4`` the messages in hand and out with the
worker get a progress acknowledgement. A lane whose pulls bring nothing for a while has its
consumer's info read (NATS 2.9 can lose count of a filtered consumer's pending messages).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from bisect import insort
from collections.abc import Sequence
from contextlib import suppress
from typing import cast
from urllib.parse import unquote

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from sagaline.backends.nats.lanes import (
    _Group,
    _Item,
    _Lane,
    _Pull,
    _Token,
    hand_out,
    hold_blocked,
    take_back,
    unblock,
)
from sagaline.backends.nats.replay import exhaustion_of, read_back
from sagaline.backends.nats.topology import Topology
from sagaline.backends.nats.wire import (
    _STATUS_HEARTBEAT,
    HEADER_TYPE,
    UNKNOWN_TYPE,
    _ack_numbers,
    _envelope_of,
)
from sagaline.clock import Clock
from sagaline.errors import ConfigurationError
from sagaline.ports import Batch, ConsumerSpec, Delivery, Outcome

log = logging.getLogger("sagaline.nats")

#: Seconds a lane's pulls bring nothing before the server is asked about its consumer.
_NUDGE_AFTER = 5.0


class Consumers:
    """What this process consumes: per consumer and member a group of lanes, pulled on one inbox."""

    def __init__(
        self, topology: Topology, clock: Clock, *, ack_wait: float, fetch_timeout: float
    ) -> None:
        self.topology = topology
        self.clock = clock
        self.ack_wait = ack_wait
        self.fetch_timeout = fetch_timeout
        #: The members of this process, by (source, consumer name, member).
        self.groups: dict[tuple[str, str, str], _Group] = {}
        #: Every lane held here, by (stream, durable consumer name): where pulled messages go.
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._pulls: dict[int, _Pull] = {}
        self._ids = itertools.count(1)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._keeper: asyncio.Task[None] | None = None

    async def attach(self, client: Client, js: JetStreamContext) -> None:
        """Receive pulled messages on an inbox of ``client``, and the advisories of messages the
        server gives up on."""
        self._nc, self._js = client, js
        self._inbox = client.new_inbox()
        await client.subscribe(f"{self._inbox}.*", cb=self._on_pulled)
        for stream in (self.topology.command_stream, self.topology.event_stream):
            await client.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*", cb=self._on_exhausted
            )

    @property
    def jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise ConfigurationError("the NATS bus is not open: call open() first")
        return self._js

    def stop(self) -> None:
        """Stop the progress acknowledgements."""
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None

    # Members and their lanes --------------------------------------------------------------------

    def group(self, spec: ConsumerSpec, member: str) -> _Group:
        """``member``'s group of ``spec`` (a new one when the consumer's settings changed)."""
        key = (spec.source, spec.name, member)
        group = self.groups.get(key)
        if group is None or group.spec != spec:
            group = _Group(spec, member, self.topology.lease_key(spec))
            self.groups[key] = group
        return group

    async def hold(self, group: _Group, owned: Sequence[int]) -> None:
        """Hold exactly the partitions ``owned``: give the others up, open a lane for new ones."""
        for partition in [p for p in group.lanes if p not in owned]:
            await self.release(group.lanes.pop(partition))
        for partition in owned:
            if partition not in group.lanes:
                group.lanes[partition] = self._new_lane(group.spec, partition)

    def _new_lane(self, spec: ConsumerSpec, partition: int) -> _Lane:
        stream = self.topology.stream_of(spec)
        consumer = self.topology.consumer_name(spec, partition)
        lane = _Lane(
            partition=partition,
            stream=stream,
            consumer=consumer,
            next_subject=f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        )
        self._lanes[(stream, consumer)] = lane
        return lane

    async def release(self, lane: _Lane) -> None:
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

    async def drop_lanes(self, group: _Group) -> None:
        """Give up every partition of ``group``."""
        for partition in list(group.lanes):
            await self.release(group.lanes.pop(partition))

    # Claiming -----------------------------------------------------------------------------------

    async def next_batch(self, group: _Group, limit: int) -> list[Delivery]:
        """Up to ``limit`` deliveries from the lanes of ``group``; empty when none."""
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_alive())
        for lane in group.lanes.values():
            if lane.out:
                # The previous batch was never completed (its transaction failed): it is handed
                # out again, ahead of what came after it, each attempt counted.
                for item in sorted(lane.out.values(), key=lambda i: i.sequence):
                    item.delivered += 1
                    take_back(lane, item)
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
                return deliveries
        return []

    async def _nudge(self, lanes: Sequence[_Lane]) -> None:
        """Ask the server about the consumers of lanes whose pulls have brought nothing for a
        while. NATS 2.9 can lose count of a filtered pull consumer's pending messages and answer
        every pull with "no messages" while some wait; reading the consumer's info recounts
        them, and the next pull brings them."""
        now = self.clock.monotonic()
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
        nc = self._nc
        assert nc is not None
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
            now = self.clock.monotonic()
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
        now = self.clock.monotonic()
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
            given_up = await read_back(self.jetstream, lane.stream, sequence)
            if given_up is None:
                continue
            key = given_up.correlation_id or f"nats:{lane.stream}:{sequence}"
            item = _Item(None, sequence, deliveries + 1, key, given_up, now)
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
            hold_blocked(lane)
        deliveries: list[Delivery] = []
        for lane in open_lanes:
            taken = 0
            for item in lane.ready:
                if len(deliveries) >= limit:
                    break
                deliveries.append(hand_out(lane, item))
                taken += 1
            del lane.ready[:taken]
            if len(deliveries) >= limit:
                break
        return deliveries

    async def _keep_alive(self) -> None:
        """Every ``ack_wait / 4``, tell the server that the messages in hand and those being
        handled are still being worked on, so that it does not deliver them again however long
        a batch takes (``ack_wait`` is then only how long what a dead member held waits)."""
        while self._nc is not None and not self._nc.is_closed:
            await asyncio.sleep(self.ack_wait / 4)
            now = self.clock.monotonic()
            stale = now - self.ack_wait / 3
            try:
                for group in list(self.groups.values()):
                    for lane in list(group.lanes.values()):
                        for item in [*lane.items.values(), *lane.out.values()]:
                            if item.touched < stale and item.msg is not None:
                                item.touched = now
                                await item.msg.in_progress()
            except Exception as exc:
                log.debug("NATS: progress acknowledgements failed: %s", exc)

    # Settling -----------------------------------------------------------------------------------

    async def settle(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """Ack, nack with the retry policy's delay, or hold behind a retry, each delivery."""
        policy = batch.consumer.retry
        for delivery, (outcome, _) in zip(batch.deliveries, outcomes, strict=True):
            token = cast(_Token, delivery.token)
            lane, item = token.lane, token.item
            lane.out.pop(item.sequence, None)
            if outcome is Outcome.ACK or outcome is Outcome.DEAD:
                await self._acknowledge(lane, item)
                unblock(lane, item)
            elif outcome is Outcome.RETRY:
                delay = policy.delay(delivery.attempt)
                if item.msg is not None:
                    await item.msg.nak(delay=delay)
                else:
                    # Given up on by the server (max deliveries): it comes back from here.
                    item.delivered += 1
                    asyncio.get_running_loop().call_later(delay, take_back, lane, item)
                lane.blocked[item.key] = item.sequence
            else:
                take_back(lane, item)

    async def _acknowledge(self, lane: _Lane, item: _Item) -> None:
        if item.msg is not None:
            await item.msg.ack()
        elif lane.stream == self.topology.command_stream:
            # Given up on by the server (max deliveries) and now dead-lettered: off the queue.
            with suppress(NotFoundError):
                await self.jetstream.delete_msg(lane.stream, item.sequence)

    # Dead letters -------------------------------------------------------------------------------

    async def _on_exhausted(self, msg: Msg) -> None:
        """A MAX_DELIVERIES advisory: the owner of the partition dead-letters the message."""
        exhausted = exhaustion_of(msg)
        if exhausted is None:
            return
        stream, consumer, sequence, deliveries = exhausted
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
