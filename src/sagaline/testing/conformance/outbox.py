"""The Outbox port's conformance suite: a store in outbox mode, and the relay that empties it.

A store joins by subclassing :class:`OutboxConformance` and providing the ``make_outbox_store``
fixture: a factory that opens the store in outbox mode on the test's own storage (another handle
on it at each call), with an optional relay lease (``make_outbox_store(lease_seconds=0.5)``),
and closes what it opened when the test ends. The relay publishes to a bus of the suite's own
(:class:`RecordingBus`), which keeps what it was given and can refuse a message or fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Protocol

import pytest

from sagaline.errors import InvalidMessage
from sagaline.messages import Envelope
from sagaline.ports import Batch, ConsumerSpec, Outbox, Outcome, StoredEvent
from sagaline.relay import Relay
from sagaline.testing.conformance.adapters import InspectableOutboxStore
from sagaline.testing.conformance.messages import (
    ConformanceCommand,
    ConformanceEvent,
    events,
)

__all__ = ["OpenOutboxStore", "OutboxConformance", "RecordingBus"]

#: The routes of the suite's messages: its commands go to the queue ``alpha``.
ROUTES: Mapping[str, str] = {ConformanceCommand.type_name(): "alpha"}


class OpenOutboxStore(Protocol):
    """Opens the test's store in outbox mode (another handle on the same storage at each call)."""

    def __call__(self, *, lease_seconds: float | None = None) -> InspectableOutboxStore: ...


class RecordingBus:
    """A bus that keeps what it is given to publish, in order, and confirms it at once.

    It refuses for good (:class:`InvalidMessage`) the message ids in ``refused``, and fails (as an
    unreachable bus does) the next ``outages`` publications.
    """

    url = "recording://"

    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.publications = 0
        self.refused: set[str] = set()
        self.outages = 0

    async def open(self) -> None:
        """Nothing to connect."""

    @property
    def max_payload(self) -> None:
        return None

    def database(self) -> None:
        """Not a database."""
        return None

    async def publish(self, envelopes: Sequence[Envelope], routes: Mapping[str, str]) -> None:
        """Keep ``envelopes``, all or none (a refused one or an outage fails the whole call)."""
        self.publications += 1
        if self.outages:
            self.outages -= 1
            raise ConnectionError("the bus is unreachable")
        for envelope in envelopes:
            if envelope.message_id in self.refused:
                raise InvalidMessage(f"{envelope.message_id} is refused by this bus")
        self.published.extend(envelopes)

    async def prepare(self, consumers: Sequence[ConsumerSpec], routes: Mapping[str, str]) -> None:
        """Nothing to declare."""

    async def claim(self, consumer: ConsumerSpec, member: str, limit: int) -> Batch:
        """Nothing is delivered: the suite only publishes."""
        return Batch(consumer=consumer, deliveries=[])

    async def complete(self, batch: Batch, outcomes: Sequence[tuple[Outcome, str | None]]) -> None:
        """Nothing to settle."""

    async def leave(self, consumer: ConsumerSpec, member: str) -> None:
        """Nothing is held."""

    async def wait_for_work(self, consumer: ConsumerSpec, timeout: float) -> None:
        """There is never work."""

    async def replay(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """The suite replays nothing."""
        nothing: list[StoredEvent] = []
        for stored in nothing:
            yield stored

    async def close(self) -> None:
        """Nothing to release."""


def _ids(envelopes: Sequence[Envelope]) -> list[str]:
    return [envelope.message_id for envelope in envelopes]


async def _emit_some(store: InspectableOutboxStore, key: str) -> list[Envelope]:
    """One unit of work that appends two events to a stream and emits a command and an event;
    the four envelopes in the order the unit wrote them."""
    appended = events(key, 1, 2)
    command = Envelope.wrap(ConformanceCommand(key=key, seq=3))
    event = Envelope.wrap(ConformanceEvent(key=key, seq=4))
    async with store.transaction() as tx:
        await tx.append(f"Stream-{key}", 0, appended)
        await tx.emit([command], ROUTES)
        await tx.emit([event], ROUTES)
    return [*appended, command, event]


async def _drain(relay: Relay) -> None:
    while await relay.publish_once():
        pass


class Boom(Exception):
    """Raised inside a unit of work to roll it back."""


class OutboxConformance:
    """Behaviour every store in outbox mode must show. Subclass it and provide
    ``make_outbox_store``."""

    @pytest.fixture
    def make_outbox_store(
        self, *args: Any, **kwargs: Any
    ) -> OpenOutboxStore | Iterator[OpenOutboxStore]:
        """Opens the store in outbox mode on the test's own storage."""
        raise NotImplementedError("a backend's test class provides make_outbox_store")

    @pytest.fixture
    def store(self, make_outbox_store: OpenOutboxStore) -> InspectableOutboxStore:
        """One handle on the test's store, in outbox mode."""
        return make_outbox_store()

    def test_it_implements_the_outbox_port(self, store: InspectableOutboxStore) -> None:
        assert isinstance(store, Outbox)

    def test_what_a_unit_of_work_emits_waits_in_the_outbox_in_order(
        self, store: InspectableOutboxStore
    ) -> None:
        async def scenario() -> None:
            waiting = asyncio.create_task(store.wait_for_outbox(30.0))
            await asyncio.sleep(0)
            written = await _emit_some(store, "K-1")
            # The commit wakes a relay waiting for work (well before its timeout).
            await asyncio.wait_for(waiting, 10.0)
            # Nothing reached a bus in the store's database: everything waits in the outbox.
            assert await store.pending_counts() == {}
            assert [e.stream for e in await store.read_log()] == ["Stream-K-1", "Stream-K-1"]
            entries = await store.outbox_claim("relay-1", 10)
            assert [e.id for e in entries] == sorted({e.id for e in entries})
            assert _ids([e.envelope for e in entries]) == _ids(written)
            assert [e.envelope.body for e in entries] == [e.body for e in written]

        asyncio.run(scenario())

    def test_a_unit_of_work_rolled_back_leaves_nothing_in_the_outbox(
        self, store: InspectableOutboxStore
    ) -> None:
        async def scenario() -> None:
            with pytest.raises(Boom):
                async with store.transaction() as tx:
                    await tx.append("Stream-1", 0, events("K-1", 1))
                    await tx.emit([Envelope.wrap(ConformanceEvent(key="K-1", seq=2))], ROUTES)
                    raise Boom
            assert await store.outbox_claim("relay-1", 10) == []

        asyncio.run(scenario())

    def test_one_relay_at_a_time_holds_the_outbox_until_its_lease_expires(
        self, make_outbox_store: OpenOutboxStore
    ) -> None:
        lease = 0.5

        async def scenario() -> None:
            store, other_handle = make_outbox_store(lease_seconds=lease), make_outbox_store()
            written = await _emit_some(store, "K-1")
            entries = await store.outbox_claim("relay-1", 2)
            assert _ids([e.envelope for e in entries]) == _ids(written[:2])
            # The other relay gets nothing while the lease holds, from either handle.
            assert await store.outbox_claim("relay-2", 10) == []
            assert await other_handle.outbox_claim("relay-2", 10) == []
            await store.outbox_sent([e.id for e in entries])
            again = await store.outbox_claim("relay-1", 10)
            assert _ids([e.envelope for e in again]) == _ids(written[2:])
            await store.outbox_sent([e.id for e in again])
            assert await store.outbox_claim("relay-1", 10) == []
            # A relay that died holds the lease no longer once it expires: another takes over.
            later = Envelope.wrap(ConformanceEvent(key="K-2", seq=5))
            async with store.transaction() as tx:
                await tx.emit([later], ROUTES)
            await asyncio.sleep(lease * 1.5)
            taken = await store.outbox_claim("relay-2", 10)
            assert _ids([e.envelope for e in taken]) == [later.message_id]

        asyncio.run(scenario())

    def test_a_relay_that_stops_gives_its_lease_up(
        self, make_outbox_store: OpenOutboxStore
    ) -> None:
        """A relay stopped on purpose lets the next one publish at once (a lease of an hour
        would otherwise hold it back); a relay that does not hold the lease gives nothing up."""

        async def scenario() -> None:
            store = make_outbox_store(lease_seconds=3600)
            written = await _emit_some(store, "K-1")
            stop = asyncio.Event()
            stop.set()
            first = RecordingBus()
            await Relay(store, first, ROUTES, owner="relay-1").run(stop)
            assert _ids(first.published) == _ids(written)
            later = Envelope.wrap(ConformanceEvent(key="K-2", seq=5))
            async with store.transaction() as tx:
                await tx.emit([later], ROUTES)
            taken = await store.outbox_claim("relay-2", 10)
            assert _ids([e.envelope for e in taken]) == [later.message_id]
            await store.outbox_release("relay-1")  # not its lease any more: nothing changes
            assert await store.outbox_claim("relay-3", 10) == []

        asyncio.run(scenario())

    def test_the_relay_publishes_every_entry_once_in_order_and_marks_it_sent(
        self, store: InspectableOutboxStore
    ) -> None:
        async def scenario() -> None:
            bus = RecordingBus()
            relay = Relay(store, bus, ROUTES, owner="relay-1", batch_size=3)
            written = await _emit_some(store, "K-1") + await _emit_some(store, "K-2")
            await _drain(relay)
            assert _ids(bus.published) == _ids(written)
            assert relay.published == len(written)
            # Marked sent: neither this relay nor a later one publishes them again.
            await _drain(relay)
            await _drain(Relay(store, bus, ROUTES, owner="relay-1"))
            assert _ids(bus.published) == _ids(written)
            assert await store.outbox_claim("relay-1", 10) == []

        asyncio.run(scenario())

    def test_what_a_failed_publication_held_is_published_on_the_next_try(
        self, store: InspectableOutboxStore
    ) -> None:
        async def scenario() -> None:
            bus = RecordingBus()
            relay = Relay(store, bus, ROUTES, owner="relay-1")
            written = await _emit_some(store, "K-1")
            bus.outages = 1
            with pytest.raises(ConnectionError):
                await relay.publish_once()
            assert bus.published == []
            await _drain(relay)
            assert _ids(bus.published) == _ids(written)

        asyncio.run(scenario())

    def test_an_entry_the_bus_refuses_is_set_aside_and_the_rest_goes_on_in_order(
        self, store: InspectableOutboxStore
    ) -> None:
        async def scenario() -> None:
            bus = RecordingBus()
            relay = Relay(store, bus, ROUTES, owner="relay-1")
            written = await _emit_some(store, "K-1")
            refused = written[2]
            bus.refused.add(refused.message_id)
            await _drain(relay)
            assert _ids(bus.published) == _ids([e for e in written if e is not refused])
            [dead] = await store.dead_letters()
            assert (dead.consumer, dead.envelope.message_id) == ("outbox", refused.message_id)
            assert dead.envelope.body == refused.body
            assert "refused by the bus" in dead.reason and refused.message_id in dead.reason
            # Set aside, not published again; later entries are not held up behind it.
            later = await _emit_some(store, "K-2")
            await _drain(relay)
            assert _ids(bus.published) == _ids([e for e in written if e is not refused] + later)
            assert len(await store.dead_letters()) == 1

        asyncio.run(scenario())
