"""The shm driver's region: a mapped segment, its lease cell and its role locks.

:class:`ShmRegion` offers both modes of the driver protocol (see
:mod:`grafos_fabric.drivers.shm`): mapped (``view()``, ``address()``) and
one-sided (``read_into``, ``write``, ``cas64``, ``faa64``, ``load64``,
``store64``), every operation bounds- and alignment-checked and gated on the
lease in the segment header (:class:`ShmLeaseCell`). Role locks are one byte
of the segment file per queue role, held with an open-file-description lock
on an fd of their own (:class:`ShmRoleLock`), so the kernel drops them when
their holder exits. Logs go to the driver's logger (``grafos_fabric.drivers.shm``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import weakref
from typing import TYPE_CHECKING, Any

from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.lease import Lease

from ._shm_files import _DEADLINE_OFF, _F_OFD_SETLK, _STATE_OFF, HEADER, _segment_path
from .base import Buffer, RegionRef

__all__ = ["ROLE_CONSUMER", "ROLE_PRODUCER", "ShmLeaseCell", "ShmRegion", "ShmRoleLock"]

if TYPE_CHECKING:
    from .shm import ShmFabric

# one logger for the whole shm driver (its modules are one driver)
log = logging.getLogger("grafos_fabric.drivers.shm")

# Role locks: one byte of the segment file per queue role, locked with an
# open-file-description lock (Linux F_OFD_SETLK) on an fd of its own.
ROLE_PRODUCER = 0
ROLE_CONSUMER = 1
_LEASE_ID_OFF = int(ffi.offsetof("gf_segment_header", "lease_id"))


def _flock(ltype: int, start: int) -> bytes:
    """A ``struct flock`` for one byte at ``start`` (l_pid 0, as OFD locks need)."""
    return struct.pack("hhqqi4x", ltype, os.SEEK_SET, start, 1, 0)


class ShmRoleLock:
    """A held role lock (see :meth:`ShmRegion.lock_role`). ``release()`` closes
    its fd, which drops the lock (idempotent). In a child process after
    ``fork()`` the inherited fd is closed the same way: the parent's fd still
    refers to the lock, so the parent keeps it."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover - closing our own fd
                pass

    def __del__(self) -> None:
        self.release()


def _check_status(rc: int, what: str) -> None:
    if rc == lib.GF_OK:
        return
    if rc == lib.GF_E_NOT_READY:
        raise E.NotReady(f"{what}: segment is still being built")
    if rc == lib.GF_E_VERSION:
        raise E.VersionMismatch(f"{what}: segment has layout version other than {lib.GF_SEG_LAYOUT_VERSION}")
    raise E.Corrupted(f"{what}: not a grafos-fabric segment (bad magic, size or header)")


class ShmLeaseCell:
    """Lease state in a segment header: shared by every attached process."""

    def __init__(self, mm: mmap.mmap, ident: tuple[int, int] | None = None) -> None:
        self._keep = ffi.from_buffer(mm)  # keeps the mapping exported while the lease lives
        self._base = ffi.cast("uint8_t *", self._keep)
        self.ident = ident  # (st_dev, st_ino) of the segment file: free unlinks only that file

    def load_state(self) -> int:
        return int(lib.gf_load_acquire_at(self._base, _STATE_OFF))

    def load_deadline_ns(self) -> int:
        return int(lib.gf_load_acquire_at(self._base, _DEADLINE_OFF))

    def store_deadline_ns(self, deadline_ns: int) -> None:
        lib.gf_store_release_at(self._base, _DEADLINE_OFF, deadline_ns)

    def store_state(self, state: int) -> None:
        lib.gf_store_release_at(self._base, _STATE_OFF, state)


class ShmRegion:
    """A mapped shm segment; see the module docstring for the two modes."""

    def __init__(
        self,
        fabric: ShmFabric,
        name: str,
        mm: mmap.mmap,
        lease: Lease,
        *,
        mapped: bool,
        owner: bool,
        fd: int | None = None,
    ):
        self.fabric = fabric
        self.name = name
        self._mm = mm
        # from_buffer keeps the mmap exported (it cannot be unmapped under us)
        # for as long as this region or anything derived from it is alive.
        self._buf = ffi.from_buffer(mm)
        self._seg = ffi.cast("uint8_t *", self._buf)
        self._payload = self._seg + HEADER
        self.nbytes = len(mm) - HEADER
        self.lease = lease
        self.mapped = mapped
        self.owner = owner
        self.closed = False
        self._mapped_size = len(mm)
        self._shrunk = False
        # The segment's fd stays open while the region lives: check_size() fstats
        # it, and for a private-clock region it carries the OFD lock that tells
        # reapers of other clock domains that the region is still held.
        self._fd = fd
        if fd is not None:
            weakref.finalize(self, os.close, fd)

    # -- identity -------------------------------------------------------------
    def ref(self) -> RegionRef:
        return RegionRef(
            driver="shm",
            name=self.name,
            nbytes=self.nbytes,
            lease_id=self.lease.id,
            generation=self.lease.generation,
            namespace=self.fabric.namespace,
        )

    # -- native access (wrappers only) ------------------------------------------
    def segment_pointer(self) -> Any:
        return self._seg

    def lease_pointers(self) -> tuple[Any, Any]:
        """cdata pointers to the lease state and deadline words (for the ring)."""
        return (
            ffi.cast("uint64_t *", self._seg + _STATE_OFF),
            ffi.cast("uint64_t *", self._seg + _DEADLINE_OFF),
        )

    def lock_role(self, role: int) -> ShmRoleLock | None:
        """Take this segment's lock for a queue role (``ROLE_PRODUCER``,
        ``ROLE_CONSUMER``) without waiting: a :class:`ShmRoleLock` to keep for as
        long as the role is held, or None when another holder has it.

        The lock is an open-file-description lock on one byte of the segment
        file, on an fd of its own: the kernel drops it when the holder closes
        that fd or dies, whatever pid namespace it runs in, so a free lock
        proves that its last holder is gone. Two handles of one process
        conflict like two processes do."""
        if role not in (ROLE_PRODUCER, ROLE_CONSUMER):
            raise E.FabricValueError(f"unknown queue role {role!r}")
        path = _segment_path(self.fabric.namespace, self.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise E.LeaseExpired(f"region {self.name} is gone (freed, or reclaimed after expiry)") from None
        except OSError as exc:
            raise E.Unsupported(f"cannot open {path} to lock a queue role: {exc}") from None
        try:
            # the file at the path must still be this region's segment (same lease id)
            if os.pread(fd, 16, _LEASE_ID_OFF).hex() != self.lease.id:
                raise E.LeaseExpired(f"region {self.name} now belongs to another lease")
            try:
                fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_WRLCK, role))
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    return None
                raise E.Unsupported(f"open-file-description locks are not available here: {exc}") from None
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        return ShmRoleLock(fd)

    def payload_pointer(self) -> Any:
        if not self.mapped:
            raise E.Unsupported("region was attached one-sided: it is not mapped into this process")
        return self._payload

    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self.payload_pointer()))

    def view(self) -> memoryview:
        self._check()
        if not self.mapped:
            raise E.Unsupported("region was attached one-sided: it is not mapped into this process")
        return memoryview(self._mm)[HEADER:]

    # -- truncation ----------------------------------------------------------------
    def check_size(self) -> None:
        """Raise :class:`Corrupted` if the segment file is now shorter than this
        mapping (someone truncated it: touching the missing pages would raise
        SIGBUS). One ``fstat``, about a microsecond: call it before blocking
        waits. Once seen, every operation of this region raises ``Corrupted``.
        A no-op on a closed region.
        """
        if self.closed:
            return
        if not self._shrunk and self._fd is not None:
            size = os.fstat(self._fd).st_size
            if size >= self._mapped_size:
                return
            self._shrunk = True
            log.warning(
                "segment %s/%s was truncated to %d bytes under a %d-byte mapping",
                self.fabric.namespace,
                self.name,
                size,
                self._mapped_size,
            )
        if self._shrunk:
            raise E.Corrupted(
                f"region {self.fabric.namespace}/{self.name} was truncated under its mapping "
                f"(the file is shorter than the {self._mapped_size} bytes mapped): it cannot be used; "
                "allocate a new region"
            )

    # -- one-sided operations ----------------------------------------------------
    def _check(self) -> None:
        if self.closed:
            raise E.QueueClosed(f"region {self.name} is closed")
        if self._shrunk:
            self.check_size()
        self.lease.check()

    def _bounds(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.nbytes:
            raise E.CapacityExceeded(f"[{offset}, {offset + n}) is outside the region's {self.nbytes} bytes")

    def _word(self, offset: int) -> None:
        if offset % 8:
            raise E.FabricValueError(f"64-bit atomics need an 8-byte aligned offset, got {offset}")
        self._bounds(offset, 8)

    def read_into(self, offset: int, buf: Buffer) -> None:
        self._check()
        dst = ffi.from_buffer(buf, require_writable=True)
        try:  # released before any raise: a traceback keeps this frame, and an exported buffer in it
            self._bounds(offset, len(dst))  # pins the caller's memoryview (the GC may clear it later)
            ffi.memmove(dst, self._payload + offset, len(dst))
        finally:
            ffi.release(dst)
        self.lease.check()  # fail closed: bytes read across an expiry are not returned

    def write(self, offset: int, buf: Buffer) -> None:
        self._check()
        src = ffi.from_buffer(buf)
        try:  # released before any raise (see read_into)
            self._bounds(offset, len(src))
            ffi.memmove(self._payload + offset, src, len(src))
        finally:
            ffi.release(src)

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        self._check()
        self._word(offset)
        return int(lib.gf_cas_at(self._payload, offset, expected, desired))

    def faa64(self, offset: int, add: int) -> int:
        self._check()
        self._word(offset)
        return int(lib.gf_faa_at(self._payload, offset, add & 0xFFFFFFFFFFFFFFFF))

    def load64(self, offset: int) -> int:
        self._check()
        self._word(offset)
        return int(lib.gf_load_acquire_at(self._payload, offset))

    def store64(self, offset: int, value: int) -> None:
        self._check()
        self._word(offset)
        lib.gf_store_release_at(self._payload, offset, value)

    def flush(self) -> None:
        """Everything posted is complete: shm operations are synchronous."""
        self._check()

    def close(self) -> None:
        """Detach (idempotent). The mapping itself stays until nothing uses it."""
        self.closed = True

    def __repr__(self) -> str:
        mode = "mapped" if self.mapped else "one-sided"
        return f"<ShmRegion {self.fabric.namespace}/{self.name} {self.nbytes}B {mode} {self.lease!r}>"
