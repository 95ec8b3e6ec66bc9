"""The framework's own cost per message: a command handler that only publishes an event, and a
subscriber that does nothing, on one SQLite file (synchronous=FULL). Prints microseconds per
handling, wall clock and CPU.

    python benchmarks/handling_floor.py --messages 20000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from sagaline import Command, Context, Event, Runtime, Service, System
from sagaline.backends.sqlite import SqliteDatabase


class FloorPingCommand(Command, kw_only=True, frozen=True):
    order_id: str


class FloorPongEvent(Event, kw_only=True, frozen=True):
    order_id: str


def _system() -> System:
    ping = Service("ping")
    pong = Service("pong")

    @ping.handles(FloorPingCommand)
    async def answer(ctx: Context, command: FloorPingCommand) -> None:
        ctx.publish(FloorPongEvent(order_id=command.order_id))

    @pong.subscribes(FloorPongEvent)
    async def ignore(ctx: Context, event: FloorPongEvent) -> None:
        return None

    return System([ping, pong])


async def run(messages: int, path: str) -> None:
    db = SqliteDatabase(f"sqlite:///{path}")
    system = _system()
    for start in range(0, messages, 5000):
        count = min(5000, messages - start)
        await system.submit_many(
            db, [FloorPingCommand(order_id=f"O{n}") for n in range(start, start + count)]
        )
    runtime = Runtime(db, system)
    started, cpu = time.perf_counter(), time.process_time()
    await runtime.run_until(lambda: db.is_idle(system.subscribers), check_every=0.02)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    handled = runtime.handled
    print(f"handlings   {handled:,} ({messages:,} commands, {messages:,} events)")
    print(f"per handling {wall / handled * 1e6:.1f} us wall, {cpu / handled * 1e6:.1f} us CPU")
    await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sagaline-floor-") as tmp:
        asyncio.run(run(args.messages, str(Path(tmp) / "floor.db")))


if __name__ == "__main__":
    main()
