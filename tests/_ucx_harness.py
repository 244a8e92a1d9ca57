"""Test harness for the UCX driver without the memory node's server: a node process
(``python tests/_ucx_node.py``) or an in-process registrar, and a NodeLink that
talks to it (JSON lines over the child's stdin/stdout, or direct calls).

The node's control plane proper lives in drivers/node; this harness only carries
what a UCX region needs from it (connect, lease_state, fence), so the data plane
is tested on its own: across processes and across network namespaces.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from typing import Any

from grafos_fabric.drivers.node.registrar import Grant
from grafos_fabric.drivers.ucx import UcxConnector, UcxContext, UcxRegion, UcxRegistrar, UcxSession
from grafos_fabric.errors import Disconnected
from grafos_fabric.lease import Lease, LocalLeaseCell

HERE = os.path.dirname(os.path.abspath(__file__))


def make_lease(lease_id: str = "L1", ttl: float = 3600.0) -> Lease:
    from grafos_fabric.lease import NS, MonotonicClock

    clock = MonotonicClock()
    return Lease(lease_id, ttl=ttl, generation=1, cell=LocalLeaseCell(clock.now_ns() + int(ttl * NS)), clock=clock)


class LocalLink:
    """A NodeLink onto an in-process registrar (one session)."""

    def __init__(self, registrar: UcxRegistrar, host: str = "127.0.0.1") -> None:
        self.registrar = registrar
        self.host, self.port, self.tenant = host, 1, "default"
        self.info = {**registrar.node_info(), "ucx_host": host}
        self.session: UcxSession = registrar.open_session("test")
        self.states: dict[str, str] = {}
        self._epoch = 0

    @property
    def session_epoch(self) -> int:
        return self._epoch

    def connect(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.session.connect(params)

    def lease_state(self, lease_id: str) -> str:
        return self.states.get(lease_id, "active")


class ChildLink:
    """A NodeLink onto a node process (tests/_ucx_node.py) through its stdin/stdout."""

    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any], host: str, sid: int = 0) -> None:
        self.proc = proc
        self.sid = sid
        self.host, self.port, self.tenant = host, 1, "default"
        self.info = {**info, "ucx_host": host}
        # One lock per node process, shared by every link onto it: the links of two client
        # threads write to the same stdin and read the same stdout, so a request and its reply
        # must not interleave with another's (one thread would read the other's reply, or find
        # it already in the pipe's read buffer, where select() does not see it).
        self._lock = proc.__dict__.setdefault("_grafos_link_lock", threading.Lock())

    session_epoch = 0
    timeout = 2.0

    def call(self, **msg: Any) -> dict[str, Any]:
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None or self.proc.stdout is None:
                raise Disconnected("the node process is gone")
            try:
                self.proc.stdin.write(json.dumps(msg) + "\n")
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
                if not ready:  # a stopped node: its control channel does not answer either
                    raise Disconnected(f"the node did not answer within {self.timeout}s")
                reply = json_line(self.proc.stdout)
            except (OSError, ValueError) as ex:
                raise Disconnected(f"the node process is gone: {ex}") from None
            if not reply:
                raise Disconnected("the node process is gone")
        if "error" in reply:
            raise Disconnected(reply["error"])
        return reply

    def connect(self, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.call(cmd="connect", params=params, sid=self.sid)["reply"]
        return out

    def lease_state(self, lease_id: str) -> str:
        return str(self.call(cmd="state", lease=lease_id)["state"])


def json_line(stream: Any) -> dict[str, Any]:
    """The next JSON line of a child's stdout (UCX prints its warnings there too: skipped)."""
    while True:
        line = stream.readline()
        if not line:
            return {}
        if line.startswith("{"):
            out: dict[str, Any] = json.loads(line)
            return out


def start_node(*, netns: str | None = None, host: str = "127.0.0.1", tls: str = "tcp", net_devices: str = "lo",
               nbytes: int = 1 << 20, progress: str = "busy") -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start a node process (in ``netns`` if given); returns it and its hello (info, spans' access)."""
    cmd = [sys.executable, os.path.join(HERE, "_ucx_node.py"), host, tls, net_devices, str(nbytes), progress]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    hello = json_line(proc.stdout)
    if not hello:
        proc.kill()
        raise RuntimeError(f"the node process did not start (exit {proc.wait()})")
    return proc, hello


def child_region(proc: subprocess.Popen[str], hello: dict[str, Any], ctx: UcxContext, host: str = "127.0.0.1",
                 *, timeout: float = 5.0, lease_id: str = "L1", sid: int = 0,
                 ) -> tuple[UcxRegion, ChildLink, UcxConnector]:
    link = ChildLink(proc, hello["info"], host, sid)
    conn = UcxConnector(ctx, link, timeout=timeout)
    grant = Grant(lease_id=lease_id, generation=1, nbytes=hello["nbytes"], ttl=3600.0, writable=True,
                  access=hello["access"])
    return conn.region(make_lease(lease_id), grant), link, conn


def local_region(registrar: UcxRegistrar, ctx: UcxContext, nbytes: int = 1 << 16, *, timeout: float = 5.0,
                 lease_id: str = "L1") -> tuple[UcxRegion, LocalLink, Any]:
    span = registrar.register(0, nbytes)
    link = LocalLink(registrar)
    conn = UcxConnector(ctx, link, timeout=timeout)
    grant = Grant(lease_id=lease_id, generation=1, nbytes=nbytes, ttl=3600.0, writable=True,
                  access=span.access(True))
    return conn.region(make_lease(lease_id), grant), link, span


class SocketLink(ChildLink):
    """A NodeLink onto a node process's TCP command port (a client in another namespace)."""

    def __init__(self, host: str, port: int, info: dict[str, Any], sid: int = 0) -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=10)
        self.file = self.sock.makefile("rw")
        self.host, self.port, self.tenant, self.sid = host, port, "default", sid
        self.info = {**info, "ucx_host": host}
        self._lock = threading.Lock()

    def call(self, **msg: Any) -> dict[str, Any]:
        with self._lock:
            try:
                self.file.write(json.dumps(msg) + "\n")
                self.file.flush()
                ready, _, _ = select.select([self.sock], [], [], self.timeout)
                if not ready:
                    raise Disconnected(f"the node did not answer within {self.timeout}s")
                line = self.file.readline()
            except OSError as ex:
                raise Disconnected(f"the node's control channel failed: {ex}") from None
            if not line:
                raise Disconnected("the node's control channel closed")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise Disconnected(reply["error"])
        return reply
