"""Services and what their handlers see: the handlers a service registers, the context of one
message's handling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sagaline.aggregate import Aggregate
from sagaline.messages import Command, Envelope, Event, Message, MessageRegistry, idempotency_key_of
from sagaline.ports import ConsumerSpec, Reads, RetryPolicy, StoreTransaction

if TYPE_CHECKING:
    from sagaline.saga.definition import SagaDefinition

__all__ = ["Context", "Handler", "ReadsOf", "Service", "decode_in"]

A = TypeVar("A", bound=Aggregate)
Handler = Callable[["Context", Any], Awaitable[None]]
#: Declares what handling one message will read: called with the message and the batch's Reads.
ReadsOf = Callable[[Any, Reads], None]


def decode_in(registry: MessageRegistry | None, envelope: Envelope) -> Message:
    """``envelope``'s message, decoded as ``registry``'s class of its type when it knows it."""
    if registry is not None and envelope.message_type in registry:
        return envelope.decode(registry)
    return envelope.decode()


class Context:
    """What a handler sees: the incoming message's metadata, its store transaction, its outbox."""

    __slots__ = ("cancelled", "envelope", "outgoing", "registry", "service", "timers", "tx")

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
        #: Timers this unit sets: (timer id, the message it fires, seconds from now).
        self.timers: list[tuple[str, Envelope, float]] = []
        #: Ids of the timers this unit cancels.
        self.cancelled: list[str] = []

    @property
    def idempotency_key(self) -> str:
        """The key of the work the message asks for: the same for every try of one saga step
        (its command is sent again with a new message id), else the message id. A handler that
        calls an outside provider passes it along, so a step tried again is done once."""
        return idempotency_key_of(self.envelope.message_id)

    def send(self, command: Command, *, message_id: str | None = None) -> Envelope:
        """Send a command, caused by the message being handled, once this unit commits
        (``message_id``: its id, when the sender makes one that a redo must repeat)."""
        envelope = Envelope.wrap(
            command, causation=self.envelope, source=self.service, message_id=message_id
        )
        self.outgoing.append(envelope)
        return envelope

    def schedule(
        self, message: Message, *, after: float, timer_id: str, message_id: str | None = None
    ) -> Envelope:
        """Set timer ``timer_id``: ``message`` goes out ``after`` seconds from now (read from
        the store's clock), through the usual path, once. The timer is durable once this unit
        commits; setting an id already set moves it."""
        envelope = Envelope.wrap(
            message, causation=self.envelope, source=self.service, message_id=message_id
        )
        self.timers.append((timer_id, envelope, after))
        return envelope

    def cancel(self, timer_id: str) -> None:
        """Cancel timer ``timer_id`` (nothing if it fired or was never set), once this unit
        commits."""
        self.cancelled.append(timer_id)

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
    #: Whether it sends its sagas' commands (an orchestrator) or only follows them (a monitor).
    drives_sagas: bool = False

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
