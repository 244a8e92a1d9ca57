"""Buffer pieces benchmark: one large ``O_DIRECT`` durable write from several buffers, side by side.

A write's buffer reaches the device as one segment per physically
contiguous piece, and a virtual disk may charge per segment and split a
request at ``max_segments`` (README "Checkpoint speed": on this VM's
virtio-blk a 1 MiB write from 255-256 pieces ran 17-20% slower than one from
225-251). Which pieces an anonymous buffer gets is up to the page allocator,
and they stay for the buffer's life. This bench makes ``--buffers`` page-aligned
private buffers of ``--size`` bytes (and one on transparent huge pages, where
the kernel has them: ``grafos_fabric._memory``), writes each in 20 ms turns in
a random order (``pwritev`` with ``RWF_DSYNC`` on an ``O_DIRECT`` descriptor,
each buffer at its own place), and reports per buffer its rate in each half of
the run (each half gets at least one turn of every buffer, however long the
process was stalled), as a ratio to the fastest buffer's in the same half, and its number
of physical pieces read from ``/proc/self/pagemap`` (``None`` where the page
frames are hidden: reading them needs ``CAP_SYS_ADMIN``).

``python -m grafos_fabric.tools.bench_buffer_pieces [PATH] [--buffers N] [--size BYTES] [--seconds S]``:
PATH is a directory (a scratch file is made and removed there), a regular
file or a block device, whose first blocks are **overwritten**.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import logging
import mmap
import os
import random
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from grafos_fabric._memory import huge_mmap, huge_pages
from grafos_fabric.errors import FabricValueError
from grafos_fabric.tools.bench_checkpoint import ROUND_SECONDS, _target

__all__ = ["main", "physical_pieces", "run_buffer_pieces_bench"]

log = logging.getLogger(__name__)

_PFN = (1 << 55) - 1  # pagemap entry bits 0-54: the page frame number


def physical_pieces(view: memoryview) -> int | None:
    """How many physically contiguous pieces ``view``'s pages make (all of them resident), or None
    where ``/proc/self/pagemap`` hides page frames (they read as zero without ``CAP_SYS_ADMIN``)."""
    page = mmap.PAGESIZE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    first, last = addr // page, (addr + len(view) - 1) // page
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 8 * (last - first + 1), 8 * first)
    finally:
        os.close(fd)
    frames = [e & _PFN for e in struct.unpack(f"<{len(raw) // 8}Q", raw)]
    if not frames or not all(frames):
        return None
    return 1 + sum(1 for a, b in itertools.pairwise(frames) if b != a + 1)


def run_buffer_pieces_bench(
    path_or_dir: str | os.PathLike[str], buffers: int = 6, size: int = 1 << 20, seconds: float = 20.0
) -> list[dict[str, Any]]:
    """One dict per buffer: ``buffer`` (its name), ``pieces`` (or None), ``ops_per_s`` (the whole
    run) and ``ratio_first_half`` / ``ratio_second_half`` (its rate over the fastest buffer's in
    that half of the run)."""
    if not isinstance(buffers, int) or isinstance(buffers, bool) or buffers < 1:
        raise FabricValueError(f"buffers must be a positive int, got {buffers!r}")
    if not isinstance(size, int) or size < mmap.PAGESIZE or size % mmap.PAGESIZE:
        raise FabricValueError(f"size must be a positive multiple of {mmap.PAGESIZE}, got {size!r}")
    if not seconds > 0:
        raise FabricValueError(f"seconds must be positive, got {seconds!r}")
    dsync = getattr(os, "RWF_DSYNC", 0)
    maps: list[mmap.mmap] = []
    views: dict[str, memoryview] = {}
    for i in range(buffers):
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        maps.append(mm)
        views[f"page-aligned {i}"] = memoryview(mm)
    if huge_pages():
        mm, skip = huge_mmap(size)
        maps.append(mm)
        views["huge pages"] = memoryview(mm)[skip : skip + size]
    for v in views.values():
        v[:] = os.urandom(size)  # resident, and not pages of zeros
    rows: dict[str, dict[str, Any]] = {k: {"buffer": k, "pieces": physical_pieces(v)} for k, v in views.items()}
    halves: list[dict[str, list[float]]] = [{k: [0.0, 0.0] for k in views} for _ in range(2)]
    try:
        with _target(path_or_dir, (len(views) + 1) * 2 * size) as region:
            fd, bs = region.fileno(), region.block_size
            place = {k: region.offset + i * -(-2 * size // bs) * bs for i, k in enumerate(views)}

            def write(k: str) -> None:
                if dsync:
                    os.pwritev(fd, [views[k]], place[k], dsync)
                else:
                    os.pwritev(fd, [views[k]], place[k])
                    os.fdatasync(fd)

            for k in views:  # warm up: first writes allocate
                write(k)
                write(k)
            order = list(views)
            start = time.perf_counter()
            sweeps = [0, 0]  # per half: a stall (a stopped VM) must not leave a half unmeasured
            while (now := time.perf_counter()) < start + seconds or not sweeps[1]:
                which = 0 if now < start + seconds / 2 or not sweeps[0] else 1
                sweeps[which] += 1
                half = halves[which]
                random.shuffle(order)
                for k in order:
                    n, t0 = 0, time.perf_counter()
                    while True:
                        write(k)
                        n += 1
                        t1 = time.perf_counter()
                        if t1 >= t0 + ROUND_SECONDS:
                            break
                    half[k][0] += n
                    half[k][1] += t1 - t0
    finally:
        for v in views.values():
            v.release()
        for mm in maps:
            mm.close()
    for h, name in zip(halves, ("ratio_first_half", "ratio_second_half"), strict=True):
        rates = {k: c / t if t else 0.0 for k, (c, t) in h.items()}
        best = max(rates.values()) or 1.0
        for k, r in rates.items():
            rows[k][name] = r / best
    for k in views:
        ops = halves[0][k][0] + halves[1][k][0]
        secs = halves[0][k][1] + halves[1][k][1]
        rows[k]["ops_per_s"] = ops / secs if secs else 0.0
        log.info("%s", rows[k])
    return list(rows.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("path", nargs="?", default=".", help="directory, file or block device (overwritten)")
    parser.add_argument("--buffers", type=int, default=6, help="page-aligned buffers to compare")
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per write")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the run (two halves)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows = run_buffer_pieces_bench(args.path, args.buffers, args.size, args.seconds)
    sys.stdout.write(f"{'buffer':<18}{'pieces':>8}{'ops/s':>10}{'1st half':>10}{'2nd half':>10}\n")
    for r in rows:
        pieces = "?" if r["pieces"] is None else str(r["pieces"])
        sys.stdout.write(
            f"{r['buffer']:<18}{pieces:>8}{r['ops_per_s']:>10,.0f}"
            f"{r['ratio_first_half']:>10.3f}{r['ratio_second_half']:>10.3f}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
