"""The UCX driver: leased regions on a memory node, reached with one-sided UCX (libucp) operations.

UCX gives the same one-sided operations as RDMA verbs (put, get, 64-bit
compare-and-swap and fetch-and-add) over InfiniBand/RoCE where present and
over TCP and shared memory everywhere else, so this is the driver that makes
the cross-host path real on machines without an RDMA device. The binding is
:mod:`grafos_fabric._ucx` (``native/gf_ucx.c``): one C call per operation
(post, wait with a deadline and the endpoint's error flag, free), GIL
released; it is built only where UCX's headers were found, and
:func:`available` says why not otherwise.

Players (plugged into the memory node's seams, :mod:`grafos_fabric.drivers.node.registrar`):

* node side, :class:`UcxRegistrar`: owns the pool (anonymous memory, mapped
  for the node's whole life), a UCX worker with a **dedicated progress
  thread** (over tcp/sm the node's CPU executes every remote operation inside
  ``ucp_worker_progress``; ``progress="busy"`` polls without pause, lowest
  latency, one core; ``"event"`` sleeps on the worker's fd, no idle CPU) and a
  UCX worker and listener **per control session** (opened by the session's
  ``connect``, which answers the listener's port). Each span is
  ``ucp_mem_map``-ed on its own; its access is ``{"addr", "rkey" (packed,
  hex)}``.
* client side, :class:`UcxConnector` (one per node) and :class:`UcxRegion`:
  one endpoint per node, (re)connected on demand; regions unpack the rkey per
  endpoint.

Fencing (why the node does it): over tcp and sm, ``ucp_mem_unmap`` does not
stop remote access, and an rkey is an address hint, not a capability: any
connected peer can read or write any address of the node process. So on
revoke, free or expiry the node **destroys the UCX worker of every session
that held the lease** (:meth:`UcxRegistrar.fence`) before the span is
unmapped and reused. Closing only the node's endpoint is not enough: measured
on UCX 1.13 over tcp, the client's operations kept landing after the node
force-closed its endpoint (the tcp transport reconnects underneath); with the
worker gone they fail. The pool itself is never unmapped
while the node runs (a write into unmapped memory would kill the node). Run
UCX memory nodes on a trusted network only; on a real HCA, rkey enforcement by
the hardware is what really fences (to be verified on one).

Liveness: UCX reports neither a stopped node nor a dead link, and with error
mode NONE (the only one whose atomics work on UCX 1.13 and >= 1.16) an
operation in flight to a dead peer never completes. Every operation therefore
has a deadline (``timeout``, default :data:`DEFAULT_OP_TIMEOUT`); a missed
deadline or an endpoint error force-closes the endpoint (cancelling what was
in flight: no caller buffer is touched after the call returns) and maps to
:class:`Disconnected`, unless the node, asked over the control channel, says
the lease is ``revoked`` (:class:`Revoked`) or gone (:class:`LeaseExpired`).
The next operation reconnects.

Ordering: every operation completes (locally) before it returns; a put is
remotely visible only after a flush, so ``store64`` (release) and ``write``
followed by :meth:`UcxRegion.flush` are put + ``ucp_ep_flush_nbx``;
``load64`` (acquire) is a get, which completes only with the data.

Atomicity: UCX atomics are atomic against each other on the same word and,
over tcp/sm (executed by the node's CPU with lock-prefixed instructions),
against the node's own CPU atomics. On an HCA, device atomics need not be
coherent with CPU atomics: set ``UCX_ATOMIC_MODE=cpu`` or never mix.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, cast
from urllib.parse import parse_qs, urlsplit

from grafos_fabric.errors import (
    STATUS_ARG,
    CapacityExceeded,
    Disconnected,
    FabricError,
    FabricValueError,
    LeaseExpired,
    QueueClosed,
    Revoked,
    Unsupported,
    from_status,
)
from grafos_fabric.lease import Lease

from .base import Buffer, Fabric, RegionRef, byte_view
from .node.client import RemoteFabric
from .node.registrar import Access, Grant, NodeLink

__all__ = [
    "DEFAULT_OP_TIMEOUT",
    "UcxConnector",
    "UcxContext",
    "UcxEndpoint",
    "UcxFabric",
    "UcxRegion",
    "UcxRegistrar",
    "UcxSession",
    "UcxSpan",
    "available",
    "open_ucx_fabric",
    "parse_ucx_url",
    "ucx_config",
    "version",
]

log = logging.getLogger(__name__)

DEFAULT_OP_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
U64 = (1 << 64) - 1
PAGE = mmap.PAGESIZE
_ERRLEN = 256

try:
    from grafos_fabric import _ucx as _mod  # type: ignore[attr-defined,unused-ignore]

    ffi: Any = _mod.ffi
    lib: Any = _mod.lib
    _IMPORT_ERROR: str | None = None
except ImportError as _ex:  # built without UCX, or libucp missing at run time
    ffi = lib = None
    _IMPORT_ERROR = str(_ex)


def available() -> str | None:
    """``None`` when the UCX binding is usable here, else the reason it is not."""
    if lib is None:
        return (f"the UCX binding is not built ({_IMPORT_ERROR}): install libucx-dev (apt) or set UCX_PREFIX, "
                "then reinstall grafos-fabric")
    return None


def _require() -> None:
    reason = available()
    if reason is not None:
        raise Unsupported(reason)


def version() -> str:
    """The UCX library version in use (``"1.13.1"``)."""
    _require()
    return str(ffi.string(lib.gfu_version()).decode())


def ucx_config(tls: str | None = None, net_devices: str | None = None, **extra: str) -> dict[str, str]:
    """UCX settings for a context (names without the ``UCX_`` prefix): ``TLS``, ``NET_DEVICES``, ..."""
    cfg: dict[str, str] = {}
    if tls:
        cfg["TLS"] = tls
    if net_devices:
        cfg["NET_DEVICES"] = net_devices
    cfg.update({k.upper(): v for k, v in extra.items()})
    for k, v in cfg.items():
        if not k.replace("_", "").isalnum() or ";" in v or "=" in v:
            raise FabricValueError(f"bad UCX setting {k}={v!r}")
    return cfg


def _err(buf: Any) -> str:
    return str(ffi.string(buf).decode(errors="replace"))


def _raise_local(rc: int, what: str) -> NoReturn:
    """A binding status as the typed exception: translated into grafos_fabric.errors' status codes."""
    if rc == lib.GFU_UNSUPPORTED:
        code = -5
    elif rc in (lib.GFU_DISCONNECTED, lib.GFU_TIMEOUT, lib.GFU_CLOSED):
        code = -1
    else:  # GFU_ERROR: a local failure (bad argument, out of memory, UCX refused)
        code = STATUS_ARG
    raise from_status(code, what)


# ---------------------------------------------------------------------------
# Wrappers: one per C object (close() idempotent, children before parents)
# ---------------------------------------------------------------------------


class UcxContext:
    """A UCX context and its one worker (per process: create it after fork)."""

    def __init__(self, config: dict[str, str] | None = None, *, wakeup: bool = False) -> None:
        _require()
        cfg = ";".join(f"{k}={v}" for k, v in (config or {}).items()).encode()
        out = ffi.new("gfu_ctx **")
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.gfu_ctx_create(cfg, int(wakeup), out, err, _ERRLEN)
        if rc != lib.GFU_OK:
            _raise_local(rc, f"cannot open a UCX context: {_err(err)}")
        self._ptr: Any = out[0]
        self.config = dict(config or {})
        self.wakeup = wakeup
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ptr(self) -> Any:
        if self._ptr is None:
            raise Disconnected("the UCX context is closed")
        return self._ptr

    def worker_address(self) -> bytes:
        buf = ffi.new("uint8_t[]", 8192)
        n = ffi.new("size_t *")
        if lib.gfu_worker_address(self.ptr, buf, 8192, n) != lib.GFU_OK:
            raise Unsupported(f"UCX worker address does not fit in 8192 bytes ({n[0]})")
        return bytes(ffi.buffer(buf, n[0]))

    def progress(self) -> int:
        """One pass of the worker (clients progress inside each operation; this is for idle upkeep)."""
        return int(lib.gfu_progress(self.ptr))

    def start_progress(self, mode: str = "busy") -> None:
        """A dedicated progress thread: ``busy`` (polls, one core) or ``event`` (sleeps on the worker's fd)."""
        if mode not in ("busy", "event"):
            raise FabricValueError(f"progress must be 'busy' or 'event', got {mode!r}")
        if mode == "event" and not self.wakeup:
            raise FabricValueError("event progress needs a context created with wakeup=True")
        with self._lock:
            if self._thread is not None:
                return
            ptr = self.ptr
            t = threading.Thread(target=lib.gfu_run_progress, args=(ptr, int(mode == "event")),
                                 name=f"grafos-ucx-progress-{mode}", daemon=True)
            self._thread = t
            t.start()

    def stop_progress(self) -> None:
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None:
            lib.gfu_stop_progress(self._ptr)
            t.join(timeout=10)

    def close(self) -> None:
        self.stop_progress()
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.gfu_ctx_destroy(ptr)


class UcxEndpoint:
    """One UCX endpoint (client: connected to a node's listener; node: accepted from a client)."""

    def __init__(self, ctx: UcxContext, ptr: Any, peer: str = "") -> None:
        self.ctx = ctx  # the parent stays alive while the endpoint is
        self._ptr: Any = ptr
        self.peer = peer
        self.created = time.monotonic()

    @classmethod
    def connect(cls, ctx: UcxContext, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> UcxEndpoint:
        """Connect to a UCX listener at ``host:port`` (IPv4) and finish the wire-up (a flush)."""
        out = ffi.new("gfu_ep **")
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.gfu_connect_sockaddr(ctx.ptr, host.encode(), port, float(timeout), out, err, _ERRLEN)
        if rc != lib.GFU_OK:
            if rc == lib.GFU_ERROR:
                raise FabricValueError(f"UCX connect to {host}:{port}: {_err(err)}")
            raise Disconnected(f"UCX connect to {host}:{port} failed: {_err(err)}")
        return cls(ctx, out[0], f"{host}:{port}")

    @classmethod
    def connect_worker(cls, ctx: UcxContext, address: bytes, timeout: float = CONNECT_TIMEOUT) -> UcxEndpoint:
        """Connect to a worker by its address (the way to reach a peer over ``sm`` alone)."""
        if not 0 < len(address) <= 8192:
            raise FabricValueError(f"a UCX worker address has 1..8192 bytes, got {len(address)}")
        out = ffi.new("gfu_ep **")
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.gfu_connect_worker(ctx.ptr, address, len(address), float(timeout), out, err, _ERRLEN)
        if rc != lib.GFU_OK:
            raise Disconnected(f"UCX connect by worker address failed: {_err(err)}")
        return cls(ctx, out[0], "worker")

    @property
    def ptr(self) -> Any:
        if self._ptr is None:
            raise Disconnected("the UCX endpoint is closed")
        return self._ptr

    @property
    def failed(self) -> bool:
        return self._ptr is None or bool(lib.gfu_ep_failed(self._ptr))

    @property
    def error(self) -> str:
        if self._ptr is None:
            return "endpoint closed"
        return str(ffi.string(lib.gfu_ep_error(self._ptr)).decode(errors="replace"))

    def local_address(self) -> str:
        """``"IP:PORT"`` of this endpoint's connection (what the node sees as the client's address)."""
        buf = ffi.new("char[]", 64)
        rc = lib.gfu_ep_local_addr(self.ptr, buf, 64)
        if rc != lib.GFU_OK:
            _raise_local(rc, "cannot query the endpoint's local address")
        return _err(buf)

    def shutdown(self) -> None:
        """Force-close the UCX endpoint but keep the handle: operations on it fail with ``Disconnected``
        (so a thread still holding it never touches freed memory). :meth:`close` frees it."""
        if self._ptr is not None:
            lib.gfu_ep_close(self._ptr, 1)

    def close(self, force: bool = True) -> None:
        """Close (force: without waiting for the peer; cancels what is in flight) and free. Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            if not force:
                lib.gfu_ep_close(ptr, 0)
            lib.gfu_ep_free(ptr)


class _Rkey:
    def __init__(self, ep: UcxEndpoint, packed: bytes) -> None:
        out = ffi.new("gfu_rkey **")
        rc = lib.gfu_rkey_unpack(ep.ptr, packed, len(packed), out)
        if rc != lib.GFU_OK:
            if rc == lib.GFU_CLOSED:
                raise Disconnected("the endpoint closed before the rkey was unpacked")
            raise FabricValueError("the node's rkey could not be unpacked (corrupt or from another UCX)")
        self.ep = ep
        self._ptr: Any = out[0]

    @property
    def ptr(self) -> Any:
        return self._ptr

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.gfu_rkey_destroy(ptr)


# ---------------------------------------------------------------------------
# Node side: registrar, spans, sessions
# ---------------------------------------------------------------------------


class UcxSpan:
    """A span of the pool mapped for UCX on its own (own memory handle and packed rkey)."""

    def __init__(self, registrar: UcxRegistrar, offset: int, nbytes: int) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.addr = registrar.pool_addr + offset
        out = ffi.new("gfu_mem **")
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.gfu_mem_map(registrar.ctx.ptr, ffi.cast("void *", self.addr), nbytes, out, err, _ERRLEN)
        if rc != lib.GFU_OK:
            _raise_local(rc, f"cannot map {nbytes} bytes for UCX: {_err(err)}")
        self._mem: Any = out[0]
        buf = ffi.new("uint8_t[]", 4096)
        n = ffi.new("size_t *")
        if lib.gfu_rkey_pack(self._mem, buf, 4096, n) != lib.GFU_OK:
            lib.gfu_mem_unmap(self._mem)
            raise Unsupported(f"the packed rkey does not fit in 4096 bytes ({n[0]})")
        self.rkey = bytes(ffi.buffer(buf, n[0]))
        self.fenced = False

    def access(self, writable: bool) -> Access:
        """``{"addr", "rkey" (hex)}``. UCX over tcp/sm cannot make a span read-only in the transport:
        the client library refuses writes on a read-only grant itself."""
        return {"addr": self.addr, "rkey": self.rkey.hex()}

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
            err = ffi.new("char[]", _ERRLEN)
            rc = lib.gfu_listen(ctx.ptr, reg.host.encode(), 0, out, bound, err, _ERRLEN)
            if rc != lib.GFU_OK:
                _raise_local(rc, f"UCX listener on {reg.host}: {_err(err)}")
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
                self.endpoints.append(UcxEndpoint(self.ctx, ep_out[0], _err(peer)))
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
    (default; lowest latency, one core) or ``event``.
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
    ) -> None:
        _require()
        if pool_size <= 0:
            raise FabricValueError(f"pool_size must be positive, got {pool_size}")
        self.pool_size = (pool_size + PAGE - 1) // PAGE * PAGE
        self.host = host
        self.advertise = advertise or ("" if host in ("0.0.0.0", "") else host)
        self.progress = progress
        self.config = {**ucx_config(tls, net_devices), **(config or {})}
        self._pool = mmap.mmap(-1, self.pool_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor: Any = ffi.from_buffer(self._pool)
        self.pool_addr = int(ffi.cast("uintptr_t", self._anchor))
        self.ctx = UcxContext(self.config)
        try:
            self._group = _Group(progress)
        except BaseException:
            self.ctx.close()
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
    def node_info(self) -> Access:
        return {"ucx_host": self.advertise}

    def register(self, offset: int, nbytes: int) -> UcxSpan:
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.pool_size or offset % PAGE:
            raise FabricValueError(f"span [{offset}, {offset + nbytes}) is not a page-aligned part of the pool")
        ffi.memmove(ffi.cast("char *", self.pool_addr + offset), b"\0" * nbytes, nbytes)  # no bytes leak
        span = UcxSpan(self, offset, nbytes)
        with self._lock:
            self._spans.add(span)
        return span

    def fence(self, span: Any, holders: list[Any]) -> None:
        """Destroy the worker of every holder's session: later remote access by them fails."""
        for h in holders:
            if isinstance(h, UcxSession):
                h.fence()
        if isinstance(span, UcxSpan):
            span.fenced = True

    def deregister(self, span: Any) -> None:
        if not isinstance(span, UcxSpan):
            raise FabricValueError("not a UCX span")
        with self._lock:
            self._spans.discard(span)
        span.unmap()

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
        self.ctx.close()
        self._anchor = None
        self._pool.close()

    def __enter__(self) -> UcxRegistrar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Client side: connector and regions
# ---------------------------------------------------------------------------


class UcxConnector:
    """This client's UCX data plane towards one node: one endpoint, (re)connected on demand.

    ``ctx`` is the client fabric's context (shared by its connectors). The
    control session's ``link.connect({})`` opens a UCX listener for this client
    on the node and answers its port; the endpoint connects there
    (``info["ucx_host"]``, or the node's control host). After an
    endpoint error, a deadline, a fence, or a new control session
    (``link.session_epoch``) the next operation connects a new one.
    """

    def __init__(self, ctx: UcxContext, link: NodeLink, *, timeout: float = DEFAULT_OP_TIMEOUT,
                 fabric: Any = None) -> None:
        self.ctx = ctx
        self.link = link
        self.fabric = fabric  # the RemoteFabric (refs with capabilities, lease cells); None in bare use
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._ep: UcxEndpoint | None = None
        self._epoch = -1
        self.generation = 0  # grows with each new endpoint: regions re-unpack their rkeys
        self.reconnects = 0
        self._retired: list[UcxEndpoint] = []  # shut down, freed at close (regions may still hold them)
        self._closed = False

    def endpoint(self) -> tuple[UcxEndpoint, int]:
        with self._lock:
            if self._closed:
                raise QueueClosed("the UCX connector is closed")
            ep = self._ep
            if ep is not None and not ep.failed and self._epoch == self.link.session_epoch:
                return ep, self.generation
            if ep is not None:
                self._retire(ep)
            epoch = self.link.session_epoch
            reply = self.link.connect({})
            port = reply.get("ucx_port")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise Unsupported(f"node {self.link.host}:{self.link.port} sent no UCX port (is it a UCX node?)")
            host = str(self.link.info.get("ucx_host") or self.link.host)
            new = UcxEndpoint.connect(self.ctx, host, port, min(self.timeout, CONNECT_TIMEOUT))
            self._ep, self._epoch = new, epoch
            self.generation += 1
            return new, self.generation

    def warm(self) -> None:
        """Have a working endpoint now (a standby node: a later alloc or attach pays no connect).

        One pass of the worker first, so a node that died since (its endpoint's
        error callback) is noticed; its control channel is then found broken
        once and reopened at once. Raises :class:`Disconnected` while the node
        is down."""
        with self._lock:
            self.ctx.progress()
            try:
                self.endpoint()
            except Disconnected:
                self.endpoint()  # the old control channel broke with the node: once more, on a new one

    def _retire(self, ep: UcxEndpoint) -> None:
        ep.shutdown()
        self._retired.append(ep)
        self._ep = None
        self.reconnects += 1

    def invalidate(self, ep: UcxEndpoint) -> None:
        """The endpoint failed (the C side already force-closed its UCX half): the next operation reconnects."""
        with self._lock:
            if self._ep is ep:
                self._retire(ep)

    def region(self, lease: Lease, grant: Grant) -> UcxRegion:
        return UcxRegion(self, lease, grant)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ep, self._ep = self._ep, None
            retired, self._retired = self._retired, []
        if ep is not None:
            ep.close(force=False)
        for old in retired:
            old.close()


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
        self._rkey: _Rkey | None = None
        self._rkey_gen = -1
        self._h: tuple[UcxEndpoint, _Rkey] | None = None
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
    def _handles(self) -> tuple[UcxEndpoint, _Rkey]:
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
                self._rkey = _Rkey(ep, self._packed)
                self._rkey_gen = gen
            self._h = (ep, self._rkey)
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

    def _check(self, offset: int, length: int, *, write: bool = False) -> None:
        if self._closed:
            raise QueueClosed(f"region {self.lease.id} is closed")
        self.lease.check()
        if self._dead is not None:
            raise type(self._dead)(str(self._dead))
        if write and not self.writable:
            raise Revoked(f"lease {self.lease.id} was granted read-only")
        if not isinstance(offset, int) or offset < 0 or length < 0 or offset + length > self.nbytes:
            raise CapacityExceeded(f"[{offset}, {offset + length}) is outside the region's {self.nbytes} bytes")

    def _check_word(self, offset: int, *, write: bool = False) -> None:
        if isinstance(offset, int) and offset % 8:
            raise FabricValueError(f"64-bit operations need an 8-byte aligned offset, got {offset}")
        self._check(offset, 8, write=write)

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
        return Disconnected(what)

    def _run(self, op: str, call: Callable[[Any, Any], int]) -> None:
        ep, rk = self._handles()
        rc = call(ep._ptr, rk._ptr)
        if rc != lib.GFU_OK:
            raise self._failure(rc, op, ep)

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
        mv = byte_view(buf, writable=True)
        self._check(offset, mv.nbytes)
        if mv.nbytes:
            ptr = ffi.from_buffer(mv)
            self._run("read_into", lambda ep, rk: lib.gfu_get(ep, rk, ptr, mv.nbytes, self.remote_addr + offset,
                                                               self.timeout))
        self.lease.check()  # fail closed: bytes read across an expiry are not returned

    def write(self, offset: int, buf: Buffer) -> None:
        """Put ``buf`` at ``offset``: complete locally on return, remotely visible after :meth:`flush`."""
        mv = byte_view(buf, writable=False)
        self._check(offset, mv.nbytes, write=True)
        if mv.nbytes:
            ptr = ffi.from_buffer(mv)
            self._run("write", lambda ep, rk: lib.gfu_put(ep, rk, ptr, mv.nbytes, self.remote_addr + offset, 0,
                                                           self.timeout))

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        """Compare-and-swap the 64-bit word at ``offset``; returns the old value (unsigned)."""
        self._check_word(offset, write=True)
        old = ffi.new("uint64_t *")
        ep, rk = self._handles()
        rc = lib.gfu_cas64(ep._ptr, rk._ptr, self.remote_addr + offset, expected & U64, desired & U64, old,
                           self.timeout)
        if rc:
            raise self._failure(rc, "cas64", ep)
        return int(old[0])

    def faa64(self, offset: int, add: int) -> int:
        """Fetch-and-add on the 64-bit word at ``offset`` (wraps mod 2**64); returns the old value."""
        self._check_word(offset, write=True)
        old = ffi.new("uint64_t *")
        ep, rk = self._handles()
        rc = lib.gfu_faa64(ep._ptr, rk._ptr, self.remote_addr + offset, add & U64, old, self.timeout)
        if rc:
            raise self._failure(rc, "faa64", ep)
        return int(old[0])

    def load64(self, offset: int) -> int:
        """Read the little-endian word at ``offset`` (acquire: completes with the data)."""
        self._check_word(offset)
        out = bytearray(8)
        ptr = ffi.from_buffer(out)
        self._run("load64", lambda ep, rk: lib.gfu_get(ep, rk, ptr, 8, self.remote_addr + offset, self.timeout))
        self.lease.check()
        return int.from_bytes(out, "little")

    def store64(self, offset: int, value: int) -> None:
        """Write the little-endian word at ``offset`` (release: put + flush, so everything earlier is visible)."""
        self._check_word(offset, write=True)
        data = (value & U64).to_bytes(8, "little")
        self._run("store64", lambda ep, rk: lib.gfu_put(ep, rk, data, 8, self.remote_addr + offset, 1,
                                                         self.timeout))

    def flush(self) -> None:
        """Wait until every put is remotely visible."""
        self._check(0, 0)
        self._run("flush", lambda ep, rk: lib.gfu_flush(ep, self.timeout))

    def bench(self, op: str, nbytes: int, iters: int) -> list[float]:
        """Per-operation latencies (µs) of a tight C loop of ``op`` (put, put_flush, get, cas, faa) on word 0."""
        ops = {"put": 0, "put_flush": 1, "get": 2, "cas": 3, "faa": 4}
        self._check(0, nbytes, write=op != "get")
        buf = bytearray(max(8, nbytes))
        lat = ffi.new("double[]", iters)
        self._run(f"bench {op}", lambda ep, rk: lib.gfu_bench(ep, rk, ops[op], ffi.from_buffer(buf), nbytes,
                                                               self.remote_addr, iters, lat))
        return list(lat)

    def close(self) -> None:
        """Detach (the lease stays until freed or expired); later calls raise ``QueueClosed``. Idempotent."""
        self._closed = True
        with self._lock:
            rk, self._rkey, self._h = self._rkey, None, None
        if rk is not None:
            rk.close()


def parse_ucx_url(url: str) -> tuple[str, int, dict[str, str]]:
    """``ucx://HOST:PORT[?tls=tcp&net_devices=lo&timeout=5&progress=busy|event&tenant=...]``.

    Returns ``(host, port, options)``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "ucx":
        raise FabricValueError(f"not a ucx:// URL: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise FabricValueError(f"bad port in {url!r}") from None
    host = parts.hostname or ""
    if not host or not port:
        raise FabricValueError(f"ucx:// URLs name the node's control channel: ucx://HOST:PORT, got {url!r}")
    known = {"tls", "net_devices", "timeout", "progress", "tenant"}
    opts: dict[str, str] = {}
    for key, values in parse_qs(parts.query).items():
        if key not in known:
            raise FabricValueError(f"unknown option {key!r} in {url!r} (known: {', '.join(sorted(known))})")
        opts[key] = values[-1]
    return host, port, opts


class UcxFabric(RemoteFabric):
    """A client of UCX memory nodes: ``ucx://HOST:PORT[?tenant=&tls=tcp&net_devices=eth0&op_timeout=5]``.

    Leases, capabilities and auth are the node package's (:class:`RemoteFabric`);
    the data plane is one UCX context per fabric and one :class:`UcxConnector`
    (endpoint) per node. ``tls``/``net_devices`` restrict UCX's transports and
    interfaces for this client (``UCX_TLS``/``UCX_NET_DEVICES`` in the
    environment apply too); ``op_timeout`` is every operation's deadline.
    """

    driver = "ucx"
    schemes = ("ucx",)
    url_options = frozenset({"tls", "net_devices", "op_timeout"})

    def __init__(self, host: str, port: int, *, tls: str | None = None, net_devices: str | None = None,
                 op_timeout: float = DEFAULT_OP_TIMEOUT, **kwargs: Any) -> None:
        _require()
        if not op_timeout > 0:
            raise FabricValueError(f"op_timeout must be positive, got {op_timeout}")
        self.ucx = UcxContext(ucx_config(tls, net_devices))
        self.op_timeout = float(op_timeout)
        try:
            super().__init__(host, port, **kwargs)
            self.channel()  # authenticate now: a wrong secret fails before any lease
        except BaseException:
            self.ucx.close()
            raise

    @classmethod
    def url_kwargs(cls, opts: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {"tls": opts.get("tls"), "net_devices": opts.get("net_devices")}
        if "op_timeout" in opts:
            out["op_timeout"] = float(opts["op_timeout"])
        return out

    def connector(self, link: Any) -> UcxConnector:
        return UcxConnector(self.ucx, link, timeout=self.op_timeout, fabric=self)

    def warm(self, host: str | None = None, port: int | None = None) -> None:
        """Connect to a node (default: the URL's) now, control channel and UCX endpoint, and
        reconnect it if it restarted: a failover to a standby node then pays no connect.
        Cheap when nothing changed (one worker pass); :class:`Disconnected` while the node is down."""
        conn = self._node(host or self.host, port or self.port)[1]
        assert isinstance(conn, UcxConnector)
        conn.warm()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.ucx.close()


def open_ucx_fabric(url: str, *, clock: Any = None, token_file: Any = None) -> Fabric:
    """``open_fabric("ucx://HOST:PORT?...")``: :class:`Unsupported` with the reason where UCX is absent."""
    _require()
    return cast("Fabric", UcxFabric.from_url(url, clock=clock, token_file=token_file))
