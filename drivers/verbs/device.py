"""Verbs plumbing both players share (needs pyverbs and a device): pinned memory, RC queue pairs.

Ownership follows pyverbs: a child holds its parent (an MR its PD, a QP its
PD and CQ), and every ``close()`` is idempotent and closes children first.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from grafos_fabric.errors import Unsupported

from .._verbs_compat import E, probe

__all__ = [
    "PAGE",
    "PROBE_WORD",
    "Endpoint",
    "LocalBuffer",
    "PinnedMemory",
    "RcQp",
    "build_rc_init_attr",
    "build_rc_qp_attr",
    "check_little_endian",
    "configure_rc_connect",
    "open_device",
    "remote_access",
]

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
PROBE_WORD = 0x0102030405060708  # non-palindromic: tells host order from byte-swapped


def remote_access() -> int:
    """MR / QP access flags for a lease: local write, remote read, write and atomic."""
    acc = E.ACC
    return int(
        acc.IBV_ACCESS_LOCAL_WRITE | acc.IBV_ACCESS_REMOTE_WRITE | acc.IBV_ACCESS_REMOTE_READ
        | acc.IBV_ACCESS_REMOTE_ATOMIC
    )


class PinnedMemory:
    """Page-aligned anonymous memory with a stable address (mmap), to be registered."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(PAGE, (nbytes + PAGE - 1) // PAGE * PAGE)
        self.mm = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor: Any = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._anchor)

    def view(self) -> memoryview:
        return memoryview(self.mm)

    def close(self) -> None:
        """Unmap (after deregistration). Views still held keep the pages until they go."""
        if self._anchor is not None:
            self._anchor = None
            try:
                self.mm.close()
            except BufferError:
                log.debug("memory at %#x is still viewed; it is unmapped when the last view goes", self.addr)


class LocalBuffer:
    """Local memory registered with a protection domain (a zero-copy READ/WRITE target).

    ``view()`` is a writable memoryview and ``array(dtype)`` a numpy view of the
    same bytes; a ``read_into``/``write`` whose buffer lies inside a
    LocalBuffer moves the bytes directly, without a staging copy. Keep it open
    while views of it are in use; :meth:`close` deregisters and unmaps it.
    """

    def __init__(self, pd: Any, nbytes: int, access: int | None = None) -> None:
        from pyverbs.mr import MR

        self.mem = PinnedMemory(nbytes)
        self.nbytes = nbytes
        try:
            self.mr: Any = MR(pd, self.mem.nbytes, int(E.ACC.IBV_ACCESS_LOCAL_WRITE) if access is None else access,
                              address=self.mem.addr)
        except BaseException:
            self.mem.close()
            raise
        self.addr = self.mem.addr
        self.lkey = int(self.mr.lkey)

    def view(self) -> memoryview:
        return self.mem.view()[: self.nbytes]

    def array(self, dtype: Any = np.uint8) -> np.ndarray:
        return np.frombuffer(self.mem.mm, dtype=dtype, count=self.nbytes // np.dtype(dtype).itemsize)

    def contains(self, addr: int, length: int) -> bool:
        return self.mr is not None and self.addr <= addr and addr + length <= self.addr + self.mem.nbytes

    def close(self) -> None:
        if self.mr is not None:
            self.mr.close()
            self.mr = None
            self.mem.close()


@dataclass(frozen=True)
class Endpoint:
    """One side of an RC connection, as exchanged over the control channel (``connect`` params)."""

    qpn: int
    psn: int
    lid: int
    gid: str
    mtu: int

    def params(self) -> dict[str, Any]:
        return {"qpn": self.qpn, "psn": self.psn, "lid": self.lid, "gid": self.gid, "mtu": self.mtu}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Endpoint:
        """Validate an endpoint received from the peer (untrusted): ``FabricValueError`` when malformed."""
        from grafos_fabric.errors import FabricValueError

        limits = {"qpn": 0xFFFFFF, "psn": 0xFFFFFF, "lid": 0xFFFF, "mtu": 5}
        values: dict[str, Any] = {}
        for key, top in limits.items():
            v = params.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not (1 if key == "mtu" else 0) <= v <= top:
                raise FabricValueError(f"bad QP endpoint field {key}={v!r}")
            values[key] = v
        gid = params.get("gid", "")
        if not isinstance(gid, str) or len(gid) > 64 or set(params) - {*limits, "gid"}:
            raise FabricValueError("bad QP endpoint (gid or unknown fields)")
        return cls(gid=gid, **values)


def build_rc_init_attr(cq: Any, max_send_wr: int) -> Any:
    """``QPInitAttr`` of an RC QP: one send/recv SGE, selective signalling (``sq_sig_all=0``)."""
    from pyverbs.qp import QPCap, QPInitAttr

    return QPInitAttr(
        qp_type=E.QPT.IBV_QPT_RC,
        scq=cq,
        rcq=cq,
        cap=QPCap(max_send_wr=max_send_wr, max_recv_wr=1, max_send_sge=1, max_recv_sge=1),
        sq_sig_all=0,
    )


def build_rc_qp_attr(ib_port: int) -> Any:
    """``QPAttr`` for RESET -> INIT: remote read, write and atomic allowed (the default, 0, refuses all)."""
    from pyverbs.qp import QPAttr

    attr = QPAttr(port_num=ib_port)
    attr.qp_access_flags = remote_access()
    return attr


def configure_rc_connect(
    attr: Any, *, local_psn: int, local_mtu: int, remote: Endpoint, ib_port: int, gid_index: int, is_roce: bool
) -> None:
    """Fill ``attr`` for INIT -> RTR -> RTS towards ``remote`` (values as in rdma-core's RC tests).

    PSNs: we receive from ``remote.psn`` and send from ``local_psn`` (the peer
    does the mirror image). Path MTU: the smaller active MTU. One outstanding
    READ/atomic each way. With a peer GID the address carries a GRH (needed on
    RoCE, harmless on IB); without one, IB uses the LID and RoCE is refused.
    """
    from pyverbs.addr import GID, AHAttr, GlobalRoute

    attr.path_mtu = min(local_mtu, remote.mtu)
    attr.dest_qp_num = remote.qpn
    attr.rq_psn = remote.psn
    attr.sq_psn = local_psn
    attr.max_dest_rd_atomic = 1
    attr.max_rd_atomic = 1
    attr.min_rnr_timer = 12
    attr.timeout = 14  # 4.096 us * 2**14 = 67 ms per try
    attr.retry_cnt = 7
    attr.rnr_retry = 7
    if remote.gid and remote.gid.strip("0:"):
        gr = GlobalRoute(dgid=GID(val=remote.gid), sgid_index=gid_index)
        attr.ah_attr = AHAttr(port_num=ib_port, is_global=1, gr=gr, dlid=remote.lid)
    elif is_roce:
        raise Unsupported(f"RoCE needs a GID; the peer sent none (GID index {gid_index})")
    else:
        attr.ah_attr = AHAttr(dlid=remote.lid, port_num=ib_port)


class RcQp:
    """One RC queue pair with its own CQ: created to INIT, connected to RTS, closed QP-then-CQ."""

    def __init__(self, ctx: Any, pd: Any, ib_port: int, gid_index: int, max_send_wr: int = 64) -> None:
        from pyverbs.cq import CQ
        from pyverbs.qp import QP

        self.ctx, self.pd = ctx, pd  # parents, held
        self.ib_port = ib_port
        self.gid_index = gid_index
        port = ctx.query_port(ib_port)
        self._is_roce = int(port.link_layer) == E.LINK.ETHERNET
        self._lid = int(port.lid)
        self._mtu = int(port.active_mtu)
        self._gid = str(ctx.query_gid(ib_port, gid_index))
        self.cq: Any = CQ(ctx, max_send_wr + 1, None, None, 0)
        self.qp: Any = None
        try:
            self.attr = build_rc_qp_attr(ib_port)
            self.qp = QP(pd, build_rc_init_attr(self.cq, max_send_wr), self.attr)  # -> INIT
        except BaseException:
            self.cq.close()
            self.cq = None
            raise
        self.psn = secrets.randbelow(1 << 24)

    def local(self) -> Endpoint:
        return Endpoint(qpn=int(self.qp.qp_num), psn=self.psn, lid=self._lid, gid=self._gid, mtu=self._mtu)

    def connect(self, remote: Endpoint) -> None:
        """INIT -> RTR -> RTS towards ``remote``."""
        configure_rc_connect(
            self.attr,
            local_psn=self.psn,
            local_mtu=self._mtu,
            remote=remote,
            ib_port=self.ib_port,
            gid_index=self.gid_index,
            is_roce=self._is_roce,
        )
        self.qp.to_rts(self.attr)

    def post_send(self, wr: Any) -> None:
        self.qp.post_send(wr)

    def close(self) -> None:
        """QP, then its CQ. Idempotent."""
        qp, self.qp = self.qp, None
        cq, self.cq = self.cq, None
        for obj in (qp, cq):
            if obj is not None:
                obj.close()


def open_device(device: str | None) -> tuple[Any, str]:
    """``(Context, name)`` for ``device`` (default: the first device); ``Unsupported`` when none."""
    from pyverbs.device import Context

    from .._verbs_compat import device_names

    reason = probe(device)
    if reason is not None:
        raise Unsupported(f"no RDMA device: {reason}")
    name = device or device_names()[0]
    return Context(name=name), name


def check_little_endian() -> None:
    if sys.byteorder != "little":
        raise Unsupported("the verbs driver assumes little-endian hosts (ring words and atomics)")
