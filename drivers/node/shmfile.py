"""The ``nodeshm`` driver: a memory node whose spans are shared-memory files on its own host.

It needs no device, so the whole control plane (auth, capabilities, quotas,
limits, the server) runs and is tested on every machine, with the same
client code path as the remote drivers: grants over TCP, then one-sided
``read_into``/``write``/``cas64``/``faa64``/``load64``/``store64`` on the
span. It only reaches clients **on the node's host, running as the node's
user**: each span is a file ``/dev/shm/grafos-node.XXXX/<128-bit random
name>`` in a directory of mode 0700, and the file's path is the access
descriptor a grant carries (the span's "key").

Fencing: revoke, free and expiry unlink the span's file. Every later
operation of a holder checks the file's link count (one ``fstat``) and then
fails closed (``Revoked``/``LeaseExpired``, as the node reports the lease), and
a holder racing with the unlink can only touch the orphaned file: the next
lease gets a new file, so one tenant's stale mapping never reaches another
tenant's bytes. Read-only capabilities map the file read-only; a process of
the same user could still open the file for writing, so read-only is enforced
by this library, not by the kernel. Use the verbs (or UCX) driver across hosts.

URLs: ``nodeshm://127.0.0.1:PORT?tenant=NAME``; the node:
``grafos-fabric serve --driver nodeshm``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

from grafos_fabric._ffi import ffi, lib
from grafos_fabric.errors import (
    CapabilityDenied,
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

from ..base import Buffer, RegionRef
from .client import NodeChannel, RemoteFabric
from .registrar import Access, Grant, RegisteredSpan, RegistrarSession
from .wire import EXPIRED, FREED, REVOKED, UNKNOWN

__all__ = [
    "DIR_PREFIX",
    "LOCK_NAME",
    "SHM_ROOT",
    "LocalSpanOps",
    "NodeShmFabric",
    "NodeShmRegion",
    "ShmFileRegistrar",
    "create_span_file",
    "make_span_dir",
    "open_span_file",
    "reap_span_dirs",
    "remove_span_dir",
    "span_file_name_ok",
    "unlink_span_file",
]

log = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"
DIR_PREFIX = "grafos-node."
U64 = (1 << 64) - 1


# ---------------------------------------------------------------------------
# Node side
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class FileSpan:
    offset: int
    nbytes: int
    path: str

    def access(self, writable: bool) -> Access:
        return {"path": self.path, "nbytes": self.nbytes, "writable": writable}


class _NoSession:
    """The shm data plane needs no per-connection set-up."""

    def connect(self, params: Access) -> Access:
        if params:
            raise FabricValueError("the nodeshm driver takes no connect parameters")
        return {}

    def close(self) -> None:
        pass


LOCK_NAME = ".owner"  # in a node's span directory: held (flock) by the live node that made it
_held: dict[str, int] = {}  # span directory -> the lock file's descriptor, for this process's nodes


def make_span_dir(root: str = SHM_ROOT) -> str:
    """A fresh directory ``ROOT/grafos-node.XXXX`` of mode 0700 for a node's span files.

    The node holds an exclusive ``flock`` on the directory's ``.owner`` file for as long as it
    lives (the kernel drops it when the process dies, kill -9 included), and first reaps the
    directories of this user's dead nodes in ``root`` (:func:`reap_span_dirs`)."""
    reap_span_dirs(root)
    path = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=root)  # mode 0700
    # locked under another name first, then renamed: a reaper never finds an unlocked .owner here
    # (it would take the lock of a node still starting and remove its directory)
    tmp = os.path.join(path, LOCK_NAME + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
    os.rename(tmp, os.path.join(path, LOCK_NAME))
    _held[path] = fd
    return path


def remove_span_dir(path: str) -> None:
    """Remove a node's span directory (its spans' names: holders keep their mappings) and let
    go of its lock (idempotent)."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def reap_span_dirs(root: str = SHM_ROOT) -> list[str]:
    """Remove the span directories in ``root`` left by this user's nodes that died without
    closing (kill -9, a crash): those whose ``.owner`` lock nobody holds. Returns their paths.

    Only directories named ``grafos-node.*``, owned by this user, of mode 0700, not symlinks,
    and with a lock file are touched (a directory of an older build, without one, is left
    alone: its node may be alive); the lock is taken without following symlinks and without
    waiting, so a live node's directory is never removed. Holders that still map a reaped
    span keep their pages (an unlinked file); their next check finds the link count at 0."""
    reaped: list[str] = []
    uid = os.getuid()
    try:
        names = os.listdir(root)
    except OSError:
        return reaped
    for name in names:
        if not name.startswith(DIR_PREFIX):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o777 != 0o700 or path in _held:
                continue
            fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its node is alive
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        log.info("reaped the span directory %s of a node that died without closing", path)
        reaped.append(path)
    return reaped


def create_span_file(directory: str, nbytes: int) -> tuple[str, int]:
    """A new owner-only span file of ``nbytes`` in ``directory`` with a 128-bit random name,
    fully reserved (``posix_fallocate``: a full tmpfs fails here with :class:`CapacityExceeded`,
    never as SIGBUS in a mapper later). Returns ``(path, fd)``; the caller closes ``fd``."""
    path = os.path.join(directory, secrets.token_hex(16))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as ex:
        os.close(fd)
        os.unlink(path)
        raise CapacityExceeded(f"cannot reserve {nbytes} bytes in {directory}: {ex.strerror}") from None
    return path, fd


def unlink_span_file(path: str) -> None:
    """Fence a span file: unlink it (idempotent). Holders see its link count drop to 0."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def span_file_name_ok(path: object, node_dir: object, root: str = SHM_ROOT) -> bool:
    """Whether ``path`` is shaped like a span file of the node whose directory is ``node_dir``:
    ``ROOT/grafos-node.XXXX/<32 hex digits>``, with no other component (no ``..``, no slashes)."""
    if not isinstance(path, str) or not isinstance(node_dir, str):
        return False
    base = os.path.basename(node_dir)
    name = os.path.basename(path)
    return (os.path.dirname(node_dir) == root and base.startswith(DIR_PREFIX) and base not in (".", "..")
            and os.path.dirname(path) == node_dir and len(name) == 32
            and all(c in "0123456789abcdef" for c in name))


def open_span_file(path: str, node_dir: str, *, writable: bool) -> int:
    """Open a span file a grant names, checked: its directory is opened first without following
    a link (``O_NOFOLLOW``, ``O_DIRECTORY``) and must be ours and mode 0700, then the file in it
    (``O_NOFOLLOW``), which must be a regular file owned by this user. Returns the fd.

    :class:`LeaseExpired` when the file is gone (fenced); :class:`Unsupported` when it cannot be
    opened (another host, another user); :class:`Corrupted` when what is there is not a span file
    of a node of ours (a forged grant)."""
    uid = os.geteuid()
    try:
        dfd = os.open(node_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unsupported(f"no span directory {node_dir} here: the node is on another host") from None
    except OSError as ex:
        raise Unsupported(f"cannot open the span directory {node_dir}: {ex.strerror} (the node's host and "
                          f"user only)") from None
    try:
        st = os.fstat(dfd)
        if st.st_uid != uid:
            raise Unsupported(f"span directory {node_dir} belongs to uid {st.st_uid}, not to this user ({uid})")
        if st.st_mode & 0o777 != 0o700:
            raise Corrupted(f"span directory {node_dir} has mode {st.st_mode & 0o777:o}, not 700")
        try:
            fd = os.open(os.path.basename(path), (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW
                         | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK, dir_fd=dfd)
        except FileNotFoundError:
            raise LeaseExpired(f"span file {path} is gone (fenced)") from None
        except OSError as ex:
            if ex.errno == errno.ELOOP:
                raise Corrupted(f"span file {path} is a symbolic link") from None
            raise Unsupported(f"cannot open span file {path}: {ex.strerror} (the node's host and user only)") \
                from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Corrupted(f"span file {path} is not a regular file")
        if st.st_uid != uid:
            raise Unsupported(f"span file {path} belongs to uid {st.st_uid}, not to this user ({uid})")
    except BaseException:
        os.close(fd)
        raise
    return fd


class ShmFileRegistrar:
    """A :class:`~.registrar.Registrar` over tmpfs files (see the module docstring)."""

    name = "nodeshm"

    def __init__(self, pool_size: int, root: str = SHM_ROOT) -> None:
        if pool_size <= 0:
            raise FabricValueError(f"pool size must be positive, got {pool_size}")
        self.pool_size = pool_size
        self.dir = make_span_dir(root)
        self._closed = False

    def node_info(self) -> Access:
        return {"dir": self.dir}

    def register(self, offset: int, nbytes: int) -> FileSpan:
        path, fd = create_span_file(self.dir, nbytes)  # reserved now: a full /dev/shm fails here
        os.close(fd)
        return FileSpan(offset, nbytes, path)

    def fence(self, span: RegisteredSpan, holders: list[RegistrarSession]) -> None:
        assert isinstance(span, FileSpan)
        unlink_span_file(span.path)

    def deregister(self, span: RegisteredSpan) -> None:
        self.fence(span, [])

    def open_session(self, peer: str) -> RegistrarSession:
        return _NoSession()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            remove_span_dir(self.dir)


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


class LocalSpanOps:
    """The driver protocol's one-sided operations done on a span mapped into this process (CPU
    loads, stores and atomics at ``_base``), for the regions that map a node's span file:
    :class:`NodeShmRegion` and the UCX driver's ``UcxMappedRegion``. Each operation checks the
    holder first (``_live``: the lease, the span file, the node; the region's own), then the
    range and alignment; a read checks again after copying (bytes read across an expiry or a
    fence are not returned)."""

    nbytes: int
    writable: bool
    lease: Lease
    _base: Any

    def _live(self) -> None:
        raise NotImplementedError

    def _bounds(self, offset: int, n: int) -> None:
        if not isinstance(offset, int) or offset < 0 or n < 0 or offset + n > self.nbytes:
            raise CapacityExceeded(f"[{offset}, {offset}+{n}) is outside the region's {self.nbytes} bytes")

    def _word(self, offset: int) -> None:
        if not isinstance(offset, int) or offset % 8:
            raise FabricValueError(f"64-bit operations need an 8-byte aligned offset, got {offset}")
        self._bounds(offset, 8)

    def _need_write(self) -> None:
        if not self.writable:
            raise CapabilityDenied(f"lease {self.lease.id} was attached read-only")

    # -- one-sided operations -------------------------------------------------------
    def read_into(self, offset: int, buf: Buffer) -> None:
        self._live()
        dst = ffi.from_buffer(buf, require_writable=True)
        try:  # released before any raise: a traceback keeps this frame, and an exported buffer in it
            self._bounds(offset, len(dst))  # pins the caller's memoryview (the GC may clear it later)
            ffi.memmove(dst, self._base + offset, len(dst))
        finally:
            ffi.release(dst)
        self._live()  # bytes read across an expiry or fence are not returned

    def write(self, offset: int, buf: Buffer) -> None:
        self._need_write()
        self._live()
        src = ffi.from_buffer(buf)
        try:  # released before any raise (see read_into)
            self._bounds(offset, len(src))
            ffi.memmove(self._base + offset, src, len(src))
        finally:
            ffi.release(src)

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        self._need_write()
        self._live()
        self._word(offset)
        return int(lib.gf_cas_at(self._base, offset, expected & U64, desired & U64))

    def faa64(self, offset: int, add: int) -> int:
        self._need_write()
        self._live()
        self._word(offset)
        return int(lib.gf_faa_at(self._base, offset, add & U64))

    def load64(self, offset: int) -> int:
        self._live()
        self._word(offset)
        value = int(lib.gf_load_acquire_at(self._base, offset))
        self._live()
        return value

    def store64(self, offset: int, value: int) -> None:
        self._need_write()
        self._live()
        self._word(offset)
        lib.gf_store_release_at(self._base, offset, value & U64)

    def flush(self) -> None:
        """Operations are synchronous; this only checks the lease."""
        self._live()


class NodeShmRegion(LocalSpanOps):
    """A span of a ``nodeshm`` node, reached one-sided through a mapping of its file."""

    mapped = False

    def __init__(self, fabric: NodeShmFabric, link: NodeChannel, lease: Lease, grant: Grant) -> None:
        self.fabric = fabric
        self.link = link
        self.lease = lease
        self.nbytes = grant.nbytes
        path = grant.access.get("path")
        node_dir = link.info.get("dir")
        if not span_file_name_ok(path, node_dir):
            raise Corrupted(f"grant for lease {lease.id} names no span file of this node: {path!r}")
        assert isinstance(path, str) and isinstance(node_dir, str)
        self.writable = bool(grant.writable and grant.access.get("writable", False))
        try:
            self._fd = open_span_file(path, node_dir, writable=self.writable)
        except LeaseExpired:
            raise LeaseExpired(f"lease {lease.id}: its span is gone") from None
        try:
            if os.fstat(self._fd).st_size < self.nbytes:
                raise Corrupted(f"span file of lease {lease.id} is smaller than the grant")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self._mm = mmap.mmap(self._fd, self.nbytes, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(self._fd)
            raise
        self._keep = ffi.from_buffer(self._mm)
        self._base = ffi.cast("uint8_t *", self._keep)
        self.closed = False

    def ref(self) -> RegionRef:
        return self.fabric.region_ref(self.lease, self.nbytes)

    def address(self) -> int:
        raise Unsupported("a node region is not mapped into this process; use the one-sided operations")

    def view(self) -> memoryview:
        raise Unsupported("a node region is not mapped into this process; use the one-sided operations")

    # -- checks ------------------------------------------------------------------
    def _live(self) -> None:
        """Fail closed: closed region, lease ended locally, or the node fenced the span."""
        if self.closed:
            raise QueueClosed(f"region {self.lease.id} is closed")
        self.lease.check()
        if os.fstat(self._fd).st_nlink == 0:
            raise self._fenced_error()

    def _fenced_error(self) -> FabricError:
        try:
            state = self.link.lease_state(self.lease.id)
        except FabricError as ex:
            return Disconnected(f"lease {self.lease.id}: its span was fenced and the node cannot be asked: {ex}")
        cell = self.fabric.cell(self.lease.id)
        if cell is not None:
            cell.mark(state)
        if state == REVOKED:
            return Revoked(f"lease {self.lease.id} was revoked")
        if state in (EXPIRED, FREED, UNKNOWN):
            return LeaseExpired(f"lease {self.lease.id} is {state}")
        return Disconnected(f"lease {self.lease.id}: span fenced although the node reports it {state}")

    def close(self) -> None:
        """Detach (the lease stays until freed or expired); later calls raise ``QueueClosed``. Idempotent."""
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            # the mapping goes with the last reference to it (views of _keep may still be alive)

    def __repr__(self) -> str:
        return f"<NodeShmRegion {self.lease.id} {self.nbytes}B {'rw' if self.writable else 'ro'} {self.lease!r}>"


class _NodeShmConnector:
    def __init__(self, fabric: NodeShmFabric, link: NodeChannel) -> None:
        self.fabric = fabric
        self.link = link
        self.regions: list[NodeShmRegion] = []

    def region(self, lease: Lease, grant: Grant) -> NodeShmRegion:
        r = NodeShmRegion(self.fabric, self.link, lease, grant)
        self.regions = [x for x in self.regions if not x.closed]
        self.regions.append(r)
        return r

    def close(self) -> None:
        regions, self.regions = self.regions, []
        for r in regions:
            r.close()


class NodeShmFabric(RemoteFabric):
    """Client of a ``nodeshm`` memory node (same host, same user): see the module docstring."""

    driver = "nodeshm"
    schemes = ("nodeshm",)

    def __init__(self, host: str, port: int, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self.channel()  # authenticate now: a wrong secret fails before any lease

    def connector(self, link: NodeChannel) -> _NodeShmConnector:
        return _NodeShmConnector(self, link)
