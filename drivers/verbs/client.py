"""The verbs driver's client: one RC queue pair per memory node, one-sided verbs on leased regions.

:class:`VerbsFabric` (``open_fabric("rdma://HOST:PORT", token_file=...)``) is a
:class:`~grafos_fabric.drivers.node.client.RemoteFabric`: the node package
does auth, leases and capabilities; this module adds the device context and
PD (:class:`VerbsFabric`), one :class:`VerbsConnector` per node (its QP,
staging buffers and WR cache) and :class:`VerbsRegion`, which maps the driver
protocol's one-sided operations onto verbs: ``write`` = RDMA WRITE,
``read_into`` = RDMA READ, ``cas64`` = ATOMIC_CMP_AND_SWP, ``faa64`` =
ATOMIC_FETCH_AND_ADD (the add value goes in ``compare_add``), ``load64`` /
``store64`` = 8-byte READ / WRITE.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from grafos_fabric.errors import (
    CapabilityDenied,
    CapacityExceeded,
    Disconnected,
    FabricValueError,
    QueueClosed,
    Unsupported,
)
from grafos_fabric.lease import Lease

from .._verbs_compat import WC, E, probe
from ..base import Buffer, RegionRef, byte_view
from ..node.client import NodeChannel, RemoteFabric, parse_node_url
from ..node.registrar import Grant
from ..node.wire import UNKNOWN
from .completion import map_completion_error, poll_completion
from .device import PAGE, PROBE_WORD, Endpoint, LocalBuffer, RcQp, check_little_endian, open_device
from .wr import (
    U64,
    Opcode,
    WrCache,
    build_cas_wr,
    build_faa_wr,
    build_rdma_read_wr,
    build_rdma_write_wr,
    check_atomic_addr,
)

__all__ = [
    "DEFAULT_OP_TIMEOUT",
    "DEFAULT_STAGING",
    "VerbsConnector",
    "VerbsFabric",
    "VerbsRegion",
    "buffer_address",
    "byte_view",
    "parse_rdma_url",
]

log = logging.getLogger(__name__)

DEFAULT_OP_TIMEOUT = 10.0
DEFAULT_STAGING = 1 << 20


def buffer_address(mv: memoryview) -> int:
    """The address of a contiguous byte view (read-only views too)."""
    if not mv.nbytes:
        return 0
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)


class VerbsConnector:
    """Everything this client has towards one memory node: RC QP, staging MRs, WR cache.

    The control channel is the node package's :class:`NodeChannel` (``link``);
    when it had to be reopened (``link.session_epoch`` moved), the node's end
    of our QP went with the old session, so the QP is rebuilt before the next
    operation.
    """

    def __init__(self, fabric: VerbsFabric, link: NodeChannel) -> None:
        self.fabric = fabric  # parent
        self.link = link
        self.host, self.port = link.host, link.port
        self.qp: RcQp | None = None
        self.staging: LocalBuffer | None = None
        self.scratch: LocalBuffer | None = None
        self.wrs = WrCache()
        self.regions: list[VerbsRegion] = []
        self._wr_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._broken = False
        self._epoch = -1
        self.atomics: str | None = None  # None: usable; else the reason they are not
        self.atomic_reply_swapped = False
        try:
            self.staging = LocalBuffer(fabric.pd, fabric.staging_bytes)
            self.scratch = LocalBuffer(fabric.pd, PAGE)
            self._connect_qp()
            self._calibrate_atomics()
        except BaseException:
            self.close()
            raise

    # -- the connector protocol ---------------------------------------------------
    def region(self, lease: Lease, grant: Grant) -> VerbsRegion:
        addr, rkey = grant.access.get("addr"), grant.access.get("rkey")
        if not isinstance(addr, int) or not isinstance(rkey, int) or not 0 <= rkey <= 0xFFFFFFFF or addr < 0:
            raise FabricValueError(f"grant for lease {lease.id} carries no valid addr/rkey")
        region = VerbsRegion(self, lease, addr, rkey, grant.nbytes, writable=grant.writable)
        with self._lock:
            self.regions = [r for r in self.regions if not r.closed]
            self.regions.append(region)
        return region

    # -- connection ------------------------------------------------------------------
    def _connect_qp(self) -> None:
        f = self.fabric
        qp = RcQp(f.ctx, f.pd, f.ib_port, f.gid_index)
        try:
            epoch = self.link.session_epoch
            reply = self.link.connect(qp.local().params())
            qp.connect(Endpoint.from_params(reply))
        except BaseException:
            qp.close()
            raise
        self.qp = qp
        self._epoch = max(epoch, self.link.session_epoch)
        self._broken = False

    def _reset_qp(self) -> None:
        """After an error completion, a timeout or a new control session: rebuild the QP (children first)."""
        log.info("rebuilding the queue pair to %s:%d", self.host, self.port)
        self.wrs.close()
        if self.qp is not None:
            self.qp.close()
            self.qp = None
        try:
            self._connect_qp()
        except Disconnected:
            self._connect_qp()  # the channel broke (the node may have restarted): it reopens on this try

    def _calibrate_atomics(self) -> None:
        attr = self.fabric.ctx.query_device()
        if int(attr.atomic_caps) == int(E.ATOMIC.IBV_ATOMIC_NONE):
            self.atomics = "the device reports no atomic support (IBV_ATOMIC_NONE)"
            return
        probe_addr, probe_rkey = self.link.info.get("probe_addr"), self.link.info.get("probe_rkey")
        if not isinstance(probe_addr, int) or not isinstance(probe_rkey, int):
            self.atomics = "the node sent no atomic probe word"
            return
        try:
            old = self.atomic(build_faa_wr, "faa64", probe_addr, probe_rkey, None, 0, raw=True)
        except (Unsupported, Disconnected) as ex:
            self.atomics = f"atomic probe failed: {ex}"
            return
        if old == PROBE_WORD:
            self.atomic_reply_swapped = False
        elif old == int.from_bytes(PROBE_WORD.to_bytes(8, "little"), "big"):
            self.atomic_reply_swapped = True
            log.info("%s:%d: this HCA returns atomic results big-endian; swapping", self.host, self.port)
        else:
            self.atomics = f"atomic probe returned {old:#x}, expected {PROBE_WORD:#x}"

    # -- operations ------------------------------------------------------------------
    def _ready(self) -> None:
        """Rebuild the QP if the last operation broke it or the control session changed. Call before
        taking WRs from the cache (the rebuild closes them)."""
        if self._broken or self.qp is None or self.link.session_epoch != self._epoch:
            self._reset_qp()

    def _execute(self, wr: Any, op: str, lease_id: str | None) -> None:
        assert self.qp is not None and not self._broken
        wr_id = next(self._wr_ids)
        wr.wr_id = wr_id
        from pyverbs.pyverbs_error import PyverbsError

        try:
            self.qp.post_send(wr)
        except PyverbsError as ex:
            self._broken = True
            raise Disconnected(f"{op}: post_send failed: {ex}") from None
        try:
            wc = poll_completion(self.qp.cq, wr_id, self.fabric.timeout)
        except Disconnected:
            self._broken = True
            raise
        if wc.status != WC.SUCCESS:
            self._broken = True
            state_fn: Callable[[], str] = (
                (lambda: self.fabric.refresh_lease(lease_id)) if lease_id is not None else (lambda: UNKNOWN)
            )
            raise map_completion_error(
                int(wc.status), op, state_fn, lease_id=lease_id or "", vendor_err=int(wc.vendor_err)
            )

    def rdma(self, write: bool, remote_addr: int, rkey: int, mv: memoryview, lease_id: str) -> None:
        """WRITE ``mv`` to / READ into ``mv`` from ``remote_addr``: direct if registered, else staged."""
        op = "write" if write else "read_into"
        build = build_rdma_write_wr if write else build_rdma_read_wr
        opcode = Opcode.IBV_WR_RDMA_WRITE if write else Opcode.IBV_WR_RDMA_READ
        n = mv.nbytes
        if n == 0:
            return
        with self._lock:
            self._ready()
            addr = buffer_address(mv)
            local = self.fabric.local_buffer_for(addr, n)
            if local is not None:
                self._rdma_chunk(build, opcode, op, addr, n, local.lkey, remote_addr, rkey, lease_id)
                return
            staging = self.staging
            assert staging is not None
            step = staging.nbytes
            with staging.view() as sview:  # released at once: a live export would block unmapping
                for pos in range(0, n, step):
                    k = min(step, n - pos)
                    if write:
                        sview[:k] = mv[pos : pos + k]
                    self._rdma_chunk(build, opcode, op, staging.addr, k, staging.lkey, remote_addr + pos, rkey,
                                     lease_id)
                    if not write:
                        mv[pos : pos + k] = sview[:k]

    def _rdma_chunk(
        self, build: Any, opcode: Opcode, op: str, laddr: int, n: int, lkey: int, raddr: int, rkey: int,
        lease_id: str,
    ) -> None:
        wr = self.wrs.get((opcode, laddr, n, lkey), lambda: build(0, laddr, n, lkey, raddr, rkey))
        wr.set_wr_rdma(rkey=rkey, addr=raddr)
        self._execute(wr, op, lease_id)

    def atomic(
        self, build: Any, op: str, remote_addr: int, rkey: int, lease_id: str | None, *operands: int,
        raw: bool = False,
    ) -> int:
        """CAS (``build_cas_wr``, operands expected, desired) or FAA (``build_faa_wr``, operand add)."""
        if self.atomics is not None and not raw:
            raise Unsupported(f"{op}: atomics unavailable towards {self.host}:{self.port}: {self.atomics}")
        with self._lock:
            self._ready()
            scratch = self.scratch
            assert scratch is not None
            check_atomic_addr(remote_addr)
            cas = build is build_cas_wr
            opcode = Opcode.IBV_WR_ATOMIC_CMP_AND_SWP if cas else Opcode.IBV_WR_ATOMIC_FETCH_AND_ADD
            key = (opcode, scratch.addr, 8, scratch.lkey)
            wr = self.wrs.get(key, lambda: build(0, scratch.addr, scratch.lkey, remote_addr, rkey, *operands))
            compare_add, swap = (operands[0], operands[1]) if cas else (operands[0], 0)
            wr.set_wr_atomic(rkey=rkey, addr=remote_addr, compare_add=compare_add & U64, swap=swap & U64)
            self._execute(wr, op, lease_id)
            value = int(struct.unpack_from("<Q", scratch.mem.mm, 0)[0])
        if self.atomic_reply_swapped and not raw:
            value = int.from_bytes(value.to_bytes(8, "little"), "big")
        return value

    def close(self) -> None:
        """Children first: regions, WRs, QP (then its CQ), staging MRs. Idempotent."""
        regions, self.regions = self.regions, []
        for r in regions:
            r.close()
        self.wrs.close()
        if self.qp is not None:
            self.qp.close()
            self.qp = None
        for name in ("staging", "scratch"):
            buf = getattr(self, name)
            if buf is not None:
                buf.close()
                setattr(self, name, None)


class VerbsRegion:
    """A leased region on a memory node, reached with one-sided verbs (never mapped here).

    Every operation checks the lease first (locally: the cached deadline errs
    early) and fails closed; the node enforces the lease too, by deregistering
    the region. Offsets are bytes from the start of the region. A region
    attached with a read-only capability refuses writes and atomics here.
    """

    mapped = False

    def __init__(self, conn: VerbsConnector, lease: Lease, addr: int, rkey: int, nbytes: int, *,
                 writable: bool = True) -> None:
        self.conn = conn  # parent
        self.lease = lease
        self.remote_addr = addr
        self.rkey = rkey
        self.nbytes = nbytes
        self.writable = writable
        self.closed = False

    def ref(self) -> RegionRef:
        return self.conn.fabric.region_ref(self.lease, self.nbytes)

    def address(self) -> int:
        raise Unsupported("a verbs region is not mapped into this process; use the one-sided operations")

    def view(self) -> memoryview:
        raise Unsupported("a verbs region is not mapped into this process; use the one-sided operations")

    def _check(self, offset: int, length: int) -> None:
        """Closed -> ``QueueClosed``; lease -> ``LeaseExpired``/``Revoked``; range -> ``CapacityExceeded``."""
        if self.closed:
            raise QueueClosed(f"region {self.lease.id} is closed")
        self.lease.check()
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise CapacityExceeded(f"[{offset}, {offset + length}) is outside the region's {self.nbytes} bytes")

    def _check_word(self, offset: int) -> None:
        if offset % 8:
            raise FabricValueError(f"64-bit operations need an 8-byte aligned offset, got {offset}")
        self._check(offset, 8)

    def _need_write(self) -> None:
        if not self.writable:
            raise CapabilityDenied(f"lease {self.lease.id} was attached read-only")

    def read_into(self, offset: int, buf: Buffer) -> None:
        mv = byte_view(buf, writable=True)
        self._check(offset, mv.nbytes)
        self.conn.rdma(False, self.remote_addr + offset, self.rkey, mv, self.lease.id)
        self.lease.check()  # fail closed: bytes read across an expiry are not returned

    def write(self, offset: int, buf: Buffer) -> None:
        self._need_write()
        mv = byte_view(buf, writable=False)
        self._check(offset, mv.nbytes)
        self.conn.rdma(True, self.remote_addr + offset, self.rkey, mv, self.lease.id)

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        """Compare-and-swap the 64-bit word at ``offset``; returns the old value (unsigned)."""
        self._need_write()
        self._check_word(offset)
        return self.conn.atomic(build_cas_wr, "cas64", self.remote_addr + offset, self.rkey, self.lease.id,
                                expected, desired)

    def faa64(self, offset: int, add: int) -> int:
        """Fetch-and-add on the 64-bit word at ``offset`` (wraps mod 2**64); returns the old value."""
        self._need_write()
        self._check_word(offset)
        return self.conn.atomic(build_faa_wr, "faa64", self.remote_addr + offset, self.rkey, self.lease.id, add)

    def load64(self, offset: int) -> int:
        """Read the little-endian word at ``offset`` (acquire: it completes before anything later is posted)."""
        self._check_word(offset)
        out = bytearray(8)
        self.conn.rdma(False, self.remote_addr + offset, self.rkey, memoryview(out), self.lease.id)
        self.lease.check()
        return int.from_bytes(out, "little")

    def store64(self, offset: int, value: int) -> None:
        """Write the little-endian word at ``offset`` (release: everything earlier has completed)."""
        self._need_write()
        self._check_word(offset)
        data = (value & U64).to_bytes(8, "little")
        self.conn.rdma(True, self.remote_addr + offset, self.rkey, memoryview(data), self.lease.id)

    def flush(self) -> None:
        """Every operation has already completed when it returned; this only checks the lease."""
        self.lease.check()

    def close(self) -> None:
        """Detach (the lease stays until freed or expired); later calls raise ``QueueClosed``. Idempotent."""
        self.closed = True


class VerbsFabric(RemoteFabric):
    """A client of verbs memory nodes: leased regions reached with one-sided verbs.

    One device context and protection domain per fabric; one RC QP (and
    control channel) per memory node it talks to, opened on first use. The
    node named in the URL is the one :meth:`alloc` uses, and it is contacted
    (and authenticated) at once.
    """

    driver = "verbs"
    schemes = ("rdma", "verbs")
    url_options = frozenset({"device", "ib_port", "gid_index", "staging"})

    def __init__(
        self,
        host: str,
        port: int,
        *,
        device: str | None = None,
        ib_port: int = 1,
        gid_index: int = 0,
        timeout: float = DEFAULT_OP_TIMEOUT,
        staging_bytes: int = DEFAULT_STAGING,
        **kwargs: Any,
    ) -> None:
        from pyverbs.pd import PD

        check_little_endian()
        super().__init__(host, port, timeout=timeout, **kwargs)
        self.ib_port = ib_port
        self.gid_index = gid_index
        self.staging_bytes = staging_bytes
        self._locals: list[LocalBuffer] = []
        self.pd: Any = None
        self.ctx, self.device = open_device(device)
        try:
            self.pd = PD(self.ctx)
            self.channel()  # authenticate and connect now: fail fast
        except BaseException:
            self.close()
            raise

    @classmethod
    def url_kwargs(cls, opts: dict[str, str]) -> dict[str, Any]:
        reason = probe(opts.get("device"))
        if reason is not None:
            raise Unsupported(f"no RDMA device: {reason}")
        kwargs: dict[str, Any] = {"device": opts.get("device")}
        if "ib_port" in opts:
            kwargs["ib_port"] = int(opts["ib_port"])
        if "gid_index" in opts:
            kwargs["gid_index"] = int(opts["gid_index"])
        if "staging" in opts:
            kwargs["staging_bytes"] = int(opts["staging"])
        return kwargs

    def connector(self, link: NodeChannel) -> VerbsConnector:
        return VerbsConnector(self, link)

    def refresh_lease(self, lease_id: str) -> str:
        """Ask the node for a held lease's state and record it in the lease's cell."""
        cell = self.cell(lease_id)
        return cell.refresh() if cell is not None else UNKNOWN

    def node(self, host: str | None = None, port: int | None = None) -> VerbsConnector:
        """The connector (QP and buffers) towards a node (default: the URL's)."""
        conn = self._node(host or self.host, port or self.port)[1]
        assert isinstance(conn, VerbsConnector)
        return conn

    def register(self, nbytes: int) -> LocalBuffer:
        """Allocate and register ``nbytes`` of local memory (a zero-copy READ/WRITE buffer)."""
        buf = LocalBuffer(self.pd, nbytes)
        with self._lock:
            self._locals.append(buf)
        return buf

    def local_buffer_for(self, addr: int, length: int) -> LocalBuffer | None:
        with self._lock:
            for buf in self._locals:
                if buf.contains(addr, length):
                    return buf
        return None

    def atomics_unavailable(self) -> str | None:
        """Why atomics are unavailable towards the URL's node, or ``None`` when they work."""
        return self.node().atomics

    def close(self) -> None:
        """Close everything children-first: regions and node connections, local MRs, PD, context."""
        super().close()
        with self._lock:
            locals_, self._locals = self._locals, []
        for buf in locals_:
            buf.close()
        pd, self.pd = self.pd, None
        if pd is not None:
            pd.close()
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx is not None:
            ctx.close()


def parse_rdma_url(url: str) -> tuple[str, int, dict[str, str]]:
    """``rdma://HOST:PORT[?tenant=NAME&device=mlx5_0&ib_port=1&gid_index=0&timeout=10&staging=BYTES]``
    -> (host, port, options). ``verbs://`` is a synonym; the port defaults to ``DEFAULT_PORT``."""
    return parse_node_url(url, VerbsFabric.schemes, {"tenant", "timeout"} | set(VerbsFabric.url_options))
