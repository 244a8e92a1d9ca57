"""UCX driver benchmark: per-operation latency from Python and from a tight C loop,
beside ``ucx_perftest``'s figures for the same operations, measured in the same run.

::

    python -m grafos_fabric.tools.bench_ucx [--tls tcp] [--iters 20000]

The memory node's data plane (UcxRegistrar, busy progress thread) and the client
run in this process over loopback (``UCX_NET_DEVICES=lo``); ``ucx_perftest``
(ucx-utils) runs as two processes over the same transport. Prints one row per
operation: p50/p99 in µs for Python (one region call), the C loop, and perftest
(its typical latency), and 1 MiB put bandwidth beside perftest's ``ucp_put_bw``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from typing import Any

import numpy as np

__all__ = ["main", "perftest", "queue_rates", "run", "run_ucx_bench"]

_SECRET = b"grafos-bench-ucx-secret-32-bytes"


def perftest(test: str, size: int, iters: int, tls: str) -> float | None:
    """``ucx_perftest`` -t TEST on loopback: typical latency (µs) or bandwidth (MB/s); None where absent."""
    exe = shutil.which("ucx_perftest")
    if exe is None:
        return None
    env = {**os.environ, "UCX_TLS": tls, "UCX_NET_DEVICES": "lo"}
    port = str(13337 + os.getpid() % 1000)
    server = subprocess.Popen([exe, "-p", port], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run([exe, "127.0.0.1", "-p", port, "-t", test, "-s", str(size), "-n", str(iters)],
                             env=env, capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return None
    finally:
        server.kill()
        server.wait()
    rows = [line for line in out.splitlines() if line.startswith("Final:")]
    if not rows:
        return None
    cols = rows[-1].split()[1:]
    # Final: iterations, latency p50, average, overall, bandwidth (MB/s) average, overall, msgrate ...
    return float(cols[4]) if test.endswith("_bw") else float(cols[1])


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
        buf = bytearray(64)
        py_ops = {
            "cas": ("ucp_cswap", lambda: r.cas64(0, 0, 0)),
            "faa": ("ucp_fadd", lambda: r.faa64(0, 1)),
            "put_flush": ("ucp_put_lat", lambda: r.store64(0, 1)),
            "get": ("ucp_get", lambda: r.read_into(0, buf)),
        }
        for op, (ptest, fn) in py_ops.items():
            for _ in range(200):
                fn()
            lat = np.empty(iters)
            for i in range(iters):
                t0 = time.perf_counter_ns()
                fn()
                lat[i] = (time.perf_counter_ns() - t0) / 1e3
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
        rows.append({"op": "put 1 MiB (MB/s)", "py_p50": mbs,
                     "perftest": perftest("ucp_put_bw", 1 << 20, max(100, iters // 10), tls),
                     "perftest_test": "ucp_put_bw"})
        r.close()
        conn.close()
    finally:
        reg.close()
        ctx.close()
    return rows


def _queue_rate(ftx: Any, frx: Any, size: int, seconds: float, mapped: bool) -> float:
    """Items/s through one queue: a producer thread pushing batches, this thread popping them."""
    import threading

    import grafos_fabric as gf

    batch = 1 if size >= 1 << 20 else max(1, min(256, (64 << 10) // size))
    cap = 1 << max(16, (4 * batch * (size + 64) - 1).bit_length())
    tx = gf.FabricQueue.create(ftx, capacity=cap, ttl=600.0)
    rx = gf.FabricQueue.attach(frx, bytes(tx.locator()), mapped=mapped)
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
        got += len(b)
        b.release()
        if start and now - start >= seconds:
            end = now
            break
    stop.set()
    while t.is_alive():  # drain so the producer's last push returns
        rx.pop_batch(batch, timeout=0).release()
        t.join(0.05)
    tx.close()
    rx.close()
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
                  progress: Any = None, iters: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """grafos-bench's ``ucx`` case: queue rates (``ucx``) and raw operation latencies (``ucx ops``)."""
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
    return {"ucx": queue_rates(tuple(sizes), seconds, progress), "ucx ops": ops}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tls", default="tcp")
    ap.add_argument("--iters", type=int, default=20000)
    args = ap.parse_args(argv)
    from grafos_fabric.drivers import ucx

    if ucx.available() is not None:
        print(f"UCX unavailable: {ucx.available()}")
        return 69
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


if __name__ == "__main__":
    raise SystemExit(main())
