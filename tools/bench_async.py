"""Wake-up latency of ``await q.apop()`` against a blocking ``q.pop()``, in one run.

A producer process pushes one item every ``interval`` seconds carrying its
``CLOCK_MONOTONIC`` push time (the clock is host-wide, so two processes can
compare it). The consumer, in this process, takes each item with a blocking
``pop()`` in one round and with ``await apop()`` on an asyncio loop in the next
(rounds alternate, so drift favours neither), and records *wake-up latency* =
time the item reached the consumer's code - time it was pushed. The consumer
is idle between items, so every item measures a sleeping waiter being woken:
a futex wake for ``pop``, the same futex wake in a worker thread plus a
``call_soon_threadsafe`` hop for ``apop``.

``python -m grafos_fabric.tools.bench_async [--items N] [--rounds R] [--interval S] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import grafos_fabric as gf
from grafos_fabric.drivers.shm import ShmFabric

__all__ = ["main", "run_async_bench"]


def _producer(url: str, loc: bytes, n: int, interval: float, go: Any) -> None:
    q = gf.FabricQueue.attach(gf.open_fabric(url), gf.QueueLocator.from_bytes(loc))
    go.wait()
    for _ in range(n):
        time.sleep(interval)
        q.push(time.monotonic_ns().to_bytes(8, "little"), timeout=30)
    q.close()


def _latency_us(item: Any) -> float:
    now = time.monotonic_ns()
    sent = int.from_bytes(item.tobytes(), "little")
    item.release()
    return (now - sent) / 1000.0


def _blocking(q: Any, n: int) -> list[float]:
    return [_latency_us(q.pop(timeout=30)) for _ in range(n)]


def _awaiting(q: Any, n: int) -> list[float]:
    async def run() -> list[float]:
        return [_latency_us(await q.apop(timeout=30)) for _ in range(n)]

    return asyncio.run(run())


def run_async_bench(items: int = 300, rounds: int = 4, interval: float = 0.002) -> dict[str, Any]:
    """Measure both waits; returns p50/p99 (µs) per kind and the apop/pop ratios."""
    ns = "bench-async-" + secrets.token_hex(4)
    url = f"shm://{ns}"
    fabric = ShmFabric(ns)  # the shm driver's own class: destroy() below is shm's
    ctx = mp.get_context("spawn")
    samples: dict[str, list[float]] = {"pop": [], "apop": []}
    try:
        for r in range(rounds * 2):
            kind = "pop" if r % 2 == 0 else "apop"
            q = gf.FabricQueue.create(fabric, capacity=1 << 16, ttl=120.0)
            go = ctx.Event()
            proc = ctx.Process(target=_producer, args=(url, bytes(q.locator()), items, interval, go))
            proc.start()
            try:
                go.set()
                got = _blocking(q, items) if kind == "pop" else _awaiting(q, items)
                samples[kind].extend(got[len(got) // 10 :])  # drop the warm-up tenth
            finally:
                proc.join(60)
                q.free()
            print(f"bench_async: round {r + 1}/{rounds * 2} ({kind}) done", file=sys.stderr, flush=True)
    finally:
        fabric.destroy()
    out: dict[str, Any] = {"items_per_round": items, "rounds": rounds, "interval_s": interval}
    for kind, vals in samples.items():
        a = np.asarray(vals)
        out[kind] = {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "n": len(a)}
    out["ratio_p50"] = out["apop"]["p50_us"] / out["pop"]["p50_us"]
    out["ratio_p99"] = out["apop"]["p99_us"] / out["pop"]["p99_us"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Wake-up latency: await apop() against a blocking pop(), same run.")
    ap.add_argument("--items", type=int, default=300, help="items per round (default 300)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of each kind, alternating (default 4)")
    ap.add_argument("--interval", type=float, default=0.002, help="seconds between pushes (default 0.002)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    res = run_async_bench(args.items, args.rounds, args.interval)
    print(f"{'wait':<8}{'p50 us':>10}{'p99 us':>10}{'samples':>9}")
    for kind in ("pop", "apop"):
        r = res[kind]
        print(f"{kind:<8}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}{r['n']:>9}")
    print(f"apop / pop: p50 {res['ratio_p50']:.2f}x, p99 {res['ratio_p99']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
