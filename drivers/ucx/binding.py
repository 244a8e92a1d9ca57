"""The UCX binding, loaded: ``grafos_fabric._ucx`` (``native/gf_ucx.c``) and one Python owner per C object.

:class:`UcxContext` (a UCX context and its one worker), :class:`UcxEndpoint`
and :class:`Rkey` each own one handle of the binding: ``close()`` is
idempotent, and a child keeps its parent alive. :func:`available` says why
the binding is not usable where it is not (built without UCX's headers, or
libucp missing at run time); everything else raises :class:`Unsupported`
with that reason. Status codes of the binding become the typed errors of
:mod:`grafos_fabric.errors` in :func:`raise_local`.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from typing import Any, NoReturn

from grafos_fabric.errors import STATUS_ARG, Disconnected, FabricValueError, Unsupported, from_status

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_OP_TIMEOUT",
    "ERRLEN",
    "LEASE_TRAILER",
    "PAGE",
    "U64",
    "Rkey",
    "UcxContext",
    "UcxEndpoint",
    "available",
    "err_text",
    "ffi",
    "lib",
    "raise_local",
    "require",
    "ucx_config",
    "version",
]

log = logging.getLogger(__name__)

DEFAULT_OP_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
U64 = (1 << 64) - 1
PAGE = mmap.PAGESIZE
# local_map span files: one page past the span holds the lease words [state, deadline_ns] (u64 each)
LEASE_TRAILER = PAGE
ERRLEN = 256

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


def require() -> None:
    reason = available()
    if reason is not None:
        raise Unsupported(reason)


def version() -> str:
    """The UCX library version in use (``"1.13.1"``)."""
    require()
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


def err_text(buf: Any) -> str:
    return str(ffi.string(buf).decode(errors="replace"))


def raise_local(rc: int, what: str) -> NoReturn:
    """A binding status as the typed exception: translated into grafos_fabric.errors' status codes."""
    if rc == lib.GFU_UNSUPPORTED:
        code = -5
    elif rc in (lib.GFU_DISCONNECTED, lib.GFU_TIMEOUT, lib.GFU_CLOSED):
        code = -1
    else:  # GFU_ERROR: a local failure (bad argument, out of memory, UCX refused)
        code = STATUS_ARG
    raise from_status(code, what)


class UcxContext:
    """A UCX context and its one worker (per process: create it after fork)."""

    def __init__(self, config: dict[str, str] | None = None, *, wakeup: bool = False) -> None:
        require()
        cfg = ";".join(f"{k}={v}" for k, v in (config or {}).items()).encode()
        out = ffi.new("gfu_ctx **")
        err = ffi.new("char[]", ERRLEN)
        rc = lib.gfu_ctx_create(cfg, int(wakeup), out, err, ERRLEN)
        if rc != lib.GFU_OK:
            raise_local(rc, f"cannot open a UCX context: {err_text(err)}")
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
        err = ffi.new("char[]", ERRLEN)
        rc = lib.gfu_connect_sockaddr(ctx.ptr, host.encode(), port, float(timeout), out, err, ERRLEN)
        if rc != lib.GFU_OK:
            if rc == lib.GFU_ERROR:
                raise FabricValueError(f"UCX connect to {host}:{port}: {err_text(err)}")
            raise Disconnected(f"UCX connect to {host}:{port} failed: {err_text(err)}")
        return cls(ctx, out[0], f"{host}:{port}")

    @classmethod
    def connect_worker(cls, ctx: UcxContext, address: bytes, timeout: float = CONNECT_TIMEOUT) -> UcxEndpoint:
        """Connect to a worker by its address (the way to reach a peer over ``sm`` alone)."""
        if not 0 < len(address) <= 8192:
            raise FabricValueError(f"a UCX worker address has 1..8192 bytes, got {len(address)}")
        out = ffi.new("gfu_ep **")
        err = ffi.new("char[]", ERRLEN)
        rc = lib.gfu_connect_worker(ctx.ptr, address, len(address), float(timeout), out, err, ERRLEN)
        if rc != lib.GFU_OK:
            raise Disconnected(f"UCX connect by worker address failed: {err_text(err)}")
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
            raise_local(rc, "cannot query the endpoint's local address")
        return err_text(buf)

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


class Rkey:
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
