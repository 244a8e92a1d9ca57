"""Two alternating slots: the durable record format under checkpoints and handoff records.

Descriptor: slot header (one per slot, first bytes of the slot's header block)::

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
    |          zero to the end of the 512-byte header and           | 56
    |          of the header block                                  |
    +---------------------------------------------------------------+

All integers are little-endian. The record area is a block region split into
two equal slots of ``slot_blocks = nblocks // 2`` blocks: slot ``i`` starts at
block ``i * slot_blocks``; its first block is the header block and its data
(``data_len`` bytes, zero-padded to whole blocks) follows from the next block.
Slot 0 is therefore exactly the grafOS ``PCHK``/``DCHK`` picture (header in
block 0, data from block 1; magic, version and data length at offsets 0, 4
and 8 of a 512-byte header), extended after those fields with the slot
sequence, a tag, CRC32C checksums (Castagnoli, the ``crc32c`` package) and the
geometry. Checkpoints use magic ``PCHK`` with version 2 (version 1 is grafOS's
single-slot layout without a checksum, which cannot be validated and is
refused with ``VersionMismatch``); handoff records use magic ``GHOF``,
version 1.

Who writes, who reads, what makes a record visible. One writer at a time
(a stage for its checkpoints; the handoff writer holds an ``flock``) writes
the slot that does *not* hold the newest valid record, with sequence
``newest + 1``: data blocks, ``fdatasync``, then the header block,
``fdatasync`` (``durability="ordered"``, the default). Every header field
sits in the first 512 bytes of the header block, one sector, which a device
writes atomically, so the record becomes visible in one step when its header
lands, and never before its data is durable. Any reader reads both headers, keeps the slots whose magic, version,
header CRC, geometry, length and data CRC all check out, and takes the one
with the highest sequence. A torn or bit-flipped newest slot therefore falls
back to the previous record; if no slot is valid the reader raises
(``NoRecord`` when both are blank, ``VersionMismatch`` for a format version
this build does not speak, ``Corrupted`` otherwise), it never makes a record
up. ``durability="single-sync"`` writes header and data in one request with
one ``fdatasync``: half the flushes, and a torn write is then caught by the
data CRC alone (a header that landed without its data fails the data CRC,
barring a 2**-32 collision) instead of by ordering.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import crc32c as _crc32c

from .errors import CapacityExceeded, Corrupted, FabricValueError, NoRecord, VersionMismatch
from .lease import Lease

__all__ = [
    "GHOF",
    "HEADER_FIELDS",
    "HEADER_SIZE",
    "PCHK",
    "BlockDevice",
    "Durability",
    "SlotFormat",
    "SlotHeader",
    "SlotPosition",
    "SlotRecord",
    "SlotStatus",
    "SlotStore",
    "crc32c",
    "pack_header",
]

log = logging.getLogger(__name__)

HEADER_SIZE = 512  # the logical header: the first 512 bytes of a slot's header block
_HEADER = struct.Struct("<4sIQQQIIIIII")
HEADER_FIELDS = _HEADER.size  # 56
_CRC_END = 48  # header_crc covers bytes [0, 48)
assert HEADER_FIELDS == 56

Durability = Literal["ordered", "single-sync"]


def crc32c(data: Any) -> int:
    """CRC32C (Castagnoli) of a bytes-like object."""
    return int(_crc32c.crc32c(data))


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
    """A record kind: its magic and the one version this build reads and writes."""

    magic: bytes
    version: int
    name: str


PCHK = SlotFormat(b"PCHK", 2, "checkpoint")
GHOF = SlotFormat(b"GHOF", 1, "handoff")


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
    """A valid record: the slot it is in, its sequence, tag and data."""

    slot: int
    seq: int
    tag: int
    data: bytes


class SlotPosition(NamedTuple):
    """Where a write put its record: the slot and the sequence number."""

    slot: int
    seq: int


@dataclass(frozen=True)
class SlotStatus:
    """What a scan found in one slot. ``state`` is one of ``empty``, ``valid``, ``foreign``
    (wrong magic), ``torn`` (a checksum fails), ``version`` (a version this build does not
    speak), ``geometry`` (written with another slot size or block size) or ``length``
    (a data length that cannot fit the slot)."""

    slot: int
    state: str
    detail: str = ""
    header: SlotHeader | None = None
    record: SlotRecord | None = None


class SlotStore:
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

    @property
    def capacity(self) -> int:
        """The most data bytes one record can hold."""
        return (self.slot_blocks - 1) * self.block_size

    def _start(self, slot: int) -> int:
        return slot * self.slot_blocks

    # -- reading -------------------------------------------------------------
    def _examine(self, slot: int) -> SlotStatus:
        start = self._start(slot)
        block = self.dev.read_blocks(start, 1)
        raw = block[:HEADER_SIZE]
        if raw.count(0) == len(raw):
            return SlotStatus(slot, "empty", "never written")
        hdr = SlotHeader.parse(raw)
        if hdr.magic != self.fmt.magic:
            return SlotStatus(slot, "foreign", f"magic {hdr.magic!r}, expected {self.fmt.magic!r}", hdr)
        if hdr.version != self.fmt.version:
            return SlotStatus(
                slot,
                "version",
                f"{self.fmt.name} format version {hdr.version} (this build reads {self.fmt.version})"
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
        if hdr.seq == 0 or hdr.data_len > self.capacity:
            return SlotStatus(
                slot, "length", f"data length {hdr.data_len} / seq {hdr.seq} impossible for this slot", hdr
            )
        nblocks = -(-hdr.data_len // self.block_size)
        data = self.dev.read_blocks(start + 1, nblocks)[: hdr.data_len] if nblocks else b""
        if crc32c(data) != hdr.data_crc:
            return SlotStatus(slot, "torn", "data checksum does not match", hdr)
        return SlotStatus(slot, "valid", "", hdr, SlotRecord(slot, hdr.seq, hdr.tag, data))

    def scan(self) -> list[SlotStatus]:
        """Examine both slots (for diagnostics and tests); raises only on I/O or lease errors."""
        return [self._examine(0), self._examine(1)]

    def _choose(self, statuses: list[SlotStatus]) -> SlotRecord:
        for st in statuses:
            if st.state == "version" and st.header is not None and st.header.crc_ok:
                raise VersionMismatch(f"{self.fmt.name} slot {st.slot}: {st.detail}")
            if st.state == "geometry":
                raise Corrupted(f"{self.fmt.name} slot {st.slot}: {st.detail}")
        valid = [st.record for st in statuses if st.record is not None]
        if len(valid) == 2 and valid[0].seq == valid[1].seq:
            raise Corrupted(f"both {self.fmt.name} slots claim sequence {valid[0].seq}")
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
            raise VersionMismatch(f"no readable {self.fmt.name} record: {details}")
        if all(st.state == "empty" for st in statuses):
            raise NoRecord(f"no {self.fmt.name} record was ever written here")
        raise Corrupted(f"no valid {self.fmt.name} record: {details}")

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
            seqs = [st.header.seq for st in statuses if st.header is not None and st.header.crc_ok]
            log.warning("overwriting an unreadable %s area (%s)", self.fmt.name, exc)
            return 0, max(seqs, default=0) + 1
        return 1 - best.slot, best.seq + 1

    def _record_buffer(self, nbytes: int) -> memoryview:
        if self._scratch is None or len(self._scratch) < nbytes:
            if self._scratch is not None:
                self._scratch.close()
            self._scratch = mmap.mmap(-1, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        return memoryview(self._scratch)[:nbytes]

    def write(self, data: Any | Sequence[Any], *, tag: int = 0, refresh: bool = False) -> SlotPosition:
        """Write ``data`` as the new newest record and make it durable; returns where it went.

        ``data`` is a bytes-like object, or a list/tuple of them that together
        form the record (gathered without joining them first). The record is
        built once in a page-aligned buffer that the block device writes
        without another copy. ``CapacityExceeded`` (before any block is
        written) if the data does not fit a slot. A record of a format
        version this build does not speak is never overwritten
        (``VersionMismatch``), nor one written with another geometry
        (``Corrupted``). Errors from the device propagate at once; the
        previous record stays readable whatever happened.
        """
        chunks: Sequence[Any] = data if isinstance(data, (list, tuple)) else (data,)
        parts = [memoryview(p).cast("B") for p in chunks]
        n = sum(len(p) for p in parts)
        if n > self.capacity:
            raise CapacityExceeded(
                f"{self.fmt.name} of {n} bytes does not fit a slot of {self.capacity} data bytes "
                f"(lease of {self.dev.nblocks} blocks of {self.block_size} bytes)"
            )
        if not isinstance(tag, int) or not 0 <= tag < 1 << 64:
            raise FabricValueError(f"tag must be a u64, got {tag!r}")
        if refresh or self._newest is None:
            slot, seq = self._next_slot()
        else:
            slot, seq = 1 - self._newest[0], self._newest[1] + 1
        bs = self.block_size
        nblocks = -(-n // bs)
        record = self._record_buffer((1 + nblocks) * bs)
        pos, crc = bs, 0
        for p in parts:
            record[pos : pos + len(p)] = p
            crc = _crc32c.crc32c(p, crc)
            pos += len(p)
        record[pos:] = bytes(len(record) - pos)  # zero padding of the last data block
        header = pack_header(
            self.fmt,
            data_len=n,
            seq=seq,
            tag=tag,
            data_crc=crc,
            slot=slot,
            block_size=bs,
            slot_blocks=self.slot_blocks,
        )
        record[:HEADER_FIELDS] = header
        record[HEADER_FIELDS:bs] = bytes(bs - HEADER_FIELDS)
        start = self._start(slot)
        self._newest = None  # unknown until this write completes: a failure re-scans next time
        try:
            if self.durability == "single-sync":
                self.dev.write_blocks(start, record)
                self.dev.sync()
            else:
                if nblocks:
                    self.dev.write_blocks(start + 1, record[bs:])
                    self.dev.sync()
                self.dev.write_blocks(start, record[:bs])
                self.dev.sync()
        finally:
            record.release()
        self._newest = (slot, seq)
        return SlotPosition(slot, seq)
