"""Every ```python block of README.md runs as written, each on its own, in a fresh interpreter.

A block preceded by ``<!-- not-run: REASON -->`` is skipped with that reason
(there should be very few). Each block runs in a scratch directory with
``GRAFOS_FABRIC`` pointing at a namespace of its own, so what a block leaves
behind is visible: a block that leaves a shared-memory segment fails.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from grafos_fabric.drivers.shm import SHM_DIR

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:<!--\s*not-run:\s*(?P<why>.*?)\s*-->\s*\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip_reason)`` for each ```python block of ``text``."""
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        out.append((line, m.group("code"), m.group("why")))
    return out


BLOCKS = readme_blocks(README.read_text(encoding="utf-8")) if README.exists() else []


def test_the_readme_has_python_examples_and_few_are_skipped() -> None:
    if not README.exists():
        pytest.skip("README.md is not next to tests/ (installed without the sources)")
    assert len(BLOCKS) >= 3
    assert sum(1 for _, _, why in BLOCKS if why) <= 2


def test_the_block_finder_honours_not_run_markers() -> None:
    text = "x\n```python\nprint(1)\n```\n<!-- not-run: needs an RDMA NIC -->\n```python\nboom()\n```\n"
    (l1, c1, w1), (l2, c2, w2) = readme_blocks(text)
    assert (l1, c1, w1) == (3, "print(1)\n", None)
    assert (l2, c2, w2) == (7, "boom()\n", "needs an RDMA NIC")


@pytest.mark.parametrize(("line", "code", "why"), BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line: int, code: str, why: str | None, tmp_path: Path) -> None:
    if why:
        pytest.skip(f"README.md:{line} is marked not-run: {why}")
    namespace = "readme" + secrets.token_hex(4)
    env = dict(os.environ, GRAFOS_FABRIC=f"shm://{namespace}", PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stdout}\n{proc.stderr}"
        left = [n for n in os.listdir(SHM_DIR) if n.startswith(f"grafos.{namespace}.")]
        assert not left, f"README.md:{line} left shared-memory segments behind: {left}"
    finally:
        for n in os.listdir(SHM_DIR):
            if n.startswith(f"grafos.{namespace}.") or n == f"grafos-gen.{namespace}":
                os.unlink(os.path.join(SHM_DIR, n))
