"""Smoke tests of ``grafos-bench``: it runs, and its JSON has the promised shape.

Behaviour only: no timing is asserted, since figures on a shared CI machine
say nothing; only that every figure is there and positive.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from grafos_fabric.tools import bench_report
from grafos_fabric.tools.bench import EXIT_MISSING_EXTRA, auto_capacity, build_parser, main, parse_size
from grafos_fabric.tools.bench_runner import CaseResult

pytest.importorskip("rich", reason="grafos-bench needs the [bench] extra (rich)")

PROGRESS = re.compile(r"^\[\s*\d+/\d+\] ")


def _fabric_available() -> bool:
    import grafos_fabric as gf

    return hasattr(gf, "FabricQueue") and hasattr(gf, "open_fabric")


def _run_bench(*args: str, timeout: float = 120.0) -> tuple[dict[str, Any], str]:
    """Run grafos-bench with ``--json -``; check it succeeded and left nothing in /dev/shm."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "grafos_fabric.tools.bench", "--json", "-", "--rounds", "1", *args],
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

    assert doc["tool"] == "grafos-bench" and doc["schema"] == 2
    meta = doc["meta"]
    assert meta["driver"] == "shm" and meta["duration"] == 0.15 and meta["sizes"] == [64, 4096]
    assert "copyto" in doc["baselines"] and "mpqueue" in doc["baselines"]

    results = doc["results"]
    assert results, "no results"
    for r in results:
        assert r["ok"] is True and r["error"] is None, r
        assert r["items"] > 0 and r["seconds"] > 0 and r["items_per_s"] > 0 and r["mb_per_s"] > 0, r
        assert len(r["samples"]) == 1 and r["samples"][0] == pytest.approx(r["items_per_s"]), r
        assert r["rounds"] == 1 and r["min_items_per_s"] == r["max_items_per_s"] == r["items_per_s"], r
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
    assert "targets" not in doc and "Targets" not in console and "issue" not in console
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Not a terminal: one flushed progress line per case, and tables that fit 80 columns uncut.
    progress = [line for line in console.splitlines() if PROGRESS.match(line)]
    assert len(progress) == len(results), progress
    assert all(f"/{len(results)}]" in line for line in progress)
    assert "…" not in console
    too_wide = [line for line in console.splitlines() if len(line) > 80 and not PROGRESS.match(line)]
    assert too_wide == []


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


def test_bench_single_array_case_pops_ready_arrays_and_is_set_against_single() -> None:
    if not _fabric_available():
        pytest.skip("grafos_fabric.FabricQueue is not available in this build")
    doc, _ = _run_bench("--duration", "0.1", "--sizes", "64", "--cases", "single,single_array", "--peers", "none")
    fab = {r["mode"]: r for r in doc["results"] if r["transport"] == "fabric"}
    assert set(fab) == {"single", "single_array"} and all(r["ok"] and r["items_per_s"] > 0 for r in fab.values())
    ratios = {(r["case"], r["over"]): r["ratio"] for r in doc["self_ratios"]}
    assert ratios[("single_array", "single")] > 0


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
        assert r["segments_left"] == 0, r  # the producer freed its queue and its standby queue
    assert "relocation (same run" in console


def test_bench_one_sided_access_runs_the_fabric_cases() -> None:
    if not _fabric_available():
        pytest.skip("grafos_fabric.FabricQueue is not in this build")
    doc, _ = _run_bench(  # 0.3 s: on a loaded machine 0.1 s of one-sided 4 KiB pushes was one consumer step
        "--duration",
        "0.3",
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


def test_each_case_reports_the_median_of_its_rounds_with_min_and_max() -> None:
    r = CaseResult("fabric", "batch", 64, items=100, seconds=1.0)
    for rate in (500.0, 300.0):
        r.merge(CaseResult("fabric", "batch", 64, items=int(rate), seconds=1.0))
    assert r.samples == [100.0, 500.0, 300.0]
    assert (r.items_per_s, r.min_per_s, r.max_per_s, r.rounds) == (300.0, 100.0, 500.0, 3)
    assert r.mb_per_s == pytest.approx(300.0 * 64 / 1e6)
    failed = CaseResult("fabric", "batch", 64, error="worker died")
    r.merge(failed)
    assert not r.ok and r.items_per_s == 0.0 and r.to_dict()["error"] == "worker died"


def test_rounds_run_round_robin_and_report_the_median() -> None:
    doc, console = _run_bench(
        "--duration", "0.05", "--sizes", "64", "--cases", "batch", "--peers", "copyto", "--rounds", "3"
    )
    assert doc["meta"]["rounds"] == 3
    for r in doc["results"]:
        assert r["rounds"] == 3 and len(r["samples"]) == 3, r
        assert r["items_per_s"] == pytest.approx(sorted(r["samples"])[1])
        assert r["min_items_per_s"] == min(r["samples"]) and r["max_items_per_s"] == max(r["samples"])
    assert "median of 3 rounds" in console
    assert len([line for line in console.splitlines() if PROGRESS.match(line)]) == 3 * len(doc["results"])


@pytest.mark.parametrize(
    ("blocked", "argv", "says"),
    [
        ("matplotlib", ["--plot", "x.png"], "--plot needs matplotlib: pip install 'grafos-fabric[bench]'"),
        ("rich", [], "grafos-bench needs rich: pip install 'grafos-fabric[bench]'"),
    ],
)
def test_a_missing_extra_is_named_before_anything_runs(monkeypatch, capsys, tmp_path, blocked, argv, says) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.chdir(tmp_path)
    assert main(["--sizes", "64", *argv]) == EXIT_MISSING_EXTRA
    _, err = capsys.readouterr()
    assert says in err
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_the_plot_has_ratio_bars_with_values_and_checkpoint_and_relocation_panels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs the [bench] extra (matplotlib)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [
        bench_report.Ratio(64, "single", 4e5, 25.6, 0.2, {"mpqueue": 2.0, "zmq": 0.25}, 0.5, "zmq", 0.25),
        bench_report.Ratio(64, "batch", 4e7, 2560.0, 7.8, {"mpqueue": 30.0, "zmq": 1.1}, 9.0, "zmq", 1.1),
    ]
    extra = {
        "checkpoint": [{"case": "checkpoint 4 KiB ordered", "size": 4096, "ratio": 0.45}],
        "relocation": [{"handoff": "/dev/shm (tmpfs)", "rebind_p50_ms": 0.4, "rebind_p99_ms": 0.5, "ratio": 0.98}],
    }
    saved: list[Any] = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig: Any, *args: Any, **kwargs: Any) -> None:
        saved.append(fig)
        real_savefig(fig, *args, **kwargs)

    png = tmp_path / "p.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "savefig", keep)
        mp.setattr(plt, "close", lambda fig=None: None)
        bench_report.plot(ratios, ["mpqueue", "zmq"], str(png), "title", extra=extra)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = saved
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["title", "checkpoint", "relocation: consumer rebind time"]
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"2", "0.25", "30", "7.8", "0.45", "0.40", "0.50"} <= texts  # values on the bars
    plt.close(fig)


def test_bench_hotpath_reports_every_case_and_the_reserve_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafos_fabric.tools import bench_hotpath

    out = tmp_path / "hot.json"
    assert bench_hotpath.main(["--sizes", "64", "--rounds", "1", "--seconds", "0.005", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {r["case"] for r in res} == {
        "push", "pop+asarray", "pop_array", "produce", "reserve", "reserve_batch", "produce_batch", "drain",
    }
    assert all(r["min_ns"] > 0 for r in res)
    text = capsys.readouterr().out
    assert "reserve ÷ produce" in text and "reserve_batch ÷ produce_batch" in text
    assert "pop_array ÷ pop+asarray" in text
