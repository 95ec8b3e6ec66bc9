"""The README tells the truth: its runnable example runs, its tour's commands exist and work."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _sagaline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagaline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SAGALINE_STORE_URL": "sqlite:///./sagaline.db"},
    )


def test_the_framework_example_runs(tmp_path: Path) -> None:
    examples = [block for block in _blocks("python") if "asyncio.run(" in block]
    assert examples, "the README has no runnable Python example"
    for example in examples:
        done = subprocess.run(
            [sys.executable, "-c", example],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "1 Main St" in done.stdout


def test_the_set_up_commands_exist_and_run_what_the_readme_says() -> None:
    root = README.parent
    text = README.read_text()
    assert "./scripts/demo.sh" in text and "./scripts/test.sh" in text
    assert "sagaline demo" in (root / "scripts" / "demo.sh").read_text()
    assert "pytest" in (root / "scripts" / "test.sh").read_text()
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()


def test_the_tour_commands_work_after_the_demo(tmp_path: Path) -> None:
    demo = _sagaline("demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    for outcome in ("ORD-12345", "COMPLETED", "CONFIRMED", "Insufficient stock for PROD-A"):
        assert outcome in demo.stdout
    tour = next(block for block in _blocks("bash") if "sagaline submit" in block)
    order = re.search(r"<<'JSON'\n(.*?)\nJSON", tour, flags=re.S)
    assert order is not None
    (tmp_path / "order.json").write_text(order.group(1))
    commands = [
        line.split("#")[0].split()
        for line in tour.splitlines()
        if line.startswith("sagaline ") and "&" not in line.split("#")[0]
    ]
    assert len(commands) >= 10
    runner = subprocess.Popen(
        [sys.executable, "-m", "sagaline", "run"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for words in commands:
            done = _sagaline(*words[1:], cwd=tmp_path)
            # The read model follows the write side: wait (bounded) for the submitted order.
            deadline = time.monotonic() + 30
            while done.returncode != 0 and words[1] == "order" and time.monotonic() < deadline:
                time.sleep(0.1)
                done = _sagaline(*words[1:], cwd=tmp_path)
            assert done.returncode == 0, (words, done.stderr)
        assert "CONFIRMED" in _sagaline("order", "ORD-2001", cwd=tmp_path).stdout
    finally:
        runner.send_signal(signal.SIGTERM)
        _, errors = runner.communicate(timeout=30)
    assert runner.returncode == 0, errors
