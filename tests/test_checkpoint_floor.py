"""tools/checkpoint_floor.c, the C harness behind README "Where a 4 KiB checkpoint's time goes,
step by step": it builds against the native CRC and lanes and runs (a short run; the figures are
the benchmark's business)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

try:
    from _ctools import build_tool, direct_target
except ImportError:  # tests/ imported as a package
    from tests._ctools import build_tool, direct_target

CASES = ["raw", "record", "record_2places", "fresh_copy", "fresh_crc", "lane_copy", "lane_direct"]


@pytest.mark.parametrize(("size", "record"), [(4096, 8192), (1000, 4096)])
def test_the_floor_harness_times_every_step(tmp_path: Path, size: int, record: int) -> None:
    exe, target = build_tool("checkpoint_floor", tmp_path), direct_target(tmp_path)
    out = subprocess.run([str(exe), str(target), "0.5", str(size)], check=True, capture_output=True, text=True)
    head, *lines = out.stdout.splitlines()
    assert f"{size}-byte state" in head and f"record {record} bytes" in head
    rows = [line.split() for line in lines]
    assert [r[0] for r in rows] == CASES
    assert rows[0][2] == "1.000"
    for name, us, ratio, cpu in rows:
        assert float(us) > 0 and float(ratio) > 0 and float(cpu) >= 0, name


def test_the_floor_harness_refuses_bad_arguments(tmp_path: Path) -> None:
    exe, target = build_tool("checkpoint_floor", tmp_path), direct_target(tmp_path)
    for args in (["0.1", "0"], ["0.1", str(1 << 20)], ["0.1", "4096", "10"]):
        bad = subprocess.run([str(exe), str(target), *args], capture_output=True, text=True)
        assert bad.returncode == 2 and "BYTES must be" in bad.stderr, args
    usage = subprocess.run([str(exe)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
