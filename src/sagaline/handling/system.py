"""A system: its services, the routing of commands to their queues, and what clients may submit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sagaline.errors import ConfigurationError, DuplicateMessageId, NotAcceptedFromClients
from sagaline.handling.service import Service, decode_in
from sagaline.messages import Command, Envelope, Message, MessageRegistry, registry
from sagaline.ports import Backend, BrokerBus

if TYPE_CHECKING:
    from sagaline.saga.definition import SagaDefinition

__all__ = ["CLIENT", "System"]


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
        # Constructing a struct in Python skips its constraints (and the body's size); decoding
        # the body applies them. The envelope's cached message is not a check: decode afresh.
        types = self.registry if envelope.message_type in self.registry else registry
        types.decode(envelope.message_type, envelope.body)
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
        await bus.publish(envelopes, self.routes)


#: The source of messages submitted from outside the system (:meth:`System.submit`).
CLIENT = "client"
