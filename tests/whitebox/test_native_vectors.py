"""The native libraries leave no dirty upper vector state behind.

A function that writes the upper halves of ``ymm0-15``/``zmm0-15`` and returns
without ``vzeroupper`` leaves them dirty for everything the process runs next:
SSE code pays a transition penalty and the core may keep a lower frequency
licence. ``vpclmul_run`` (the AVX-512 CRC32C) did, because GCC inserted no
``vzeroupper`` before its tail call, and every raw write of the checkpoint
bench in the same process ran about 5% slower for it (README "Checkpoint
speed"). The check reads the built code, so it holds for whatever compiler
built it: every function that writes one of those registers must clear them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import grafos_fabric

PKG = Path(grafos_fabric.__file__).parent
NATIVE = Path(__file__).resolve().parents[2] / "native"
# a write to ymm0-15 or zmm0-15: AT&T syntax puts the destination last
_DEST = re.compile(r"%[yz]mm([0-9]|1[0-5])\s*(\{[^}]*\}\s*)*$")
_FUNC = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")


def _functions(so: Path) -> dict[str, list[str]]:
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(so)], check=True, capture_output=True, text=True
    ).stdout
    funcs: dict[str, list[str]] = {}
    name = None
    for line in out.splitlines():
        m = _FUNC.match(line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name is not None and "\t" in line:
            funcs[name].append(line.split("\t", 1)[1].strip())
    return funcs


def _dirtying(so: Path) -> dict[str, bool]:
    """Functions that write an upper vector register -> whether they also run vzeroupper."""
    found = {}
    for name, insns in _functions(so).items():
        if any(_DEST.search(i) and not i.startswith("vzero") for i in insns):
            found[name] = any(i.startswith(("vzeroupper", "vzeroall")) for i in insns)
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("lib", sorted(p.name for p in PKG.glob("_*.so")))
def test_every_function_that_dirties_the_upper_vector_registers_clears_them(lib: str) -> None:
    dirty = _dirtying(PKG / lib)
    assert not [name for name, clears in dirty.items() if not clears], dirty


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_the_check_sees_the_avx512_crc() -> None:
    # the check above would pass on a library with no vector code at all: make sure it looks at
    # the one function that has some, where the compiler built it
    so = PKG / "_native.abi3.so"
    funcs = _functions(so)
    if "vpclmul_run" not in funcs:
        pytest.skip("this build has no AVX-512 CRC32C (vpclmul_run): nothing to look at")
    assert _dirtying(so).get("vpclmul_run") is True


@pytest.mark.skipif(
    shutil.which("objdump") is None or shutil.which("gcc") is None, reason="objdump or gcc is not installed"
)
@pytest.mark.parametrize("opt", ["-O1", "-O2", "-O3"])
def test_the_crc_clears_them_at_every_optimisation_level(opt: str, tmp_path: Path) -> None:
    # tools/sanitize.sh builds at -O1, where GCC inlines less: the fold helpers are always_inline so
    # that no call passes vectors in zmm registers and returns without clearing them
    obj = tmp_path / "gf_crc.o"
    subprocess.run(
        ["gcc", opt, "-std=gnu11", "-fPIC", "-c", str(NATIVE / "gf_crc.c"), "-o", str(obj)],
        check=True,
        capture_output=True,
    )
    dirty = _dirtying(obj)
    assert not [name for name, clears in dirty.items() if not clears], dirty
