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
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

__all__ = ["main", "perftest", "perftest_netns", "queue_rates", "run", "run_netns", "run_ucx_bench"]

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


def perftest_netns(test: str, size: int, iters: int, pair: Any, port: int) -> float | None:
    """``ucx_perftest`` across two namespaces (server in A, client in B, tcp over the veth):
    typical latency (µs) or bandwidth (MB/s); None where absent or failed."""
    exe = shutil.which("ucx_perftest")
    if exe is None:
        return None
    base = {**os.environ, "UCX_TLS": "tcp"}
    server = subprocess.Popen(["ip", "netns", "exec", pair.ns_a, exe, "-p", str(port)],
                              env={**base, "UCX_NET_DEVICES": pair.dev_a}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", pair.ns_b, exe, pair.ip_a, "-p", str(port), "-t", test, "-s",
                              str(size), "-n", str(iters)], env={**base, "UCX_NET_DEVICES": pair.dev_b},
                             capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return None
    finally:
        server.kill()
        server.wait()
    rows = [line for line in out.splitlines() if line.startswith("Final:")]
    if not rows:
        return None
    cols = rows[-1].split()[1:]
    return float(cols[4]) if test.endswith("_bw") else float(cols[1])


# the perftest test beside each operation: ucp_put_lat is a ping-pong (half a round trip), so the
# put + flush row (a whole round trip: put, then wait for the remote completion) also shows 2x it
_PERFTEST = {"cas": "ucp_cswap", "faa": "ucp_fadd", "put_flush": "ucp_put_lat", "get": "ucp_get"}


def run_netns(iters: int = 20000, seconds: float = 1.0, progress: Any = None,
              node_progress: str = "busy") -> list[dict[str, Any]]:
    """Across two network namespaces (root): the memory node (``serve --driver ucx``, busy progress)
    in A, this client in B, tcp over a veth. Raw operation latencies from Python and from the C
    loop, 1 MiB queue items (producer and consumer in B) and raw 1 MiB puts, each beside
    ``ucx_perftest`` between the same namespaces, in the same run. Returns rows; one row with
    ``error`` where namespaces are not possible."""
    import tempfile

    from grafos_fabric.tools import netns

    why = netns.unavailable()
    if why is not None:
        return [{"case": "ucx netns", "error": f"no network namespaces: {why}"}]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="grafos-bench-ucx-") as tmp, netns.veth_pair() as pair:
        token = os.path.join(tmp, "node.token")
        node = subprocess.Popen(
            ["ip", "netns", "exec", pair.ns_a, sys.executable, "-m", "grafos_fabric.tools.serve", "--driver", "ucx",
             "--host", pair.ip_a, "--allow-remote", "--port", "7400", "--token-file", token, "--pool", "256M",
             "--ucx-net-devices", pair.dev_a, "--ucx-progress", node_progress, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert node.stdout is not None
            line = node.stdout.readline()
            while line and not line.startswith("serving "):
                line = node.stdout.readline()
            if not line:
                raise RuntimeError(f"the memory node did not start (exit {node.wait()})")
            if progress:
                progress("ucx netns: operations")
            # the client is a process in B (``ip netns exec`` also gives it B's /sys, where UCX finds the veth)
            url = f"ucx://{pair.ip_a}:7400?tls=tcp&net_devices={pair.dev_b}"
            argv = [sys.executable, "-m", "grafos_fabric.tools.bench_ucx", "--netns-client", url, token,
                    str(iters), str(seconds)]
            out = subprocess.run(["ip", "netns", "exec", pair.ns_b, *argv], capture_output=True, text=True,
                                 timeout=600)
            got = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
            if out.returncode or not got:
                raise RuntimeError(f"the client in {pair.ns_b} failed (exit {out.returncode}): {out.stderr[-2000:]}")
            rows.extend(json.loads(got[-1]))
        finally:
            node.kill()
            node.wait()
        # perftest after our node is gone: the two never share the cores
        port = 13400 + os.getpid() % 500
        for row in rows:
            if progress:
                progress(f"ucx netns: perftest {row['perftest_test']}")
            size = 1 << 20 if row["op"].startswith(("put 1 MiB", "queue 1 MiB")) else 8
            n = max(100, iters // 20) if size > 8 else iters
            test = row["perftest_test"]
            if row["op"].startswith("queue") and any(r.get("perftest_test") == test and "perftest" in r for r in rows):
                row["perftest"] = next(r["perftest"] for r in rows if r.get("perftest_test") == test
                                       and "perftest" in r)
            else:
                row["perftest"] = perftest_netns(test, size, n, pair, port)
            port += 1
            pt = row["perftest"]
            if row["op"] == "get":
                # ucp_get is a bandwidth-style test whose responder does not progress over tcp: its
                # "latency" is milliseconds, not a round trip (FAA/CAS are the round-trip reference)
                row["perftest_note"] = "not comparable over tcp"
            elif pt:
                if "MB_per_s" in row:
                    row["ratio"] = row["MB_per_s"] / pt  # >= 0.8 is the target
                else:
                    same = 2 * pt if row["op"] == "put_flush" else pt  # a whole round trip either way
                    row["perftest_same_work"] = same
                    row["ratio_py"] = row["py_p50"] / same  # <= 1.3 is the target
                    row["ratio_c"] = row["c_p50"] / same
    return rows


def _client_ops(url: str, token: str, iters: int, seconds: float) -> list[dict[str, Any]]:
    """In namespace B: two fabrics onto the node in A; operation latencies, 1 MiB queue and puts."""
    from grafos_fabric.drivers import ucx

    fa = ucx.UcxFabric.from_url(url, token_file=token)
    fb = ucx.UcxFabric.from_url(url, token_file=token)
    rows: list[dict[str, Any]] = []
    try:
        r = fa.alloc(2 << 20, 600.0)
        assert isinstance(r, ucx.UcxRegion)
        buf = bytearray(8)
        py_ops = {
            "cas": lambda: r.cas64(0, 0, 0),
            "faa": lambda: r.faa64(0, 1),
            "put_flush": lambda: r.store64(0, 1),
            "get": lambda: r.read_into(0, buf),
        }
        for op, fn in py_ops.items():
            for _ in range(200):
                fn()
            lat = np.empty(iters)
            for i in range(iters):
                t0 = time.perf_counter_ns()
                fn()
                lat[i] = (time.perf_counter_ns() - t0) / 1e3
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
        rate = _queue_rate(fa, fb, 1 << 20, seconds, False)
        rows.append({"op": "queue 1 MiB items", "MB_per_s": rate * (1 << 20) / 1e6, "items_per_s": rate,
                     "perftest_test": "ucp_put_bw"})
        r.lease.free()
    finally:
        fa.close()
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
    ap.add_argument("--netns-client", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.netns_client:
        url, token, iters, seconds = args.netns_client
        print(json.dumps(_client_ops(url, token, int(iters), float(seconds))), flush=True)
        return 0
    from grafos_fabric.drivers import ucx

    if ucx.available() is not None:
        print(f"UCX unavailable: {ucx.available()}")
        return 69
    if args.netns:
        return _print_netns(run_netns(args.iters, args.seconds), ucx.version())
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


def _print_netns(rows: list[dict[str, Any]], version: str) -> int:
    if rows and "error" in rows[0]:
        print(rows[0]["error"])
        return 69
    print(f"UCX {version}, tcp between two network namespaces (veth), memory node in one, client in the other; "
          "µs unless stated; ucx_perftest between the same namespaces, in this run")
    print(f"{'op':18} {'py p50':>8} {'py p99':>9} {'C p50':>8} {'C p99':>9} {'perftest':>9} {'same work':>9} "
          f"{'py/pt':>6} {'C/pt':>6}  (test)")
    for row in rows:
        pt = "-" if row.get("perftest") is None else f"{row['perftest']:.2f}"
        if "c_p50" in row:
            same = row.get("perftest_same_work")
            print(f"{row['op']:18} {row['py_p50']:8.2f} {row['py_p99']:9.1f} {row['c_p50']:8.2f} {row['c_p99']:9.1f} "
                  f"{pt:>9} {'-' if same is None else f'{same:.2f}':>9} {row.get('ratio_py', 0):6.2f} "
                  f"{row.get('ratio_c', 0):6.2f}  ({row['perftest_test']})")
        else:
            print(f"{row['op'] + ' MB/s':18} {row['MB_per_s']:8.0f} {'':9} {'':8} {'':9} {pt:>9} {'':9} "
                  f"{row.get('ratio', 0):6.2f} {'':6}  ({row['perftest_test']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
