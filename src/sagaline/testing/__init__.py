"""Tools for testing systems built with sagaline: the invariant checker of RELIABILITY.md."""

from __future__ import annotations

from sagaline.testing.invariants import (
    Violation,
    check_invariants,
    check_invariants_async,
    format_violations,
)

__all__ = ["Violation", "check_invariants", "check_invariants_async", "format_violations"]
