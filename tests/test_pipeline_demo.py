"""The three-stage demo (examples/pipeline_demo.py) runs to completion, with and without faults."""

from __future__ import annotations

import os
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


def test_a_demo_past_its_limit_reports_each_stage_and_edge_and_cleans_up() -> None:
    # the hang report that found the replay window's hang: each live stage's stacks and edge
    # state (SIGUSR1, SIGUSR2) and each edge's handoff record with its queue's header words
    def demo_segments() -> set[str]:
        return {n for n in os.listdir("/dev/shm") if n.startswith(("grafos.demo", "grafos-gen.demo"))}

    before = demo_segments()
    out = _run("--items", "50000000", "--no-faults", timeout=22)  # cannot finish in the 2 s limit
    assert out.returncode != 0
    err = out.stderr
    assert "did not finish within 2.0s" in err
    assert "most recent call first" in err  # the stacks
    for stage in ("source", "transform", "sink"):
        assert f"state of {stage} (pid " in err
    for edge in ("edge1", "edge2"):
        line = next(ln for ln in err.splitlines() if ln.startswith(f"{edge}: "))
        assert "handoff generation" in line and "acked" in line, line
    assert '"queued_to"' in err and '"queue": {"epoch"' in err  # the producer's new stats
    assert demo_segments() <= before  # the run's shared memory is gone


def test_the_freeze_harness_runs_the_demo_under_freezes_and_counts_failures(tmp_path: Path) -> None:
    harness = DEMO.parent / "freeze_demo.py"
    cmd = [sys.executable, str(harness), "--runs", "2", "--items", "100000", "--freeze", "0.05", "0.1"]
    out = subprocess.run([*cmd, "--limit", "100", "--keep", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run 1/2 seed 0: ok" in out.stdout and "run 2/2 seed 1: ok" in out.stdout
    assert "2 runs under 0.05-0.1 s freezes: 0 failed" in out.stdout
    assert list(tmp_path.iterdir()) == []  # nothing kept: no run failed
    bad = subprocess.run([*cmd[:2], "--runs", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--runs" in bad.stderr
