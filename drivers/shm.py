"""The shm driver: leased regions in POSIX shared memory.

A *namespace* is a set of shm segments named ``/dev/shm/grafos.<ns>.<id>``.
Each segment is a 4096-byte header page (``native/gf_segment.h``: magic,
layout version written last, lease id, generation, TTL, and the lease line
with state and deadline) followed by the region's payload. Because the lease
state lives in the segment, a renew or revoke by any process is seen by every
process attached to the region, and every data operation checks it.

Segments are created owner-only (0600), sized to the request, unlinked on
free, and reclaimed by :meth:`ShmFabric.reap` once their lease has expired
(safe to run from any process; ``alloc`` runs it opportunistically).

Regions offer both modes of the driver protocol: **mapped** (``view()``,
``address()``) and **one-sided** (``mapped=False``: only ``read_into``,
``write``, ``cas64``, ``faa64``, ``load64``, ``store64``, ``flush``), so the
one-sided protocol used over RDMA runs, and is tested, on every machine.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import struct
import time
from typing import Any

from grafos_fabric import errors as E
from grafos_fabric import observe
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.lease import NS, Clock, Lease, LeaseState, MonotonicClock, check_ttl

from .base import Buffer, RegionRef

__all__ = [
    "ROLE_CONSUMER",
    "ROLE_PRODUCER",
    "SHM_DIR",
    "ShmFabric",
    "ShmLeaseCell",
    "ShmRegion",
    "ShmRoleLock",
    "segment_info",
]

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
HEADER = int(lib.GF_SEG_HEADER_SIZE)
_STATE_OFF = int(ffi.offsetof("gf_segment_header", "lease_state"))
_DEADLINE_OFF = int(ffi.offsetof("gf_segment_header", "deadline_ns"))
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_REGION = 1 << 41  # 2 TiB: anything larger is a mistake on one machine
REAP_GRACE_NS = 60 * NS  # a segment left half-built this long is garbage


# Role locks: one byte of the segment file per queue role, locked with an
# open-file-description lock (Linux F_OFD_SETLK) on an fd of its own.
ROLE_PRODUCER = 0
ROLE_CONSUMER = 1
_F_OFD_SETLK = int(getattr(fcntl, "F_OFD_SETLK", 37))
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

    def __init__(self, mm: mmap.mmap) -> None:
        self._keep = ffi.from_buffer(mm)  # keeps the mapping exported while the lease lives
        self._base = ffi.cast("uint8_t *", self._keep)

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

    def __init__(self, fabric: ShmFabric, name: str, mm: mmap.mmap, lease: Lease, *, mapped: bool, owner: bool):
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

    # -- one-sided operations ----------------------------------------------------
    def _check(self) -> None:
        if self.closed:
            raise E.QueueClosed(f"region {self.name} is closed")
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
        self._bounds(offset, len(dst))
        ffi.memmove(dst, self._payload + offset, len(dst))
        self.lease.check()  # fail closed: bytes read across an expiry are not returned

    def write(self, offset: int, buf: Buffer) -> None:
        self._check()
        src = ffi.from_buffer(buf)
        self._bounds(offset, len(src))
        ffi.memmove(self._payload + offset, src, len(src))

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


def _segment_path(namespace: str, name: str) -> str:
    return os.path.join(SHM_DIR, f"grafos.{namespace}.{name}")


def segment_info(path: str, clock: Clock | None = None) -> dict[str, Any]:
    """Read a segment's header for inspection (``grafos-fabric ls``/``inspect``)."""
    clock = clock or MonotonicClock()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        info: dict[str, Any] = {"path": path, "size": size}
        if size < HEADER:
            info["status"] = "corrupted"
            return info
        with mmap.mmap(fd, HEADER, prot=mmap.PROT_READ) as mm:
            raw = bytes(mm[:HEADER])
    finally:
        os.close(fd)
    buf = ffi.from_buffer(raw)
    hdr = ffi.cast("gf_segment_header *", buf)
    rc = lib.gf_segment_check(buf, size)
    info["status"] = {
        lib.GF_OK: "ok",
        lib.GF_E_NOT_READY: "not-ready",
        lib.GF_E_VERSION: "version-mismatch",
    }.get(rc, "corrupted")
    if rc != lib.GF_OK:
        return info
    state = int(hdr.lease_state)
    deadline = int(hdr.deadline_ns)
    info.update(
        lease_id=bytes(ffi.buffer(hdr.lease_id, 16)).hex(),
        generation=int(hdr.generation),
        ttl=int(hdr.ttl_ns) / NS,
        owner_pid=int(hdr.owner_pid),
        payload=int(hdr.payload_size),
        state={0: "building", 1: "active", 2: "revoked", 3: "freed"}.get(state, f"unknown({state})"),
        remaining=(deadline - clock.now_ns()) / NS,
    )
    if state == LeaseState.ACTIVE and deadline <= clock.now_ns():
        info["state"] = "expired"
    return info


class ShmFabric:
    """A namespace of shm regions. ``open_fabric("shm://NAME")`` returns one."""

    driver = "shm"
    mapped_regions = True  # alloc() returns regions mapped into this process

    def __init__(self, namespace: str = "default", *, clock: Clock | None = None) -> None:
        if not _NAME_RE.match(namespace):
            raise E.FabricValueError(f"bad shm namespace {namespace!r}: use 1-64 of [A-Za-z0-9_-]")
        if not os.path.isdir(SHM_DIR):
            raise E.Unsupported(f"no POSIX shared memory here ({SHM_DIR} is missing)")
        self.namespace = namespace
        self.clock: Clock = clock or MonotonicClock()
        self.url = f"shm://{namespace}"
        self._last_reap = 0.0
        self._block_store: Any = None

    # -- allocation ---------------------------------------------------------------
    def alloc(self, nbytes: int, ttl: float) -> ShmRegion:
        """Create a region of ``nbytes`` payload bytes leased for ``ttl`` seconds."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0 or nbytes > MAX_REGION:
            raise E.FabricValueError(f"region size must be an int in (0, {MAX_REGION}], got {nbytes!r}")
        ttl = check_ttl(ttl)
        self._maybe_reap()
        lease_bytes = secrets.token_bytes(16)
        name = lease_bytes[:8].hex()
        path = _segment_path(self.namespace, name)
        size = HEADER + ((nbytes + 4095) & ~4095)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask says: owner-only
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
            except OSError as exc:
                os.unlink(path)
                raise E.CapacityExceeded(f"cannot allocate {size} bytes of shared memory: {exc}") from exc
        finally:
            os.close(fd)
        now = self.clock.now_ns()
        ttl_ns = int(ttl * NS)
        seg = ffi.from_buffer(mm)
        generation = self._next_generation()
        lib.gf_segment_init(seg, size, lease_bytes, generation, ttl_ns, now, now + ttl_ns, os.getpid())
        del seg
        lease = Lease(
            lease_bytes.hex(),
            ttl=ttl,
            generation=generation,
            cell=ShmLeaseCell(mm),
            clock=self.clock,
            resource=f"shm://{self.namespace}/{name}",
            on_free=self._free_lease,
        )
        region = ShmRegion(self, name, mm, lease, mapped=True, owner=True)
        observe.count("lease_allocs", driver="shm")
        observe.emit(
            "lease.alloc", lease=lease.id, resource=lease.resource, nbytes=size, ttl=ttl, generation=generation
        )
        log.debug("allocated %s (%d bytes, ttl %.3fs)", path, size, ttl)
        return region

    def attach(self, ref: RegionRef, *, mapped: bool = True) -> ShmRegion:
        """Map the region ``ref`` names (``mapped=False``: one-sided operations only)."""
        if ref.driver != "shm":
            raise E.Unsupported(f"a {ref.driver!r} region cannot be attached by the shm driver")
        if not _NAME_RE.match(ref.name) or not _NAME_RE.match(ref.namespace):
            raise E.Corrupted(f"bad shm region name {ref.namespace!r}/{ref.name!r}")
        path = _segment_path(ref.namespace, ref.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise E.LeaseExpired(f"region {ref.namespace}/{ref.name} is gone (freed, or reclaimed after expiry)")
        try:
            size = os.fstat(fd).st_size
            if size < HEADER:
                raise E.Corrupted(f"{path} is {size} bytes: shorter than a segment header")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        seg = ffi.from_buffer(mm)
        _check_status(lib.gf_segment_check(seg, size), path)
        hdr = ffi.cast("gf_segment_header *", seg)
        lease_id = bytes(ffi.buffer(hdr.lease_id, 16)).hex()
        if lease_id != ref.lease_id:
            raise E.LeaseExpired(f"region {ref.name} now belongs to another lease (the old one was reclaimed)")
        lease = Lease(
            lease_id,
            ttl=max(int(hdr.ttl_ns) / NS, 1e-9),
            generation=int(hdr.generation),
            cell=ShmLeaseCell(mm),
            clock=self.clock,
            resource=f"shm://{ref.namespace}/{ref.name}",
            on_free=self._free_lease,
        )
        del hdr, seg
        region = ShmRegion(self, ref.name, mm, lease, mapped=mapped, owner=False)
        lease.check()
        return region

    def free(self, lease: Lease) -> None:
        lease.free()

    def _free_lease(self, lease: Lease) -> None:
        cell = lease._cell
        if cell.load_state() in (LeaseState.ACTIVE, LeaseState.BUILDING):
            cell.store_state(LeaseState.FREED)
        name = lease.resource.rsplit("/", 1)[-1]
        try:
            os.unlink(_segment_path(self.namespace, name))
        except FileNotFoundError:
            pass
        log.debug("freed lease %s", lease.id)

    def _next_generation(self) -> int:
        """The namespace's lease generation counter (a shared word that only grows)."""
        path = os.path.join(SHM_DIR, f"grafos-gen.{self.namespace}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 4096)
            with mmap.mmap(fd, 4096) as mm:
                word = ffi.from_buffer(mm)
                gen = int(lib.gf_faa_at(word, 0, 1)) + 1
                del word
        finally:
            os.close(fd)
        return gen

    # -- reaping -------------------------------------------------------------------
    def segments(self) -> list[str]:
        prefix = f"grafos.{self.namespace}."
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            return []
        return sorted(os.path.join(SHM_DIR, n) for n in names if n.startswith(prefix))

    def reap(self) -> int:
        """Unlink every segment of this namespace whose lease expired, was revoked
        or freed, or that was left half-built. Returns how many were reclaimed.
        Processes still mapping a reclaimed segment keep failing closed."""
        reaped = 0
        for path in self.segments():
            try:
                info = segment_info(path, self.clock)
            except (FileNotFoundError, PermissionError):
                continue
            except OSError:
                continue
            dead = info["status"] == "corrupted" or info.get("state") in ("expired", "revoked", "freed")
            if info["status"] == "not-ready":
                try:
                    age = time.time() - os.stat(path).st_mtime
                except FileNotFoundError:
                    continue
                dead = age * NS > REAP_GRACE_NS
            if info["status"] == "ok" and info.get("state") == "expired":
                # mark it so late attachers of the same name fail closed too
                self._mark_freed(path)
            if dead:
                try:
                    os.unlink(path)
                    reaped += 1
                    observe.count("lease_reaped", driver="shm")
                    log.info("reaped %s (%s)", path, info.get("state", info["status"]))
                except FileNotFoundError:
                    pass
        return reaped

    def destroy(self) -> int:
        """Remove the whole namespace now: every segment, live or not, and the
        generation counter. Processes still mapping a segment keep failing
        closed (its lease is marked freed first). Returns how many segments
        were removed. For tests, benchmarks and operators; not for live edges."""
        removed = 0
        for path in self.segments():
            self._mark_freed(path)
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
        try:
            os.unlink(os.path.join(SHM_DIR, f"grafos-gen.{self.namespace}"))
        except FileNotFoundError:
            pass
        return removed

    def _mark_freed(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return
        try:
            with mmap.mmap(fd, HEADER) as mm:
                seg = ffi.from_buffer(mm)
                lib.gf_store_release_at(seg, _STATE_OFF, LeaseState.FREED)
                del seg
        except (OSError, ValueError, BufferError):
            pass
        finally:
            os.close(fd)

    def _maybe_reap(self) -> None:
        now = time.monotonic()
        if now - self._last_reap >= 1.0:
            self._last_reap = now
            self.reap()

    # -- block leases (the handoff record and checkpoints live there) ---------------
    def lease_block(self, nbytes: int, ttl: float, **kwargs: Any) -> Any:
        """A block lease from the configured data directory (see drivers.block)."""
        from .block import BlockStore

        if self._block_store is None:
            self._block_store = BlockStore()
        return self._block_store.lease_block(nbytes, ttl, clock=self.clock, **kwargs)

    def close(self) -> None:
        """Nothing to release: regions hold their own mappings."""

    def __repr__(self) -> str:
        return f"<ShmFabric {self.url}>"
