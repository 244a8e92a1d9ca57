"""Checkpoint benchmark: checkpoints per second next to the raw ``write + fdatasync`` rate.

For each state size, in the same run and on the same file or device range:

* **baseline**: ``pwrite`` of ``size`` bytes (rounded up to whole blocks) from
  a page-aligned buffer on the region's own ``O_DIRECT`` descriptor, then
  ``fdatasync``: one durable write, the floor any durable checkpoint pays;
* **candidate**: ``CheckpointedStageState.checkpoint()`` of a ``size``-byte raw
  state, once with ``durability="ordered"`` (the default) and once with
  ``"single-sync"``. Since slot format v3 both write the whole record (header
  and data) in one request and flush once; a checkpoint still pays what the
  baseline does not: a copy of the state into an aligned buffer, its CRC32C,
  and one more block (the 64-byte header plus envelope push a 4 KiB state to
  two blocks).

Baseline and candidate alternate every 20 ms so that drift in the device
(write cache, other tenants of a shared disk) hits both alike; the baseline
writes just past the checkpoint's two slots, on the same file or device. A
case runs ``rounds`` rounds (default 5); each round gives a ratio (candidate
rate / baseline rate in that round), and the row reports their median as
``ratio`` with ``ratio_min`` and ``ratio_max`` as the spread, next to the
target from issue 14 (0.9x ordered, 0.95x single-sync).

``python -m grafos_fabric.tools.bench_checkpoint [PATH] [--seconds S]``: PATH
is a directory (a scratch file is made and removed there; default: the
current directory), a regular file, or a block device, whose first blocks are
**overwritten**.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import mmap
import os
import stat
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from grafos_fabric.checkpoint import ENVELOPE_SIZE, CheckpointedStageState
from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import FabricValueError
from grafos_fabric.slots import DATA_OFFSET

__all__ = ["main", "run_checkpoint_bench"]

log = logging.getLogger(__name__)

ROUND_SECONDS = 0.02  # baseline and candidate alternate this often, so noise from neighbours hits both
_STAGE = "bench"
_OVERHEAD = DATA_OFFSET + ENVELOPE_SIZE + len(_STAGE)  # slot header + checkpoint envelope + stage name
TARGETS = {"ordered": 0.9, "single-sync": 0.95}  # issue 14: checkpoint rate / raw write + fdatasync rate


def _human(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


@contextlib.contextmanager
def _target(path_or_dir: str | os.PathLike[str], nbytes: int) -> Iterator[BlockRegion]:
    """A region of at least ``nbytes`` on the named directory, file or block device."""
    path = Path(path_or_dir)
    scratch: Path | None = None
    if path.is_dir():
        scratch = path / f".grafos-ckpt-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}.img"
        target = scratch
    else:
        target = path
    try:
        if target.exists() and stat.S_ISBLK(target.stat().st_mode):
            region = open_block(target)
        else:
            region = open_block(target, create_size=max(nbytes, target.stat().st_size if target.exists() else 0))
        with region:
            yield region
    finally:
        if scratch is not None:
            with contextlib.suppress(FileNotFoundError):
                scratch.unlink()


def _run_for(fn: Callable[[], Any], seconds: float) -> tuple[int, float]:
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        fn()
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n, now - t0


def run_checkpoint_bench(
    path_or_dir: str | os.PathLike[str],
    sizes: Sequence[int] = (4096, 1 << 20),
    seconds: float = 2.0,
    progress: Callable[[str], None] | None = None,
    rounds: int = 5,
) -> list[dict[str, Any]]:
    """Measure checkpoints/s against raw ``write + fdatasync``/s; one dict per case.

    Each dict has ``case`` (e.g. ``"checkpoint 4 KiB ordered"``), ``size``
    (state bytes), ``ops_per_s`` and ``baseline_ops_per_s`` (over all rounds),
    ``ratio`` (the median of the rounds' ratios), ``ratio_min``, ``ratio_max``,
    ``rounds``, ``target`` and ``met`` (median ratio >= target).
    ``seconds`` is spent on each case's candidate and again on its baseline,
    split over ``rounds`` rounds. ``progress`` (optional) is called with a
    line of text as each case ends.
    """
    if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes):
        raise FabricValueError(f"sizes must be positive ints, got {sizes!r}")
    if not seconds > 0:
        raise FabricValueError(f"seconds must be positive, got {seconds!r}")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise FabricValueError(f"rounds must be a positive int, got {rounds!r}")
    results: list[dict[str, Any]] = []
    big, max_bs = max(sizes), 1 << 16
    span = 2 * (big + _OVERHEAD + 2 * max_bs) + big + max_bs  # two slots, then the baseline's blocks
    with _target(path_or_dir, span) as region:
        bs = region.block_size
        fd = region.fileno()
        log.info(
            "checkpoint bench on %s: %d-byte blocks, %s, baseline = pwrite + fdatasync",
            region.path,
            bs,
            "O_DIRECT" if region.direct else "buffered (O_DIRECT refused)",
        )
        for size in sizes:
            slot_blocks = -(-(size + _OVERHEAD) // bs)
            if 2 * slot_blocks + -(-size // bs) > region.nblocks:
                raise FabricValueError(f"{region.path} is too small for a {size}-byte checkpoint")
            with open_block(region.path, region.offset, 2 * slot_blocks * bs) as ckpt_region:
                ckpt_region.write_blocks(0, bytes(ckpt_region.nbytes))  # a blank area for this geometry
                ckpt_region.sync()
                raw_len = -(-size // bs) * bs
                buf = mmap.mmap(-1, max(raw_len, mmap.PAGESIZE))
                buf.write(os.urandom(raw_len))
                view = memoryview(buf)[:raw_len]
                raw_pos = ckpt_region.offset + ckpt_region.nbytes  # next to the slots, not over them

                def baseline(view: memoryview = view, raw_pos: int = raw_pos) -> None:
                    os.pwritev(fd, [view], raw_pos)
                    os.fdatasync(fd)

                for durability in ("ordered", "single-sync"):
                    state = CheckpointedStageState(
                        os.urandom(size), ckpt_region, codec="raw", stage=_STAGE, durability=durability
                    )
                    state.checkpoint()  # warm up: first write allocates, later ones overwrite
                    state.checkpoint()
                    baseline()
                    ops = base_ops = 0
                    t = base_t = 0.0
                    ratios = []
                    per_round = seconds / rounds
                    pieces = max(2, round(per_round / ROUND_SECONDS))
                    for _ in range(rounds):
                        r_ops = r_base = 0
                        r_t = r_base_t = 0.0
                        for _ in range(pieces):
                            n, dt = _run_for(baseline, per_round / pieces)
                            r_base, r_base_t = r_base + n, r_base_t + dt
                            n, dt = _run_for(state.checkpoint, per_round / pieces)
                            r_ops, r_t = r_ops + n, r_t + dt
                        ratios.append((r_ops / r_t) / (r_base / r_base_t))
                        ops, t, base_ops, base_t = ops + r_ops, t + r_t, base_ops + r_base, base_t + r_base_t
                    rate, base_rate = ops / t, base_ops / base_t
                    target = TARGETS[durability]
                    row = {
                        "case": f"checkpoint {_human(size)} {durability}",
                        "size": size,
                        "ops_per_s": rate,
                        "baseline_ops_per_s": base_rate,
                        "ratio": statistics.median(ratios),
                        "ratio_min": min(ratios),
                        "ratio_max": max(ratios),
                        "rounds": rounds,
                        "target": target,
                        "met": statistics.median(ratios) >= target,
                    }
                    results.append(row)
                    line = (
                        f"{row['case']}: {rate:,.0f}/s vs write+fdatasync {base_rate:,.0f}/s "
                        f"= {row['ratio']:.2f}x median of {rounds} rounds "
                        f"[{row['ratio_min']:.2f}, {row['ratio_max']:.2f}] "
                        f"(target {target:g}x; {region.path}, {bs}-byte blocks)"
                    )
                    log.info("%s", line)
                    if progress is not None:
                        progress(line)
                view.release()
                buf.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("path", nargs="?", default=".", help="directory, file or block device (overwritten)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per case and per baseline")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 1 << 20])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (the median ratio is reported)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = run_checkpoint_bench(args.path, sizes=args.sizes, seconds=args.seconds, rounds=args.rounds)
    sys.stdout.write(
        f"{'case':<32}{'ops/s':>10}{'write+fdatasync/s':>19}{'ratio':>7}{'min':>6}{'max':>6}{'target':>8}\n"
    )
    for r in rows:
        sys.stdout.write(
            f"{r['case']:<32}{r['ops_per_s']:>10,.0f}{r['baseline_ops_per_s']:>19,.0f}{r['ratio']:>7.2f}"
            f"{r['ratio_min']:>6.2f}{r['ratio_max']:>6.2f}{r['target']:>7g}x\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
