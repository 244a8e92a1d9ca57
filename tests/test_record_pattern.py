"""tools/record_pattern.c, the C harness behind README "Two requests for a 1 MiB state": it builds
against the native CRC and runs (a short run; the figures are the benchmark's business)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_record_pattern_harness_builds_and_times_every_pattern(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    target = tmp_path / "scratch.img"
    try:
        os.close(os.open(target, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        pytest.skip(f"O_DIRECT refused on {tmp_path}: {exc}")
    exe = tmp_path / "record_pattern"
    subprocess.run(
        [
            cc,
            "-O2",
            "-Wall",
            "-Werror",
            "-o",
            str(exe),
            str(ROOT / "tools/record_pattern.c"),
            str(ROOT / "native/gf_crc.c"),
            "-I",
            str(ROOT / "native"),
            "-lpthread",
        ],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(exe), str(target), "0.5", str(64 << 10)], check=True, capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["raw", "two", "four", "four_nocrc", "one_aio", "crc_then_raw"]
    assert rows[0][2] == "1.000"
    for name, us, ratio, cpu in rows:
        assert float(us) > 0 and float(ratio) > 0 and float(cpu) >= 0, name
    bad = subprocess.run([str(exe), str(target), "0.1", "100"], capture_output=True, text=True)
    assert bad.returncode == 2 and "16 KiB" in bad.stderr
