"""The scheme registry: URLs find their adapter in one table, drivers are optional extras."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sagaline
from sagaline import config
from sagaline.backends import open_backend, open_bus
from sagaline.backends.sqlite import SqliteDatabase
from sagaline.backends.sqlite import open_bus as open_sqlite_bus
from sagaline.backends.sqlite import open_store as open_sqlite_store
from sagaline.config import Adapter, MissingDriver, adapter_for, register_scheme, schemes_for
from sagaline.deploy import Deployment
from sagaline.errors import ConfigurationError

SRC = Path(sagaline.__file__).parent

#: Every module a server backend's driver may load at its top level.
DRIVER_MODULES = ("psycopg", "psycopg_pool", "aio_pika", "aiormq", "pamqp", "nats")


@pytest.fixture
def registry() -> Iterator[dict[str, Adapter]]:
    """The scheme registry, restored after the test to what it held before."""
    saved = dict(config.ADAPTERS)
    yield config.ADAPTERS
    config.ADAPTERS.clear()
    config.ADAPTERS.update(saved)


def _sqlite_url(url: str) -> str:
    return "sqlite" + url.removeprefix("sqlite3")


def alias_store(url: str, **options: Any) -> SqliteDatabase:
    """A third party's store factory: ``sqlite3:///path`` is a SQLite file."""
    return open_sqlite_store(_sqlite_url(url), **options)


def alias_bus(url: str, **options: Any) -> SqliteDatabase:
    """A third party's bus factory: ``sqlite3:///path`` is a SQLite file."""
    return open_sqlite_bus(_sqlite_url(url), **options)


def test_a_registered_scheme_opens_a_deployment(
    registry: dict[str, Adapter], tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="no store for URL scheme 'sqlite3'"):
        Deployment(f"sqlite3:///{tmp_path}/{{service}}.db", None, ["order"])
    register_scheme(
        "sqlite3",
        title="SQLite, by another name",
        example="sqlite3:///path",
        store=f"{__name__}:alias_store",
        bus=f"{__name__}:alias_bus",
    )
    assert "sqlite3" in schemes_for("store") and "sqlite3" in schemes_for("bus")

    deployment = Deployment(
        f"sqlite3:///{tmp_path}/{{service}}.db",
        f"sqlite3:///{tmp_path}/bus.db",
        ["order", "payment"],
        store_options={"lease_seconds": 3.0},
    )

    async def use() -> None:
        await deployment.open()
        await deployment.close()

    asyncio.run(use())
    stores = [deployment.store("order"), deployment.store("payment")]
    assert all(isinstance(store, SqliteDatabase) for store in stores)
    # Each service its own file, opened in outbox mode, since the bus is elsewhere.
    assert [store.url for store in stores] == [
        f"sqlite:///{tmp_path}/order.db",
        f"sqlite:///{tmp_path}/payment.db",
    ]
    assert all(store.outbox and store.lease_seconds == 3.0 for store in stores)  # type: ignore[attr-defined]
    assert isinstance(deployment.bus, SqliteDatabase)
    assert deployment.bus.url == f"sqlite:///{tmp_path}/bus.db"
    assert (tmp_path / "order.db").exists() and (tmp_path / "bus.db").exists()


def test_services_on_one_file_share_its_store(registry: dict[str, Adapter], tmp_path: Path) -> None:
    register_scheme(
        "sqlite3", title="alias", example="sqlite3:///path", store=f"{__name__}:alias_store"
    )
    deployment = Deployment(f"sqlite3:///{tmp_path}/one.db", None, ["order", "payment"])
    assert deployment.store("order") is deployment.store("payment")
    assert deployment.colocated
    # This adapter opens no bus.
    with pytest.raises(ConfigurationError, match="no bus for URL scheme 'sqlite3'"):
        open_bus(f"sqlite3:///{tmp_path}/bus.db")


def test_a_scheme_belongs_to_one_adapter(registry: dict[str, Adapter]) -> None:
    with pytest.raises(ConfigurationError, match="already PostgreSQL's"):
        register_scheme("postgres", title="other", example="postgres://", store="m:f")
    with pytest.raises(ConfigurationError, match="neither a store nor a bus"):
        register_scheme("nothing", title="nothing", example="nothing://")
    with pytest.raises(ConfigurationError, match="not a URL scheme"):
        register_scheme("no scheme", title="bad", example="x", bus="m:f")
    assert adapter_for("POSTGRES://h/db", "store").title == "PostgreSQL"


def test_unknown_schemes_and_roles_are_refused_with_the_choices() -> None:
    with pytest.raises(ConfigurationError) as unknown:
        open_backend("mysql://user:s3cret@db/x")
    assert "sqlite:///path/to/file.db" in str(unknown.value)
    assert "postgresql://" in str(unknown.value)
    assert "s3cret" not in str(unknown.value)
    # A broker carries messages but keeps no service's state.
    with pytest.raises(ConfigurationError, match="no store for URL scheme 'nats'"):
        Deployment("nats://127.0.0.1:4222", None, ["order"])
    with pytest.raises(ConfigurationError, match="must have a scheme"):
        open_bus("localhost:5672")


def test_broker_url_parameters_are_options(tmp_path: Path) -> None:
    from sagaline.backends.nats import NatsBus
    from sagaline.backends.rabbitmq import RabbitBus

    rabbit = open_bus("amqp://guest:guest@127.0.0.1/?prefix=shop&bundle=7&heartbeat=5")
    assert isinstance(rabbit, RabbitBus)
    assert (rabbit.prefix, rabbit.bundle) == ("shop", 7)
    # An explicit option wins over the URL's.
    assert open_bus("amqp://127.0.0.1/?prefix=shop", prefix="other").prefix == "other"  # type: ignore[attr-defined]
    nats = open_bus("nats://127.0.0.1:4222?prefix=shop", instance=(1, 2))
    assert isinstance(nats, NatsBus) and nats.prefix == "shop"
    with pytest.raises(ConfigurationError, match="bus prefix"):
        open_bus("nats://127.0.0.1:4222?prefix=a.b")
    # A database bus ignores what only brokers use.
    bus = open_bus(f"sqlite:///{tmp_path}/bus.db", instance=(1, 2), connect_timeout=1.0)
    assert isinstance(bus, SqliteDatabase)


# ------------------------------------------------------------------------------ drivers

_BLOCK_DRIVERS = f"""
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {DRIVER_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

for name in list(sys.modules):
    if name.partition(".")[0] in {DRIVER_MODULES!r}:
        del sys.modules[name]
sys.meta_path.insert(0, NotInstalled())
"""


def _without_drivers(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a Python where no server driver can be imported."""
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_DRIVERS + script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_core_and_the_cli_import_no_driver() -> None:
    result = _without_drivers(
        "import sagaline, sagaline.cli, sagaline.deploy, sagaline.backends, sagaline.testing\n"
        "import sagaline.backends.sqlite\n"
        f"loaded = sorted(m for m in sys.modules if m.partition('.')[0] in {DRIVER_MODULES!r})\n"
        "print(loaded)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_missing_driver_names_its_extra(tmp_path: Path) -> None:
    result = _without_drivers(
        "from sagaline.backends import open_backend, open_bus\n"
        "from sagaline.config import MissingDriver\n"
        "from sagaline.deploy import Deployment\n"
        "opens = [\n"
        "    lambda: open_backend('postgresql://app:s3cret@127.0.0.1/shop'),\n"
        "    lambda: Deployment('postgres://app@127.0.0.1/shop', None, ['order']),\n"
        "    lambda: open_bus('amqp://guest:guest@127.0.0.1/'),\n"
        "    lambda: open_bus('nats://127.0.0.1:4222'),\n"
        "]\n"
        "for open_ in opens:\n"
        "    try:\n"
        "        open_()\n"
        "    except MissingDriver as exc:\n"
        "        print(exc)\n"
        f"print(type(open_bus('sqlite:///{tmp_path}/bus.db')).__name__)\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "the URL postgresql://app:***@127.0.0.1/shop needs the PostgreSQL driver (psycopg),"
        " which is not installed: pip install 'sagaline[postgres]'",
        "the URL postgres://app@127.0.0.1/shop needs the PostgreSQL driver (psycopg),"
        " which is not installed: pip install 'sagaline[postgres]'",
        "the URL amqp://guest:***@127.0.0.1/ needs the RabbitMQ driver (aio_pika),"
        " which is not installed: pip install 'sagaline[rabbitmq]'",
        "the URL nats://127.0.0.1:4222 needs the NATS JetStream driver (nats),"
        " which is not installed: pip install 'sagaline[nats]'",
        "SqliteDatabase",
    ]


def test_a_missing_driver_is_a_configuration_error() -> None:
    assert issubclass(MissingDriver, ConfigurationError)


# ------------------------------------------------------------------------------ structure


def _imported(path: Path) -> set[str]:
    """The modules a source file imports, at its top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
    return found


_BACKENDS = ("sqlite", "postgres", "rabbitmq", "nats")


@pytest.mark.parametrize("backend", _BACKENDS)
def test_a_backend_imports_no_other_backend(backend: str) -> None:
    root = SRC / "backends"
    files = [root / f"{backend}.py"] if (root / f"{backend}.py").exists() else []
    files += sorted((root / backend).rglob("*.py")) if (root / backend).is_dir() else []
    assert files
    others = [f"sagaline.backends.{other}" for other in _BACKENDS if other != backend]
    for path in files:
        for module in _imported(path):
            assert not any(module == o or module.startswith(f"{o}.") for o in others), (
                f"{path.relative_to(SRC)} imports {module}"
            )


def test_what_backends_share_imports_no_backend() -> None:
    root = SRC / "backends"
    shared = [*sorted((root / "_sql").glob("*.py")), root / "_broker.py", root / "bundles.py"]
    for path in shared:
        for module in _imported(path):
            assert not any(module.startswith(f"sagaline.backends.{b}") for b in _BACKENDS), (
                f"{path.relative_to(SRC)} imports {module}"
            )


def test_the_cli_the_test_kit_and_the_apps_reach_no_backend_but_through_the_registry() -> None:
    """The command line, the test kit and the order app open stores and buses by URL: none of
    their modules imports a backend package (nor a database driver), so a new backend needs no
    edit there."""
    folders = [SRC / "cli", SRC / "testing", SRC / "orders", SRC / "handling", SRC / "saga"]
    for path in [p for folder in folders for p in sorted(folder.rglob("*.py"))]:
        for module in _imported(path):
            assert not any(module.startswith(f"sagaline.backends.{b}") for b in _BACKENDS), (
                f"{path.relative_to(SRC)} imports {module}"
            )
            assert module.partition(".")[0] not in {"psycopg", "aio_pika", "aiormq", "nats"}, (
                f"{path.relative_to(SRC)} imports {module}"
            )
