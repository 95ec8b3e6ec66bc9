"""Settings read from ``SAGALINE_*`` environment variables, and URLs made safe to show.

A store or bus URL may carry a password (``postgresql://app:secret@db/shop``,
``amqp://app:secret@mq/vhost``). It is handed to child processes through the environment, never
on their command line, and every URL that reaches a log record, an error message or the CLI's
output goes through :func:`redact_url` (or, for a driver's message that may quote the URL or its
password, :func:`redact`).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

__all__ = [
    "BUS_URL_ENV",
    "CONNECT_TIMEOUT_ENV",
    "DEFAULT_CONNECT_TIMEOUT",
    "STORE_URL_ENV",
    "redact",
    "redact_url",
]

#: The store URL (``--store``).
STORE_URL_ENV = "SAGALINE_STORE_URL"
#: The bus URL (``--bus``).
BUS_URL_ENV = "SAGALINE_BUS_URL"
#: Seconds a one-shot command (``--connect-timeout``) waits for its database or broker before it
#: gives up; long-running services wait as long as it takes.
CONNECT_TIMEOUT_ENV = "SAGALINE_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0

_SECRET_PARAMETER = re.compile(r"pass|secret|token|key", re.IGNORECASE)
_MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with its password (and any password-like query parameter) masked.

    ``postgresql://app:secret@db/shop?password=x`` shows as
    ``postgresql://app:***@db/shop?password=***``; a URL without secrets is returned unchanged.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    # Edit the text in place: urlunsplit would rewrite ``sqlite:///x`` as ``sqlite:/x``.
    redacted = url
    if password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        redacted = redacted.replace(parts.netloc, f"{user}:{_MASK}@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_PARAMETER.search(name) for name, _ in pairs):
            masked = urlencode(
                [(n, _MASK if _SECRET_PARAMETER.search(n) else v) for n, v in pairs], safe="*"
            )
            redacted = redacted.replace(f"?{parts.query}", f"?{masked}", 1)
    return redacted


def _secrets(url: str) -> list[str]:
    """The secrets a URL carries, as written and decoded, longest first."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [
            value
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            if _SECRET_PARAMETER.search(name)
        ]
        found.append(parts.netloc.rpartition("@")[0].partition(":")[2])
    except ValueError:
        return []
    found += [unquote(value) for value in found]
    return sorted({value for value in found if value}, key=len, reverse=True)


def redact(text: str, *urls: str | None) -> str:
    """``text`` (a driver's error message, say) with each URL and its secrets masked."""
    for url in urls:
        if not url:
            continue
        # The URL shows redacted (as it does where it already is); its secrets are masked
        # wherever else they appear.
        shown = redact_url(url)
        pieces = re.split(f"({re.escape(url)}|{re.escape(shown)})", text)
        for secret in _secrets(url):
            pieces[::2] = [piece.replace(secret, _MASK) for piece in pieces[::2]]
        pieces[1::2] = [shown] * len(pieces[1::2])
        text = "".join(pieces)
    return text
