"""A UCX memory node's data plane for the tests (see _ucx_harness.py).

argv: HOST TLS NET_DEVICES NBYTES PROGRESS. Prints one JSON line (info, the span's
access, nbytes), then serves JSON-line commands on stdin: connect (bind the
client's endpoint), state (the lease state), revoke (fence the holders, then the
lease reads "revoked"), peek (a word of the span, as the node's CPU sees it),
count (how many bytes of the span are non-zero).
"""

from __future__ import annotations

import json
import socket
import sys
import threading

from grafos_fabric import _ucx
from grafos_fabric.drivers.ucx import UcxRegistrar


def main() -> None:
    host, tls, devs, nbytes, progress = sys.argv[1:6]
    reg = UcxRegistrar(int(nbytes), host=host, tls=tls, net_devices=devs or None, progress=progress)
    span = reg.register(0, int(nbytes))
    sessions: dict[int, object] = {}
    state = {"lease": "active"}
    lock = threading.Lock()
    mem = _ucx.ffi.cast("uint64_t *", span.addr)
    raw = _ucx.ffi.buffer(_ucx.ffi.cast("char *", span.addr), span.nbytes)

    def handle(msg: dict) -> dict:
        cmd = msg["cmd"]
        try:
            with lock:
                if cmd == "connect":
                    sid = msg.get("sid", 0)
                    if sid not in sessions:
                        sessions[sid] = reg.open_session(f"test-{sid}")
                    return {"reply": sessions[sid].connect(msg["params"])}
                if cmd == "state":
                    return {"state": state["lease"]}
                if cmd == "revoke":
                    reg.fence(span, list(sessions.values()))
                    state["lease"] = "revoked"
                    return {"ok": True}
                if cmd == "peek":
                    return {"value": int(mem[msg["index"]])}
                if cmd == "nonzero_after":
                    return {"nonzero": sum(1 for b in bytes(raw)[msg["offset"]:] if b)}
            return {"error": f"unknown command {cmd}"}
        except Exception as ex:
            return {"error": f"{type(ex).__name__}: {ex}"}

    # the same commands over TCP (a client in another namespace reaches the node over the veth)
    ctl = socket.create_server((host, 0))

    def serve_tcp() -> None:
        while True:
            conn, _ = ctl.accept()

            def one(c: socket.socket) -> None:
                with c, c.makefile("rw") as f:
                    for line in f:
                        f.write(json.dumps(handle(json.loads(line))) + "\n")
                        f.flush()

            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=serve_tcp, daemon=True).start()
    print(json.dumps({"info": reg.node_info(), "access": span.access(True), "nbytes": span.nbytes,
                      "ctl_port": ctl.getsockname()[1]}), flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)
    reg.close()


if __name__ == "__main__":
    main()
