"""The three-stage demo (examples/pipeline_demo.py) runs to completion, with and without faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "pipeline_demo.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The demo gives up (with each live stage's stack on stderr) 20 s before the test would kill it."""
    cmd = [sys.executable, str(DEMO), *args, "--limit", str(timeout - 20)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_demo_without_faults_delivers_every_item_once_in_order() -> None:
    out = _run("--items", "200000", "--no-faults")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: nothing lost" in out.stdout
    assert "missing 0, wrong values 0" in out.stdout


def test_demo_with_kills_revokes_and_expiries_loses_nothing() -> None:
    out = _run("--items", "2000000", "--seed", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: nothing lost" in out.stdout
    assert "kill -9" in out.stdout


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(5))
def test_demo_with_faults_loses_nothing_across_seeds(seed: int) -> None:
    out = _run("--items", "5000000", "--seed", str(seed), timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: nothing lost" in out.stdout
