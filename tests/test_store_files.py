"""SQLite store files: what sagaline opens, creates, reads and reports about them.

Another application's database is never changed; a new store is readable by its owner only;
queries read a store they cannot write; a full device is named as such. Tests that need a
read-only or a full file system make one in a private mount namespace (``unshare -m``) and are
skipped where that is not allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import PROCESS_TIMEOUT, _environment, sagaline

from sagaline.backends.sqlite import NotAStore, SqliteDatabase
from sagaline.errors import StoreUnavailable
from sagaline.handling import System
from sagaline.orders.demo import SEED_ORDER_JSON
from sagaline.testing.conformance import ConformanceCommand, padded, queue_service

ORDER = SEED_ORDER_JSON


def fingerprint(path: Path) -> tuple[str, int, int]:
    """The file's content hash, size and modification time."""
    info = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), info.st_size, info.st_mtime_ns


def other_application_database(path: Path) -> None:
    """A small SQLite database of another application (rollback journal, its own table)."""
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    connection.execute("INSERT INTO users (name) VALUES ('ada'), ('grace')")
    connection.commit()
    connection.close()


def _can_unshare() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _can_unshare(), reason="needs a private mount namespace (unshare -m, as root)"
)


def in_private_mounts(
    script: str, *, cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a shell ``script`` in a mount namespace of its own (its mounts vanish with it)."""
    return subprocess.run(
        ["unshare", "-m", "sh", "-ec", script],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_environment(),
        timeout=PROCESS_TIMEOUT * 3,
        check=False,
    )


def sagaline_command(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "sagaline", *args])


# ------------------------------------------------------------- another application's file

STORE_COMMANDS = [
    ("submit", "order.json"),
    ("stock", "set", "PROD-A", "3"),
    ("run",),
    ("up",),
    ("rebuild",),
    ("orders",),
    ("order", "ORD-12345"),
    ("trace", "ORD-12345"),
    ("sagas",),
    ("dead-letters",),
    ("stock", "list"),
]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=[" ".join(c) for c in STORE_COMMANDS])
def test_another_applications_database_is_refused_and_left_untouched(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    database = tmp_path / "app.db"
    other_application_database(database)
    (tmp_path / "order.json").write_text(ORDER, encoding="utf-8")
    before = fingerprint(database)

    result = sagaline(*command, "--store", "sqlite:///app.db", cwd=tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "app.db" in result.stderr and "not a sagaline store" in result.stderr
    assert "sagaline migrate --store sqlite:///app.db" in result.stderr
    assert "Traceback" not in result.stderr
    assert fingerprint(database) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "order.json"]


def test_a_file_that_is_not_a_database_gets_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    before = fingerprint(junk)
    (tmp_path / "order.json").write_text(ORDER, encoding="utf-8")
    for command in (("submit", "order.json"), ("migrate",), ("orders",)):
        result = sagaline(*command, "--store", "sqlite:///junk.db", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "junk.db is not a SQLite database" in result.stderr
        assert "Traceback" not in result.stderr
    assert fingerprint(junk) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db", "order.json"]


def test_migrate_adopts_another_applications_database_on_purpose(tmp_path: Path) -> None:
    database = tmp_path / "app.db"
    other_application_database(database)
    adopted = sagaline("migrate", "--store", "sqlite:///app.db", cwd=tmp_path)
    assert adopted.returncode == 0, adopted.stderr
    stocked = sagaline("stock", "set", "PROD-A", "3", "--store", "sqlite:///app.db", cwd=tmp_path)
    assert stocked.returncode == 0, stocked.stderr
    connection = sqlite3.connect(database)
    try:
        assert connection.execute("SELECT name FROM users ORDER BY id").fetchall() == [
            ("ada",),
            ("grace",),
        ]
    finally:
        connection.close()


def test_a_new_or_empty_file_becomes_a_store(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    for name in ("empty.db", "new.db"):
        result = sagaline(
            "stock", "set", "PROD-A", "3", "--store", f"sqlite:///{name}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        listed = sagaline("stock", "list", "--json", "--store", f"sqlite:///{name}", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert '"productId": "PROD-A"' in listed.stdout


def test_the_adapter_refuses_another_applications_database(tmp_path: Path) -> None:
    database = tmp_path / "app.db"
    other_application_database(database)
    before = fingerprint(database)
    with pytest.raises(NotAStore, match="not a sagaline store"):
        SqliteDatabase(f"sqlite:///{database}")
    assert fingerprint(database) == before
    db = SqliteDatabase(f"sqlite:///{database}", adopt=True)
    asyncio.run(db.close())
    reopened = SqliteDatabase(f"sqlite:///{database}")
    asyncio.run(reopened.close())


# ---------------------------------------------------------------------- owner-only files


def test_store_files_are_created_readable_by_their_owner_only(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        db = SqliteDatabase(f"sqlite:///{tmp_path}/store.db")
        try:
            for name in ("store.db", "store.db-wal", "store.db-shm"):
                assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        finally:
            asyncio.run(db.close())
        made = sagaline("stock", "set", "PROD-A", "1", "--store", "sqlite:///cli.db", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        assert stat.S_IMODE((tmp_path / "cli.db").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


# ------------------------------------------------------------------- read-only stores


def make_store_with_an_order(directory: Path) -> None:
    (directory / "order.json").write_text(ORDER, encoding="utf-8")
    for command in (("stock", "set", "PROD-A", "3"), ("submit", "order.json")):
        result = sagaline(*command, "--store", "sqlite:///s.db", cwd=directory)
        assert result.returncode == 0, result.stderr


QUERIES = [
    ("orders", "--json"),
    ("order", "ORD-12345"),
    ("trace", "ORD-12345", "--json"),
    ("sagas", "--json"),
    ("dead-letters", "--json"),
    ("stock", "list", "--json"),
]


@needs_mounts
def test_queries_work_on_a_store_on_a_read_only_file_system(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_store_with_an_order(store)
    before = fingerprint(store / "s.db")
    commands = [sagaline_command(*query, "--store", "sqlite:///s.db") for query in QUERIES]
    script = "\n".join(
        [
            f"mount --bind -o ro {shlex.quote(str(store))} {shlex.quote(str(store))}",
            f"cd {shlex.quote(str(store))}",
            *(f"if {command}; then echo exit=0; else echo exit=$?; fi" for command in commands),
        ]
    )
    result = in_private_mounts(script, cwd=tmp_path)
    exits = [line for line in result.stdout.splitlines() if line.startswith("exit=")]
    # Every query reads the store; `order` finds the order not projected yet (exit 1).
    assert exits == ["exit=0", "exit=1", *["exit=0"] * 4], result.stdout + result.stderr
    assert '"productId": "PROD-A"' in result.stdout
    assert '"type": "CreateOrderCommand"' in result.stdout  # the trace shows the pending order
    assert "no order 'ORD-12345' in the read model" in result.stderr  # not projected yet
    assert fingerprint(store / "s.db") == before
    assert sorted(p.name for p in store.iterdir()) == ["order.json", "s.db"]


def test_queries_leave_the_store_as_it_was(tmp_path: Path) -> None:
    make_store_with_an_order(tmp_path)
    before = fingerprint(tmp_path / "s.db")
    for query in QUERIES:
        result = sagaline(*query, "--store", "sqlite:///s.db", cwd=tmp_path)
        assert result.returncode in (0, 1), result.stderr
        assert "Traceback" not in result.stderr
    assert fingerprint(tmp_path / "s.db") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["order.json", "s.db"]


# --------------------------------------------------------------------------- full disk


def test_a_full_store_raises_store_unavailable_naming_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/full.db"
    system = System([queue_service("alpha", ConformanceCommand)])

    async def scenario() -> None:
        db = SqliteDatabase(url)
        try:
            [(pages,)] = db.sync.execute("PRAGMA page_count")
            # The file may not grow past the pages it has: the next message finds it full.
            db.sync.execute(f"PRAGMA max_page_count = {int(pages)}")
            with pytest.raises(StoreUnavailable) as caught:
                await system.submit(db, padded(ConformanceCommand, "K-1", 200_000))
            assert str(caught.value) == f"the store {url} is full (no space left on the device)"
            assert caught.value.code == "store_unavailable"
        finally:
            await db.close()

    asyncio.run(scenario())


@needs_mounts
def test_submit_on_a_full_device_says_the_store_is_full(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "order.json").write_text(ORDER, encoding="utf-8")
    quoted = shlex.quote(str(disk))
    script = "\n".join(
        [
            f"mount -t tmpfs -o size=512k tmpfs {quoted}",
            f"cd {quoted}",
            sagaline_command("stock", "set", "PROD-A", "3", "--store", "sqlite:///s.db"),
            # Fill the device: the write stops when nothing is left.
            "head -c 1000000 /dev/zero > filler 2>/dev/null || true",
            sagaline_command("submit", str(tmp_path / "order.json"), "--store", "sqlite:///s.db")
            + "|| echo exit=$?",
        ]
    )
    result = in_private_mounts(script, cwd=tmp_path)
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    assert (
        "error: the store sqlite:///s.db is full (no space left on the device)" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr
