"""The verbs driver: leased regions on an RDMA memory node, reached with one-sided verbs.

Two players:

* a **memory node** (:class:`MemoryNode`, ``grafos-fabric serve``) owns a pool
  of memory on one RDMA device. It hands out leases over a TCP control
  channel. Each lease is a span of the pool registered as its *own* memory
  region (MR) with remote read, write and atomic access, so that taking one
  lease away (expiry, revoke, free) is exactly one ``ibv_dereg_mr``: the rkey
  dies and every later remote access to it fails at the responder, without
  the node's CPU in the data path. A reaper thread enforces deadlines.
* a **client** (:class:`VerbsFabric`, ``open_fabric("rdma://HOST:PORT")``)
  keeps one RC queue pair per memory node it talks to, and maps the driver
  protocol's one-sided operations onto verbs: ``write`` = RDMA WRITE,
  ``read_into`` = RDMA READ, ``cas64`` = ATOMIC_CMP_AND_SWP, ``faa64`` =
  ATOMIC_FETCH_AND_ADD (the add value goes in ``compare_add``), ``load64`` /
  ``store64`` = 8-byte READ / WRITE.

Why TCP for the control channel (and not rdma-cm SEND/RECV): it is simple,
it works unchanged over InfiniBand, RoCE and iWARP (the data path is what
needs RDMA; the control path is a handful of messages per lease), it is
testable on every machine (the lease logic of the node runs in CI over real
sockets with a fake registrar), and it carries the QP connection exchange
(QP number, PSN, LID/GID), which rdma-cm would otherwise do. Messages are
msgspec msgpack structs behind a 4-byte length, validated on decode; nothing
is ever unpickled. The channel has **no authentication**: run memory nodes on
a trusted fabric network only.

Ordering and completion: every one-sided operation is posted signalled and
waited for (with a timeout) before the call returns, so program order is
completion order; ``load64`` is therefore an acquire and ``store64`` a
release, and :meth:`VerbsRegion.flush` has nothing left to wait for. Batching
(unsignalled WRITEs with one signalled tail) is a later optimisation.

Errors: a failed completion puts the RC QP into the error state, so the
connection is rebuilt (new CQ and QP, exchanged again over the control
channel) before the next operation. The status maps to the typed failures of
:mod:`grafos_fabric.errors` (see :func:`map_completion_error`): a remote
access error becomes :class:`Revoked` or :class:`LeaseExpired` according to
the lease state the node reports over the control channel; retries exceeded,
flushes and timeouts become :class:`Disconnected`.

Atomicity: RDMA atomics are atomic with respect to other RDMA atomics on
the same word (``IBV_ATOMIC_HCA``: through the same HCA; ``IBV_ATOMIC_GLOB``:
also against the node's CPU). ``load64``/``store64`` are aligned 8-byte READ /
WRITE, which HCAs place as single PCIe transactions but the verbs spec does
not call atomic; the ring protocol only mixes them with atomics on words whose
writers agree on one of the two (an assumption to confirm on each HCA).

Buffers: bytes go through a per-node registered staging buffer (copied, in
chunks) unless the caller's buffer lies inside memory registered with
:meth:`VerbsFabric.register`, which READ/WRITE then use directly (zero copy).

Node restarts: the control channel notices a broken stream, reconnects on
the next request and the QP is rebuilt; leases the new node never issued
then fail as :class:`LeaseExpired` (status ``unknown``).

Byte order: ``load64``/``store64`` use little-endian words (the ring's
format); atomics operate on the responder's native words. Both players must
be little-endian hosts (checked). Some HCAs return the *old value* of an
atomic big-endian; a client calibrates this once per connection with a
fetch-and-add of 0 on a probe word of known value that the node exposes.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import mmap
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol
from urllib.parse import parse_qs, urlsplit

import msgspec
import numpy as np

from grafos_fabric.errors import (
    CapacityExceeded,
    Corrupted,
    Disconnected,
    FabricError,
    FabricValueError,
    LeaseExpired,
    QueueClosed,
    Revoked,
    Unsupported,
    VersionMismatch,
    from_status,
)
from grafos_fabric.lease import NS, Clock, Lease, LeaseState, MonotonicClock, check_ttl

from ._verbs_compat import WC, E, probe
from .base import Buffer, RegionRef

__all__ = [
    "DEFAULT_PORT",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "Alloc",
    "Allocator",
    "Attach",
    "Connect",
    "Connected",
    "Control",
    "ControlClient",
    "Done",
    "Endpoint",
    "ErrorReply",
    "Free",
    "Granted",
    "Hello",
    "HelloOk",
    "LeaseStatus",
    "LeaseTable",
    "LocalBuffer",
    "MemoryNode",
    "Registrar",
    "RemoteLeaseCell",
    "Renew",
    "Renewed",
    "Reply",
    "Request",
    "Revoke",
    "ServerLease",
    "Status",
    "VerbsFabric",
    "VerbsRegion",
    "WrCache",
    "build_cas_wr",
    "build_faa_wr",
    "build_rc_init_attr",
    "build_rc_qp_attr",
    "build_rdma_read_wr",
    "build_rdma_write_wr",
    "configure_rc_connect",
    "decode_reply",
    "decode_request",
    "encode_frame",
    "error_reply",
    "map_completion_error",
    "parse_rdma_url",
    "poll_completion",
    "raise_for_reply",
    "read_frame",
    "send_frame",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 18515
PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 16  # control messages are small; anything larger is a broken peer
PAGE = mmap.PAGESIZE
U64 = (1 << 64) - 1
MAX_REGION = 1 << 48
PROBE_WORD = 0x0102030405060708  # non-palindromic: tells host order from byte-swapped
DEFAULT_OP_TIMEOUT = 10.0
DEFAULT_STAGING = 1 << 20

# lease states on the wire
ACTIVE, EXPIRED, REVOKED, FREED, UNKNOWN = "active", "expired", "revoked", "freed", "unknown"
LEASE_STATES = (ACTIVE, EXPIRED, REVOKED, FREED, UNKNOWN)


# ---------------------------------------------------------------------------
# Control channel messages (msgspec msgpack, tagged structs, validated)
# ---------------------------------------------------------------------------

LeaseId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
U64Int = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints stop at 2**64 - 1
U32Int = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Nbytes = Annotated[int, msgspec.Meta(ge=1, le=MAX_REGION)]
Ttl = Annotated[float, msgspec.Meta(gt=0.0, le=10 * 365 * 24 * 3600.0)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, frozen=True):
    pass


class Hello(_Msg, tag="hello", frozen=True):
    """Client -> node, first message: protocol version and a client name."""

    version: U32Int
    client: Annotated[str, msgspec.Meta(max_length=256)] = ""


class Connect(_Msg, tag="connect", frozen=True):
    """Client -> node: the client's QP endpoint; the node answers with its own (``Connected``)."""

    qpn: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFF)]
    psn: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFF)]
    lid: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    gid: Annotated[str, msgspec.Meta(max_length=64)]
    mtu: Annotated[int, msgspec.Meta(ge=1, le=5)]  # enum ibv_mtu: 1=256 .. 5=4096


class Alloc(_Msg, tag="alloc", frozen=True):
    nbytes: Nbytes
    ttl: Ttl


class Attach(_Msg, tag="attach", frozen=True):
    lease_id: LeaseId
    generation: U64Int


class Renew(_Msg, tag="renew", frozen=True):
    lease_id: LeaseId
    ttl: Ttl


class Free(_Msg, tag="free", frozen=True):
    lease_id: LeaseId


class Revoke(_Msg, tag="revoke", frozen=True):
    lease_id: LeaseId


class Status(_Msg, tag="status", frozen=True):
    lease_id: LeaseId


class HelloOk(_Msg, tag="hello_ok", frozen=True):
    """Node -> client: version, node id, and the atomic probe word (addr/rkey)."""

    version: U32Int
    node: Annotated[str, msgspec.Meta(max_length=256)]
    probe_addr: U64Int
    probe_rkey: U32Int


class Connected(_Msg, tag="connected", frozen=True):
    qpn: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFF)]
    psn: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFF)]
    lid: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    gid: Annotated[str, msgspec.Meta(max_length=64)]
    mtu: Annotated[int, msgspec.Meta(ge=1, le=5)]


class Granted(_Msg, tag="granted", frozen=True):
    """A lease: where its region lives (``addr``/``rkey``) and how long it has left."""

    lease_id: LeaseId
    generation: U64Int
    addr: U64Int
    rkey: U32Int
    nbytes: Nbytes
    ttl: Ttl
    remaining: float


class Renewed(_Msg, tag="renewed", frozen=True):
    lease_id: LeaseId
    remaining: float


class Done(_Msg, tag="done", frozen=True):
    lease_id: LeaseId


class LeaseStatus(_Msg, tag="lease_status", frozen=True):
    lease_id: LeaseId
    state: Annotated[str, msgspec.Meta(pattern="^(active|expired|revoked|freed|unknown)$")]
    generation: U64Int
    remaining: float


class ErrorReply(_Msg, tag="error", frozen=True):
    """A failure: ``code`` is the grafOS status; ``kind`` names a ``FabricValueError`` subclass when it is one."""

    code: int
    message: Text
    kind: Annotated[str, msgspec.Meta(max_length=64)] = ""


Request = Hello | Connect | Alloc | Attach | Renew | Free | Revoke | Status
Reply = HelloOk | Connected | Granted | Renewed | Done | LeaseStatus | ErrorReply

_ENCODER = msgspec.msgpack.Encoder()
_REQ_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Request)
_REPLY_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Reply)
_LEN = struct.Struct(">I")

_VALUE_ERRORS: dict[str, type[FabricValueError]] = {
    "Corrupted": Corrupted,
    "VersionMismatch": VersionMismatch,
    "FabricValueError": FabricValueError,
}


def encode_frame(msg: _Msg) -> bytes:
    """One frame: a 4-byte big-endian length, then the msgpack body."""
    body = _ENCODER.encode(msg)
    if len(body) > MAX_FRAME:
        raise FabricValueError(f"control message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def _decode(decoder: msgspec.msgpack.Decoder[Any], body: bytes, what: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as ex:
        raise Corrupted(f"invalid {what}: {ex}") from None
    except msgspec.DecodeError as ex:
        raise Corrupted(f"malformed {what}: {ex}") from None


def decode_request(body: bytes) -> Request:
    """Decode one request body; raises :class:`Corrupted` for anything malformed."""
    msg: Request = _decode(_REQ_DECODER, body, "request")
    return msg


def decode_reply(body: bytes) -> Reply:
    """Decode one reply body; raises :class:`Corrupted` for anything malformed."""
    msg: Reply = _decode(_REPLY_DECODER, body, "reply")
    return msg


def error_reply(ex: BaseException) -> ErrorReply:
    """The wire form of an exception raised while serving a request."""
    if isinstance(ex, FabricError):
        return ErrorReply(code=ex.code, message=str(ex)[:4096])
    if isinstance(ex, FabricValueError):
        kind = type(ex).__name__ if type(ex).__name__ in _VALUE_ERRORS else "FabricValueError"
        return ErrorReply(code=-5, message=str(ex)[:4096], kind=kind)
    return ErrorReply(code=-1, message=f"internal error: {type(ex).__name__}: {ex}"[:4096])


def raise_for_reply(reply: ErrorReply) -> None:
    """Raise the typed exception an :class:`ErrorReply` stands for."""
    cls = _VALUE_ERRORS.get(reply.kind)
    if cls is not None:
        raise cls(reply.message)
    raise from_status(reply.code, reply.message)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise Disconnected("control channel timed out") from None
        except OSError as ex:
            raise Disconnected(f"control channel failed: {ex}") from None
        if k == 0:
            raise Disconnected("control channel closed by the peer" + (" mid-frame" if got else ""))
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket) -> bytes:
    """Read one frame body. ``Disconnected`` on EOF/timeout, ``Corrupted`` on a bad length."""
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n == 0 or n > MAX_FRAME:
        raise Corrupted(f"control frame length {n} out of range (1..{MAX_FRAME})")
    return _recv_exact(sock, n)


def send_frame(sock: socket.socket, msg: _Msg) -> None:
    data = encode_frame(msg)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise Disconnected("control channel timed out") from None
    except OSError as ex:
        raise Disconnected(f"control channel failed: {ex}") from None


# ---------------------------------------------------------------------------
# Memory node: allocator and lease table (pure; no verbs)
# ---------------------------------------------------------------------------


class Allocator:
    """First-fit allocation of page-aligned spans of ``[0, size)``, with coalescing free."""

    def __init__(self, size: int, align: int = PAGE) -> None:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise FabricValueError(f"bad allocator size {size} / alignment {align}")
        self.size = size - size % align
        self.align = align
        self._free: list[tuple[int, int]] = [(0, self.size)] if self.size else []  # (offset, length), sorted

    def round(self, nbytes: int) -> int:
        return (nbytes + self.align - 1) // self.align * self.align

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def alloc(self, nbytes: int) -> int:
        """The offset of a span of ``round(nbytes)`` bytes; ``CapacityExceeded`` when none fits."""
        need = self.round(nbytes)
        for i, (off, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, n - need)
                return off
        raise CapacityExceeded(f"pool cannot fit {nbytes} bytes ({self.free_bytes} free, fragmented)")

    def release(self, offset: int, nbytes: int) -> None:
        n = self.round(nbytes)
        spans = sorted([*self._free, (offset, n)])
        merged: list[tuple[int, int]] = []
        for off, ln in spans:
            if merged and merged[-1][0] + merged[-1][1] > off:
                raise FabricValueError(f"double free of pool span at {offset}")
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + ln)
            else:
                merged.append((off, ln))
        self._free = merged


class RegisteredSpan(Protocol):
    """What a registrar hands back: the remote address and key of a registered span."""

    addr: int
    rkey: int


class Registrar(Protocol):
    """Registers spans of the pool for remote access, and takes that access away."""

    def register(self, offset: int, nbytes: int) -> RegisteredSpan: ...
    def deregister(self, span: RegisteredSpan) -> None: ...


@dataclass
class ServerLease:
    """The node's record of one lease."""

    lease_id: str
    generation: int
    offset: int
    nbytes: int
    ttl: float
    deadline_ns: int
    state: str = ACTIVE
    span: RegisteredSpan | None = None


class LeaseTable:
    """The memory node's leases: alloc, attach, renew, free, revoke, status, reap.

    Expiry is enforced in two places: every call first retires the leases whose
    deadline has passed, and the node's reaper thread calls :meth:`reap`
    regularly so remote access stops promptly even when no request comes in.
    Retiring a lease deregisters its span (exactly once), returns the memory to
    the pool and keeps a tombstone, so a later status query says *why* the
    lease is gone (``expired``, ``revoked`` or ``freed``) instead of
    ``unknown``. Generations grow by one per allocation, for the node's life.
    """

    def __init__(
        self,
        pool_size: int,
        registrar: Registrar,
        clock: Clock | None = None,
        *,
        align: int = PAGE,
        tombstones: int = 4096,
        node_tag: str | None = None,
    ) -> None:
        self.allocator = Allocator(pool_size, align)
        self.registrar = registrar
        self.clock: Clock = clock or MonotonicClock()
        self.node_tag = node_tag or secrets.token_hex(4)
        self._leases: dict[str, ServerLease] = {}
        self.quarantined: list[tuple[int, int]] = []  # (offset, nbytes) whose deregistration failed
        self._tombs: collections.OrderedDict[str, ServerLease] = collections.OrderedDict()
        self._max_tombs = tombstones
        self._gen = itertools.count(1)
        self._lock = threading.RLock()

    # -- queries -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._leases)

    def remaining(self, lease: ServerLease) -> float:
        return (lease.deadline_ns - self.clock.now_ns()) / NS

    def _find(self, lease_id: str) -> ServerLease:
        """The live lease ``lease_id``; typed failure when it is gone."""
        self.reap()
        lease = self._leases.get(lease_id)
        if lease is not None:
            return lease
        tomb = self._tombs.get(lease_id)
        if tomb is None:
            raise LeaseExpired(f"lease {lease_id} is unknown to node {self.node_tag}")
        if tomb.state == REVOKED:
            raise Revoked(f"lease {lease_id} was revoked")
        raise LeaseExpired(f"lease {lease_id} was {tomb.state}")

    def status(self, lease_id: str) -> tuple[str, int, float]:
        """``(state, generation, remaining seconds)``; state ``unknown`` when never seen (or forgotten)."""
        with self._lock:
            self.reap()
            lease = self._leases.get(lease_id) or self._tombs.get(lease_id)
            if lease is None:
                return UNKNOWN, 0, 0.0
            remaining = self.remaining(lease) if lease.state == ACTIVE else 0.0
            return lease.state, lease.generation, remaining

    # -- lifecycle -----------------------------------------------------------
    def alloc(self, nbytes: int, ttl: float) -> ServerLease:
        ttl = check_ttl(ttl)
        if not 0 < nbytes <= MAX_REGION:
            raise FabricValueError(f"nbytes must be in (0, {MAX_REGION}], got {nbytes}")
        with self._lock:
            self.reap()
            offset = self.allocator.alloc(nbytes)
            try:
                span = self.registrar.register(offset, self.allocator.round(nbytes))
            except BaseException:
                self.allocator.release(offset, nbytes)
                raise
            gen = next(self._gen)
            lease = ServerLease(
                lease_id=f"{self.node_tag}-{gen:x}",
                generation=gen,
                offset=offset,
                nbytes=nbytes,
                ttl=ttl,
                deadline_ns=self.clock.now_ns() + int(ttl * NS),
                span=span,
            )
            self._leases[lease.lease_id] = lease
            log.info("lease %s: %d bytes at pool offset %d for %.3fs", lease.lease_id, nbytes, offset, ttl)
            return lease

    def attach(self, lease_id: str, generation: int) -> ServerLease:
        with self._lock:
            lease = self._find(lease_id)
            if lease.generation != generation:
                raise LeaseExpired(f"lease {lease_id} generation {generation} is gone (now {lease.generation})")
            return lease

    def renew(self, lease_id: str, ttl: float) -> float:
        """Extend to now + ``ttl``; returns the remaining seconds. Never resurrects a lease."""
        ttl = check_ttl(ttl)
        with self._lock:
            lease = self._find(lease_id)
            lease.ttl = ttl
            lease.deadline_ns = self.clock.now_ns() + int(ttl * NS)
            return self.remaining(lease)

    def free(self, lease_id: str) -> None:
        """Give the lease back. Idempotent: freeing a lease that is already gone is not an error."""
        with self._lock:
            self.reap()
            lease = self._leases.get(lease_id)
            if lease is not None:
                self._retire(lease, FREED)

    def revoke(self, lease_id: str) -> None:
        """Revoke the lease: remote access stops now; status says ``revoked``. Idempotent."""
        with self._lock:
            self.reap()
            lease = self._leases.get(lease_id)
            if lease is not None:
                self._retire(lease, REVOKED)
                return
            tomb = self._tombs.get(lease_id)
            if tomb is None:
                raise LeaseExpired(f"lease {lease_id} is unknown to node {self.node_tag}")

    def reap(self) -> int:
        """Retire every lease past its deadline; returns how many."""
        with self._lock:
            now = self.clock.now_ns()
            due = [lease for lease in self._leases.values() if now >= lease.deadline_ns]
            for lease in due:
                self._retire(lease, EXPIRED)
            return len(due)

    def close(self) -> None:
        """Deregister everything (node shutdown): clients see their leases as freed."""
        with self._lock:
            for lease in list(self._leases.values()):
                self._retire(lease, FREED)

    def _retire(self, lease: ServerLease, state: str) -> None:
        """End a lease. Its memory goes back to the pool only once remote access
        to it is gone: if deregistration fails, the span is quarantined (never
        handed out again), because a new tenant's bytes would be reachable
        through the old rkey."""
        del self._leases[lease.lease_id]
        lease.state = state
        span, lease.span = lease.span, None
        self._tombs[lease.lease_id] = lease
        while len(self._tombs) > self._max_tombs:
            self._tombs.popitem(last=False)
        try:
            if span is not None:
                self.registrar.deregister(span)
        except Exception:
            self.quarantined.append((lease.offset, lease.nbytes))
            log.exception("lease %s %s, but deregistering its region failed: %d bytes quarantined",
                          lease.lease_id, state, lease.nbytes)
            return
        self.allocator.release(lease.offset, lease.nbytes)
        log.info("lease %s %s", lease.lease_id, state)


# ---------------------------------------------------------------------------
# Work requests (small pure functions; checked field by field in the tests)
# ---------------------------------------------------------------------------


def _send_flags(signaled: bool) -> int:
    return int(E.SF.IBV_SEND_SIGNALED) if signaled else 0


def _make_wr(wr_id: int, opcode: Any, local_addr: int, length: int, lkey: int, signaled: bool) -> Any:
    """A one-SGE ``SendWR``. The SGE is copied into the WR, then closed (pyverbs leaks it otherwise)."""
    from pyverbs.wr import SGE, SendWR

    if length <= 0 or length > 0xFFFFFFFF:
        raise FabricValueError(f"a work request moves 1..2**32-1 bytes, got {length}")
    sge = SGE(local_addr, length, lkey)
    try:
        return SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge], send_flags=_send_flags(signaled))
    finally:
        sge.close()


def build_rdma_write_wr(
    wr_id: int, local_addr: int, length: int, lkey: int, remote_addr: int, rkey: int, *, signaled: bool = True
) -> Any:
    """RDMA WRITE of ``length`` bytes from ``local_addr`` (``lkey``) to ``remote_addr`` (``rkey``)."""
    wr = _make_wr(wr_id, E.OP.IBV_WR_RDMA_WRITE, local_addr, length, lkey, signaled)
    wr.set_wr_rdma(rkey=rkey, addr=remote_addr)
    return wr


def build_rdma_read_wr(
    wr_id: int, local_addr: int, length: int, lkey: int, remote_addr: int, rkey: int, *, signaled: bool = True
) -> Any:
    """RDMA READ of ``length`` bytes at ``remote_addr`` (``rkey``) into ``local_addr`` (``lkey``)."""
    wr = _make_wr(wr_id, E.OP.IBV_WR_RDMA_READ, local_addr, length, lkey, signaled)
    wr.set_wr_rdma(rkey=rkey, addr=remote_addr)
    return wr


def _check_atomic_addr(remote_addr: int) -> None:
    if remote_addr % 8:
        raise FabricValueError(f"atomic target {remote_addr:#x} is not 8-byte aligned")


def build_cas_wr(
    wr_id: int,
    local_addr: int,
    lkey: int,
    remote_addr: int,
    rkey: int,
    expected: int,
    desired: int,
    *,
    signaled: bool = True,
) -> Any:
    """ATOMIC_CMP_AND_SWP: ``compare_add`` = expected, ``swap`` = desired; old value -> 8 bytes at ``local_addr``."""
    _check_atomic_addr(remote_addr)
    wr = _make_wr(wr_id, E.OP.IBV_WR_ATOMIC_CMP_AND_SWP, local_addr, 8, lkey, signaled)
    wr.set_wr_atomic(rkey=rkey, addr=remote_addr, compare_add=expected & U64, swap=desired & U64)
    return wr


def build_faa_wr(
    wr_id: int, local_addr: int, lkey: int, remote_addr: int, rkey: int, add: int, *, signaled: bool = True
) -> Any:
    """ATOMIC_FETCH_AND_ADD: the add value goes in ``compare_add`` (``swap`` is ignored and left 0).

    A negative ``add`` wraps modulo 2**64 (two's complement), like the C op.
    """
    _check_atomic_addr(remote_addr)
    wr = _make_wr(wr_id, E.OP.IBV_WR_ATOMIC_FETCH_AND_ADD, local_addr, 8, lkey, signaled)
    wr.set_wr_atomic(rkey=rkey, addr=remote_addr, compare_add=add & U64, swap=0)
    return wr


class WrCache:
    """Reuse of ``SendWR`` objects, keyed by what their SGE holds (they leak unless closed).

    The SGE is fixed when a WR is built; the remote side (``set_wr_rdma`` /
    ``set_wr_atomic``) and ``wr_id`` are set per operation. At most
    ``capacity`` WRs are kept: the least recently used one is closed when a new
    one would exceed it, and :meth:`close` closes them all.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._wrs: collections.OrderedDict[tuple[int, int, int, int], Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._wrs)

    def get(self, key: tuple[int, int, int, int], build: Callable[[], Any]) -> Any:
        wr = self._wrs.get(key)
        if wr is not None:
            self._wrs.move_to_end(key)
            return wr
        wr = build()
        self._wrs[key] = wr
        while len(self._wrs) > self.capacity:
            _, old = self._wrs.popitem(last=False)
            old.close()
        return wr

    def close(self) -> None:
        while self._wrs:
            _, wr = self._wrs.popitem()
            wr.close()


# ---------------------------------------------------------------------------
# Completions: polling with a timeout, and the error mapping
# ---------------------------------------------------------------------------

_REMOTE_ACCESS = (WC.REM_ACCESS_ERR, WC.REM_INV_REQ_ERR, WC.REM_INV_RD_REQ_ERR)
ATOMIC_OPS = ("cas64", "faa64")


def map_completion_error(
    status: int, op: str, lease_state: Callable[[], str], *, lease_id: str = "", vendor_err: int = 0
) -> FabricError:
    """The typed failure for a completion with error ``status`` (never raises).

    * remote access / invalid request: ask the node for the lease's state
      (``lease_state()``, over the control channel): ``revoked`` ->
      :class:`Revoked`; ``expired``, ``freed`` or ``unknown`` ->
      :class:`LeaseExpired`; still ``active`` -> :class:`Disconnected` (the
      connection is rebuilt and a retry may succeed). If the node cannot be
      asked, :class:`Disconnected`.
    * ``REM_OP_ERR`` on an atomic -> :class:`Unsupported` (the responder cannot
      perform it).
    * everything else (retry exceeded, RNR retry exceeded, flush, response
      timeout, fatal, local errors) -> :class:`Disconnected`.
    """
    name = WC.NAMES.get(status, f"status {status}")
    what = f"{op} on lease {lease_id or '?'} failed: {name} (vendor error {vendor_err:#x})"
    if status in _REMOTE_ACCESS:
        try:
            state = lease_state()
        except FabricError as ex:
            return Disconnected(f"{what}; the node could not be asked for the lease state: {ex}")
        if state == REVOKED:
            return Revoked(f"{what}: the lease was revoked")
        if state in (EXPIRED, FREED, UNKNOWN):
            return LeaseExpired(f"{what}: the lease is {state}")
        return Disconnected(f"{what}, although the node reports the lease {state}")
    if status == WC.REM_OP_ERR and op in ATOMIC_OPS:
        return Unsupported(f"{what}: the responder cannot perform this atomic")
    return Disconnected(what)


def poll_completion(cq: Any, wr_id: int, timeout: float, *, spin: int = 1000) -> Any:
    """Wait for the completion of ``wr_id`` on ``cq``; returns the work completion.

    Busy-polls ``spin`` times, then yields the CPU between polls. Raises
    :class:`Disconnected` when nothing completes within ``timeout`` seconds or a
    completion for another work request turns up (every operation is waited
    for, so that means the queue pair's state is unknown). Does not look at
    the status: that is :func:`map_completion_error`'s job.
    """
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        n, wcs = cq.poll()
        if n:
            wc = wcs[0]
            if wc.wr_id != wr_id:
                raise Disconnected(f"completion for work request {wc.wr_id} while waiting for {wr_id}")
            return wc
        polls += 1
        if polls > spin:
            if time.monotonic() >= deadline:
                raise Disconnected(f"no completion for work request {wr_id} within {timeout:.3f}s")
            time.sleep(0 if polls < spin * 4 else 0.0001)


# ---------------------------------------------------------------------------
# Verbs plumbing shared by both players (needs pyverbs and a device)
# ---------------------------------------------------------------------------


def _remote_access() -> int:
    acc = E.ACC
    return int(
        acc.IBV_ACCESS_LOCAL_WRITE | acc.IBV_ACCESS_REMOTE_WRITE | acc.IBV_ACCESS_REMOTE_READ
        | acc.IBV_ACCESS_REMOTE_ATOMIC
    )


class _PinnedMemory:
    """Page-aligned anonymous memory with a stable address (mmap), optionally registered."""

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


@dataclass(frozen=True)
class Endpoint:
    """One side of an RC connection, as exchanged over the control channel."""

    qpn: int
    psn: int
    lid: int
    gid: str
    mtu: int


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
    attr.qp_access_flags = _remote_access()
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


class _RcQp:
    """One RC queue pair with its own CQ: created to INIT, connected to RTS, closed QP-then-CQ."""

    def __init__(self, ctx: Any, pd: Any, ib_port: int, gid_index: int, max_send_wr: int = 64) -> None:
        from pyverbs.cq import CQ
        from pyverbs.qp import QP

        self.ib_port = ib_port
        self.gid_index = gid_index
        port = ctx.query_port(ib_port)
        self._is_roce = int(port.link_layer) == E.LINK.ETHERNET
        self._lid = int(port.lid)
        self._mtu = int(port.active_mtu)
        self._gid = str(ctx.query_gid(ib_port, gid_index))
        self.cq = CQ(ctx, max_send_wr + 1, None, None, 0)
        try:
            self.attr = build_rc_qp_attr(ib_port)
            self.qp = QP(pd, build_rc_init_attr(self.cq, max_send_wr), self.attr)  # -> INIT
        except BaseException:
            self.cq.close()
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

    def close(self) -> None:
        for obj in (getattr(self, "qp", None), getattr(self, "cq", None)):
            if obj is not None:
                obj.close()


def _open_device(device: str | None) -> tuple[Any, str]:
    """``(Context, name)`` for ``device`` (default: the first device); ``Unsupported`` when none."""
    from pyverbs.device import Context

    from ._verbs_compat import device_names

    reason = probe(device)
    if reason is not None:
        raise Unsupported(f"no RDMA device: {reason}")
    name = device or device_names()[0]
    return Context(name=name), name


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise Unsupported("the verbs driver assumes little-endian hosts (ring words and atomics)")


# ---------------------------------------------------------------------------
# Memory node (server)
# ---------------------------------------------------------------------------


@dataclass
class _Span:
    addr: int
    rkey: int
    mr: Any


class _PyverbsRegistrar:
    """Registers spans of the pool as MRs (zeroed first: no bytes leak between tenants)."""

    def __init__(self, pd: Any, pool: _PinnedMemory) -> None:
        self.pd = pd
        self.pool = pool

    def register(self, offset: int, nbytes: int) -> _Span:
        from pyverbs.mr import MR

        addr = self.pool.addr + offset
        ctypes.memset(addr, 0, nbytes)
        mr = MR(self.pd, nbytes, _remote_access(), address=addr)
        return _Span(addr=int(mr.buf), rkey=int(mr.rkey), mr=mr)

    def deregister(self, span: RegisteredSpan) -> None:
        assert isinstance(span, _Span)
        span.mr.close()


class MemoryNode:
    """A memory node: a pool on one RDMA device, leases over a TCP control channel.

    ``MemoryNode.open(device, pool_size=..., port=...)`` opens the device,
    allocates and pins the pool and starts serving; :meth:`close` stops and
    releases everything children-first (connections' QPs, lease MRs, probe MR,
    PD, context). For tests without a device, construct it directly with a
    :class:`LeaseTable` over a fake registrar and ``verbs=None``: lease
    requests work, ``Connect`` answers :class:`Unsupported`.
    """

    def __init__(
        self,
        table: LeaseTable,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        verbs: _NodeVerbs | None = None,
        reap_interval: float = 0.05,
    ) -> None:
        self.table = table
        self.verbs = verbs
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.2)
        self.host, self.port = self._listener.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._conn_threads: list[threading.Thread] = []
        self._reap_interval = reap_interval
        self._closed = False

    @classmethod
    def open(
        cls,
        device: str | None = None,
        *,
        pool_size: int,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        ib_port: int = 1,
        gid_index: int = 0,
        clock: Clock | None = None,
        reap_interval: float = 0.05,
    ) -> MemoryNode:
        """Open ``device`` (default: the first), pin a pool of ``pool_size`` bytes and start serving."""
        _check_little_endian()
        verbs = _NodeVerbs(device, pool_size, ib_port, gid_index)
        try:
            table = LeaseTable(verbs.pool.nbytes, _PyverbsRegistrar(verbs.pd, verbs.pool), clock)
            node = cls(table, host=host, port=port, verbs=verbs, reap_interval=reap_interval)
        except BaseException:
            verbs.close()
            raise
        return node.start()

    # -- running ---------------------------------------------------------------
    def start(self) -> MemoryNode:
        for target, name in ((self._accept_loop, "accept"), (self._reap_loop, "reaper")):
            t = threading.Thread(target=target, name=f"grafos-node-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("memory node %s serving on %s:%d", self.table.node_tag, self.host, self.port)
        return self

    def serve_forever(self) -> None:
        """Block until :meth:`close` is called (from a signal handler or another thread)."""
        while not self._stop.wait(0.5):
            pass

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._reap_interval):
            try:
                self.table.reap()
            except Exception:
                log.exception("reaper failed")

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conns_lock:
                self._conns.add(sock)
            t = threading.Thread(target=self._serve_conn, args=(sock, peer), name="grafos-node-conn", daemon=True)
            with self._conns_lock:
                self._conn_threads = [c for c in self._conn_threads if c.is_alive()]
                self._conn_threads.append(t)
            t.start()

    def _serve_conn(self, sock: socket.socket, peer: Any) -> None:
        conn = _NodeSession(self, peer)
        try:
            while not self._stop.is_set():
                try:
                    body = read_frame(sock)
                except Corrupted as ex:  # the stream is out of step: say why, then hang up
                    log.warning("control channel from %s: %s", peer, ex)
                    send_frame(sock, error_reply(ex))
                    return
                try:
                    reply = conn.handle(decode_request(body))
                except (FabricError, FabricValueError) as ex:
                    reply = error_reply(ex)
                except Exception as ex:  # a bug must not kill the node: report it, keep serving
                    log.exception("request from %s failed", peer)
                    reply = error_reply(ex)
                send_frame(sock, reply)
        except Disconnected:
            pass
        finally:
            conn.close()
            with self._conns_lock:
                self._conns.discard(sock)
            sock.close()

    def close(self) -> None:
        """Stop serving, drop connections, deregister every lease, release the device. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop at once (Linux)
        except OSError:
            pass
        self._listener.close()
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        with self._conns_lock:
            conn_threads = list(self._conn_threads)
        for t in conn_threads:  # each closes its session's QP on the way out (children first)
            t.join(timeout=5)
        self.table.close()
        if self.verbs is not None:
            self.verbs.close()

    def __enter__(self) -> MemoryNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NodeVerbs:
    """The node's verbs resources: context, PD, pinned pool, probe word MR, shared QP lock."""

    def __init__(self, device: str | None, pool_size: int, ib_port: int, gid_index: int) -> None:
        from pyverbs.mr import MR
        from pyverbs.pd import PD

        self.ib_port = ib_port
        self.gid_index = gid_index
        self.ctx, self.device = _open_device(device)
        self.pd: Any = None
        self.pool: Any = None
        self.probe_mem: Any = None
        self.probe_mr: Any = None
        try:
            self.pd = PD(self.ctx)
            self.pool = _PinnedMemory(pool_size)
            self.probe_mem = _PinnedMemory(PAGE)
            struct.pack_into("<Q", self.probe_mem.mm, 0, PROBE_WORD)
            self.probe_mr = MR(self.pd, PAGE, _remote_access(), address=self.probe_mem.addr)
        except BaseException:
            self.close()
            raise
        self.lock = threading.Lock()

    def new_qp(self) -> _RcQp:
        return _RcQp(self.ctx, self.pd, self.ib_port, self.gid_index, max_send_wr=1)

    def close(self) -> None:
        """Children first: probe MR, PD (lease MRs are closed by the table before), context, memory."""
        for obj in (self.probe_mr, self.pd, self.ctx):
            if obj is not None:
                obj.close()
        for mem in (self.probe_mem, self.pool):
            if mem is not None:
                mem.close()


class _NodeSession:
    """One control connection on the node: its hello state and its QP."""

    def __init__(self, node: MemoryNode, peer: Any) -> None:
        self.node = node
        self.peer = peer
        self.hello = False
        self.qp: _RcQp | None = None

    def handle(self, req: Request) -> Reply:
        table = self.node.table
        if isinstance(req, Hello):
            if req.version != PROTOCOL_VERSION:
                raise VersionMismatch(f"control protocol {req.version}; this node speaks {PROTOCOL_VERSION}")
            self.hello = True
            v = self.node.verbs
            return HelloOk(
                version=PROTOCOL_VERSION,
                node=table.node_tag,
                probe_addr=int(v.probe_mr.buf) if v else 0,
                probe_rkey=int(v.probe_mr.rkey) if v else 0,
            )
        if not self.hello:
            raise Corrupted("the first control message must be hello")
        if isinstance(req, Connect):
            return self._connect(req)
        if isinstance(req, Alloc):
            return self._granted(table.alloc(req.nbytes, req.ttl))
        if isinstance(req, Attach):
            return self._granted(table.attach(req.lease_id, req.generation))
        if isinstance(req, Renew):
            return Renewed(lease_id=req.lease_id, remaining=table.renew(req.lease_id, req.ttl))
        if isinstance(req, Free):
            table.free(req.lease_id)
            return Done(lease_id=req.lease_id)
        if isinstance(req, Revoke):
            table.revoke(req.lease_id)
            return Done(lease_id=req.lease_id)
        if isinstance(req, Status):
            state, gen, remaining = table.status(req.lease_id)
            return LeaseStatus(lease_id=req.lease_id, state=state, generation=gen, remaining=remaining)
        raise Corrupted(f"unexpected request {type(req).__name__}")  # pragma: no cover (union is closed)

    def _granted(self, lease: ServerLease) -> Granted:
        assert lease.span is not None
        return Granted(
            lease_id=lease.lease_id,
            generation=lease.generation,
            addr=lease.span.addr,
            rkey=lease.span.rkey,
            nbytes=lease.nbytes,
            ttl=lease.ttl,
            remaining=self.node.table.remaining(lease),
        )

    def _connect(self, req: Connect) -> Connected:
        v = self.node.verbs
        if v is None:
            raise Unsupported("this memory node has no RDMA device (lease service only)")
        with v.lock:
            if self.qp is not None:  # a reconnect after an error: the old QP is dead
                self.qp.close()
                self.qp = None
            qp = v.new_qp()
            try:
                qp.connect(Endpoint(qpn=req.qpn, psn=req.psn, lid=req.lid, gid=req.gid, mtu=req.mtu))
            except BaseException:
                qp.close()
                raise
            self.qp = qp
        me = qp.local()
        return Connected(qpn=me.qpn, psn=me.psn, lid=me.lid, gid=me.gid, mtu=me.mtu)

    def close(self) -> None:
        if self.qp is not None:
            self.qp.close()
            self.qp = None


# ---------------------------------------------------------------------------
# Client: control channel
# ---------------------------------------------------------------------------


class Control(Protocol):
    """What a :class:`RemoteLeaseCell` needs: request/reply calls to the lease's node."""

    def call(self, req: Request, expect: type[Any]) -> Any: ...
    def status(self, lease_id: str) -> LeaseStatus: ...


class ControlClient:
    """The client end of one node's control channel (thread-safe; one request at a time).

    A transport failure or a malformed reply leaves the byte stream out of
    step, so the client is then ``broken``: every later call raises
    :class:`Disconnected` (open a new client to go on).
    """

    def __init__(self, host: str, port: int, *, timeout: float = 10.0, client: str = "") -> None:
        self.host, self.port = host, port
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as ex:
            raise Disconnected(f"memory node {host}:{port} unreachable: {ex}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self.broken = False
        try:
            hello = self.call(Hello(version=PROTOCOL_VERSION, client=client), HelloOk)
        except BaseException:
            self.sock.close()
            raise
        if hello.version != PROTOCOL_VERSION:
            self.sock.close()
            raise VersionMismatch(f"node speaks control protocol {hello.version}, we speak {PROTOCOL_VERSION}")
        self.hello: HelloOk = hello

    def call(self, req: Request, expect: type[Any]) -> Any:
        """Send ``req``, return the reply; an :class:`ErrorReply` raises its typed error."""
        with self._lock:
            if self.broken:
                raise Disconnected(f"the control channel to {self.host}:{self.port} is broken")
            try:
                send_frame(self.sock, req)
                reply = decode_reply(read_frame(self.sock))
            except (Disconnected, Corrupted):
                self.broken = True
                raise
        if isinstance(reply, ErrorReply):
            raise_for_reply(reply)
        if not isinstance(reply, expect):
            raise Corrupted(f"expected {expect.__name__} for {type(req).__name__}, got {type(reply).__name__}")
        return reply

    def status(self, lease_id: str) -> LeaseStatus:
        reply: LeaseStatus = self.call(Status(lease_id=lease_id), LeaseStatus)
        return reply

    def close(self) -> None:
        self.broken = True
        self.sock.close()


class RemoteLeaseCell:
    """Lease state for a lease held on a memory node: a local cache, kept honest.

    The deadline is in the *client's* clock, computed from the moment the
    request was sent plus the remaining time the node reported, so it errs on
    the early side (fail closed). ``store_deadline_ns`` (what
    :meth:`Lease.renew` calls) renews on the node; ``store_state(REVOKED)``
    (what :meth:`Lease.revoke` calls) revokes on the node. :meth:`refresh` asks
    the node and updates the cache.
    """

    def __init__(self, control: Control, lease_id: str, deadline_ns: int, clock: Clock) -> None:
        self.control = control
        self.lease_id = lease_id
        self.clock = clock
        self._deadline = deadline_ns
        self._state = LeaseState.ACTIVE

    def load_state(self) -> int:
        return self._state

    def load_deadline_ns(self) -> int:
        return self._deadline

    def store_deadline_ns(self, deadline_ns: int) -> None:
        sent = self.clock.now_ns()
        ttl = max(1e-9, (deadline_ns - sent) / NS)
        try:
            reply: Renewed = self.control.call(Renew(lease_id=self.lease_id, ttl=ttl), Renewed)
        except Revoked:
            self._state = LeaseState.REVOKED
            raise
        except LeaseExpired:
            self._deadline = min(self._deadline, sent)
            raise
        self._deadline = sent + int(reply.remaining * NS)

    def store_state(self, state: int) -> None:
        if state == LeaseState.REVOKED:
            self.control.call(Revoke(lease_id=self.lease_id), Done)
        elif state == LeaseState.FREED:
            self.control.call(Free(lease_id=self.lease_id), Done)
        self._state = state

    def mark(self, state: str) -> None:
        """Record a state the node reported (``expired``/``freed``/``unknown`` end the lease locally)."""
        if state == REVOKED:
            self._state = LeaseState.REVOKED
        elif state in (FREED, UNKNOWN):
            self._state = LeaseState.FREED
        elif state == EXPIRED:
            self._deadline = min(self._deadline, self.clock.now_ns())

    def refresh(self) -> str:
        """Ask the node for the lease state; update the cache; return the state."""
        st = self.control.status(self.lease_id)
        self.mark(st.state)
        return st.state


# ---------------------------------------------------------------------------
# Client: data path
# ---------------------------------------------------------------------------


class LocalBuffer:
    """Local memory registered with the fabric's protection domain (zero-copy READ/WRITE target).

    ``view()`` is a writable memoryview and ``array(dtype)`` a numpy view of the
    same bytes; a ``read_into``/``write`` whose buffer lies inside a
    LocalBuffer moves the bytes directly, without a staging copy. Keep it open
    while views of it are in use; :meth:`close` deregisters and unmaps it.
    """

    def __init__(self, pd: Any, nbytes: int, access: int | None = None) -> None:
        from pyverbs.mr import MR

        self.mem = _PinnedMemory(nbytes)
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
        return self.addr <= addr and addr + length <= self.addr + self.mem.nbytes

    def close(self) -> None:
        if self.mr is not None:
            self.mr.close()
            self.mr = None
            self.mem.close()


def _buffer_address(mv: memoryview) -> int:
    """The address of a contiguous byte view (read-only views too)."""
    if not mv.nbytes:
        return 0
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)


def _byte_view(buf: Buffer, *, writable: bool) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError:
        raise FabricValueError(f"expected a bytes-like buffer, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise FabricValueError("the buffer must be C-contiguous")
    if writable and mv.readonly:
        raise FabricValueError("read_into needs a writable buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


class _NodeConnection:
    """Everything this client has towards one memory node: control channel, RC QP, staging MRs."""

    def __init__(self, fabric: VerbsFabric, host: str, port: int) -> None:
        self.fabric = fabric
        self.host, self.port = host, port
        self.control = ControlClient(host, port, timeout=fabric.timeout, client=fabric.client_name)
        self._ctl_lock = threading.RLock()
        self.qp: _RcQp | None = None
        self.staging: LocalBuffer | None = None
        self.scratch: LocalBuffer | None = None
        self.wrs = WrCache()
        self._wr_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._broken = False
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

    # -- control channel (reconnected when broken) ------------------------------
    def _control(self) -> ControlClient:
        with self._ctl_lock:
            if self.control.broken:
                self.control.close()
                self.control = ControlClient(
                    self.host, self.port, timeout=self.fabric.timeout, client=self.fabric.client_name
                )
                log.info("control channel to %s:%d reconnected", self.host, self.port)
                self._broken = True  # the node's end of our QP went with the old session
            return self.control

    def call(self, req: Request, expect: type[Any]) -> Any:
        """A control request to this node (reconnecting the channel first if it broke)."""
        return self._control().call(req, expect)

    def status(self, lease_id: str) -> LeaseStatus:
        reply: LeaseStatus = self.call(Status(lease_id=lease_id), LeaseStatus)
        return reply

    # -- connection ------------------------------------------------------------
    def _connect_qp(self) -> None:
        f = self.fabric
        qp = _RcQp(f.ctx, f.pd, f.ib_port, f.gid_index)
        try:
            me = qp.local()
            reply: Connected = self.call(
                Connect(qpn=me.qpn, psn=me.psn, lid=me.lid, gid=me.gid, mtu=me.mtu), Connected
            )
            qp.connect(Endpoint(qpn=reply.qpn, psn=reply.psn, lid=reply.lid, gid=reply.gid, mtu=reply.mtu))
        except BaseException:
            qp.close()
            raise
        self.qp = qp
        self._broken = False

    def _reset_qp(self) -> None:
        """After an error completion or timeout the QP is in ERR: rebuild it (children first)."""
        log.info("rebuilding the queue pair to %s:%d", self.host, self.port)
        self.wrs.close()
        if self.qp is not None:
            self.qp.close()
            self.qp = None
        try:
            self._connect_qp()
        except Disconnected:
            if not self.control.broken:
                raise
            self._connect_qp()  # the node may have restarted: one more try on a new control channel

    def _calibrate_atomics(self) -> None:
        attr = self.fabric.ctx.query_device()
        if int(attr.atomic_caps) == int(E.ATOMIC.IBV_ATOMIC_NONE):
            self.atomics = "the device reports no atomic support (IBV_ATOMIC_NONE)"
            return
        hello = self.control.hello
        try:
            old = self._atomic(build_faa_wr, "faa64", hello.probe_addr, hello.probe_rkey, None, 0, raw=True)
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

    # -- operations ------------------------------------------------------------
    def _ready(self) -> None:
        """Rebuild the QP if the last operation broke it. Call before taking WRs from the cache
        (the rebuild closes them)."""
        if self._broken or self.qp is None:
            self._reset_qp()

    def _execute(self, wr: Any, op: str, cell: RemoteLeaseCell | None) -> None:
        assert self.qp is not None and not self._broken
        wr_id = next(self._wr_ids)
        wr.wr_id = wr_id
        from pyverbs.pyverbs_error import PyverbsError

        try:
            self.qp.qp.post_send(wr)
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
            state_fn: Callable[[], str] = cell.refresh if cell is not None else (lambda: UNKNOWN)
            raise map_completion_error(
                int(wc.status), op, state_fn, lease_id=cell.lease_id if cell else "", vendor_err=int(wc.vendor_err)
            )

    def rdma(self, write: bool, remote_addr: int, rkey: int, mv: memoryview, cell: RemoteLeaseCell) -> None:
        """WRITE ``mv`` to / READ into ``mv`` from ``remote_addr``: direct if registered, else staged."""
        op = "write" if write else "read_into"
        build = build_rdma_write_wr if write else build_rdma_read_wr
        opcode = 0 if write else 4
        n = mv.nbytes
        if n == 0:
            return
        with self._lock:
            self._ready()
            addr = _buffer_address(mv)
            local = self.fabric._local_buffer_for(addr, n)
            if local is not None:
                self._rdma_chunk(build, opcode, op, addr, n, local.lkey, remote_addr, rkey, cell)
                return
            staging = self.staging
            assert staging is not None
            step = staging.nbytes
            with staging.view() as sview:  # released at once: a live export would block unmapping
                for pos in range(0, n, step):
                    k = min(step, n - pos)
                    if write:
                        sview[:k] = mv[pos : pos + k]
                    self._rdma_chunk(build, opcode, op, staging.addr, k, staging.lkey, remote_addr + pos, rkey, cell)
                    if not write:
                        mv[pos : pos + k] = sview[:k]

    def _rdma_chunk(
        self, build: Any, opcode: int, op: str, laddr: int, n: int, lkey: int, raddr: int, rkey: int,
        cell: RemoteLeaseCell,
    ) -> None:
        wr = self.wrs.get((opcode, laddr, n, lkey), lambda: build(0, laddr, n, lkey, raddr, rkey))
        wr.set_wr_rdma(rkey=rkey, addr=raddr)
        self._execute(wr, op, cell)

    def _atomic(
        self, build: Any, op: str, remote_addr: int, rkey: int, cell: RemoteLeaseCell | None, *operands: int,
        raw: bool = False,
    ) -> int:
        if self.atomics is not None and not raw:
            raise Unsupported(f"{op}: atomics unavailable towards {self.host}:{self.port}: {self.atomics}")
        with self._lock:
            self._ready()
            scratch = self.scratch
            assert scratch is not None
            _check_atomic_addr(remote_addr)
            cas = build is build_cas_wr
            key = (5 if cas else 6, scratch.addr, 8, scratch.lkey)
            wr = self.wrs.get(key, lambda: build(0, scratch.addr, scratch.lkey, remote_addr, rkey, *operands))
            compare_add, swap = (operands[0], operands[1]) if cas else (operands[0], 0)
            wr.set_wr_atomic(rkey=rkey, addr=remote_addr, compare_add=compare_add & U64, swap=swap & U64)
            self._execute(wr, op, cell)
            value = int(struct.unpack_from("<Q", scratch.mem.mm, 0)[0])
        if self.atomic_reply_swapped and not raw:
            value = int.from_bytes(value.to_bytes(8, "little"), "big")
        return value

    def close(self) -> None:
        """Children first: WRs, QP (then its CQ), staging MRs, control socket. Idempotent."""
        self.wrs.close()
        if self.qp is not None:
            self.qp.close()
            self.qp = None
        for name in ("staging", "scratch"):
            buf = getattr(self, name)
            if buf is not None:
                buf.close()
                setattr(self, name, None)
        self.control.close()


class VerbsRegion:
    """A leased region on a memory node, reached with one-sided verbs (never mapped here).

    Every operation checks the lease first (locally: the cached deadline errs
    early) and fails closed; the node enforces the lease too, by deregistering
    the region. Offsets are bytes from the start of the region.
    """

    mapped = False

    def __init__(
        self, conn: _NodeConnection, lease: Lease, cell: RemoteLeaseCell, addr: int, rkey: int, nbytes: int
    ) -> None:
        self.conn = conn
        self.lease = lease
        self.cell = cell
        self.remote_addr = addr
        self.rkey = rkey
        self.nbytes = nbytes
        self._closed = False

    def ref(self) -> RegionRef:
        return RegionRef(
            driver="verbs",
            name=self.lease.id,
            nbytes=self.nbytes,
            lease_id=self.lease.id,
            generation=self.lease.generation,
            host=self.conn.host,
            port=self.conn.port,
            addr=self.remote_addr,
            rkey=self.rkey,
        )

    def address(self) -> int:
        raise Unsupported("a verbs region is not mapped into this process; use the one-sided operations")

    def view(self) -> memoryview:
        raise Unsupported("a verbs region is not mapped into this process; use the one-sided operations")

    def _check(self, offset: int, length: int) -> None:
        """Closed -> ``QueueClosed``; lease -> ``LeaseExpired``/``Revoked``; range -> ``CapacityExceeded``."""
        if self._closed:
            raise QueueClosed(f"region {self.lease.id} is closed")
        self.lease.check()
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise CapacityExceeded(f"[{offset}, {offset + length}) is outside the region's {self.nbytes} bytes")

    def _check_word(self, offset: int) -> None:
        if offset % 8:
            raise FabricValueError(f"64-bit operations need an 8-byte aligned offset, got {offset}")
        self._check(offset, 8)

    def read_into(self, offset: int, buf: Buffer) -> None:
        mv = _byte_view(buf, writable=True)
        self._check(offset, mv.nbytes)
        self.conn.rdma(False, self.remote_addr + offset, self.rkey, mv, self.cell)
        self.lease.check()  # fail closed: bytes read across an expiry are not returned

    def write(self, offset: int, buf: Buffer) -> None:
        mv = _byte_view(buf, writable=False)
        self._check(offset, mv.nbytes)
        self.conn.rdma(True, self.remote_addr + offset, self.rkey, mv, self.cell)

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        """Compare-and-swap the 64-bit word at ``offset``; returns the old value (unsigned)."""
        self._check_word(offset)
        return self.conn._atomic(build_cas_wr, "cas64", self.remote_addr + offset, self.rkey, self.cell,
                                 expected, desired)

    def faa64(self, offset: int, add: int) -> int:
        """Fetch-and-add on the 64-bit word at ``offset`` (wraps mod 2**64); returns the old value."""
        self._check_word(offset)
        return self.conn._atomic(build_faa_wr, "faa64", self.remote_addr + offset, self.rkey, self.cell, add)

    def load64(self, offset: int) -> int:
        """Read the little-endian word at ``offset`` (acquire: it completes before anything later is posted)."""
        self._check_word(offset)
        out = bytearray(8)
        self.conn.rdma(False, self.remote_addr + offset, self.rkey, memoryview(out), self.cell)
        self.lease.check()
        return int.from_bytes(out, "little")

    def store64(self, offset: int, value: int) -> None:
        """Write the little-endian word at ``offset`` (release: everything earlier has completed)."""
        self._check_word(offset)
        data = (value & U64).to_bytes(8, "little")
        self.conn.rdma(True, self.remote_addr + offset, self.rkey, memoryview(data), self.cell)

    def flush(self) -> None:
        """Every operation has already completed when it returned; this only checks the lease."""
        self.lease.check()

    def close(self) -> None:
        """Detach (the lease stays until freed or expired); later calls raise ``QueueClosed``. Idempotent."""
        self._closed = True


def parse_rdma_url(url: str) -> tuple[str, int, dict[str, str]]:
    """``rdma://HOST:PORT[?device=mlx5_0&ib_port=1&gid_index=0&timeout=10&staging=BYTES]`` -> (host, port, options).

    ``verbs://`` is accepted as a synonym; the port defaults to :data:`DEFAULT_PORT`.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("rdma", "verbs"):
        raise FabricValueError(f"not an rdma:// URL: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise FabricValueError(f"bad port in {url!r}") from None
    host = parts.hostname or ""
    if not host:
        raise FabricValueError(f"no host in {url!r}")
    known = {"device", "ib_port", "gid_index", "timeout", "staging"}
    opts: dict[str, str] = {}
    for key, values in parse_qs(parts.query, keep_blank_values=False, strict_parsing=False).items():
        if key not in known:
            raise FabricValueError(f"unknown option {key!r} in {url!r} (known: {', '.join(sorted(known))})")
        opts[key] = values[-1]
    return host, port or DEFAULT_PORT, opts


class VerbsFabric:
    """A client of memory nodes: alloc/attach/free leased regions reached with one-sided verbs.

    One device context and protection domain per fabric; one RC QP (and
    control channel) per memory node it talks to, opened on first use. The
    node named in the URL is the one :meth:`alloc` uses.
    """

    driver = "verbs"
    mapped_regions = False  # regions live on the memory node: one-sided access only

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        device: str | None = None,
        ib_port: int = 1,
        gid_index: int = 0,
        timeout: float = DEFAULT_OP_TIMEOUT,
        staging_bytes: int = DEFAULT_STAGING,
        clock: Clock | None = None,
    ) -> None:
        from pyverbs.pd import PD

        _check_little_endian()
        self.url = f"rdma://{host}:{port}"
        self.host, self.port = host, port
        self.clock: Clock = clock or MonotonicClock()
        self.ib_port = ib_port
        self.gid_index = gid_index
        self.timeout = timeout
        self.staging_bytes = staging_bytes
        self.client_name = f"{socket.gethostname()}:{id(self):x}"
        self._lock = threading.RLock()
        self._nodes: dict[tuple[str, int], _NodeConnection] = {}
        self._regions: list[VerbsRegion] = []
        self._locals: list[LocalBuffer] = []
        self._cells: dict[tuple[str, int, str], RemoteLeaseCell] = {}
        self._closed = False
        self.ctx, self.device = _open_device(device)
        try:
            self.pd: Any = PD(self.ctx)
            self._node(host, port)  # fail fast when the node is unreachable
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_url(cls, url: str, clock: Clock | None = None) -> VerbsFabric:
        """Open ``rdma://HOST:PORT``; :class:`Unsupported` ("no RDMA device: ...") where there is none."""
        host, port, opts = parse_rdma_url(url)
        reason = probe(opts.get("device"))
        if reason is not None:
            raise Unsupported(f"no RDMA device: {reason}")
        try:
            return cls(
                host,
                port,
                device=opts.get("device"),
                ib_port=int(opts.get("ib_port", 1)),
                gid_index=int(opts.get("gid_index", 0)),
                timeout=float(opts.get("timeout", DEFAULT_OP_TIMEOUT)),
                staging_bytes=int(opts.get("staging", DEFAULT_STAGING)),
                clock=clock,
            )
        except ValueError as ex:
            if isinstance(ex, FabricValueError):
                raise
            raise FabricValueError(f"bad option in {url!r}: {ex}") from None

    # -- nodes -----------------------------------------------------------------
    def _node(self, host: str, port: int) -> _NodeConnection:
        with self._lock:
            if self._closed:
                raise Disconnected("the fabric is closed")
            conn = self._nodes.get((host, port))
            if conn is None:
                conn = _NodeConnection(self, host, port)
                self._nodes[(host, port)] = conn
            return conn

    def _region(self, conn: _NodeConnection, g: Granted, sent_ns: int) -> VerbsRegion:
        key = (conn.host, conn.port, g.lease_id)
        cell = self._cells.get(key)
        deadline = sent_ns + int(g.remaining * NS)
        if cell is None:
            cell = RemoteLeaseCell(conn, g.lease_id, deadline, self.clock)
            self._cells[key] = cell
        else:
            cell.mark(ACTIVE)
            cell._deadline = deadline
        lease = Lease(
            g.lease_id,
            ttl=g.ttl,
            generation=g.generation,
            cell=cell,
            clock=self.clock,
            resource=f"rdma://{conn.host}:{conn.port}/{g.lease_id}",
            on_free=self._release,
        )
        region = VerbsRegion(conn, lease, cell, g.addr, g.rkey, g.nbytes)
        with self._lock:
            self._regions.append(region)
        return region

    # -- the driver protocol -----------------------------------------------------
    def alloc(self, nbytes: int, ttl: float) -> VerbsRegion:
        """Lease ``nbytes`` on the URL's node for ``ttl`` seconds."""
        ttl = check_ttl(ttl)
        if not isinstance(nbytes, int) or not 0 < nbytes <= MAX_REGION:
            raise FabricValueError(f"nbytes must be an int in (0, {MAX_REGION}], got {nbytes!r}")
        conn = self._node(self.host, self.port)
        sent = self.clock.now_ns()
        g: Granted = conn.call(Alloc(nbytes=nbytes, ttl=ttl), Granted)
        return self._region(conn, g, sent)

    def attach(self, ref: RegionRef, *, mapped: bool = True) -> VerbsRegion:
        """Attach to a region by its :class:`RegionRef` (possibly on another node).

        ``mapped`` is a preference: verbs regions are never mapped into the
        client, so the region returned always has ``mapped = False``.
        """
        if ref.driver != "verbs":
            raise FabricValueError(f"a {ref.driver!r} region cannot be attached by the verbs driver")
        conn = self._node(ref.host or self.host, ref.port or self.port)
        sent = self.clock.now_ns()
        g: Granted = conn.call(Attach(lease_id=ref.lease_id, generation=ref.generation), Granted)
        return self._region(conn, g, sent)

    def free(self, lease: Lease) -> None:
        """Give the lease back to its node (idempotent)."""
        lease.free()

    def _release(self, lease: Lease) -> None:
        """``Lease.free`` lands here: free on the node; the regions keep failing closed (``LeaseExpired``)."""
        cell = lease._cell
        if isinstance(cell, RemoteLeaseCell) and cell.load_state() == LeaseState.ACTIVE:
            cell.store_state(LeaseState.FREED)
        with self._lock:
            self._regions = [r for r in self._regions if r.lease.id != lease.id]

    def reap(self) -> int:
        """Forget this client's regions whose leases are no longer live; returns how many.

        The memory itself is reclaimed by the node (its reaper deregisters and
        frees expired leases); forgotten regions keep failing closed.
        """
        with self._lock:
            dead = [r for r in self._regions if not r.lease.live]
            self._regions = [r for r in self._regions if r.lease.live]
        return len(dead)

    def register(self, nbytes: int) -> LocalBuffer:
        """Allocate and register ``nbytes`` of local memory (a zero-copy READ/WRITE buffer)."""
        buf = LocalBuffer(self.pd, nbytes)
        with self._lock:
            self._locals.append(buf)
        return buf

    def _local_buffer_for(self, addr: int, length: int) -> LocalBuffer | None:
        for buf in self._locals:
            if buf.mr is not None and buf.contains(addr, length):
                return buf
        return None

    def lease_status(self, lease: Lease) -> str:
        """Ask the lease's node for its state (``active``, ``expired``, ``revoked``, ``freed``, ``unknown``)."""
        with self._lock:
            regions = [r for r in self._regions if r.lease.id == lease.id]
        if not regions:
            raise FabricValueError(f"lease {lease.id} is not held through this fabric")
        return regions[0].cell.refresh()

    def atomics_unavailable(self) -> str | None:
        """Why atomics are unavailable towards the URL's node, or ``None`` when they work."""
        return self._node(self.host, self.port).atomics

    def close(self) -> None:
        """Close everything children-first: regions, node connections, local MRs, PD, context."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            regions, self._regions = self._regions, []
            nodes, self._nodes = list(self._nodes.values()), {}
            locals_, self._locals = self._locals, []
        for r in regions:
            r.close()
        for conn in nodes:
            conn.close()
        for buf in locals_:
            buf.close()
        pd = getattr(self, "pd", None)
        if pd is not None:
            pd.close()
        self.ctx.close()

    def __enter__(self) -> VerbsFabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
