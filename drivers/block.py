"""Block leases: O_DIRECT block I/O over a byte range of a file or a block device.

A :class:`BlockRegion` is a leased run of fixed-size blocks. Block ``lba`` of
the region is the ``block_size`` bytes at ``offset + lba * block_size`` of the
file or device underneath. Every operation checks the lease first and fails
closed (``LeaseExpired`` after the deadline or after ``free``, ``Revoked``
after ``revoke``); an LBA range outside the region raises
``CapacityExceeded``; a buffer that is not a whole number of blocks raises
``Misaligned`` (a ``FabricValueError``); a read that finds the file shorter
than the region (truncated by another process) raises ``Corrupted``.

I/O goes through ``O_DIRECT`` with page-aligned buffers (anonymous ``mmap``),
so a write reaches the device and never sits in the page cache. ``sync()`` is
``fdatasync``: it is what makes written blocks durable (it flushes the
device's volatile cache, and for files the allocation metadata).
:meth:`BlockRegion.write_durable` is the one exception: it gathers buffers of
any alignment into one ``pwritev`` with ``RWF_DSYNC`` on a second, buffered
descriptor of the same file (durable when it returns, same promise as
``write_blocks`` + ``sync``), which costs what a raw write of those bytes
costs: no copy into an aligned buffer first (see its docstring).
:meth:`BlockRegion.write_record` writes one record of :mod:`grafos_fabric.slots`
durably in one native call (CRCs, copy and I/O with the GIL released), by the
path that measured fastest for its size and target (:meth:`BlockRegion.record_path`);
:meth:`BlockRegion.write_record_direct` (and the :class:`DirectRecordWriter` a caller keeps for
one buffer) writes a record whose data ends in the caller's block-aligned buffer from that buffer,
the CRC computed while it is in flight.
Where the filesystem refuses ``O_DIRECT`` (``EINVAL``: tmpfs on older kernels, some
FUSE filesystems) the region falls back to buffered I/O plus ``fdatasync`` and
logs a warning saying so; the durability promise is the same, only the page
cache is in the way.

Why one module of ~1000 lines: it is one class (plus ``open_block`` and the
small ``DirectRecordWriter``, which only holds buffers for the region), and
every I/O path (blocks, ``write_durable``, ``write_record`` and
``write_record_direct`` with their AIO context) shares the region's
descriptors, I/O lock and lease check; split, those private parts would have
to cross modules.

The block size is the device's, never assumed:

* block device: the logical sector size from the ``BLKSSZGET`` ioctl (512 or
  4096), and the size from ``BLKGETSIZE64``;
* regular file: the filesystem's block size (``fstatvfs().f_bsize``, 4096 on
  ext4/xfs/btrfs/tmpfs). It is the unit the filesystem allocates and is a
  multiple of every logical sector size below it, so ``O_DIRECT`` alignment
  always holds and a block never straddles two filesystem blocks. If the
  filesystem reports something that is not a power of two in [512, 65536],
  4096 is used. ``open_block(..., block_size=512)`` overrides it for files
  (for example to mimic a 512-byte-sector device in a test).

Two ways to get a region: :func:`open_block` maps a range of a file or device
you name; :class:`BlockStore` hands out block leases as preallocated files in a
data directory on persistent storage and deletes the file when the lease is
freed. The region's lease lives in this process (:class:`LocalLeaseCell`); the
bytes on disk outlive it, which is the point of block storage.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import struct
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from grafos_fabric import lease as _lease
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.errors import (
    CapacityExceeded,
    Corrupted,
    Disconnected,
    FabricValueError,
    LeaseExpired,
    Misaligned,
)
from grafos_fabric.lease import Clock, Lease, LeaseState, LocalLeaseCell

__all__ = [
    "GATHER_LIMIT",
    "VOLATILE_FILESYSTEMS",
    "BlockRegion",
    "BlockStore",
    "DirectRecordWriter",
    "RecordLane",
    "default_block_dir",
    "filesystem_type",
    "open_block",
]

log = logging.getLogger(__name__)

BLKSSZGET = 0x1268  # _IO(0x12, 104): logical sector size, int
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): device size in bytes, u64
DEFAULT_FILE_BLOCK_SIZE = 4096
GATHER_LIMIT = 64 << 10  # block devices: see BlockRegion.gather_limit
_MAX_IOV = 1024  # IOV_MAX on Linux: buffers one pwritev takes
MAX_IO_CHUNK = 8 << 20  # the aligned bounce buffer never grows past this; larger I/O is split
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
RECORD_MODES = ("auto", "gather", "direct", "aio")
AIO_CHUNK = 128 << 10  # write_record's pipelined path: bytes per request while the record is built
# record_mode "auto" on a regular file with O_DIRECT: a checkpoint lane's records up to this many bytes go
# "direct" (a 4 KiB state's two blocks: about 1 us less CPU per record than "gather" here; see
# BlockRegion.record_path)
DIRECT_SMALL_MAX = 8 << 10
# write_record_direct's AIO path: data whose whole blocks come to at most this many bytes goes out in
# two equal requests (not AIO_CHUNK ones); see _direct_chunk
DIRECT_SPLIT_MAX = 3 << 19
_AIO_EVENTS = 64
_RECORD_HEADER = 56  # slots.HEADER_FIELDS (block.py does not import slots: slots imports nothing from here)
_RECORD_DATA = 64  # slots.DATA_OFFSET
_SEQ_AT = 16  # the slot header's seq field (slots' descriptor)
_U64 = struct.Struct("<Q")
_ZEROS = bytes(1 << 16)
_LEASE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _is_block_size(value: int) -> bool:
    return 512 <= value <= 65536 and value & (value - 1) == 0


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_fds(fds: list[int], aio: list[int], gate_aio: list[int]) -> None:
    for ctx in (*aio, *gate_aio):  # no request is ever in flight here: gf_slot_write reaps all it submits
        lib.gf_aio_destroy(ctx)
    aio.clear()
    gate_aio.clear()
    for fd in fds:
        _close_fd(fd)
    fds.clear()


class BlockRegion:
    """A leased range of blocks on a file or block device (see the module docstring).

    Do not construct directly: use :func:`open_block` or
    :meth:`BlockStore.lease_block`. ``close()`` is idempotent and releases the
    file descriptor; it does not free the lease's storage. ``lease.free()``
    (or :meth:`BlockStore.free`) closes the region and gives the storage back.
    """

    def __init__(
        self,
        *,
        fd: int,
        path: str,
        offset: int,
        length: int,
        block_size: int,
        direct: bool,
        is_blockdev: bool,
        lease_id: str,
        ttl: float,
        clock: Clock | None,
        generation: int = 1,
        on_free: Callable[[BlockRegion], None] | None = None,
    ) -> None:
        self.path = path
        self.offset = offset
        self.length = length
        self.block_size = block_size
        self.nblocks = length // block_size
        self.direct = direct
        self.is_blockdev = is_blockdev
        self._fd = fd
        self._fds = [fd]  # this one, and the buffered one write_durable opens (closed together)
        self._aio: list[int] = []  # write_record's AIO context, once made (destroyed with the fds)
        # the AIO context of record lanes that write through the gate (RecordLane.gated): only
        # writes inside the gate use it, which its mutex serializes, as _io_lock does _aio's
        self._gate_aio: list[int] = []
        self._aio_failed = False  # the kernel refused AIO here once: write_record writes in one request
        self._finalizer = weakref.finalize(self, _close_fds, self._fds, self._aio, self._gate_aio)
        self._record_mode = "auto"  # how write_record writes: see record_path
        self._lane_gen = 0  # bumped when how records go out changes: a RecordLane made before is stale
        self._on_volatile: bool | None = None  # on tmpfs and the like (record_path asks once)
        self._buffered_fd: int | None = None  # write_durable's descriptor, opened on first use
        self._buffered_failed = False  # /proc/self/fd could not reopen the file: write_durable copies
        self._rwf_dsync = hasattr(os, "RWF_DSYNC")  # cleared when the kernel refuses the flag
        self._io_lock = threading.Lock()
        # record lanes that write without _io_lock pass this gate instead (gf_gate_*): close() shuts
        # it, waiting for such a write, before the descriptors go; freed with the region object
        gate = lib.gf_gate_new()
        self._gate: Any = ffi.gc(gate, lib.gf_gate_free) if gate != ffi.NULL else None
        self._bounce: mmap.mmap | None = None
        self._closed = False
        self._on_free = on_free
        clk: Clock = clock or _lease.DEFAULT_CLOCK
        ttl = _lease.check_ttl(ttl)
        self._cell = LocalLeaseCell(clk.now_ns() + int(ttl * _lease.NS))
        self.lease = Lease(
            lease_id,
            ttl=ttl,
            generation=generation,
            cell=self._cell,
            clock=clk,
            resource=f"block:{path}[{offset}:{offset + length}]",
            on_free=self._lease_freed,
        )

    # -- properties ----------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes in the region (``nblocks * block_size``)."""
        return self.length

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The file descriptor (for ``flock`` and the like); raises once closed."""
        if self._closed:
            raise Disconnected(f"block region on {self.path} is closed")
        return self._fd

    def __repr__(self) -> str:
        mode = "O_DIRECT" if self.direct else "buffered"
        state = "closed" if self._closed else mode
        return (
            f"<BlockRegion {self.path} offset={self.offset} nblocks={self.nblocks} "
            f"block_size={self.block_size} {state} lease={self.lease.id}>"
        )

    # -- checks --------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            if self.lease.freed:
                raise LeaseExpired(f"lease {self.lease.id} on {self.lease.resource} was freed")
            raise Disconnected(f"block region on {self.path} is closed")
        self.lease.check()

    def _check_range(self, lba: int, nblocks: int) -> None:
        if not isinstance(lba, int) or isinstance(lba, bool) or lba < 0:
            raise FabricValueError(f"lba must be a non-negative int, got {lba!r}")
        if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 0:
            raise FabricValueError(f"block count must be a non-negative int, got {nblocks!r}")
        if lba + nblocks > self.nblocks:
            raise CapacityExceeded(f"blocks [{lba}, {lba + nblocks}) are outside the lease's {self.nblocks} blocks")

    # -- aligned bounce buffer -----------------------------------------------
    def _buffer(self, nbytes: int) -> memoryview:
        if self._bounce is None or len(self._bounce) < nbytes:
            if self._bounce is not None:
                self._bounce.close()
            size = max(nbytes, mmap.PAGESIZE)
            size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            self._bounce = mmap.mmap(-1, size)  # page aligned: good for any O_DIRECT alignment
        return memoryview(self._bounce)[:nbytes]

    def _stale_lanes(self) -> None:
        """How records go out changed: every RecordLane made before is stale (its next write, the
        native one included, writes nothing and says so; see RecordLane)."""
        self._lane_gen += 1
        if self._gate is not None:
            lib.gf_gate_bump(self._gate)  # after a lane's write in the gate, if any, has ended

    def _disable_direct(self, why: OSError) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.direct = False
        self._stale_lanes()
        log.warning(
            "O_DIRECT I/O refused on %s (%s): falling back to buffered I/O + fdatasync", self.path, why.strerror
        )

    def _pread(self, pos: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], pos + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:
                    self._disable_direct(exc)
                    continue
                raise
            if n == 0:
                raise Corrupted(
                    f"{self.path} ends at byte {pos + done}, inside the lease's range (truncated by someone "
                    "else?): restore the file's size (or re-create the lease) before using it"
                )
            done += n

    def _pwrite(self, pos: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.pwritev(self._fd, [view[done:]], pos + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:
                    self._disable_direct(exc)
                    continue
                if exc.errno == errno.ENOSPC:
                    raise CapacityExceeded(f"no space left behind {self.path}") from exc
                raise
            if n == 0:
                raise OSError(errno.EIO, f"short write on {self.path} at byte {pos + done}")
            done += n

    # -- data operations -----------------------------------------------------
    def read_blocks(self, lba: int, n: int = 1) -> bytes:
        """Read ``n`` blocks starting at ``lba`` (a copy: ``n * block_size`` bytes)."""
        self._check()
        self._check_range(lba, n)
        out = bytearray(n * self.block_size)
        self._read_into(lba, memoryview(out))
        return bytes(out)

    def read_into(self, lba: int, buf: Any) -> None:
        """Read ``len(buf) // block_size`` blocks at ``lba`` into the writable buffer ``buf``."""
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise FabricValueError("read_into needs a writable buffer")
        if len(view) % self.block_size:
            raise Misaligned(f"buffer of {len(view)} bytes is not a multiple of the block size {self.block_size}")
        self._check()
        self._check_range(lba, len(view) // self.block_size)
        self._read_into(lba, view)

    def _read_into(self, lba: int, out: memoryview) -> None:
        pos = self.offset + lba * self.block_size
        with self._io_lock:
            for start in range(0, len(out), MAX_IO_CHUNK):
                chunk = out[start : start + MAX_IO_CHUNK]
                bounce = self._buffer(len(chunk))
                self._pread(pos + start, bounce)
                chunk[:] = bounce

    def write_blocks(self, lba: int, buf: Any) -> int:
        """Write the whole blocks in ``buf`` at ``lba``; returns the number of blocks written.

        Not durable until :meth:`sync`. ``buf`` must be a whole number of blocks
        (``Misaligned`` otherwise); it may be any bytes-like object. A writable
        buffer whose address is block-aligned (a slice of an ``mmap``, say) is
        written as is; anything else is first copied into an aligned buffer.
        """
        view = memoryview(buf).cast("B")
        if len(view) % self.block_size:
            raise Misaligned(f"buffer of {len(view)} bytes is not a multiple of the block size {self.block_size}")
        n = len(view) // self.block_size
        self._check()
        self._check_range(lba, n)
        pos = self.offset + lba * self.block_size
        with self._io_lock:
            if n and self._aligned(view):
                self._pwrite(pos, view)
                return n
            for start in range(0, len(view), MAX_IO_CHUNK):
                chunk = view[start : start + MAX_IO_CHUNK]
                bounce = self._buffer(len(chunk))
                bounce[:] = chunk
                self._pwrite(pos + start, bounce)
        return n

    def _aligned(self, view: memoryview) -> bool:
        """Whether ``view`` can go to O_DIRECT as is (writable, block-aligned address)."""
        if view.readonly or not view.c_contiguous:
            return False
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError):
            return False
        return addr % max(self.block_size, 512) == 0

    def _buffered(self) -> int | None:
        """A descriptor without ``O_DIRECT`` on the same file (not the same path: the same inode)."""
        if self._buffered_fd is None and not self._buffered_failed:
            if not self.direct:
                self._buffered_fd = self._fd
                return self._fd
            try:
                bfd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                self._buffered_failed = True
                log.info("cannot reopen %s without O_DIRECT (%s): write_durable copies", self.path, exc)
                return None
            a, b = os.fstat(self._fd), os.fstat(bfd)
            if (a.st_dev, a.st_ino, a.st_rdev) != (b.st_dev, b.st_ino, b.st_rdev):  # pragma: no cover
                os.close(bfd)
                self._buffered_failed = True
                return None
            self._buffered_fd = bfd
            self._fds.append(bfd)
        return self._buffered_fd

    @property
    def gather_limit(self) -> int:
        """(For :meth:`write_durable` callers; the slot store now goes through :meth:`write_record`
        and :meth:`record_path`.) The largest write for which :meth:`write_durable` (through the
        page cache) is the faster way to a durable write here; above it an aligned copy and ``O_DIRECT`` win.

        Measured with checkpoints of each kind interleaved op by op on a virtual disk: on a regular
        file (ext4, tmpfs) the page-cache path was ahead at every size (1 MiB on ext4: 0.84x of a
        raw aligned write against 0.78x for copy + O_DIRECT); on a block device (a loop device) it
        was level at 4 KiB and behind at 1 MiB (0.70x against 0.75x), so a block device gets
        :data:`GATHER_LIMIT`. A region that fell back to buffered I/O has no limit."""
        return GATHER_LIMIT if self.is_blockdev and self.direct else 1 << 62

    def write_durable(self, lba: int, parts: Sequence[Any]) -> int:
        """Write ``parts`` back to back at ``lba`` and make them durable; returns the blocks written.

        ``parts`` are bytes-like objects of any size and alignment that
        together make whole blocks (``Misaligned`` otherwise). They go out in
        one gathered ``pwritev`` with ``RWF_DSYNC`` on a buffered descriptor of
        the same file (``pwritev`` + ``fdatasync`` where the kernel refuses the
        flag): the kernel copies them once into the page cache and writes them
        back before returning, so nothing is copied into an aligned buffer
        first, and the call is durable when it returns, like
        :meth:`write_blocks` followed by :meth:`sync`. Reads stay coherent
        (Linux writes dirty pages back before an ``O_DIRECT`` read, and the
        flag leaves none). The same checks as :meth:`write_blocks`; where the
        file cannot be reopened without ``O_DIRECT`` it is exactly
        ``write_blocks`` + ``sync``. A write torn by a crash may leave any
        subset of its blocks, as with any write.
        """
        views = [p if type(p) is bytes else memoryview(p).cast("B") for p in parts]
        if len(views) > _MAX_IOV:  # more than one pwritev takes: join them (a copy, only then)
            views = [b"".join(views)]
        total = sum(len(v) for v in views)
        if total % self.block_size:
            raise Misaligned(f"{total} bytes is not a multiple of the block size {self.block_size}")
        n = total // self.block_size
        self._check()
        self._check_range(lba, n)
        pos = self.offset + lba * self.block_size
        with self._io_lock:
            fd = self._buffered()
            if fd is None:
                buf = self._buffer(total) if total else memoryview(b"")
                at = 0
                for v in views:
                    buf[at : at + len(v)] = v
                    at += len(v)
                self._pwrite(pos, buf)
                os.fdatasync(self._fd)
                return n
            self._pwrite_gather(fd, pos, views, total)
        return n

    def _pwrite_gather(self, fd: int, pos: int, views: list[Any], total: int) -> None:
        if self._rwf_dsync and total:  # the usual case: one call writes it all, durably
            try:
                if os.pwritev(fd, views, pos, os.RWF_DSYNC) == total:
                    return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    if exc.errno == errno.ENOSPC:
                        raise CapacityExceeded(f"no space left behind {self.path}") from exc
                    raise
                self._rwf_dsync = False
                log.info("RWF_DSYNC refused on %s (%s): pwritev + fdatasync", self.path, exc.strerror)
            # a short write (or the flag refused): the loop below writes it all again, piece by piece
        views = [memoryview(v).cast("B") for v in views if len(v)]
        synced = False
        while views:
            try:
                if self._rwf_dsync:
                    done = os.pwritev(fd, views, pos, os.RWF_DSYNC)
                    synced = True
                else:
                    done = os.pwritev(fd, views, pos)
            except OSError as exc:
                if self._rwf_dsync and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._rwf_dsync = False
                    log.info("RWF_DSYNC refused on %s (%s): pwritev + fdatasync", self.path, exc.strerror)
                    continue
                if exc.errno == errno.ENOSPC:
                    raise CapacityExceeded(f"no space left behind {self.path}") from exc
                raise
            if done <= 0:
                raise OSError(errno.EIO, f"short write on {self.path} at byte {pos}")
            pos += done
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views and done:
                views[0] = views[0][done:]
            if views:
                synced = False  # a short write: what landed is durable, the rest is written next
        if not synced:
            os.fdatasync(fd)

    # -- slot records (grafos_fabric.slots) ----------------------------------
    @property
    def record_mode(self) -> str:
        """How :meth:`write_record` writes records: one of :data:`RECORD_MODES` (see :meth:`record_path`)."""
        return self._record_mode

    @record_mode.setter
    def record_mode(self, mode: str) -> None:
        if mode not in RECORD_MODES:
            raise FabricValueError(f"record_mode must be one of {RECORD_MODES}, got {mode!r}")
        self._record_mode = mode
        self._stale_lanes()

    def record_path(self, nbytes: int, immutable: bool, *, checkpoint: bool = False) -> str:
        """How :meth:`write_record` writes a record of ``nbytes``: ``"gather"``, ``"direct"`` or ``"aio"``.

        ``record_mode`` (``"auto"``, the default, or one of the three) decides; ``"gather"`` needs
        pieces nobody can change while they are written (``immutable``: ``bytes``), else the record
        is copied (``"direct"``), and ``"aio"`` only splits records over :data:`AIO_CHUNK` (smaller
        ones, or where the kernel refused AIO, go ``"direct"``). ``"auto"`` takes what measured
        fastest (tools/bench_checkpoint.py ``--modes``, checkpoints of each path interleaved on
        the same slots; README "Checkpoint speed"): for a checkpoint lane's records
        (``checkpoint=True``: ``RecordLane``, and an aligned state's ``write_record_direct``) on a
        regular file with ``O_DIRECT``, ``"direct"`` up to :data:`DIRECT_SMALL_MAX` (a 4 KiB
        state's record: one copy, which also computes the CRC, then the write; measured on an ext4
        file by the thread's CPU time per record, interleaved with the raw write op by op, about
        1 us less than ``"gather"``, whose page-cache copy is a second pass over the data; other
        records, a handoff's, keep ``"gather"``: it leaves them in the page cache for same-host
        readers, which a handoff reader opened with ``direct=False`` polls); ``"gather"`` up to
        :data:`AIO_CHUNK` otherwise, and on a block device (4 KiB states ahead of ``"direct"`` on
        a loop device) and on a volatile filesystem (tmpfs: no device to overlap with, and the
        copy is the cost: 0.50x against 0.37x for ``"aio"`` at 1 MiB); ``"aio"`` above it (1 MiB
        on an ext4 file, three runs at load 5-15: 0.44-0.86x of the best raw write against
        0.31-0.69x for ``"gather"`` and 0.39-0.61x for ``"direct"``, which copies before the
        device starts; on a loop device 0.53-0.66x against 0.58-0.62x and 0.47-0.55x).
        """
        mode = self._record_mode
        if mode == "auto":
            mode = self._auto_mode(nbytes, checkpoint)
        if mode == "gather" and not immutable:
            return "direct"
        if mode == "aio" and (self._aio_failed or nbytes <= AIO_CHUNK):
            return "direct"
        return mode

    def _auto_mode(self, nbytes: int, checkpoint: bool = False) -> str:
        """``record_mode`` ``"auto"``'s choice for a record of ``nbytes`` (see :meth:`record_path`)."""
        if not self.direct or self._volatile():
            return "gather"
        if nbytes > AIO_CHUNK:
            return "aio"
        if checkpoint and nbytes <= DIRECT_SMALL_MAX and not self.is_blockdev:
            return "direct"
        return "gather"

    def _volatile(self) -> bool:
        """Whether the file is on tmpfs or the like (looked up once)."""
        if self._on_volatile is None:
            self._on_volatile = not self.is_blockdev and filesystem_type(self.path) in VOLATILE_FILESYSTEMS
        return self._on_volatile

    @staticmethod
    def _new_aio(into: list[int]) -> int:
        """A new AIO context appended to ``into`` (0), or -errno where the kernel refused one."""
        ctx = ffi.new("uint64_t *")
        rc = int(lib.gf_aio_setup(_AIO_EVENTS, ctx))
        if rc == 0:
            into.append(int(ctx[0]))
        return rc

    def _aio_ctx(self) -> int:
        if not self._aio:
            rc = self._new_aio(self._aio)
            if rc < 0:
                self._aio_failed = True
                self._stale_lanes()
                log.info("no AIO context for %s (%s): records go out in one request", self.path, os.strerror(-rc))
                return 0
        return self._aio[0]

    def _gate_aio_ctx(self) -> int:
        """The AIO context of gated record lanes (0: none: the kernel refused one, or no gate).

        A lane whose write goes by AIO cannot share :meth:`_aio_ctx`'s context outside
        ``_io_lock`` (one write could reap another's completions); writes through the gate are
        serialized by the gate's mutex instead, so they share this second one."""
        if self._gate is None or self._aio_failed:
            return 0
        if not self._gate_aio:
            rc = self._new_aio(self._gate_aio)
            if rc < 0:
                log.info("no AIO context for %s's record lanes (%s)", self.path, os.strerror(-rc))
                return 0
        return self._gate_aio[0]

    def write_record(self, lba: int, header: bytes, parts: Sequence[Any], nbytes: int) -> int:
        """Write one slot record at ``lba`` and make it durable; returns the blocks written.

        The record (the format is :mod:`grafos_fabric.slots`'s) is ``header`` (its 56 bytes with
        ``data_crc`` and ``header_crc`` zero), zeros to byte 64, the ``parts`` back to back, zeros
        to ``nbytes`` (whole blocks, ``Misaligned`` otherwise). One native call, with the GIL
        released, computes the data's CRC32C and the header's, puts them into the header and
        writes the record durably, by the path :meth:`record_path` picks:

        * ``"gather"``: header, parts and padding in one gathered ``pwritev`` with ``RWF_DSYNC``
          on the buffered descriptor (parts checksummed where they lie, no copy: only for
          ``bytes`` parts, which nobody can change between the checksum and the write);
        * ``"direct"``: copied into the page-aligned buffer with the CRC in the same pass, then one
          ``O_DIRECT`` write with ``RWF_DSYNC``;
        * ``"aio"``: the same copy, but each 128 KiB of the record is submitted (Linux AIO,
          ``O_DIRECT``) as soon as it is copied, so the copy and the CRC overlap the device's
          work; the first block (the header, which needs the CRC) goes last, then one
          ``fdatasync``. Where the kernel refuses AIO it falls back to ``"direct"``.

        Every path writes the same bytes (``slots.pack_record``'s) into the same blocks; a write
        torn by a crash may leave any subset of them, which the record's CRCs catch. The same
        checks as :meth:`write_blocks`.
        """
        if len(header) != _RECORD_HEADER:
            raise FabricValueError(f"a record header is {_RECORD_HEADER} bytes, got {len(header)}")
        bs = self.block_size
        if nbytes % bs or nbytes <= 0:
            raise Misaligned(f"{nbytes} bytes is not a positive multiple of the block size {bs}")
        if len(parts) > _MAX_IOV - 2:  # more than one pwritev takes: join them (a copy, only then)
            parts = [b"".join(parts)]
        bufs, lens, n, immutable = [], [], 0, True
        for p in parts:  # one pass: the C pointers, the lengths, and whether anyone could change them
            if type(p) is not bytes:
                p = memoryview(p).cast("B")
                immutable = immutable and type(p.obj) is bytes
            bufs.append(ffi.from_buffer(p))
            lens.append(len(p))
            n += len(p)
        if _RECORD_DATA + n > nbytes:
            raise CapacityExceeded(f"a record of {n} data bytes does not fit {nbytes} bytes")
        self._check()
        self._check_range(lba, nbytes // bs)
        pos = self.offset + lba * bs
        with self._io_lock:
            path = self.record_path(nbytes, immutable)
            if path == "gather":
                fd = self._buffered()
                if fd is not None:
                    pad = nbytes - _RECORD_DATA - n
                    zeros = _ZEROS if pad <= len(_ZEROS) else bytes(pad)
                    rc = lib.gf_slot_write_gather(fd, pos, header, bufs, lens, len(bufs), zeros, pad, 1)
                    self._raise_io(rc)
                    return nbytes // bs
                path = "direct"
            ctx = self._aio_ctx() if path == "aio" else 0
            cbuf = ffi.from_buffer(self._buffer(nbytes))
            rc = lib.gf_slot_write(self._fd, pos, cbuf, nbytes, bs, header, bufs, lens, len(bufs), ctx, AIO_CHUNK, 1)
            if rc == -errno.EINVAL and self.direct:  # O_DIRECT refused by a filesystem that took the flag at open
                self._disable_direct(OSError(errno.EINVAL, os.strerror(errno.EINVAL)))
                rc = lib.gf_slot_write(self._fd, pos, cbuf, nbytes, bs, header, bufs, lens, len(bufs), 0, 0, 1)
            if rc in (1, 2):
                self._aio_failed = True
                self._stale_lanes()
                if rc == 2:  # gf_slot_write destroyed the context to end requests it could not reap
                    self._aio.clear()
                log.info("AIO refused on %s: records go out in one request", self.path)
            self._raise_io(rc)
        return nbytes // bs

    def takes_direct(self, data: Any) -> bool:
        """Whether :meth:`write_record_direct` writes ``data`` from where it lies: a C-contiguous
        buffer whose address is block-aligned (any buffer shorter than a block: only its copy goes out)."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if not view.c_contiguous:
            return False
        if view.nbytes < self.block_size:
            return True
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError):  # read-only: ask cffi, which takes those too
            addr = int(ffi.cast("uintptr_t", ffi.from_buffer(view)))
        return addr % self.block_size == 0

    def write_record_direct(self, lba: int, head: bytes, data: Any) -> int:
        """Write the slot record ``head + data`` at ``lba`` durably, ``data`` from where it lies; returns blocks.

        ``head`` is the record's first bytes up to a block boundary (the 56 header bytes with both
        CRCs zero, zeros to byte 64, the first data bytes); ``data``, the rest of the record's
        data, a C-contiguous buffer at a block-aligned address (:meth:`takes_direct`,
        ``Misaligned`` otherwise). One native call (``gf_slot_write_direct``, GIL released):
        ``data``'s whole blocks are submitted first, by Linux AIO with ``O_DIRECT``, straight
        from the caller's memory (no copy; two equal requests up to :data:`DIRECT_SPLIT_MAX`,
        :data:`AIO_CHUNK` ones above it), the data CRC32C is computed while they are in flight,
        then the header block (now holding both CRCs) follows, and ``data``'s last partial block
        (copied into an aligned block, zero-padded); one ``fdatasync`` once all have landed.
        Where the whole blocks make two requests or more, the first is held back and goes with
        the header block (one vectored request), and the last partial block with the last one:
        a 1 MiB state is two requests. That is
        ``record_mode`` ``"aio"``, and ``"auto"`` for ``data`` over :data:`AIO_CHUNK` on a disk or
        block device. Otherwise the CRC comes first, then one gathered ``pwritev`` with
        ``RWF_DSYNC``: on the region's ``O_DIRECT`` descriptor (``"direct"``, and where AIO is
        refused), or through the page cache (``"gather"``, and ``"auto"`` for smaller ``data``
        or on tmpfs: a kernel copy, which measured level with ``O_DIRECT`` at 4 KiB on an ext4
        file and about twice as fast on a loop device). The same bytes as :meth:`write_record` of
        ``[head[64:], data]``; a write torn by a crash fails the record's CRCs. ``data`` must not
        change until this returns (the record would then fail its CRC on read). A caller that
        writes the same buffer again and again keeps a :meth:`direct_writer` instead.
        """
        writer = self.direct_writer(len(head), data)
        try:
            writer.head[:] = head
            return writer.write(lba)
        finally:
            writer.close()

    def direct_writer(self, head_len: int, data: Any) -> DirectRecordWriter:
        """A :class:`DirectRecordWriter` for records of a ``head_len``-byte head and ``data``
        (checked as :meth:`write_record_direct` does: ``Misaligned``)."""
        bs = self.block_size
        if head_len < bs or head_len % bs or head_len < _RECORD_DATA:
            raise Misaligned(f"a record head is a positive multiple of the block size {bs}, got {head_len} bytes")
        view = data if isinstance(data, memoryview) else memoryview(data)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if not self.takes_direct(view):
            raise Misaligned(f"data for write_record_direct must be C-contiguous at a {bs}-byte aligned address")
        return DirectRecordWriter(self, head_len, view)

    def _direct_io(self, n: int) -> tuple[int, int, int]:
        """How a record of an aligned state with ``n`` data bytes goes out now (``write_record_direct``
        and a record lane): the descriptor, the AIO context (0: none) and the request size."""
        bs = self.block_size
        mode = self._record_mode
        if mode == "auto":  # as record_path, for the record's size (its head block at least)
            mode = self._auto_mode(n + bs, checkpoint=True)
        ctx, fd = 0, self._fd
        if mode == "aio" and self.direct and not self._aio_failed and n >= bs:
            ctx = self._aio_ctx()
        elif mode == "gather":  # one pwritev2 with RWF_DSYNC through the page cache (a kernel copy)
            bfd = self._buffered()
            fd = self._fd if bfd is None else bfd
        return fd, ctx, _direct_chunk(n // bs * bs, bs)

    def _write_direct(self, w: DirectRecordWriter, lba: int) -> int:
        """DirectRecordWriter.write: the checks and the one native call."""
        if self._closed:
            self._check()
        if w._mm.closed:
            raise Disconnected("this DirectRecordWriter is closed")
        self.lease.check()
        bs = self.block_size
        if lba < 0 or lba + w.nblocks > self.nblocks:
            self._check_range(lba, w.nblocks)
        pos = self.offset + lba * bs
        with self._io_lock:
            if self._closed:  # closed while this thread waited for the lock
                self._check()
            fd, ctx, chunk = self._direct_io(w.n)
            args = (pos, w._hptr, w.head_len, bs, w._dptr, w.n, w._tptr)
            rc = lib.gf_slot_write_direct(fd, *args, ctx, chunk, 1)
            if rc:
                if rc == -errno.EINVAL and self.direct and fd == self._fd:  # O_DIRECT refused after open
                    self._disable_direct(OSError(errno.EINVAL, os.strerror(errno.EINVAL)))
                    rc = lib.gf_slot_write_direct(self._fd, *args, 0, chunk, 1)
                if rc in (1, 2):
                    self._aio_failed = True
                    self._stale_lanes()
                    if rc == 2:  # the context was destroyed to end requests it could not reap
                        self._aio.clear()
                    log.info("AIO refused on %s: records go out in one request", self.path)
                self._raise_io(rc)
        return w.nblocks

    def record_lane(
        self, lbas: tuple[int, int], head_len: int, data: Any, *, aligned: bool, split: bool = False
    ) -> RecordLane:
        """A :class:`RecordLane`: the same writes as :meth:`write_record` (``aligned=False``) or
        :meth:`write_record_direct` (``aligned=True``) of records whose first ``head_len`` bytes are
        the lane's ``head`` and whose last ones are ``data``, at either of the two ``lbas``, with
        every choice (path, descriptor, buffers, C pointers, argument lists) made once here.

        ``aligned=False``: ``data`` is a ``bytes`` object (:meth:`RecordLane.take` points the lane at
        another one of the same length); ``head_len`` >= 64 (the 56 header bytes, zeros, then the
        record's first data bytes). ``aligned=True``: as :meth:`direct_writer` (``head_len`` a
        multiple of the block size, ``data`` a block-aligned buffer, ``Misaligned`` otherwise).
        ``split=True`` (``bytes`` ``data`` only) lets the lane write ``data`` from its own memory
        where it would go out by AIO (over :data:`AIO_CHUNK`, ``O_DIRECT``): the lane then puts
        :attr:`RecordLane.pad` zero bytes and ``data``'s bytes up to its first block-aligned address
        after the head, so that address starts a block of the record (:attr:`RecordLane.split`
        says whether it does; see the class). ``CapacityExceeded`` when a record does not fit from
        either lba."""
        bs = self.block_size
        n = len(data) if not aligned else memoryview(data).nbytes
        if aligned:
            if head_len < bs or head_len % bs:
                raise Misaligned(f"a record head is a positive multiple of the block size {bs}, got {head_len} bytes")
        elif type(data) is not bytes or head_len < _RECORD_DATA:
            raise FabricValueError("a record lane without aligned=True takes a bytes object after a 64-byte head")
        # a split record: at most one block more (the zero padding before the data's aligned part)
        nbytes = head_len + n if aligned else -(-(head_len + n) // bs) * bs + (bs if split else 0)
        nblocks = head_len // bs + -(-n // bs) if aligned else nbytes // bs
        for lba in lbas:
            self._check_range(lba, nblocks)
        self._check()
        return RecordLane(self, lbas, head_len, data, aligned, nblocks, split)

    def _raise_io(self, rc: int) -> None:
        if rc >= 0:
            return
        if rc == -errno.ENOSPC:
            raise CapacityExceeded(f"no space left behind {self.path}")
        raise OSError(-rc, f"{os.strerror(-rc)}: writing a record to {self.path}")

    def sync(self) -> None:
        """Make every block written so far durable (``fdatasync``)."""
        self._check()
        os.fdatasync(self._fd)

    @contextlib.contextmanager
    def locked(self, *, shared: bool = False) -> Iterator[None]:
        """Hold an ``flock`` on the underlying file or device node while in the block.

        ``flock`` locks the whole file (not just this region's range) and is
        held per open file description: two regions, in one process or in
        two, serialize; it is dropped if the process dies.
        """
        fd = self.fileno()
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            if not self._closed:
                fcntl.flock(fd, fcntl.LOCK_UN)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Release the file descriptor (idempotent). The storage and its bytes stay."""
        if self._closed:
            return
        self._closed = True
        with self._io_lock:  # no write_record may be using the AIO context or the descriptors
            if self._gate is not None:  # nor a record lane's write outside the lock (RecordLane.gated)
                lib.gf_gate_shut(self._gate)
            self._finalizer()
        self._buffered_fd = None
        if self._bounce is not None:
            with contextlib.suppress(BufferError):
                self._bounce.close()
            self._bounce = None

    def _lease_freed(self, lease: Lease) -> None:
        self._cell.store_state(LeaseState.FREED)
        self.close()
        if self._on_free is not None:
            self._on_free(self)

    def __enter__(self) -> BlockRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirectRecordWriter:
    """Writes slot records whose data ends in one caller's buffer, from that buffer (no copy).

    Made by :meth:`BlockRegion.direct_writer`. ``head`` is a writable, block-aligned buffer of
    ``head_len`` bytes that the caller fills before each :meth:`write` (the 56 header bytes with
    both CRCs zero, anything in bytes 56-63, which the write zeroes, then the record's first data
    bytes); the data buffer given at creation is the rest of the data, and must stay as it is
    while a write runs. :meth:`write` is :meth:`BlockRegion.write_record_direct` without its
    per-call checks and copies (the buffers are checked and their C pointers taken once), for a
    stage that checkpoints the same buffer again and again. ``close()`` releases the buffers.
    """

    def __init__(self, region: BlockRegion, head_len: int, data: memoryview) -> None:
        bs = region.block_size
        align = max(bs, mmap.PAGESIZE)
        size = -(-(head_len + bs) // mmap.PAGESIZE) * mmap.PAGESIZE + align - mmap.PAGESIZE
        self._mm = mmap.mmap(-1, size)
        base = ffi.from_buffer(self._mm)
        skip = -int(ffi.cast("uintptr_t", base)) % align
        self.region = region
        self.head_len = head_len
        self.n = len(data)
        self.nblocks = head_len // bs + -(-self.n // bs)
        self.head = memoryview(self._mm)[skip : skip + head_len]
        self._data = data
        self._hptr = base + skip
        self._tptr = self._hptr + head_len
        self._dptr = ffi.from_buffer(data)
        self._base = base

    def write(self, lba: int) -> int:
        """Write the record (``head``, then the data) at ``lba`` and make it durable; returns blocks."""
        return self.region._write_direct(self, lba)

    def close(self) -> None:
        """Release the buffers (idempotent); the writer cannot write afterwards."""
        if self._mm.closed:
            return
        self.head.release()
        ffi.release(self._base)
        ffi.release(self._dptr)
        self._mm.close()


class RecordLane:
    """Writes slot records of one shape at two fixed places, again and again, for a few lines of Python.

    Made by :meth:`BlockRegion.record_lane` for the slot store's two slots (the checkpoint of a
    ``bytes`` state of a fixed length, or of an aligned buffer). A record is ``head`` (writable,
    ``head_len`` bytes, filled by the caller before each :meth:`write`: the 56 header bytes, both
    CRCs zero, anything in bytes 56-63, which the write zeroes, then the record's first data bytes)
    followed by the data. What :meth:`BlockRegion.write_record` (or ``write_record_direct``)
    decides and checks on every call (the path, the descriptor, the AIO context, the request
    size, C pointers to every buffer, the lbas' range) is decided once, here, into the argument
    list of the one native call (the same call those methods make, so the same bytes go out the
    same way). :meth:`write` then checks the lease and the region and makes that call: a
    checkpoint's Python after its I/O is a few lines (the rest of the gap to a raw write measured
    on an ext4 file was Python run with cold caches around the I/O; README "Checkpoint speed").
    :meth:`write` returns False, writing nothing, once the region changed how it writes records
    (``record_mode`` set, ``O_DIRECT`` or AIO refused): the caller writes that record the ordinary
    way and makes a new lane. ``close()`` releases the buffers.
    """

    def __init__(
        self,
        region: BlockRegion,
        lbas: tuple[int, int],
        head_len: int,
        data: Any,
        aligned: bool,
        nblocks: int,
        split: bool = False,
    ) -> None:
        bs = region.block_size
        self.region = region
        self.head_len = head_len
        self.nblocks = nblocks
        self.aligned = aligned
        self.split = False  # set below when a bytes record goes out from the bytes' own memory
        self.pad = 0  # zero bytes the lane puts after head (a split lane's, for the current data)
        self._gen = region._lane_gen
        pos = [region.offset + lba * bs for lba in lbas]
        align = max(bs, mmap.PAGESIZE)
        if aligned:
            view = memoryview(data)
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            if not region.takes_direct(view):
                raise Misaligned(f"data for a record lane must be C-contiguous at a {bs}-byte aligned address")
            self.n = n = len(view)
            extra = bs  # the tail block: data's last partial block, zero-padded
        else:
            self.n = n = len(data)
            nbytes = -(-(head_len + n) // bs) * bs
            path = region.record_path(nbytes, True, checkpoint=True)
            if path == "gather" and region._buffered() is None:
                path = "direct"
            self.split = split and path == "aio" and n >= bs and region._aio_ctx() != 0
            extra = 0 if path == "gather" else nbytes  # the aligned record buffer gf_slot_write builds in
            if self.split:
                extra = bs  # the tail block
        head_room = -(-(head_len + (2 * bs if self.split else 0)) // align) * align
        self._mm = mmap.mmap(-1, -(-(head_room + extra) // mmap.PAGESIZE) * mmap.PAGESIZE + align - mmap.PAGESIZE)
        base = ffi.from_buffer(self._mm)
        skip = -int(ffi.cast("uintptr_t", base)) % align
        self._base = base
        self.head = memoryview(self._mm)[skip : skip + head_len]
        hptr = self._hptr0 = base + skip
        xptr = hptr + head_room
        self.data: Any = data
        self._keep: list[Any] = []  # zeros, pointer arrays: alive as long as the lane
        self._fn: Any
        self._args: tuple[tuple[Any, ...], ...]
        self._bufs: Any = None  # a gathered lane's two data pointers (head's prefix, the bytes)
        self.gated = False  # set below where the write needs no lock but the region's gate
        self.c: Any = None  # a gated lane's gf_lane (every argument of its write, for gf_lane_write)
        # a lane writing by AIO through the gate uses the gated lanes' context (_gate_aio_ctx), not
        # the region's, which only writes under _io_lock may use; failing that, the region's, and
        # the lane writes under _io_lock (not gated)
        self._gate_ctx = 0
        gate = region._gate
        if aligned:
            self._dptr = ffi.from_buffer(view)
            self._keep.append(view)
            fd, ctx, chunk = region._direct_io(n)
            if ctx:
                self._gate_ctx = region._gate_aio_ctx()
                ctx = self._gate_ctx or ctx
            self._fn = lib.gf_slot_write_direct
            self._args = tuple((fd, p, hptr, head_len, bs, self._dptr, n, xptr, ctx, chunk, 1) for p in pos)
            if (ctx == 0 or self._gate_ctx) and gate is not None:
                self._gate_args(lib.gf_slot_write_direct_gated, gate)
                self._lane_struct(
                    gate, lib.GF_LANE_DIRECT, fd, pos, data=self._dptr, data_len=n, tail=xptr, aio_ctx=ctx, chunk=chunk
                )
        elif self.split:  # the bytes' block-aligned part from where it lies (see _point)
            self._fn = lib.gf_slot_write_direct
            self._pos = pos
            self._gate_ctx = region._gate_aio_ctx()
            self._hptr, self._tptr, self._ctx = hptr, xptr, self._gate_ctx or region._aio_ctx()
            if self._gate_ctx:  # the pointers _point sets
                self._lane_struct(
                    gate, lib.GF_LANE_DIRECT, region._fd, pos, data=ffi.NULL, data_len=0, tail=xptr, aio_ctx=self._ctx
                )
            self._point(data)
        else:
            self._dptr = ffi.from_buffer(data)
            self._bufs = ffi.new("uint8_t *[2]", [hptr + _RECORD_DATA, self._dptr])
            lens = ffi.new("uint64_t[2]", [head_len - _RECORD_DATA, n])
            self._keep.append(lens)
            if path == "gather":
                pad = nbytes - head_len - n
                zeros = ffi.from_buffer(_ZEROS if pad <= len(_ZEROS) else bytes(pad))
                self._keep.append(zeros)
                bfd = region._buffered()
                self._fn = lib.gf_slot_write_gather
                self._args = tuple((bfd, p, hptr, self._bufs, lens, 2, zeros, pad, 1) for p in pos)
                if gate is not None:
                    self._gate_args(lib.gf_slot_write_gather_gated, gate)
                    self._lane_struct(gate, lib.GF_LANE_GATHER, bfd, pos, lens=lens, zeros=zeros, pad=pad)  # type: ignore[arg-type]
            else:
                ctx = region._aio_ctx() if path == "aio" else 0
                self._fn = lib.gf_slot_write
                self._args = tuple(
                    (region._fd, p, xptr, nbytes, bs, hptr, self._bufs, lens, 2, ctx, AIO_CHUNK, 1) for p in pos
                )
                if ctx == 0 and gate is not None:
                    self._gate_args(lib.gf_slot_write_gated, gate)
                    self._lane_struct(gate, lib.GF_LANE_COPY, region._fd, pos, lens=lens, buf=xptr, nbytes=nbytes)
        # the descriptor the writes go to (a gated call's arguments start with the gate, head and slot)
        self._fd_used = self._args[0][3 if self.gated else 0]

    def _gate_args(self, fn: Any, gate: Any) -> None:
        """Write through the region's gate (no AIO context, or the gated lanes' own: nothing shared
        with the region's other writes but the descriptor, which the gate guards): :attr:`gated`,
        and the caller of the lane's native call may skip the region's I/O lock
        (``SlotLane.write``). The gated call
        takes the record's sequence number first and puts it (and the slot, ``i``) into ``head``'s
        header itself: ``self._fn(seq, *self._args[i])``."""
        self._fn = fn
        self._args = tuple((gate, self._hptr0, i, *a) for i, a in enumerate(self._args))
        self.gated = True

    def _lane_struct(
        self,
        gate: Any,
        kind: int,
        fd: int,
        pos: list[int],
        *,
        lens: Any = None,
        zeros: Any = None,
        pad: int = 0,
        buf: Any = None,
        nbytes: int = 0,
        data: Any = None,
        data_len: int = 0,
        tail: Any = None,
        aio_ctx: int = 0,
        chunk: int = 0,
    ) -> None:
        """:attr:`c`: a ``gf_lane`` holding the gated write's arguments (the same ones as ``_args``),
        for ``gf_lane_write``: one native call with the sequence number, the slot, two u64 fields
        (:meth:`values_at`) and the lease's deadline, which checks the lane's generation, whether it
        is closed, and the deadline itself (``SlotLane.write``, ``CheckpointedStageState.checkpoint``)."""
        c = ffi.new("gf_lane *")
        c.gate = gate
        c.hdr = self._hptr0
        c.hdr_len = self.head_len
        c.gen = lib.gf_gate_gen(gate)
        c.kind = kind
        c.pos = pos
        c.fd = fd
        c.dsync = 1
        c.block = self.region.block_size
        if kind == lib.GF_LANE_DIRECT:
            c.data, c.data_len, c.tail = data, data_len, tail
            c.aio_ctx, c.chunk = aio_ctx, chunk  # the gated lanes' AIO context (0: none), its request size
        else:
            c.parts, c.lens, c.nparts = self._bufs, lens, 2
            if kind == lib.GF_LANE_GATHER:
                c.zeros, c.pad = zeros, pad
            else:
                c.buf, c.nbytes = buf, nbytes
        self.c = c

    def values_at(self, at0: int, at1: int) -> None:
        """Where in :attr:`head` ``gf_lane_write`` stores its two u64 values (0: nowhere)."""
        if self.c is not None:
            self.c.at = [at0, at1]

    @property
    def live(self) -> bool:
        """Whether :meth:`write` can still write: open, the region open and writing records as it did."""
        return not self._mm.closed and not self.region._closed and self._gen == self.region._lane_gen

    def _point(self, data: bytes) -> None:
        """A split lane: write ``data`` next, its first block-aligned byte at a block boundary.

        ``k`` bytes of ``data`` lie before its first block-aligned address (a ``bytes`` object's
        bytes start 32 bytes into the object, which is never aligned); those go into the head
        block after :attr:`pad` zero bytes chosen so that ``head_len + pad + k`` is a whole number
        of blocks, and the rest is written by ``O_DIRECT`` from ``data`` itself (its last partial
        block from the tail buffer), as ``gf_slot_write_direct`` writes an aligned state."""
        bs = self.region.block_size
        ptr = ffi.from_buffer(data)  # keeps data alive while the lane points at it
        k = min(-int(ffi.cast("uintptr_t", ptr)) % bs, len(data))
        pad = -(self.head_len + k) % bs
        at = self._hptr + self.head_len
        ffi.memmove(at, _ZEROS, pad)
        ffi.memmove(at + pad, ptr, k)
        rest = len(data) - k
        head = self.head_len + pad + k
        chunk = _direct_chunk(rest // bs * bs, bs)
        self._args = tuple(
            (self.region._fd, p, self._hptr, head, bs, ptr + k, rest, self._tptr, self._ctx, chunk, 1)
            for p in self._pos
        )
        c = self.c
        if c is not None:  # gated (the gated lanes' AIO context): the same write through the gate
            self._gate_args(lib.gf_slot_write_direct_gated, self.region._gate)
            lib.gf_lane_point(c, head, ptr + k, rest, chunk)  # after a write in the gate: never a mix
        self._dptr = ptr
        self.pad = pad
        self.data = data

    def take(self, data: Any) -> bool:
        """Point a ``bytes`` lane at ``data`` (True) when it is a ``bytes`` object of the lane's length."""
        if type(data) is not bytes or len(data) != self.n or self._mm.closed or self.aligned:
            return False
        if self.split:
            self._point(data)
            return True
        ptr = ffi.from_buffer(data)  # keeps data alive while the lane points at it
        self._bufs[1] = ptr
        self._dptr = ptr
        self.data = data
        return True

    def write(self, i: int) -> bool:
        """Write the record (``head``, then the data) at the lane's ``i``-th lba and make it durable.

        True once durable; False, with nothing written, when the lane is stale (see the class).
        Raises what :meth:`BlockRegion.write_record` raises (the lease, a closed region, I/O).
        ``head``'s header is written as the caller filled it (a gated lane's native call stores
        the sequence it is given and ``i`` into it: here, the ones already there)."""
        region = self.region
        if region._closed or self._mm.closed:
            if self._mm.closed:
                raise Disconnected("this RecordLane is closed")
            region._check()
        region.lease.check()
        with region._io_lock:
            if self._gen != region._lane_gen or region._closed:
                return False  # stale, or closed while this thread waited: the caller's ordinary path
            if self.gated:
                rc = self._fn(_U64.unpack_from(self.head, _SEQ_AT)[0], *self._args[i])
            else:
                rc = self._fn(*self._args[i])
            if rc:
                return self._failed(rc)
        return True

    def _failed(self, rc: int) -> bool:
        """After a native call returned ``rc`` != 0 (the region's I/O lock held)."""
        region = self.region
        if rc in (1, 2):  # durable, by the one-request fallback: AIO is off from now on
            region._aio_failed = True
            region._stale_lanes()
            if rc == 2:  # the context was destroyed to end requests it could not reap
                (region._gate_aio if self._gate_ctx else region._aio).clear()
            log.info("AIO refused on %s: records go out in one request", region.path)
            return True
        if rc == -errno.EBADF and region._closed:  # the gate was shut: closed while this write waited
            region._check()
        if rc == -errno.EINVAL and region.direct and self._fd_used == region._fd:  # O_DIRECT refused
            region._disable_direct(OSError(errno.EINVAL, os.strerror(errno.EINVAL)))
            return False  # the caller writes this record the ordinary (now buffered) way
        region._raise_io(rc)
        return True  # pragma: no cover - _raise_io raised

    def close(self) -> None:
        """Release the buffers (idempotent); the lane cannot write afterwards."""
        if self._mm.closed:
            return
        if self.c is not None:
            lib.gf_lane_close(self.c)  # after a write of this lane in the gate, if any: none can start now
        self.head.release()
        ffi.release(self._base)
        self._mm.close()
        self._keep.clear()
        self.data = None


def _direct_chunk(whole: int, bs: int) -> int:
    """The most bytes per AIO request for :meth:`BlockRegion.write_record_direct`'s ``whole`` bytes
    of whole data blocks: two equal requests (rounded up to a block) up to :data:`DIRECT_SPLIT_MAX`,
    :data:`AIO_CHUNK` above it. Why two: a 1 MiB state on an ext4 file on virtio-blk measured
    about 10% faster (interleaved, same process: the C call alone) in two 512 KiB requests than in
    eight of 128 KiB, whose last one lagged the others by ~100 us, or in one of 1 MiB; from 2 MiB
    on, 128 KiB requests were as fast or faster. The requests are submitted together either way."""
    if whole > DIRECT_SPLIT_MAX:
        return AIO_CHUNK
    return max(AIO_CHUNK, -(-whole // (2 * bs)) * bs)


def _device_geometry(fd: int) -> tuple[bool, int, int]:
    """(is_blockdev, logical block size, size in bytes) for an open file or device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        ssz = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0)))[0]
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, struct.pack("Q", 0)))[0]
        return True, int(ssz), int(size)
    if stat.S_ISREG(st.st_mode):
        bsize = os.fstatvfs(fd).f_bsize
        return False, (bsize if _is_block_size(bsize) else DEFAULT_FILE_BLOCK_SIZE), st.st_size
    raise FabricValueError("a block lease needs a regular file or a block device")


def _reserve(fd: int, size: int) -> None:
    """Grow a regular file to ``size`` bytes with its blocks reserved (no ENOSPC later)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CapacityExceeded(f"no space for {size} bytes") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # the filesystem cannot reserve: a sparse file it is


def _open_fd(path: str, *, create_size: int | None, direct: bool) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_CLOEXEC
    if create_size is not None:
        flags |= os.O_CREAT
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.warning("O_DIRECT refused by the filesystem of %s: using buffered I/O + fdatasync", path)
    return os.open(path, flags, 0o600), False


def open_block(
    path: str | os.PathLike[str],
    offset: int = 0,
    length: int | None = None,
    *,
    ttl: float | None = None,
    clock: Clock | None = None,
    create_size: int | None = None,
    block_size: int | None = None,
    direct: bool = True,
    lease_id: str | None = None,
    generation: int = 1,
    _on_free: Callable[[BlockRegion], None] | None = None,
) -> BlockRegion:
    """Map ``length`` bytes at ``offset`` of a regular file or block device as a block lease.

    ``offset`` and ``length`` must be whole blocks (``Misaligned``); ``length``
    defaults to every whole block from ``offset`` to the end. A range past the
    end of the file or device raises ``CapacityExceeded``. ``create_size``
    creates a missing regular file (or grows a smaller one) to that many bytes,
    with the space reserved. ``ttl`` defaults to the longest TTL a lease may
    have (the range is yours until you free it). ``block_size`` overrides the
    filesystem block size for regular files (a power of two in [512, 65536]);
    block devices always use their logical sector size. ``direct=False`` skips
    ``O_DIRECT``. A missing path without ``create_size`` raises
    ``FileNotFoundError``; anything but a regular file or block device raises
    ``FabricValueError``. Freeing the lease closes the region; the file stays.
    """
    for name, value in (("offset", offset), ("length", length), ("create_size", create_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise FabricValueError(f"{name} must be a non-negative int, got {value!r}")
    if length == 0:
        raise FabricValueError("length must be positive")
    if block_size is not None and not (isinstance(block_size, int) and _is_block_size(block_size)):
        raise FabricValueError(f"block_size must be a power of two in [512, 65536], got {block_size!r}")
    ttl_value = _lease.MAX_TTL if ttl is None else _lease.check_ttl(ttl)
    spath = os.fspath(path)
    fd, is_direct = _open_fd(spath, create_size=create_size, direct=direct)
    try:
        is_blockdev, bs, size = _device_geometry(fd)
        if is_blockdev:
            if block_size is not None and block_size != bs:
                raise FabricValueError(f"{spath} has {bs}-byte logical blocks; block_size={block_size} refused")
        else:
            if block_size is not None:
                bs = block_size
            if create_size is not None and size < create_size:
                _reserve(fd, create_size)
                size = create_size
        if offset % bs:
            raise Misaligned(f"offset {offset} is not a multiple of the block size {bs}")
        if length is None:
            length = (size - offset) // bs * bs if size > offset else 0
            if length == 0:
                raise CapacityExceeded(f"no whole {bs}-byte block at offset {offset} of {spath} ({size} bytes)")
        elif length % bs:
            raise Misaligned(f"length {length} is not a multiple of the block size {bs}")
        if offset + length > size:
            raise CapacityExceeded(f"range [{offset}, {offset + length}) is past the end of {spath} ({size} bytes)")
        return BlockRegion(
            fd=fd,
            path=spath,
            offset=offset,
            length=length,
            block_size=bs,
            direct=is_direct,
            is_blockdev=is_blockdev,
            lease_id=lease_id or f"blk-{uuid.uuid4().hex[:16]}",
            ttl=ttl_value,
            clock=clock,
            generation=generation,
            on_free=_on_free,
        )
    except BaseException:
        os.close(fd)
        raise


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: str | os.PathLike[str], mounts: str = "/proc/mounts") -> str | None:
    """The type of the filesystem that holds ``path`` (from ``/proc/mounts``), or None if unknown."""
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = _unescape_mount(parts[1])
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and (best is None or len(mnt) >= best[0]):
                    best = (len(mnt), parts[2])
    except OSError:
        return None
    return None if best is None else best[1]


def default_block_dir() -> Path:
    """``$GRAFOS_BLOCK_DIR``, else ``$XDG_DATA_HOME/grafos-fabric/blocks`` (``~/.local/share/...``)."""
    env = os.environ.get("GRAFOS_BLOCK_DIR")
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "grafos-fabric" / "blocks"


class BlockStore:
    """Hands out block leases as preallocated files in a data directory.

    ``data_dir`` defaults to :func:`default_block_dir`. The directory should be
    on persistent storage: a warning is logged when it is on tmpfs/ramfs
    (checked against ``/proc/mounts``), because everything in it is lost at
    reboot. Each lease is one file ``<lease_id>.blk``; ``lease.free()`` (or
    :meth:`free`) deletes it. Closing a region keeps the file, so a restarted
    process can :meth:`attach` to it by id and read its checkpoints back.
    """

    SUFFIX = ".blk"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        clock: Clock | None = None,
        block_size: int | None = None,
        direct: bool = True,
    ) -> None:
        self.path = Path(data_dir) if data_dir is not None else default_block_dir()
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.clock = clock
        self.block_size = block_size
        self.direct = direct
        self.fstype = filesystem_type(self.path)
        self.volatile = self.fstype in VOLATILE_FILESYSTEMS
        if self.volatile:
            log.warning(
                "block store %s is on %s: leases will not survive a reboot "
                "(set GRAFOS_BLOCK_DIR to a directory on persistent storage)",
                self.path,
                self.fstype,
            )

    def _file(self, lease_id: str) -> Path:
        if not isinstance(lease_id, str) or not _LEASE_ID_RE.match(lease_id):
            raise FabricValueError(f"not a block lease id: {lease_id!r}")
        return self.path / f"{lease_id}{self.SUFFIX}"

    def _unit(self) -> int:
        if self.block_size is not None:
            return self.block_size
        bsize = os.statvfs(self.path).f_bsize
        return bsize if _is_block_size(bsize) else DEFAULT_FILE_BLOCK_SIZE

    def lease_block(self, nbytes: int, ttl: float, clock: Clock | None = None) -> BlockRegion:
        """A new block lease of at least ``nbytes`` bytes (rounded up to whole blocks)."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise FabricValueError(f"nbytes must be a positive int, got {nbytes!r}")
        ttl = _lease.check_ttl(ttl)
        unit = self._unit()
        size = -(-nbytes // unit) * unit
        lease_id = uuid.uuid4().hex
        file = self._file(lease_id)
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _reserve(fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                file.unlink()
            raise
        os.close(fd)
        try:
            region = self._open(lease_id, ttl, clock)
        except BaseException:
            with contextlib.suppress(OSError):
                file.unlink()
            raise
        log.debug("leased %d bytes of block storage as %s", size, file)
        return region

    def _open(self, lease_id: str, ttl: float, clock: Clock | None) -> BlockRegion:
        return open_block(
            self._file(lease_id),
            ttl=ttl,
            clock=clock or self.clock,
            block_size=self.block_size,
            direct=self.direct,
            lease_id=lease_id,
            _on_free=self._release,
        )

    def attach(self, lease_id: str, ttl: float | None = None, clock: Clock | None = None) -> BlockRegion:
        """Open an existing lease's storage again (after a restart). ``LeaseExpired`` if it was freed."""
        file = self._file(lease_id)
        if not file.exists():
            raise LeaseExpired(f"no block lease {lease_id} in {self.path} (freed, or never allocated here)")
        return self._open(lease_id, _lease.MAX_TTL if ttl is None else ttl, clock)

    def free(self, lease: Lease | BlockRegion | str) -> None:
        """Free a lease by object or id: its region closes and its file is deleted (idempotent)."""
        if isinstance(lease, BlockRegion):
            lease.lease.free()
        elif isinstance(lease, Lease):
            lease.free()
        else:
            with contextlib.suppress(FileNotFoundError):
                self._file(lease).unlink()

    def _release(self, region: BlockRegion) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(region.path).unlink()
        log.debug("freed block lease %s", region.lease.id)

    def leases(self) -> list[str]:
        """Ids of the leases whose files are in the directory."""
        return sorted(p.name[: -len(self.SUFFIX)] for p in self.path.glob(f"*{self.SUFFIX}"))
