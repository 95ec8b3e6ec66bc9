"""The embedded store on a disk that fills up: a real filesystem, full for real.

Each test runs a small program in a mount namespace of its own (``unshare -m``) on a tmpfs of a
few megabytes, fills that filesystem with a file, and frees it again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_CHECKPOINTER = textwrap.dedent(
    """
    import asyncio, logging, os, sys, threading, time
    from sagaline.backends.sqlite import SqliteDatabase

    directory = sys.argv[1]
    failures = []

    class Failures(logging.Handler):
        def emit(self, record):
            failures.append(record.getMessage())

    logging.getLogger("sagaline").addHandler(Failures(logging.WARNING))
    died = []
    threading.excepthook = lambda args: died.append(args.exc_value)

    async def main():
        db = SqliteDatabase(f"sqlite:///{directory}/store.db")
        db.start_checkpointer(interval=0.02)
        filler = os.path.join(directory, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError:
                pass
        # Room for the transaction's WAL frames, not for the pages a checkpoint then copies.
        os.truncate(filler, max(0, os.path.getsize(filler) - 700_000))
        async with db.transaction() as tx:
            for n in range(40):
                await tx.put_document("bulk", str(n), {"payload": "x" * 10_000}, 0)
        pages = db.connection.execute("PRAGMA page_count").fetchone()[0]
        size = db.connection.execute("PRAGMA page_size").fetchone()[0]
        deadline = time.monotonic() + 20
        while not failures and not died and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        print("checkpoint failed:", bool(failures or died), flush=True)
        os.remove(filler)
        deadline = time.monotonic() + 20
        path = os.path.join(directory, "store.db")
        while os.path.getsize(path) < pages * size and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        print("checkpointed after the disk had room again:", os.path.getsize(path) >= pages * size)
        print("thread died:", bool(died))
        await db.close()

    asyncio.run(main())
    """
)


def _in_a_small_filesystem(tmp_path: Path, program: str) -> str:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small filesystem")
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "program.py"
    script.write_text(program)
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs -o size=4m tmpfs "$1" && exec "$2" "$3" "$1"',
            "sh",
            str(mount),
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_checkpointer_outlives_a_full_disk(tmp_path: Path) -> None:
    out = _in_a_small_filesystem(tmp_path, _CHECKPOINTER)
    assert "checkpoint failed: True" in out, out
    assert "checkpointed after the disk had room again: True" in out, out
    assert "thread died: False" in out, out
