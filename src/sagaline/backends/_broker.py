"""What the broker adapters share: the query parameters of their URLs."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagaline.errors import ConfigurationError

__all__ = ["take_bundle", "take_prefix", "take_query"]


def take_query(url: str, parameter: str) -> tuple[str, str | None]:
    """Split the query parameter ``parameter`` off a URL: the rest of the URL, and its value."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    value = next((value for name, value in pairs if name == parameter), None)
    if value is None:
        return url, None
    rest = urlencode([(name, value) for name, value in pairs if name != parameter])
    return urlunsplit(parts._replace(query=rest)), value


def take_prefix(url: str, options: dict[str, Any]) -> str:
    """Split a ``prefix=NAME`` query parameter off a broker URL into ``options["prefix"]``
    (an explicit ``prefix`` option wins); the rest of the URL."""
    url, prefix = take_query(url, "prefix")
    if prefix is not None and (
        not prefix or not prefix.replace("_", "").replace("-", "").isalnum()
    ):
        raise ConfigurationError("a bus prefix may hold letters, digits, '_' and '-' only")
    if prefix:
        options.setdefault("prefix", prefix)
    return url


def take_bundle(url: str, options: dict[str, Any]) -> str:
    """Split a ``bundle=N`` query parameter off a broker URL into ``options["bundle"]``
    (an explicit ``bundle`` option wins); the rest of the URL."""
    url, bundle = take_query(url, "bundle")
    if bundle is not None:
        if not bundle.isdigit():
            raise ConfigurationError(f"bundle={bundle!r}: a whole number is expected")
        options.setdefault("bundle", int(bundle))
    return url
