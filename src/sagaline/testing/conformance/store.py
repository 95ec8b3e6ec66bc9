"""The Store port's conformance suite: written once, subclassed per backend.

A backend joins by subclassing :class:`StoreConformance` and providing the ``make_store``
fixture: a factory that opens a store on the test's own storage; every call opens another
handle (connection) on the same storage. It closes what it opened when the test ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from sagaline.errors import ConcurrencyError
from sagaline.messages import Envelope
from sagaline.ports import DEAD_LETTERED, SagaRecord, Store
from sagaline.testing.conformance.adapters import InspectableStore
from sagaline.testing.conformance.messages import ConformanceStoreEvent, events

__all__ = ["Boom", "OpenStore", "StoreConformance", "saga"]

#: Opens one more handle on the test's store.
OpenStore = Callable[[], InspectableStore]


def saga(saga_id: str, status: str = "RUNNING", step: int = 0) -> SagaRecord:
    """A saga record of the definition ``store-test`` (version 3), with money in its data."""
    return SagaRecord(
        saga_id=saga_id,
        definition="store-test",
        definition_version=3,
        status=status,
        step=step,
        data={"key": saga_id, "amount": Decimal("75.50"), "items": [{"q": 1}]},
        history=[],
    )


class Boom(Exception):
    """Raised inside a transaction to roll it back."""


class StoreConformance:
    """Behaviour every Store adapter must show. Subclass it and provide ``make_store``."""

    @pytest.fixture
    def make_store(self, *args: Any, **kwargs: Any) -> OpenStore | Iterator[OpenStore]:
        """Opens a store on the test's own storage; another call, another handle on it."""
        raise NotImplementedError("a backend's test class provides make_store")

    @pytest.fixture
    def store(self, make_store: OpenStore) -> InspectableStore:
        """One handle on the test's store."""
        return make_store()

    def test_it_implements_the_store_port(self, store: InspectableStore) -> None:
        assert isinstance(store, Store)

    # ---------------------------------------------------------------- streams

    def test_append_at_the_expected_version_and_read_the_stream_in_order(
        self, store: InspectableStore
    ) -> None:
        async def scenario() -> None:
            first, second = events("S-1", 1, 2), events("S-1", 3)
            async with store.transaction() as tx:
                assert await tx.append("Stream-1", 0, first) == 2
                assert await tx.append("Other-1", 0, events("S-2", 9)) == 1
            async with store.transaction() as tx:
                assert await tx.append("Stream-1", 2, second) == 3
                stored = await tx.read_stream("Stream-1")
            assert [e.version for e in stored] == [1, 2, 3]
            assert [e.stream for e in stored] == ["Stream-1"] * 3
            assert [e.envelope.message_id for e in stored] == [e.message_id for e in first + second]
            assert [e.envelope.body for e in stored] == [e.body for e in first + second]
            assert [e.envelope.decode() for e in stored] == [
                ConformanceStoreEvent(key="S-1", seq=s) for s in (1, 2, 3)
            ]
            async with store.transaction() as tx:
                assert await tx.read_stream("Nobody-1") == []

        asyncio.run(scenario())

    def test_a_stale_expected_version_raises_and_appends_nothing(
        self, store: InspectableStore
    ) -> None:
        async def scenario() -> None:
            async with store.transaction() as tx:
                await tx.append("Stream-1", 0, events("S-1", 1, 2))
            for stale in (0, 1):
                with pytest.raises(ConcurrencyError):
                    async with store.transaction() as tx:
                        await tx.append("Stream-1", stale, events("S-1", 99, 100))
            async with store.transaction() as tx:
                stored = await tx.read_stream("Stream-1")
            assert [e.envelope.decode() for e in stored] == [
                ConformanceStoreEvent(key="S-1", seq=seq) for seq in (1, 2)
            ]
            assert len(await store.read_log()) == 2

        asyncio.run(scenario())

    def test_log_positions_increase_with_no_gap(self, store: InspectableStore) -> None:
        async def scenario() -> None:
            written: list[str] = []
            for round_ in range(5):
                batch = events(f"S-{round_}", 1, 2, 3)
                async with store.transaction() as tx:
                    await tx.append(f"Stream-{round_}", 0, batch[:2])
                    await tx.emit(batch[2:], {})
                written += [e.message_id for e in batch]
                # Rolled back and refused appends must not leave holes behind.
                with pytest.raises(Boom):
                    async with store.transaction() as tx:
                        await tx.append(f"Lost-{round_}", 0, events("S-x", 1, 2))
                        raise Boom
                with pytest.raises(ConcurrencyError):
                    async with store.transaction() as tx:
                        await tx.append(f"Stream-{round_}", 1, events("S-x", 1))
            log = await store.read_log(0, 1000)
            positions = [e.position for e in log]
            assert [e.envelope.message_id for e in log] == written
            assert positions == list(range(positions[0], positions[0] + len(written)))

        asyncio.run(scenario())

    # -------------------------------------------------------------- documents

    def test_documents_are_versioned(self, store: InspectableStore) -> None:
        async def scenario() -> None:
            async with store.transaction() as tx:
                assert await tx.get_document("ns", "k") is None
                assert await tx.put_document("ns", "k", {"n": 1}, 0) == 1
            async with store.transaction() as tx:
                document = await tx.get_document("ns", "k")
                assert document is not None
                assert (document.data, document.version) == ({"n": 1}, 1)
                assert await tx.put_document("ns", "k", {"n": 2}, 1) == 2
            for stale in (0, 1, 3):
                with pytest.raises(ConcurrencyError):
                    async with store.transaction() as tx:
                        await tx.put_document("ns", "k", {"n": 99}, stale)
            async with store.transaction() as tx:
                document = await tx.get_document("ns", "k")
                assert document is not None
                assert (document.data, document.version) == ({"n": 2}, 2)
                # Namespaces are apart.
                assert await tx.get_document("other", "k") is None

        asyncio.run(scenario())

    def test_documents_keep_money_exact(self, store: InspectableStore) -> None:
        async def scenario() -> None:
            data = {"amount": Decimal("75.50"), "tiny": Decimal("0.0001"), "n": 3, "s": "x"}
            async with store.transaction() as tx:
                await tx.put_document("ns", "money", data, 0)
            async with store.transaction() as tx:
                document = await tx.get_document("ns", "money")
            assert document is not None
            assert document.data == data
            assert str(document.data["amount"]) == "75.50"
            assert isinstance(document.data["n"], int)

        asyncio.run(scenario())

    def test_delete_namespace_removes_only_that_namespace(self, store: InspectableStore) -> None:
        async def scenario() -> None:
            async with store.transaction() as tx:
                for key in ("a", "b"):
                    await tx.put_document("gone", key, {"k": key}, 0)
                await tx.put_document("kept", "a", {"k": "a"}, 0)
            async with store.transaction() as tx:
                await tx.delete_namespace("gone")
            async with store.transaction() as tx:
                assert await tx.get_document("gone", "a") is None
                assert await tx.get_document("gone", "b") is None
                assert await tx.get_document("kept", "a") is not None

        asyncio.run(scenario())

    # ------------------------------------------------------------------ sagas

    def test_sagas_are_versioned(self, store: InspectableStore) -> None:
        async def scenario() -> None:
            record = saga("store-test:K-1")
            async with store.transaction() as tx:
                assert await tx.get_saga("store-test:K-1") is None
                await tx.put_saga(record)
            assert record.version == 1
            async with store.transaction() as tx:
                loaded = await tx.get_saga("store-test:K-1")
            assert loaded is not None
            assert (loaded.definition, loaded.definition_version) == ("store-test", 3)
            assert (loaded.status, loaded.step, loaded.version) == ("RUNNING", 0, 1)
            assert loaded.data == record.data
            assert str(loaded.data["amount"]) == "75.50"
            assert loaded.created_at

            loaded.step = 1
            loaded.data = {**loaded.data, "reserved": True}
            async with store.transaction() as tx:
                await tx.put_saga(loaded)
            assert loaded.version == 2
            async with store.transaction() as tx:
                again = await tx.get_saga("store-test:K-1")
            assert again is not None
            assert (again.step, again.version, again.data["reserved"]) == (1, 2, True)

            with pytest.raises(ConcurrencyError):
                async with store.transaction() as tx:
                    await tx.put_saga(saga("store-test:K-1"))  # a second instance of one id

        asyncio.run(scenario())

    @pytest.mark.parametrize(
        "status",
        [
            pytest.param("RUNNING", id="same-status"),
            pytest.param("COMPENSATING", id="changed-status"),
        ],
    )
    def test_a_stale_saga_write_raises(self, store: InspectableStore, status: str) -> None:
        async def scenario() -> None:
            async with store.transaction() as tx:
                await tx.put_saga(saga("store-test:K-2"))
            async with store.transaction() as tx:
                winner = await tx.get_saga("store-test:K-2")
                loser = await tx.get_saga("store-test:K-2")
            assert winner is not None and loser is not None
            winner.step = 1
            async with store.transaction() as tx:
                await tx.put_saga(winner)
            # The loser read version 1 too; its write must not land on version 2.
            loser.step = 2
            loser.status = status
            with pytest.raises(ConcurrencyError):
                async with store.transaction() as tx:
                    await tx.put_saga(loser)
            async with store.transaction() as tx:
                current = await tx.get_saga("store-test:K-2")
            assert current is not None
            assert (current.status, current.step, current.version) == ("RUNNING", 1, 2)

        asyncio.run(scenario())

    # ------------------------------------------------------------------ inbox

    def test_the_inbox_marks_a_message_once_per_consumer(self, store: InspectableStore) -> None:
        async def scenario() -> None:
            async with store.transaction() as tx:
                assert await tx.record_inbox("consumer-a", "m-1") is True
                assert await tx.record_inbox("consumer-a", "m-1") is False
            async with store.transaction() as tx:
                assert await tx.record_inbox("consumer-a", "m-1") is False
                assert await tx.record_inbox("consumer-b", "m-1") is True
                assert await tx.record_inbox("consumer-a", "m-2") is True

        asyncio.run(scenario())

    def test_handlings_of_a_message_received_again_are_counted_until_it_settles(
        self, store: InspectableStore
    ) -> None:
        async def scenario() -> None:
            async with store.transaction() as tx:
                assert await tx.handling_started("consumer-a", ["m-1", "m-2", "m-1"]) == [1, 1, 1]
            async with store.transaction() as tx:
                assert await tx.handling_started("consumer-a", ["m-1"]) == [2]
                assert await tx.handling_started("consumer-b", ["m-1"]) == [1]
            with pytest.raises(Boom):  # a count rolled back does not count
                async with store.transaction() as tx:
                    assert await tx.handling_started("consumer-a", ["m-1"]) == [3]
                    raise Boom
            async with store.transaction() as tx:
                assert await tx.handling_counts("consumer-a", ["m-2", "m-1", "m-9"]) == [1, 2, 0]
                assert await tx.handling_started("consumer-a", ["m-1"]) == [3]
                await tx.handling_ended("consumer-a", "m-1")
            async with store.transaction() as tx:
                assert await tx.handling_started("consumer-a", ["m-1"]) == [1]
                assert await tx.handling_started("consumer-b", ["m-1"]) == [2]
                await tx.handling_ended("consumer-b", "m-1", dead_lettered=True)
            async with store.transaction() as tx:  # a dead letter stays known as one
                [count] = await tx.handling_started("consumer-b", ["m-1"])
                assert count > DEAD_LETTERED

        asyncio.run(scenario())

    # ------------------------------------------------------------ atomicity

    def test_a_transaction_that_raises_leaves_nothing_behind(self, store: InspectableStore) -> None:
        async def scenario() -> None:
            # Routed to a queue, an envelope is written as a command.
            command = Envelope.wrap(ConformanceStoreEvent(key="K-1", seq=5))
            with pytest.raises(Boom):
                async with store.transaction() as tx:
                    await tx.append("Stream-1", 0, events("K-1", 1))
                    await tx.emit(events("K-1", 2), {})
                    await tx.emit([command], {"ConformanceStoreEvent": "somewhere"})
                    await tx.put_document("ns", "k", {"n": 1}, 0)
                    await tx.put_saga(saga("store-test:K-3"))
                    assert await tx.record_inbox("consumer", "m-1")
                    await tx.dead_letter("consumer", command, "no reason", 1)
                    raise Boom
            async with store.transaction() as tx:
                assert await tx.read_stream("Stream-1") == []
                assert await tx.get_document("ns", "k") is None
                assert await tx.get_saga("store-test:K-3") is None
                assert await tx.record_inbox("consumer", "m-1") is True
            assert await store.read_log() == []
            assert await store.pending_counts() == {}
            assert await store.dead_letters() == []

        asyncio.run(scenario())

    # ------------------------------------------------------------- sharing

    def test_a_second_handle_sees_what_the_first_committed(self, make_store: OpenStore) -> None:
        async def scenario() -> None:
            writer, reader = make_store(), make_store()
            async with writer.transaction() as tx:
                await tx.put_document("ns", "k", {"n": 1}, 0)
                await tx.append("Stream-1", 0, events("K-1", 1))
                # Not committed yet: the other handle does not see it.
                assert await reader.get_document("ns", "k") is None
                assert await reader.read_log() == []
            document = await reader.get_document("ns", "k")
            assert document is not None and document.data == {"n": 1}
            assert [e.stream for e in await reader.read_log()] == ["Stream-1"]
            async with reader.transaction() as tx:
                await tx.put_document("ns", "k", {"n": 2}, 1)
            async with writer.transaction() as tx:
                seen = await tx.get_document("ns", "k")
            assert seen is not None and (seen.data, seen.version) == ({"n": 2}, 2)

        asyncio.run(scenario())
