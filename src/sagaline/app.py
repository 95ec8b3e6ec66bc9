"""An app: a system as sagaline's tools see it (the CLI, the test kit, operator actions).

A module exposes an :class:`App`: how to build its :class:`~sagaline.handling.System` (its
services, sagas, projections and the messages clients may submit), and optionally commands of
its own for the CLI and invariants of its own for the test kit. The CLI runs any app the same
way::

    sagaline --app mypkg.trip:app run
    SAGALINE_APP=mypkg.trip:app sagaline sagas --status COMPENSATED

or, with ``[tool.sagaline] app = "mypkg.trip:app"`` in the project's ``pyproject.toml``, without
naming it. The reference order system is the app used when none is named.
"""

from __future__ import annotations

import importlib
import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sagaline.errors import ConfigurationError
from sagaline.handling import System
from sagaline.messages import Message, MessageRegistry
from sagaline.projection import Projection

if TYPE_CHECKING:
    from sagaline.saga.definition import SagaDefinition
    from sagaline.testing.invariants import AuditSnapshot, Violation

__all__ = ["APP_ENV", "DEFAULT_APP", "App", "Invariant", "Settings", "find_app", "load_app"]

#: Settings an app's system is built with: ``--set NAME=VALUE`` on the command line.
Settings = Mapping[str, str]


class Invariant(Protocol):
    """An app's own invariant: a pure function of a snapshot of the stores that returns the
    violations it finds there, with their evidence (see :mod:`sagaline.testing`)."""

    def __call__(self, snapshot: AuditSnapshot, /) -> Iterable[Violation]: ...


#: The environment variable naming the app (``module:attribute``).
APP_ENV = "SAGALINE_APP"
#: The app used when none is named: the reference order system.
DEFAULT_APP = "sagaline.orders:app"


@dataclass(frozen=True)
class App:
    """A system and what the tools need to know of it.

    ``build(settings)`` returns the system; it is called with the settings given on the command
    line (``--set sold_out=ROME``), or none. ``projections`` can be rebuilt from the log.
    ``commands`` is a ``typer.Typer`` whose commands join the CLI's own. ``invariants`` are
    checked after the generic ones by the test kit (:func:`sagaline.testing.check_app`).
    """

    name: str
    build: Callable[[Settings], System]
    projections: Sequence[Projection] = ()
    commands: Any = None
    invariants: Sequence[Invariant] = ()
    description: str = ""
    #: Settings the app understands, with what each does (listed by ``sagaline describe``).
    settings: Mapping[str, str] = field(default_factory=dict)
    #: Every message type of the app, for ``sagaline schema``: the system's own (handled,
    #: subscribed to, accepted from clients) join them, and so do events only published.
    messages: Sequence[type[Message]] = ()
    #: For each command type clients submit, the event types that answer it: how the test kit
    #: finds, in a deployment with a database per service, the submissions no outbox holds.
    answers: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def system(self, settings: Settings | None = None) -> System:
        """The app's system, built with ``settings`` (checked against those it declares)."""
        given = dict(settings or {})
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            known = ", ".join(sorted(self.settings)) or "none"
            raise ConfigurationError(
                f"the app {self.name!r} has no setting {', '.join(map(repr, unknown))};"
                f" it has: {known}"
            )
        return self.build(given)

    @cached_property
    def default(self) -> System:
        """The system built without settings: what queries and validation look at."""
        return self.system()

    @property
    def services(self) -> list[str]:
        """The names of the system's services."""
        return list(self.default.services)

    @cached_property
    def registry(self) -> MessageRegistry:
        """The app's message types: its system's, and those it lists in ``messages``."""
        types = MessageRegistry(self.default.registry.types())
        for cls in self.messages:
            if cls.type_name() not in types:
                types.register(cls)
        return types

    @property
    def sagas(self) -> dict[str, SagaDefinition]:
        """The saga definitions of the system, by name."""
        return self.default.sagas

    def projection(self, name: str) -> Projection:
        """One of the app's projections, by name."""
        for projection in self.projections:
            if projection.name == name:
                return projection
        known = ", ".join(p.name for p in self.projections) or "none"
        raise ConfigurationError(
            f"the app {self.name!r} has no projection {name!r}; it has: {known}"
        )


def load_app(spec: str) -> App:
    """The :class:`App` named by ``spec``: ``package.module:attribute`` (``:app`` if omitted)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigurationError(f"{spec!r} names no module: use package.module:attribute")
    # The app is looked for in the working directory too, as `python -m` would.
    here = str(Path.cwd())
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import the app module {module_name!r}: {exc}") from exc
    try:
        found = getattr(module, attribute or "app")
    except AttributeError:
        raise ConfigurationError(
            f"the module {module_name!r} has no attribute {attribute or 'app'!r}"
        ) from None
    if callable(found) and not isinstance(found, App):
        found = found()
    if not isinstance(found, App):
        raise ConfigurationError(f"{spec!r} is a {type(found).__name__}, not a sagaline App")
    return found


def find_app(given: str | None = None, *, cwd: Path | None = None) -> str:
    """Which app to run: ``given`` (``--app``), else ``$SAGALINE_APP``, else ``app`` of the
    ``[tool.sagaline]`` table of the nearest ``pyproject.toml``, else the order system."""
    if given:
        return given
    from_env = os.environ.get(APP_ENV)
    if from_env:
        return from_env
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                table = tomllib.loads(pyproject.read_text()).get("tool", {}).get("sagaline", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigurationError(f"cannot read {pyproject}: {exc}") from exc
            configured = table.get("app") if isinstance(table, dict) else None
            if isinstance(configured, str) and configured:
                return configured
            break
    return DEFAULT_APP
