"""Adapters, one module per technology, chosen by URL scheme and imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagaline.errors import ConfigurationError

if TYPE_CHECKING:
    from sagaline.ports import Backend

__all__ = ["open_backend"]


def open_backend(url: str) -> Backend:
    """Open the store-and-bus backend a URL names (``sqlite:///path``)."""
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        from sagaline.backends.sqlite import SqliteDatabase

        return SqliteDatabase(url)
    raise ConfigurationError(
        f"no backend for URL scheme {scheme!r}; this version supports sqlite:///path"
    )
