"""Two alternating slots: the durable record format under checkpoints and handoff records.

Descriptor: slot record (one per slot, from the slot's first byte)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                  magic ("PCHK" or "GHOF")                     |  0
    +---------------------------------------------------------------+
    |                        version (u32)                          |  4
    +---------------------------------------------------------------+
    |                                                               |  8
    +                     data_len (u64, bytes)                     +
    |                                                               | 12
    +---------------------------------------------------------------+
    |                                                               | 16
    +               seq (u64, slot sequence, >= 1)                  +
    |                                                               | 20
    +---------------------------------------------------------------+
    |                                                               | 24
    +        tag (u64, the format's own: handoff generation)        +
    |                                                               | 28
    +---------------------------------------------------------------+
    |                 data_crc (u32, CRC32C of data)                | 32
    +---------------------------------------------------------------+
    |                    slot (u32, 0 or 1)                         | 36
    +---------------------------------------------------------------+
    |              block_size (u32, bytes per block)                | 40
    +---------------------------------------------------------------+
    |        slot_blocks (u32, blocks per slot, header included)    | 44
    +---------------------------------------------------------------+
    |            header_crc (u32, CRC32C of bytes 0..47)            | 48
    +---------------------------------------------------------------+
    |                       reserved (zero)                         | 52
    +---------------------------------------------------------------+
    |                       reserved (zero)                         | 56
    +---------------------------------------------------------------+
    |                       reserved (zero)                         | 60
    +---------------------------------------------------------------+
    |         data (data_len bytes), then zero to a block end       | 64
    +---------------------------------------------------------------+

All integers are little-endian. The record area is a block region split into
two equal slots of ``slot_blocks = nblocks // 2`` blocks: slot ``i`` starts at
block ``i * slot_blocks``. A record is the 56 header bytes above, zero to byte
64, then its data (``data_len`` bytes) from byte :data:`DATA_OFFSET` (64) of
the slot, zero-padded to whole blocks: a small record (up to ``block_size -
64`` bytes) is one block, and a 4 KiB state on 4 KiB blocks takes two blocks,
not three. Magic, version and data length sit at offsets 0, 4 and 8 as in the
grafOS ``PCHK``/``DCHK`` header, extended after those fields with the slot
sequence, a tag, CRC32C checksums (Castagnoli, the ``crc32c`` package) and the
geometry. Checkpoints use magic ``PCHK``, version 3, or 4 for a checkpoint
whose state (or, for a ``bytes`` state written from its own memory, the
state's first block-aligned byte) starts at a block boundary of the slot (the
same slot layout: the checkpoint's envelope, in :mod:`grafos_fabric.checkpoint`,
pads its data so, and an older build must refuse what it would misread); handoff records
``GHOF``, version 2. The previous versions (``PCHK`` 2, ``GHOF`` 1: the same header,
data from the slot's second block) are still read, never written; grafOS's
``PCHK`` version 1 (single slot, no checksum, cannot be validated) and any
other version are refused with ``VersionMismatch``.

Who writes, who reads, what makes a record visible. One writer at a time
(a stage for its checkpoints; the handoff writer holds an ``flock``) writes
the slot that does *not* hold the newest valid record, with sequence
``newest + 1``: the whole record (header and data) made durable by one native
call on a ``BlockRegion`` (``BlockRegion.write_record``: a gathered ``pwritev``
with ``RWF_DSYNC`` through the page cache; or one ``O_DIRECT`` write with
``RWF_DSYNC`` from an aligned copy; or, for large records, that copy submitted
in 128 KiB requests as it is made, the first block, which holds the header,
last, then one ``fdatasync``), or on any other device one write from an aligned
buffer then one ``sync``; ``write`` returns once the record is durable. The
requests of one record are never ordered among themselves, and need not be:
until the last has landed the slot fails a checksum. The record is
valid exactly when its header checksum (bytes 0..47, which include
``data_crc``) and its data checksum both match, so the two checksums cover
every byte the reader uses. Any reader reads both slots, keeps those whose
magic, version, header CRC, geometry, sequence, length and data CRC all check
out, and takes the one with the highest sequence. A write torn anywhere (any
subset of its sectors landed, in any order) fails a checksum (but for a
2**-32 CRC collision per torn record) and the reader falls back to the other
slot, which the write never touched; if no slot is valid the reader raises
(``NoRecord`` when both are blank, ``VersionMismatch`` for a format version
this build does not speak, ``Corrupted`` otherwise), it never makes a record
up. A sequence above 2**63 - 1 is impossible (one record per nanosecond for
292 years) and marks the slot invalid, so a forged one cannot stop the next
write. A slot whose blocks cannot be read (a file truncated by another
process, a media error) is invalid too: the reader falls back to the other.

Why one flush is enough (DESIGN's "data, sync, header, sync" ordered two
flushes so that a header could never be durable before its data). The order
only matters if a reader could accept a header whose data did not land; here
the header carries the data's CRC and is itself checksummed, so such a slot
is rejected like any torn one, and the previous record, in the other slot, is
intact because no write of this record touches it. What a writer may rely on
is unchanged: when ``write`` returns the record is durable (the flush came
after every byte of it), and until then a crash leaves the previous record.
The cost of the second flush bought a guarantee against CRC collisions on
torn records only; the two-slot rule already guarantees that the previous
record survives. ``durability`` (``"ordered"``, the default, or
``"single-sync"``) is still accepted; since this format both mean one write
and one flush.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import crc32c as _crc32c

from ._ffi import ffi, lib
from ._item import SlotStoreBase
from .errors import CapacityExceeded, Corrupted, FabricValueError, Misaligned, NoRecord, VersionMismatch
from .lease import Lease, LeaseState, LocalLeaseCell, MonotonicClock

__all__ = [
    "DATA_OFFSET",
    "GHOF",
    "HEADER_FIELDS",
    "HEADER_SIZE",
    "MAX_SEQ",
    "PCHK",
    "BlockDevice",
    "Durability",
    "SlotFormat",
    "SlotHeader",
    "SlotLane",
    "SlotPosition",
    "SlotRecord",
    "SlotStatus",
    "SlotStore",
    "crc32c",
    "pack_header",
    "pack_record",
]

log = logging.getLogger(__name__)

HEADER_SIZE = 512  # the header of a legacy record: the first 512 bytes of its own block
DATA_OFFSET = 64  # where a record's data starts in its slot (current versions)
_HEADER = struct.Struct("<4sIQQQIIIIII")
HEADER_FIELDS = _HEADER.size  # 56
_CRC_END = 48  # header_crc covers bytes [0, 48)
_ACTIVE = LeaseState.ACTIVE
MAX_SEQ = (1 << 63) - 1  # a larger sequence is forged: a real one would take centuries to reach
_I64 = 1 << 63  # the native lane call's deadline is an int64: [-_I64, _I64)
assert HEADER_FIELDS == 56

Durability = Literal["ordered", "single-sync"]


def crc32c(data: Any) -> int:
    """CRC32C (Castagnoli) of a bytes-like object."""
    return int(_crc32c.crc32c(data))


def _copy_crc(dst: memoryview, src: bytes | memoryview, crc: int) -> int:
    """Copy ``src`` into ``dst`` (same length) and return the CRC32C continued from ``crc``, in one pass."""
    if len(src) < 256:  # a native call costs more than the two passes here
        dst[:] = src
        return int(_crc32c.crc32c(src, crc))
    return int(lib.gf_crc32c_copy(ffi.from_buffer(dst), ffi.from_buffer(src), len(src), crc))


class BlockDevice(Protocol):
    """What the slot store needs from a block lease (``drivers.block.BlockRegion`` has it)."""

    block_size: int
    nblocks: int
    lease: Lease

    def read_blocks(self, lba: int, n: int = 1) -> bytes: ...
    def write_blocks(self, lba: int, buf: Any) -> int: ...
    def sync(self) -> None: ...


@dataclass(frozen=True)
class SlotFormat:
    """A record kind: its magic, the version this build writes, and the others it reads.

    ``version`` records (and ``variants``: versions with the same slot layout whose data the
    record kind reads its own way, written when the writer asks for them) hold their data from
    byte :data:`DATA_OFFSET` of the slot; ``legacy_version`` records (same header) from the slot's
    second block, and are only read.
    """

    magic: bytes
    version: int
    name: str
    legacy_version: int | None = None
    variants: tuple[int, ...] = ()

    @property
    def readable(self) -> tuple[int, ...]:
        """Every version this build reads, newest first."""
        legacy = () if self.legacy_version is None else (self.legacy_version,)
        return tuple(sorted({self.version, *self.variants, *legacy}, reverse=True))

    def data_start(self, version: int, block_size: int) -> int:
        """Byte offset of the data in a slot, for a record of ``version``."""
        return block_size if version == self.legacy_version else DATA_OFFSET


PCHK = SlotFormat(b"PCHK", 3, "checkpoint", legacy_version=2, variants=(4,))
GHOF = SlotFormat(b"GHOF", 2, "handoff", legacy_version=1)


def pack_header(
    fmt: SlotFormat,
    *,
    data_len: int,
    seq: int,
    tag: int,
    data_crc: int,
    slot: int,
    block_size: int,
    slot_blocks: int,
    version: int | None = None,
) -> bytes:
    """The 56 header bytes (header CRC included) for these fields."""
    body = _HEADER.pack(
        fmt.magic,
        fmt.version if version is None else version,
        data_len,
        seq,
        tag,
        data_crc,
        slot,
        block_size,
        slot_blocks,
        0,
        0,
    )
    return body[:_CRC_END] + struct.pack("<II", crc32c(body[:_CRC_END]), 0)


def pack_record(
    fmt: SlotFormat,
    data: bytes,
    *,
    seq: int,
    tag: int,
    slot: int,
    block_size: int,
    slot_blocks: int,
    version: int | None = None,
    **fields: int,
) -> bytes:
    """A whole record (header and data, zero-padded to whole blocks) as a slot holds it.

    ``version`` may name ``fmt.legacy_version`` (data from the second block);
    ``fields`` override header fields (``data_len``, ``data_crc``) to forge
    records in tests and tools.
    """
    v = fmt.version if version is None else version
    start = fmt.data_start(v, block_size)
    header = pack_header(
        fmt,
        data_len=fields.pop("data_len", len(data)),
        seq=seq,
        tag=tag,
        data_crc=fields.pop("data_crc", crc32c(data)),
        slot=slot,
        block_size=block_size,
        slot_blocks=slot_blocks,
        version=v,
    )
    if fields:
        raise FabricValueError(f"unknown header fields {sorted(fields)}")
    body = header + bytes(start - len(header)) + data
    return body + bytes(-len(body) % block_size)


@dataclass(frozen=True)
class SlotHeader:
    """The fields of a slot header, as read (not yet validated)."""

    magic: bytes
    version: int
    data_len: int
    seq: int
    tag: int
    data_crc: int
    slot: int
    block_size: int
    slot_blocks: int
    header_crc: int
    crc_ok: bool

    @classmethod
    def parse(cls, raw: bytes) -> SlotHeader:
        if len(raw) < HEADER_FIELDS:
            raise Corrupted(f"a slot header needs {HEADER_FIELDS} bytes, got {len(raw)}")
        f = _HEADER.unpack_from(raw)
        return cls(
            magic=f[0],
            version=f[1],
            data_len=f[2],
            seq=f[3],
            tag=f[4],
            data_crc=f[5],
            slot=f[6],
            block_size=f[7],
            slot_blocks=f[8],
            header_crc=f[9],
            crc_ok=crc32c(raw[:_CRC_END]) == f[9],
        )


@dataclass(frozen=True)
class SlotRecord:
    """A valid record: the slot it is in, its sequence, tag, data and format version."""

    slot: int
    seq: int
    tag: int
    data: bytes
    version: int = 0


class SlotPosition(NamedTuple):
    """Where a write put its record: the slot and the sequence number."""

    slot: int
    seq: int


@dataclass(frozen=True)
class SlotStatus:
    """What a scan found in one slot. ``state`` is one of ``empty``, ``valid``, ``foreign``
    (wrong magic), ``torn`` (a checksum fails), ``version`` (a version this build does not
    speak), ``geometry`` (written with another slot size or block size), ``length``
    (a data length that cannot fit the slot, or a sequence number out of range) or
    ``unreadable`` (the slot's blocks cannot be read: a truncated file, a media error)."""

    slot: int
    state: str
    detail: str = ""
    header: SlotHeader | None = None
    record: SlotRecord | None = None


class SlotStore(SlotStoreBase):
    """Two alternating slots on a block lease (see the module descriptor).

    ``read()`` returns the newest valid record or raises; ``write(data, tag=)``
    makes a new record durable and returns it. The store caches which slot is
    newest after its first read or write; pass ``refresh=True`` to ``write``
    when another process may have written since (the handoff writer does).
    """

    def __init__(self, dev: BlockDevice, fmt: SlotFormat, *, durability: Durability = "ordered") -> None:
        if durability not in ("ordered", "single-sync"):
            raise FabricValueError(f"durability must be 'ordered' or 'single-sync', got {durability!r}")
        bs = int(dev.block_size)
        if bs < HEADER_SIZE:
            raise FabricValueError(f"block size {bs} is smaller than the {HEADER_SIZE}-byte header")
        if dev.nblocks < 2:
            raise CapacityExceeded(
                f"a {fmt.name} needs at least 2 blocks (two slots of one header block), the lease has {dev.nblocks}"
            )
        self.dev = dev
        self.fmt = fmt
        self.durability: Durability = durability
        self.block_size = bs
        self.slot_blocks = dev.nblocks // 2
        self._newest: tuple[int, int] | None = None  # (slot, seq) of the newest valid record, once known
        self._scratch: mmap.mmap | None = None  # page-aligned: header block + data blocks of one record
        self._direct: Any = None  # write_direct's DirectRecordWriter, kept while the data buffer is the same
        # the class's write_record (a BlockRegion's), never one a wrapper's __getattr__ forwards: a
        # wrapper (fault injection, recording) must see every write through its own write_blocks
        self._write_record: Any = getattr(type(dev), "write_record", None)

    @property
    def capacity(self) -> int:
        """The most data bytes one record can hold."""
        return self.slot_blocks * self.block_size - DATA_OFFSET

    def _capacity_of(self, version: int) -> int:
        return self.slot_blocks * self.block_size - self.fmt.data_start(version, self.block_size)

    def _start(self, slot: int) -> int:
        return slot * self.slot_blocks

    # -- reading -------------------------------------------------------------
    def _examine(self, slot: int) -> SlotStatus:
        try:
            return self._examine_blocks(slot)
        except (OSError, Corrupted) as exc:  # a truncated file, a media error: this slot only
            return SlotStatus(slot, "unreadable", f"cannot read its blocks: {exc}")

    def _examine_blocks(self, slot: int) -> SlotStatus:
        start = self._start(slot)
        block = self.dev.read_blocks(start, 1)
        raw = block[:HEADER_SIZE]
        if raw.count(0) == len(raw):
            return SlotStatus(slot, "empty", "never written")
        hdr = SlotHeader.parse(raw)
        if hdr.magic != self.fmt.magic:
            return SlotStatus(slot, "foreign", f"magic {hdr.magic!r}, expected {self.fmt.magic!r}", hdr)
        if hdr.version not in self.fmt.readable:
            return SlotStatus(
                slot,
                "version",
                f"{self.fmt.name} format version {hdr.version} (this build reads "
                f"{', '.join(map(str, self.fmt.readable))}: use a build that speaks {hdr.version}, or a new lease)"
                + ("" if hdr.crc_ok else "; header checksum does not match"),
                hdr,
            )
        if not hdr.crc_ok:
            return SlotStatus(slot, "torn", "header checksum does not match", hdr)
        if hdr.slot != slot or hdr.block_size != self.block_size or hdr.slot_blocks != self.slot_blocks:
            return SlotStatus(
                slot,
                "geometry",
                f"written as slot {hdr.slot} of {hdr.slot_blocks} blocks of {hdr.block_size} bytes; "
                f"opened as slot {slot} of {self.slot_blocks} blocks of {self.block_size} bytes",
                hdr,
            )
        if not 0 < hdr.seq <= MAX_SEQ or hdr.data_len > self._capacity_of(hdr.version):
            return SlotStatus(
                slot, "length", f"data length {hdr.data_len} / seq {hdr.seq} impossible for this slot", hdr
            )
        bs = self.block_size
        first = self.fmt.data_start(hdr.version, bs)
        end = first + hdr.data_len
        if end <= bs:
            data = block[first:end]
        else:
            rest = self.dev.read_blocks(start + 1, -(-end // bs) - 1)
            data = block[first:] + rest[: end - bs] if first < bs else rest[: hdr.data_len]
        if crc32c(data) != hdr.data_crc:
            return SlotStatus(slot, "torn", "data checksum does not match", hdr)
        return SlotStatus(slot, "valid", "", hdr, SlotRecord(slot, hdr.seq, hdr.tag, data, hdr.version))

    def scan(self) -> list[SlotStatus]:
        """Examine both slots (for diagnostics and tests); raises only on I/O or lease errors."""
        return [self._examine(0), self._examine(1)]

    def _choose(self, statuses: list[SlotStatus]) -> SlotRecord:
        for st in statuses:
            if st.state == "version" and st.header is not None and st.header.crc_ok:
                raise VersionMismatch(f"{self.fmt.name} slot {st.slot}: {st.detail}")
            if st.state == "geometry":
                raise Corrupted(
                    f"{self.fmt.name} slot {st.slot}: {st.detail}: open the range and block size it was "
                    "written with (nothing is overwritten until then)"
                )
        valid = [st.record for st in statuses if st.record is not None]
        if len(valid) == 2 and valid[0].seq == valid[1].seq:
            raise Corrupted(
                f"both {self.fmt.name} slots claim sequence {valid[0].seq} (one writer never does that: "
                "a copied or forged slot): keep the slot you trust and zero the other"
            )
        if valid:
            best = max(valid, key=lambda r: r.seq)
            for st in statuses:
                if st.record is None and st.state != "empty":
                    log.warning(
                        "%s slot %d is not valid (%s); using slot %d", self.fmt.name, st.slot, st.detail, best.slot
                    )
            return best
        details = "; ".join(f"slot {st.slot}: {st.state} ({st.detail})" for st in statuses)
        if any(st.state == "version" for st in statuses):
            raise VersionMismatch(
                f"no readable {self.fmt.name} record: {details}; read it with the build that wrote it"
            )
        if all(st.state == "empty" for st in statuses):
            raise NoRecord(f"no {self.fmt.name} record was ever written here (nothing to restore: start afresh)")
        raise Corrupted(
            f"no valid {self.fmt.name} record: {details}. Nothing was read; the area is damaged or was "
            "written by something else: restore it from a copy, or start afresh on a new lease"
        )

    def read(self) -> SlotRecord:
        """The newest valid record; ``NoRecord``, ``VersionMismatch`` or ``Corrupted`` if none."""
        record = self._choose(self.scan())
        self._newest = (record.slot, record.seq)
        return record

    # -- writing -------------------------------------------------------------
    def _next_slot(self) -> tuple[int, int]:
        statuses = self.scan()
        try:
            best = self._choose(statuses)
        except NoRecord:
            return 0, 1
        except VersionMismatch:
            raise
        except Corrupted as exc:
            if any(st.state == "geometry" for st in statuses):
                raise
            seqs = [
                st.header.seq
                for st in statuses
                if st.header is not None and st.header.crc_ok and 0 < st.header.seq <= MAX_SEQ
            ]
            log.warning("overwriting an unreadable %s area (%s)", self.fmt.name, exc)
            return 0, max(seqs, default=0) + 1
        return 1 - best.slot, best.seq + 1

    def _header(self, n: int, seq: int, tag: int, crc: int, slot: int, version: int) -> bytes:
        return pack_header(
            self.fmt,
            version=version,
            data_len=n,
            seq=seq,
            tag=tag,
            data_crc=crc,
            slot=slot,
            block_size=self.block_size,
            slot_blocks=self.slot_blocks,
        )

    def _prepare(self, n: int, tag: int, refresh: bool, version: int | None) -> tuple[int, int, int]:
        """Checks a write of ``n`` data bytes; (version, slot, seq) it goes to."""
        if n > self.capacity:
            raise CapacityExceeded(
                f"{self.fmt.name} of {n} bytes does not fit a slot of {self.capacity} data bytes "
                f"(lease of {self.dev.nblocks} blocks of {self.block_size} bytes)"
            )
        if not isinstance(tag, int) or not 0 <= tag < 1 << 64:
            raise FabricValueError(f"tag must be a u64, got {tag!r}")
        v = self.fmt.version if version is None else version
        if v != self.fmt.version and v not in self.fmt.variants:
            raise FabricValueError(
                f"{self.fmt.name} records are written as version {self.fmt.version} or {self.fmt.variants}, not {v!r}"
            )
        if refresh or self._newest is None:
            slot, seq = self._next_slot()
        else:
            slot, seq = 1 - self._newest[0], self._newest[1] + 1
        if seq > MAX_SEQ:  # only after a forged record at MAX_SEQ: readers would refuse this one
            raise Corrupted(
                f"the newest {self.fmt.name} record claims sequence {seq - 1}, the last one there is (forged?): "
                "nothing written; move to a new lease"
            )
        return v, slot, seq

    def write_direct(
        self, prefix: bytes, data: Any, *, tag: int = 0, refresh: bool = False, version: int | None = None
    ) -> SlotPosition:
        """Write the record ``prefix + data`` like :meth:`write`, with ``data`` written from where it lies.

        ``prefix`` must end at a block boundary of the slot (``64 + len(prefix)`` a multiple of the
        block size, else ``Misaligned``), so ``data`` starts on one. On a ``BlockRegion`` that
        takes ``data`` as it lies (``takes_direct``: a block-aligned, C-contiguous buffer: an
        ``mmap``, a numpy array made by ``CheckpointedStageState.with_buffer``), ``data`` goes to
        the device by ``O_DIRECT`` without being copied, its CRC computed while it is in flight
        (``BlockRegion.write_record_direct``'s path, through a ``DirectRecordWriter`` the store
        keeps while ``data`` is the same object, so a stage that checkpoints one buffer pays the
        checks and the C pointers once); anywhere else this is ``write([prefix, data])``: the
        same bytes on disk either way. ``data`` must not change until this returns (if it
        does, the record fails its CRC on read and the previous one is read instead: never a
        mix).
        """
        bs = self.block_size
        head_len = DATA_OFFSET + len(prefix)
        if head_len % bs:
            raise Misaligned(f"a prefix of {len(prefix)} bytes does not end at a {bs}-byte block boundary")
        w = self._direct
        if w is None or w._data.obj is not data or w.head_len != head_len or w._mm.closed:
            view = memoryview(data).cast("B")
            direct = getattr(type(self.dev), "direct_writer", None)
            if direct is None or not self.dev.takes_direct(view):  # type: ignore[attr-defined]
                return self.write([prefix, view], tag=tag, refresh=refresh, version=version)
            if w is not None:
                w.close()
            w = self._direct = direct(self.dev, head_len, view)
        v, slot, seq = self._prepare(len(prefix) + w.n, tag, refresh, version)
        head = w.head
        _HEADER.pack_into(head, 0, self.fmt.magic, v, len(prefix) + w.n, seq, tag, 0, slot, bs, self.slot_blocks, 0, 0)
        head[DATA_OFFSET:] = prefix
        self._newest = None  # unknown until this write completes: a failure re-scans next time
        # SYNC POINT: record durable (DirectRecordWriter.write, BlockRegion.write_record_direct's
        # path: the data's blocks from the caller's buffer, the header block after them, one
        # flush); the reader's side is the two checksums in _examine.
        w.write(self._start(slot))
        self._newest = (slot, seq)
        return SlotPosition(slot, seq)

    def lane(
        self,
        fields: struct.Struct,
        prefix: bytes,
        data: Any,
        *,
        version: int | None = None,
        split_version: int | None = None,
    ) -> SlotLane | None:
        """A :class:`SlotLane` for records whose data is ``fields`` (packed at each write), then
        ``prefix`` (the same every time), then ``data``; None where the device has no record lanes
        (not a ``BlockRegion``: wrappers and test devices keep every write on :meth:`write`).

        A ``bytes`` ``data`` goes out as :meth:`write` would write ``[packed fields + prefix, data]``;
        any other ``data`` as :meth:`write_direct` writes ``(packed fields + prefix, data)``, so
        ``64 + fields.size + len(prefix)`` must then be a multiple of the block size and ``data``
        a buffer :meth:`write_direct` takes from where it lies (``Misaligned`` otherwise). The
        checks :meth:`write` makes of such a record (capacity, version) are made here, once.
        ``split_version`` (a ``bytes`` ``data``): where the device would write the record by AIO,
        the lane may write ``data`` from its own memory instead (``RecordLane`` ``split``), after
        ``pad`` zero bytes that put its first block-aligned byte on a block boundary of the slot:
        such records are written as ``split_version``, and the caller puts ``SlotLane.pad`` into
        its fields, where the record format says how far the zero bytes run.
        """
        make = getattr(type(self.dev), "record_lane", None)
        if make is None:
            return None
        v = self.fmt.version if version is None else version
        if v != self.fmt.version and v not in self.fmt.variants:
            raise FabricValueError(
                f"{self.fmt.name} records are written as version {self.fmt.version} or {self.fmt.variants}, not {v!r}"
            )
        head_len = DATA_OFFSET + fields.size + len(prefix)
        aligned = type(data) is not bytes
        n = fields.size + len(prefix) + (len(data) if not aligned else memoryview(data).nbytes)
        if n > self.capacity:
            raise CapacityExceeded(f"{self.fmt.name} of {n} bytes does not fit a slot of {self.capacity} data bytes")
        if aligned and head_len % self.block_size:
            raise Misaligned(
                f"a prefix of {head_len - DATA_OFFSET} bytes does not end at a {self.block_size}-byte block boundary"
            )
        # a split record takes at most one block more than the same data written after the header
        bs = self.block_size
        split = split_version is not None and not aligned and -(-(DATA_OFFSET + n) // bs) + 1 <= self.slot_blocks
        if split and split_version != self.fmt.version and split_version not in self.fmt.variants:
            raise FabricValueError(f"{self.fmt.name} records are not written as version {split_version!r}")
        lane = make(self.dev, (self._start(0), self._start(1)), head_len, data, aligned=aligned, split=split)
        lane.head[DATA_OFFSET + fields.size :] = prefix
        return SlotLane(self, lane, fields, split_version if lane.split else v, n)  # type: ignore[arg-type]

    def _record_buffer(self, nbytes: int) -> memoryview:
        if self._scratch is None or len(self._scratch) < nbytes:
            if self._scratch is not None:
                self._scratch.close()
            self._scratch = mmap.mmap(-1, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        return memoryview(self._scratch)[:nbytes]

    def write(
        self, data: Any | Sequence[Any], *, tag: int = 0, refresh: bool = False, version: int | None = None
    ) -> SlotPosition:
        """Write ``data`` as the new newest record and make it durable; returns where it went.

        ``data`` is a bytes-like object, or a list/tuple of them that together
        form the record (gathered without joining them first). When the
        device's class has ``write_record`` (a ``BlockRegion``), the header is
        packed here and one native call checksums, builds and writes the
        record (``BlockRegion.write_record``: pieces checksummed where they lie
        only when they are ``bytes``, so the bytes checksummed are the bytes
        written; copied with the CRC in the same pass otherwise); on any other
        device the record is built once in a page-aligned buffer (the copy
        and the data CRC in one pass) that the device writes without another
        copy, then ``sync``. ``CapacityExceeded`` (before any block is
        written) if the data does not fit a slot. A record of a format
        version this build does not speak is never overwritten
        (``VersionMismatch``), nor one written with another geometry
        (``Corrupted``). Errors from the device propagate at once; the
        previous record stays readable whatever happened. ``version`` (default
        the format's ``version``) may name one of its ``variants``.
        """
        chunks: Sequence[Any] = data if isinstance(data, (list, tuple)) else (data,)
        parts = [p if type(p) is bytes else memoryview(p).cast("B") for p in chunks]
        n = sum(map(len, parts))
        v, slot, seq = self._prepare(n, tag, refresh, version)
        bs = self.block_size
        nbytes = -(-(DATA_OFFSET + n) // bs) * bs
        if self._write_record is not None:  # a BlockRegion: one native call builds, checksums and writes
            header = _HEADER.pack(
                self.fmt.magic, v, n, seq, tag, 0, slot, bs, self.slot_blocks, 0, 0
            )  # both CRCs zero: write_record puts them in
            self._newest = None  # unknown until this write completes: a failure re-scans next time
            # SYNC POINT: record durable. Header and data in one durable write (BlockRegion.write_record:
            # gathered with RWF_DSYNC, or copied and written with O_DIRECT, the header block last);
            # the reader's side is the two checksums in _examine (why no ordering is needed: the
            # module descriptor).
            self._write_record(self.dev, self._start(slot), header, parts, nbytes)
            self._newest = (slot, seq)
            return SlotPosition(slot, seq)
        record = self._record_buffer(nbytes)
        try:
            pos, crc = DATA_OFFSET, 0
            for p in parts:
                crc = _copy_crc(record[pos : pos + len(p)], p, crc)
                pos += len(p)
            record[pos:] = bytes(len(record) - pos)  # zero padding of the last block
            record[:HEADER_FIELDS] = self._header(n, seq, tag, crc, slot, v)
            record[HEADER_FIELDS:DATA_OFFSET] = bytes(DATA_OFFSET - HEADER_FIELDS)
            self._newest = None  # unknown until this write completes: a failure re-scans next time
            # SYNC POINT: record durable. One request for header and data, then one flush (see the
            # module descriptor for why a torn write needs no ordering here); the reader's side is
            # the two checksums in _examine.
            self.dev.write_blocks(self._start(slot), record)
            self.dev.sync()
        finally:
            record.release()
        self._newest = (slot, seq)
        return SlotPosition(slot, seq)


class SlotLane:
    """Writes records of one shape into a :class:`SlotStore`'s slots with a few lines of Python.

    Made by :meth:`SlotStore.lane`. :meth:`write` is :meth:`SlotStore.write` for a record whose
    data is the lane's fields (packed with the header into the lane's head in one
    ``struct.pack_into``), its constant prefix and its data, through the device's record lane
    (``drivers.block.RecordLane``: the native call's arguments made once). It returns None,
    having written nothing, where the ordinary path must write the record instead: the newest
    slot is not known (a failed write, never read or written), or the device changed how it
    writes records. The bytes on the device are :meth:`SlotStore.write`'s, byte for byte.
    """

    def __init__(self, store: SlotStore, lane: Any, fields: struct.Struct, version: int, n: int) -> None:
        self.store = store
        self.lane = lane
        self.n = n
        self._pack = struct.Struct(_HEADER.format + "8x" + fields.format.lstrip("<>=!@")).pack_into
        self._fpack = struct.Struct("<" + fields.format.lstrip("<>=!@")).pack_into  # the fields alone
        self._magic = store.fmt.magic
        self._version = version
        self._bs = store.block_size
        self._slot_blocks = store.slot_blocks
        # write()'s short path: a gated RecordLane's gf_lane (RecordLane.c), written by one native
        # call that checks the lane's generation, whether it is closed and the lease's deadline
        # (read from the region's in-process cell, whose clock must be the monotonic one)
        region: Any = getattr(lane, "region", None)
        lease = getattr(region, "lease", None)
        cell = getattr(region, "_cell", None)
        c = getattr(lane, "c", None)
        #: ``(gf_lane_write, the lane's gf_lane, the lease cell, the store)`` for a caller that
        #: writes through the lane itself (see :meth:`prime`), or None where it cannot
        self.fast: tuple[Any, Any, LocalLeaseCell, SlotStore] | None = None
        fmt = fields.format.lstrip("<>=!@")
        at = DATA_OFFSET + struct.calcsize("<" + fmt[:-2]) if fmt.endswith("QQ") else 0
        if (
            at
            and c is not None
            and type(cell) is LocalLeaseCell
            and type(getattr(lease, "clock", None)) is MonotonicClock
        ):
            lane.values_at(at, at + 8)
            self.fast = (lib.gf_lane_write, c, cell, store)
        # the zero bytes (RecordLane.pad) the header in the lane's head counts: the fast path below
        # writes that header as it is, so a lane pointed at data with other ones goes the careful way
        self._hpad = -1
        if getattr(lane, "gated", False):  # the header but seq and slot, once (see write)
            _HEADER.pack_into(
                lane.head, 0, self._magic, version, n + lane.pad, 0, 0, 0, 0, self._bs, self._slot_blocks, 0, 0
            )
            self._hpad = lane.pad

    def prime(self, *fields: Any) -> None:
        """Pack the fields into the lane's head once, for :attr:`fast` writes: ``fast`` is
        ``(write, c, cell, store)``, and a record whose fields are these but the last two (two u64,
        ``v0`` and ``v1``) is written by ``write(c, seq, slot, v0, v1, cell._deadline)`` where
        ``store._newest`` is ``(newest slot, newest seq)``, ``seq`` the next one (at most
        ``MAX_SEQ``), ``slot`` the other one and ``cell._state`` live; it returns 0 once the record
        is durable (then ``store._newest = (slot, seq)``), ``GF_LANE_AGAIN`` having written nothing
        (then :meth:`write` writes it the careful way), or else what :meth:`failed` takes. Set
        ``store._newest`` to None while the write runs (a failure re-scans next time)."""
        self._fpack(self.lane.head, DATA_OFFSET, *fields)

    def failed(self, rc: int, newest: tuple[int, int], slot: int, seq: int) -> int | None:
        """After a native write of ``seq`` into ``slot`` returned ``rc`` (neither 0 nor
        ``GF_LANE_AGAIN``): raises what the region raises for it, or returns ``seq`` (durable
        after all) or None (nothing written: the ordinary path writes the record)."""
        with self.lane.region._io_lock:
            ok = self.lane._failed(rc)  # raises, or False: nothing was written (O_DIRECT refused)
        self.store._newest = (slot, seq) if ok else newest
        return seq if ok else None

    @property
    def data(self) -> Any:
        """The data the lane writes after its prefix (None once closed)."""
        return self.lane.data

    @property
    def live(self) -> bool:
        """Whether :meth:`write` can still write (open, and the device writes records as it did)."""
        return bool(self.lane.live)

    @property
    def pad(self) -> int:
        """Zero bytes the lane puts between its prefix and the data it writes next (a split lane's)."""
        return int(self.lane.pad)

    @property
    def version(self) -> int:
        """The format version of the records this lane writes."""
        return self._version

    def take(self, data: Any) -> bool:
        """Point the lane at other ``bytes`` of the same length (True), else False (see ``RecordLane.take``).

        Where the new data needs other zero bytes before it (:attr:`pad`), a gated lane's header is
        packed anew here; the caller primes its fields again (:meth:`prime`: the pad is one)."""
        lane = self.lane
        if not lane.take(data):
            return False
        if lane.pad != self._hpad and self._hpad >= 0:
            n, bs, blocks = self.n + lane.pad, self._bs, self._slot_blocks
            _HEADER.pack_into(lane.head, 0, self._magic, self._version, n, 0, 0, 0, 0, bs, blocks, 0, 0)
            self._hpad = lane.pad
        return True

    def write(self, *fields: Any) -> int | None:
        """Write the record with these field values, durably; its sequence number, or None (see the class).

        Few lines of Python around the native call where it can be (a checkpoint's Python runs with
        the caches the I/O left cold, so every frame and object touched shows in its rate; README
        "Checkpoint speed"): the lease read from its in-process cell, and on a gated lane
        (``RecordLane.gated``) no lock and only the fields packed, the native call putting the
        sequence number and slot into the header packed once. Anything unusual (a stale or closed
        lane or region, a lease that is not plainly live, a native call that did not return 0)
        goes the careful way, :meth:`RecordLane.write`'s, which raises or returns what it does.
        """
        store = self.store
        newest = store._newest
        if newest is None or newest[1] >= MAX_SEQ:
            return None
        slot = 1 - newest[0]
        seq = newest[1] + 1
        lane = self.lane
        fast = self.fast
        # a deadline the native call cannot take as an int64 (only a forged cell has one) goes the
        # careful way, whose Lease.check says what it makes of it
        if (
            fast is not None
            and fast[2]._state == _ACTIVE
            and lane.pad == self._hpad
            and type(deadline := fast[2]._deadline) is int
            and -_I64 <= deadline < _I64
        ):
            self._fpack(lane.head, DATA_OFFSET, *fields)
            store._newest = None  # unknown until this write completes: a failure re-scans next time
            # SYNC POINT: record durable (the native call SlotStore.write's path makes, through the
            # region's gate; the header with the data, one flush); the reader's side is the two
            # checksums in _examine.
            rc = fast[0](fast[1], seq, slot, fields[-2], fields[-1], deadline)
            if not rc:
                store._newest = (slot, seq)
                return seq
            if rc != lib.GF_LANE_AGAIN:
                return self.failed(rc, newest, slot, seq)
            store._newest = newest  # nothing was written: the careful way below says why
        self._pack(
            lane.head,
            0,
            self._magic,
            self._version,
            self.n + lane.pad,
            seq,
            0,
            0,
            slot,
            self._bs,
            self._slot_blocks,
            0,
            0,
            *fields,
        )
        self._hpad = lane.pad
        store._newest = None  # unknown until this write completes: a failure re-scans next time
        # SYNC POINT: record durable (RecordLane.write: the native call SlotStore.write's path makes,
        # with the header block after the data or gathered with it, one flush); the reader's side
        # is the two checksums in _examine.
        if not lane.write(slot):
            store._newest = newest  # nothing was written
            return None
        store._newest = (slot, seq)
        return seq

    def close(self) -> None:
        """Release the lane's buffers (idempotent)."""
        self.lane.close()
