"""Run the pipeline demo again and again while its processes are frozen now and then, as a stalled VM does.

Every stage and the supervisor are stopped together (``SIGSTOP`` to the run's
process group) for ``--freeze LO HI`` seconds, every 0.1-0.6 s, then
continued: the clocks run on meanwhile, so leases expire, relocations pile
up and the edges' replays race their consumers' acks. A run that does not
finish within ``--limit`` seconds prints each live stage's stacks and edge
state (the demo's hang report) and its whole output is kept in ``--keep``.
This is how the replay window's hang (README "Pipelines") was found: 2
hangs in 70 runs before the fix.

``python examples/freeze_demo.py --runs 40 [--items 5000000] [--freeze 0.3 0.7] [--limit 40]``;
exit status 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent / "pipeline_demo.py"


def _freezer(pgid: int, lo: float, hi: float, stop: threading.Event, rng: random.Random) -> None:
    """Stop and continue the process group ``pgid`` until ``stop`` is set or the group is gone."""
    while not stop.wait(rng.uniform(0.1, 0.6)):
        try:
            os.killpg(pgid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        time.sleep(rng.uniform(lo, hi))
        try:
            os.killpg(pgid, signal.SIGCONT)
        except ProcessLookupError:
            return


def run_once(items: int, seed: int, lo: float, hi: float, limit: float, rng: random.Random) -> tuple[int, str, float]:
    """One demo run under freezes: (its exit status, its output, seconds)."""
    cmd = [sys.executable, str(DEMO), "--items", str(items), "--seed", str(seed), "--limit", str(limit)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    stop = threading.Event()
    t = threading.Thread(target=_freezer, args=(proc.pid, lo, hi, stop, rng), daemon=True)
    t.start()
    try:
        out, _ = proc.communicate(timeout=limit + 60)
    except subprocess.TimeoutExpired:  # the demo's own limit did not end it: kill the whole group
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    finally:
        stop.set()
        t.join()
        try:
            os.killpg(proc.pid, signal.SIGCONT)  # never leave a stage stopped
        except ProcessLookupError:
            pass
    return proc.returncode, out.decode(errors="replace"), time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--items", type=int, default=5_000_000)
    ap.add_argument("--freeze", type=float, nargs=2, default=(0.3, 0.7), metavar=("LO", "HI"))
    ap.add_argument("--limit", type=float, default=40.0, help="a run that takes longer is a hang")
    ap.add_argument("--keep", default="freeze-demo-failures", help="where failing runs' output goes")
    ap.add_argument("--seed", type=int, default=0, help="the first run's demo seed (then +1 each run)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.items < 1 or not 0 <= args.freeze[0] <= args.freeze[1] or args.limit <= 0:
        ap.error("--runs and --items must be positive, --freeze LO <= HI, --limit positive")
    rng = random.Random(args.seed)
    fails = 0
    times = []
    for i in range(args.runs):
        seed = args.seed + i
        rc, out, secs = run_once(args.items, seed, args.freeze[0], args.freeze[1], args.limit, rng)
        times.append(secs)
        ok = rc == 0 and "OK: nothing lost" in out
        if not ok:
            fails += 1
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"run{i}-seed{seed}.log").write_text(out)
        verdict = "ok" if ok else f"FAILED (exit {rc})"
        print(f"run {i + 1}/{args.runs} seed {seed}: {verdict} in {secs:.1f} s", flush=True)
    times.sort()
    print(
        f"{args.runs} runs under {args.freeze[0]}-{args.freeze[1]} s freezes: {fails} failed; "
        f"run time median {times[len(times) // 2]:.1f} s, max {times[-1]:.1f} s"
    )
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
