"""What a prefix is made of on the server: its two streams, its lease bucket, the subject of each
message and a durable pull consumer per consumer and partition (see :mod:`sagaline.backends.nats`).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

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
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from sagaline.backends.nats.wire import _TOKEN
from sagaline.errors import ConfigurationError
from sagaline.messages import Envelope, registry
from sagaline.ports import ConsumerSpec

log = logging.getLogger("sagaline.nats")

_DUPLICATE_WINDOW = 120.0


class Topology:
    """The streams, lease bucket, subjects and consumers of one prefix, and their declaration."""

    def __init__(
        self,
        prefix: str,
        partitions: int,
        *,
        ack_wait: float,
        max_ack_pending: int,
        replicas: int,
    ) -> None:
        if not _TOKEN.match(prefix):
            raise ConfigurationError(f"NATS prefix {prefix!r}: use letters, digits, - and _")
        if partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        self.prefix = prefix
        self.partitions = partitions
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.replicas = replicas
        self.command_stream = f"{prefix}_commands"
        self.event_stream = f"{prefix}_events"
        self.lease_bucket = prefix
        #: Whether the server takes several filter subjects per consumer (NATS 2.10 on).
        self.multi_filter = False
        #: The lease bucket, once the streams are ensured.
        self.kv: KeyValue | None = None
        self._prepared: set[ConsumerSpec] = set()
        self._streams_ready = False
        self._setup_lock = asyncio.Lock()
        self._tokens: set[str] = set()

    # Names --------------------------------------------------------------------------------------

    def token(self, value: str, what: str) -> str:
        """``value``, checked once to be usable as a subject token (``what`` names it if not)."""
        if value not in self._tokens:
            if not _TOKEN.match(value):
                raise ConfigurationError(
                    f"{what} {value!r} cannot be a NATS subject token: use letters, digits, - and _"
                )
            self._tokens.add(value)
        return value

    def stream_of(self, spec: ConsumerSpec) -> str:
        """The stream a consumer reads: commands for a queue, events for a subscription."""
        return self.command_stream if spec.source == "queue" else self.event_stream

    def consumer_name(self, spec: ConsumerSpec, partition: int) -> str:
        """The durable name of a consumer's pull consumer on one partition."""
        kind = "q" if spec.source == "queue" else "s"
        return f"{kind}-{self.token(spec.name, 'consumer name')}-{partition}"

    def lease_key(self, spec: ConsumerSpec) -> str:
        """The key of a consumer's lease document in the lease bucket."""
        kind = "q" if spec.source == "queue" else "s"
        return f"{kind}.{self.token(spec.name, 'consumer name')}"

    def partition_of(self, correlation_id: str) -> int:
        """The partition of a correlation key."""
        return zlib.crc32(correlation_id.encode()) % self.partitions

    def subject_of(self, envelope: Envelope, routes: Mapping[str, str]) -> str:
        """Where a message is published: its queue's subject, or its event type's."""
        partition = self.partition_of(envelope.correlation_id)
        queue = routes.get(envelope.message_type)
        if queue is not None:
            return f"{self.prefix}.cmd.{self.token(queue, 'queue name')}.{partition}"
        if registry.kind_of(envelope.message_type) == "command":
            raise ConfigurationError(f"no service handles {envelope.message_type}")
        name = self.token(envelope.message_type, "event type")
        return f"{self.prefix}.evt.{name}.{partition}"

    def consumer_config(self, spec: ConsumerSpec, partition: int) -> ConsumerConfig:
        """The durable pull consumer of one partition: explicit acks, the retry policy's
        delivery limit as a backstop, and a filter on the subjects the consumer reads."""
        config = ConsumerConfig(
            durable_name=self.consumer_name(spec, partition),
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
            name = self.token(name, "event type")
            config.filter_subject = f"{self.prefix}.evt.{name}.{partition}"
        elif self.multi_filter:
            config.filter_subjects = [
                f"{self.prefix}.evt.{self.token(name, 'event type')}.{partition}"
                for name in sorted(spec.message_types)
            ]
        else:
            config.filter_subject = f"{self.prefix}.evt.*.{partition}"
        return config

    # Declaration --------------------------------------------------------------------------------

    async def ensure_streams(self, js: JetStreamContext) -> None:
        """Create the two streams and the lease bucket, or use those that exist (once)."""
        if self._streams_ready:
            return
        async with self._setup_lock:
            if self._streams_ready:
                return
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
                self.kv = await js.key_value(self.lease_bucket)
            except NotFoundError:
                try:
                    self.kv = await js.create_key_value(
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
                    self.kv = await js.key_value(self.lease_bucket)
            self._streams_ready = True

    async def prepare(
        self, js: JetStreamContext, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]
    ) -> None:
        """Ensure the streams and bucket, then every consumer's durable pull consumers (a changed
        configuration, such as a new retry limit, is updated by the server)."""
        for queue in set(routes.values()):
            self.token(queue, "queue name")
        await self.ensure_streams(js)
        todo = [spec for spec in consumers if spec not in self._prepared]
        await asyncio.gather(
            *(
                js.add_consumer(self.stream_of(spec), self.consumer_config(spec, partition))
                for spec in todo
                for partition in range(self.partitions)
            )
        )
        self._prepared.update(todo)

    @property
    def prepared_consumers(self) -> list[ConsumerSpec]:
        """The consumers this process created durable pull consumers for."""
        return list(self._prepared)

    async def delete(self, js: JetStreamContext) -> None:
        """Delete both streams (their messages and consumers) and the lease bucket, passing over
        what does not exist."""
        for stream in (self.command_stream, self.event_stream):
            with suppress(NotFoundError):
                await js.delete_stream(stream)
        with suppress(NotFoundError, BucketNotFoundError):
            await js.delete_key_value(self.lease_bucket)
        self._streams_ready = False
        self.kv = None
        self._prepared.clear()
