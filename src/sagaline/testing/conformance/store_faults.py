"""What the message path does when its store fails or a broker hands out copies of a message.

Part of the bus port's conformance (mixed into
:class:`~sagaline.testing.conformance.bus_port.BusPortConformance`), and run besides on other
pairs of a store and a bus. The outage must be real: a backend's subclass provides
:meth:`StoreFaultConformance.store_outage`, which makes the store's writes fail as on a full disk
(SQLite's page limit; a PostgreSQL trigger raising SQLSTATE 53100 ``disk_full``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import pytest

from sagaline.handling import Condition, Context, Handler, Service, System, holds
from sagaline.messages import Envelope
from sagaline.ports import RetryPolicy
from sagaline.testing.conformance.harness import (
    Harness,
    dead_lettered,
    drive,
    either,
)
from sagaline.testing.conformance.messages import ConformanceCommand, ConformanceEvent
from sagaline.testing.conformance.services import record

__all__ = ["StoreFaultConformance", "StoreOutage"]


class StoreOutage(Protocol):
    """A real write failure of a store, begun and ended by the test."""

    def begin(self) -> None:
        """From now on, writes to the store fail (reads may go on)."""
        ...

    def end(self) -> None:
        """Writes succeed again."""
        ...


#: Two attempts: an outage charged to the messages would dead-letter them at once.
TWO_ATTEMPTS = RetryPolicy(max_attempts=2, initial_delay=0.01, multiplier=2.0, max_delay=0.05)


class _Failures(logging.Handler):
    """Counts the warnings and errors the message path logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextmanager
def _logged_failures() -> Iterator[_Failures]:
    failures = _Failures()
    logger = logging.getLogger("sagaline")
    logger.addHandler(failures)
    try:
        yield failures
    finally:
        logger.removeHandler(failures)


async def _wait_for(condition: Condition, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await holds(condition):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class StoreFaultConformance:
    """A store outage and in-batch copies, through the real message path of every bus.

    Subclasses provide the ``harness`` fixture (a :class:`Harness`) and :meth:`store_outage`.
    """

    @pytest.fixture
    def harness(self, *args: Any, **kwargs: Any) -> Harness | Iterator[Harness]:
        """The test's harness."""
        raise NotImplementedError("a backend's test class provides harness")

    def store_outage(self, store: Any) -> StoreOutage:
        """A real write failure of ``store`` (a full disk, say), begun and ended by the test."""
        raise NotImplementedError("a backend's test class provides store_outage")

    def test_a_store_outage_is_waited_out_without_charging_the_messages(
        self, harness: Harness
    ) -> None:
        calls: Counter[int] = Counter()

        async def handle(ctx: Context, command: ConformanceCommand) -> None:
            calls[command.seq] += 1
            if command.seq == 0 and calls[0] == 1:
                # Fails once on its own, so that the batch is handled again message by message
                # (under savepoints) when the store fails under it.
                raise RuntimeError("not yet")
            await record(ctx, command)
            # A write that needs room the store does not have during the outage.
            await ctx.tx.put_document("bulk", command.key, {"payload": "x" * 60_000}, 0)
            ctx.publish(ConformanceEvent(key=command.key, seq=command.seq))

        async def scenario() -> None:
            system = await _alpha(harness, handle)
            commands = [ConformanceCommand(key=f"K-{k}", seq=k) for k in range(3)]
            sent = await system.submit_many(harness.entry, commands)
            outage = self.store_outage(harness.store)
            outage.begin()
            runtime = harness.runtime(system)
            runner = asyncio.create_task(runtime.run())
            try:
                with _logged_failures() as failures:
                    # Well past what two attempts per message allow, had they been charged.
                    await _wait_for(
                        either(lambda: failures.count >= 5, dead_lettered(harness)),
                        60,
                        "the worker to meet the outage",
                    )
                    outage.end()
                expected = {f"K-{k}": [k] for k in range(3)}

                async def handled() -> bool:
                    return await harness.recorded("alpha") == expected or runner.done()

                await _wait_for(handled, 60, "the commands to be handled")
            finally:
                runtime.stop()
                await runner
            assert await harness.dead_letters() == []
            assert await harness.recorded("alpha") == expected
            # Each command had one effect: one event caused by each.
            events = await _caused_events(harness)
            assert Counter(events[m.message_id] for m in sent) == {1: 3}

        drive(scenario)

    def test_copies_of_a_message_in_one_batch_are_handled_once(self, harness: Harness) -> None:
        calls: Counter[int] = Counter()

        async def handle(ctx: Context, command: ConformanceCommand) -> None:
            calls[command.seq] += 1
            await record(ctx, command)
            ctx.publish(ConformanceEvent(key=command.key, seq=command.seq))

        async def scenario() -> None:
            system = await _alpha(harness, handle)
            first, second = (ConformanceCommand(key=f"K-{k}", seq=k) for k in range(2))
            envelopes = [Envelope.wrap(m, source="client") for m in (first, second)]
            # A relay that republishes after a crash between the broker's confirm and marking
            # its rows sent: the copies travel in one publication and arrive in one batch.
            await harness.port.publish(
                [envelopes[0], envelopes[0], envelopes[1], envelopes[0], envelopes[1]],
                system.routes,
            )
            runtime = harness.runtime(system)

            async def handled() -> bool:
                return await harness.recorded("alpha") == {"K-0": [0], "K-1": [1]}

            with _logged_failures() as failures:
                await runtime.run_until(handled, timeout=30)
            assert calls == {0: 1, 1: 1}
            assert failures.count == 0
            assert await harness.dead_letters() == []
            events = await _caused_events(harness)
            assert [events[e.message_id] for e in envelopes] == [1, 1]

        drive(scenario)


async def _alpha(harness: Harness, handle: Handler) -> System:
    """The harness opened, with one service ``alpha`` handling ConformanceCommand by ``handle``
    (two attempts per message)."""
    await harness.open()
    service = Service("alpha", retry=TWO_ATTEMPTS)
    service.handles(ConformanceCommand)(handle)
    system = System([service])
    await harness.prepare(system)
    return system


async def _caused_events(harness: Harness) -> Counter[str | None]:
    """How many events each message caused, in the event log (the broker's replay, or the store's
    log when the bus is the store's database)."""
    if harness.bus is None:
        log = [stored async for stored in harness.store.iter_log(0)]
    else:
        log = await harness.replay(0)
    return Counter(stored.envelope.causation_id for stored in log)
