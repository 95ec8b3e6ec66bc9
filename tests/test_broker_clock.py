"""The broker buses read the time from the clock they are given: leases (NATS) and retry holds
(RabbitMQ) end when a :class:`FakeClock` says so, with no test waiting for them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import servers

from sagaline.backends import open_bus
from sagaline.backends.nats import NatsBus
from sagaline.backends.rabbitmq import RabbitBus
from sagaline.clock import FakeClock
from sagaline.handling import System
from sagaline.ports import Batch, BrokerBus, ConsumerSpec, Outcome, RetryPolicy
from sagaline.testing.conformance import ConformanceCommand, queue_service


@pytest.fixture
def nats_url() -> Iterator[str]:
    yield from servers.nats_prefix()


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    yield from servers.rabbitmq_vhost()


async def claim_one(bus: BrokerBus, spec: ConsumerSpec) -> Batch:
    """The first batch with a delivery (fails the test after 15 seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not (batch := await bus.claim(spec, "m", 10)).deliveries:
        assert loop.time() < deadline, "nothing was delivered"
        await bus.wait_for_work(spec, 0.1)
    return batch


def test_nats_leases_expire_on_the_bus_clock(nats_url: str) -> None:
    clock = FakeClock()
    [spec] = queue_service("alpha", ConformanceCommand).consumers()

    async def scenario() -> None:
        first = open_bus(nats_url, lease_seconds=30.0, clock=clock)
        second = open_bus(nats_url, lease_seconds=30.0, clock=clock)
        assert isinstance(first, NatsBus) and isinstance(second, NatsBus)
        try:
            await first.prepare([spec], {"ConformanceCommand": "alpha"})
            await first.claim(spec, "m1", 10)
            everything = list(range(first.partitions))
            assert first.partitions_held(spec, "m1") == everything
            # m1 stops claiming without giving its leases back, as a process that hangs does.
            await second.claim(spec, "m2", 10)
            assert second.partitions_held(spec, "m2") == []
            clock.advance(30.0 + 1)
            await second.claim(spec, "m2", 10)
            assert second.partitions_held(spec, "m2") == everything
        finally:
            await second.close()
            await first.close()

    asyncio.run(scenario())


def test_rabbitmq_retry_holds_end_on_the_bus_clock(rabbitmq_url: str) -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=5, initial_delay=60.0, multiplier=1.0, max_delay=60.0)
    service = queue_service("alpha", ConformanceCommand, retry=policy)
    [spec] = service.consumers()
    system = System([service])

    async def scenario() -> None:
        bus = open_bus(rabbitmq_url, clock=clock)
        assert isinstance(bus, RabbitBus)
        try:
            await bus.prepare([spec], system.routes)
            sent = await system.submit(bus, ConformanceCommand(key="K-1", seq=1))
            first = await claim_one(bus, spec)
            assert [d.attempt for d in first.deliveries] == [1]
            await bus.complete(first, [(Outcome.RETRY, "failed")])
            # Its key is held for the retry's delay, a minute on the bus's clock.
            assert (await bus.claim(spec, "m", 10)).deliveries == []
            clock.advance(policy.delay(1))
            again = await claim_one(bus, spec)
            [delivery] = again.deliveries
            assert (delivery.envelope.message_id, delivery.attempt) == (sent.message_id, 2)
            await bus.complete(again, [(Outcome.ACK, None)])
        finally:
            await bus.delete_topology([spec])
            await bus.close()

    asyncio.run(scenario())
