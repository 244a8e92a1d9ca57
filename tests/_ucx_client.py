"""A UCX client in its own network namespace (see test_ucx.py's namespace tests).

argv: NODE_IP CTL_PORT DEVICE TIMEOUT HELLO_JSON. Connects, checks a payload
round trip and 100 FAAs, prints {"ready": ...}; then waits for "go" on stdin and
runs FAAs until one fails, printing {"kind": exception class, "took": seconds}.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _ucx_harness as H

from grafos_fabric.drivers import ucx
from grafos_fabric.drivers.node.registrar import Grant


def main() -> None:
    ip, ctl, dev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    timeout, hello = float(sys.argv[4]), json.loads(sys.argv[5])
    ctx = ucx.UcxContext(ucx.ucx_config("tcp", dev))
    link = H.SocketLink(ip, ctl, hello["info"], sid=os.getpid())
    conn = ucx.UcxConnector(ctx, link, timeout=timeout)
    grant = Grant(lease_id="L1", generation=1, nbytes=hello["nbytes"], ttl=3600.0, writable=True,
                  access=hello["access"])
    r = conn.region(H.make_lease(), grant)
    payload = os.urandom(1 << 16)
    r.write(4096, payload)
    r.flush()
    back = bytearray(len(payload))
    r.read_into(4096, back)
    faas = [r.faa64(0, 1) for _ in range(100)]
    print(json.dumps({"ready": True, "roundtrip": bytes(back) == payload, "faas": faas}), flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    try:
        for _ in range(10**6):
            r.faa64(0, 1)
        out = {"kind": None, "took": time.perf_counter() - t0}
    except Exception as ex:
        out = {"kind": type(ex).__name__, "took": time.perf_counter() - t0, "msg": str(ex)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
