"""Smoke tests of ``grafos-bench``: it runs, and its JSON has the promised shape.

Behaviour only: no timing is asserted, since figures on a shared CI machine
say nothing; only that every figure is there and positive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from grafos_fabric.tools.bench import auto_capacity, build_parser, parse_size

pytest.importorskip("rich")


def _fabric_available() -> bool:
    import grafos_fabric as gf

    return hasattr(gf, "FabricQueue") and hasattr(gf, "open_fabric")


def _run_bench(*args: str, timeout: float = 120.0) -> tuple[dict[str, Any], str]:
    """Run grafos-bench with ``--json -``; check it succeeded and left nothing in /dev/shm."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "grafos_fabric.tools.bench", "--json", "-", "--repeat", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"grafos-bench failed ({proc.returncode}):\n{err[-4000:]}"
    if os.path.isdir("/dev/shm"):
        left = [n for n in os.listdir("/dev/shm") if f"bench-{proc.pid}" in n]
        assert left == [], f"grafos-bench left shared memory behind: {left}"
    return json.loads(out), err


def test_bench_json_reports_every_case_with_positive_figures(tmp_path: Path) -> None:
    png = tmp_path / "ratios.png"
    doc, console = _run_bench(
        "--duration", "0.15", "--sizes", "64,4K", "--cases", "single,batch,reserve", "--plot", str(png)
    )

    assert doc["tool"] == "grafos-bench" and doc["schema"] == 1
    meta = doc["meta"]
    assert meta["driver"] == "shm" and meta["duration"] == 0.15 and meta["sizes"] == [64, 4096]
    assert "copyto" in doc["baselines"] and "mpqueue" in doc["baselines"]

    results = doc["results"]
    assert results, "no results"
    for r in results:
        assert r["ok"] is True and r["error"] is None, r
        assert r["items"] > 0 and r["seconds"] > 0 and r["items_per_s"] > 0 and r["mb_per_s"] > 0, r
        assert len(r["samples"]) == 1 and r["samples"][0] == pytest.approx(r["items_per_s"]), r
    seen = {(r["transport"], r["mode"], r["size"]) for r in results}
    for size in (64, 4096):
        assert ("copyto", "copy", size) in seen
        assert ("mpqueue", "single", size) in seen and ("mpqueue", "batch", size) in seen
        for peer in ("faster_fifo", "zmq"):
            if peer not in doc["skipped"]:
                assert (peer, "single", size) in seen and (peer, "batch", size) in seen

    # The tables and the list of what was compared go to stderr with --json -.
    assert "Compared against, measured in this run" in console

    if not _fabric_available():
        assert "fabric" in doc["skipped"]
        return
    for size in (64, 4096):
        for mode in ("single", "batch", "reserve"):
            assert ("fabric", mode, size) in seen
    assert len(doc["ratios"]) == 6
    for x in doc["ratios"]:
        assert x["vs_copyto"] > 0
        assert x["vs"] and all(v > 0 for v in x["vs"].values())
        assert x["best_peer"] in x["vs"] and x["vs_best_peer"] == min(x["vs"].values())
    targets = doc["targets"]
    assert [t["required"] for t in targets] == [2.0, 15.0, 15.0, 0.9]
    assert all(t["measured"] > 0 and isinstance(t["met"], bool) for t in targets[:3])
    assert targets[1]["measured"] <= targets[2]["measured"]  # the best of all peers is at least as fast
    assert targets[3]["measured"] is None and targets[3]["met"] is None  # no 1 MiB case in this run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_filters_limit_the_cases_that_run() -> None:
    doc, _ = _run_bench("--duration", "0.1", "--sizes", "64", "--cases", "single", "--peers", "zmq,copyto")
    seen = {(r["transport"], r["mode"]) for r in doc["results"]}
    expected = {("copyto", "copy")}
    if "zmq" not in doc["skipped"]:
        expected |= {("zmq", "single"), ("zmq", "batch")}
    if _fabric_available():
        expected.add(("fabric", "single"))
    assert seen == expected
    assert all(r["size"] == 64 for r in doc["results"])


def test_sizes_parse_with_binary_units() -> None:
    assert [parse_size(s) for s in ("64", "4K", "4KiB", "1M", "1 MiB", "2b")] == [64, 4096, 4096, 1 << 20, 1 << 20, 2]
    args = build_parser().parse_args(["--sizes", "64,4K,1MiB", "--peers", "none", "--cases", "batch"])
    assert args.sizes == [64, 4096, 1 << 20] and args.peers == [] and args.cases == ["batch"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--sizes", "12Q"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--peers", "kafka"])


def test_ring_capacity_is_a_power_of_two_that_holds_several_batches() -> None:
    for size, batch in ((64, 1024), (4096, 64), (1 << 20, 4), (100, 7)):
        cap = auto_capacity(size, batch)
        assert cap & (cap - 1) == 0
        assert cap >= 4 * (size + 64)


def test_bench_checkpoint_case_reports_rates_next_to_raw_fdatasync(tmp_path: Path) -> None:
    pytest.importorskip("grafos_fabric.tools.bench_checkpoint")
    doc, console = _run_bench(
        "--duration", "0.1", "--cases", "checkpoint", "--peers", "none", "--checkpoint-path", str(tmp_path)
    )
    rows = doc["checkpoint"]
    assert rows and {r["size"] for r in rows} == {4096, 1 << 20}
    for r in rows:
        assert r["ops_per_s"] > 0 and r["baseline_ops_per_s"] > 0 and r["ratio"] > 0, r
    assert doc["results"] == [] and "checkpoint (same run" in console
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_bench_relocation_case_reports_rebind_times_and_both_rates() -> None:
    pytest.importorskip("grafos_fabric.tools.bench_relocation")
    doc, console = _run_bench("--duration", "0.2", "--cases", "relocation", "--peers", "none")
    rows = doc["relocation"]
    assert rows
    for r in rows:
        assert "error" not in r, r
        assert r["steady_items_per_s"] > 0 and r["relocating_items_per_s"] > 0 and r["ratio"] > 0, r
        assert r["relocations"] > 0 and r["rebind_p99_ms"] >= r["rebind_p50_ms"] > 0, r
    assert "relocation (same run" in console


def test_bench_one_sided_access_runs_the_fabric_cases() -> None:
    if not _fabric_available():
        pytest.skip("grafos_fabric.FabricQueue is not in this build")
    doc, _ = _run_bench(
        "--duration",
        "0.1",
        "--sizes",
        "4K",
        "--cases",
        "single,batch,reserve",
        "--peers",
        "none",
        "--access",
        "one-sided",
    )
    assert doc["meta"]["access"] == "one-sided"
    assert {(r["transport"], r["mode"]) for r in doc["results"]} == {
        ("fabric", "single"),
        ("fabric", "batch"),
        ("fabric", "reserve"),
    }
    assert all(r["ok"] and r["items_per_s"] > 0 for r in doc["results"])
