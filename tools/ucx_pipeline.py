"""A three-stage pipeline over ``ucx://`` across network namespaces, with its memory
nodes killed (``kill -9``) and restarted mid-stream.

Two network namespaces joined by a veth pair stand for hosts: the memory nodes
(two ``grafos-fabric serve --driver ucx`` processes, one port each) live in
namespace A, the stages (source -> transform -> sink, one process each) in
namespace B, and every byte between them crosses the veth over UCX's tcp
transport. Handoff records live on block files (a disk or a SAN in production)
that outlive the nodes.

* **source** pushes items ``(seq, seq * 7)`` into edge 1 until told to stop,
  then waits until the transform has acknowledged everything it sent and writes
  how many that was;
* **transform** maps ``(seq, v) -> (seq, 3 * v + 1)`` into edge 2 and
  acknowledges edge 1 only as far as the sink has acknowledged edge 2;
* **sink** appends ``(seq, value)`` records to a file, dropping every sequence
  it already wrote (an idempotent sink), and acknowledges edge 2.

Each stage allocates its queues through a :class:`FailoverFabric`: the first
of the nodes that answers (the one that served last, first), and a producer's
standby queue on another node than its current queue's (a killed node then
costs no allocation: the producer activates the standby). The supervisor
(this process, in the root namespace) kills the node holding edge 1 with
``kill -9`` every ``--interval`` seconds, restarts it on the same port, and
waits until both edges have moved to the other node (their handoff
generations went up). At the end it checks the sink's file against what the
source sent: every sequence exactly once, in order, with the right value; and
reports, per kill and edge, the time from the kill to the first item the
consumer popped from the new queue (p50/p99/max), beside the 50 ms target.

    python -m grafos_fabric.tools.ucx_pipeline --kills 20            # root: network namespaces
    python -m grafos_fabric.tools.ucx_pipeline --kills 3 --json out.json

Where network namespaces are not possible (not root, no ``ip``) it runs on
127.0.0.1 and says so in its output (``--loopback`` asks for that).

(About 870 lines, a little over the project's ~800: the stages, the supervisor and
the report share the run's file formats and the breakdown's steps, and one file
is what ``python -m`` runs in each namespace.)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    from grafos_fabric.drivers.base import Region, RegionRef
    from grafos_fabric.lease import Lease

__all__ = ["DemoResult", "FailoverFabric", "main", "run_demo"]

log = logging.getLogger("grafos_fabric.tools.ucx_pipeline")

CAPACITY = 1 << 18
#: The source's default cadence: one push every SOURCE_PERIOD_MS of ``rate * period`` items (at least
#: one), as a rate-limited source does; the consumer's first item after a relocation waits up to one
#: period for the source's next push. 5 ms, not 1: on the 2-core dev VM a 1 ms cadence cost the source
#: ~0.27 of a core more (three Python stages and two nodes share the cores), and a relocation's replay
#: pushes the window one ring push per source push (~25 instead of ~5), so 1 ms came out slower end to
#: end (README, "Detection, progress and the source's cadence").
SOURCE_PERIOD_MS = 5.0
RELOCATION_TARGET_MS = 50.0
NODE_PORTS = (7411, 7412)  # in the demo's own network namespace; on 127.0.0.1 see _node_ports
STAGES = ("source", "transform", "sink")


# ---------------------------------------------------------------------------
# Stage side
# ---------------------------------------------------------------------------


class FailoverFabric:
    """A client of several UCX memory nodes of one tenant: ``alloc`` on the first node
    that answers (the one that served the last alloc, first; a node whose last warm-up or
    alloc failed, last), ``attach`` on the node a
    ref names. One :class:`~grafos_fabric.drivers.ucx.UcxFabric` per node, opened on
    first use (a node that is down now may serve later)."""

    driver: str = "ucx"
    mapped_regions: bool = False

    def __init__(self, nodes: list[tuple[str, int]], *, token_file: str, tls: str = "tcp",
                 net_devices: str | None = None, op_timeout: float = 2.0) -> None:
        from grafos_fabric.lease import Clock, MonotonicClock

        if not nodes:
            raise ValueError("FailoverFabric needs at least one node")
        self.nodes = list(nodes)
        self.url: str = f"ucx://{nodes[0][0]}:{nodes[0][1]}"
        self.clock: Clock = MonotonicClock()
        self._token_file, self._tls, self._net_devices, self._op_timeout = token_file, tls, net_devices, op_timeout
        self._fabrics: dict[tuple[str, int], Any] = {}
        self._pref = 0
        self.allocs: list[int] = []  # the port of each successful alloc (which node served)
        self._next_warm = 0.0
        self._down: set[tuple[str, int]] = set()  # nodes whose last warm-up or alloc failed: tried last
        self._away: tuple[str, int] | None = None  # allocating_away_from: never this node
        for node in self.nodes:  # connect to every node now: a failover must not pay for a connect
            self._warm(node)

    def _warm(self, node: tuple[str, int]) -> None:
        from grafos_fabric.errors import Disconnected

        try:
            self._fabric(node).warm(*node)
        except Disconnected:
            self._down.add(node)
        else:
            self._down.discard(node)

    def _fabric(self, node: tuple[str, int]) -> Any:
        f = self._fabrics.get(node)
        if f is None:
            from grafos_fabric.drivers.ucx import UcxFabric

            f = UcxFabric(node[0], node[1], clock=self.clock, token_file=self._token_file, tls=self._tls,
                          net_devices=self._net_devices, op_timeout=self._op_timeout)
            self._fabrics[node] = f
        return f

    def keep_warm(self) -> None:
        """Keep a connection (control channel and UCX endpoint) to every node, reconnecting those
        that restarted: call it from the stage's loop (cheap when nothing changed: one worker pass
        per node). Every node, not only the standby ones: a consumer never allocates, so it does
        not know which node its producer will move to next, and a producer's current node is
        checked at no cost while its endpoint works."""
        now = time.monotonic()
        if now < self._next_warm:
            return
        self._next_warm = now + 0.05
        for node in self.nodes:
            self._warm(node)

    def alloc(self, nbytes: int, ttl: float) -> Region:
        from grafos_fabric.errors import Disconnected

        last: BaseException | None = None
        order = [(self._pref + k) % len(self.nodes) for k in range(len(self.nodes))]
        order.sort(key=lambda i: self.nodes[i] in self._down)  # stable: the preferred live node first
        if self._away is not None:  # a standby: only the other nodes that are up (see allocating_away_from)
            order = [i for i in order if self.nodes[i] != self._away and self.nodes[i] not in self._down]
            if not order:
                raise Disconnected(f"no memory node other than {self._away[0]}:{self._away[1]} is up")
        for i in order:
            t0 = time.perf_counter()
            try:
                region = self._fabric(self.nodes[i]).alloc(nbytes, ttl)
            except Disconnected as ex:  # this node is down (or its channel broke): the next one
                log.debug("alloc on node %s:%d failed in %.3f ms: %s", *self.nodes[i],
                          (time.perf_counter() - t0) * 1e3, ex)
                self._down.add(self.nodes[i])
                last = ex
                continue
            self._down.discard(self.nodes[i])
            self._pref = i
            self.allocs.append(self.nodes[i][1])
            return cast("Region", region)
        raise Disconnected(f"no memory node answered ({', '.join(f'{h}:{p}' for h, p in self.nodes)}): {last}")

    @contextlib.contextmanager
    def allocating_away_from(self, ref: RegionRef) -> Iterator[None]:
        """Allocations inside go to another node than ``ref``'s, one that is up (the pipeline's
        standby queue: it survives the death of the current queue's node), or raise
        :class:`Disconnected` at once when there is none (the standby is made later, once another
        node is back: :meth:`keep_warm` notices). Never on ``ref``'s node: a standby there would be
        made again elsewhere later and freed, and a node fences every session that held a lease
        when it ends, which would cut this stage and the consumer off the current queue too (they
        reconnect, but a producer relocates on the way). The preferred node stays."""
        pref, self._away = self._pref, (ref.host, ref.port)
        try:
            yield
        finally:
            self._away, self._pref = None, pref

    def attach(self, ref: RegionRef, *, mapped: bool = True) -> Region:
        from grafos_fabric.errors import FabricValueError

        node = (ref.host, ref.port)
        if node not in self.nodes:
            raise FabricValueError(f"the ref names node {ref.host}:{ref.port}, which this fabric does not use")
        return cast("Region", self._fabric(node).attach(ref, mapped=mapped))

    def free(self, lease: Lease) -> None:
        lease.free()

    def reap(self) -> int:
        return sum(int(f.reap()) for f in self._fabrics.values())

    def close(self) -> None:
        fabrics, self._fabrics = list(self._fabrics.values()), {}
        for f in fabrics:
            f.close()


class _Stage:
    def __init__(self, name: str, workdir: Path, nodes: list[tuple[str, int]], net_devices: str | None) -> None:
        self.name = name
        self.dir = workdir
        self.fabric = FailoverFabric(nodes, token_file=str(workdir / "node.token"), net_devices=net_devices)
        self.counters: dict[str, int] = {}
        self.firsts: dict[str, list[tuple[int, float]]] = {}  # edge -> [(generation, monotonic of 1st item)]
        self.published: dict[str, list[tuple[int, float]]] = {}  # edge -> [(generation, monotonic seen by tx)]
        self.pushed: dict[str, list[tuple[int, float]]] = {}  # edge -> [(generation, monotonic of 1st new push)]
        self._next_dump = 0.0

    def block(self, edge: str, *, reader: bool = False) -> Any:
        from grafos_fabric.drivers.block import open_block

        return open_block(str(self.dir / f"{edge}.blk"), direct=not reader)

    def saw(self, edge: str, rx: Any) -> None:
        """After a pop that returned items: note the first item of each new generation."""
        gen = rx.generation
        g = -1 if gen is None else int(gen)
        seen = self.firsts.setdefault(edge, [])
        if not seen or seen[-1][0] != g:
            seen.append((g, time.monotonic()))
            self.dump(force=True)

    def pushed_new(self, edge: str, tx: Any) -> None:
        """After a push returned: note the first push of new items (not the replay) into each
        generation (the time it returned: the items were in the ring by then)."""
        gen = tx.generation
        g = -1 if gen is None else int(gen)
        seen = self.pushed.setdefault(edge, [])
        if not seen or seen[-1][0] != g:
            seen.append((g, time.monotonic()))

    def relocated(self, edge: str, tx: Any) -> None:
        """After a push: note when the producer's generation went up (monotonic time, as firsts)."""
        gen = tx.generation
        g = -1 if gen is None else int(gen)
        seen = self.published.setdefault(edge, [])
        if not seen or seen[-1][0] != g:
            seen.append((g, time.monotonic()))

    def sent(self) -> int | None:
        p = self.dir / "source.json"
        return int(json.loads(p.read_text())["sent"]) if p.exists() else None

    def dump(self, edges: dict[str, Any] | None = None, force: bool = False) -> None:
        """Once per pass of the stage's loop: keep the standby nodes warm; every 0.2 s, write the stats."""
        self.fabric.keep_warm()
        now = time.monotonic()
        if not force and now < self._next_dump:
            return
        self._next_dump = now + 0.2
        data: dict[str, Any] = {"stage": self.name, "counters": self.counters, "firsts": self.firsts,
                                "published": self.published, "pushed": self.pushed, "allocs": self.fabric.allocs}
        for k, e in (edges or {}).items():
            data[k] = {**e.stats(), "events": e.events()}
        tmp = self.dir / f".stats-{self.name}.tmp"
        tmp.write_text(json.dumps(data, default=float))
        tmp.replace(self.dir / f"stats-{self.name}.json")


def _ack(rx: Any, seq: int) -> bool:
    """``rx.ack(seq)``; False when the queue was lost meanwhile (the next pop rebinds and publishes
    the ack in the new queue)."""
    from grafos_fabric import errors as E

    try:
        rx.ack(seq)
        return True
    except (E.Disconnected, E.LeaseExpired, E.Revoked) as ex:
        log.info("ack %d: the queue is gone (%s); the rebind carries it", seq, ex)
        return False


def source_batch(rate: float, period_ms: float) -> int:
    """Items per push of a source that aims at ``rate`` items/s and pushes every ``period_ms``: at least one."""
    return max(1, round(rate * period_ms / 1e3))


def _period(text: str) -> float:
    """``--source-period``: milliseconds, positive."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 < v <= 60_000:
        raise argparse.ArgumentTypeError(f"the source period must be in (0, 60000] ms, got {text}")
    return v


def _run_source(st: _Stage, rate: float, period_ms: float = SOURCE_PERIOD_MS, write_behind: bool = False) -> None:
    from grafos_fabric.pipeline import RelocatableQueueEdge, StageId

    tx = RelocatableQueueEdge.producer(st.fabric, st.block("edge1"), capacity=CAPACITY, ttl=60.0,
                                       stage=StageId("source"), write_behind=write_behind)
    st.counters["produced"] = 0
    stop = st.dir / "stop"
    batch = source_batch(rate, period_ms)
    t0 = time.monotonic()
    seq = 0
    while not stop.exists():
        s = np.arange(seq, seq + batch, dtype=np.int64)
        tx.push_batch(np.stack([s, s * 7], axis=1), timeout=60)
        st.pushed_new("edge1", tx)
        st.relocated("edge1", tx)
        seq += batch
        st.counters["produced"] = seq
        st.dump({"edge1": tx})
        # stay near --rate items/s (the stages share a few cores): the next push is due at seq / rate. A
        # producer idle for longer than a few ms polls its edge meanwhile, so a lost node is noticed within
        # a few ms, not at the next push (with a short period the next push notices it as soon)
        while (ahead := seq / rate - (time.monotonic() - t0)) > 0:
            time.sleep(min(ahead, 0.004))
            if seq / rate - (time.monotonic() - t0) > 0.001:
                tx.poll()
                st.relocated("edge1", tx)
    deadline = time.monotonic() + 120
    while tx.acked < seq:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the transform acked {tx.acked} of {seq} items in 120 s")
        tx.flush(timeout=5)
        tx.poll()
        time.sleep(0.01)
    st.dump({"edge1": tx}, force=True)
    (st.dir / ".source.tmp").write_text(json.dumps({"sent": seq}))
    (st.dir / ".source.tmp").replace(st.dir / "source.json")
    tx.close()


def _run_transform(st: _Stage, write_behind: bool = False) -> None:
    from grafos_fabric.pipeline import RelocatableQueueEdge, StageId

    tx = RelocatableQueueEdge.producer(st.fabric, st.block("edge2"), capacity=CAPACITY, ttl=60.0,
                                       stage=StageId("transform"), write_behind=write_behind)
    rx = RelocatableQueueEdge.consumer(st.fabric, st.block("edge1", reader=True), stage=StageId("transform"),
                                       mapped=False)
    edges = {"edge1_in": rx, "edge2_out": tx}
    st.counters["transformed"] = 0
    acked_up = 0
    while True:
        sent = st.sent()
        if sent is not None and acked_up >= sent and tx.acked >= sent:
            break
        try:
            b = rx.pop_batch(1024, timeout=0.02)
        except TimeoutError:
            b = None
        if b is not None and len(b):
            st.saw("edge1", rx)
            a = b.array().view(np.int64).reshape(-1, 2)
            if int(b.seqs[0]) != tx.next_seq:  # one output per input, in order: the edges' sequences agree
                raise RuntimeError(f"transform: input {int(b.seqs[0])} but output {tx.next_seq}")
            out = a.copy()
            out[:, 1] = out[:, 1] * 3 + 1
            del a
            b.release()
            tx.push_batch(out, timeout=60)
            st.pushed_new("edge2", tx)
            st.counters["transformed"] += len(out)
        else:
            tx.poll()  # idle: notice a lost queue downstream, read the sink's acks
        st.relocated("edge2", tx)
        c = tx.acked  # the sink has everything below c: so may the source
        if c > acked_up and rx.position is not None and c <= rx.position:
            if _ack(rx, c - 1):
                acked_up = c
        st.dump(edges)
    st.dump(edges, force=True)
    tx.close()
    rx.close()


def _run_sink(st: _Stage) -> None:
    from grafos_fabric.pipeline import RelocatableQueueEdge, StageId

    rx = RelocatableQueueEdge.consumer(st.fabric, st.block("edge2", reader=True), stage=StageId("sink"),
                                       mapped=False)
    st.counters.update(written=0, sink_dedup=0)
    high = -1
    fd = os.open(st.dir / "sink.out", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        while True:
            sent = st.sent()
            if sent is not None and high >= sent - 1:
                break
            try:
                b = rx.pop_batch(1024, timeout=0.05)
            except TimeoutError:
                b = None
            if b is not None and len(b):
                st.saw("edge2", rx)
                a = b.array().view(np.int64).reshape(-1, 2)
                keep = a[a[:, 0] > high]  # idempotent: a sequence already written is dropped
                st.counters["sink_dedup"] += len(a) - len(keep)
                if len(keep):
                    os.write(fd, np.ascontiguousarray(keep).tobytes())
                    high = int(keep[-1, 0])
                    st.counters["written"] += len(keep)
                del a, keep
                b.release()
                _ack(rx, high)  # the file write is the sink's effect
            st.dump({"edge2_in": rx})
    finally:
        os.close(fd)
    st.dump({"edge2_in": rx}, force=True)
    rx.close()


def _mono(record: logging.LogRecord) -> bool:
    """A log filter that stamps records with ``time.monotonic()`` (comparable with the kill times)."""
    record.mono = time.monotonic()
    return True


def _stage_main(args: argparse.Namespace) -> int:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the supervisor asks for stacks on a hang
    nodes = [(h, int(p)) for h, p in (n.rsplit(":", 1) for n in args.nodes.split(","))]
    level = os.environ.get("GRAFOS_UCX_PIPELINE_LOG")  # debugging: each stage logs to DIR/log-STAGE.txt
    if level:
        handler = logging.FileHandler(Path(args.dir) / f"log-{args.stage}.txt")
        handler.setFormatter(logging.Formatter("%(mono).4f %(name)s %(message)s"))
        handler.addFilter(_mono)
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(level)
    st = _Stage(args.stage, Path(args.dir), nodes, args.net_devices or None)
    try:
        if args.stage == "source":
            _run_source(st, args.rate, args.source_period, args.write_behind)
        elif args.stage == "transform":
            _run_transform(st, args.write_behind)
        else:
            _run_sink(st)
    finally:
        st.fabric.close()
    return 0


# ---------------------------------------------------------------------------
# Supervisor side
# ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child, before exec: the kernel kills it when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


@dataclass
class DemoResult:
    """What :func:`run_demo` saw; ``ok`` is the verdict on the sink's file."""

    where: str
    sent: int = 0
    records: int = 0
    distinct: int = 0
    missing: int = 0
    duplicates: int = 0
    wrong: int = 0
    in_order: bool = False
    extra: int = 0
    kills: list[dict[str, Any]] = field(default_factory=list)
    relocation_ms: dict[str, list[float]] = field(default_factory=dict)
    breakdown: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    restart_during: bool = False
    node_ports: tuple[int, ...] = NODE_PORTS
    source_period_ms: float = SOURCE_PERIOD_MS
    source_batch: int = 0
    write_behind: bool = False
    counters: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.sent > 0 and self.missing == 0 and self.duplicates == 0 and self.wrong == 0
                and self.extra == 0 and self.in_order and self.distinct == self.sent)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["ok"] = self.ok
        allms = [x for v in self.relocation_ms.values() for x in v]
        if allms:
            out["relocation_p50_ms"] = float(np.percentile(allms, 50))
            out["relocation_p99_ms"] = float(np.percentile(allms, 99))
            out["relocation_max_ms"] = float(max(allms))
        return out


class _Node:
    def __init__(self, cmd_prefix: list[str], host: str, port: int, workdir: Path, net_devices: str,
                 progress: str, prefault: bool = False) -> None:
        self.argv = [*cmd_prefix, sys.executable, "-m", "grafos_fabric.tools.serve", "--driver", "ucx",
                     "--host", host, "--port", str(port), "--token-file", str(workdir / "node.token"),
                     "--pool", "64M", "--ucx-tls", "tcp", "--ucx-net-devices", net_devices,
                     "--ucx-progress", progress, "--log-level", "ERROR"]
        if prefault:
            self.argv.append("--ucx-prefault")
        if host != "127.0.0.1":
            self.argv.append("--allow-remote")
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        assert self.proc.stdout is not None
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("serving ucx://"):
                    self.starts += 1
                    return
                if not line and self.proc.poll() is not None:
                    break
        self.kill()
        raise RuntimeError(f"the memory node on port {self.port} did not start (exit {self.proc.poll()})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _current(workdir: Path, edge: str) -> tuple[int, int] | None:
    """(generation, node port) of the queue an edge uses now, from its handoff record."""
    from grafos_fabric import errors as E
    from grafos_fabric.drivers.block import open_block
    from grafos_fabric.handoff import HandoffReader
    from grafos_fabric.locator import QueueLocator

    blk = open_block(str(workdir / f"{edge}.blk"), direct=False)
    try:
        rec = HandoffReader(blk).current()
        return int(rec.generation), int(QueueLocator.from_bytes(rec.payload).region.port)
    except (E.FabricError, E.FabricValueError, OSError):
        return None
    finally:
        blk.close()


def _stats(workdir: Path) -> dict[str, Any]:
    out = {}
    for s in STAGES:
        p = workdir / f"stats-{s}.json"
        if p.exists():
            with contextlib.suppress(ValueError):
                out[s] = json.loads(p.read_text())
    return out


@contextlib.contextmanager
def _hosts(loopback: bool) -> Iterator[tuple[str, list[str], list[str], str, str, str]]:
    """(where, node command prefix, stage command prefix, node host, node device, stage device)."""
    from grafos_fabric.tools import netns

    why = "asked for (--loopback)" if loopback else netns.unavailable()
    if why is not None:
        yield f"127.0.0.1 (no network namespaces: {why})", [], [], "127.0.0.1", "lo", "lo"
        return
    with netns.veth_pair() as pair:
        yield (f"namespaces {pair.ns_a} (memory nodes, {pair.ip_a}) and {pair.ns_b} (stages, {pair.ip_b}) "
               f"over veth {pair.dev_a}/{pair.dev_b}",
               ["ip", "netns", "exec", pair.ns_a], ["ip", "netns", "exec", pair.ns_b], pair.ip_a, pair.dev_a,
               pair.dev_b)


@contextlib.contextmanager
def _node_ports(own_namespace: bool) -> Iterator[tuple[int, ...]]:
    """The memory nodes' ports: :data:`NODE_PORTS` in the demo's own network namespace (nothing
    else lives there); on 127.0.0.1, two ports the kernel picks, held for the whole run by bound
    sockets that never listen, with ``SO_REUSEADDR`` (the nodes' listeners set it too, so they bind
    them, and bind them again when restarted after a kill -9), so that no other process on the
    machine takes them meanwhile (fixed ports there could be anyone's)."""
    if own_namespace:
        yield NODE_PORTS
        return
    import socket

    with contextlib.ExitStack() as held:
        ports = []
        for _ in NODE_PORTS:
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        yield tuple(ports)


def run_demo(kills: int = 3, interval: float = 1.0, rate: float = 20000.0, *, loopback: bool = False,
             progress_mode: str = "event", limit: float = 300.0, say: Any = None,
             restart_during: bool = False, prefault: bool = False,
             source_period_ms: float = SOURCE_PERIOD_MS, write_behind: bool = False) -> DemoResult:
    """Run the pipeline, kill the node holding edge 1 ``kills`` times, verify the sink's file.
    The source pushes ``rate * source_period_ms / 1000`` items (at least one) every
    ``source_period_ms``; the first item after a relocation waits up to one period for its next push.
    ``prefault``: the nodes fault their pools in at start (``serve --ucx-prefault``; measured: no
    difference here, the grant is not dominated by page faults). ``write_behind``: the source's and
    the transform's edge producers publish by write-behind (``RelocatableQueueEdge.producer(...,
    write_behind=True)``).

    The killed node is restarted on its port once every edge it held has moved on (on a real
    fabric the node is another host, and its restart takes no CPU from the stages); with
    ``restart_during`` it is restarted at once, and its start-up (about 0.4 s of CPU here)
    competes with the relocating stages for this machine's cores."""
    from grafos_fabric.drivers.block import open_block

    say = say or (lambda _m: None)
    workdir = Path(tempfile.mkdtemp(prefix="grafos-ucx-pipe-"))
    t_start = time.monotonic()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    nodes: list[_Node] = []
    try:
        for edge in ("edge1", "edge2"):
            open_block(str(workdir / f"{edge}.blk"), create_size=1 << 20).close()
        with (_hosts(loopback) as (where, node_pre, stage_pre, host, node_dev, stage_dev),
              _node_ports(own_namespace=bool(node_pre)) as node_ports):
            res = DemoResult(where=where, restart_during=restart_during, source_period_ms=source_period_ms,
                             source_batch=source_batch(rate, source_period_ms), write_behind=write_behind,
                             node_ports=node_ports)
            say(f"ucx pipeline: {where}")
            nodes = [_Node(node_pre, host, p, workdir, node_dev, progress_mode, prefault) for p in node_ports]
            for n in nodes:  # one after the other: the first creates the shared token file
                n.start()
            addr = ",".join(f"{host}:{p}" for p in node_ports)
            for s in ("sink", "transform", "source"):
                procs[s] = subprocess.Popen(
                    [*stage_pre, sys.executable, "-m", "grafos_fabric.tools.ucx_pipeline", "--stage", s, "--dir",
                     str(workdir), "--nodes", addr, "--net-devices", stage_dev, "--rate", str(rate),
                     "--source-period", str(source_period_ms), *(["--write-behind"] if write_behind else [])],
                    preexec_fn=_die_with_parent)
            deadline = time.monotonic() + limit

            def check(wait: float) -> None:
                end = time.monotonic() + wait
                while True:
                    for s, p in procs.items():
                        if p.poll() not in (None, 0):
                            raise RuntimeError(f"stage {s} failed (exit {p.returncode})")
                    if time.monotonic() > deadline:
                        for p in procs.values():
                            if p.poll() is None:
                                os.kill(p.pid, signal.SIGUSR1)
                        time.sleep(1.0)
                        raise TimeoutError(f"the ucx pipeline did not finish within {limit}s (stage stacks above)")
                    if time.monotonic() >= end:
                        return
                    time.sleep(0.01)

            # let every edge get its first queue and carry items
            while not all(_current(workdir, e) for e in ("edge1", "edge2")) or "sink" not in _stats(workdir):
                check(0.05)
            check(interval)
            for k in range(kills):
                before = {e: _current(workdir, e) for e in ("edge1", "edge2")}
                c1 = before["edge1"]
                assert c1 is not None
                victim = next(n for n in nodes if n.port == c1[1])
                t_kill = time.monotonic()
                assert victim.proc is not None
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait()
                t_dead = time.monotonic()  # reaped: its sockets were closed before (the peers see resets)
                if restart_during:
                    victim.start()  # the killed node comes back, empty, on its port, while the edges move
                hit = [e for e, c in before.items() if c is not None and c[1] == victim.port]
                while True:  # until every edge the victim held has moved on (its generation went up)
                    now = {e: _current(workdir, e) for e in hit}
                    if all(c is not None and c[0] > before[e][0] for e, c in now.items()):  # type: ignore[index]
                        break
                    check(0.02)
                if not restart_during:
                    victim.start()  # the killed node comes back, empty, on its port, once the edges moved
                kill = {"kill": k + 1, "port": victim.port, "t": t_kill, "t_dead": t_dead, "before": before,
                        "after": now}
                log.info("kill #%d at monotonic %.4f", k + 1, t_kill)
                res.kills.append(kill)
                say(f"kill -9 #{k + 1} of the node on port {victim.port}: "
                    + ", ".join(f"{e} generation {before[e][0]} -> {c[0]} (node {c[1]})"  # type: ignore[index]
                                for e, c in now.items() if c is not None))
                check(interval)
            (workdir / "stop").touch()
            while any(p.poll() is None for p in procs.values()):
                check(0.05)
            check(0)
            res.elapsed_s = time.monotonic() - t_start
            _verify(workdir, res)
            for n in nodes:
                n.stop()
        return res
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for n in nodes:
            n.kill()
        if os.environ.get("GRAFOS_UCX_PIPELINE_KEEP"):
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _verify(workdir: Path, res: DemoResult) -> None:
    res.sent = int(json.loads((workdir / "source.json").read_text())["sent"])
    raw = np.fromfile(workdir / "sink.out", dtype=np.int64)
    raw = raw[: len(raw) // 2 * 2].reshape(-1, 2)
    seqs, values = raw[:, 0], raw[:, 1]
    uniq, first = np.unique(seqs, return_index=True)
    res.records = len(raw)
    res.distinct = len(uniq)
    res.duplicates = len(raw) - len(uniq)
    res.in_order = bool(np.all(np.diff(seqs) > 0))
    res.missing = int(res.sent - np.isin(np.arange(res.sent, dtype=np.int64), uniq).sum())
    res.extra = int(((uniq < 0) | (uniq >= res.sent)).sum())
    res.wrong = int((values[first] != uniq * 21 + 1).sum())
    stats = _stats(workdir)
    res.counters = {s: d.get("counters", {}) for s, d in stats.items()}
    for key, stage, edge in (("edge1_out", "source", "edge1"), ("edge2_out", "transform", "edge2")):
        st = stats.get(stage, {}).get(edge if stage == "source" else key, {})
        res.counters[f"{edge} relocations"] = st.get("relocations", 0)
        res.counters[f"{edge} replayed"] = st.get("replayed", 0)
        res.counters[f"{edge} producer relocate ms"] = [round(e["ms"], 1) for e in st.get("events", [])][1:]
    for stage, edge, key in (("transform", "edge1", "edge1_in"), ("sink", "edge2", "edge2_in")):
        st = stats.get(stage, {}).get(key, {})
        res.counters[f"{edge} consumer dropped duplicates"] = st.get("dropped_duplicates", 0)
        res.counters[f"{edge} consumer rebind p99 ms"] = round(st.get("rebind_p99_ms", 0.0), 1)
    # time from each kill to the first item the consumer popped from the edge's next generation
    for edge, stage in (("edge1", "transform"), ("edge2", "sink")):
        firsts = [tuple(x) for x in stats.get(stage, {}).get("firsts", {}).get(edge, [])]
        ms = []
        for kill in res.kills:
            b = kill["before"].get(edge)
            if b is None or b[1] != kill["port"]:
                continue  # this edge was on the other node: not relocated by this kill
            after = [t for g, t in firsts if g > b[0] and t >= kill["t"]]
            if after:
                ms.append((min(after) - kill["t"]) * 1e3)
        res.relocation_ms[edge] = ms
        pstage = "source" if edge == "edge1" else "transform"
        pubs = [tuple(x) for x in stats.get(pstage, {}).get("published", {}).get(edge, [])]
        pms = []
        for kill in res.kills:
            b = kill["before"].get(edge)
            if b is None or b[1] != kill["port"]:
                continue
            after = [t for g, t in pubs if g > b[0] and t >= kill["t"]]
            if after:
                pms.append(round((min(after) - kill["t"]) * 1e3, 1))
        res.counters[f"{edge} kill -> producer on the new queue ms"] = pms
        cstage, ckey = ("transform", "edge1_in") if edge == "edge1" else ("sink", "edge2_in")
        okey = "edge1" if edge == "edge1" else "edge2_out"
        res.breakdown[edge] = _breakdown(res.kills, edge, stats.get(pstage, {}).get(okey, {}).get("events", []),
                                         stats.get(cstage, {}).get(ckey, {}).get("events", []), firsts,
                                         [tuple(x) for x in stats.get(pstage, {}).get("pushed", {}).get(edge, [])])


#: The steps of a relocation, as (name, side, event field), in the order they happen.
STEPS = (
    ("node process gone", "kill", "t_dead"),
    ("producer notices", "tx", "t_lost"),
    ("new lease granted", "tx", "t_alloc"),
    ("handoff published", "tx", "t_published"),
    ("producer bound", "tx", "t_bound"),
    ("consumer notices", "rx", "t_lost"),
    ("consumer reads the record", "rx", "t_seen"),
    ("consumer attached", "rx", "t_bound"),
    ("first new item pushed", "pushed", ""),
    ("first item", "first", ""),
)


def _breakdown(kills: list[dict[str, Any]], edge: str, tx_events: list[dict[str, Any]],
               rx_events: list[dict[str, Any]], firsts: list[tuple[Any, ...]],
               pushed: list[tuple[Any, ...]] | None = None) -> dict[str, list[float]]:
    """Per step of :data:`STEPS`: ms from each kill that moved ``edge`` to that step (monotonic clocks,
    one machine), taken from the producer's relocation events and the consumer's rebind events of the
    first generation after the kill. "node process gone": the killed node was reaped (the kernel
    closed its sockets before: no peer can notice earlier). "first new item pushed": when the
    producer's first push of items the consumer had not seen (after the replay) returned; the
    source pushes once per period (``--source-period``), so the consumer's first item of the new
    generation waits up to one period for it, whatever the relocation costs."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in STEPS}
    for kill in kills:
        b = kill["before"].get(edge)
        if b is None or b[1] != kill["port"]:
            continue
        t_kill = kill["t"]
        tx = min((e for e in tx_events if e.get("generation", 0) > b[0] and e.get("t_bound", 0) >= t_kill),
                 key=lambda e: e["generation"], default=None)
        if tx is None:
            continue
        rx = next((e for e in rx_events if e.get("generation") == tx["generation"]), None)
        first = min((t for g, t in firsts if g >= tx["generation"] and t >= t_kill), default=None)
        push = min((t for g, t in (pushed or []) if g >= tx["generation"] and t >= t_kill), default=None)
        for name, side, key in STEPS:
            if side == "kill":
                t = kill.get(key)
            elif side in ("first", "pushed"):
                t = first if side == "first" else push
            else:
                t = (tx if side == "tx" else rx or {}).get(key)
            if isinstance(t, (int, float)) and t > 0:
                out[name].append(round((t - t_kill) * 1e3, 1))
    return out


def _print(res: DemoResult) -> None:
    s = res.summary()
    print(f"ucx pipeline demo: source -> transform -> sink over ucx:// (tcp), {res.where}")
    when = "at once (while the edges relocate)" if res.restart_during else "once the edges moved"
    if res.write_behind:
        print("  the edge producers publish by write-behind")
    print(f"  the source pushes {res.source_batch} items every {res.source_period_ms:g} ms "
          f"(the first item after a relocation waits up to one period for the next push)")
    print(f"  kill -9 of the memory node holding the edges: {len(res.kills)} times, each restarted on its port "
          f"{when}")
    print(f"  sent {res.sent:,} items; the sink wrote {res.records:,} records, {res.distinct:,} distinct, "
          f"missing {res.missing}, duplicates {res.duplicates}, wrong values {res.wrong}, in order {res.in_order}")
    for k, v in res.counters.items():
        if not isinstance(v, dict):
            print(f"  {k}: {v}")
    print(f"  sink dedup (idempotent drops): {res.counters.get('sink', {}).get('sink_dedup', 0)}")
    for edge, ms in res.relocation_ms.items():
        if ms:
            print(f"  {edge}: kill -9 -> first item from the new node: p50 {np.percentile(ms, 50):.1f} ms, "
                  f"p99 {np.percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms over {len(ms)} kills")
    for edge, steps in res.breakdown.items():
        print(f"  {edge}: breakdown, ms after the kill (p50 / max over kills):")
        for name, ms in steps.items():
            if ms:
                print(f"    {name:<26} {np.percentile(ms, 50):7.1f} / {max(ms):7.1f}")
    if "relocation_p99_ms" in s:
        verdict = "met" if s["relocation_p99_ms"] < RELOCATION_TARGET_MS else "NOT met"
        print(f"  all edges: p99 {s['relocation_p99_ms']:.1f} ms (target < {RELOCATION_TARGET_MS:.0f} ms: {verdict})")
    print(f"  elapsed {res.elapsed_s:.1f} s; result: {'OK: exactly the set sent, in order' if res.ok else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="three-stage pipeline over ucx:// with memory nodes killed mid-stream")
    ap.add_argument("--kills", type=int, default=10, help="how many times to kill -9 the node holding edge 1")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds of traffic between kills")
    ap.add_argument("--rate", type=float, default=20000.0, help="items/s the source aims at")
    ap.add_argument("--source-period", type=_period, default=SOURCE_PERIOD_MS, metavar="MS",
                    help="the source pushes rate * MS / 1000 items (at least one) every MS milliseconds "
                         f"(default {SOURCE_PERIOD_MS:g}; 25.6 at --rate 10000 is the old 256-item bursts)")
    ap.add_argument("--progress", choices=("event", "busy"), default="event", help="the nodes' UCX progress mode")
    ap.add_argument("--prefault", action="store_true",
                    help="the nodes fault their pools in at start (serve --ucx-prefault)")
    ap.add_argument("--loopback", action="store_true", help="127.0.0.1 instead of network namespaces")
    ap.add_argument("--write-behind", action="store_true",
                    help="the edge producers publish by write-behind (each push's tail CAS confirmed later)")
    ap.add_argument("--restart-during", action="store_true",
                    help="restart the killed node at once, while the edges relocate (default: once they moved)")
    ap.add_argument("--limit", type=float, default=600.0, help="give up after this many seconds")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", help=argparse.SUPPRESS)
    ap.add_argument("--net-devices", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s: %(message)s")
    if args.stage:
        return _stage_main(args)
    from grafos_fabric.drivers import ucx

    if ucx.available() is not None:
        print(f"UCX unavailable: {ucx.available()}")
        return 69
    res = run_demo(args.kills, args.interval, args.rate, loopback=args.loopback, progress_mode=args.progress,
                   limit=args.limit, say=print, restart_during=args.restart_during,
                   prefault=args.prefault, source_period_ms=args.source_period, write_behind=args.write_behind)
    _print(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res.summary(), default=str, indent=1))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
