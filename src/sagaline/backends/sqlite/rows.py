"""SQLite URLs. The row conversions the database backends share live in
:mod:`sagaline.backends._sql.rows`."""

from __future__ import annotations

from sagaline.errors import ConfigurationError

__all__ = ["path_from_url"]


def path_from_url(url: str) -> str:
    """The file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        # The URL is not repeated: another scheme's URL may hold a password.
        raise ConfigurationError("not a SQLite URL (expected sqlite:///path/to/file.db)")
    path = url[len(prefix) :]
    if not path:
        raise ConfigurationError("the SQLite URL names no file")
    return path
