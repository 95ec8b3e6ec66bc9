"""The test kit as a user's project meets it: what ``sagaline.testing`` exports, and the
conformance suites' need of pytest, named with the extra that brings it."""

from __future__ import annotations

import subprocess
import sys

import sagaline.testing
import sagaline.testing.conformance as conformance


def test_the_kit_exports_the_invariant_checker_and_the_harness() -> None:
    assert sagaline.testing.__all__ == [
        "AuditSnapshot",
        "Delivered",
        "Faults",
        "Harness",
        "InjectedCrash",
        "InjectedFailure",
        "Violation",
        "check_app",
        "check_app_deployment",
        "format_violations",
    ]


def test_the_kit_knows_no_app() -> None:
    # The order app's checks live with the order app; the kit imports no app of its own.
    program = (
        "import sys, sagaline.testing, sagaline.testing.invariants;"
        " sys.exit(any(name.startswith('sagaline.orders') for name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_conformance_package_exports_a_suite_per_port() -> None:
    for name in (
        "StoreConformance",
        "OutboxConformance",
        "BusConformance",
        "BusPortConformance",
        "StoreFaultConformance",
    ):
        suite = getattr(conformance, name)
        assert name in conformance.__all__
        # Not collected where it is defined: only a backend's subclass (``Test...``) runs.
        assert not suite.__name__.startswith("Test")
        assert any(attribute.startswith("test_") for attribute in dir(suite))


def _import_without_pytest(module: str) -> subprocess.CompletedProcess[str]:
    program = f"import sys; sys.modules['pytest'] = None; import {module}"
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )


def test_the_suites_without_pytest_name_the_extra_to_install() -> None:
    result = _import_without_pytest("sagaline.testing.conformance")
    assert result.returncode != 0
    assert "pip install sagaline[testing]" in result.stderr


def test_the_invariant_checker_does_not_need_pytest() -> None:
    result = _import_without_pytest("sagaline.testing")
    assert result.returncode == 0, result.stderr
