"""What authentication costs on a memory node: connect and lease grant, median and p99.

    python -m grafos_fabric.tools.bench_node_auth [--n 500] [--json]

Runs a ``nodeshm`` node in this process on 127.0.0.1 (the control plane is the
same for every driver) and measures, in the same run:

* **connect**: TCP connect + the HMAC challenge-response (two round trips),
  against a bare TCP connect + close to the same node (what any TCP control
  channel costs);
* **grant**: an ``Alloc`` (lease table + span registration + one capability
  MAC), against a ``Status`` round trip (one capability check) and the
  registrar's ``register`` + ``deregister`` on their own;
* the MACs alone: one handshake proof, one capability mint, one check.

Times are wall-clock per operation (``time.perf_counter_ns``); the node and
the client share this machine's cores, so the figures include scheduling.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["main", "measure"]


def _stats(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"n": len(a), "median_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99))}


def _time(fn: Callable[[], Any], n: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return _stats(out)


def measure(n: int = 500) -> dict[str, dict[str, float]]:
    """Run every measurement ``n`` times; returns ``{name: {n, median_us, p99_us}}``."""
    from grafos_fabric.drivers.node import auth
    from grafos_fabric.drivers.node import wire as W
    from grafos_fabric.drivers.node.client import ControlClient
    from grafos_fabric.drivers.node.server import NodeServer
    from grafos_fabric.drivers.node.shmfile import ShmFileRegistrar

    secret = secrets.token_bytes(32)
    key = auth.tenant_key(secret, "default")
    limits = auth.NodeLimits(max_connections=4 * n + 100)
    registrar = ShmFileRegistrar(1 << 30)
    node = NodeServer(registrar, auth.load_policy(secret, None, limits), port=0).start()
    results: dict[str, dict[str, float]] = {}
    try:
        addr = ("127.0.0.1", node.port)

        def bare_connect() -> None:
            s = socket.create_connection(addr)
            s.close()

        def auth_connect() -> None:
            ControlClient(*addr, tenant="default", key=key).close()

        results["connect: tcp only (baseline)"] = _time(bare_connect, n)
        results["connect: tcp + hmac challenge-response"] = _time(auth_connect, n)

        c = ControlClient(*addr, tenant="default", key=key)
        held: list[W.Granted] = []

        def grant() -> None:
            held.append(c.call(W.Alloc(nbytes=4096, ttl=60.0), W.Granted))

        results["grant: alloc (table + register + cap mint)"] = _time(grant, n)
        g = held[0]

        def status() -> None:
            c.call(W.Status(lease_id=g.lease_id, cap=g.cap), W.LeaseStatus)

        results["round trip: status (cap check, baseline)"] = _time(status, n)
        for lease in held:
            c.call(W.Free(lease_id=lease.lease_id, cap=lease.cap), W.Done)
        c.close()

        def register() -> None:
            registrar.deregister(registrar.register(0, 4096))

        results["registrar: register + deregister (baseline)"] = _time(register, n)
        nonce_a, nonce_b = secrets.token_bytes(32), secrets.token_bytes(32)
        results["mac: one handshake proof"] = _time(lambda: auth.proof(key, b"client", "default", nonce_a, nonce_b),
                                                    n)
        minter = auth.CapMinter()
        lease_id = secrets.token_hex(16)
        cap = minter.mint("default", lease_id, 1, auth.OWNER, 2**62)
        results["mac: capability mint"] = _time(lambda: minter.mint("default", lease_id, 1, auth.OWNER, 2**62), n)
        results["mac: capability check"] = _time(lambda: minter.check("default", lease_id, cap, auth.ATTACH, 1), n)
    finally:
        node.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_node_auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="operations per measurement (default 500)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(args.n)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"memory node control plane on 127.0.0.1, {args.n} operations each (microseconds)")
    print(f"{'measurement':<48} {'median':>10} {'p99':>10}")
    for name, st in results.items():
        print(f"{name:<48} {st['median_us']:>10.1f} {st['p99_us']:>10.1f}")
    c, b = results["connect: tcp + hmac challenge-response"], results["connect: tcp only (baseline)"]
    g, s = results["grant: alloc (table + register + cap mint)"], results["round trip: status (cap check, baseline)"]
    print(f"auth on connect adds {c['median_us'] - b['median_us']:.1f} us at the median "
          f"({c['p99_us'] - b['p99_us']:.1f} us at p99) over a bare TCP connect")
    print(f"a grant costs {g['median_us'] - s['median_us']:.1f} us more than a status round trip at the median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
