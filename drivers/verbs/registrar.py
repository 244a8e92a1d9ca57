"""The verbs registrar: the memory node's side of the verbs driver.

:class:`PyverbsRegistrar` owns the node's device resources (context, PD, the
pinned pool, the atomic probe word's MR) and registers each lease's span as
its *own* memory region with remote read, write and atomic access, so that
taking one lease away (expiry, revoke, free) is exactly one ``ibv_dereg_mr``:
the rkey dies and every later remote access to it fails at the responder,
without the node's CPU in the data path (so :meth:`PyverbsRegistrar.fence`
has nothing to do). Each authenticated control connection gets a
:class:`VerbsSession` holding that client's RC queue pair.

:class:`MemoryNode` is a :class:`~grafos_fabric.drivers.node.server.NodeServer`
over this registrar (``MemoryNode.open(device, pool_size=..., secret=...)``).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

from grafos_fabric.errors import FabricValueError
from grafos_fabric.lease import Clock

from ..node.auth import NodeLimits, NodePolicy, load_policy
from ..node.registrar import Access, RegisteredSpan, RegistrarSession
from ..node.server import NodeServer
from ..node.wire import DEFAULT_PORT
from .device import PAGE, PROBE_WORD, Endpoint, PinnedMemory, RcQp, check_little_endian, open_device, remote_access

__all__ = ["MemoryNode", "PyverbsRegistrar", "VerbsSession", "VerbsSpan"]


@dataclass(eq=False)
class VerbsSpan:
    offset: int
    nbytes: int
    addr: int
    rkey: int
    mr: Any

    def access(self, writable: bool) -> Access:
        # One MR per lease with remote write access: a read-only capability is enforced by the
        # client library here, not by the HCA (a second, read-only MR per consumer would be).
        return {"addr": self.addr, "rkey": self.rkey}


class VerbsSession:
    """One client's RC queue pair on the node (replaced on every ``connect``)."""

    def __init__(self, registrar: PyverbsRegistrar) -> None:
        self.registrar = registrar  # parent
        self.qp: RcQp | None = None

    def connect(self, params: Access) -> Access:
        remote = Endpoint.from_params(params)
        if self.qp is not None:  # a reconnect after an error: the old QP is dead
            self.qp.close()
            self.qp = None
        qp = self.registrar.new_qp()
        try:
            qp.connect(remote)
        except BaseException:
            qp.close()
            raise
        self.qp = qp
        return qp.local().params()

    def close(self) -> None:
        if self.qp is not None:
            self.qp.close()
            self.qp = None


class PyverbsRegistrar:
    """Registers spans of a pinned pool as MRs (zeroed first: no bytes leak between tenants)."""

    name = "verbs"

    def __init__(self, device: str | None, pool_size: int, ib_port: int = 1, gid_index: int = 0) -> None:
        from pyverbs.mr import MR
        from pyverbs.pd import PD

        check_little_endian()
        self.ib_port = ib_port
        self.gid_index = gid_index
        self.ctx, self.device = open_device(device)
        self.pd: Any = None
        self.pool: PinnedMemory | None = None
        self.probe_mem: PinnedMemory | None = None
        self.probe_mr: Any = None
        self._sessions: list[VerbsSession] = []
        try:
            self.pd = PD(self.ctx)
            self.pool = PinnedMemory(pool_size)
            self.probe_mem = PinnedMemory(PAGE)
            struct.pack_into("<Q", self.probe_mem.mm, 0, PROBE_WORD)
            self.probe_mr = MR(self.pd, PAGE, remote_access(), address=self.probe_mem.addr)
        except BaseException:
            self.close()
            raise
        self.pool_size = self.pool.nbytes

    def new_qp(self) -> RcQp:
        return RcQp(self.ctx, self.pd, self.ib_port, self.gid_index, max_send_wr=1)

    def node_info(self) -> Access:
        return {"probe_addr": int(self.probe_mr.buf), "probe_rkey": int(self.probe_mr.rkey)}

    def register(self, offset: int, nbytes: int) -> VerbsSpan:
        from pyverbs.mr import MR

        assert self.pool is not None
        addr = self.pool.addr + offset
        ctypes.memset(addr, 0, nbytes)
        mr = MR(self.pd, nbytes, remote_access(), address=addr)
        return VerbsSpan(offset=offset, nbytes=nbytes, addr=int(mr.buf), rkey=int(mr.rkey), mr=mr)

    def fence(self, span: RegisteredSpan, holders: list[RegistrarSession]) -> None:
        """Nothing to do: deregistering the MR is the fence (the HCA refuses the dead rkey)."""

    def deregister(self, span: RegisteredSpan) -> None:
        assert isinstance(span, VerbsSpan)
        if span.mr is not None:
            span.mr.close()
            span.mr = None

    def open_session(self, peer: str) -> VerbsSession:
        session = VerbsSession(self)
        self._sessions = [s for s in self._sessions if s.qp is not None]
        self._sessions.append(session)
        return session

    def close(self) -> None:
        """Children first: sessions' QPs, probe MR, PD (lease MRs were closed by the table), context, memory."""
        sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()
        for name in ("probe_mr", "pd", "ctx"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
                setattr(self, name, None)
        for name in ("probe_mem", "pool"):
            mem = getattr(self, name, None)
            if mem is not None:
                mem.close()
                setattr(self, name, None)


class MemoryNode(NodeServer):
    """A memory node on one RDMA device: a :class:`NodeServer` over a :class:`PyverbsRegistrar`."""

    @classmethod
    def open(
        cls,
        device: str | None = None,
        *,
        pool_size: int,
        secret: bytes | None = None,
        policy: NodePolicy | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        ib_port: int = 1,
        gid_index: int = 0,
        clock: Clock | None = None,
        reap_interval: float = 0.05,
        allow_remote: bool = False,
        limits: NodeLimits | None = None,
    ) -> MemoryNode:
        """Open ``device`` (default: the first), pin a pool of ``pool_size`` bytes and start serving.

        ``policy`` (tenants and limits), else one ``default`` tenant keyed from ``secret``.
        """
        if policy is None:
            if secret is None:
                raise FabricValueError("a memory node needs a secret (or a policy)")
            policy = load_policy(secret, None, limits)
        registrar = PyverbsRegistrar(device, pool_size, ib_port, gid_index)
        try:
            node = cls(registrar, policy, host=host, port=port, clock=clock, reap_interval=reap_interval,
                       allow_remote=allow_remote)
        except BaseException:
            registrar.close()
            raise
        return node.start()  # type: ignore[return-value]
