"""CQRS read side: projections that keep materialized views, and their rebuild from the log.

A live projection is a subscriber like any other: its view change, its inbox mark and its
subscription cursor (the checkpoint) commit in one transaction. A rebuild replays the retained
event log into a shadow namespace while queries go on against the live one, then swaps them and
moves the checkpoint in one transaction. Projection handlers set state from the event, so a
replayed event leaves the view as it was.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sagaline.handling import Context, Service
from sagaline.messages import Envelope, Event, MessageRegistry
from sagaline.ports import BrokerBus, Database, Reads, StoredEvent, StoreTransaction

__all__ = ["Projection", "Views", "rebuild"]

ProjectionHandler = Callable[["Views", Any, Envelope], Awaitable[None]]


class Views:
    """The documents of one view namespace, inside a transaction."""

    def __init__(self, tx: StoreTransaction, namespace: str) -> None:
        self.tx = tx
        self.namespace = namespace
        self._versions: dict[str, int] = {}

    async def get(self, key: str) -> dict[str, Any] | None:
        """One row of the view, or None."""
        document = await self.tx.get_document(self.namespace, key)
        if document is None:
            self._versions[key] = 0
            return None
        self._versions[key] = document.version
        return dict(document.data)

    async def put(self, key: str, data: dict[str, Any]) -> None:
        """Write one row of the view (read it first with :meth:`get`)."""
        if key not in self._versions:
            await self.get(key)
        self._versions[key] = await self.tx.put_document(
            self.namespace, key, data, self._versions[key]
        )


class Projection:
    """A named projection: event handlers that maintain one view namespace."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self.handlers: dict[str, ProjectionHandler] = {}
        self.keys: dict[str, Callable[[Any], Iterable[str]]] = {}
        #: The event classes it handles, by wire name (a rebuild decodes the log with them).
        self.registry = MessageRegistry()

    def on(
        self, *types: type[Event], keys: Callable[[Any], Iterable[str]] | None = None
    ) -> Callable[[ProjectionHandler], ProjectionHandler]:
        """Register a handler for one or more event types.

        ``keys(event)`` may name the view rows the handler reads, so that a networked store loads
        them for a whole batch of events in one round trip.
        """

        def register(handler: ProjectionHandler) -> ProjectionHandler:
            for cls in types:
                self.handlers[cls.type_name()] = handler
                self.registry.register(cls)
                if keys is not None:
                    self.keys[cls.type_name()] = keys
            return handler

        return register

    def service(self) -> Service:
        """The projection as a service subscribed to its events."""
        service = Service(self.name)

        async def handle(ctx: Context, event: Any) -> None:
            await self.handlers[ctx.envelope.message_type](
                Views(ctx.tx, self.namespace), event, ctx.envelope
            )

        def reads(event: Any, batch: Reads) -> None:
            for key in self.keys[event.wire_name](event):
                batch.document(self.namespace, key)

        for type_name in self.handlers:
            service.event_handlers[type_name] = handle
            service.types[type_name] = self.registry.get(type_name)
            if type_name in self.keys:
                service.reads[type_name] = reads
        return service

    async def apply(self, views: Views, envelope: Envelope) -> bool:
        """Apply one logged event to ``views``; False when the projection ignores its type."""
        handler = self.handlers.get(envelope.message_type)
        if handler is None:
            return False
        await handler(views, envelope.decode(self.registry), envelope)
        return True


async def rebuild(
    db: Database,
    projection: Projection,
    *,
    bus: BrokerBus | None = None,
    swap: bool = True,
    page: int = 2000,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Replay the whole event log into a fresh copy of the view.

    With ``swap`` the copy replaces the live view in one transaction, and the projection goes on
    from where the replay ended: with the bus in the store's database its cursor moves there;
    with a separate ``bus`` (replayed through :meth:`BrokerBus.replay`) every replayed event is
    marked in the projection's inbox, so its live delivery is not applied twice. Returns the
    namespace that holds the result.
    """
    shadow = f"{projection.namespace}.rebuild"
    async with db.transaction() as tx:
        await tx.delete_namespace(shadow)
    head = await db.head_position() if bus is None else 0
    position = 0
    replayed: list[str] = []

    async def replay_page(tx: StoreTransaction, after: int) -> list[StoredEvent]:
        if bus is None:
            return await db.read_log(after, page)
        events = []
        async for stored in bus.replay(after):
            events.append(stored)
            if len(events) >= page:
                break
        return events

    async def apply(tx: StoreTransaction, events: list[StoredEvent]) -> None:
        views = Views(tx, shadow)
        for stored in events:
            if await projection.apply(views, stored.envelope) and bus is not None:
                replayed.append(stored.envelope.message_id)

    while True:
        async with db.transaction() as tx:
            events = await replay_page(tx, position)
            if not events:
                break
            await apply(tx, events)
        position = events[-1].position
        if progress is not None:
            progress(position, max(head, position))
    if not swap:
        return shadow
    async with db.transaction() as tx:
        # Catch up with what was published meanwhile; this transaction holds the live
        # projection off until the swap commits.
        while events := await replay_page(tx, position):
            await apply(tx, events)
            position = events[-1].position
        await tx.delete_namespace(projection.namespace)
        db.rename_namespace(shadow, projection.namespace)
        if bus is None:
            db.reset_subscription(projection.name, position)
        else:
            fresh = [m for m in replayed if m not in await tx.seen(projection.name, replayed)]
            await tx.record_inbox_many(projection.name, fresh)
    return projection.namespace
