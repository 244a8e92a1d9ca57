"""A UCX memory node's data plane for the tests (see _ucx_harness.py).

argv: HOST TLS NET_DEVICES NBYTES PROGRESS. Prints one JSON line (info, the span's
access, nbytes), then serves JSON-line commands on stdin: connect (bind the
client's endpoint), state (the lease state), revoke (fence the holders, then the
lease reads "revoked"), peek (a word of the span, as the node's CPU sees it),
count (how many bytes of the span are non-zero).
"""

from __future__ import annotations

import json
import sys

from grafos_fabric import _ucx
from grafos_fabric.drivers.ucx import UcxRegistrar


def main() -> None:
    host, tls, devs, nbytes, progress = sys.argv[1:6]
    reg = UcxRegistrar(int(nbytes), host=host, tls=tls, net_devices=devs or None, progress=progress)
    span = reg.register(0, int(nbytes))
    session = reg.open_session("test")
    state = "active"
    print(json.dumps({"info": reg.node_info(), "access": span.access(True), "nbytes": span.nbytes}), flush=True)
    mem = _ucx.ffi.cast("uint64_t *", span.addr)
    raw = _ucx.ffi.buffer(_ucx.ffi.cast("char *", span.addr), span.nbytes)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "connect":
                out = {"reply": session.connect(msg["params"])}
            elif cmd == "state":
                out = {"state": state}
            elif cmd == "revoke":
                reg.fence(span, [session])
                state = "revoked"
                out = {"ok": True}
            elif cmd == "peek":
                out = {"value": int(mem[msg["index"]])}
            elif cmd == "count":
                out = {"nonzero": sum(1 for b in bytes(raw) if b)}
            else:
                out = {"error": f"unknown command {cmd}"}
        except Exception as ex:
            out = {"error": f"{type(ex).__name__}: {ex}"}
        print(json.dumps(out), flush=True)
    reg.close()


if __name__ == "__main__":
    main()
