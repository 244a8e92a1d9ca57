"""BlockRegion.write_durable (one gathered durable write, no aligned copy), the slot store's use of it,
and the native fused copy + CRC32C of the aligned path."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c as crc32c_pkg
import pytest

from grafos_fabric import slots as slotsmod
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.checkpoint import CheckpointedStageState
from grafos_fabric.drivers import block as blockmod
from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import CapacityExceeded, Disconnected, FabricValueError, LeaseExpired, Misaligned
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
    """A BlockRegion that records which path write_record took and counts write_blocks calls."""

    paths: list[str] = []  # a test spy, reset per test
    copied = 0

    def record_path(self, nbytes: int, immutable: bool, *, checkpoint: bool = False) -> str:
        path = super().record_path(nbytes, immutable, checkpoint=checkpoint)
        type(self).paths.append(path)
        return path

    def write_blocks(self, lba: int, buf: Any) -> int:
        type(self).copied += 1
        return super().write_blocks(lba, buf)


def _spy(tmp_path: Path, **kw: Any) -> Spy:
    r = open_block(tmp_path / "spy.img", create_size=SIZE, **kw)
    r.__class__ = Spy
    Spy.paths, Spy.copied = [], 0
    return r  # type: ignore[return-value]


def _on_disk(r: BlockRegion, store: SlotStore, pos: Any, data: bytes, tag: int) -> None:
    bs, sb = r.block_size, store.slot_blocks
    want = pack_record(store.fmt, data, seq=pos.seq, tag=tag, slot=pos.slot, block_size=bs, slot_blocks=sb)
    assert r.read_blocks(pos.slot * sb, len(want) // bs) == want  # the image the torn-write tests cut up
    assert store.read().data == data


@pytest.mark.parametrize("mode", ["gather", "direct", "aio"])
def test_every_record_path_writes_the_format_byte_for_byte(
    region: BlockRegion, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockmod, "AIO_CHUNK", 8192)  # many requests per record on the aio path
    region.record_mode = mode
    store = SlotStore(region, GHOF)
    bs = region.block_size
    cases: list[list[Any]] = [
        [b""],
        [b"x"],
        [pattern(bs - 64, 1)],  # exactly one block
        [pattern(bs - 63, 2)],  # one byte into the second
        [b"head", b"", bytearray(pattern(5000, 3)), memoryview(pattern(9000, 4))[7:]],
        [pattern(100_000, 5)],  # 13 requests of 8 KiB, then the rest, then the header block
        [pattern(8192 * 3 - 64, 6)],  # ends exactly on a request boundary
        # parts of odd sizes whose copies stop mid-part at every request boundary (the copy halts
        # exactly where a request ends, so a part is copied and checksummed in several steps)
        [pattern(8191, 7), b"y", pattern(16385, 8), pattern(3, 9), bytearray(pattern(8192 - 64, 10))],
    ]
    for i, parts in enumerate(cases):
        data = b"".join(bytes(p) for p in parts)
        pos = store.write(parts, tag=i)
        _on_disk(region, store, pos, data, i)


def test_bytes_records_go_out_gathered_and_mutable_ones_are_copied(tmp_path: Path) -> None:
    r = _spy(tmp_path)
    r._on_volatile = False  # the rule for a disk, wherever tmp_path is
    state = bytearray(pattern(30000, 3))
    st = CheckpointedStageState(state, r, codec="raw", stage="s")
    st.checkpoint()
    assert Spy.paths == ["direct"] and Spy.copied == 0  # copied in the native call, with its CRC
    state[:4] = b"XXXX"  # the caller's buffer changes after the call: the record does not
    assert CheckpointedStageState.restore(r).state == pattern(30000, 3)
    CheckpointedStageState(bytes(state), r, codec="raw", stage="s").checkpoint()
    assert Spy.paths == ["direct", "gather"]
    assert CheckpointedStageState.restore(r).state == bytes(state)
    r.close()


def test_the_auto_path_by_size_and_target(tmp_path: Path) -> None:
    r = _spy(tmp_path)
    small, big = blockmod.AIO_CHUNK, blockmod.AIO_CHUNK + r.block_size
    r._on_volatile = False
    assert [r.record_path(small, True), r.record_path(big, True), r.record_path(big, False)] == [
        "gather",
        "aio",
        "aio",
    ]
    assert r.record_path(small, False) == "direct"  # a mutable small record is copied, never gathered
    r._on_volatile = True  # tmpfs: nothing to overlap the copy with, gathered at every size
    assert [r.record_path(small, True), r.record_path(big, True), r.record_path(big, False)] == [
        "gather",
        "gather",
        "direct",
    ]
    r._on_volatile = False
    r.record_mode = "aio"
    assert r.record_path(small, True) == "direct"  # nothing to split
    r._aio_failed = True
    assert r.record_path(big, True) == "direct"
    with pytest.raises(FabricValueError):
        r.record_mode = "fastest"
    assert r.record_mode == "aio"
    r.close()
    with open_block(tmp_path / "buffered.img", create_size=SIZE, direct=False) as b:
        assert b.record_path(big, True) == "gather"  # no O_DIRECT, nothing to gain from AIO
        assert b.record_path(blockmod.DIRECT_SMALL_MAX, True) == "gather"


def test_small_checkpoint_lane_records_on_a_file_with_o_direct_go_direct(tmp_path: Path) -> None:
    """A 4 KiB state's record (two blocks) through a checkpoint lane is copied with its CRC and
    written by O_DIRECT on a regular file; a larger one below AIO_CHUNK is still gathered, tmpfs
    gathers them all, and other records (a handoff's, the ordinary path's) stay gathered, in the
    page cache for same-host readers."""
    r = _spy(tmp_path)
    r._on_volatile = False
    small, next_up = blockmod.DIRECT_SMALL_MAX, blockmod.DIRECT_SMALL_MAX + r.block_size
    lane = [r.record_path(n, True, checkpoint=True) for n in (r.block_size, small, next_up)]
    assert lane == ["direct", "direct", "gather"]
    assert r.record_path(small, True) == "gather"
    r._on_volatile = True
    assert r.record_path(small, True, checkpoint=True) == "gather"
    r._on_volatile = False
    Spy.paths = []
    st = CheckpointedStageState(pattern(4096, 4), r, codec="raw", stage="s")
    for _ in range(3):
        st.checkpoint()
    assert Spy.paths[:2] == ["gather", "gather"]  # the ordinary path, then the lane's choice
    assert Spy.paths[2:] == ["direct"] and st._lane is not None
    assert st._lane.lane._fn == lib.gf_slot_write_gated  # copied and written by O_DIRECT
    st.state = pattern(4096, 5)
    st.checkpoint()
    assert CheckpointedStageState.restore(r).state == pattern(4096, 5)
    r.close()


def test_a_shut_gate_refuses_every_gated_write_and_writes_nothing(tmp_path: Path) -> None:
    """The gate a record lane writes through instead of the region's lock: open, the gated call
    writes what the plain one does with the sequence and slot it was given put into the header;
    shut (BlockRegion.close shuts it before closing the descriptors), each returns -EBADF and
    the file is untouched."""
    path = tmp_path / "g.img"
    path.write_bytes(bytes(1 << 16))
    fd = os.open(path, os.O_RDWR)
    gate = ffi.gc(lib.gf_gate_new(), lib.gf_gate_free)
    head = ffi.new("uint8_t[]", 4096)
    head[0:4] = b"PCHK"
    tail = ffi.new("uint8_t[]", 8192)
    zeros = bytes(4096)
    data = pattern(100, 1)
    parts, lens = [ffi.from_buffer(data)], [len(data)]
    try:
        rc = lib.gf_slot_write_gather_gated(7, gate, head, 1, fd, 0, head, parts, lens, 1, zeros, 4096 - 164, 1)
        assert rc == 0
        written = path.read_bytes()[:4096]
        assert struct.unpack_from("<Q", written, 16)[0] == 7 and struct.unpack_from("<I", written, 36)[0] == 1
        assert written[64:164] == data and written[:4] == b"PCHK"
        assert ffi.buffer(head, 56)[16:24] == struct.pack("<Q", 7)  # stored in the caller's header too
        assert struct.unpack_from("<I", written, 32)[0] == crc32c_pkg.crc32c(data)
        lib.gf_gate_shut(gate)
        before = path.read_bytes()
        gather = (fd, 4096, head, parts, lens, 1, zeros, 0, 1)
        copy = (fd, 4096, tail, 4096, 4096, head, parts, lens, 1, 0, 0, 1)
        direct = (fd, 4096, tail, 4096, 4096, head, 0, tail, 0, 4096, 1)
        assert lib.gf_slot_write_gather_gated(8, gate, head, 0, *gather) == -errno.EBADF
        assert lib.gf_slot_write_gated(8, gate, head, 0, *copy) == -errno.EBADF
        assert lib.gf_slot_write_direct_gated(8, gate, ffi.NULL, 0, *direct) == -errno.EBADF
        assert path.read_bytes() == before
        assert lib.gf_slot_write_gated(8, ffi.NULL, ffi.NULL, 0, *copy) == -errno.EINVAL  # no gate
    finally:
        os.close(fd)


@pytest.mark.blockdev
def test_a_block_device_splits_large_records_over_aio(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        r = open_kind("loop", tmp_path, 4 * blockmod.AIO_CHUNK, stack)
        assert r.record_path(blockmod.AIO_CHUNK, True) == "gather"
        assert r.record_path(blockmod.AIO_CHUNK + r.block_size, True) == "aio"
        store = SlotStore(r, PCHK)
        big = pattern(blockmod.AIO_CHUNK + 5000, 5)
        _on_disk(r, store, store.write(big), big, 0)
        assert r._aio and not r._aio_failed


def test_large_records_on_a_file_take_the_aio_path_and_survive_any_block_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of the new record that did not land (in any combination a crash could leave, here:
    each block alone, and each block alone landing) make the reader fall back to the previous one."""
    monkeypatch.setattr(blockmod, "AIO_CHUNK", 8192)
    r = _spy(tmp_path)
    r._on_volatile = False
    store = SlotStore(r, PCHK)
    store.write(pattern(40000, 1))
    store.write(pattern(40000, 2))  # slot 1, the newest
    before = r.read_blocks(0, r.nblocks)
    pos = store.write(pattern(40000, 3))
    assert Spy.paths[-1] == "aio" and pos.slot == 0
    after = r.read_blocks(0, r.nblocks)
    bs, nrec = r.block_size, -(-(40000 + 64) // r.block_size)
    for i in range(nrec):
        blk = slice(i * bs, (i + 1) * bs)
        for image in (
            after[: blk.start] + before[blk] + after[blk.stop :],
            before[: blk.start] + after[blk] + before[blk.stop :],
        ):
            r.write_blocks(0, image)
            got = SlotStore(r, PCHK).read()
            assert got.data == pattern(40000, 2) and got.seq == 2, i
    r.close()


def test_a_refused_aio_context_falls_back_to_one_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blockmod, "AIO_CHUNK", 8192)
    r = open_block(tmp_path / "a.img", create_size=SIZE)
    r.record_mode = "aio"
    r._aio.append(0xDEAD)  # not a context the kernel knows: io_submit refuses it
    store = SlotStore(r, PCHK)
    data = pattern(50000, 9)
    _on_disk(r, store, store.write(data), data, 0)
    assert r._aio_failed and r.record_path(50000, True) == "direct"
    r._aio.clear()
    r.close()


def test_a_forked_child_writes_through_the_parents_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AIO contexts do not survive fork: the child's records still land whole (one request)."""
    monkeypatch.setattr(blockmod, "AIO_CHUNK", 8192)
    r = open_block(tmp_path / "f.img", create_size=SIZE)
    r.record_mode = "aio"
    store = SlotStore(r, PCHK)
    store.write(pattern(30000, 1))  # the parent's context exists now
    assert r._aio
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            store.write(pattern(30000, 2))
            code = 0 if store.read().data == pattern(30000, 2) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert SlotStore(r, PCHK).read().data == pattern(30000, 2)
    r.close()


def test_write_record_checks_its_arguments_and_the_lease(tmp_path: Path) -> None:
    r = open_block(tmp_path / "c.img", create_size=SIZE)
    bs = r.block_size
    with pytest.raises(FabricValueError):
        r.write_record(0, bytes(55), [b"x"], bs)
    with pytest.raises(Misaligned):
        r.write_record(0, bytes(56), [b"x"], bs + 1)
    with pytest.raises(CapacityExceeded):
        r.write_record(0, bytes(56), [bytes(bs - 63)], bs)  # does not fit the record
    with pytest.raises(CapacityExceeded):
        r.write_record(r.nblocks, bytes(56), [b"x"], bs)  # outside the lease
    with pytest.raises(CapacityExceeded):
        r._raise_io(-errno.ENOSPC)
    with pytest.raises(OSError) as exc:
        r._raise_io(-errno.EIO)
    assert exc.value.errno == errno.EIO
    r.lease.free()
    with pytest.raises(LeaseExpired):
        r.write_record(0, bytes(56), [b"x"], bs)


def test_a_record_too_large_for_the_aio_requests_goes_out_in_larger_ones(tmp_path: Path) -> None:
    r = open_block(tmp_path / "big.img", create_size=1 << 20)
    ctx = ffi.new("uint64_t *")
    assert lib.gf_aio_setup(64, ctx) == 0
    try:
        fd, bs = r.fileno(), r.block_size
        nbytes = 128 * bs  # 127 data blocks in 4096-byte requests would be over 60 requests
        data = pattern(nbytes - 64 - 100, 4)
        buf = r._buffer(nbytes)
        rc = lib.gf_slot_write(
            fd, 0, ffi.from_buffer(buf), nbytes, bs, bytes(56), [ffi.from_buffer(data)], [len(data)], 1, ctx[0], bs, 1
        )
        assert rc == 0
        buf.release()
        image = r.read_blocks(0, 128)
        assert image[64 : 64 + len(data)] == data and image[64 + len(data) :] == bytes(100)
        assert int.from_bytes(image[32:36], "little") == crc32c_pkg.crc32c(data)
        assert int.from_bytes(image[48:52], "little") == crc32c_pkg.crc32c(image[:48])
    finally:
        assert lib.gf_aio_destroy(ctx[0]) == 0
        r.close()


def test_the_native_record_writers_refuse_bad_arguments_and_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "n.img"
    path.write_bytes(bytes(1 << 18))
    fd = os.open(path, os.O_RDWR)
    buf = ffi.new("uint8_t[]", 1 << 18)
    part = b"abc"
    bad = [  # (nbytes, block, lens, pos)
        (4096, 4096, 4096 - 63, 0),  # data past the record
        (4097, 4096, 3, 0),  # not whole blocks
        (6144, 3072, 3, 0),  # a block that is not a power of two
        (256, 256, 3, 0),  # a block under 512
        (4096, 4096, 3, -4096),  # a negative position
        (0, 4096, 0, 0),  # no block at all
    ]
    try:
        for nbytes, block, n, pos in bad:
            src = bytes(n) if n > 3 else part
            rc = lib.gf_slot_write(fd, pos, buf, nbytes, block, bytes(56), [ffi.from_buffer(src)], [n], 1, 0, 0, 1)
            assert rc == -errno.EINVAL, (nbytes, block, n, pos)
        many = [ffi.from_buffer(part)] * 1001
        assert lib.gf_slot_write_gather(fd, 0, buf, many, [3] * 1001, 1001, bytes(16), 0, 1) == -errno.EINVAL
        assert path.read_bytes() == bytes(1 << 18)
    finally:
        os.close(fd)


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


def test_the_cpu_picks_the_fastest_crc_it_has() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    want = 2 if all(f" {f}" in flags for f in ("avx512f", "avx512vl", "avx512bw", "vpclmulqdq", "sse4_2")) else None
    impl = lib.gf_crc32c_impl()
    assert impl in (0, 1, 2)
    if want is not None:
        assert impl == want  # this CPU has the folding instructions: they are used


def _crc_cases(seed: int) -> list[tuple[int, int, int]]:
    """(length, offset, start) triples: every length around the fold's edges, then random ones up to 5 MiB."""
    rng = random.Random(seed)
    edges = [n + d for n in (0, 16, 256, 512, 768, 4096, 6144, 65536, 1 << 20) for d in (-17, -16, -1, 0, 1, 15, 16)]
    cases = [(n, rng.randrange(64), rng.choice((0, 0xFFFFFFFF, rng.getrandbits(32)))) for n in edges if n >= 0]
    cases += [(rng.randrange(5 << 20), rng.randrange(64), rng.getrandbits(32)) for _ in range(12)]
    cases += [(rng.randrange(4096), rng.randrange(64), rng.getrandbits(32)) for _ in range(200)]
    return cases


def test_crc_and_fused_copy_match_the_crc32c_package_at_random_lengths_and_offsets() -> None:
    """Both the folding path (runs of 512 bytes and more on an AVX-512 CPU) and the crc32
    instruction around it, from unaligned source and destination addresses."""
    blob = os.urandom((5 << 20) + 128)
    for n, off, start in _crc_cases(7):
        src = memoryview(blob)[off : off + n]
        want = crc32c_pkg.crc32c(src, start)
        assert lib.gf_crc32c(ffi.from_buffer(src), n, start) == want, (n, off)
        dst = bytearray(n + 80)
        doff = (off * 7 + 3) % 64
        assert lib.gf_crc32c_copy(ffi.from_buffer(dst) + doff, ffi.from_buffer(src), n, start) == want, (n, off)
        assert dst[doff : doff + n] == src and not any(dst[:doff]) and not any(dst[doff + n :]), (n, off)


def test_the_folding_and_the_crc32_streams_agree() -> None:
    """The same cases with GRAFOS_CRC_NO_VPCLMUL (the three-stream crc32 path) in a child process."""
    script = (
        "import os, random, sys\n"
        "from grafos_fabric._ffi import ffi, lib\n"
        "assert lib.gf_crc32c_impl() != 2\n"
        "blob = random.Random(3).randbytes((1 << 20) + 4096)\n"
        "out = [lib.gf_crc32c(ffi.from_buffer(blob) + o, n, s) for n, o, s in "
        "[(1 << 20, 0, 0), (1 << 20, 3, 1), (4093, 1, 5), (777, 9, 0xFFFFFFFF), (100003, 63, 7)]]\n"
        "print(out)\n"
    )
    env = {**os.environ, "GRAFOS_CRC_NO_VPCLMUL": "1"}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    blob = random.Random(3).randbytes((1 << 20) + 4096)
    cases = [(1 << 20, 0, 0), (1 << 20, 3, 1), (4093, 1, 5), (777, 9, 0xFFFFFFFF), (100003, 63, 7)]
    here = [lib.gf_crc32c(ffi.from_buffer(blob) + o, n, s) for n, o, s in cases]
    assert child.stdout.strip() == str(here)
    assert here == [crc32c_pkg.crc32c(blob[o : o + n], s) for n, o, s in cases]
