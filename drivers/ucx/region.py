"""A leased region on a UCX memory node: :class:`UcxRegion`, the driver protocol as one-sided UCX
operations, and :class:`UcxMappedRegion`, a span of a ``local_map`` node mapped on the node's host."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from grafos_fabric._ffi import ffi as gffi
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
)
from grafos_fabric.lease import Lease

from ..base import Buffer, RegionRef, byte_view
from ..node.registrar import Grant
from ..node.shmfile import LocalSpanOps
from .binding import LEASE_TRAILER, PAGE, U64, Rkey, UcxEndpoint, ffi, lib

if TYPE_CHECKING:
    from .client import UcxConnector

__all__ = ["UcxMappedRegion", "UcxRegion"]

_OUT = threading.local()


def _u64_out() -> Any:
    """This thread's ``uint64_t`` result cell for cas64/faa64/load64 (``_OUT.u64``: no allocation per
    operation; the operations read ``_OUT.u64`` and call this only the first time on a thread).

    Per thread, because operations of one region may run on several threads
    at once; a thread runs one operation at a time (nothing calls back into
    Python while the C call runs), and each reads its result right after."""
    cell = ffi.new("uint64_t *")
    _OUT.u64 = cell
    return cell


def _cell(name: str, ctype: str, n: int | None = None) -> Any:
    """This thread's cell ``_OUT.<name>`` of C type ``ctype`` (``n`` items of it), made on first use,
    as :func:`_u64_out`: publish's results (``pair``: the tail word found, the head read), its
    publication slot (``slot``) and its span triples (``spans``)."""
    cell = getattr(_OUT, name, None)
    if cell is None:
        cell = ffi.new(ctype) if n is None else ffi.new(ctype, n)
        setattr(_OUT, name, cell)
    return cell


class UcxRegion:
    """A leased region on a UCX memory node, reached one-sided (never mapped here).

    Every operation checks the lease first (fail closed), then the range and
    alignment, then runs as one C call with a deadline of ``timeout`` seconds.
    """

    mapped = False

    def __init__(self, connector: UcxConnector, lease: Lease, grant: Grant) -> None:
        access = grant.access
        addr, rkey = access.get("addr"), access.get("rkey")
        if not isinstance(addr, int) or not 0 <= addr <= U64 or not isinstance(rkey, str):
            raise FabricValueError("a UCX grant needs access {'addr': int, 'rkey': hex}")
        try:
            self._packed = bytes.fromhex(rkey)
        except ValueError:
            raise FabricValueError("the grant's rkey is not hex") from None
        if not 0 < len(self._packed) <= 4096 or addr + grant.nbytes > U64:
            raise FabricValueError("the grant's rkey or address range is out of bounds")
        self.connector = connector
        self.lease = lease
        self.grant = grant
        self.nbytes = grant.nbytes
        self.writable = grant.writable
        self.remote_addr = addr
        self.timeout = connector.timeout
        self._rkey: Rkey | None = None
        self._rkey_gen = -1
        # (endpoint, rkey, their C handles): what _prep hands each operation
        self._h: tuple[UcxEndpoint, Rkey, Any, Any] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._dead: FabricError | None = None  # the node said the lease is revoked/gone: terminal
        # the node instance that granted the lease (NodeChannel.node, its tag): a restarted node on the same
        # address never held it, and over tcp/sm it would serve the stale address blindly (even crash on it)
        self._node = getattr(connector.link, "node", None)
        # The endpoint generation this lease was last known live on. A fence destroys the node-side
        # worker of every session that held the lease, but the client then reconnects (for its other
        # leases) and over tcp/sm an rkey is not enforced: on any endpoint newer than this one the
        # region asks the node for the lease state before its first operation (fail closed).
        ep = connector._ep
        self._live_gen = connector.generation if ep is not None and not ep.failed else -1

    # -- plumbing --------------------------------------------------------------
    def _handles(self) -> tuple[UcxEndpoint, Rkey, Any, Any]:
        h = self._h
        conn = self.connector
        if h is not None and conn._ep is h[0] and not conn._closed:
            return h  # fast path: the connector still uses the endpoint this rkey was unpacked on
        ep, gen = conn.endpoint()
        node = getattr(conn.link, "node", None)
        if self._node is not None and node != self._node:
            self._dead = LeaseExpired(f"lease {self.lease.id}: memory node {conn.link.host}:{conn.link.port} "
                                      f"restarted ({self._node} -> {node}); its leases are gone")
            fabric = conn.fabric
            cell = fabric.cell(self.lease.id) if fabric is not None and hasattr(fabric, "cell") else None
            if cell is not None:
                cell.mark("expired")
            raise self._dead
        if gen != self._live_gen:
            self._confirm_live(gen)
        with self._lock:
            if self._rkey is None or self._rkey_gen != gen:
                if self._rkey is not None:
                    self._rkey.close()
                    self._rkey = None
                self._rkey = Rkey(ep, self._packed)
                self._rkey_gen = gen
            self._h = (ep, self._rkey, ep.ptr, self._rkey.ptr)
            return self._h

    def _confirm_live(self, gen: int) -> None:
        """Before the first operation on endpoint generation ``gen``: the node must say ``active``."""
        state = self.connector.link.lease_state(self.lease.id)
        if state != "active":
            fabric = self.connector.fabric
            cell = fabric.cell(self.lease.id) if fabric is not None and hasattr(fabric, "cell") else None
            if cell is not None:
                cell.mark(state)
            what = f"lease {self.lease.id} on {self.connector.link.host}:{self.connector.link.port}"
            self._dead = (Revoked(f"{what} was revoked") if state == "revoked"
                          else LeaseExpired(f"{what} is {state}"))
            raise type(self._dead)(str(self._dead))
        self._live_gen = gen

    def _prep(self, offset: int, length: int, write: bool, word: bool = False) -> tuple[UcxEndpoint, Rkey, Any, Any]:
        """Every check an operation makes before it runs, then its endpoint and rkey (and their C handles).

        In order: alignment (``word``: a 64-bit operation), closed, the lease
        (revoked, expired: fail closed), what the node said (terminal), write
        rights, the range. The handles come from the fast path while the
        connector still uses the endpoint this rkey was unpacked on, else from
        :meth:`_handles` (reconnect, node restart and ``_confirm_live``
        checks). One Python call on the per-operation path."""
        if word and isinstance(offset, int) and offset & 7:
            raise FabricValueError(f"64-bit operations need an 8-byte aligned offset, got {offset}")
        if self._closed:
            raise QueueClosed(f"region {self.lease.id} is closed")
        self.lease.check()
        dead = self._dead
        if dead is not None:
            raise type(dead)(str(dead))
        if write and not self.writable:
            raise Revoked(f"lease {self.lease.id} was granted read-only")
        if not isinstance(offset, int) or offset < 0 or length < 0 or offset + length > self.nbytes:
            raise CapacityExceeded(f"[{offset}, {offset + length}) is outside the region's {self.nbytes} bytes")
        h = self._h
        conn = self.connector
        if h is not None and conn._ep is h[0] and not conn._closed:
            return h
        return self._handles()

    def _failure(self, rc: int, op: str, ep: UcxEndpoint) -> FabricError:
        """The typed error of a failed operation (the endpoint is already force-closed).

        A missed deadline means the node does not answer (stopped, link down,
        overloaded): :class:`Disconnected` at once, without a control call that
        would wait for the same silent node. An endpoint error is asked about:
        the node answers ``revoked``/gone when it fenced this client."""
        why = ep.error or "endpoint failed"
        self.connector.invalidate(ep)
        if rc == lib.GFU_TIMEOUT:
            return Disconnected(f"{op} on lease {self.lease.id}: no answer within {self.timeout:.3f}s ({why})")
        what = f"{op} on lease {self.lease.id} failed: {why}"
        try:
            state = self.connector.link.lease_state(self.lease.id)
        except FabricError as ex:
            return Disconnected(f"{what}; the node could not be asked for the lease state: {ex}")
        fabric = self.connector.fabric
        cell = fabric.cell(self.lease.id) if fabric is not None and hasattr(fabric, "cell") else None
        if cell is not None:
            cell.mark(state)
        if state == "revoked":
            self._dead = Revoked(f"{what}: the lease was revoked")
            return self._dead
        if state in ("expired", "freed", "unknown"):
            self._dead = LeaseExpired(f"{what}: the lease is {state}")
            return self._dead
        err = Disconnected(f"{what}; the lease is {state}: the next operation reconnects")
        err.lease_live = state == "active"
        return err

    # -- the driver protocol ---------------------------------------------------
    def ref(self) -> RegionRef:
        fabric = self.connector.fabric
        if fabric is not None:
            ref: RegionRef = fabric.region_ref(self.lease, self.nbytes)
            return ref
        link = self.connector.link
        return RegionRef(driver="ucx", name=self.lease.id, nbytes=self.nbytes, lease_id=self.lease.id,
                         generation=self.lease.generation, host=link.host, port=link.port)

    def address(self) -> int:
        raise Unsupported("a UCX region is not mapped into this process; use the one-sided operations")

    def view(self) -> memoryview:
        raise Unsupported("a UCX region is not mapped into this process; use the one-sided operations")

    def read_into(self, offset: int, buf: Buffer) -> None:
        ptr: Any
        if type(buf) is bytearray:  # no memoryview on the common path: cffi takes a bytearray as is
            n, ptr = len(buf), buf
        else:
            mv = byte_view(buf, writable=True)
            n, ptr = mv.nbytes, mv
        ep, _, e, k = self._prep(offset, n, False)
        if n:
            rc = lib.gfu_get(e, k, ffi.from_buffer(ptr), n, self.remote_addr + offset, self.timeout)
            if rc:
                raise self._failure(rc, "read_into", ep)
        self.lease.check()  # fail closed: bytes read across an expiry are not returned

    def write(self, offset: int, buf: Buffer) -> None:
        """Put ``buf`` at ``offset``: complete locally on return, remotely visible after :meth:`flush`.

        The bytes go straight from ``buf`` (no copy here; UCX sends from it
        zero-copy or copies it out, and is done with it when this returns)."""
        mv: memoryview | None = None
        if type(buf) is bytes:  # cffi passes bytes to a const char * as is
            n = len(buf)
        else:
            mv = byte_view(buf, writable=False)
            n = mv.nbytes
        ep, _, e, k = self._prep(offset, n, True)
        if n:
            # The cffi view of mv lives only for the call (an argument, never a local): a raise from this
            # frame (here or in _prep) keeps the frame alive in the traceback, and when the GC clears a
            # reference cycle through it (an exception kept by a frame of its own traceback) it may clear
            # the memoryview while a cffi view still exports it; CPython 3.11 then leaves the memoryview
            # without its buffer and the export's release later dereferences NULL (a stage crashed so,
            # SIGSEGV in memory_dealloc, after a node's kill -9 under UCX 1.22). read_into does the same.
            rc = lib.gfu_put(e, k, buf if mv is None else ffi.from_buffer(mv), n, self.remote_addr + offset, 0,
                             self.timeout)
            if rc:
                raise self._failure(rc, "write", ep)

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        """Compare-and-swap the 64-bit word at ``offset``; returns the old value (unsigned)."""
        ep, _, e, k = self._prep(offset, 8, True, True)
        try:
            old = _OUT.u64
        except AttributeError:
            old = _u64_out()
        rc = lib.gfu_cas64(e, k, self.remote_addr + offset, expected & U64, desired & U64, old,
                           self.timeout)
        if rc:
            raise self._failure(rc, "cas64", ep)
        return old[0]

    def faa64(self, offset: int, add: int) -> int:
        """Fetch-and-add on the 64-bit word at ``offset`` (wraps mod 2**64); returns the old value."""
        ep, _, e, k = self._prep(offset, 8, True, True)
        try:
            old = _OUT.u64
        except AttributeError:
            old = _u64_out()
        rc = lib.gfu_faa64(e, k, self.remote_addr + offset, add & U64, old, self.timeout)
        if rc:
            raise self._failure(rc, "faa64", ep)
        return old[0]

    def load64(self, offset: int) -> int:
        """Read the little-endian word at ``offset`` (acquire: completes with the data)."""
        ep, _, e, k = self._prep(offset, 8, False, True)
        try:
            out = _OUT.u64
        except AttributeError:
            out = _u64_out()
        rc = lib.gfu_load64(e, k, self.remote_addr + offset, out, self.timeout)
        if rc:
            raise self._failure(rc, "load64", ep)
        self.lease.check()
        return out[0]

    def store64(self, offset: int, value: int) -> None:
        """Write the little-endian word at ``offset`` (release: put + flush, so everything earlier is visible)."""
        ep, _, e, k = self._prep(offset, 8, True, True)
        rc = lib.gfu_store64(e, k, self.remote_addr + offset, value & U64, self.timeout)
        if rc:
            raise self._failure(rc, "store64", ep)

    #: how :meth:`publish` orders the records and the sequence word before the tail CAS:
    #: 0 by ``ucp_worker_fence`` (no wait for remote completion before the CAS is posted),
    #: 1 by a flush waited for first (as ``store64`` + ``cas64``). Class-wide; tests set it.
    publish_order = 0

    def publish(self, spans: Sequence[tuple[int, int, int]], seq_off: int, seq: int, tail_off: int,
                expected: int, desired: int, head_off: int = -1) -> tuple[int, int]:
        """The one-sided producer's publication in one call (see ``gfu_publish``): put each span
        ``(address, length, offset)`` (``length`` bytes of local memory at ``address`` to ``offset``
        in the region), put the word ``seq`` at ``seq_off``, then compare-and-swap the word at
        ``tail_off`` (``expected`` -> ``desired``), ordered after them at the node. Returns the
        tail word found and, with ``head_off``, the word there read after the CAS was posted (the
        consumer's position, for the producer's head cache; -1 without).

        The addresses are of local memory the caller keeps alive and unchanged for the call (the
        producer's staging image, the items it pushes). The same checks as the separate
        operations, for every range; at most ``GFU_PUBLISH_SPANS`` spans."""
        ep, e, k, arr, n = self._publish_args(spans, seq_off, tail_off, head_off)
        out = _cell("pair", "uint64_t[2]")
        a = self.remote_addr
        rc = lib.gfu_publish(e, k, arr, n, a + seq_off, seq & U64, a + tail_off, expected & U64, desired & U64,
                             a + max(head_off, 0), head_off >= 0, out, out + 1, self.publish_order, self.timeout)
        if rc:
            raise self._failure(rc, "publish", ep)
        return out[0], (out[1] if head_off >= 0 else -1)

    def publish_post(self, spans: Sequence[tuple[int, int, int]], seq_off: int, seq: int, tail_off: int,
                     expected: int, desired: int, head_off: int = -1) -> tuple[UcxEndpoint, int, bool]:
        """:meth:`publish` without waiting for the CAS (write-behind): returns once the spans' puts
        completed locally (their memory may be reused), with the sequence word's put and the CAS
        in flight; :meth:`publish_wait` with the token returned gives the tail word the CAS found
        (and the head word, as :meth:`publish`).
        At most ``GFU_PUB_SLOTS`` in flight per endpoint (``FabricValueError`` past that)."""
        ep, e, k, arr, n = self._publish_args(spans, seq_off, tail_off, head_off)
        slot = _cell("slot", "int *")
        a = self.remote_addr
        rc = lib.gfu_publish_post(e, k, arr, n, a + seq_off, seq & U64, a + tail_off, expected & U64,
                                  desired & U64, a + max(head_off, 0), head_off >= 0, self.publish_order,
                                  self.timeout, slot)
        if rc == lib.GFU_ERROR and not ep.failed:
            raise FabricValueError(f"{lib.GFU_PUB_SLOTS} publications already in flight on this endpoint")
        if rc:
            raise self._failure(rc, "publish", ep)
        return ep, int(slot[0]), head_off >= 0

    def publish_wait(self, token: tuple[UcxEndpoint, int, bool]) -> tuple[int, int]:
        """Wait for a publication :meth:`publish_post` left in flight: the tail word its CAS found,
        and the head word read (-1 where none was asked for). Each token is waited for once."""
        ep, slot, want_head = token
        out = _cell("pair", "uint64_t[2]")
        try:
            e = ep.ptr
        except Disconnected:
            raise Disconnected(f"publish on lease {self.lease.id}: the endpoint closed with it in flight") from None
        rc = lib.gfu_publish_wait(e, slot, out, out + 1, self.timeout)
        if rc:
            raise self._failure(rc, "publish", ep)
        return out[0], (out[1] if want_head else -1)

    def _publish_args(self, spans: Sequence[tuple[int, int, int]], seq_off: int, tail_off: int,
                      head_off: int = -1) -> tuple[UcxEndpoint, Any, Any, Any, int]:
        """Every check of a publication, and its spans in this thread's span array."""
        ep, _, e, k = self._prep(tail_off, 8, True, True)  # every check, once; then the other ranges
        size = self.nbytes
        words = (seq_off, head_off) if head_off != -1 else (seq_off,)
        for word in words:
            if not isinstance(word, int) or word & 7:
                raise FabricValueError(f"64-bit operations need an 8-byte aligned offset, got {word}")
        n = len(spans)
        if n > lib.GFU_PUBLISH_SPANS:
            raise FabricValueError(f"{n} spans in one publish: at most {lib.GFU_PUBLISH_SPANS}")
        arr = _cell("spans", "uint64_t[]", 3 * lib.GFU_PUBLISH_SPANS)
        a = self.remote_addr
        i = 0
        for addr, length, off in (*spans, *((0, 8, w) for w in words)):
            if not isinstance(off, int) or off < 0 or length < 0 or off + length > size:
                raise CapacityExceeded(f"[{off}, {off + length}) is outside the region's {size} bytes")
            if i < 3 * n:
                arr[i], arr[i + 1], arr[i + 2] = addr, length, a + off
                i += 3
        return ep, e, k, arr, n

    def flush(self) -> None:
        """Wait until every put is remotely visible."""
        ep, _, e, _ = self._prep(0, 0, False)
        rc = lib.gfu_flush(e, self.timeout)
        if rc:
            raise self._failure(rc, "flush", ep)

    def bench(self, op: str, nbytes: int, iters: int) -> list[float]:
        """Per-operation latencies (µs) of a tight C loop of ``op`` (put, put_flush, get, cas, faa) on word 0."""
        ops = {"put": 0, "put_flush": 1, "get": 2, "cas": 3, "faa": 4}
        ep, _, e, k = self._prep(0, nbytes, op != "get")
        buf = bytearray(max(8, nbytes))
        lat = ffi.new("double[]", iters)
        rc = lib.gfu_bench(e, k, ops[op], ffi.from_buffer(buf), nbytes, self.remote_addr, iters, lat)
        if rc:
            raise self._failure(rc, f"bench {op}", ep)
        return list(lat)

    def close(self) -> None:
        """Detach (the lease stays until freed or expired); later calls raise ``QueueClosed``. Idempotent."""
        self._closed = True
        with self._lock:
            rk, self._rkey, self._h = self._rkey, None, None
        if rk is not None:
            rk.close()


class UcxMappedRegion(LocalSpanOps):
    """A span of a ``local_map`` UCX node, mapped into this process on the node's own host.

    The node backs the span with an owner-only file under /dev/shm and maps it
    over the span's range of its pool, so remote clients' UCX operations (the
    node's progress thread) and this process's CPU loads and stores reach the
    same pages. The region implements :class:`~grafos_fabric.drivers.base.MappedRegion`:
    the native ring runs on the mapping (zero copy, no UCX call per item), and
    the one-sided operations are done locally (CPU atomics, which are atomic
    against the node's: over tcp/sm it executes remote atomics with
    lock-prefixed instructions).

    Lease state: the native ring reads two u64 words (state, deadline) in the
    span file's last page (past the span: no remote client reaches it). The
    node sets the state word when it fences the span (revoke, free, expiry:
    before it unlinks the file), so the next native push or pop of every local
    holder fails closed at once; the fabric's
    :class:`~grafos_fabric.drivers.node.client.RemoteLeaseCell` writes the
    deadline as it renews (``CLOCK_MONOTONIC``, one clock on one host), so
    expiry fails closed with no call into Python, and asks the node which
    state a fenced lease is in (``Revoked`` or ``LeaseExpired``). Also, as in
    ``nodeshm``: :meth:`check_size` (the queue calls it before every blocking
    wait) and every one-sided operation check the file's link count (one
    ``fstat``), and poll the node's control connection: a node that died is
    :class:`Disconnected` (:class:`LeaseExpired` once a restarted node does not
    know the lease). A stale mapping only ever reaches its own orphaned pages:
    the node maps fresh memory over the range when it fences, so nothing
    written here after a fence lands in the next tenant's span.
    """

    mapped = True

    def __init__(self, connector: UcxConnector, lease: Lease, grant: Grant, fd: int, cell: Any) -> None:
        import mmap
        import os

        self.connector = connector
        self.lease = lease
        self.grant = grant
        self.nbytes = grant.nbytes
        self.writable = True  # only writable grants are mapped (the native ring writes head and tail)
        self._fd = fd
        # the span as the node registered it (whole pages), then the page of lease words
        span = (self.nbytes + PAGE - 1) // PAGE * PAGE
        self._size = span + LEASE_TRAILER
        try:
            st = os.fstat(fd)
            if st.st_size != self._size:
                raise Corrupted(f"span file of lease {lease.id} is {st.st_size} bytes, not the grant's "
                                f"{self.nbytes} in whole pages and a {LEASE_TRAILER}-byte trailer")
            self._mm = mmap.mmap(fd, self._size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._keep = gffi.from_buffer(self._mm)  # keeps the mapping exported while this region lives
        self._base = gffi.cast("uint8_t *", self._keep)
        self._words = gffi.cast("uint64_t *", self._base + span)
        self._cell = cell
        cell.bind_shared(self._words, self._keep)
        self._fenced: Exception | None = None
        self.closed = False

    # -- identity ---------------------------------------------------------------
    def ref(self) -> RegionRef:
        ref: RegionRef = self.connector.fabric.region_ref(self.lease, self.nbytes)
        return ref

    # -- the mapping (MappedRegion) ------------------------------------------------
    def payload_pointer(self) -> Any:
        return self._base

    def lease_pointers(self) -> tuple[Any, Any]:
        """cdata pointers to the lease's state and deadline words (the span file's trailer: the node marks
        the state when it fences, the lease cells of this host's holders keep both in step)."""
        return (self._words, self._words + 1)

    def address(self) -> int:
        return int(gffi.cast("uintptr_t", self._base))

    def view(self) -> memoryview:
        self._live()
        return memoryview(self._mm)[: self.nbytes]

    # -- checks ---------------------------------------------------------------------
    def check_size(self) -> None:
        """The checks a mapped holder makes between items (the queue calls this before each
        blocking wait): the span file was not shrunk (``Corrupted``), not fenced (its link count:
        ``Revoked``/``LeaseExpired`` as the node reports the lease), and the node's control
        connection is not gone (``Disconnected`` while the node is unreachable, ``LeaseExpired``
        when a restarted node does not know the lease). A few microseconds; a no-op once closed."""
        if self.closed:
            return
        self._check_file()
        self._check_node()

    def _check_file(self) -> None:
        import os

        if self._fenced is not None:
            raise type(self._fenced)(str(self._fenced))
        st = os.fstat(self._fd)
        if st.st_nlink == 0:
            self._fenced = self._ask("its span was fenced (the node unlinked its file)")
            raise type(self._fenced)(str(self._fenced))
        if st.st_size < self._size:
            self._fenced = Corrupted(f"the span file of lease {self.lease.id} was truncated under its mapping")
            raise self._fenced

    def _check_node(self) -> None:
        """Poll the control connection (no wait): a hang-up means an idle timeout or a dead node; ask it."""
        import select
        import socket

        link = self.connector.link
        sock = getattr(getattr(link, "control", None), "sock", None)
        if sock is None:
            return  # a link without a control socket of its own (test harnesses)
        fd = sock.fileno()
        if fd >= 0:
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(0):
                return  # connected, nothing to read: the node is there
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return  # a reply on its way to another thread's request
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
        # the connection ended (the node hung up an idle channel, or died): ask it on a new one
        try:
            state = link.lease_state(self.lease.id)
        except FabricError as ex:
            raise Disconnected(f"lease {self.lease.id}: the memory node {link.host}:{link.port} is unreachable "
                               f"({ex}); the mapping stays readable, the lease cannot be confirmed") from None
        if state != "active":
            self._fenced = self._verdict(state, "the node reports it")
            raise type(self._fenced)(str(self._fenced))

    def _ask(self, why: str) -> FabricError:
        try:
            state = self.connector.link.lease_state(self.lease.id)
        except FabricError as ex:
            return Disconnected(f"lease {self.lease.id}: {why}, and the node cannot be asked: {ex}")
        return self._verdict(state, why)

    def _verdict(self, state: str, why: str) -> FabricError:
        self._cell.mark(state)
        if state == "active":  # fenced although active: never trust the mapping again
            self._cell.mark("freed")
            return LeaseExpired(f"lease {self.lease.id}: {why}, although the node reports it active")
        if state == "revoked":
            return Revoked(f"lease {self.lease.id} was revoked ({why})")
        return LeaseExpired(f"lease {self.lease.id} is {state} ({why})")

    def _live(self) -> None:
        if self.closed:
            raise QueueClosed(f"region {self.lease.id} is closed")
        self.lease.check()
        self._check_file()
        self._check_node()

    def close(self) -> None:
        """Detach (the lease stays until freed or expired); later calls raise ``QueueClosed``. Idempotent.
        The mapping stays while anything (a queue, a view) still uses it."""
        import os

        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"<UcxMappedRegion {self.lease.id} {self.nbytes}B mapped {self.lease!r}>"
