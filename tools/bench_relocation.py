"""Relocation benchmark: rebind time and throughput with N relocations per second.

One producer process and one consumer process stream items through a
:class:`~grafos_fabric.pipeline.RelocatableQueueEdge` (``push_batch`` /
``pop_batch``, the consumer acks every batch). The run alternates windows of
``window`` seconds: *steady* (no relocation) and *relocating* (the producer
calls ``relocate()`` ``relocations_per_s`` times a second). Alternating keeps
drift (other tenants, CPU frequency) from favouring one side. Reported, per
handoff placement:

* ``steady_items_per_s`` and ``relocating_items_per_s``: items the producer got
  into the edge per second in each kind of window (the ring is small next to a
  window, so this is also the consumer's rate); ``ratio`` = relocating / steady,
  measured in the same run;
* ``rebind_p50_ms`` / ``rebind_p99_ms``: the consumer's rebind time, from
  finding its queue sealed and drained to being bound to the next one: with
  the producer's standby queue (the default; ``--no-standby`` to compare) a
  check of the standby it attached ahead (``rebind_by_standby`` counts those);
  otherwise one handoff poll + attach, or only the bind when it read the newer
  record before the old queue ran out (``rebind_seen_early``; a standby bind
  counts as seen early too: its announcement was read before);
* ``relocate_p50_ms`` / ``relocate_p99_ms``: the producer's side: allocate the
  new queue (or activate the standby), publish the handoff record (durable:
  one write, one sync), seal the old queue;
* replayed items, dropped duplicates, relocations done.

The handoff record lives on a block lease (a file opened with ``open_block``):
``handoff_dirs`` names where. The producer's writer opens it with ``O_DIRECT``;
its publishes (small ``bytes`` records) go out through ``BlockRegion.write_record``'s
gather path, one ``pwritev`` with ``RWF_DSYNC`` through the page cache, durable on return,
which leaves the record's pages cached. The consumer's reader opens the file
with ``direct=False`` (a reader needs no durability), so the poll after a
publish reads those cached pages instead of two blocks from the disk (about
0.3 ms each on a virtual disk, far more when other tenants queue I/O on it:
with the writer's O_DIRECT writes the cache was dropped on every publish). The default runs it twice, on the temp
directory's filesystem (a disk) and on ``/dev/shm`` (tmpfs: the shm-only
setup, where block I/O costs what a memory copy costs); each row says which.
Targets (issues 5, 14): rebind p99 <= 1 ms on both rows, ratio >= 0.8 at 10 relocations/s.

``python -m grafos_fabric.tools.bench_relocation [--duration S] [--rate N] [--handoff-dir DIR ...]``
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import grafos_fabric as gf
from grafos_fabric.drivers.block import filesystem_type, open_block
from grafos_fabric.observe import percentile
from grafos_fabric.pipeline import RelocatableQueueEdge, StageId

__all__ = ["main", "run_relocation_bench"]

log = logging.getLogger(__name__)

REBIND_TARGET_MS = 1.0
RATIO_TARGET = 0.8
WARMUP_S = 0.2


def _producer(
    url: str,
    edge_path: str,
    capacity: int,
    item_size: int,
    batch: int,
    schedule: list[tuple[str, float]],
    rate: float,
    final: Any,
    conn: Any,
    standby: bool = True,
) -> None:
    try:
        fabric = gf.open_fabric(url)
        tx = RelocatableQueueEdge.producer(
            fabric, open_block(edge_path), capacity=capacity, ttl=60.0, stage=StageId("bench-src"), standby=standby
        )
        rows = np.zeros((batch, max(1, item_size // 8)), dtype=np.int64)
        phases: list[dict[str, Any]] = []
        for kind, seconds in schedule:
            t0 = time.perf_counter()
            n0 = tx.next_seq
            relocs = 0
            next_reloc = t0 + 1.0 / rate if rate > 0 else float("inf")
            now = t0
            while now - t0 < seconds:
                rows[:, 0] = np.arange(tx.next_seq, tx.next_seq + batch)
                tx.push_batch(rows, timeout=30)
                now = time.perf_counter()
                if kind == "relocating" and now >= next_reloc:
                    tx.relocate(timeout=30)
                    relocs += 1
                    next_reloc += 1.0 / rate
                    now = time.perf_counter()
            phases.append({"kind": kind, "items": tx.next_seq - n0, "seconds": now - t0, "relocations": relocs})
        final.value = tx.next_seq
        tx.flush(timeout=60)
        conn.send({"phases": phases, "stats": tx.stats(), "relocate_s": tx.rebind_times()[1:]})  # [0]: the first queue
        tx.free()
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _consumer(url: str, edge_path: str, final: Any, conn: Any) -> None:
    try:
        fabric = gf.open_fabric(url)
        # the reader needs no O_DIRECT (only the writer needs it for durability): page-cache reads
        rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), stage=StageId("bench-sink"))
        check = 0
        while True:
            target = int(final.value)
            pos = rx.position
            if target >= 0 and pos is not None and pos >= target:
                break
            try:
                b = rx.pop_batch(4096, timeout=0.05)
            except TimeoutError:
                continue
            a = b.array().view(np.int64)
            check ^= int(a[-1, 0])  # touch the payload: the last row carries its sequence
            if int(a[-1, 0]) != int(b.seqs[-1]):
                raise AssertionError(f"payload of {int(b.seqs[-1])} says {int(a[-1, 0])}")
            del a  # a view keeps the batch's ring space pinned
            rx.ack(int(b.seqs[-1]))
            b.release()
        conn.send({"stats": rx.stats(), "rebind_s": rx.rebind_times(), "events": rx.events()})
        rx.close()
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _one_run(
    url: str,
    handoff_dir: str,
    *,
    duration: float,
    rate: float,
    window: float,
    item_size: int,
    batch: int,
    capacity: int,
    standby: bool = True,
) -> dict[str, Any]:
    ctx: Any = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    tmp = tempfile.mkdtemp(prefix="grafos-reloc-", dir=handoff_dir)
    edge_path = os.path.join(tmp, "edge.blk")
    open_block(edge_path, create_size=1 << 20).close()
    rounds = max(1, round(duration / window))
    schedule = [("warmup", WARMUP_S)] + [(k, window) for _ in range(rounds) for k in ("steady", "relocating")]
    final = ctx.Value("q", -1)
    p_recv, p_send = ctx.Pipe(duplex=False)
    c_recv, c_send = ctx.Pipe(duplex=False)
    prod = ctx.Process(
        target=_producer,
        args=(url, edge_path, capacity, item_size, batch, schedule, rate, final, p_send, standby),
        daemon=True,
    )
    cons = ctx.Process(target=_consumer, args=(url, edge_path, final, c_send), daemon=True)
    try:
        prod.start()
        cons.start()
        limit = WARMUP_S + 2 * rounds * window + 90
        if not p_recv.poll(limit):
            raise TimeoutError("the producer did not report")
        pres = p_recv.recv()
        if not c_recv.poll(30):
            raise TimeoutError("the consumer did not report")
        cres = c_recv.recv()
    finally:
        for proc in (prod, cons):
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(tmp, ignore_errors=True)
    # what the run left in the fabric once both sides were done (the producer frees its queue and
    # its standby queue; nothing should be left before the bench's own cleanup reaps the namespace)
    segments = getattr(gf.open_fabric(url), "segments", None)
    left = len(segments()) if callable(segments) else -1
    if "error" in pres or "error" in cres:
        raise RuntimeError(f"relocation bench failed: producer {pres.get('error')}, consumer {cres.get('error')}")
    steady = [p for p in pres["phases"] if p["kind"] == "steady"]
    reloc = [p for p in pres["phases"] if p["kind"] == "relocating"]
    s_rate = sum(p["items"] for p in steady) / max(1e-9, sum(p["seconds"] for p in steady))
    r_rate = sum(p["items"] for p in reloc) / max(1e-9, sum(p["seconds"] for p in reloc))
    r_secs = sum(p["seconds"] for p in reloc)
    n_reloc = sum(p["relocations"] for p in reloc)
    rebind = cres["rebind_s"]
    # the rebind's two steps (the consumer's events, the last 256): from finding the queue done to
    # reading the newer record (zero when it was read before: an idle consumer polls), then to bound
    ev = [e for e in cres.get("events", []) if e.get("t_lost") is not None and e.get("t_seen") is not None]
    poll_s = [max(0.0, e["t_seen"] - e["t_lost"]) for e in ev]
    bind_s = [e["t_bound"] - max(e["t_seen"], e["t_lost"]) for e in ev]
    early = sum(1 for e in ev if e["t_seen"] < e["t_lost"])
    by_standby = sum(1 for e in cres.get("events", []) if e.get("standby"))
    relocate = pres["relocate_s"]
    fs = filesystem_type(handoff_dir) or "?"
    row = {
        "case": "relocation",
        "handoff": f"{handoff_dir} ({fs})",
        "reader_io": "buffered",
        "item_size": item_size,
        "batch": batch,
        "capacity": capacity,
        "relocations_per_s": round(n_reloc / max(1e-9, r_secs), 2),
        "relocations": n_reloc,
        "steady_items_per_s": round(s_rate),
        "relocating_items_per_s": round(r_rate),
        "ratio": round(r_rate / s_rate, 3) if s_rate else float("nan"),
        "rebind_samples": len(rebind),
        "rebind_p50_ms": round(percentile(rebind, 0.5, empty=float("nan")) * 1e3, 3),
        "rebind_p99_ms": round(percentile(rebind, 0.99, empty=float("nan")) * 1e3, 3),
        "rebind_max_ms": round(max(rebind) * 1e3, 3) if rebind else float("nan"),
        "rebind_poll_p50_ms": round(percentile(poll_s, 0.5, empty=float("nan")) * 1e3, 3),
        "rebind_poll_p99_ms": round(percentile(poll_s, 0.99, empty=float("nan")) * 1e3, 3),
        "rebind_bind_p50_ms": round(percentile(bind_s, 0.5, empty=float("nan")) * 1e3, 3),
        "rebind_bind_p99_ms": round(percentile(bind_s, 0.99, empty=float("nan")) * 1e3, 3),
        "rebind_seen_early": early,
        "standby": standby,
        "rebind_by_standby": by_standby,
        "standby_used": pres["stats"].get("standby_used", 0),
        "segments_left": left,
        "relocate_p50_ms": round(percentile(relocate, 0.5, empty=float("nan")) * 1e3, 3),
        "relocate_p99_ms": round(percentile(relocate, 0.99, empty=float("nan")) * 1e3, 3),
        "replayed": pres["stats"]["replayed"],
        "dropped_duplicates": cres["stats"]["dropped_duplicates"],
        "delivered": cres["stats"]["delivered"],
    }
    row["rebind_target_ms"] = REBIND_TARGET_MS
    row["ratio_target"] = RATIO_TARGET
    row["rebind_ok"] = row["rebind_p99_ms"] <= REBIND_TARGET_MS
    row["ratio_ok"] = row["ratio"] >= RATIO_TARGET
    return row


def default_handoff_dirs() -> list[str]:
    """The temp directory (a disk, usually) and /dev/shm (tmpfs), when they differ."""
    dirs = [tempfile.gettempdir()]
    if os.path.isdir("/dev/shm") and os.path.realpath("/dev/shm") != os.path.realpath(dirs[0]):
        dirs.append("/dev/shm")
    return dirs


def run_relocation_bench(
    duration: float = 2.0,
    relocations_per_s: float = 10,
    progress: Callable[[str], None] | None = None,
    *,
    url: str | None = None,
    handoff_dirs: Sequence[str] | None = None,
    window: float = 0.5,
    item_size: int = 64,
    batch: int = 256,
    capacity: int = 1 << 22,
    seconds: float | None = None,
    standby: bool = True,
) -> list[dict[str, Any]]:
    """Run the relocation benchmark; one result row per handoff placement (see the module docstring).

    ``duration`` is the time spent in each kind of window (steady and
    relocating: the run takes about twice that, plus start-up), ``seconds``
    an alias. ``url`` is the fabric (default: a fresh ``shm://`` namespace).
    ``progress`` is called with a line of text per finished row.
    """
    if seconds is not None:
        duration = seconds
    if duration <= 0 or relocations_per_s < 0:
        raise ValueError("duration must be positive and relocations_per_s non-negative")
    own = url is None
    url = url or f"shm://bench-reloc-{os.getpid()}-{secrets.token_hex(3)}"
    rows = []
    try:
        for d in handoff_dirs or default_handoff_dirs():
            rows.append(
                _run_row(url, d, duration, relocations_per_s, window, item_size, batch, capacity, progress, standby)
            )
    finally:
        _cleanup(url, own)
    return rows


def _cleanup(url: str, own: bool) -> None:
    """Reap what the run left in its fabric; a namespace made for the run goes entirely."""
    try:
        fabric = gf.open_fabric(url)
        fabric.reap()
    except Exception:  # pragma: no cover - best effort
        return
    ns = getattr(fabric, "namespace", None)
    if not own or not ns or not os.path.isdir("/dev/shm"):
        return
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"grafos.{ns}.") or name == f"grafos-gen.{ns}":
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except FileNotFoundError:
                pass


def _run_row(
    url: str,
    d: str,
    duration: float,
    relocations_per_s: float,
    window: float,
    item_size: int,
    batch: int,
    capacity: int,
    progress: Callable[[str], None] | None,
    standby: bool = True,
) -> dict[str, Any]:
    row = _one_run(
        url,
        d,
        duration=duration,
        rate=relocations_per_s,
        window=min(window, duration),
        item_size=item_size,
        batch=batch,
        capacity=capacity,
        standby=standby,
    )
    if progress is not None:
        progress(
            f"relocation ({row['handoff']}): {row['relocations_per_s']}/s, ratio {row['ratio']:.2f} "
            f"(steady {row['steady_items_per_s']:,}/s), rebind p50 {row['rebind_p50_ms']:.3f} ms "
            f"p99 {row['rebind_p99_ms']:.3f} ms (poll p99 {row['rebind_poll_p99_ms']:.3f}, bind p99 "
            f"{row['rebind_bind_p99_ms']:.3f}, {row['rebind_seen_early']} of {row['rebind_samples']} seen early, "
            f"{row['rebind_by_standby']} by standby), "
            f"relocate p99 {row['relocate_p99_ms']:.3f} ms"
        )
    return row


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds in each kind of window (default 2)")
    ap.add_argument("--rate", type=float, default=10.0, help="relocations per second while relocating (default 10)")
    ap.add_argument("--handoff-dir", action="append", help="where the handoff block file lives (repeatable)")
    ap.add_argument("--item-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--no-standby", action="store_true", help="the producer keeps no standby queue (to compare)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run_relocation_bench(
        args.duration,
        args.rate,
        progress=None if args.json else print,
        handoff_dirs=args.handoff_dir,
        item_size=args.item_size,
        batch=args.batch,
        standby=not args.no_standby,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(json.dumps(row))
    return 0 if all(r["rebind_ok"] and r["ratio_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
