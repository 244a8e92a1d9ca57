"""Queue locators: where a queue lives, at which epoch, from which sequence.

A :class:`QueueLocator` is small, versioned and checksummed, so it can travel
through a handoff record on block storage or a pipe to another process and be
validated on arrival. Binary layout (little-endian, version 1)::

   0                   1                   2                   3
   0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
  +---------------------------------------------------------------+
  |  magic "GFQL"                                                 |  0
  +---------------+---------------+-------------------------------+
  |  version (u8) |  driver (u8)  |  total length (u16)           |  4
  +---------------+---------------+-------------------------------+
  |  epoch (u64)                                                  |  8
  |  first_seq (u64)                                              | 16
  |  capacity (u64)   ring data bytes                             | 24
  |  max_item (u64)                                               | 32
  |  region_bytes (u64)                                           | 40
  |  generation (u64) of the region's lease                       | 48
  |  addr (u64)       remote address (verbs), 0 for shm           | 56
  +-------------------------------+-------------------------------+
  |  rkey (u32)                   |  port (u16)   | layout (u16)  | 64
  +-------------------------------+-------------------------------+
  |  5 strings, each u8 length + UTF-8 bytes: namespace, name,    | 72
  |  lease_id, host, dtype                                        |
  +---------------------------------------------------------------+
  |  CRC32C (u32) of everything before it                         |
  +---------------------------------------------------------------+

Decoding never trusts the bytes: wrong magic, length or checksum raise
:class:`~grafos_fabric.errors.Corrupted`; another version raises
:class:`~grafos_fabric.errors.VersionMismatch`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import crc32c

from .drivers.base import RegionRef
from .errors import Corrupted, VersionMismatch
from .handoff import HandoffReader, HandoffRecord, HandoffWriter

# The handoff record carries ``bytes(QueueLocator)`` as its payload; the
# classes live in grafos_fabric.handoff and are re-exported here, where the
# design puts the locator and its handoff together.
__all__ = ["LOCATOR_VERSION", "HandoffReader", "HandoffRecord", "HandoffWriter", "QueueLocator"]

MAGIC = b"GFQL"
LOCATOR_VERSION = 1
_FIXED = struct.Struct("<4sBBH7QIHH")
_DRIVERS = {"shm": 1, "verbs": 2, "ucx": 3, "nodeshm": 4}  # node drivers: capability token in name
_DRIVER_NAMES = {v: k for k, v in _DRIVERS.items()}
MAX_LOCATOR = 1024


@dataclass(frozen=True)
class QueueLocator:
    """Everything needed to attach a queue: region, ring geometry, epoch, first sequence."""

    region: RegionRef
    capacity: int
    max_item: int
    epoch: int = 0
    first_seq: int = 0
    layout: int = 1
    dtype: str = ""

    def with_epoch(self, epoch: int) -> QueueLocator:
        return replace(self, epoch=epoch)

    def to_bytes(self) -> bytes:
        r = self.region
        strings = b""
        for s in (r.namespace, r.name, r.lease_id, r.host, self.dtype):
            raw = s.encode()
            if len(raw) > 255:
                raise Corrupted(f"locator field too long ({len(raw)} bytes): {s[:40]!r}...")
            strings += bytes([len(raw)]) + raw
        total = _FIXED.size + len(strings) + 4
        head = _FIXED.pack(
            MAGIC,
            LOCATOR_VERSION,
            _DRIVERS[r.driver],
            total,
            self.epoch,
            self.first_seq,
            self.capacity,
            self.max_item,
            r.nbytes,
            r.generation,
            r.addr,
            r.rkey,
            r.port,
            self.layout,
        )
        body = head + strings
        return body + struct.pack("<I", crc32c.crc32c(body))

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> QueueLocator:
        """Decode and validate; raises ``Corrupted`` or ``VersionMismatch``."""
        try:
            raw = bytes(data)
        except TypeError:
            raise Corrupted(f"a locator is bytes, not {type(data).__name__}") from None
        if len(raw) < _FIXED.size + 4 or len(raw) > MAX_LOCATOR:
            raise Corrupted(f"locator has {len(raw)} bytes: not a queue locator")
        if raw[:4] != MAGIC:
            raise Corrupted("not a queue locator (bad magic)")
        (_, version, driver, total, epoch, first_seq, capacity, max_item, nbytes, generation, addr, rkey, port,
         layout) = _FIXED.unpack_from(raw)
        if version != LOCATOR_VERSION:
            raise VersionMismatch(f"queue locator version {version}; this build reads version {LOCATOR_VERSION}")
        if total != len(raw):
            raise Corrupted(f"locator length field says {total} bytes, got {len(raw)}")
        (crc,) = struct.unpack_from("<I", raw, len(raw) - 4)
        if crc32c.crc32c(raw[:-4]) != crc:
            raise Corrupted("queue locator checksum mismatch")
        if driver not in _DRIVER_NAMES:
            raise Corrupted(f"unknown driver code {driver} in locator")
        pos = _FIXED.size
        strings = []
        for _ in range(5):
            if pos >= len(raw) - 4:
                raise Corrupted("locator strings truncated")
            n = raw[pos]
            pos += 1
            if pos + n > len(raw) - 4:
                raise Corrupted("locator strings truncated")
            try:
                strings.append(raw[pos : pos + n].decode())
            except UnicodeDecodeError:
                raise Corrupted("locator string is not UTF-8") from None
            pos += n
        if pos != len(raw) - 4:
            raise Corrupted("trailing bytes in locator")
        namespace, name, lease_id, host, dtype = strings
        region = RegionRef(
            driver=_DRIVER_NAMES[driver],
            name=name,
            nbytes=nbytes,
            lease_id=lease_id,
            generation=generation,
            namespace=namespace,
            host=host,
            port=port,
            addr=addr,
            rkey=rkey,
        )
        return cls(region, capacity, max_item, epoch, first_seq, layout, dtype)
