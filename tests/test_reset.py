"""Starting afresh: a deployment's data is replaced only when it is marked resettable, on SQLite
files and PostgreSQL schemas alike, and a refusal deletes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers

import sagaline
from sagaline import Deployment, Envelope, NotResettable, utc_timestamp

SERVICES = ("alpha", "beta")
MARK = "scratch"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A database of this module's own on the PostgreSQL server."""
    yield from servers.postgres_database()


async def _write(deployment: Deployment, service: str, value: int) -> None:
    async with deployment.store(service).transaction() as tx:
        await tx.put_document("reset.test", service, {"value": value}, 0)


async def _read(deployment: Deployment, service: str) -> int | None:
    async with deployment.store(service).transaction() as tx:
        document = await tx.get_document("reset.test", service)
    return None if document is None else int(document.data["value"])


async def _replace_twice(store_url: str, bus_url: str | None) -> list[int | None]:
    """Open with ``replace``, write, close; open again the same way: what is left."""
    first = await sagaline.connect(store_url, bus_url, services=SERVICES, replace=MARK)
    try:
        for service in SERVICES:
            await _write(first, service, 1)
    finally:
        await first.close()
    second = await sagaline.connect(store_url, bus_url, services=SERVICES, replace=MARK)
    try:
        return [await _read(second, service) for service in SERVICES]
    finally:
        await second.close()


def test_sqlite_files_marked_resettable_are_replaced(tmp_path: Path) -> None:
    one_file = f"sqlite:///{tmp_path}/one.db"
    assert asyncio.run(_replace_twice(one_file, None)) == [None, None]
    per_service = f"sqlite:///{tmp_path}/{{service}}.db"
    bus = f"sqlite:///{tmp_path}/bus.db"
    assert asyncio.run(_replace_twice(per_service, bus)) == [None, None]


def test_unmarked_sqlite_data_is_refused_and_nothing_is_deleted(tmp_path: Path) -> None:
    per_service = f"sqlite:///{tmp_path}/{{service}}.db"
    bus = f"sqlite:///{tmp_path}/bus.db"

    async def scenario() -> tuple[list[int | None], str]:
        marked = await sagaline.connect(per_service, bus, services=SERVICES, replace=MARK)
        await _write(marked, "alpha", 1)
        await marked.close()
        # gamma's file holds data of a deployment that never marked it.
        unmarked = Deployment(per_service, bus, ["gamma"])
        await unmarked.open()
        await _write(unmarked, "gamma", 2)
        await unmarked.close()
        everyone = [*SERVICES, "gamma"]
        with pytest.raises(NotResettable) as refused:
            await sagaline.connect(per_service, bus, services=everyone, replace=MARK)
        kept = Deployment(per_service, bus, everyone)
        try:
            return [await _read(kept, service) for service in everyone], refused.value.where
        finally:
            await kept.close()

    values, where = asyncio.run(scenario())
    assert values == [1, None, 2]
    assert where.endswith("gamma.db")

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    with pytest.raises(NotResettable):
        asyncio.run(Deployment.reset(f"sqlite:///{text}", services=SERVICES, mark=MARK))
    assert text.read_text() == "not a database\n"


def test_postgres_schemas_marked_resettable_are_replaced_and_others_refused(pg_url: str) -> None:
    assert asyncio.run(_replace_twice(pg_url, None)) == [None, None]

    async def refused() -> int | None:
        plain = await sagaline.connect(pg_url, services=["gamma"])
        await _write(plain, "gamma", 3)
        await plain.close()
        with pytest.raises(NotResettable, match="service gamma"):
            await Deployment.reset(pg_url, services=[*SERVICES, "gamma"], mark=MARK)
        kept = await sagaline.connect(pg_url, services=[*SERVICES, "gamma"])
        try:
            return await _read(kept, "gamma")
        finally:
            await kept.close()

    assert asyncio.run(refused()) == 3


def test_a_database_bus_holding_unmarked_messages_is_refused(tmp_path: Path, pg_url: str) -> None:
    stores = f"sqlite:///{tmp_path}/{{service}}.db"

    async def scenario() -> str:
        # The stores hold nothing yet, but the bus they used has a command on its queue.
        used = await sagaline.connect(stores, pg_url, services=SERVICES)
        assert used.bus is not None
        command = Envelope(
            message_id=str(uuid.uuid4()),
            message_type="ResetTestCommand",
            body=b"{}",
            correlation_id="K-1",
            causation_id=None,
            timestamp=utc_timestamp(),
        )
        await used.bus.publish([command], {"ResetTestCommand": "alpha"})
        await used.close()
        with pytest.raises(NotResettable) as refused:
            await Deployment.reset(stores, pg_url, services=SERVICES, mark=MARK)
        assert (tmp_path / "alpha.db").exists()
        return refused.value.where

    assert asyncio.run(scenario()) == pg_url
