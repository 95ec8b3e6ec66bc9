"""Poison isolation on every bus: a message handed out before and never completed is handled in
a unit of work of its own (the rule of :mod:`sagaline.handling.isolation`).

A database bus applies the rule in its claim, from the attempts its rows count (PostgreSQL's
command queue in one SQL statement); with a broker the worker applies it to what the broker gave
back, from the handlings the store counted. A member that claimed messages and died without
settling them leaves them handed out and not completed: the next member must handle the suspect
alone, and every message exactly once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from sagaline.handling import Context, Service, System
from sagaline.ports import StoreTransaction
from sagaline.testing.conformance.harness import Harness, MakeHarness, drive, handled_all, run_until
from sagaline.testing.conformance.messages import ConformanceCommand, ConformanceEvent
from sagaline.testing.conformance.services import FAST_RETRY, record

__all__ = ["IsolationConformance"]

KEYS = [f"K-{k}" for k in range(4)]


class IsolationConformance:
    """Mixed into the bus port suite: needs ``make_harness`` and :meth:`kill`."""

    async def kill(self, harness: Harness) -> None:
        """End a member without settling what it holds (the bus port suite's)."""
        raise NotImplementedError

    @pytest.mark.parametrize("source", ["queue", "subscription"])
    def test_a_message_handed_out_before_and_never_completed_is_handled_alone(
        self, make_harness: MakeHarness, source: str
    ) -> None:
        units: dict[int, list[str]] = defaultdict(list)
        kept: list[StoreTransaction] = []  # alive, so that no two units share an id

        async def handler(ctx: Context, message: Any) -> None:
            if ctx.tx not in kept:
                kept.append(ctx.tx)
            units[id(ctx.tx)].append(message.key)
            await record(ctx, message)

        async def scenario() -> None:
            service = Service("alpha", retry=FAST_RETRY)
            kind: Any = ConformanceCommand if source == "queue" else ConformanceEvent
            if source == "queue":
                service.handles(ConformanceCommand)(handler)
            else:
                service.subscribes(ConformanceEvent)(handler)
            system = System([service])
            [spec] = service.consumers()
            first = make_harness()
            await first.open()
            await first.prepare(system)
            sent = await system.submit_many(first.entry, [kind(key=key, seq=1) for key in KEYS])
            # A member takes them all and dies holding them.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            held: set[str] = set()
            while len(held) < len(sent):
                batch = await first.port.claim(spec, "doomed", 10)
                held |= {d.envelope.message_id for d in batch.deliveries}
                assert loop.time() < deadline, "the first member was not given every message"
                if not batch.deliveries:
                    await first.port.wait_for_work(spec, 0.1)
            await self.kill(first)

            second = make_harness()
            await second.open()
            # The first message was handed to its handler, which never completed: a database
            # bus knows it from its own rows; beside a broker the store counts it, as the
            # worker does before it hands a message delivered again to its handler.
            async with second.store.transaction() as tx:
                await tx.handling_started("alpha", [sent[0].message_id])
            expected = {key: [1] for key in KEYS}
            await run_until(
                second, system, handled_all(second, "alpha", expected), member="survivor"
            )
            assert await second.recorded("alpha") == expected
            [alone] = [unit for unit in units.values() if KEYS[0] in unit]
            assert alone == [KEYS[0]], f"the suspect was handled with others: {alone}"
            assert not await second.dead_letters()
            await second.close()

        drive(scenario)
