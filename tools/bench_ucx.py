"""UCX driver benchmark: per-operation latency from Python and from a tight C loop,
beside ``ucx_perftest``'s figures for the same operations, measured in the same run.

::

    python -m grafos_fabric.tools.bench_ucx [--tls tcp] [--iters 20000]
    python -m grafos_fabric.tools.bench_ucx --netns [--rounds 5] [--iters 10000] [--progress busy|event]  # root

The memory node's data plane (UcxRegistrar, busy progress thread) and the client
run in this process over loopback (``UCX_NET_DEVICES=lo``); ``ucx_perftest``
(ucx-utils) runs as two processes over the same transport. Prints one row per
operation: p50/p99 in µs for Python (one region call), the C loop, and perftest
(its typical latency), and 1 MiB put bandwidth beside perftest's ``ucp_put_bw``
(its overall bandwidth, best of its outstanding windows). ``--netns``: the node
and the client in two network namespaces, perftest between the same two,
alternating for ``--rounds`` rounds; each figure as median [min-max]. Two
placements of a 1 MiB queue: the node on a third host (producer and consumer
both in B: every item crosses the veth twice, through the node's one progress
thread) and the node on the consumer's host (node and consumer in A, the producer in
B: every item crosses the veth once, as perftest's puts do), in three rows:
the consumer mapping the span (the node with ``--ucx-local-map``, the
consumer with ``map=local``: no UCX operation per item), with the node's
progress thread busy and in event mode, and the consumer reaching the node
over UCX shared memory (a cross-memory-attach copy per record).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["main", "perftest", "perftest_netns", "queue_rates", "run", "run_netns", "run_ucx_bench"]

_SECRET = b"grafos-bench-ucx-secret-32-bytes"


def _parse_perftest(out: str, test: str) -> float | None:
    """The figure of ``ucx_perftest``'s last ``Final:`` row: typical latency (µs, its p50) for a latency
    test, overall bandwidth (MB/s) for a ``*_bw`` test; None when there is no such row.

    ``Final:`` columns: iterations, latency p50, latency average (of the last report interval only),
    latency overall, bandwidth average (last interval), bandwidth overall, message rate average,
    overall. The bandwidth is the *overall* one: the last interval's is a few iterations under
    whatever the scheduler did then (it ranged 5-250 MB/s in one run where the overall stayed
    120-240)."""
    rows = [line for line in out.splitlines() if line.startswith("Final:")]
    if not rows:
        return None
    cols = rows[-1].split()[1:]
    try:
        return float(cols[5]) if test.endswith("_bw") else float(cols[1])
    except (IndexError, ValueError):
        return None


def _perftest_args(test: str, size: int, iters: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The client's test flags: an explicit warm-up (the default is 10,000 iterations, 10 GB at 1 MiB)."""
    return ["-t", test, "-s", str(size), "-n", str(iters), "-w", str(max(10, iters // 10)), *extra]


# ucp_put_bw: its best of these outstanding-request windows, measured in the same run (-O 1 is what
# a write that waits for local completion does; the default window, unlimited, queues every put on
# a socket the responder drains only as fast as it is scheduled)
_PUT_BW_WINDOWS: tuple[tuple[str, ...], ...] = (("-O", "1"), ("-O", "4"), ())


def _run_perftest(server: list[str], client: list[str], server_env: dict[str, str], client_env: dict[str, str],
                  test: str) -> float | None:
    proc = subprocess.Popen(server, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(client, env=client_env, capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return None
    finally:
        proc.kill()
        proc.wait()
    return _parse_perftest(out, test)


def perftest(test: str, size: int, iters: int, tls: str, extra: tuple[str, ...] = ()) -> float | None:
    """``ucx_perftest`` -t TEST on loopback: typical latency (µs) or overall bandwidth (MB/s); None where absent."""
    exe = shutil.which("ucx_perftest")
    if exe is None:
        return None
    env = {**os.environ, "UCX_TLS": tls, "UCX_NET_DEVICES": "lo"}
    port = str(13337 + os.getpid() % 1000)
    return _run_perftest([exe, "-p", port], [exe, "127.0.0.1", "-p", port, *_perftest_args(test, size, iters, extra)],
                         env, env, test)


def perftest_netns(test: str, size: int, iters: int, pair: Any, port: int,
                   extra: tuple[str, ...] = ()) -> float | None:
    """``ucx_perftest`` across two namespaces (server in A, client in B, tcp over the veth):
    typical latency (µs) or overall bandwidth (MB/s); None where absent or failed."""
    exe = shutil.which("ucx_perftest")
    if exe is None:
        return None
    base = {**os.environ, "UCX_TLS": "tcp"}
    return _run_perftest(["ip", "netns", "exec", pair.ns_a, exe, "-p", str(port)],
                         ["ip", "netns", "exec", pair.ns_b, exe, pair.ip_a, "-p", str(port),
                          *_perftest_args(test, size, iters, extra)],
                         {**base, "UCX_NET_DEVICES": pair.dev_a}, {**base, "UCX_NET_DEVICES": pair.dev_b}, test)


def _best_put_bw(run_one: Callable[[tuple[str, ...]], float | None]) -> tuple[float | None, str]:
    """``ucp_put_bw`` at each window of :data:`_PUT_BW_WINDOWS`: the best figure and its flags."""
    best: tuple[float | None, str] = (None, "")
    for flags in _PUT_BW_WINDOWS:
        got = run_one(flags)
        if got is not None and (best[0] is None or got > best[0]):
            best = (got, " ".join(flags) or "default window")
    return best


# the perftest test beside each operation: ucp_put_lat is a ping-pong (half a round trip), so the
# put + flush row (a whole round trip: put, then wait for the remote completion) also shows 2x it
_PERFTEST = {"cas": "ucp_cswap", "faa": "ucp_fadd", "put_flush": "ucp_put_lat", "get": "ucp_get"}


def _py_latencies(r: Any, op: str, iters: int) -> Any:
    """µs per call of one region operation from Python (after 200 warm-up calls): the bound method
    called with its arguments between two clock reads, nothing else in the timed span."""
    buf = bytearray(8)
    method, args = {"cas": (r.cas64, (0, 0, 0)), "faa": (r.faa64, (0, 1)), "put_flush": (r.store64, (0, 1)),
                    "get": (r.read_into, (0, buf))}[op]
    for _ in range(200):
        method(*args)
    lat = np.empty(iters)
    clock = time.perf_counter_ns
    if len(args) == 2:
        a, b = args
        for i in range(iters):
            t0 = clock()
            method(a, b)
            lat[i] = clock() - t0
    else:
        a, b, c = args
        for i in range(iters):
            t0 = clock()
            method(a, b, c)
            lat[i] = clock() - t0
    return lat / 1e3


def _spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of one figure over the rounds."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def run_netns(iters: int = 20000, seconds: float = 1.0, progress: Any = None, node_progress: str = "busy",
              rounds: int = 5, batch: int = 1, publish: str = "fence") -> list[dict[str, Any]]:
    """Across two network namespaces (root): the memory node (``serve --driver ucx``, progress
    ``node_progress``, busy by default) in A, this client in B, tcp over a veth. Raw operation
    latencies from Python and from the C loop, 1 MiB queue items (producer and consumer in B) and
    raw 1 MiB puts, each beside ``ucx_perftest`` between the same namespaces. ``rounds`` times,
    alternating (our client, then perftest: the two never share the cores), so each ratio pairs
    figures taken a few seconds apart; every figure is reported as the median over the rounds with
    its min and max. Returns rows; one row with ``error`` where namespaces are not possible."""
    import tempfile

    from grafos_fabric.tools import netns

    why = netns.unavailable()
    if why is not None:
        return [{"case": "ucx netns", "error": f"no network namespaces: {why}"}]
    per_round: list[list[dict[str, Any]]] = []
    port = 13400 + os.getpid() % 500
    with tempfile.TemporaryDirectory(prefix="grafos-bench-ucx-") as tmp, netns.veth_pair() as pair:
        token = os.path.join(tmp, "node.token")
        for rnd in range(rounds):
            if progress:
                progress(f"ucx netns: round {rnd + 1}/{rounds}: operations")
            rows = _netns_client_round(pair, token, iters, seconds, node_progress)
            # perftest after our node is gone: the two never share the cores
            bw: dict[str, Any] = {}
            for row in rows:
                test = row["perftest_test"]
                if progress:
                    progress(f"ucx netns: round {rnd + 1}/{rounds}: perftest {test}")
                if test == "ucp_put_bw":
                    if not bw:
                        n = max(100, min(500, iters // 20))

                        def one(flags: tuple[str, ...], n: int = n) -> float | None:
                            nonlocal port
                            port += 1
                            return perftest_netns("ucp_put_bw", 1 << 20, n, pair, port, flags)

                        bw["perftest"], bw["perftest_flags"] = _best_put_bw(one)
                    row.update(bw)
                else:
                    port += 1
                    row["perftest"] = perftest_netns(test, 8, iters, pair, port)
                _ratios(row)
            for mode, prog, pub in _splits(publish):
                if progress:
                    progress(f"ucx netns: round {rnd + 1}/{rounds}: 1 MiB items, node on the consumer's host "
                             f"({mode}, node progress {prog}, publish {pub})")
                split = _netns_split_round(pair, os.path.join(tmp, f"split{rnd}-{mode}-{prog}-{pub}"), seconds, mode,
                                           prog, batch, pub)
                if split is None:  # keep the rows of every round in step (the merge pairs them by position)
                    split = {"op": _split_op(mode, prog, pub), "perftest_test": "ucp_put_bw", "failed": 1}
                split.update(bw)
                _ratios(split)
                rows.append(split)
            per_round.append(rows)
    return _merge_rounds(per_round)


def _serve_node(ns: str, pair: Any, token: str, node_progress: str, tls: str = "tcp",
                local_map: bool = False) -> subprocess.Popen[str]:
    """``grafos-fabric serve --driver ucx`` in namespace ``ns`` on ``pair.ip_a:7400``, once it serves."""
    node = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "grafos_fabric.tools.serve", "--driver", "ucx",
         "--host", pair.ip_a, "--allow-remote", "--port", "7400", "--token-file", token, "--pool", "256M",
         "--ucx-net-devices", pair.dev_a, "--ucx-tls", tls, "--ucx-progress", node_progress,
         "--log-level", "WARNING", *(["--ucx-local-map"] if local_map else [])],
        stdout=subprocess.PIPE, text=True)
    assert node.stdout is not None
    line = node.stdout.readline()
    while line and not line.startswith("serving "):
        line = node.stdout.readline()
    if not line:
        raise RuntimeError(f"the memory node did not start (exit {node.wait()})")
    return node


# The placements of the node on the consumer's host, each a row: how the consumer reaches the ring
# ("map": it maps the span, the node runs with --ucx-local-map; "sm": UCX shared memory) and the
# node's progress mode.
# The publication: None is --publish's (fence by default); the write-behind row is always run.
_SPLITS = (("map", "busy", None), ("map", "busy", "behind"), ("map", "event", None), ("sm", "busy", None))


def _splits(publish: str) -> list[tuple[str, str, str]]:
    """The node-on-the-consumer's-host rounds of a run whose producer publishes by ``publish``:
    :data:`_SPLITS` with the default filled in, each (mode, progress, publish) once (with
    ``--publish behind`` the always-run write-behind row is the first row; run twice, the second
    round's files would meet the first's)."""
    out: list[tuple[str, str, str]] = []
    for mode, prog, pub in _SPLITS:
        key = (mode, prog, pub or publish)
        if key not in out:
            out.append(key)
    return out


def _split_op(mode: str, node_progress: str, publish: str = "fence") -> str:
    how = "consumer maps the span" if mode == "map" else "consumer over UCX sm"
    return f"queue 1 MiB items, node on the consumer's host ({how}, node progress {node_progress}, publish {publish})"


def _netns_split_round(pair: Any, tmp: str, seconds: float, mode: str = "map",
                       node_progress: str = "busy", batch: int = 1, publish: str = "fence") -> dict[str, Any] | None:
    """1 MiB queue items with the memory node on the consumer's host: node and consumer in A, producer in B.

    Each item crosses the veth once (the producer's put, over tcp, as ``ucx_perftest``'s). This is
    where an edge's memory goes when the consumer's host can serve it: the receive-side ring of
    RDMA queues. ``mode="map"``: the node maps its spans locally (``--ucx-local-map``) and the
    consumer maps the queue's span (``map=local``): it reads records with CPU loads, no UCX
    operation and no copy per item. ``mode="sm"``: the consumer reaches the node through UCX
    shared memory (``tls=sm,tcp``: the node's memory read by the kernel's cross-memory attach, a
    copy per record). None (and a log line) where the consumer or producer fails."""
    os.makedirs(tmp)  # a fresh directory: another round's locator or .done here would be taken for this one's
    token, loc = os.path.join(tmp, "node.token"), os.path.join(tmp, "queue.locator")
    if mode == "map":
        node = _serve_node(pair.ns_a, pair, token, node_progress, tls="tcp", local_map=True)
        cons_url = f"ucx://{pair.ip_a}:7400?tls=tcp&net_devices={pair.dev_a}&map=local"
    else:
        node = _serve_node(pair.ns_a, pair, token, node_progress, tls="sm,tcp")
        cons_url = f"ucx://{pair.ip_a}:7400?tls=sm,tcp"
    me = [sys.executable, "-m", "grafos_fabric.tools.bench_ucx", "--netns-split"]
    try:
        cons = subprocess.Popen(
            ["ip", "netns", "exec", pair.ns_a, *me, "consumer", cons_url, token, loc,
             str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        prod = subprocess.Popen(
            ["ip", "netns", "exec", pair.ns_b, *me, "producer",
             f"ucx://{pair.ip_a}:7400?tls=tcp&net_devices={pair.dev_b}", token, loc, str(seconds), "--batch",
             str(batch), "--publish", publish],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            out, err = cons.communicate(timeout=120 + 4 * seconds)
            if not os.path.exists(loc + ".done"):  # the consumer failed: stop the producer (its error is below)
                open(loc + ".done", "w").close()
            perr = prod.communicate(timeout=60)[1]
        finally:
            for p in (cons, prod):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        got = [ln for ln in out.splitlines() if ln.startswith("{")]
        if cons.returncode or prod.returncode or not got:
            sys.stderr.write(f"bench_ucx: the split round failed (consumer exit {cons.returncode}, producer exit "
                             f"{prod.returncode}): {err[-1000:]} {perr[-1000:]}\n")
            return None
        row: dict[str, Any] = json.loads(got[-1])
        return {"op": _split_op(mode, node_progress, publish), "perftest_test": "ucp_put_bw", **row}
    finally:
        node.terminate()  # SIGTERM: the node closes (a --ucx-local-map node removes its /dev/shm directory)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


PUBLISH_MODES = ("fence", "behind", "behind2", "behind4", "flush", "separate")


def _set_publish(tx: Any, publish: str) -> None:
    """How the one-sided producer ``tx`` publishes: ``fence`` (the default: records, sequence
    word and tail CAS in one ``publish`` call, the CAS ordered by ``ucp_worker_fence``),
    ``behind`` (the same with write-behind: ``set_write_behind()``, each push's CAS confirmed
    during the next push; ``behind2``/``behind4``: ``set_write_behind(depth=2/4)``, confirmed
    two or four pushes later), ``flush`` (one call, the CAS after a flush), ``separate``
    (``write``, ``store64``, ``cas64``, as a region without ``publish`` does)."""
    if publish not in PUBLISH_MODES:
        raise ValueError(f"publish must be one of {PUBLISH_MODES}, got {publish!r}")
    region = tx.region
    if publish == "separate":
        region.publish = None  # the producer falls back to the separate operations
    else:
        region.publish_order = 1 if publish == "flush" else 0
    if publish.startswith("behind"):
        tx.set_write_behind(depth=int(publish[6:] or 1))


def _split_role(role: str, url: str, token: str, loc: str, seconds: float, batch: int = 1,
                publish: str = "fence") -> dict[str, Any] | None:
    """One side of :func:`_netns_split_round`. The consumer creates the queue on the node, publishes
    its locator in ``loc``, times ``seconds`` of popping after a warm-up and writes ``loc.done``;
    the producer attaches by that locator and pushes 1 MiB items until ``loc.done`` appears, then
    closes its handle and writes ``loc.stopped``, after which the consumer frees the queue."""
    import grafos_fabric as gf
    from grafos_fabric.drivers import ucx

    size = 1 << 20
    fabric = ucx.UcxFabric.from_url(url, token_file=token)
    try:
        if role == "consumer":
            q = gf.FabricQueue.create(fabric, capacity=8 << 20, ttl=600.0)
            # map=local: the consumer maps the span (mapped_regions); else it reaches it one-sided
            rx = gf.FabricQueue.attach(fabric, bytes(q.locator()), mapped=fabric.mapped_regions)
            if "map=local" in url and not rx.region.mapped:
                raise RuntimeError("map=local, but the consumer's region is not mapped (is /dev/shm shared?)")
            with open(loc + ".tmp", "wb") as fh:
                fh.write(bytes(q.locator()))
            os.rename(loc + ".tmp", loc)
            got, start, warm, now = 0, 0.0, 0.0, 0.0
            deadline = time.monotonic() + 60.0
            last, stall = 0.0, 0.0  # the longest wait for an item once they flow: shown in the row
            while True:
                try:
                    b = rx.pop_batch(4, timeout=1.0)
                except TimeoutError:
                    # before the first item: the producer may still be starting (attach, connect);
                    # after it: a stall, timed, and an error only past 10 s
                    if warm and time.perf_counter() - last > 10.0:
                        raise TimeoutError("no item from the producer in 10 s, mid-stream") from None
                    if not warm and time.monotonic() > deadline:
                        raise TimeoutError("no item from the producer in 60 s") from None
                    continue
                now = time.perf_counter()
                if last and start:
                    stall = max(stall, now - last)
                last = now
                if len(b) and not warm:
                    warm = now + min(0.3, seconds / 4)  # from the first item on
                if warm and not start and now >= warm:
                    start, got = now, 0
                got += len(b)
                b.release()
                if start and now - start >= seconds:
                    break
            open(loc + ".done", "w").close()
            stop_by = time.monotonic() + 10.0  # free the queue once the producer has stopped pushing
            while not os.path.exists(loc + ".stopped") and time.monotonic() < stop_by:
                with contextlib.suppress(TimeoutError):  # keep its last push from waiting for space
                    rx.pop_batch(4, timeout=0.05).release()
            rx.close()
            q.free()
            rate = got / (now - start)
            out: dict[str, Any] = {"items_per_s": rate, "MB_per_s": rate * size / 1e6, "max_stall_ms": stall * 1e3}
            with contextlib.suppress(OSError, ValueError):
                with open(loc + ".ops") as fh:
                    out["ops"] = {"producer": json.load(fh)}
            return out
        deadline = time.monotonic() + 60.0
        while not os.path.exists(loc):
            if time.monotonic() > deadline:
                raise TimeoutError("no queue locator in 60 s")
            time.sleep(0.01)
        with open(loc, "rb") as fh:
            tx = gf.FabricQueue.attach(fabric, fh.read(), mapped=False)
        _set_publish(tx, publish)
        items = np.zeros((batch, size), np.uint8)  # one push_batch call: up to `batch` items, one publish
        counts: dict[str, list[float]] = {}
        _count_ops(tx.region, counts)  # the producer's remote operations per item, for the row
        pushed = 0
        while not os.path.exists(loc + ".done"):
            with contextlib.suppress(TimeoutError):
                pushed += tx.push_batch(items, timeout=0.2)
        tx.close()
        with open(loc + ".ops", "w") as fh:
            json.dump(_per_item(counts, max(1, pushed)), fh)
        open(loc + ".stopped", "w").close()
        return None
    finally:
        fabric.close()


def _netns_client_round(pair: Any, token: str, iters: int, seconds: float, node_progress: str) -> list[dict[str, Any]]:
    """One round: a fresh memory node in A, the client process in B; its rows."""
    node = _serve_node(pair.ns_a, pair, token, node_progress)
    try:
        # the client is a process in B (``ip netns exec`` also gives it B's /sys, where UCX finds the veth)
        url = f"ucx://{pair.ip_a}:7400?tls=tcp&net_devices={pair.dev_b}"
        argv = [sys.executable, "-m", "grafos_fabric.tools.bench_ucx", "--netns-client", url, token,
                str(iters), str(seconds)]
        out = subprocess.run(["ip", "netns", "exec", pair.ns_b, *argv], capture_output=True, text=True, timeout=600)
        got = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
        if out.returncode or not got:
            raise RuntimeError(f"the client in {pair.ns_b} failed (exit {out.returncode}): {out.stderr[-2000:]}")
        rows: list[dict[str, Any]] = json.loads(got[-1])
        return rows
    finally:
        node.kill()
        node.wait()


def _ratios(row: dict[str, Any]) -> None:
    """This round's ratios to perftest (the targets: latency <= 1.3x, 1 MiB bandwidth >= 0.8x)."""
    pt = row.get("perftest")
    if row["op"] == "get":
        # ucp_get is a bandwidth-style test whose responder does not progress over tcp: its
        # "latency" is milliseconds, not a round trip (FAA/CAS are the round-trip reference)
        row["perftest_note"] = "not comparable over tcp"
    elif pt:
        if "MB_per_s" in row:
            row["ratio"] = row["MB_per_s"] / pt  # >= 0.8 is the target
            if row["op"] == "queue 1 MiB items":
                # each item crosses the wire twice (producer put to the node, consumer get from it)
                # and the node's one progress thread serves both: 0.5 is where the wire says stop
                row["ratio_wire"] = 2 * row["MB_per_s"] / pt
        elif "py_p50" in row:  # (a failed round's row has neither figure)
            same = 2 * pt if row["op"] == "put_flush" else pt  # a whole round trip either way
            row["perftest_same_work"] = same
            row["ratio_py"] = row["py_p50"] / same  # <= 1.3 is the target
            row["ratio_c"] = row["c_p50"] / same


_FIGURES = ("py_p50", "py_p99", "c_p50", "c_p99", "perftest", "perftest_same_work", "ratio_py", "ratio_c",
            "MB_per_s", "items_per_s", "ratio", "ratio_wire", "max_stall_ms")


def _merge_rounds(per_round: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per operation: each figure's median over the rounds (``fig``), ``fig_min``, ``fig_max``."""
    merged: list[dict[str, Any]] = []
    for i, first in enumerate(per_round[0]):
        rows = [r[i] for r in per_round if i < len(r)]
        out = {k: v for k, v in first.items() if k not in _FIGURES}
        out["rounds"] = len(rows)
        out["failed"] = sum(int(r.get("failed", 0)) for r in rows)  # rounds without figures (logged)
        for fig in _FIGURES:
            vals = [float(r[fig]) for r in rows if r.get(fig) is not None]
            if vals:
                sp = _spread(vals)
                out[fig], out[f"{fig}_min"], out[f"{fig}_max"] = sp["median"], sp["min"], sp["max"]
        flags = sorted({str(r["perftest_flags"]) for r in rows if r.get("perftest_flags")})
        if flags:
            out["perftest_flags"] = ", ".join(flags)
        merged.append(out)
    return merged


def _client_ops(url: str, token: str, iters: int, seconds: float) -> list[dict[str, Any]]:
    """In namespace B: two fabrics onto the node in A; operation latencies, 1 MiB queue and puts."""
    from grafos_fabric.drivers import ucx

    # one client session on the node while the operations are timed, as perftest has one peer (the
    # node's progress thread passes over every session's worker: each more costs it a poll per pass)
    fa = ucx.UcxFabric.from_url(url, token_file=token)
    fb: Any = None
    rows: list[dict[str, Any]] = []
    try:
        r = fa.alloc(2 << 20, 600.0)
        assert isinstance(r, ucx.UcxRegion)
        for op in _PERFTEST:
            lat = _py_latencies(r, op, iters)
            c = np.array(r.bench(op, 8, iters))
            rows.append({"op": op, "py_p50": float(np.percentile(lat, 50)), "py_p99": float(np.percentile(lat, 99)),
                         "c_p50": float(np.percentile(c, 50)), "c_p99": float(np.percentile(c, 99)),
                         "perftest_test": _PERFTEST[op]})
        big = bytes(1 << 20)
        n = max(20, min(200, iters // 20))
        for _ in range(5):
            r.write(0, big)
        r.flush()
        start = time.perf_counter()
        for _ in range(n):
            r.write(0, big)
        r.flush()
        rows.append({"op": "put 1 MiB", "MB_per_s": n * len(big) / (time.perf_counter() - start) / 1e6,
                     "perftest_test": "ucp_put_bw"})
        fb = ucx.UcxFabric.from_url(url, token_file=token)
        ops: dict[str, Any] = {}
        rate = _queue_rate(fa, fb, 1 << 20, seconds, False, ops)
        rows.append({"op": "queue 1 MiB items", "MB_per_s": rate * (1 << 20) / 1e6, "items_per_s": rate,
                     "perftest_test": "ucp_put_bw", "ops": ops})
        r.lease.free()
    finally:
        fa.close()
        if fb is not None:
            fb.close()
    return rows


def run(tls: str = "tcp", iters: int = 20000) -> list[dict[str, Any]]:
    from grafos_fabric.drivers import ucx
    from grafos_fabric.drivers.node.registrar import Grant
    from grafos_fabric.lease import NS, Lease, LocalLeaseCell, MonotonicClock

    class _Link:
        host, port, tenant, session_epoch = "127.0.0.1", 0, "bench", 0

        def __init__(self, session: Any) -> None:
            self.session = session
            self.info = {"ucx_host": "127.0.0.1"}

        def connect(self, params: Any) -> Any:
            return self.session.connect(params)

        def lease_state(self, lease_id: str) -> str:
            return "active"

    nbytes = 2 << 20
    reg = ucx.UcxRegistrar(nbytes, host="127.0.0.1", tls=tls, net_devices="lo")
    ctx = ucx.UcxContext(ucx.ucx_config(tls, "lo"))
    rows: list[dict[str, Any]] = []
    try:
        span = reg.register(0, nbytes)
        clock = MonotonicClock()
        lease = Lease("bench", ttl=3600.0, generation=1, cell=LocalLeaseCell(clock.now_ns() + 3600 * NS), clock=clock)
        conn = ucx.UcxConnector(ctx, _Link(reg.open_session("bench")))
        r = conn.region(lease, Grant("bench", 1, nbytes, 3600.0, True, span.access(True)))
        for op, ptest in _PERFTEST.items():
            lat = _py_latencies(r, op, iters)
            c = np.array(r.bench(op, 8, iters))
            pt = perftest(ptest, 8, iters, tls) if ptest != "ucp_get" else None
            rows.append({"op": op, "py_p50": float(np.percentile(lat, 50)), "py_p99": float(np.percentile(lat, 99)),
                         "c_p50": float(np.percentile(c, 50)), "c_p99": float(np.percentile(c, 99)),
                         "perftest": pt, "perftest_test": ptest})
        big = bytes(1 << 20)
        n = max(20, min(200, iters // 10))
        start = time.perf_counter()
        for _ in range(n):
            r.write(0, big)
        r.flush()
        mbs = n * len(big) / (time.perf_counter() - start) / 1e6
        pt, flags = _best_put_bw(lambda extra: perftest("ucp_put_bw", 1 << 20, max(100, min(500, iters // 10)),
                                                        tls, extra))
        rows.append({"op": "put 1 MiB (MB/s)", "py_p50": mbs, "perftest": pt, "perftest_flags": flags,
                     "perftest_test": "ucp_put_bw"})
        r.close()
        conn.close()
    finally:
        reg.close()
        ctx.close()
    return rows


_COUNTED = ("publish", "publish_post", "publish_wait", "write", "read_into", "load64", "store64", "cas64", "faa64",
            "flush")


def _count_ops(region: Any, into: dict[str, list[float]]) -> None:
    """Count and time ``region``'s remote operations into ``into`` (op -> [calls, seconds, bytes]):
    instance attributes wrapping its methods (the queue looks them up on the instance each call).
    Costs about a microsecond per operation, against milliseconds per 1 MiB item."""
    clock = time.perf_counter

    for name in _COUNTED:
        method = getattr(region, name, None)
        if method is None:  # no publish (another driver, or --publish separate)
            continue
        cell = into.setdefault(name, [0.0, 0.0, 0.0])

        def timed(*args: Any, _m: Any = method, _c: list[float] = cell) -> Any:
            t0 = clock()
            try:
                return _m(*args)
            finally:
                _c[0] += 1
                _c[1] += clock() - t0
                if len(args) == 2 and not isinstance(args[1], int):
                    _c[2] += memoryview(args[1]).nbytes
                elif len(args) >= 6 and isinstance(args[0], list):  # publish: the records' spans
                    _c[2] += sum(span[1] for span in args[0])

        setattr(region, name, timed)


def _per_item(counts: dict[str, list[float]], items: int) -> dict[str, Any]:
    """Per item: calls, µs spent in each operation, and bytes moved (only the operations that ran)."""
    out: dict[str, Any] = {}
    for name, (n, secs, nbytes) in counts.items():
        if n:
            out[name] = {"per_item": n / items, "mean_us": secs / n * 1e6, "us_per_item": secs / items * 1e6,
                         **({"MB_per_item": nbytes / items / 1e6} if nbytes else {})}
    return out


def _queue_rate(ftx: Any, frx: Any, size: int, seconds: float, mapped: bool,
                ops: dict[str, Any] | None = None) -> float:
    """Items/s through one queue: a producer thread pushing batches, this thread popping them.

    ``ops``: filled with the remote operations per item over the timed window,
    ``{"producer": {op: ...}, "consumer": {op: ...}}`` (see :func:`_per_item`)."""
    import threading

    import grafos_fabric as gf

    batch = 1 if size >= 1 << 20 else max(1, min(256, (64 << 10) // size))
    cap = 1 << max(16, (4 * batch * (size + 64) - 1).bit_length())
    tx = gf.FabricQueue.create(ftx, capacity=cap, ttl=600.0)
    rx = gf.FabricQueue.attach(frx, bytes(tx.locator()), mapped=mapped)
    counts: dict[str, dict[str, list[float]]] = {"producer": {}, "consumer": {}}
    if ops is not None:
        _count_ops(tx.region, counts["producer"])
        _count_ops(rx.region, counts["consumer"])
    items = np.zeros((batch, size), np.uint8)
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            try:
                tx.push_batch(items, timeout=0.2)
            except TimeoutError:
                continue

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    got = 0
    warm = time.perf_counter() + min(0.2, seconds / 4)
    start = end = 0.0
    while True:
        b = rx.pop_batch(batch, timeout=1.0)
        now = time.perf_counter()
        if start == 0.0 and now >= warm:
            start, got = now, 0
            for side in counts.values():  # count the timed window only
                for cell in side.values():
                    cell[:] = [0.0, 0.0, 0.0]
        got += len(b)
        b.release()
        if start and now - start >= seconds:
            end = now
            break
    stop.set()
    if ops is not None:
        ops.update({side: _per_item(c, max(1, got)) for side, c in counts.items()})
    while t.is_alive():  # drain so the producer's last push returns
        rx.pop_batch(batch, timeout=0).release()
        t.join(0.05)
    rx.close()
    tx.free()  # the ring goes back now (closing alone left the segment until its lease expired)
    return got / (end - start)


def queue_rates(sizes: tuple[int, ...], seconds: float, progress: Any = None,
                node_progress: str = "event") -> list[dict[str, Any]]:
    """Queue throughput over ucx:// (tcp, sm,tcp; one-sided) beside shm (mapped and one-sided), same run."""
    import grafos_fabric as gf
    from grafos_fabric.drivers import ucx
    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer

    rows: list[dict[str, Any]] = []
    ns = f"bench-ucx-{os.getpid()}"
    shm = gf.open_fabric(f"shm://{ns}")
    try:
        for size in sizes:
            for mapped in (True, False):
                name = f"shm {'mapped' if mapped else 'one-sided'}"
                if progress:
                    progress(f"ucx: {name} {size} B")
                rate = _queue_rate(shm, shm, size, seconds, mapped)
                rows.append({"transport": name, "size": size, "items_per_s": rate, "MB_per_s": rate * size / 1e6})
    finally:
        shm.reap()
        shm.close()
        # nothing of this run's private namespace stays in /dev/shm (its generation counter too)
        with contextlib.suppress(OSError):
            for name in os.listdir("/dev/shm"):
                if name.startswith(f"grafos.{ns}.") or name == f"grafos-gen.{ns}":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join("/dev/shm", name))
    for tls in ("tcp", "sm,tcp"):
        reg = ucx.UcxRegistrar(256 << 20, host="127.0.0.1", tls=tls, net_devices="lo", progress=node_progress)
        node = NodeServer(reg, load_policy(_SECRET), port=0).start()
        try:
            fa = ucx.UcxFabric("127.0.0.1", node.port, secret=_SECRET, tls=tls, net_devices="lo")
            fb = ucx.UcxFabric("127.0.0.1", node.port, secret=_SECRET, tls=tls, net_devices="lo")
            try:
                for size in sizes:
                    if progress:
                        progress(f"ucx: {tls} {size} B")
                    rate = _queue_rate(fa, fb, size, seconds, False)
                    rows.append({"transport": f"ucx {tls} (one-sided)", "size": size, "items_per_s": rate,
                                 "MB_per_s": rate * size / 1e6})
            finally:
                fa.close()
                fb.close()
        finally:
            node.close()
    return rows


def run_ucx_bench(sizes: tuple[int, ...] = (64, 4096, 1 << 20), seconds: float = 0.8,
                  progress: Any = None, iters: int | None = None,
                  netns: bool = False) -> dict[str, list[dict[str, Any]]]:
    """grafos-bench's ``ucx`` case: queue rates (``ucx``) and raw operation latencies (``ucx ops``) on
    loopback; with ``netns`` (``grafos-bench --driver ucx``) also ``ucx netns``: the same across two
    network namespaces beside ``ucx_perftest`` between them (:func:`run_netns`)."""
    from grafos_fabric.drivers import ucx

    why = ucx.available()
    if why is not None:
        return {"ucx": [{"case": "ucx", "error": f"UCX unavailable: {why}"}]}
    ops: list[dict[str, Any]] = []
    for tls in ("tcp", "sm,tcp"):
        if progress:
            progress(f"ucx ops: {tls}")
        for row in run(tls, iters=iters or max(1000, int(seconds * 5000))):
            ops.append({"tls": tls, **{k: v for k, v in row.items() if v is not None}})
    out = {"ucx": queue_rates(tuple(sizes), seconds, progress), "ucx ops": ops}
    if netns:
        out["ucx netns"] = run_netns(iters=iters or max(2000, int(seconds * 10000)), seconds=max(1.0, seconds),
                                     progress=progress)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tls", default="tcp")
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--netns", action="store_true",
                    help="across two network namespaces (root): node in one, client in the other, tcp over a veth")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds of 1 MiB queue traffic (--netns)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of ours then perftest (--netns)")
    ap.add_argument("--progress", choices=("busy", "event"), default="busy",
                    help="the memory node's progress mode (--netns; default busy)")
    ap.add_argument("--batch", type=int, default=1,
                    help="items per push_batch call of the producer in the node-on-the-consumer's-host rows "
                         "(--netns; default 1): one write of the records, one publish per call")
    ap.add_argument("--publish", choices=PUBLISH_MODES, default="fence",
                    help="how the one-sided producer of the node-on-the-consumer's-host rows publishes (--netns): "
                         "fence (default: records, sequence word and tail CAS in one call, the CAS ordered by "
                         "ucp_worker_fence), behind (the same, write-behind: each push's CAS confirmed during the "
                         "next; behind2/behind4: two/four pushes later), flush (one call, the CAS after a "
                         "flush), separate (write, store64, cas64: the path "
                         "of a region without publish)")
    ap.add_argument("--netns-client", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--netns-split", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.netns_split:
        role, url, token, loc, secs = args.netns_split
        got = _split_role(role, url, token, loc, float(secs), max(1, args.batch), args.publish)
        if got is not None:
            print(json.dumps(got), flush=True)
        return 0
    if args.netns_client:
        url, token, iters, seconds = args.netns_client
        print(json.dumps(_client_ops(url, token, int(iters), float(seconds))), flush=True)
        return 0
    from grafos_fabric.drivers import ucx

    if ucx.available() is not None:
        print(f"UCX unavailable: {ucx.available()}")
        return 69
    if args.netns:
        before = os.getloadavg()[0]
        rows = run_netns(args.iters, args.seconds, node_progress=args.progress, rounds=max(1, args.rounds),
                         batch=max(1, args.batch), publish=args.publish)
        print(f"load average (1 min) {before:.2f} before, {os.getloadavg()[0]:.2f} after; "
              f"node progress {args.progress}; node-on-the-consumer's-host producer batch {max(1, args.batch)}")
        return _print_netns(rows, ucx.version())
    print(f"UCX {ucx.version()}, UCX_TLS={args.tls}, loopback; µs unless stated; perftest measured in this run")
    print(f"{'op':18} {'py p50':>8} {'py p99':>8} {'C p50':>8} {'C p99':>8} {'perftest':>9}  (test)")
    for row in run(args.tls, args.iters):
        pt = "-" if row.get("perftest") is None else f"{row['perftest']:.2f}"
        if "c_p50" in row:
            print(f"{row['op']:18} {row['py_p50']:8.2f} {row['py_p99']:8.2f} {row['c_p50']:8.2f} {row['c_p99']:8.2f} "
                  f"{pt:>9}  ({row['perftest_test']})")
        else:
            print(f"{row['op']:18} {row['py_p50']:8.0f} {'':8} {'':8} {'':8} {pt:>9}  ({row['perftest_test']})")
    return 0


def _fmt(row: dict[str, Any], fig: str, spec: str) -> str:
    """``median [min-max]`` of a figure over the rounds, ``-`` where absent."""
    if row.get(fig) is None:
        return "-"
    lo, hi = row.get(f"{fig}_min", row[fig]), row.get(f"{fig}_max", row[fig])
    return f"{row[fig]:{spec}} [{lo:{spec}}-{hi:{spec}}]"


def _print_netns(rows: list[dict[str, Any]], version: str) -> int:
    if rows and "error" in rows[0]:
        print(rows[0]["error"])
        return 69
    n = rows[0].get("rounds", 1) if rows else 0
    print(f"UCX {version}, tcp between two network namespaces (veth), memory node in one, client in the other; "
          f"µs unless stated; ucx_perftest between the same namespaces, in this run, alternating with ours; "
          f"median [min-max] over {n} rounds")
    for row in rows:
        if "c_p50" in row:
            print(f"{row['op']:10} py p50 {_fmt(row, 'py_p50', '.2f'):24} C p50 {_fmt(row, 'c_p50', '.2f'):24} "
                  f"perftest {_fmt(row, 'perftest_same_work', '.2f'):24} py/pt {_fmt(row, 'ratio_py', '.2f'):20} "
                  f"C/pt {_fmt(row, 'ratio_c', '.2f'):20} ({row['perftest_test']}"
                  f"{', x2: half a round trip' if row['op'] == 'put_flush' else ''}"
                  f"{', ' + row['perftest_note'] if row.get('perftest_note') else ''})")
        else:
            print(f"{row['op']:18} MB/s {_fmt(row, 'MB_per_s', '.0f'):20} perftest {_fmt(row, 'perftest', '.0f'):20} "
                  f"ours/pt {_fmt(row, 'ratio', '.2f'):20} ({row['perftest_test']}, best of its windows: "
                  f"{row.get('perftest_flags', '-')})")
            if row.get("ratio_wire") is not None:
                print(f"{'':18} wire bytes (2 per item byte)/pt {_fmt(row, 'ratio_wire', '.2f')}")
            for side, counted in (row.get("ops") or {}).items():  # the first round's
                print(f"{'':18} {side}: " + ", ".join(
                    f"{op} {v['per_item']:.2f}x {v['mean_us']:.0f} us" for op, v in counted.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
