"""Building the C harnesses under tools/ (each one file, linked with the native CRC and slot
records) and a scratch file they may write with O_DIRECT, for the tests that run them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build_tool(name: str, tmp_path: Path) -> Path:
    """tools/<name>.c built with warnings as errors into tmp_path (skips without a C compiler)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / name
    subprocess.run(
        [
            cc,
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(exe),
            str(ROOT / f"tools/{name}.c"),
            str(ROOT / "native/gf_crc.c"),
            "-I",
            str(ROOT / "native"),
            "-lpthread",
        ],
        check=True,
        capture_output=True,
    )
    return exe


def direct_target(tmp_path: Path) -> Path:
    """A file in tmp_path that O_DIRECT may open (skips where the file system refuses it)."""
    target = tmp_path / "scratch.img"
    try:
        os.close(os.open(target, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        pytest.skip(f"O_DIRECT refused on {tmp_path}: {exc}")
    return target
