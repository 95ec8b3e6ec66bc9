"""The worker: one consumer loop that claims a batch, handles it in one unit of work and settles
it; a batch the store failed under is given back uncounted, and a broker's redeliveries are
counted before their handlers run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence, Set
from typing import Any, cast

from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.errors import ConcurrencyError, InvalidMessage, NonRetryableError, StoreUnavailable
from sagaline.handling.crash import crash_point
from sagaline.handling.isolation import _isolated, _RetryBatch, _suspects
from sagaline.handling.service import Context, Service
from sagaline.handling.system import CLIENT, System
from sagaline.messages import Envelope, check_unique_keys
from sagaline.ports import (
    DEAD_LETTERED,
    Backend,
    Batch,
    BrokerBus,
    ConsumerSpec,
    Delivery,
    Outcome,
    Reads,
    StoreTransaction,
)

__all__ = ["DEFAULT_BATCH", "BeforeCommit", "Worker"]

log = logging.getLogger("sagaline.handling")

#: Deliveries claimed and committed together. Under load a bigger batch spreads one commit over
#: more messages; when idle a batch holds what is there, so latency does not wait for it.
DEFAULT_BATCH = 500

#: Called inside a batch's unit of work, handled and settled, just before it commits, with the
#: outcome of each delivery. An exception it raises abandons the unit of work as a crash there
#: would: nothing of the batch is kept, and its deliveries come again.
BeforeCommit = Callable[[Batch, Sequence[tuple[Outcome, str | None]]], None]


def _backoff(failures: int) -> float:
    """Seconds to wait after the store failed ``failures`` times in a row: 0.1 s, doubling,
    at most 5 s."""
    return min(5.0, 0.05 * 2.0**failures)


class Worker:
    """One consumer loop: claim a batch, handle it in one transaction, repeat.

    With the bus in the store's database (``bus`` omitted), acknowledgements join the handling
    transaction. With a separate bus, outgoing messages go to the store's outbox and the batch is
    completed on the bus after the commit (a crash in between redelivers it; the inbox absorbs it).
    While the store fails, the worker backs off on ``clock`` (a fake one moves only when told).
    """

    def __init__(
        self,
        db: Backend,
        system: System,
        service: Service,
        spec: ConsumerSpec,
        *,
        member: str,
        batch_size: int = DEFAULT_BATCH,
        poll_interval: float = 0.1,
        bus: BrokerBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.db = db
        self.clock = clock
        self.bus: Backend | BrokerBus = db if bus is None else bus
        self.broker = None if bus is None or cast(object, bus) is db else bus
        self.system = system
        self.service = service
        self.spec = spec
        self.member = member
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.handlers = (
            service.command_handlers if spec.source == "queue" else service.event_handlers
        )
        self.handled = 0
        #: An observer of every batch just before its commit (the test kit's harness).
        self.before_commit: BeforeCommit | None = None
        #: A batch the store failed under, with the redeliveries counted for it, to give back.
        self._unreleased: tuple[Batch, list[str]] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; the batch in hand is finished first."""
        try:
            await self._loop(stop)
        finally:
            await self.bus.leave(self.spec, self.member)

    async def _loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                if self._unreleased is not None:
                    await self._release()
                progressed = await self.run_once()
                failures = 0
            except StoreUnavailable as exc:
                # Not a message's failure: what was claimed goes back uncounted once the store
                # answers again (see _release), and no message is dead-lettered for it.
                failures += 1
                log.warning(
                    "%s/%s: store unavailable, waiting for it (%d): %s",
                    self.spec.name,
                    self.spec.source,
                    failures,
                    exc,
                )
                await self._back_off(failures, stop)
                continue
            except Exception:
                # The store itself failed (locked past its timeout, disk full, ...): the batch
                # rolled back and stays claimable; wait a little, then go on.
                failures += 1
                log.exception("%s/%s: batch failed, retrying", self.spec.name, self.spec.source)
                await self._back_off(failures, stop)
                continue
            if not progressed:
                waiter = asyncio.ensure_future(stop.wait())
                work = asyncio.ensure_future(self.bus.wait_for_work(self.spec, self.poll_interval))
                await asyncio.wait({waiter, work}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                work.cancel()

    async def _back_off(self, failures: int, stop: asyncio.Event) -> None:
        """Wait on the clock after ``failures`` failures in a row, or until ``stop`` is set."""
        waiter = asyncio.ensure_future(stop.wait())
        pause = asyncio.ensure_future(self.clock.sleep(_backoff(failures)))
        try:
            await asyncio.wait({waiter, pause}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            pause.cancel()

    async def run_once(self) -> bool:
        """Claim and handle one batch; False when there was nothing to do.

        Raises :class:`StoreUnavailable` when the store failed under the batch; what it had not
        completed is then given back uncounted before the next claim (see :meth:`_release`).
        """
        batch = await self.bus.claim(self.spec, self.member, self.batch_size)
        if not batch.deliveries and batch.cursor is None:
            return False
        again = [d for d in batch.deliveries if d.attempt > 1]
        if self.broker is None or not again:
            try:
                await self._run(batch)
            except StoreUnavailable:
                self._unreleased = (batch, [])
                raise
        else:
            ids = list(dict.fromkeys(d.envelope.message_id for d in again))
            try:
                async with self.db.transaction() as tx:
                    earlier = await tx.handling_counts(self.spec.name, ids)
            except StoreUnavailable:
                self._unreleased = (batch, [])
                raise
            suspects = _suspects(ids, earlier)
            counted = set(ids)
            blocked: set[Any] = set()
            parts = _isolated(batch, suspects)
            for index, part in enumerate(parts):
                fresh = [d for d in part.deliveries if d.attempt > 1]
                taken: list[str] = []
                try:
                    await self._count_handlings(fresh)
                    taken = list(dict.fromkeys(d.envelope.message_id for d in fresh))
                    await self._run(part, counted, blocked)
                except StoreUnavailable:
                    rest = [d for later in parts[index:] for d in later.deliveries]
                    self._unreleased = (Batch(batch.consumer, rest, batch.cursor), taken)
                    raise
        self.handled += len(batch.deliveries)
        return True

    async def _release(self) -> None:
        """Give back, uncounted, what a batch the store failed under had not completed.

        The claim counted an attempt for each delivery, and a broker's redelivery was counted in
        the store before its handler ran; neither happened because of the message, so both are
        taken back: the deliveries come again in their order, as if never handed out.
        """
        assert self._unreleased is not None
        batch, taken = self._unreleased
        skipped = [(Outcome.SKIP, None)] * len(batch.deliveries)
        if self.broker is None:
            async with self.db.transaction() as tx:
                await self.db.settle(tx, batch, skipped)
        else:
            if taken:
                async with self.db.transaction() as tx:
                    await tx.handling_aborted(self.spec.name, taken)
            await self.broker.complete(batch, skipped)
        self._unreleased = None

    async def _run(
        self, batch: Batch, counted: Set[str] = frozenset(), blocked: set[Any] | None = None
    ) -> None:
        """Handle ``batch`` in one transaction; if that fails, message by message."""
        try:
            await self._handle(batch, careful=False, counted=counted, blocked=blocked)
        except (_RetryBatch, ConcurrencyError):
            # A handler failed, or the batch lost a race for a row at commit (another instance
            # changed it first): all of it rolled back. Again, message by message under
            # savepoints, on fresh reads; a message that conflicts again is retried later.
            await self._handle(batch, careful=True, counted=counted, blocked=blocked)

    async def _count_handlings(self, deliveries: Sequence[Delivery]) -> None:
        """Count, durably and before any handler runs, that messages a broker delivered again go
        to their handlers now; each one's attempt becomes that count.

        A broker counts a delivery for every message a consumer held when it died (a prefetch
        window, bundles), so its count cannot tell the message that killed the process from its
        innocent neighbours. Counted here just before its part of the batch runs, a message
        handed out again after a batch of it never completed goes alone (see :func:`_isolated`),
        and only one that keeps dying in its handler reaches the dead letters as one that never
        completes.
        """
        if not deliveries:
            return
        ids = [d.envelope.message_id for d in deliveries]
        async with self.db.transaction() as tx:
            counts = await tx.handling_started(self.spec.name, ids)
        for delivery, count in zip(deliveries, counts, strict=True):
            delivery.attempt = count

    async def _handle(
        self,
        batch: Batch,
        *,
        careful: bool,
        counted: Set[str] = frozenset(),
        blocked: set[Any] | None = None,
    ) -> None:
        spec = self.spec
        async with self.db.transaction() as tx:
            outcomes: list[tuple[Outcome, str | None]] = []
            outgoing: list[Envelope] = []
            # Keys held back by a retry, from the earlier parts of the claimed batch too.
            held: set[Any] = set() if blocked is None else set(blocked)
            # Fast pass: one inbox lookup and one inbox insert for the whole batch.
            duplicates: set[str] = set()
            processed: list[str] = []
            if not careful:
                duplicates = await tx.seen(
                    spec.name, [d.envelope.message_id for d in batch.deliveries]
                )
                reads = self._reads(batch, duplicates)
                if reads:
                    await tx.prefetch(reads)
            for delivery in batch.deliveries:
                if delivery.ordering_key in held:
                    outcomes.append((Outcome.SKIP, None))
                    continue
                result = await self._handle_one(
                    tx, delivery, outgoing, careful, duplicates, processed
                )
                if result[0] is Outcome.RETRY:
                    held.add(delivery.ordering_key)
                outcomes.append(result)
            if processed:
                await tx.record_inbox_many(spec.name, processed)
            for delivery, (outcome, _) in zip(batch.deliveries, outcomes, strict=True):
                message_id = delivery.envelope.message_id
                if message_id not in counted or delivery.attempt > DEAD_LETTERED:
                    continue
                if outcome is Outcome.ACK or outcome is Outcome.DEAD:
                    # A dead letter is marked as one: should the broker not have had its ack
                    # and deliver it again, it is acknowledged, not handled or dead-lettered
                    # twice.
                    await tx.handling_ended(
                        spec.name, message_id, dead_lettered=outcome is Outcome.DEAD
                    )
            if self.broker is not None:
                # A client's message came straight through the broker: no store emitted it, so
                # the store that handled it keeps it for the audit trail.
                received = list(
                    {
                        d.envelope.message_id: d.envelope
                        for d, (outcome, _) in zip(batch.deliveries, outcomes, strict=True)
                        if outcome is Outcome.ACK and d.envelope.source == CLIENT
                    }.values()
                )
                if received:
                    await tx.record_received(spec.name, received)
            crash_point("before-emit")
            await tx.emit(outgoing, self.system.routes)
            if self.broker is None:
                await self.db.settle(tx, batch, outcomes)
            crash_point("before-commit")
            if self.before_commit is not None:
                self.before_commit(batch, outcomes)
        crash_point("after-commit")
        if blocked is not None:
            blocked |= held
        if self.broker is not None:
            await self.broker.complete(batch, outcomes)
        if careful:
            for delivery, (outcome, error) in zip(batch.deliveries, outcomes, strict=True):
                if outcome is Outcome.RETRY:
                    log.warning(
                        "%s: %s %s failed (attempt %d), will retry: %s",
                        spec.name,
                        delivery.envelope.message_type,
                        delivery.envelope.message_id,
                        delivery.attempt,
                        error,
                    )

    def _reads(self, batch: Batch, duplicates: set[str]) -> Reads:
        """What the batch's handlers declared they will read."""
        reads = Reads()
        declared = self.service.reads
        if not declared:
            return reads
        for delivery in batch.deliveries:
            envelope = delivery.envelope
            declare = declared.get(envelope.message_type)
            if declare is None or envelope.message_id in duplicates:
                continue
            try:
                declare(envelope.decode(self.system.registry), reads)
            except InvalidMessage:
                continue  # dead-lettered when its turn comes
            except Exception:
                # Declaring is an optimization: a faulty declaration costs its reads one round
                # trip each, never the message.
                log.warning(
                    "%s: declaring the reads of %s failed",
                    self.spec.name,
                    envelope.message_type,
                    exc_info=True,
                )
        return reads

    async def _handle_one(
        self,
        tx: StoreTransaction,
        delivery: Delivery,
        outgoing: list[Envelope],
        careful: bool,
        duplicates: set[str],
        processed: list[str],
    ) -> tuple[Outcome, str | None]:
        spec = self.spec
        envelope = delivery.envelope
        if delivery.attempt > DEAD_LETTERED:
            return Outcome.ACK, None  # in the dead letters already (see _count_handling)
        if delivery.attempt > spec.retry.max_attempts:
            reason = (
                f"handed to its handler {delivery.attempt - 1} times without completing"
                " (the consumer died while handling it)"
            )
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt - 1)
            return Outcome.DEAD, reason
        if envelope.defect is not None:
            await tx.dead_letter(spec.name, envelope, envelope.defect, delivery.attempt)
            return Outcome.DEAD, envelope.defect
        handler = self.handlers.get(envelope.message_type)
        if handler is None:
            reason = f"{spec.name} has no handler for {envelope.message_type}"
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        try:
            message = envelope.decode(self.system.registry)
            if self.broker is not None or envelope.source not in self.system.services:
                # Anyone may publish onto a broker, and anything may be published onto a
                # database bus as a client's message; what a service emitted into a database
                # bus was encoded by sagaline. A body sagaline wrote costs one encoding here;
                # one written by another producer is parsed again only if it differs from that.
                check_unique_keys(envelope.message_type, envelope.body, message)
        except InvalidMessage as exc:
            reason = f"invalid message: {exc.reason}"
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        if envelope.source == CLIENT and not self.system.accepts_from_clients(
            envelope.message_type
        ):
            # System.submit refuses these; one that comes anyway was put on the bus some other
            # way (straight onto a broker). A broker's source header is the publisher's word,
            # so this is a second line, not the boundary itself.
            kind = "command" if spec.source == "queue" else "event"
            reason = (
                f"internal {kind} {envelope.message_type} not accepted from clients"
                f" (source {CLIENT!r})"
            )
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        ctx = Context(tx, envelope, self.service.name, self.system.registry)
        if not careful:
            if envelope.message_id in duplicates:
                return Outcome.ACK, None
            try:
                await handler(ctx, message)
            except StoreUnavailable:
                raise
            except Exception as exc:
                raise _RetryBatch() from exc
            crash_point("after-handle")
            processed.append(envelope.message_id)
            # A second copy of it in this batch (a broker delivers a republished message as a
            # message of its own) is a duplicate like one handled in an earlier batch.
            duplicates.add(envelope.message_id)
            outgoing.extend(ctx.outgoing)
            return Outcome.ACK, None
        try:
            async with tx.savepoint():
                if await tx.record_inbox(spec.name, envelope.message_id):
                    await handler(ctx, message)
        except StoreUnavailable:
            raise
        except NonRetryableError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            await tx.dead_letter(spec.name, envelope, reason, delivery.attempt)
            return Outcome.DEAD, reason
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if delivery.attempt >= spec.retry.max_attempts:
                await tx.dead_letter(
                    spec.name,
                    envelope,
                    f"failed {delivery.attempt} times; last error: {reason}",
                    delivery.attempt,
                )
                return Outcome.DEAD, reason
            return Outcome.RETRY, reason
        outgoing.extend(ctx.outgoing)
        return Outcome.ACK, None
