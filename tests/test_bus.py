"""How a service's definition becomes the bus's consumers, and what a faulty declaration costs.

The bus port's behaviour is in the conformance suites (``sagaline.testing.conformance``), run on
every backend from ``tests/conformance``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from sagaline.backends.sqlite import SqliteDatabase
from sagaline.handling import Service, System
from sagaline.ports import ConsumerSpec, Reads
from sagaline.testing.conformance import (
    FAST_RETRY,
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherEvent,
    record,
    recorded,
)
from sagaline.testing.conformance.bus import idle, run


def test_consumer_specs_follow_the_service_definition() -> None:
    service = Service("alpha", retry=FAST_RETRY)
    service.handles(ConformanceCommand)(record)
    service.subscribes(ConformanceEvent, ConformanceOtherEvent)(record)
    assert service.consumers() == [
        ConsumerSpec("alpha", "queue", frozenset({"ConformanceCommand"}), FAST_RETRY),
        ConsumerSpec(
            "alpha",
            "subscription",
            frozenset({"ConformanceEvent", "ConformanceOtherEvent"}),
            FAST_RETRY,
        ),
    ]


def test_a_faulty_reads_declaration_costs_no_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Declaring reads is an optimization: one that raises is logged, and every message is
    still handled once, in order."""

    def broken(command: ConformanceCommand, reads: Reads) -> None:
        raise KeyError(command.key)

    service = Service("alpha", retry=FAST_RETRY)
    service.handles(ConformanceCommand, reads=broken)(record)
    system = System([service])
    db = SqliteDatabase(f"sqlite:///{tmp_path}/reads.db")

    async def scenario() -> None:
        await system.submit_many(db, [ConformanceCommand(key="K-1", seq=n) for n in range(5)])
        await run(db, system, idle(db))
        assert await recorded(db, "alpha") == {"K-1": [0, 1, 2, 3, 4]}
        assert db.sync.dead_letters() == []
        await db.close()

    with caplog.at_level(logging.WARNING, logger="sagaline"):
        asyncio.run(scenario())
    assert any("declaring the reads" in r.getMessage() for r in caplog.records)
