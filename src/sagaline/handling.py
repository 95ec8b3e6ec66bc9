"""Services, handler registration and the unit of work every message goes through.

The path of one batch (design section 4): claim deliveries from the bus; open one transaction on
the service's store; for each message record (consumer, messageId) in the inbox, skipping
duplicates; run the handler, whose state changes and outgoing messages join the same
transaction; settle every delivery (ack, retry with backoff, dead letter) in that transaction;
commit. A crash anywhere before the commit leaves the batch to be delivered again.

Group commit: the whole batch commits once. A handler error rolls the batch back and it is handled
again message by message under savepoints, so one bad message never costs the others their work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sagaline.aggregate import Aggregate
from sagaline.errors import (
    ConcurrencyError,
    ConfigurationError,
    DuplicateMessageId,
    InvalidMessage,
    NonRetryableError,
    NotAcceptedFromClients,
    StoreUnavailable,
)
from sagaline.messages import (
    Command,
    Envelope,
    Event,
    Message,
    MessageRegistry,
    check_unique_keys,
)
from sagaline.ports import (
    DEAD_LETTERED,
    Backend,
    Batch,
    BrokerBus,
    ConsumerSpec,
    Delivery,
    Outbox,
    Outcome,
    Reads,
    RetryPolicy,
    StoreTransaction,
)
from sagaline.relay import Relay

if TYPE_CHECKING:
    from sagaline.saga.definition import SagaDefinition

__all__ = [
    "DEFAULT_BATCH",
    "Context",
    "Handler",
    "ReadsOf",
    "Runtime",
    "Service",
    "System",
    "Worker",
    "crash_point",
]

log = logging.getLogger("sagaline.handling")

#: Deliveries claimed and committed together. Under load a bigger batch spreads one commit over
#: more messages; when idle a batch holds what is there, so latency does not wait for it.
DEFAULT_BATCH = 500

A = TypeVar("A", bound=Aggregate)
Handler = Callable[["Context", Any], Awaitable[None]]
#: Declares what handling one message will read: called with the message and the batch's Reads.
ReadsOf = Callable[[Any, Reads], None]


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``SAGALINE_CRASH_AT`` names this point.

    Used by the crash tests to die at a precise line: ``SAGALINE_CRASH_AT=after-handle:40`` dies
    the 40th time the point is passed. Costs one dictionary lookup when unarmed.
    """
    armed = _CRASH_POINTS.get(name)
    if armed is None:
        return
    armed[0] -= 1
    if armed[0] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _parse_crash_points(spec: str | None) -> dict[str, list[int]]:
    points: dict[str, list[int]] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, _, count = item.strip().partition(":")
        points[name] = [int(count or "1")]
    return points


_CRASH_POINTS = _parse_crash_points(os.environ.get("SAGALINE_CRASH_AT"))


def decode_in(registry: MessageRegistry | None, envelope: Envelope) -> Message:
    """``envelope``'s message, decoded as ``registry``'s class of its type when it knows it."""
    if registry is not None and envelope.message_type in registry:
        return registry.decode(envelope.message_type, envelope.body)
    return envelope.decode()


class Context:
    """What a handler sees: the incoming message's metadata, its store transaction, its outbox."""

    __slots__ = ("envelope", "outgoing", "registry", "service", "tx")

    def __init__(
        self,
        tx: StoreTransaction,
        envelope: Envelope,
        service: str,
        registry: MessageRegistry | None = None,
    ) -> None:
        self.tx = tx
        self.envelope = envelope
        self.service = service
        #: The system's message types (the aggregates' events are decoded by it).
        self.registry = registry
        self.outgoing: list[Envelope] = []

    def send(self, command: Command) -> Envelope:
        """Send a command, caused by the message being handled, once this unit commits."""
        envelope = Envelope.wrap(command, causation=self.envelope, source=self.service)
        self.outgoing.append(envelope)
        return envelope

    def publish(self, event: Event) -> Envelope:
        """Publish an event, caused by the message being handled, once this unit commits."""
        envelope = Envelope.wrap(event, causation=self.envelope, source=self.service)
        self.outgoing.append(envelope)
        return envelope

    async def load(self, cls: type[A], aggregate_id: str) -> A:
        """Rebuild an event-sourced aggregate from its stream (version 0 when new)."""
        aggregate = cls(aggregate_id)
        for stored in await self.tx.read_stream(cls.stream_name(aggregate_id)):
            aggregate.apply(cast(Event, decode_in(self.registry, stored.envelope)))
            aggregate.version = stored.version or 0
        return aggregate

    async def save(self, aggregate: Aggregate) -> None:
        """Append the aggregate's new events at its loaded version; they are published too."""
        if not aggregate.pending:
            return
        envelopes = [
            Envelope.wrap(event, causation=self.envelope, source=self.service)
            for event in aggregate.pending
        ]
        aggregate.version = await self.tx.append(
            aggregate.stream_name(aggregate.id), aggregate.version, envelopes
        )
        aggregate.pending.clear()


@dataclass
class Service:
    """A named service: the commands it handles and the events it subscribes to."""

    name: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    command_handlers: dict[str, Handler] = field(default_factory=dict)
    event_handlers: dict[str, Handler] = field(default_factory=dict)
    #: Per message type, what its handler reads (see :class:`~sagaline.ports.Reads`).
    reads: dict[str, ReadsOf] = field(default_factory=dict)
    #: The classes of the messages it handles and subscribes to, by wire name.
    types: dict[str, type[Message]] = field(default_factory=dict)
    #: The saga definitions whose instances this service keeps (an orchestrator, a monitor).
    sagas: tuple[SagaDefinition, ...] = ()

    def handles(
        self, *types: type[Command], reads: ReadsOf | None = None
    ) -> Callable[[Handler], Handler]:
        """Register a handler for one or more command types (one service owns a command).

        ``reads(command, reads)`` may declare the documents, sagas and streams the handler will
        read, so that a networked store loads them for the whole batch in one round trip.
        """

        def register(handler: Handler) -> Handler:
            for cls in types:
                self.command_handlers[cls.type_name()] = handler
                self.types[cls.type_name()] = cls
                self._declare_reads(cls.type_name(), reads)
            return handler

        return register

    def subscribes(
        self, *types: type[Event], reads: ReadsOf | None = None
    ) -> Callable[[Handler], Handler]:
        """Register a handler for one or more event types (``reads`` as in :meth:`handles`)."""

        def register(handler: Handler) -> Handler:
            for cls in types:
                self.event_handlers[cls.type_name()] = handler
                self.types[cls.type_name()] = cls
                self._declare_reads(cls.type_name(), reads)
            return handler

        return register

    def _declare_reads(self, type_name: str, reads: ReadsOf | None) -> None:
        if reads is None:
            return
        earlier = self.reads.get(type_name)
        if earlier is None:
            self.reads[type_name] = reads
            return

        def both(message: Any, batch: Reads) -> None:
            earlier(message, batch)
            reads(message, batch)

        self.reads[type_name] = both

    def consumers(self) -> list[ConsumerSpec]:
        """The bus consumers this service needs: its command queue and its subscription."""
        specs = []
        if self.command_handlers:
            specs.append(
                ConsumerSpec(self.name, "queue", frozenset(self.command_handlers), self.retry)
            )
        if self.event_handlers:
            specs.append(
                ConsumerSpec(self.name, "subscription", frozenset(self.event_handlers), self.retry)
            )
        return specs


class System:
    """A set of services, the routing of each command type to its service's queue, and the
    messages clients may submit.

    ``accepts`` declares the message types clients may submit (:meth:`submit`): every other
    command is internal, sent only by the system's own services, and refused from clients at
    every entry, and so is every event not declared. A system that declares nothing
    (``accepts=None``) draws no such line: clients may submit any command one of its services
    handles, and any event. That suits tests and scripts inside the system; a system that takes
    messages from outside (the CLI, an HTTP API) declares them.
    """

    def __init__(
        self, services: Iterable[Service], *, accepts: Iterable[type[Message]] | None = None
    ) -> None:
        self.services = {service.name: service for service in services}
        self.routes: dict[str, str] = {}
        for service in self.services.values():
            for type_name in service.command_handlers:
                owner = self.routes.setdefault(type_name, service.name)
                if owner != service.name:
                    raise ConfigurationError(
                        f"{type_name} is handled by both {owner!r} and {service.name!r}"
                    )
        #: The wire names of the types clients may submit; None when the system declares none.
        self.accepts: frozenset[str] | None = None
        accepted = list(accepts or ())
        if accepts is not None:
            self.accepts = frozenset(cls.type_name() for cls in accepted)
            for cls in accepted:
                if issubclass(cls, Command):
                    self.route(cls.type_name())
        #: The system's message types: what its services handle and subscribe to, and what
        #: clients may submit. A name means one class here, whatever other apps define.
        self.registry = MessageRegistry(
            [*(cls for svc in self.services.values() for cls in svc.types.values()), *accepted]
        )

    @property
    def sagas(self) -> dict[str, SagaDefinition]:
        """The saga definitions the system's services keep, by name."""
        return {saga.name: saga for svc in self.services.values() for saga in svc.sagas}

    def saga_services(self) -> list[str]:
        """The services that keep saga instances (orchestrators, monitors)."""
        return [name for name, svc in self.services.items() if svc.sagas]

    def decode(self, envelope: Envelope) -> Message:
        """The message of ``envelope``, decoded as this system's class of its type."""
        return decode_in(self.registry, envelope)

    @property
    def subscribers(self) -> list[str]:
        """The services that subscribe to events (each has a cursor on the log)."""
        return [name for name, service in self.services.items() if service.event_handlers]

    def route(self, command_type: str) -> str:
        """The queue a command type goes to."""
        try:
            return self.routes[command_type]
        except KeyError:
            raise ConfigurationError(f"no service handles {command_type}") from None

    def accepts_from_clients(self, type_name: str) -> bool:
        """Whether clients may submit messages of the type named ``type_name``."""
        return self.accepts is None or type_name in self.accepts

    def check_submittable(self, message: Message) -> None:
        """Raise :class:`NotAcceptedFromClients` unless clients may submit ``message``'s type
        (and :class:`ConfigurationError` for a command that no service handles)."""
        name = message.type_name()
        if isinstance(message, Command):
            self.route(name)
        if not self.accepts_from_clients(name):
            allowed = ", ".join(sorted(self.accepts or ())) or "nothing"
            raise NotAcceptedFromClients(
                name,
                f"{name} is an internal {message.kind} of this system, sent only by its own"
                f" services: clients may submit {allowed}",
            )

    def _accept(
        self, message: Message, message_id: str | None = None, source: str = ""
    ) -> Envelope:
        """Envelope a message from outside, checked as a consumer will check it."""
        if source:
            if isinstance(message, Command):
                self.route(message.type_name())
        else:
            self.check_submittable(message)
        envelope = Envelope.wrap(message, source=source or CLIENT, message_id=message_id)
        # Constructing a struct in Python skips its constraints; decoding applies them.
        decode_in(self.registry, envelope)
        return envelope

    async def submit(
        self, bus: Backend | BrokerBus, message: Message, *, message_id: str | None = None
    ) -> Envelope:
        """Put one message from outside (CLI, HTTP, tests) onto the bus, durably.

        Raises :class:`InvalidMessage` (naming the field) and writes nothing when it is invalid,
        :class:`NotAcceptedFromClients` when clients may not submit its type (see ``accepts``).
        ``message_id`` is the client's own id, so that a retry is the same message: sent again
        with the same message, it is accepted once; with another message (type or body), the bus
        refuses it with :class:`DuplicateMessageId` where the bus is a database (SQLite,
        PostgreSQL). A broker cannot compare what it delivered long ago: there the consumers'
        inboxes take the first message under an id and acknowledge the others unhandled.
        """
        return (await self.submit_many(bus, [message], message_ids=[message_id]))[0]

    async def submit_many(
        self,
        bus: Backend | BrokerBus,
        messages: Sequence[Message],
        *,
        message_ids: Sequence[str | None] | None = None,
    ) -> list[Envelope]:
        """Submit many messages at once; nothing is written if one is invalid or refused."""
        ids = message_ids or [None] * len(messages)
        envelopes = [self._accept(m, i) for m, i in zip(messages, ids, strict=True)]
        await self._put(bus, envelopes, explicit_ids=message_ids is not None)
        return envelopes

    async def submit_internal(
        self,
        bus: Backend | BrokerBus,
        messages: Sequence[Message],
        *,
        source: str,
        message_ids: Sequence[str | None] | None = None,
    ) -> list[Envelope]:
        """Put messages on the bus as if ``source``, one of the system's services, sent them.

        For code inside the system's trust boundary (tests, an operator's tool that re-drives a
        saga); what faces clients calls :meth:`submit`. The messages are validated as by
        :meth:`submit`, but the client declaration (``accepts``) does not apply.
        """
        if source not in self.services:
            raise ConfigurationError(f"{source!r} is not a service of this system")
        ids = message_ids or [None] * len(messages)
        envelopes = [self._accept(m, i, source) for m, i in zip(messages, ids, strict=True)]
        await self._put(bus, envelopes, explicit_ids=message_ids is not None)
        return envelopes

    async def _put(
        self, bus: Backend | BrokerBus, envelopes: list[Envelope], *, explicit_ids: bool
    ) -> None:
        if explicit_ids:
            # Two messages under one id in one call: refused here, whatever the bus.
            first: dict[str, Envelope] = {}
            for envelope in envelopes:
                known = first.setdefault(envelope.message_id, envelope)
                if known.message_type != envelope.message_type or known.body != envelope.body:
                    raise DuplicateMessageId(envelope.message_id)
        publish = getattr(bus, "publish", None)
        if publish is not None:
            await publish(envelopes, self.routes)
        else:
            async with cast(Backend, bus).transaction() as tx:
                await tx.emit(envelopes, self.routes)


#: The source of messages submitted from outside the system (:meth:`System.submit`).
CLIENT = "client"


class _RetryBatch(Exception):
    """A handler failed in the fast pass: handle the batch again under savepoints."""


def _isolated(batch: Batch, suspects: Set[str]) -> list[Batch]:
    """``batch`` in parts, in order: each of ``suspects`` (handed out before since a broker
    delivered it again, and not completed) alone, as it may be what killed a consumer; the
    others together, as few parts as that allows."""
    parts: list[list[Delivery]] = [[]]
    for delivery in batch.deliveries:
        if delivery.envelope.message_id in suspects:
            parts += [[delivery], []]
        else:
            parts[-1].append(delivery)
    return [
        Batch(consumer=batch.consumer, deliveries=part, cursor=batch.cursor)
        for part in parts
        if part
    ]


class Worker:
    """One consumer loop: claim a batch, handle it in one transaction, repeat.

    With the bus in the store's database (``bus`` omitted), acknowledgements join the handling
    transaction. With a separate bus, outgoing messages go to the store's outbox and the batch is
    completed on the bus after the commit (a crash in between redelivers it; the inbox absorbs it).
    """

    def __init__(
        self,
        db: Backend,
        system: System,
        service: Service,
        spec: ConsumerSpec,
        *,
        member: str,
        batch_size: int = DEFAULT_BATCH,
        poll_interval: float = 0.1,
        bus: BrokerBus | None = None,
    ) -> None:
        self.db = db
        self.bus: Backend | BrokerBus = db if bus is None else bus
        self.broker = None if bus is None or cast(object, bus) is db else bus
        self.system = system
        self.service = service
        self.spec = spec
        self.member = member
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.handlers = (
            service.command_handlers if spec.source == "queue" else service.event_handlers
        )
        self.handled = 0
        #: A batch the store failed under, with the redeliveries counted for it, to give back.
        self._unreleased: tuple[Batch, list[str]] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; the batch in hand is finished first."""
        try:
            await self._loop(stop)
        finally:
            await self.bus.leave(self.spec, self.member)

    async def _loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                if self._unreleased is not None:
                    await self._release()
                progressed = await self.run_once()
                failures = 0
            except StoreUnavailable as exc:
                # Not a message's failure: what was claimed goes back uncounted once the store
                # answers again (see _release), and no message is dead-lettered for it.
                failures += 1
                log.warning(
                    "%s/%s: store unavailable, waiting for it (%d): %s",
                    self.spec.name,
                    self.spec.source,
                    failures,
                    exc,
                )
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                continue
            except Exception:
                # The store itself failed (locked past its timeout, disk full, ...): the batch
                # rolled back and stays claimable; wait a little, then go on.
                failures += 1
                log.exception("%s/%s: batch failed, retrying", self.spec.name, self.spec.source)
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                continue
            if not progressed:
                waiter = asyncio.ensure_future(stop.wait())
                work = asyncio.ensure_future(self.bus.wait_for_work(self.spec, self.poll_interval))
                await asyncio.wait({waiter, work}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                work.cancel()

    async def run_once(self) -> bool:
        """Claim and handle one batch; False when there was nothing to do.

        Raises :class:`StoreUnavailable` when the store failed under the batch; what it had not
        completed is then given back uncounted before the next claim (see :meth:`_release`).
        """
        batch = await self.bus.claim(self.spec, self.member, self.batch_size)
        if not batch.deliveries and batch.cursor is None:
            return False
        again = [d for d in batch.deliveries if d.attempt > 1]
        if self.broker is None or not again:
            try:
                await self._run(batch)
            except StoreUnavailable:
                self._unreleased = (batch, [])
                raise
        else:
            ids = list(dict.fromkeys(d.envelope.message_id for d in again))
            try:
                async with self.db.transaction() as tx:
                    earlier = await tx.handling_counts(self.spec.name, ids)
            except StoreUnavailable:
                self._unreleased = (batch, [])
                raise
            suspects = {m for m, n in zip(ids, earlier, strict=True) if n > 0}
            counted = set(ids)
            blocked: set[Any] = set()
            parts = _isolated(batch, suspects)
            for index, part in enumerate(parts):
                fresh = [d for d in part.deliveries if d.attempt > 1]
                taken: list[str] = []
                try:
                    await self._count_handlings(fresh)
                    taken = list(dict.fromkeys(d.envelope.message_id for d in fresh))
                    await self._run(part, counted, blocked)
                except StoreUnavailable:
                    rest = [d for later in parts[index:] for d in later.deliveries]
                    self._unreleased = (Batch(batch.consumer, rest, batch.cursor), taken)
                    raise
        self.handled += len(batch.deliveries)
        return True

    async def _release(self) -> None:
        """Give back, uncounted, what a batch the store failed under had not completed.

        The claim counted an attempt for each delivery, and a broker's redelivery was counted in
        the store before its handler ran; neither happened because of the message, so both are
        taken back: the deliveries come again in their order, as if never handed out.
        """
        assert self._unreleased is not None
        batch, taken = self._unreleased
        skipped = [(Outcome.SKIP, None)] * len(batch.deliveries)
        if self.broker is None:
            async with self.db.transaction() as tx:
                await self.db.settle(tx, batch, skipped)
        else:
            if taken:
                async with self.db.transaction() as tx:
                    await tx.handling_aborted(self.spec.name, taken)
            await self.broker.complete(batch, skipped)
        self._unreleased = None

    async def _run(
        self, batch: Batch, counted: Set[str] = frozenset(), blocked: set[Any] | None = None
    ) -> None:
        """Handle ``batch`` in one transaction; if that fails, message by message."""
        try:
            await self._handle(batch, careful=False, counted=counted, blocked=blocked)
        except (_RetryBatch, ConcurrencyError):
            # A handler failed, or the batch lost a race for a row at commit (another instance
            # changed it first): all of it rolled back. Again, message by message under
            # savepoints, on fresh reads; a message that conflicts again is retried later.
            await self._handle(batch, careful=True, counted=counted, blocked=blocked)

    async def _count_handlings(self, deliveries: Sequence[Delivery]) -> None:
        """Count, durably and before any handler runs, that messages a broker delivered again go
        to their handlers now; each one's attempt becomes that count.

        A broker counts a delivery for every message a consumer held when it died (a prefetch
        window, bundles), so its count cannot tell the message that killed the process from its
        innocent neighbours. Counted here just before its part of the batch runs, a message
        handed out again after a batch of it never completed goes alone (see :func:`_isolated`),
        and only one that keeps dying in its handler reaches the dead letters as one that never
        completes.
        """
        if not deliveries:
            return
        ids = [d.envelope.message_id for d in deliveries]
        async with self.db.transaction() as tx:
            counts = await tx.handling_started(self.spec.name, ids)
        for delivery, count in zip(deliveries, counts, strict=True):
            delivery.attempt = count

    async def _handle(
        self,
        batch: Batch,
        *,
        careful: bool,
        counted: Set[str] = frozenset(),
        blocked: set[Any] | None = None,
    ) -> None:
        spec = self.spec
        async with self.db.transaction() as tx:
            outcomes: list[tuple[Outcome, str | None]] = []
            outgoing: list[Envelope] = []
            # Keys held back by a retry, from the earlier parts of the claimed batch too.
            held: set[Any] = set() if blocked is None else set(blocked)
            # Fast pass: one inbox lookup and one inbox insert for the whole batch.
            duplicates: set[str] = set()
            processed: list[str] = []
            if not careful:
                duplicates = await tx.seen(
                    spec.name, [d.envelope.message_id for d in batch.deliveries]
                )
                reads = self._reads(batch, duplicates)
                if reads:
                    await tx.prefetch(reads)
            for delivery in batch.deliveries:
                if delivery.ordering_key in held:
                    outcomes.append((Outcome.SKIP, None))
                    continue
                result = await self._handle_one(
                    tx, delivery, outgoing, careful, duplicates, processed
                )
                if result[0] is Outcome.RETRY:
                    held.add(delivery.ordering_key)
                outcomes.append(result)
            if processed:
                await tx.record_inbox_many(spec.name, processed)
            for delivery, (outcome, _) in zip(batch.deliveries, outcomes, strict=True):
                message_id = delivery.envelope.message_id
                if message_id not in counted or delivery.attempt > DEAD_LETTERED:
                    continue
                if outcome is Outcome.ACK or outcome is Outcome.DEAD:
                    # A dead letter is marked as one: should the broker not have had its ack
                    # and deliver it again, it is acknowledged, not handled or dead-lettered
                    # twice.
                    await tx.handling_ended(
                        spec.name, message_id, dead_lettered=outcome is Outcome.DEAD
                    )
            if self.broker is not None:
                # A client's message came straight through the broker: no store emitted it, so
                # the store that handled it keeps it for the audit trail.
                received = list(
                    {
                        d.envelope.message_id: d.envelope
                        for d, (outcome, _) in zip(batch.deliveries, outcomes, strict=True)
                        if outcome is Outcome.ACK and d.envelope.source == CLIENT
                    }.values()
                )
                if received:
                    await tx.record_received(spec.name, received)
            crash_point("before-emit")
            await tx.emit(outgoing, self.system.routes)
            if self.broker is None:
                await self.db.settle(tx, batch, outcomes)
            crash_point("before-commit")
        crash_point("after-commit")
        if blocked is not None:
            blocked |= held
        if self.broker is not None:
            await self.broker.complete(batch, outcomes)
        if careful:
            for delivery, (outcome, error) in zip(batch.deliveries, outcomes, strict=True):
                if outcome is Outcome.RETRY:
                    log.warning(
                        "%s: %s %s failed (attempt %d), will retry: %s",
                        spec.name,
                        delivery.envelope.message_type,
                        delivery.envelope.message_id,
                        delivery.attempt,
                        error,
                    )

    def _reads(self, batch: Batch, duplicates: set[str]) -> Reads:
        """What the batch's handlers declared they will read."""
        reads = Reads()
        declared = self.service.reads
        if not declared:
            return reads
        for delivery in batch.deliveries:
            envelope = delivery.envelope
            declare = declared.get(envelope.message_type)
            if declare is None or envelope.message_id in duplicates:
                continue
            try:
                declare(self.system.decode(envelope), reads)
            except InvalidMessage:
                continue  # dead-lettered when its turn comes
            except Exception:
                # Declaring is an optimization: a faulty declaration costs its reads one round
                # trip each, never the message.
                log.warning(
                    "%s: declaring the reads of %s failed",
                    self.spec.name,
                    envelope.message_type,
                    exc_info=True,
                )
        return reads

    async def _handle_one(
        self,
        tx: StoreTransaction,
        delivery: Delivery,
        outgoing: list[Envelope],
        careful: bool,
        duplicates: set[str],
        processed: list[str],
    ) -> tuple[Outcome, str | None]:
        spec = self.spec
        envelope = delivery.envelope
        if delivery.attempt > DEAD_LETTERED:
            return Outcome.ACK, None  # in the dead letters already (see _count_handling)
        if delivery.attempt > spec.retry.max_attempts:
            reason = (
                f"handed to its handler {delivery.attempt - 1} times without completing"
                " (the consumer died while handling it)"
            )
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt - 1)
            return Outcome.DEAD, reason
        if envelope.defect is not None:
            await tx.dead_letter(spec.name, envelope, envelope.defect, delivery.attempt)
            return Outcome.DEAD, envelope.defect
        handler = self.handlers.get(envelope.message_type)
        if handler is None:
            reason = f"{spec.name} has no handler for {envelope.message_type}"
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        try:
            message = self.system.registry.decode(envelope.message_type, envelope.body)
            if self.broker is not None or envelope.source not in self.system.services:
                # Anyone may publish onto a broker, and anything may be published onto a
                # database bus as a client's message; what a service emitted into a database
                # bus was encoded by sagaline. A body sagaline wrote costs one encoding here;
                # one written by another producer is parsed again only if it differs from that.
                check_unique_keys(envelope.message_type, envelope.body, message)
        except InvalidMessage as exc:
            reason = f"invalid message: {exc.reason}"
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        if envelope.source == CLIENT and not self.system.accepts_from_clients(
            envelope.message_type
        ):
            # System.submit refuses these; one that comes anyway was put on the bus some other
            # way (straight onto a broker). A broker's source header is the publisher's word,
            # so this is a second line, not the boundary itself.
            kind = "command" if spec.source == "queue" else "event"
            reason = (
                f"internal {kind} {envelope.message_type} not accepted from clients"
                f" (source {CLIENT!r})"
            )
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        ctx = Context(tx, envelope, self.service.name, self.system.registry)
        if not careful:
            if envelope.message_id in duplicates:
                return Outcome.ACK, None
            try:
                await handler(ctx, message)
            except StoreUnavailable:
                raise
            except Exception as exc:
                raise _RetryBatch() from exc
            crash_point("after-handle")
            processed.append(envelope.message_id)
            # A second copy of it in this batch (a broker delivers a republished message as a
            # message of its own) is a duplicate like one handled in an earlier batch.
            duplicates.add(envelope.message_id)
            outgoing.extend(ctx.outgoing)
            return Outcome.ACK, None
        try:
            async with tx.savepoint():
                if await tx.record_inbox(spec.name, envelope.message_id):
                    await handler(ctx, message)
        except StoreUnavailable:
            raise
        except NonRetryableError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if delivery.attempt >= spec.retry.max_attempts:
                await tx.dead_letter(
                    spec.name,
                    envelope,
                    f"failed {delivery.attempt} times; last error: {reason}",
                    delivery.attempt,
                )
                return Outcome.DEAD, reason
            return Outcome.RETRY, reason
        outgoing.extend(ctx.outgoing)
        return Outcome.ACK, None


class Runtime:
    """Runs the workers of a set of services in this process against one store (and bus).

    Without ``bus`` the store's database is the bus too. With a separate ``bus``, the store must be
    opened in outbox mode; the runtime declares the system's topology on the bus and runs the
    outbox relay beside the workers.
    """

    def __init__(
        self,
        db: Backend,
        system: System,
        services: Iterable[str] | None = None,
        *,
        bus: BrokerBus | None = None,
        member: str | None = None,
        batch_size: int = DEFAULT_BATCH,
        poll_interval: float = 0.1,
    ) -> None:
        self.db = db
        self.bus = None if bus is None or cast(object, bus) is db else bus
        self.system = system
        self.member = member or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        names = list(services) if services is not None else list(system.services)
        self.workers = [
            Worker(
                db,
                system,
                system.services[name],
                spec,
                member=self.member,
                batch_size=batch_size,
                poll_interval=poll_interval,
                bus=self.bus,
            )
            for name in names
            for spec in system.services[name].consumers()
        ]
        self.relay: Relay | None = None
        if self.bus is not None:
            if not isinstance(db, Outbox) or not getattr(db, "outbox", False):
                raise ConfigurationError(
                    "a store used with a separate bus must be opened in outbox mode"
                )
            self.relay = Relay(db, self.bus, system.routes, owner=self.member)
        self.stop_event = asyncio.Event()
        self._relay_stop = asyncio.Event()

    async def run(self) -> None:
        """Run every worker until :meth:`stop`; in-flight batches finish first."""
        start_checkpointer = getattr(self.db, "start_checkpointer", None)
        if start_checkpointer is not None:
            start_checkpointer()
        if self.bus is not None:
            consumers = [
                spec for service in self.system.services.values() for spec in service.consumers()
            ]
            await self.bus.prepare(consumers, self.system.routes)
        runs = [worker.run(self.stop_event) for worker in self.workers]
        tasks = [asyncio.create_task(run) for run in runs]
        relay = None
        if self.relay is not None:
            relay = asyncio.create_task(self.relay.run(self._relay_stop))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if relay is not None:
                # The workers are done: the relay publishes what they emitted last, then stops.
                self._relay_stop.set()
                await relay

    def stop(self) -> None:
        """Ask every worker to finish its batch and return."""
        self.stop_event.set()

    async def run_until(
        self, done: Callable[[], bool], *, check_every: float = 0.05, timeout: float = 300.0
    ) -> None:
        """Run until ``done()`` is true (checked between batches), then stop."""
        runner = asyncio.create_task(self.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not done():
                if runner.done():
                    runner.result()
                if loop.time() > deadline:
                    raise TimeoutError(f"not done after {timeout} seconds")
                await asyncio.sleep(check_every)
        finally:
            self.stop()
            await runner

    @property
    def handled(self) -> int:
        """Deliveries handled by this runtime's workers."""
        return sum(worker.handled for worker in self.workers)
