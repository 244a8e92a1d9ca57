"""The memory node's UCX data plane: :class:`UcxRegistrar`, its sessions and spans.

Plugged into the memory node's seams (:mod:`grafos_fabric.drivers.node.registrar`):
the registrar owns the pool (anonymous memory, mapped for the node's whole
life), one progress thread for every session's worker (:class:`_Group`:
``busy`` polls without pause, lowest latency, one core; ``event`` sleeps on
the workers' fds, no idle CPU) and a UCX worker and listener per control
session (:class:`UcxSession`). Each span is ``ucp_mem_map``-ed on its own
(:class:`UcxSpan`); its access is ``{"addr", "rkey" (packed, hex)}``.
Fencing destroys the worker of every session that held the lease (see the
package docstring for why closing endpoints is not enough).

``local_map=True`` (``serve --driver ucx --ucx-local-map``; off by default,
because it puts the spans in /dev/shm, which is small in some containers)
backs each span with its own owner-only file in a 0700 directory under
/dev/shm with a 128-bit random name (the ``nodeshm`` model,
:mod:`grafos_fabric.drivers.node.shmfile`), ``posix_fallocate``-d first (a
full /dev/shm fails the grant with :class:`CapacityExceeded`, never SIGBUS
later) and mapped ``MAP_SHARED | MAP_FIXED`` over the span's range of the
pool: ``pool_addr + offset``, the rkey and every remote client stay as they
were, and a client on this host, as this user, maps the file and reaches the
ring with CPU loads and stores (``ucx://...?map=local``). The grant's access
carries the file's ``path`` beside ``addr``/``rkey``. The file's last page
(``LEASE_TRAILER``, past the span, never in the pool, so no remote client
reaches it) holds the lease's state and deadline words for the native rings
of local holders: the node sets the state active at register and marks it
gone when it fences; local holders write the deadline as they renew.
Fencing (revoke, free, expiry) marks the state word, unlinks the file and
maps fresh anonymous memory back over the range, so the next tenant of that
range gets new zeroed pages and a stale local mapping only ever reaches its
own orphaned pages.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from typing import Any

from grafos_fabric._ffi import ffi as gffi
from grafos_fabric._ffi import lib as glib
from grafos_fabric.errors import CapacityExceeded, Disconnected, FabricValueError, Unsupported
from grafos_fabric.lease import LeaseState

from ..node.registrar import Access
from ..node.shmfile import SHM_ROOT, create_span_file, make_span_dir, remove_span_dir, unlink_span_file
from .binding import (
    ERRLEN,
    LEASE_TRAILER,
    PAGE,
    UcxContext,
    UcxEndpoint,
    err_text,
    ffi,
    lib,
    raise_local,
    require,
    ucx_config,
    version,
)

__all__ = ["UcxRegistrar", "UcxSession", "UcxSpan"]

log = logging.getLogger(__name__)

_MAP_FIXED = 0x10  # Linux
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def _map_over(addr: int, nbytes: int, fd: int) -> None:
    """Map ``fd`` (shared; ``-1``: fresh private anonymous memory) over ``[addr, addr + nbytes)``
    in place (``MAP_FIXED``: the range stays mapped throughout, never a hole in the pool)."""
    flags = _MAP_FIXED | (mmap.MAP_SHARED if fd >= 0 else mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    got = _libc.mmap(addr, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap over the pool at {addr:#x}: {os.strerror(err)}")


def _store_word(trailer: mmap.mmap, offset: int, value: int) -> None:
    keep = gffi.from_buffer(trailer)
    try:
        glib.gf_store_release_at(gffi.cast("uint8_t *", keep), offset, value)
    finally:
        gffi.release(keep)


def _mark_fenced(trailer: mmap.mmap | None) -> None:
    """Set the lease state word of a span file's trailer to FREED (the span is gone: local holders
    ask the node which state the lease is in) and let go of the trailer's mapping."""
    if trailer is not None:
        _store_word(trailer, 0, LeaseState.FREED)
        trailer.close()


class UcxSpan:
    """A span of the pool mapped for UCX on its own (own memory handle and packed rkey)."""

    def __init__(self, registrar: UcxRegistrar, offset: int, nbytes: int, path: str | None = None,
                 trailer: mmap.mmap | None = None) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.addr = registrar.pool_addr + offset
        self.path = path  # the span's file (local_map), until fenced
        self.trailer = trailer  # the file's last page: the lease words local holders share (local_map)
        out = ffi.new("gfu_mem **")
        err = ffi.new("char[]", ERRLEN)
        rc = lib.gfu_mem_map(registrar.ctx.ptr, ffi.cast("void *", self.addr), nbytes, out, err, ERRLEN)
        if rc != lib.GFU_OK:
            raise_local(rc, f"cannot map {nbytes} bytes for UCX: {err_text(err)}")
        self._mem: Any = out[0]
        buf = ffi.new("uint8_t[]", 4096)
        n = ffi.new("size_t *")
        if lib.gfu_rkey_pack(self._mem, buf, 4096, n) != lib.GFU_OK:
            lib.gfu_mem_unmap(self._mem)
            raise Unsupported(f"the packed rkey does not fit in 4096 bytes ({n[0]})")
        self.rkey = bytes(ffi.buffer(buf, n[0]))
        self.fenced = False

    def access(self, writable: bool) -> Access:
        """``{"addr", "rkey" (hex)}`` (and ``"path"``, the span's file, with ``local_map``). UCX over
        tcp/sm cannot make a span read-only in the transport: the client library refuses writes on a
        read-only grant itself (and maps the file read-only)."""
        out: Access = {"addr": self.addr, "rkey": self.rkey.hex()}
        if self.path is not None:
            out["path"] = self.path
        return out

    def unlink(self) -> None:
        """``local_map``: unlink the span's file and map fresh anonymous memory back over its range
        (idempotent). Local holders see the file's link count drop to 0 and fail closed; whatever a
        stale holder writes lands in its own orphaned pages, never in the next tenant's."""
        path, self.path = self.path, None
        if path is not None:
            _mark_fenced(self.trailer)  # SYNC POINT: lease-state (local holders' native rings fail closed)
            self.trailer = None
            unlink_span_file(path)
            _map_over(self.addr, self.nbytes, -1)

    def unmap(self) -> None:
        mem, self._mem = self._mem, None
        if mem is not None and lib.gfu_mem_unmap(mem) != lib.GFU_OK:
            raise FabricValueError(f"ucp_mem_unmap failed for span at pool offset {self.offset}")


class _Group:
    """One thread progressing the workers of every session (busy or event mode)."""

    def __init__(self, mode: str) -> None:
        if mode not in ("busy", "event"):
            raise FabricValueError(f"progress must be 'busy' or 'event', got {mode!r}")
        out = ffi.new("gfu_group **")
        if lib.gfu_group_create(out) != lib.GFU_OK:
            raise MemoryError("gfu_group_create")
        self._ptr: Any = out[0]
        self.mode = mode
        self._thread = threading.Thread(target=lib.gfu_group_run, args=(self._ptr, int(mode == "event")),
                                        name=f"grafos-ucx-progress-{mode}", daemon=True)
        self._thread.start()

    def add(self, ctx: UcxContext) -> None:
        if lib.gfu_group_add(self._ptr, ctx.ptr) != lib.GFU_OK:
            raise CapacityExceeded("this node progresses at most 1024 UCX workers (sessions)")

    def remove(self, ctx: UcxContext) -> None:
        if ctx._ptr is not None:
            lib.gfu_group_remove(self._ptr, ctx._ptr)

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.gfu_group_stop(ptr)
            self._thread.join(timeout=10)
            lib.gfu_group_destroy(ptr)


class UcxSession:
    """One control connection's data plane on the node: its own UCX worker, listener and endpoints.

    ``connect(params)`` opens them (a reconnect replaces them) and answers
    ``{"ucx_port": P}``, the port the client then connects its endpoint to;
    every endpoint that listener accepts belongs to this session. Fencing a
    session destroys its worker: the client's endpoint fails (UCX does not stop
    a peer's operations when only the node's endpoint is closed: its tcp
    transport reconnects underneath, measured on 1.13), and the next
    ``connect`` opens a fresh worker that never saw the fenced span's rkey.
    """

    def __init__(self, registrar: UcxRegistrar, peer: str) -> None:
        self.registrar = registrar
        self.peer = peer
        self.ctx: UcxContext | None = None
        self._listener: Any = None
        self.port = 0
        self.endpoints: list[UcxEndpoint] = []
        self.fences = 0
        self.closed = False
        self._lock = threading.Lock()

    def connect(self, params: Access) -> Access:
        if self.closed:
            raise Disconnected("the session is closed")
        reg = self.registrar
        self._teardown()
        ctx = UcxContext(reg.config, wakeup=reg.progress == "event")
        try:
            out = ffi.new("gfu_listener **")
            bound = ffi.new("uint16_t *")
            err = ffi.new("char[]", ERRLEN)
            rc = lib.gfu_listen(ctx.ptr, reg.host.encode(), 0, out, bound, err, ERRLEN)
            if rc != lib.GFU_OK:
                raise_local(rc, f"UCX listener on {reg.host}: {err_text(err)}")
        except BaseException:
            ctx.close()
            raise
        with self._lock:
            self.ctx, self._listener, self.port = ctx, out[0], int(bound[0])
        reg._group.add(ctx)
        return {"ucx_port": self.port}

    def drain(self) -> None:
        """Take the endpoints the listener accepted; release the failed ones (their client went away).

        Everything here and in teardown runs under the session's lock: an
        endpoint must never be closed after its worker was destroyed."""
        with self._lock:
            if self._listener is None or self.ctx is None:
                return
            ep_out = ffi.new("gfu_ep **")
            peer = ffi.new("char[]", 64)
            while lib.gfu_listener_pop(self._listener, ep_out, peer, 64) == lib.GFU_OK:
                self.endpoints.append(UcxEndpoint(self.ctx, ep_out[0], err_text(peer)))
            dead = [ep for ep in self.endpoints if ep.failed]
            self.endpoints = [ep for ep in self.endpoints if not ep.failed]
            for ep in dead:
                ep.close()

    def _teardown(self) -> None:
        with self._lock:
            ctx, listener, self.ctx, self._listener = self.ctx, self._listener, None, None
            eps, self.endpoints = self.endpoints, []
            if ctx is None:
                return
            self.registrar._group.remove(ctx)  # the progress thread no longer touches it
            for ep in eps:
                ep.close()
            if listener is not None:
                lib.gfu_listener_destroy(listener)
            ctx.close()  # destroys the worker: every connection of this session is gone

    def fence(self) -> None:
        """Destroy this session's worker: every later operation of its client fails."""
        if self.ctx is not None:
            self.fences += 1
        self._teardown()

    def close(self) -> None:
        self.closed = True
        self._teardown()


class UcxRegistrar:
    """The node's UCX data plane: the pool, and a progress thread for the sessions' workers.

    ``pool_size`` bytes of anonymous memory stay mapped for the registrar's
    life; spans are ``ucp_mem_map``-ed in the registrar's own context.
    ``host`` is the address session listeners bind (``advertise``: the one
    clients are told, default ``host`` unless it is a wildcard, then the
    control channel's host). ``tls``/``net_devices`` restrict UCX's transports
    and interfaces (``UCX_TLS``/``UCX_NET_DEVICES``). ``progress``: ``busy``
    (default; lowest latency, one core) or ``event``. ``prefault`` (default
    off): the pool's pages are faulted in when it is mapped (``MAP_POPULATE``:
    the whole pool is resident from the start), so a grant zeroes its span
    without page faults (measured: 256 KiB zeroed in ~2.3 ms on fresh pages,
    ~0.1 ms on resident ones, on the 2-core dev VM). ``local_map`` (default
    off): each span is a file in a 0700 directory under ``shm_root``
    (/dev/shm), mapped over its range of the pool, for clients on this host
    (see the module docstring).
    """

    name = "ucx"

    def __init__(
        self,
        pool_size: int,
        *,
        host: str = "0.0.0.0",
        advertise: str | None = None,
        tls: str | None = "tcp",
        net_devices: str | None = None,
        progress: str = "busy",
        config: dict[str, str] | None = None,
        prefault: bool = False,
        local_map: bool = False,
        shm_root: str = SHM_ROOT,
    ) -> None:
        require()
        if pool_size <= 0:
            raise FabricValueError(f"pool_size must be positive, got {pool_size}")
        self.pool_size = (pool_size + PAGE - 1) // PAGE * PAGE
        self.host = host
        self.advertise = advertise or ("" if host in ("0.0.0.0", "") else host)
        self.progress = progress
        self.config = {**ucx_config(tls, net_devices), **(config or {})}
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if prefault:  # fault every page in now, so a grant's zeroing takes no page faults
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        self._pool = mmap.mmap(-1, self.pool_size, flags=flags)
        self._anchor: Any = ffi.from_buffer(self._pool)
        self.pool_addr = int(ffi.cast("uintptr_t", self._anchor))
        self.local_map = bool(local_map)
        self.shm_dir = make_span_dir(shm_root) if self.local_map else ""
        try:
            self.ctx = UcxContext(self.config)
        except BaseException:
            self._remove_dir()
            raise
        try:
            self._group = _Group(progress)
        except BaseException:
            self.ctx.close()
            self._remove_dir()
            raise
        self._lock = threading.Lock()
        self._spans: set[UcxSpan] = set()
        self._sessions: list[UcxSession] = []
        self._closed = False
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._pump_loop, name="grafos-ucx-accept", daemon=True)
        self._pump.start()
        log.info("UCX %s data plane on %s (%s, progress=%s)", version(), host, self.config, progress)

    def _pump_loop(self) -> None:
        while not self._stop.wait(0.005):
            with self._lock:
                sessions = [s for s in self._sessions if not s.closed]
                self._sessions = sessions
            for s in sessions:
                try:
                    s.drain()
                except Exception:
                    log.exception("UCX accept pump failed for session %s", s.peer)

    # -- the Registrar protocol ------------------------------------------------
    def _remove_dir(self) -> None:
        if self.shm_dir:
            remove_span_dir(self.shm_dir)

    def node_info(self) -> Access:
        info: Access = {"ucx_host": self.advertise}
        if self.local_map:
            info["shm_dir"] = self.shm_dir
        return info

    def register(self, offset: int, nbytes: int) -> UcxSpan:
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.pool_size or offset % PAGE:
            raise FabricValueError(f"span [{offset}, {offset + nbytes}) is not a page-aligned part of the pool")
        if self.local_map and nbytes % PAGE:  # a file mapped over the pool covers whole pages
            raise FabricValueError(f"a locally mapped span is whole pages, got {nbytes} bytes")
        if not self.local_map:
            ctypes.memset(self.pool_addr + offset, 0, nbytes)  # no bytes leak (in place: no source buffer)
            span = UcxSpan(self, offset, nbytes)
        else:
            span = self._register_file(offset, nbytes)
        with self._lock:
            self._spans.add(span)
        return span

    def _register_file(self, offset: int, nbytes: int) -> UcxSpan:
        """``local_map``: a fresh span file (zeros: no bytes leak) mapped over the span's range."""
        addr = self.pool_addr + offset
        # the span, then one page of lease words (LEASE_TRAILER), never reachable by remote clients
        path, fd = create_span_file(self.shm_dir, nbytes + LEASE_TRAILER)  # CapacityExceeded when full
        trailer: mmap.mmap | None = None
        try:
            try:
                _map_over(addr, nbytes, fd)
                trailer = mmap.mmap(fd, LEASE_TRAILER, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                    offset=nbytes)
                _store_word(trailer, 0, LeaseState.ACTIVE)
            finally:
                os.close(fd)
        except OSError as ex:
            if trailer is not None:
                trailer.close()
            unlink_span_file(path)
            _map_over(addr, nbytes, -1)  # whatever happened to the range, it is fresh anonymous memory again
            raise CapacityExceeded(f"cannot map span file {path} over the pool: {ex}") from None
        try:
            return UcxSpan(self, offset, nbytes, path, trailer)
        except BaseException:
            _mark_fenced(trailer)
            unlink_span_file(path)
            _map_over(addr, nbytes, -1)
            raise

    def fence(self, span: Any, holders: list[Any]) -> None:
        """Destroy the worker of every holder's session: later remote access by them fails."""
        for h in holders:
            if isinstance(h, UcxSession):
                h.fence()
        if isinstance(span, UcxSpan):
            span.fenced = True
            span.unlink()  # local_map: local holders fail closed; their later writes reach orphaned pages

    def deregister(self, span: Any) -> None:
        if not isinstance(span, UcxSpan):
            raise FabricValueError("not a UCX span")
        with self._lock:
            self._spans.discard(span)
        span.unmap()
        span.unlink()

    def open_session(self, peer: str) -> UcxSession:
        s = UcxSession(self, peer)
        with self._lock:
            self._sessions.append(s)
        return s

    def close(self) -> None:
        """Stop the pump, close sessions, stop progress, unmap spans, then the context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._pump.join(timeout=5)
        with self._lock:
            sessions, self._sessions = self._sessions, []
            spans, self._spans = list(self._spans), set()
        for s in sessions:
            s.close()
        self._group.close()
        for span in spans:
            span.unmap()
            span.path = None  # the directory goes as a whole below
            _mark_fenced(span.trailer)
            span.trailer = None
        self.ctx.close()
        self._anchor = None
        self._pool.close()
        self._remove_dir()

    def __enter__(self) -> UcxRegistrar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
