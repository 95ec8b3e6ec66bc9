"""Crash points: where the crash tests kill a worker, armed by ``SAGALINE_CRASH_AT``."""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``SAGALINE_CRASH_AT`` names this point.

    Used by the crash tests to die at a precise line: ``SAGALINE_CRASH_AT=after-handle:40`` dies
    the 40th time the point is passed. Costs one dictionary lookup when unarmed.
    """
    armed = _CRASH_POINTS.get(name)
    if armed is None:
        return
    armed[0] -= 1
    if armed[0] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _parse_crash_points(spec: str | None) -> dict[str, list[int]]:
    points: dict[str, list[int]] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, _, count = item.strip().partition(":")
        points[name] = [int(count or "1")]
    return points


_CRASH_POINTS = _parse_crash_points(os.environ.get("SAGALINE_CRASH_AT"))
