"""Large checkpoint buffers on transparent huge pages (grafos_fabric._memory)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from grafos_fabric import _memory
from grafos_fabric.checkpoint import CheckpointedStageState
from grafos_fabric.drivers.block import BlockRegion, open_block

try:
    from _realtime import StalledTime
except ImportError:  # tests/ imported as a package
    from tests._realtime import StalledTime

MIB = 1 << 20


def _vma_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds addr (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _addr(a: Any) -> int:
    return int(np.asarray(a).ctypes.data)


needs_thp = pytest.mark.skipif(
    not _memory._kernel_huge_pages(), reason="this kernel has no transparent huge pages (or they are 'never')"
)


@needs_thp
def test_a_huge_mapping_starts_its_payload_on_a_2_mib_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFOS_NO_HUGE_PAGES", raising=False)
    assert _memory.huge_pages()
    for nbytes in (MIB, MIB + 4096, 5 * MIB):
        mm, skip = _memory.huge_mmap(nbytes)
        arr = np.frombuffer(mm, dtype=np.uint8)
        start = _addr(arr) + skip
        assert start % _memory.HUGE_PAGE == 0 and skip >= 0 and skip + nbytes <= len(mm)
        assert not arr[skip : skip + nbytes].any()  # zeroed
        assert "hg" in _vma_flags(start)  # advised MADV_HUGEPAGE
        del arr
        mm.close()


@pytest.fixture
def region(tmp_path: Path) -> Iterator[BlockRegion]:
    with open_block(tmp_path / "ck.img", 0, 8 * MIB, create_size=8 * MIB) as r:
        yield r


def test_no_huge_pages_when_the_environment_says_so(region: BlockRegion, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFOS_NO_HUGE_PAGES", "1")
    assert not _memory.huge_pages()
    st = CheckpointedStageState.with_buffer(region, MIB, stage="s")
    assert "hg" not in _vma_flags(_addr(st.state))


@needs_thp
def test_a_large_aligned_state_lives_on_huge_pages_and_round_trips(
    region: BlockRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAFOS_NO_HUGE_PAGES", raising=False)
    st = CheckpointedStageState.with_buffer(region, MIB, stage="s", durability="single-sync")
    assert _addr(st.state) % _memory.HUGE_PAGE == 0 and "hg" in _vma_flags(_addr(st.state))
    small = CheckpointedStageState.with_buffer(region, 64 << 10, stage="t")  # under HUGE_MIN: as before
    assert "hg" not in _vma_flags(_addr(small.state))
    rng = np.random.default_rng(7)
    for _ in range(4):  # the first writes, then the lane's
        st.state[:] = rng.integers(0, 256, MIB, dtype=np.uint8)
        st.checkpoint()
    back = CheckpointedStageState.restore(region, stage="s")
    assert bytes(np.asarray(back.state)) == bytes(st.state)


@needs_thp
def test_a_huge_buffer_is_private_to_a_forked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFOS_NO_HUGE_PAGES", raising=False)
    mm, skip = _memory.huge_mmap(MIB)
    view = memoryview(mm)
    view[skip] = 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            view[skip] = 2
            os.write(w, bytes([view[skip]]))
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and got == b"\x02"
    assert view[skip] == 1  # the child's write stayed in the child
    view.release()
    mm.close()


@pytest.mark.parametrize("nbytes", [4096, MIB])
def test_an_aligned_state_is_private_to_a_forked_child(region: BlockRegion, nbytes: int) -> None:
    st = CheckpointedStageState.with_buffer(region, nbytes, stage="s")
    st.state[0] = 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        st.state[0] = 2
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert st.state[0] == 1  # a numpy array, not memory shared with the child


def test_the_buffer_pieces_bench_measures_both_halves_after_a_stall_past_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grafos_fabric.tools import bench_buffer_pieces

    stalled = StalledTime(10.0)  # longer than the whole run
    monkeypatch.setattr(bench_buffer_pieces, "time", stalled)
    rows = bench_buffer_pieces.run_buffer_pieces_bench(tmp_path, buffers=2, size=64 << 10, seconds=0.3)
    assert stalled.readings > 1  # the stall happened
    for half in ("ratio_first_half", "ratio_second_half"):  # both measured: not a zero for "no turn"
        assert max(r[half] for r in rows) == 1.0 and all(0 < r[half] <= 1.0 for r in rows)
    assert list(tmp_path.glob(".grafos-ckpt-bench-*")) == []


def test_the_buffer_pieces_bench_compares_buffers_and_counts_their_pieces(tmp_path: Path) -> None:
    from grafos_fabric.tools.bench_buffer_pieces import main, physical_pieces, run_buffer_pieces_bench

    size = 256 << 10
    rows = run_buffer_pieces_bench(tmp_path, buffers=3, size=size, seconds=0.3)
    names = [r["buffer"] for r in rows]
    assert names[:3] == ["page-aligned 0", "page-aligned 1", "page-aligned 2"]
    assert names[3:] == (["huge pages"] if _memory.huge_pages() else [])
    for half in ("ratio_first_half", "ratio_second_half"):  # each over the fastest buffer of that half
        assert max(r[half] for r in rows) == 1.0 and all(0 < r[half] <= 1.0 for r in rows)
    assert all(r["ops_per_s"] > 0 for r in rows)
    root = os.geteuid() == 0  # page frames are visible to CAP_SYS_ADMIN only
    for r in rows:
        assert (1 <= r["pieces"] <= size // 4096) if root else r["pieces"] is None
    assert list(tmp_path.glob(".grafos-ckpt-bench-*")) == []  # the scratch file is gone
    if root:  # eight resident pages make one to eight pieces
        mm = mmap.mmap(-1, 4096 * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = memoryview(mm)
        view[:] = b"\1" * len(view)
        pieces = physical_pieces(view)
        assert pieces is not None and 1 <= pieces <= 8
        view.release()
        mm.close()
    assert main([str(tmp_path), "--buffers", "1", "--size", "65536", "--seconds", "0.1"]) == 0


def test_the_buffer_pieces_bench_refuses_nonsense_arguments(tmp_path: Path) -> None:
    from grafos_fabric.errors import FabricValueError
    from grafos_fabric.tools.bench_buffer_pieces import run_buffer_pieces_bench

    for kwargs in ({"buffers": 0}, {"size": 1000}, {"seconds": 0}):
        with pytest.raises(FabricValueError):
            run_buffer_pieces_bench(tmp_path, **kwargs)  # type: ignore[arg-type]
