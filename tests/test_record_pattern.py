"""tools/record_pattern.c, the C harness behind README "Two requests for a 1 MiB state": it builds
against the native CRC and runs (a short run; the figures are the benchmark's business)."""

from __future__ import annotations

import subprocess
from pathlib import Path

try:
    from _ctools import build_tool, direct_target
except ImportError:  # tests/ imported as a package
    from tests._ctools import build_tool, direct_target


def test_the_record_pattern_harness_builds_and_times_every_pattern(tmp_path: Path) -> None:
    exe, target = build_tool("record_pattern", tmp_path), direct_target(tmp_path)
    out = subprocess.run([str(exe), str(target), "0.5", str(64 << 10)], check=True, capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["raw", "two", "four", "four_nocrc", "one_aio", "crc_then_raw"]
    assert rows[0][2] == "1.000"
    for name, us, ratio, cpu in rows:
        assert float(us) > 0 and float(ratio) > 0 and float(cpu) >= 0, name
    bad = subprocess.run([str(exe), str(target), "0.1", "100"], capture_output=True, text=True)
    assert bad.returncode == 2 and "16 KiB" in bad.stderr
