"""BlockRegion.write_durable (one gathered durable write, no aligned copy), the slot store's use of it,
and the native fused copy + CRC32C of the aligned path."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c as crc32c_pkg
import pytest

from grafos_fabric import slots as slotsmod
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.checkpoint import CheckpointedStageState
from grafos_fabric.drivers.block import GATHER_LIMIT, BlockRegion, open_block
from grafos_fabric.errors import CapacityExceeded, Disconnected, LeaseExpired, Misaligned
from grafos_fabric.slots import GHOF, PCHK, SlotStore, pack_record

try:
    from _blockdev import MemDevice, open_kind, reopen
except ImportError:  # tests/ imported as a package
    from tests._blockdev import MemDevice, open_kind, reopen

SIZE = 256 * 1024


@pytest.fixture(params=["file", pytest.param("loop", marks=pytest.mark.blockdev)])
def region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockRegion]:
    with contextlib.ExitStack() as stack:
        yield open_kind(request.param, tmp_path, SIZE, stack)


def pattern(nbytes: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(nbytes))


# -- write_durable -------------------------------------------------------------------


def test_write_durable_gathers_unaligned_pieces_that_an_o_direct_read_then_sees(region: BlockRegion) -> None:
    bs = region.block_size
    pieces = [pattern(3, 1), pattern(bs - 10, 2), bytearray(pattern(7, 3)), memoryview(pattern(2 * bs, 4))]
    assert region.write_durable(2, pieces) == 3
    want = b"".join(bytes(p) for p in pieces)
    assert region.read_blocks(2, 3) == want  # through the region's own O_DIRECT descriptor
    with reopen(region) as other:  # and through another handle, as another process would
        assert other.read_blocks(2, 3) == want
    # an O_DIRECT write afterwards is seen by the next gathered write's neighbours, and the other way round
    region.write_blocks(2, pattern(bs, 9))
    region.sync()
    assert region.read_blocks(2, 3) == pattern(bs, 9) + want[bs:]


def test_write_durable_checks_like_write_blocks(region: BlockRegion) -> None:
    bs = region.block_size
    with pytest.raises(Misaligned):
        region.write_durable(0, [b"x" * (bs - 1)])
    with pytest.raises(CapacityExceeded):
        region.write_durable(region.nblocks - 1, [bytes(2 * bs)])
    assert region.write_durable(0, []) == 0  # nothing to write is not an error
    region.close()
    with pytest.raises(Disconnected):
        region.write_durable(0, [bytes(bs)])


def test_write_durable_fails_closed_after_the_lease_is_freed(tmp_path: Path) -> None:
    r = open_block(tmp_path / "f.img", create_size=SIZE)
    r.write_durable(0, [bytes(r.block_size)])  # opens the buffered descriptor
    buffered = r._buffered_fd
    assert buffered is not None and buffered != r.fileno()
    r.lease.free()
    with pytest.raises(LeaseExpired):
        r.write_durable(0, [bytes(r.block_size)])
    with pytest.raises(OSError):
        os.fstat(buffered)  # closed along with the region's own descriptor


def test_write_durable_uses_pwritev_and_fdatasync_where_rwf_dsync_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = open_block(tmp_path / "f.img", create_size=SIZE)
    real_pwritev = os.pwritev
    calls: list[tuple[str, int]] = []

    def pwritev(fd: int, bufs: Any, pos: int, *flags: int) -> int:
        if flags and flags[0]:
            calls.append(("pwritev+flag", fd))
            raise OSError(errno.EOPNOTSUPP, "not supported")
        calls.append(("pwritev", fd))
        return real_pwritev(fd, bufs, pos)

    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", fd))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    bs = r.block_size
    r.write_durable(1, [b"a" * 5, b"b" * (bs - 5)])
    r.write_durable(1, [b"c" * bs])  # the refusal is remembered: no flag tried again
    monkeypatch.undo()
    assert r.read_blocks(1) == b"c" * bs
    fd = r._buffered_fd
    assert calls == [("pwritev+flag", fd), ("pwritev", fd), ("fdatasync", fd), ("pwritev", fd), ("fdatasync", fd)]
    r.close()


def test_write_durable_finishes_a_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = open_block(tmp_path / "f.img", create_size=SIZE)
    real_pwritev = os.pwritev
    chunks: list[int] = []

    def short(fd: int, bufs: Any, pos: int, *flags: int) -> int:
        first = memoryview(bufs[0]).cast("B")[:1000]  # at most 1000 bytes of the first piece a call
        chunks.append(len(first))
        return real_pwritev(fd, [first], pos, *flags)

    monkeypatch.setattr(os, "pwritev", short)
    bs = r.block_size
    pieces = [pattern(100, 1), pattern(3 * bs - 100, 2)]
    assert r.write_durable(0, pieces) == 3
    monkeypatch.undo()
    assert r.read_blocks(0, 3) == pieces[0] + pieces[1]
    # the first call came up short; the rest wrote the whole range again, piece by piece, to its end
    assert chunks[0] < 3 * bs and sum(chunks[1:]) == 3 * bs and len(chunks) > 3
    r.close()


def test_write_durable_copies_into_the_aligned_buffer_when_the_file_cannot_be_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = open_block(tmp_path / "f.img", create_size=SIZE)
    real_open = os.open

    def no_proc(path: Any, *a: Any, **kw: Any) -> int:
        if str(path).startswith("/proc/self/fd/"):
            raise OSError(errno.ENOENT, "no /proc here")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", no_proc)
    bs = r.block_size
    assert r.write_durable(0, [b"q" * 3, b"r" * (2 * bs - 3)]) == 2
    monkeypatch.undo()
    assert r._buffered_fd is None
    assert r.read_blocks(0, 2) == b"q" * 3 + b"r" * (2 * bs - 3)
    r.close()


# -- the slot store's choice -----------------------------------------------------------


class Spy(BlockRegion):
    """A BlockRegion that counts which write path the slot store took."""

    gathered = 0
    copied = 0

    def write_durable(self, lba: int, parts: Any) -> int:
        type(self).gathered += 1
        return super().write_durable(lba, parts)

    def write_blocks(self, lba: int, buf: Any) -> int:
        type(self).copied += 1
        return super().write_blocks(lba, buf)


def _spy(tmp_path: Path) -> Spy:
    r = open_block(tmp_path / "spy.img", create_size=SIZE)
    r.__class__ = Spy
    Spy.gathered = Spy.copied = 0
    return r  # type: ignore[return-value]


def test_bytes_records_take_one_gathered_write_and_match_the_format_byte_for_byte(tmp_path: Path) -> None:
    r = _spy(tmp_path)
    store = SlotStore(r, GHOF)
    data = [b"head", pattern(5000, 7)]
    pos = store.write(data, tag=9)
    assert (Spy.gathered, Spy.copied) == (1, 0)
    bs, sb = r.block_size, store.slot_blocks
    want = pack_record(GHOF, b"".join(data), seq=pos.seq, tag=9, slot=pos.slot, block_size=bs, slot_blocks=sb)
    assert r.read_blocks(pos.slot * sb, len(want) // bs) == want  # what the torn-write tests cut up
    assert store.read().data == b"".join(data)
    r.close()


def test_mutable_records_are_copied_so_the_bytes_checksummed_are_the_bytes_written(tmp_path: Path) -> None:
    r = _spy(tmp_path)
    state = bytearray(pattern(30000, 3))
    st = CheckpointedStageState(state, r, codec="raw", stage="s")
    st.checkpoint()
    assert (Spy.gathered, Spy.copied) == (0, 1)
    state[:4] = b"XXXX"  # the caller's buffer changes after the call: the record does not
    assert CheckpointedStageState.restore(r).state == pattern(30000, 3)
    st2 = CheckpointedStageState(bytes(state), r, codec="raw", stage="s")
    st2.checkpoint()
    assert (Spy.gathered, Spy.copied) == (1, 1)
    assert CheckpointedStageState.restore(r).state == bytes(state)
    r.close()


@pytest.mark.blockdev
def test_records_past_the_gather_limit_take_the_aligned_path_on_a_block_device(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        r = open_kind("loop", tmp_path, 4 * GATHER_LIMIT, stack)
        r.__class__ = Spy
        Spy.gathered = Spy.copied = 0
        assert r.gather_limit == GATHER_LIMIT
        store = SlotStore(r, PCHK)
        big = pattern(GATHER_LIMIT, 5)  # with the header, one block more than the limit
        store.write(big)
        assert (Spy.gathered, Spy.copied) == (0, 1)
        small = big[: GATHER_LIMIT - 4096]
        store.write(small)
        assert (Spy.gathered, Spy.copied) == (1, 1)
        assert store.read().data == small


def test_regular_files_have_no_gather_limit(tmp_path: Path) -> None:
    for direct in (True, False):
        with open_block(tmp_path / f"b{direct}.img", create_size=SIZE, direct=direct) as r:
            assert r.gather_limit > 1 << 40
    r = _spy(tmp_path)
    store = SlotStore(r, PCHK)
    store.write(pattern(SIZE // 2 - 4096, 1))  # a large bytes record still goes out gathered
    assert (Spy.gathered, Spy.copied) == (1, 0)
    r.close()


def test_a_wrapper_that_forwards_attributes_keeps_its_own_write_blocks(tmp_path: Path) -> None:
    """A device wrapper (fault injection, recording) that forwards unknown attributes to a BlockRegion
    must still see every write: the store only takes write_durable from the device's class."""
    inner = open_block(tmp_path / "w.img", create_size=SIZE)
    seen: list[int] = []

    class Wrapper:
        def __init__(self, r: BlockRegion) -> None:
            self._r = r

        def __getattr__(self, name: str) -> Any:
            return getattr(self._r, name)

        def write_blocks(self, lba: int, buf: Any) -> int:
            seen.append(lba)
            return self._r.write_blocks(lba, buf)

    store = SlotStore(Wrapper(inner), PCHK)  # type: ignore[arg-type]
    store.write(b"payload")
    assert seen == [0]
    assert store.read().data == b"payload"
    inner.close()


def test_the_aligned_path_still_serves_devices_without_write_durable() -> None:
    dev = MemDevice(block_size=512, nblocks=64)
    store = SlotStore(dev, PCHK)
    for i in range(4):
        store.write([bytearray(pattern(300 + 700 * i, i)), b"tail"])
        assert store.read().data == pattern(300 + 700 * i, i) + b"tail"
    assert dev.syncs == 4


# -- native CRC32C ----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 255, 256, 4095, 6143, 6144, 6145, 3 * 6144 + 13, 1 << 20])
def test_fused_copy_crc_matches_the_crc32c_package_and_copies_exactly(n: int) -> None:
    src = os.urandom(n)
    for offset in (0, 1, 5, 64):
        dst = bytearray(n + offset + 16)
        for start in (0, 0xDEADBEEF):
            crc = lib.gf_crc32c_copy(ffi.from_buffer(dst) + offset, src, n, start)
            assert crc == crc32c_pkg.crc32c(src, start)
            assert lib.gf_crc32c(src, n, start) == crc
            assert dst[offset : offset + n] == src
            assert dst[:offset] == bytes(offset) and dst[offset + n :] == bytes(16)  # nothing outside the range


def test_crc_of_the_standard_check_string() -> None:
    assert lib.gf_crc32c(b"123456789", 9, 0) == 0xE3069283  # the CRC-32C check value


def test_copy_crc_chains_over_pieces_like_one_pass() -> None:
    data = os.urandom(50000)
    dst = bytearray(len(data))
    mv = memoryview(dst)
    crc = 0
    for a, b in ((0, 10), (10, 20000), (20000, 50000)):
        crc = slotsmod._copy_crc(mv[a:b], memoryview(data)[a:b], crc)
    assert crc == crc32c_pkg.crc32c(data) and bytes(dst) == data
