"""A three-stage pipeline (source -> transform -> sink) on relocatable edges, with faults.

Each stage is its own process on the shm fabric; the two edges are
:class:`~grafos_fabric.pipeline.RelocatableQueueEdge` s whose handoff records
live on block files, and every stage checkpoints to its own block file
(:class:`~grafos_fabric.pipeline.CheckpointedStageState`):

* **source** pushes items ``(seq, seq * 7)`` and checkpoints
  ``output_commit = tx.acked`` (what the transform durably has);
* **transform** maps ``(seq, v) -> (seq, 3 * v + 1)``; it checkpoints
  ``input_offset = output_commit = tx.acked`` of its output edge and acks its
  input only that far, so a restart re-reads exactly what the sink may lack;
* **sink** writes ``(seq, value)`` records to a file, dropping every sequence
  it already wrote (it dedups by sequence), and checkpoints its position.

With ``--faults`` (the default) a supervisor injects, at random moments, lease
revocations and forced expiries of the queue each edge currently uses, and
``kill -9`` of a random stage (restarted from its checkpoint). At the end it
prints how many items were produced, delivered, replayed and deduplicated,
checks the sink's file (every sequence once, in order, with the right value)
and exits non-zero if anything was lost or wrong.

    python examples/pipeline_demo.py                 # 5M items, faults on, a few seconds
    python examples/pipeline_demo.py --items 5000000 --seed 7
    python examples/pipeline_demo.py --no-faults
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.block import open_block
from grafos_fabric.handoff import HandoffReader
from grafos_fabric.pipeline import CheckpointedStageState, EdgeCheckpoint, RelocatableQueueEdge, StageId

log = logging.getLogger("pipeline_demo")

CAPACITY = 1 << 20
CHECKPOINT_EVERY_S = 0.05
#: faults are paced by progress as well as by time: the next one also waits until the sink has
#: written another 1/FAULT_STEPS of the items. On a fast machine the time spacing decides; on a
#: loaded one faults that came by the clock alone outpaced the restarts they caused (a stage was
#: killed again before it got going) and the run could go on past its limit.
FAULT_STEPS = 100
STATS_EVERY_S = 0.2
STAGES = ("source", "transform", "sink")


# -- stages ------------------------------------------------------------------------------------------
class Stage:
    """What every stage process shares: its files, its checkpoint, its stats dump."""

    def __init__(self, name: str, workdir: Path, ns: str, items: int) -> None:
        self.name = name
        self.dir = workdir
        self.items = items
        self.fabric = gf.open_fabric(f"shm://{ns}")
        ckpt_path = str(workdir / f"{name}.ckpt")
        try:
            prev = CheckpointedStageState.restore(open_block(ckpt_path), stage=name)
            self.restored: EdgeCheckpoint | None = prev.edge
        except E.NoRecord:
            self.restored = None
        self.ckpt: CheckpointedStageState[dict[str, Any]] = CheckpointedStageState(
            {}, open_block(ckpt_path), stage=name, edge=self.restored
        )
        self.counters: dict[str, int] = {}
        self.edges: dict[str, Any] = {}
        self._next_ckpt = time.monotonic() + CHECKPOINT_EVERY_S
        self._next_stats = time.monotonic() + STATS_EVERY_S

    def edge_block(self, edge: str, *, reader: bool = False) -> Any:
        # a consumer only reads the handoff record: page-cache reads are enough (and cheaper)
        return open_block(str(self.dir / f"{edge}.blk"), direct=not reader)

    def due(self) -> bool:
        now = time.monotonic()
        if now >= self._next_stats:
            self.dump()
            self._next_stats = now + STATS_EVERY_S
        if now >= self._next_ckpt:
            self._next_ckpt = now + CHECKPOINT_EVERY_S
            return True
        return False

    def dump(self) -> None:
        data = {"stage": self.name, "pid": os.getpid(), "counters": self.counters}
        data.update({k: e.stats() for k, e in self.edges.items()})
        tmp = self.dir / f".stats-{self.name}-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.dir / f"stats-{self.name}-{os.getpid()}.json")


def run_source(st: Stage) -> None:
    tx = RelocatableQueueEdge.producer(
        st.fabric, st.edge_block("edge1"), capacity=CAPACITY, stage=StageId("source"), output_commit=st.restored
    )
    st.edges["edge1"] = tx
    st.counters["produced"] = 0
    seq = tx.next_seq  # where to (re)produce from: output_commit, or further when the consumer acked more
    while seq < st.items:
        k = min(512, st.items - seq)
        s = np.arange(seq, seq + k, dtype=np.int64)
        tx.push_batch(np.stack([s, s * 7], axis=1))
        seq += k
        st.counters["produced"] += k
        if st.due():
            st.ckpt.checkpoint(EdgeCheckpoint(0, tx.acked))
    tx.flush()
    st.ckpt.checkpoint(EdgeCheckpoint(0, tx.acked))
    st.dump()
    tx.close()


def run_transform(st: Stage) -> None:
    start = st.restored.output_commit if st.restored else None
    tx = RelocatableQueueEdge.producer(
        st.fabric, st.edge_block("edge2"), capacity=CAPACITY, stage=StageId("transform"), output_commit=start or 0
    )
    rx = RelocatableQueueEdge.consumer(
        st.fabric, st.edge_block("edge1", reader=True), stage=StageId("transform"), input_offset=start
    )
    st.edges.update(edge1_in=rx, edge2_out=tx)
    st.counters["transformed"] = 0
    acked_up = 0

    source_done = st.dir / "source-done"

    def need_input() -> bool:
        # stay bound to edge1 until the source has finished: a restarted source whose old
        # queue is gone re-produces from its checkpoint, and someone must drain (and ack) that
        return rx.position is None or rx.position < st.items or not source_done.exists()

    while need_input() or tx.acked < st.items:
        try:
            b = rx.pop_batch(1024, timeout=0.02) if need_input() else None
        except TimeoutError:
            b = None
        if b is not None:
            a = b.array().view(np.int64)
            skip = tx.next_seq - int(b.seqs[0])  # items the sink already acked (tx resumed past them)
            if skip < len(b):
                out = a[max(0, skip) :].copy()
                out[:, 1] = out[:, 1] * 3 + 1
                tx.push_batch(out)
                st.counters["transformed"] += len(out)
            del a
            b.release()
        else:
            tx.poll()  # idle: notice a seal or a lost lease downstream
        if st.due() or tx.acked >= st.items:
            c = tx.acked  # the sink durably has everything below c: so may the source
            st.ckpt.checkpoint(EdgeCheckpoint(c, c))
            if c > acked_up and rx.position is not None and c <= rx.position:
                rx.ack(c - 1)
                acked_up = c
    st.dump()
    tx.close()
    rx.close()


def run_sink(st: Stage) -> None:
    out_path = st.dir / "sink.out"
    raw = np.fromfile(out_path, dtype=np.int64) if out_path.exists() else np.zeros(0, np.int64)
    whole = len(raw) // 2 * 2
    if whole != len(raw):  # a record torn by kill -9
        os.truncate(out_path, whole * 8)
    high = int(raw[whole - 2]) if whole else -1  # the last sequence written
    rx = RelocatableQueueEdge.consumer(
        st.fabric,
        st.edge_block("edge2", reader=True),
        stage=StageId("sink"),
        input_offset=st.restored.input_offset if st.restored else None,
    )
    st.edges["edge2_in"] = rx
    st.counters.update(written=0, sink_dedup=0)
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    stop = st.dir / "stop"
    try:
        # runs until the supervisor says stop: a restarted sink must still bind to the
        # newest queue so that its ack reaches the transform
        while True:
            try:
                b = rx.pop_batch(1024, timeout=0.05)
            except TimeoutError:
                b = None
            if b is not None:
                a = b.array().view(np.int64)
                keep = a[a[:, 0] > high]  # dedup by sequence
                st.counters["sink_dedup"] += len(a) - len(keep)
                if len(keep):
                    os.write(fd, np.ascontiguousarray(keep).tobytes())
                    high = int(keep[-1, 0])
                    st.counters["written"] += len(keep)
                del a, keep
                b.release()
            if st.due() or (b is not None and high >= st.items - 1):
                pos = rx.position
                if pos:
                    st.ckpt.checkpoint(EdgeCheckpoint(pos, 0))
                    rx.ack(pos - 1)
                if high >= st.items - 1 and stop.exists():
                    break
    finally:
        os.close(fd)
    st.dump()
    rx.close()


# -- supervisor ---------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In a stage, before exec: the kernel kills it when the supervisor dies (even by
    kill -9 or a test's timeout), so no orphaned stage keeps running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _spawn(stage: str, workdir: Path, ns: str, items: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--dir", str(workdir), "--ns", ns]
    return subprocess.Popen([*args, "--items", str(items)], preexec_fn=_die_with_parent)


def _edge_lease(fabric: Any, workdir: Path, edge: str) -> Any:
    """The lease of the queue an edge uses now (read from its handoff record), or None."""
    try:
        rec = HandoffReader(open_block(str(workdir / f"{edge}.blk"))).current()
        q = gf.FabricQueue.attach(fabric, gf.QueueLocator.from_bytes(rec.payload))
    except (E.FabricError, E.FabricValueError, OSError):
        return None
    lease = q.lease
    q.close()
    return lease


def _diagnose(fabric: Any, workdir: Path, live: dict[str, int]) -> None:
    """On a hang, to stderr: each live stage's last stats dump (its edges' generation, position,
    acked, window) and, per edge, the handoff record's generation with its queue's header words."""
    for s, pid in live.items():
        f = workdir / f"stats-{s}-{pid}.json"
        age = time.time() - f.stat().st_mtime if f.exists() else None
        dump = f.read_text() if f.exists() else "no stats dump"
        print(f"state of {s} (pid {pid}, dump {age if age is None else round(age, 2)} s old): {dump}", file=sys.stderr)
    for edge in ("edge1", "edge2"):
        try:
            with open_block(str(workdir / f"{edge}.blk"), direct=False) as blk:
                rec = HandoffReader(blk).current()
            loc = gf.QueueLocator.from_bytes(rec.payload)
            line = f"{edge}: handoff generation {rec.generation}, queue {loc.region.name[:12]}..."
            q = gf.FabricQueue.attach(fabric, loc)
            try:
                line += f" epoch {q.epoch} sealed {q.sealed} seal_seq {q.seal_seq} acked {q.acked} len {len(q)}"
            finally:
                q.close()
        except Exception as exc:  # a diagnosis: report what could not be read, go on
            line = f"{edge}: {type(exc).__name__}: {exc}"
        print(line, file=sys.stderr)


def _written(workdir: Path) -> int:
    """How many records the sink's file holds (a progress count: a torn record is not one)."""
    try:
        return os.path.getsize(workdir / "sink.out") // 16
    except FileNotFoundError:
        return 0


def _collect(workdir: Path) -> dict[str, Any]:
    tot: dict[str, Any] = {"produced": 0, "written": 0, "transformed": 0, "sink_dedup": 0}
    tot.update(replayed=0, edge_dedup=0, relocations={"edge1": 0, "edge2": 0}, rebind_ms=[])
    for f in workdir.glob("stats-*.json"):
        d = json.loads(f.read_text())
        for k, v in d["counters"].items():
            tot[k] = tot.get(k, 0) + v
        for key, edge in (("edge1", "edge1"), ("edge2_out", "edge2")):
            if key in d:
                tot["replayed"] += d[key]["replayed"]
                tot["relocations"][edge] += max(0, d[key]["relocations"] - 1)
        for key in ("edge1_in", "edge2_in"):
            if key in d:
                tot["edge_dedup"] += d[key]["dropped_duplicates"]
                tot["rebind_ms"].append(d[key]["rebind_p99_ms"])
    return tot


def supervise(items: int, faults: bool, seed: int, limit: float) -> int:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="grafos-demo-"))
    ns = f"demo{os.getpid()}{secrets.token_hex(2)}"
    fabric = gf.open_fabric(f"shm://{ns}")
    for name in ("edge1", "edge2", *[f"{s}.ckpt" for s in STAGES]):
        path = workdir / (name if name.endswith(".ckpt") else f"{name}.blk")
        open_block(str(path), create_size=1 << 20).close()
    kills = {s: 0 for s in STAGES}
    injected: dict[str, Any] = {"kill -9": kills, "revoke": 0, "expire": 0}
    t0 = time.monotonic()
    procs = {s: _spawn(s, workdir, ns, items) for s in STAGES}
    done: set[str] = set()
    next_fault = t0 + rng.uniform(0.1, 0.4)
    next_progress = 0  # records in the sink's file before the next fault
    rc = 0
    try:
        while len(done) < len(STAGES):
            if {"source", "transform"} <= done:
                (workdir / "stop").touch()  # everything is acked end to end: the sink may go
            for s, p in procs.items():
                if s in done or p.poll() is None:
                    continue
                if p.returncode == 0:
                    done.add(s)
                    if s == "source":
                        (workdir / "source-done").touch()  # the transform may stop draining edge1
                elif p.returncode == -signal.SIGKILL:
                    procs[s] = _spawn(s, workdir, ns, items)  # restart from its checkpoint
                else:
                    raise RuntimeError(f"stage {s} failed (exit {p.returncode})")
            now = time.monotonic()
            if now - t0 > limit:
                for s, p in procs.items():  # where is each live stage stuck? (faulthandler, to stderr)
                    if s not in done and p.poll() is None:
                        os.kill(p.pid, signal.SIGUSR1)
                        os.kill(p.pid, signal.SIGUSR2)
                time.sleep(1.0)
                _diagnose(fabric, workdir, {s: p.pid for s, p in procs.items() if s not in done})
                raise TimeoutError(f"the pipeline did not finish within {limit}s (stage stacks and state above)")
            if (
                faults
                and now >= next_fault
                and not {"source", "transform"} <= done
                and _written(workdir) >= next_progress
            ):
                what = rng.choice(["kill", "kill", "revoke", "expire"])
                if what == "kill":
                    s = rng.choice([s for s in STAGES if s not in done])
                    if procs[s].poll() is None:
                        os.kill(procs[s].pid, signal.SIGKILL)
                        procs[s].wait()
                        kills[s] += 1
                        procs[s] = _spawn(s, workdir, ns, items)
                else:
                    lease = _edge_lease(fabric, workdir, rng.choice(["edge1", "edge2"]))
                    if lease is not None:
                        try:
                            if what == "revoke":
                                lease.revoke()
                            else:
                                lease.renew(ttl=1e-9)  # an operator's forced expiry: the deadline is now
                            injected[what] += 1
                        except (E.LeaseExpired, E.Revoked):
                            pass
                next_fault = now + rng.uniform(0.1, 0.4)
                next_progress = _written(workdir) + max(1, items // FAULT_STEPS)
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        rc = report(workdir, items, injected, elapsed)
    except BaseException:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for name in os.listdir("/dev/shm"):
            if name.startswith(f"grafos.{ns}.") or name == f"grafos-gen.{ns}":
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except FileNotFoundError:
                    pass
    return rc


def report(workdir: Path, items: int, injected: dict[str, Any], elapsed: float) -> int:
    raw = np.fromfile(workdir / "sink.out", dtype=np.int64).reshape(-1, 2)
    seqs, values = raw[:, 0], raw[:, 1]
    uniq, first = np.unique(seqs, return_index=True)
    in_order = bool(np.all(np.diff(seqs) > 0))
    want = np.arange(items, dtype=np.int64)
    missing = int(items - np.isin(want, uniq).sum())
    wrong = int((values[first] != uniq * 21 + 1).sum())
    tot = _collect(workdir)
    kills = injected["kill -9"]
    print(f"pipeline demo: {items:,} items through source -> transform -> sink in {elapsed:.1f} s")
    print(
        f"  faults injected:   kill -9 source {kills['source']}, transform {kills['transform']}, sink {kills['sink']}; "
        f"lease revokes {injected['revoke']}, forced expiries {injected['expire']}"
    )
    print(f"  relocations:       edge1 {tot['relocations']['edge1']}, edge2 {tot['relocations']['edge2']} (at least)")
    print(f"  produced:          {tot['produced']:,} (source pushes, re-production after restarts included)")
    print(
        f"  delivered:         {tot['written'] + tot['sink_dedup']:,} items reached the sink (at least); "
        f"it wrote {len(raw):,} records, {len(uniq):,} distinct sequences"
    )
    print(f"  replayed:          {tot['replayed']:,} items pushed again by the edges after relocations (at least)")
    print(
        f"  deduplicated:      {tot['edge_dedup']:,} by the edges' consumers, {tot['sink_dedup']:,} by the sink "
        "(stats of killed processes are as of their last dump)"
    )
    print(f"  sink file:         in order {in_order}, missing {missing}, wrong values {wrong}")
    ok = missing == 0 and wrong == 0 and in_order and len(uniq) == items
    print("  result:            OK: nothing lost, nothing twice, in order" if ok else "  result:            FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="three-stage relocatable pipeline with fault injection")
    ap.add_argument("--items", type=int, default=5_000_000)
    ap.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True, help="inject faults (default on)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--limit", type=float, default=120.0, help="give up after this many seconds")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--ns", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(processName)s %(name)s: %(message)s")
    if args.stage:
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the supervisor asks for stacks on a hang
        st = Stage(args.stage, Path(args.dir), args.ns, args.items)
        signal.signal(signal.SIGUSR2, lambda *_: st.dump())  # ... and for the edges' state as it is now
        {"source": run_source, "transform": run_transform, "sink": run_sink}[args.stage](st)
        return 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"seed {seed}")
    return supervise(args.items, args.faults, seed, args.limit)


if __name__ == "__main__":
    sys.exit(main())
