"""Test helpers for block storage: loop devices, an in-memory device, a recording device.

Imported by test_block, test_checkpoint and test_handoff (not a conftest: the
fixtures live in the test modules that use them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import CapacityExceeded, Misaligned
from grafos_fabric.lease import Lease, LocalLeaseCell, ManualClock

SECTOR = 512  # the smallest unit a device writes atomically: torn writes are cut here


def losetup_unavailable() -> str | None:
    """Why loop devices cannot be used here, or None when they can."""
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    if os.geteuid() != 0:
        return "losetup needs root (not permitted for this user)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop driver not available)"
    return None


@contextlib.contextmanager
def loop_device(backing: Path, size: int, *, sector_size: int = 512) -> Iterator[str]:
    """A loop device over a fresh ``size``-byte file; detached afterwards. Skips if not permitted."""
    reason = losetup_unavailable()
    if reason:
        pytest.skip(reason)
    with open(backing, "wb") as fh:
        fh.truncate(size)
    cmd = ["losetup", "-f", "--show"]
    if sector_size != 512:
        cmd += ["--sector-size", str(sector_size)]
    proc = subprocess.run([*cmd, str(backing)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"losetup not permitted here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def open_kind(kind: str, tmp_path: Path, size: int, stack: contextlib.ExitStack, **kw: Any) -> BlockRegion:
    """A block region of ``size`` bytes on a regular file (``"file"``) or a loop device (``"loop"``)."""
    if kind == "file":
        region = open_block(tmp_path / "region.img", create_size=size, **kw)
    elif kind == "loop":
        dev = stack.enter_context(loop_device(tmp_path / "loop.img", size))
        region = open_block(dev, **kw)
    else:  # pragma: no cover
        raise AssertionError(kind)
    stack.callback(region.close)
    return region


def reopen(region: BlockRegion, **kw: Any) -> BlockRegion:
    """Another handle (own fd) on the same range, like a second process would have."""
    return open_block(region.path, region.offset, region.length, **kw)


@dataclass
class MemDevice:
    """A block device in memory (fast, for fuzzing); same surface as BlockRegion."""

    block_size: int = 512
    nblocks: int = 16
    clock: ManualClock = field(default_factory=ManualClock)
    data: bytearray = field(init=False)
    lease: Lease = field(init=False)
    syncs: int = 0

    def __post_init__(self) -> None:
        self.data = bytearray(self.block_size * self.nblocks)
        cell = LocalLeaseCell(self.clock.now_ns() + 3600 * 10**9)
        self.lease = Lease("mem", ttl=3600.0, generation=1, cell=cell, clock=self.clock)

    def read_blocks(self, lba: int, n: int = 1) -> bytes:
        self.lease.check()
        if lba < 0 or n < 0 or lba + n > self.nblocks:
            raise CapacityExceeded("out of range")
        bs = self.block_size
        return bytes(self.data[lba * bs : (lba + n) * bs])

    def write_blocks(self, lba: int, buf: Any) -> int:
        self.lease.check()
        view = memoryview(buf).cast("B")
        if len(view) % self.block_size:
            raise Misaligned("not whole blocks")
        n = len(view) // self.block_size
        if lba < 0 or lba + n > self.nblocks:
            raise CapacityExceeded("out of range")
        self.data[lba * self.block_size : lba * self.block_size + len(view)] = view
        return n

    def sync(self) -> None:
        self.lease.check()
        self.syncs += 1


@dataclass
class Op:
    kind: str  # "write" or "sync"
    lba: int = 0
    data: bytes = b""


class RecordingDevice:
    """Wraps a device: reads go through, writes and syncs are *recorded* and not applied.

    ``ops`` is the write stream a call issued; :func:`sectors` cuts it into the
    512-byte sector writes a crash could tear it at.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.block_size = inner.block_size
        self.nblocks = inner.nblocks
        self.lease = inner.lease
        self.ops: list[Op] = []

    def read_blocks(self, lba: int, n: int = 1) -> bytes:
        return bytes(self.inner.read_blocks(lba, n))

    def write_blocks(self, lba: int, buf: Any) -> int:
        data = bytes(memoryview(buf).cast("B"))
        self.ops.append(Op("write", lba, data))
        return len(data) // self.block_size

    def sync(self) -> None:
        self.ops.append(Op("sync"))


def sectors(ops: list[Op], block_size: int) -> list[tuple[int, bytes]]:
    """The recorded writes as (byte offset, 512-byte sector) in the order they were issued."""
    out: list[tuple[int, bytes]] = []
    for op in ops:
        if op.kind != "write":
            continue
        base = op.lba * block_size
        for off in range(0, len(op.data), SECTOR):
            out.append((base + off, op.data[off : off + SECTOR]))
    return out


def apply_sectors(dev: Any, image: bytes, chosen: list[tuple[int, bytes]]) -> None:
    """Put ``image`` back on ``dev`` with ``chosen`` sector writes applied on top, synced."""
    buf = bytearray(image)
    for off, data in chosen:
        buf[off : off + len(data)] = data
    dev.write_blocks(0, buf)
    dev.sync()


def snapshot(dev: Any) -> bytes:
    return bytes(dev.read_blocks(0, dev.nblocks))
