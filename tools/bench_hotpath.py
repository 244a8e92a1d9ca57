"""Per-call cost of the queue's hot path, in one process (``python -m grafos_fabric.tools.bench_hotpath``).

What a call costs, without the scheduling of two processes in the way (which
``grafos-bench`` measures, and which on a loaded machine swamps the per-call
cost): producer and consumer calls alternate in one thread, on one queue, and
the clock is the process's CPU time (``time.process_time``), so time the
process spends preempted does not count. Each figure is the minimum over
``--rounds`` rounds, in CPU ns per item, with the median next to it; ratios
are taken in the same run. The producer cases drain the queue every few items
(``pop_batch`` + ``release``); that time is measured on its own and left out of
their figures (it is the same for each of them and would only dilute the
ratios), and is printed as the ``drain`` line.

Cases, per item size:

* ``push``: ``q.push(payload)`` of ready bytes (then drained in batches);
* ``pop+asarray``: ``item = q.pop(); np.asarray(item); item.release()`` (each item pushed first: both counted);
* ``pop_array``: ``arr = q.pop_array(); del arr`` (each item pushed first: both counted): the
  item as a ready array, released with it;
* ``drain``: what the producer cases spent in ``pop_batch`` + ``release`` per item (left out of theirs);
* ``produce``: ``np.add(a, b, out=tmp); q.push(tmp)``: production, then copy-in;
* ``reserve``: ``with q.reserve(n) as buf: np.add(a, b, out=buf)``: in place;
* ``reserve_batch``: ``with q.reserve_batch(k, n) as rows: np.add(A, B, out=rows)``, per row;
* ``produce_batch``: ``np.add(A, B, out=rows); q.push_batch(rows)``, per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import grafos_fabric as gf

SIZES = (64, 4096, 1 << 20)


class _Drain:
    """Empties the queue with ``pop_batch``; adds the CPU time it took to ``spent``."""

    def __init__(self, q: Any, most: int) -> None:
        self.q = q
        self.most = most  # a pop_batch as big as what was pushed (no larger arrays than needed)
        self.spent = 0.0

    def __call__(self) -> None:
        t0 = time.process_time()
        pop_batch = self.q.pop_batch
        while True:
            b = pop_batch(self.most, timeout=0)
            if not len(b):
                break
            b.release()
        self.spent += time.process_time() - t0


def _cases(q: Any, size: int, rows: int, drain: _Drain) -> dict[str, Callable[[int], None]]:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 128, size, dtype=np.uint8)
    b = rng.integers(0, 128, size, dtype=np.uint8)
    ra = rng.integers(0, 128, (rows, size), dtype=np.uint8)
    rb = rng.integers(0, 128, (rows, size), dtype=np.uint8)
    tmp = np.empty(size, dtype=np.uint8)
    tmp2 = np.empty((rows, size), dtype=np.uint8)
    payload = bytes(a)
    add = np.add
    per_drain = drain.most

    def push(n: int) -> None:
        for i in range(n):
            q.push(payload)
            if i % per_drain == per_drain - 1:
                drain()
        drain()

    def pop_asarray(n: int) -> None:
        asarray = np.asarray
        done = 0
        while done < n:
            k = min(per_drain, n - done)
            for _ in range(k):
                q.push(payload)
            for _ in range(k):
                item = q.pop()
                asarray(item)
                item.release()
            done += k

    def pop_array(n: int) -> None:
        pop_arr = q.pop_array
        done = 0
        while done < n:
            k = min(per_drain, n - done)
            for _ in range(k):
                q.push(payload)
            for _ in range(k):
                arr = pop_arr()
                del arr  # the item's space goes back with its array
            done += k

    def produce(n: int) -> None:
        for i in range(n):
            add(a, b, out=tmp)
            q.push(tmp)
            if i % per_drain == per_drain - 1:
                drain()
        drain()

    def reserve(n: int) -> None:
        res = q.reserve
        for i in range(n):
            with res(size) as buf:
                add(a, b, out=buf)
            if i % per_drain == per_drain - 1:
                drain()
        drain()

    def reserve_batch(n: int) -> None:
        done = 0
        while done < n:
            with q.reserve_batch(min(rows, n - done), size) as view:
                k = len(view)
                add(ra[:k], rb[:k], out=view)
            done += k
            drain()

    def produce_batch(n: int) -> None:
        done = 0
        while done < n:
            k = min(rows, n - done)
            add(ra[:k], rb[:k], out=tmp2[:k])
            q.push_batch(tmp2[:k])
            done += k
            drain()

    out: dict[str, Callable[[int], None]] = {"push": push, "pop+asarray": pop_asarray}
    if hasattr(q, "pop_array"):
        out["pop_array"] = pop_array
    out.update(produce=produce, reserve=reserve)
    if hasattr(q, "reserve_batch"):
        out["reserve_batch"] = reserve_batch
    out["produce_batch"] = produce_batch
    return out


def measure(sizes: tuple[int, ...], rounds: int, seconds: float) -> list[dict[str, Any]]:
    fabric = gf.open_fabric()
    results = []
    for size in sizes:
        cap = max(1 << 20, 1 << (4 * (size + 16) - 1).bit_length())
        q = gf.FabricQueue.create(fabric, capacity=cap, ttl=3600.0)
        try:
            rows = max(1, min(64, (cap // 4) // (size + 16)))
            drain = _Drain(q, rows)
            cases = _cases(q, size, rows, drain)
            # calibrate: items per round so that a round lasts about `seconds`
            counts: dict[str, int] = {}
            for name, fn in cases.items():
                t0 = time.process_time()
                fn(8)
                per = max(1e-7, (time.process_time() - t0) / 8)
                counts[name] = max(8, int(seconds / per))
            samples: dict[str, list[float]] = {name: [] for name in cases}
            samples["drain"] = []
            for _ in range(rounds):  # round-robin: every case sees the same conditions
                drained, items = 0.0, 0
                for name, fn in cases.items():
                    n = counts[name]
                    drain.spent = 0.0
                    t0 = time.process_time()
                    fn(n)
                    t = time.process_time() - t0
                    if name not in ("pop+asarray", "pop_array"):  # their pops are the case itself
                        drained += drain.spent
                        items += n
                        t -= drain.spent
                    samples[name].append(t / n * 1e9)
                samples["drain"].append(drained / items * 1e9)
            for name, s in samples.items():
                results.append({"size": size, "case": name, "min_ns": min(s), "median_ns": statistics.median(s),
                                "max_ns": max(s), "rounds": len(s)})
        finally:
            q.free()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,4096,1048576", help="item sizes in bytes (default 64,4096,1048576)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per case (default 7)")
    ap.add_argument("--seconds", type=float, default=0.1, help="seconds per case and round (default 0.1)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    res = measure(sizes, args.rounds, args.seconds)
    by = {(r["size"], r["case"]): r for r in res}
    print(f"CPU ns per item, min (median) of {args.rounds} rounds, one process")
    for r in res:
        print(f"{r['size']:>8} B  {r['case']:<14} {r['min_ns']:>10.0f} ({r['median_ns']:.0f})")
    print("ratios (items/s of the first ÷ the second, from the minima):")
    for size in sizes:
        for case, over in (("reserve", "produce"), ("reserve", "push"), ("reserve_batch", "produce_batch"),
                           ("reserve_batch", "push"), ("pop_array", "pop+asarray")):
            x, y = by.get((size, case)), by.get((size, over))
            if x and y:
                print(f"{size:>8} B  {case} ÷ {over}: {y['min_ns'] / x['min_ns']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
