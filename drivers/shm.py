"""The shm driver: leased regions in POSIX shared memory.

A *namespace* is a set of shm segments named ``/dev/shm/grafos.<ns>.<id>``.
Each segment is a 4096-byte header page (``native/gf_segment.h``: magic,
layout version written last, lease id, generation, TTL, and the lease line
with state and deadline) followed by the region's payload. Because the lease
state lives in the segment, a renew or revoke by any process is seen by every
process attached to the region, and every data operation checks it.

Segments are created owner-only (0600), sized to the request with every
page reserved up front (``posix_fallocate``: a /dev/shm too small for the
request raises ``CapacityExceeded`` at create instead of SIGBUS later),
unlinked on free, and reclaimed by :meth:`ShmFabric.reap` once their lease has
expired (safe to run from any process; ``alloc`` runs it opportunistically).

/dev/shm is shared with every user of the host, so nothing found there is
trusted: files are opened with ``O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC`` and only
regular files owned by this user are read; the reaper never unlinks what it
cannot prove is ours *and* dead (junk, a flipped magic, another layout
version, someone else's file are skipped and logged), and a segment found
shorter than its mapping raises ``Corrupted`` (``ShmRegion.check_size``).

Clock domains: a segment header records the clock its deadline is in
(``clock_domain``). ``0`` is the host-wide ``CLOCK_MONOTONIC``: every process
judges such a lease by that clock, whatever clock it was given itself. Any
other value is a private clock (a test's ``ManualClock``): only a fabric with
that very clock can attach the region or judge its deadline; every process
holding such a region keeps an OFD read lock on the segment (bytes 80..88,
the ``clock_domain`` word), and a reaper from another domain reclaims the
region only once nobody holds that lock (revoked and freed leases go at once).

The namespace's generation counter (``grafos-gen.<ns>``) is read and bumped
under ``flock``, starts at ``CLOCK_MONOTONIC`` nanoseconds when (re)created
(so a generation is never handed out twice), and is removed with the
namespace's last segment (on free, or by ``reap``).

Regions offer both modes of the driver protocol: **mapped** (``view()``,
``address()``) and **one-sided** (``mapped=False``: only ``read_into``,
``write``, ``cas64``, ``faa64``, ``load64``, ``store64``, ``flush``), so the
one-sided protocol used over RDMA runs, and is tested, on every machine.

The driver is three modules, by concept: this one (:class:`ShmFabric`: the
namespace, alloc/attach/free, the generation counter, reaping),
``_shm_region`` (:class:`ShmRegion`, its lease cell and role locks) and
``_shm_files`` (segment names, safe opening of untrusted files, the OFD
clock-domain lock, :func:`segment_info`). Their public names are imported
from here; all three log to this module's logger.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
import time
from typing import Any

from grafos_fabric import errors as E
from grafos_fabric import observe
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.lease import (
    HOST_CLOCK_DOMAIN,
    NS,
    Clock,
    Lease,
    LeaseState,
    MonotonicClock,
    check_ttl,
    clock_domain,
)

from ._shm_files import (
    _DOMAIN_OFF,
    _O_SAFE,
    _STATE_OFF,
    HEADER,
    SHM_DIR,
    _gen_path,
    _inspect,
    _not_ours,
    _ofd_hold,
    _open_error,
    _segment_path,
    segment_info,
)
from ._shm_region import ROLE_CONSUMER, ROLE_PRODUCER, ShmLeaseCell, ShmRegion, ShmRoleLock, _check_status
from .base import RegionRef

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

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_REGION = 1 << 41  # 2 TiB: anything larger is a mistake on one machine
REAP_GRACE_NS = 60 * NS  # a segment left half-built this long is garbage


def _free_bytes() -> int:
    try:
        vfs = os.statvfs(SHM_DIR)
    except OSError:
        return -1
    return int(vfs.f_bavail * vfs.f_frsize)


def _mib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.1f} MiB)"


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
        self.clock_domain = clock_domain(self.clock)
        self.url = f"shm://{namespace}"
        self._last_reap = 0.0
        self._block_store: Any = None
        self._fallback_gen = 0
        self._told: set[tuple[str, str]] = set()

    # -- allocation ---------------------------------------------------------------
    def alloc(self, nbytes: int, ttl: float) -> ShmRegion:
        """Create a region of ``nbytes`` payload bytes leased for ``ttl`` seconds.

        Every page is reserved now: when /dev/shm cannot hold the region this
        raises :class:`CapacityExceeded` (naming the request and the free
        space) and leaves nothing behind, instead of SIGBUS on a later write.
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0 or nbytes > MAX_REGION:
            raise E.FabricValueError(f"region size must be an int in (0, {MAX_REGION}], got {nbytes!r}")
        ttl = check_ttl(ttl)
        self._maybe_reap()
        lease_bytes = secrets.token_bytes(16)
        name = lease_bytes[:8].hex()
        path = _segment_path(self.namespace, name)
        size = HEADER + ((nbytes + 4095) & ~4095)
        free = _free_bytes()
        if 0 <= free < size:  # do not even try: fallocate would fill the tmpfs first
            raise E.CapacityExceeded(self._no_room(nbytes, size, free))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_SAFE, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOSPC):
                raise E.CapacityExceeded(f"cannot create {path}: {exc.strerror}") from exc
            raise E.Unsupported(f"cannot create a segment in {SHM_DIR}: {exc}") from exc
        try:
            os.fchmod(fd, 0o600)  # whatever the umask says: owner-only
            self._reserve(fd, nbytes, size)
            try:
                mm = mmap.mmap(fd, size)
            except (OSError, ValueError) as exc:
                raise E.CapacityExceeded(f"cannot map {_mib(size)} of shared memory: {exc}") from exc
            ident = os.fstat(fd)
            if self.clock_domain != HOST_CLOCK_DOMAIN:
                _ofd_hold(fd)
            now = self.clock.now_ns()
            ttl_ns = int(ttl * NS)
            seg = ffi.from_buffer(mm)
            # Before the generation: the counter file is only removed when no segment
            # of the namespace exists, and ours exists from here on.
            generation = self._next_generation()
            # Written before gf_segment_init publishes the header (SYNC POINT: segment-ready).
            lib.gf_store_release_at(seg, _DOMAIN_OFF, self.clock_domain)
            lib.gf_segment_init(seg, size, lease_bytes, generation, ttl_ns, now, now + ttl_ns, os.getpid())
            del seg
            lease = Lease(
                lease_bytes.hex(),
                ttl=ttl,
                generation=generation,
                cell=ShmLeaseCell(mm, (ident.st_dev, ident.st_ino)),
                clock=self.clock,
                resource=f"shm://{self.namespace}/{name}",
                on_free=self._free_lease,
            )
        except BaseException:  # nothing half-made stays behind: not the file, not the fd
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise
        region = ShmRegion(self, name, mm, lease, mapped=True, owner=True, fd=fd)
        observe.count("lease_allocs", driver="shm")
        observe.emit(
            "lease.alloc", lease=lease.id, resource=lease.resource, nbytes=size, ttl=ttl, generation=generation
        )
        log.debug("allocated %s (%d bytes, ttl %.3fs)", path, size, ttl)
        return region

    @staticmethod
    def _no_room(nbytes: int, size: int, free: int) -> str:
        have = f"{_mib(free)} free" if free >= 0 else "an unknown amount free"
        return (
            f"cannot create a {nbytes}-byte region ({_mib(size)} with its header page): "
            f"{SHM_DIR} has {have}; free or reap regions, ask for less, or give {SHM_DIR} more room "
            "(docker run --shm-size)"
        )

    def _reserve(self, fd: int, nbytes: int, size: int) -> None:
        """Size the segment and reserve every page (tmpfs allocates them now)."""
        while True:
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except InterruptedError:  # CPython retries EINTR itself; be explicit anyway
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM, errno.EDQUOT):
                    raise E.CapacityExceeded(self._no_room(nbytes, size, _free_bytes())) from exc
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise E.CapacityExceeded(f"cannot reserve {_mib(size)} of shared memory: {exc}") from exc
                # a filesystem without fallocate (not tmpfs): size it the old way
                log.warning("%s cannot reserve pages (%s): a full filesystem will raise SIGBUS", SHM_DIR, exc)
                try:
                    os.ftruncate(fd, size)
                except OSError as exc2:
                    raise E.CapacityExceeded(f"cannot size {_mib(size)} of shared memory: {exc2}") from exc2
                return

    def attach(self, ref: RegionRef, *, mapped: bool = True) -> ShmRegion:
        """Map the region ``ref`` names (``mapped=False``: one-sided operations only).

        The lease is judged by the clock the region was created under: a
        host-clock region by ``CLOCK_MONOTONIC`` (whatever this fabric's clock),
        a private-clock region only by a fabric holding that same clock
        (anything else raises :class:`Unsupported`).
        """
        if ref.driver != "shm":
            raise E.Unsupported(f"a {ref.driver!r} region cannot be attached by the shm driver")
        if not _NAME_RE.match(ref.name) or not _NAME_RE.match(ref.namespace):
            raise E.Corrupted(f"bad shm region name {ref.namespace!r}/{ref.name!r}")
        path = _segment_path(ref.namespace, ref.name)
        try:
            fd = os.open(path, os.O_RDWR | _O_SAFE)
        except FileNotFoundError:
            raise E.LeaseExpired(f"region {ref.namespace}/{ref.name} is gone (freed, or reclaimed after expiry)")
        except OSError as exc:
            raise E.Corrupted(f"{path} is not a segment: {_open_error(exc)}") from None
        try:
            st = os.fstat(fd)
            why = _not_ours(st)
            if why:
                raise E.Corrupted(f"{path} is not a segment of this user: {why}")
            size = st.st_size
            if size < HEADER:
                raise E.Corrupted(f"{path} is {size} bytes: shorter than a segment header")
            try:
                mm = mmap.mmap(fd, size)
            except (OSError, ValueError) as exc:
                raise E.Corrupted(f"cannot map {path}: {exc}") from exc
            seg = ffi.from_buffer(mm)
            # segment_size in the header must equal the file's size: a truncated
            # (or grown) segment is refused here, before any payload page is touched
            _check_status(lib.gf_segment_check(seg, size), path)
            hdr = ffi.cast("gf_segment_header *", seg)
            lease_id = bytes(ffi.buffer(hdr.lease_id, 16)).hex()
            if lease_id != ref.lease_id:
                raise E.LeaseExpired(f"region {ref.name} now belongs to another lease (the old one was reclaimed)")
            domain = int(hdr.clock_domain)
            ttl = max(int(hdr.ttl_ns) / NS, 1e-9)
            generation = int(hdr.generation)
            del hdr, seg
            if domain == self.clock_domain:
                clock = self.clock
                if domain != HOST_CLOCK_DOMAIN:
                    _ofd_hold(fd)
            elif domain == HOST_CLOCK_DOMAIN:
                clock = MonotonicClock()  # an injected clock only rules regions created under it
            else:
                raise E.Unsupported(
                    f"region {ref.namespace}/{ref.name} runs on another fabric's private (manual) clock: "
                    "its deadline means nothing to this process's clock; attach it through a fabric "
                    "holding that same clock object, or create it on the host clock"
                )
        except BaseException:
            os.close(fd)
            raise
        lease = Lease(
            lease_id,
            ttl=ttl,
            generation=generation,
            cell=ShmLeaseCell(mm, (st.st_dev, st.st_ino)),
            clock=clock,
            resource=f"shm://{ref.namespace}/{ref.name}",
            on_free=self._free_lease,
        )
        region = ShmRegion(self, ref.name, mm, lease, mapped=mapped, owner=False, fd=fd)
        lease.check()
        return region

    def free(self, lease: Lease) -> None:
        lease.free()

    def _free_lease(self, lease: Lease) -> None:
        cell = lease._cell
        if cell.load_state() in (LeaseState.ACTIVE, LeaseState.BUILDING):
            cell.store_state(LeaseState.FREED)
        name = lease.resource.rsplit("/", 1)[-1]
        path = _segment_path(self.namespace, name)
        ident = getattr(cell, "ident", None)
        try:
            cur = os.lstat(path)
            # only the file this lease mapped (reaped and replaced by a squatter: not ours)
            if ident is None or (cur.st_dev, cur.st_ino) == ident:
                os.unlink(path)
        except FileNotFoundError:
            pass
        self._drop_generation_if_empty()
        log.debug("freed lease %s", lease.id)

    # -- the generation counter ------------------------------------------------------
    def _next_generation(self) -> int:
        """The namespace's next lease generation (a counter that only grows).

        Read and bumped under ``flock`` on ``grafos-gen.<ns>``; a counter that is
        (re)created starts at ``CLOCK_MONOTONIC`` nanoseconds, above every
        generation the removed one handed out (fewer than one create per
        nanosecond). A counter file that is not ours (a squatter's FIFO,
        symlink or file) is never written: the generation then comes from
        ``CLOCK_MONOTONIC`` directly, and the reason is logged.
        """
        path = _gen_path(self.namespace)
        for _ in range(16):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_SAFE, 0o600)
            except OSError as exc:
                return self._fallback_generation(f"cannot open {path}: {_open_error(exc)}")
            try:
                st = os.fstat(fd)
                why = _not_ours(st)
                if why is None and st.st_mode & 0o077:
                    why = f"mode {stat.S_IMODE(st.st_mode):o} lets others write it"
                if why:
                    return self._fallback_generation(f"{path} is {why}")
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    cur = os.lstat(path)
                except FileNotFoundError:
                    continue  # removed (namespace emptied) while we waited: take the new one
                if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                    continue
                raw = os.pread(fd, 8, 0)
                value = int.from_bytes(raw, "little") if len(raw) == 8 else time.monotonic_ns()
                if value >= (1 << 62):
                    return self._fallback_generation(f"{path} holds {value}: not a counter this library wrote")
                gen = value + 1
                try:
                    os.pwrite(fd, gen.to_bytes(8, "little"), 0)
                except OSError as exc:  # ENOSPC: a full /dev/shm; a write fails, never SIGBUS
                    return self._fallback_generation(f"cannot write {path}: {exc}")
                return gen
            finally:
                os.close(fd)  # releases the flock
        return self._fallback_generation(f"{path} keeps being replaced")

    def _fallback_generation(self, why: str) -> int:
        log.warning("shm namespace %s: generation from CLOCK_MONOTONIC, not the counter: %s", self.namespace, why)
        self._fallback_gen = max(time.monotonic_ns(), self._fallback_gen + 1)
        return self._fallback_gen

    def _drop_generation_if_empty(self) -> None:
        """Remove the namespace's counter file once no segment of it is left.

        Under the counter's ``flock``, so no create is between reading and
        bumping it; a create that already made its segment keeps the counter
        alive, and one that opened the old file notices the swap (inode) and
        retries on the new one.
        """
        path = _gen_path(self.namespace)
        try:
            fd = os.open(path, os.O_RDWR | _O_SAFE)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if _not_ours(st):
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._has_segments():
                return
            cur = os.lstat(path)
            if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
                log.debug("removed the generation counter of the empty namespace %s", self.namespace)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- reaping -------------------------------------------------------------------
    def _segment_names(self) -> list[str]:
        prefix = f"grafos.{self.namespace}."
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            return []
        return [n for n in names if n.startswith(prefix)]

    def _has_segments(self) -> bool:
        """Is any file of the namespace's segments left? (Stops at the first one.)"""
        prefix = f"grafos.{self.namespace}."
        try:
            with os.scandir(SHM_DIR) as it:
                return any(entry.name.startswith(prefix) for entry in it)
        except OSError:
            return True  # cannot tell: keep the counter

    def segments(self) -> list[str]:
        return sorted(os.path.join(SHM_DIR, n) for n in self._segment_names())

    def reap(self) -> int:
        """Unlink every segment of this namespace whose lease expired, was revoked
        or freed, or that was left half-built. Returns how many were reclaimed.
        Processes still mapping a reclaimed segment keep failing closed.

        Only regular files of this user are judged, without following links or
        blocking; anything else, junk, a bad magic, another layout version or a
        live lease is skipped and logged, never unlinked. Deadlines are judged
        in the segment's own clock domain (see the module docstring). Removes
        the namespace's generation counter once no segment is left.
        """
        reaped = 0
        for path in self.segments():
            try:
                if self._reap_one(path):
                    reaped += 1
            except OSError as exc:
                self._skip(path, str(exc))
        self._drop_generation_if_empty()
        return reaped

    def _reap_one(self, path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDWR | _O_SAFE)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._skip(path, _open_error(exc))
            return False
        try:
            st = os.fstat(fd)
            why = _not_ours(st)
            if why:
                self._skip(path, why)
                return False
            info = _inspect(fd, st, path, self.clock)
            status, state = info["status"], info.get("state")
            if status == "not-ready":
                age_ns = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns)
                if age_ns <= REAP_GRACE_NS:
                    return False
                why = "left half-built"
            elif status != "ok":
                self._skip(path, f"{status}, not provably a segment of ours", logging.WARNING)
                return False
            elif state in ("revoked", "freed", "orphaned"):
                why = str(state)
            elif state == "expired":
                why = "expired"
                # mark it so late attachers of the same name fail closed too
                with mmap.mmap(fd, HEADER) as mm:
                    seg = ffi.from_buffer(mm)
                    lib.gf_cas_at(seg, _STATE_OFF, LeaseState.ACTIVE, LeaseState.FREED)
                    del seg
            else:
                return False
            # unlink only the file judged (in the sticky /dev/shm only its owner, this
            # user, can have swapped it since)
            cur = os.lstat(path)
            if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                return False
            os.unlink(path)
        finally:
            os.close(fd)
        observe.count("lease_reaped", driver="shm")
        log.info("reaped %s (%s)", path, why)
        return True

    def _skip(self, path: str, why: str, level: int = logging.INFO) -> None:
        """Say once per file and reason why reap leaves it alone (then only at DEBUG)."""
        key = (path, why)
        if key in self._told:
            level = logging.DEBUG
        elif len(self._told) < 4096:
            self._told.add(key)
        log.log(level, "reap: skipping %s: %s", path, why)

    def destroy(self) -> int:
        """Remove the whole namespace now: every segment of this user, live or
        not, and the generation counter. Processes still mapping a segment keep
        failing closed (its lease is marked freed first). Returns how many
        segments were removed. For tests, benchmarks and operators; not for
        live edges. Files that are not this user's segments are left alone."""
        removed = 0
        for path in self.segments():
            if not self._mark_freed(path):
                continue
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
        path = _gen_path(self.namespace)
        try:
            if _not_ours(os.lstat(path)) is None:
                os.unlink(path)
        except FileNotFoundError:
            pass
        return removed

    def _mark_freed(self, path: str) -> bool:
        """Mark a segment's lease freed; False if ``path`` is not a regular file of ours."""
        try:
            fd = os.open(path, os.O_RDWR | _O_SAFE)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if _not_ours(st):
                return False
            if st.st_size >= HEADER:
                with mmap.mmap(fd, HEADER) as mm:
                    seg = ffi.from_buffer(mm)
                    lib.gf_store_release_at(seg, _STATE_OFF, LeaseState.FREED)
                    del seg
        except (OSError, ValueError, BufferError):
            pass
        finally:
            os.close(fd)
        return True

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
