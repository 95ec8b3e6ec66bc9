"""What a bus refuses at submission or dead-letters on arrival, and how the consumer goes on.

Part of the bus port's conformance (mixed into
:class:`~sagaline.testing.conformance.bus_port.BusPortConformance`, on its ``harness``): bodies
that are not the message they claim to be, message ids (one message per id, and what is not an
id), internal messages that clients may not submit, and sizes up to sagaline's limit and past it.
A database bus is written only through sagaline, which checks what it writes; anyone may publish
to a broker, so there its consumers check what it delivers (``bus_is_a_database``).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest

from sagaline.errors import DuplicateMessageId, InvalidMessage, NotAcceptedFromClients
from sagaline.handling import System
from sagaline.messages import MAX_MESSAGE_BYTES, encode_body
from sagaline.ports import DEAD_LETTER_BODY_BYTES
from sagaline.testing.conformance.harness import (
    Harness,
    both,
    dead_lettered,
    drive,
    handled_all,
    run_until,
)
from sagaline.testing.conformance.messages import (
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherCommand,
    hand_made,
    padded,
)
from sagaline.testing.conformance.services import queue_service, subscriber

__all__ = ["ScreeningConformance"]


class ScreeningConformance:
    """What every bus refuses or dead-letters. Needs the ``harness`` fixture."""

    #: True when the bus is a database (its queues and log are tables), False for a broker.
    bus_is_a_database = True

    def store_bytes(self, store: Any) -> int | None:
        """How many bytes ``store`` takes on disk, or None where that is not known: a backend
        that tells shows that a dead-lettered large message does not grow its store by its size."""
        return None

    @pytest.mark.parametrize("source", ["queue", "subscription"])
    def test_invalid_and_foreign_messages_are_dead_lettered_and_the_consumer_goes_on(
        self, harness: Harness, source: str
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            if source == "queue":
                system = System([queue_service("alpha", ConformanceCommand)])
                kind: Any = ConformanceCommand
                bad_body = b'{"commandType":"ConformanceCommand","key":"K-1","seq":"one"}'
                type_name = "ConformanceCommand"
                problem = "$.seq"
            else:
                system = System([subscriber("alpha", ConformanceEvent)])
                kind = ConformanceEvent
                bad_body = b'{"eventType":"ConformanceEvent","key":"K-1","seq":1,"x":2}'
                type_name = "ConformanceEvent"
                problem = "unknown field `x`"
            bad = hand_made(type_name, "K-1", bad_body)
            not_json = hand_made(type_name, "K-2", b"\xff\xfe not json")
            # JSON keeps the last of a repeated key; another reader may keep the first.
            repeated = hand_made(
                type_name,
                "K-3",
                f'{{"{kind.discriminator}":"{type_name}","key":"K-3","seq":3,"seq":4}}'.encode(),
            )
            await harness.inject([bad, not_json, repeated], system)
            await system.submit_many(
                harness.entry,
                [kind(key="K-1", seq=1), kind(key="K-2", seq=2), kind(key="K-3", seq=5)],
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1], "K-2": [2], "K-3": [5]}),
                    dead_lettered(harness, 3),
                ),
            )
            dead = {letter.envelope.message_id: letter for letter in await harness.dead_letters()}
            assert set(dead) == {bad.message_id, not_json.message_id, repeated.message_id}
            assert {letter.consumer for letter in dead.values()} == {"alpha"}
            assert "invalid" in dead[bad.message_id].reason
            assert problem in dead[bad.message_id].reason
            assert dead[bad.message_id].envelope.body == bad.body
            assert "invalid" in dead[not_json.message_id].reason
            assert "'seq' appears twice" in dead[repeated.message_id].reason
            assert dead[repeated.message_id].envelope.body == repeated.body
            assert await harness.recorded("alpha") == {"K-1": [1], "K-2": [2], "K-3": [5]}

        drive(scenario)

    def test_a_message_id_is_one_message_and_is_refused_for_another(self, harness: Harness) -> None:
        """A client's own message id makes its retry the same message. Another message under a
        used id is refused where the bus is a database, which can compare it with what it holds;
        a broker cannot, and its consumers take the first message under an id."""

        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    queue_service("beta", ConformanceOtherCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            await harness.prepare(system)
            entry = harness.entry
            command, event = (
                ConformanceCommand(key="K-1", seq=1),
                ConformanceEvent(key="K-1", seq=1),
            )
            for _ in range(2):  # the second time: a client's retry after a lost answer
                sent = await system.submit(entry, command, message_id="client:1")
                assert sent.message_id == "client:1"
                await system.submit(entry, event, message_id="client:2")
            others: list[tuple[Any, str]] = [
                (ConformanceCommand(key="K-1", seq=2), "client:1"),  # another body
                (ConformanceEvent(key="K-1", seq=2), "client:2"),
            ]
            # Two messages under one id in one call are refused on every bus.
            with pytest.raises(DuplicateMessageId):
                await system.submit_many(
                    entry,
                    [ConformanceCommand(key="K-4", seq=1), ConformanceCommand(key="K-4", seq=2)],
                    message_ids=["client:4", "client:4"],
                )
            if self.bus_is_a_database:
                # Another type too (on a broker it would reach another consumer, whose inbox
                # has not seen the id).
                others.append((ConformanceOtherCommand(key="K-1", seq=1), "client:1"))
                for message, message_id in others:
                    with pytest.raises(DuplicateMessageId) as caught:
                        await system.submit(entry, message, message_id=message_id)
                    assert caught.value.message_id == message_id
                    assert message_id in str(caught.value)
                # Refused in a batch, it takes the batch with it: nothing is written.
                with pytest.raises(DuplicateMessageId):
                    await system.submit_many(
                        entry,
                        [
                            ConformanceCommand(key="K-3", seq=1),
                            ConformanceCommand(key="K-1", seq=3),
                        ],
                        message_ids=["client:3", "client:1"],
                    )
            else:
                for message, message_id in others:
                    await system.submit(entry, message, message_id=message_id)
            # Later messages of the same keys: handled after whatever came before them.
            await system.submit_many(
                entry, [ConformanceCommand(key="K-1", seq=5), ConformanceEvent(key="K-1", seq=5)]
            )
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1, 5]}),
                    handled_all(harness, "watcher", {"K-1": [1, 5]}),
                ),
            )
            assert await harness.recorded("alpha") == {"K-1": [1, 5]}
            assert await harness.recorded("watcher") == {"K-1": [1, 5]}
            assert await harness.recorded("beta") == {}

        drive(scenario)

    def test_a_message_whose_id_is_not_one_never_reaches_a_handler(self, harness: Harness) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System([queue_service("alpha", ConformanceCommand)])
            await harness.prepare(system)
            with pytest.raises(InvalidMessage) as caught:
                await system.submit(
                    harness.entry, ConformanceCommand(key="K-1", seq=1), message_id="x" * 100_000
                )
            assert caught.value.field == "messageId"
            assert "100000 characters" in caught.value.reason
            body = encode_body(ConformanceCommand(key="K-1", seq=1))
            too_long = replace(hand_made("ConformanceCommand", "K-1", body), message_id="x" * 200)
            misshapen = replace(hand_made("ConformanceCommand", "K-1", body), message_id="id 7/é")
            if self.bus_is_a_database:
                # A database bus is only written through sagaline, which checks every id.
                for envelope in (too_long, misshapen):
                    with pytest.raises(InvalidMessage):
                        await harness.inject([envelope], system)
            else:
                # Anyone may publish to a broker: its consumers check what it delivers.
                await harness.inject([too_long, misshapen], system)
            await system.submit(harness.entry, ConformanceCommand(key="K-2", seq=2))
            expected_dead = 0 if self.bus_is_a_database else 2
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-2": [2]}),
                    dead_lettered(harness, expected_dead),
                ),
            )
            assert await harness.recorded("alpha") == {"K-2": [2]}
            dead = await harness.dead_letters()
            assert len(dead) == expected_dead
            reasons = sorted(letter.reason for letter in dead)
            if dead:
                assert "200 characters is longer than the limit of 128" in reasons[0]
                assert "'id 7/é' may only hold ASCII letters" in reasons[1]
                for letter in dead:
                    assert letter.envelope.body == body
                    assert letter.envelope.message_id not in (too_long.message_id, "id 7/é")

        drive(scenario)

    def test_what_clients_may_not_submit_is_refused_and_dead_lettered_if_it_comes_anyway(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    queue_service("internal", ConformanceOtherCommand),
                    subscriber("watcher", ConformanceEvent),
                ],
                accepts=[ConformanceCommand],
            )
            await harness.prepare(system)
            for message in (
                ConformanceOtherCommand(key="K-1", seq=1),
                ConformanceEvent(key="K-1", seq=1),
            ):
                with pytest.raises(NotAcceptedFromClients) as caught:
                    await system.submit(harness.entry, message)
                assert message.type_name() in str(caught.value)
                assert "clients may submit ConformanceCommand" in str(caught.value)
            # A client that puts them on the bus itself (straight onto a broker).
            command = hand_made(
                "ConformanceOtherCommand",
                "K-1",
                encode_body(ConformanceOtherCommand(key="K-1", seq=1)),
            )
            event = hand_made(
                "ConformanceEvent", "K-1", encode_body(ConformanceEvent(key="K-1", seq=1))
            )
            await harness.inject([command, event], system)
            # Its own services may send them.
            await system.submit_internal(
                harness.entry,
                [ConformanceOtherCommand(key="K-2", seq=2), ConformanceEvent(key="K-2", seq=2)],
                source="alpha",
            )
            await system.submit(harness.entry, ConformanceCommand(key="K-3", seq=3))
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-3": [3]}),
                    handled_all(harness, "internal", {"K-2": [2]}),
                    handled_all(harness, "watcher", {"K-2": [2]}),
                    dead_lettered(harness, 2),
                ),
            )
            assert await harness.recorded("internal") == {"K-2": [2]}
            assert await harness.recorded("watcher") == {"K-2": [2]}
            dead = {letter.envelope.message_id: letter for letter in await harness.dead_letters()}
            assert set(dead) == {command.message_id, event.message_id}
            assert dead[command.message_id].reason == (
                "internal command ConformanceOtherCommand not accepted from clients"
                " (source 'client')"
            )
            assert "internal event ConformanceEvent not accepted" in dead[event.message_id].reason

        drive(scenario)

    def test_messages_up_to_the_size_limit_pass_and_bigger_ones_are_refused(
        self, harness: Harness
    ) -> None:
        async def scenario() -> None:
            await harness.open()
            system = System(
                [
                    queue_service("alpha", ConformanceCommand),
                    subscriber("watcher", ConformanceEvent),
                ]
            )
            await harness.prepare(system)
            # Refused before the key's other messages: had a refused one been written anyway,
            # it would be settled (handled or dead-lettered) before them, in their key's order.
            with pytest.raises(InvalidMessage, match=str(MAX_MESSAGE_BYTES)):
                await system.submit(
                    harness.entry, padded(ConformanceCommand, "K-big", MAX_MESSAGE_BYTES + 1)
                )
            # sagaline's limit is 1 MiB of body. A broker may allow less: NATS counts headers in
            # its server's max_payload (1 MiB by default), and refuses the rest at publish.
            limit = MAX_MESSAGE_BYTES
            broker_limit = harness.bus.max_payload if harness.bus is not None else None
            if broker_limit is not None and broker_limit - 2048 < limit:
                limit = broker_limit - 2048
                with pytest.raises(InvalidMessage, match="max_payload"):
                    await system.submit(
                        harness.entry, padded(ConformanceCommand, "K-big", MAX_MESSAGE_BYTES)
                    )
            command = padded(ConformanceCommand, "K-big", limit)
            event = padded(ConformanceEvent, "K-big", limit - 10)
            await system.submit(harness.entry, command)
            await system.submit(harness.entry, event)
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-big": [0]}),
                    handled_all(harness, "watcher", {"K-big": [0]}),
                ),
            )
            alpha = await harness.store.get_document("bus.alpha", "K-big")
            watcher = await harness.store.get_document("bus.watcher", "K-big")
            assert alpha is not None and watcher is not None
            assert alpha.data["sizes"] == [len(command.payload)]
            assert watcher.data["sizes"] == [len(event.payload)]
            assert not await harness.dead_letters()

        drive(scenario)

    def test_a_large_message_is_dead_lettered_as_a_bounded_prefix_with_its_size_and_hash(
        self, harness: Harness
    ) -> None:
        """A big message that cannot be handled is kept as a prefix, its size and its SHA-256:
        the store does not grow by the message. Over sagaline's limit where the bus carries it
        (4 MiB); NATS's server refuses more than its max_payload (1 MiB by default), so there
        the message is as big as it takes and invalid."""

        async def scenario() -> None:
            await harness.open()
            system = System([queue_service("alpha", ConformanceCommand)])
            size = 4 * MAX_MESSAGE_BYTES
            broker_limit = harness.bus.max_payload if harness.bus is not None else None
            if broker_limit is not None and broker_limit - 2048 < size:
                size = broker_limit - 2048
            head = (
                b'{"commandType":"ConformanceCommand","key":"K-1","seq":"not a number","payload":"'
            )
            body = head + b"x" * (size - len(head) - 2) + b'"}'
            assert len(body) == size
            big = hand_made("ConformanceCommand", "K-1", body)
            # Only the service's own store counts (not a bus in its database).
            before = self.store_bytes(harness.store) if harness.bus is not None else None
            await harness.inject([big], system)
            await system.submit(harness.entry, ConformanceCommand(key="K-1", seq=1))
            await run_until(
                harness,
                system,
                both(
                    handled_all(harness, "alpha", {"K-1": [1]}),
                    dead_lettered(harness),
                ),
            )
            [dead] = await harness.dead_letters()
            assert dead.envelope.message_id == big.message_id
            assert dead.envelope.body == body[:DEAD_LETTER_BODY_BYTES]
            assert f"{size:,} bytes" in dead.reason
            assert hashlib.sha256(body).hexdigest() in dead.reason
            if size > MAX_MESSAGE_BYTES:
                assert str(MAX_MESSAGE_BYTES) in dead.reason
            assert await harness.recorded("alpha") == {"K-1": [1]}
            after = self.store_bytes(harness.store)
            if before is not None and after is not None:
                # The service's own store (the bus is elsewhere) keeps the prefix, not the body.
                assert after - before < size // 4

        drive(scenario)
