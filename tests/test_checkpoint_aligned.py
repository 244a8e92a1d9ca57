"""Zero-copy checkpoints: CheckpointedStageState.with_buffer, PCHK version 4 (the state on a block
boundary of the slot), BlockRegion.write_record_direct (the state written from the caller's buffer,
its CRC computed while the write is in flight): round trips, the bytes on disk, torn writes on a
file and a loop device, forged envelopes, and the fallbacks."""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from grafos_fabric.checkpoint import ALIGNED, ENVELOPE_SIZE, CheckpointedStageState, EdgeCheckpoint
from grafos_fabric.drivers import block as blockmod
from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import (
    CapacityExceeded,
    Corrupted,
    Disconnected,
    FabricValueError,
    LeaseExpired,
    Misaligned,
    VersionMismatch,
)
from grafos_fabric.slots import DATA_OFFSET, PCHK, SlotFormat, SlotStore, pack_record

try:
    from _blockdev import SECTOR, MemDevice, RecordingDevice, open_kind, snapshot
except ImportError:  # tests/ imported as a package
    from tests._blockdev import SECTOR, MemDevice, RecordingDevice, open_kind, snapshot

SIZE = 1 << 20
STAGE = "aligned"


@pytest.fixture(params=["file", pytest.param("loop", marks=pytest.mark.blockdev)])
def region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockRegion]:
    with contextlib.ExitStack() as stack:
        yield open_kind(request.param, tmp_path, SIZE, stack)


def fill(st: CheckpointedStageState[Any], seed: int) -> bytes:
    st.state[:] = np.frombuffer(random.Random(seed).randbytes(len(st.state)), dtype=np.uint8)
    return bytes(st.state)


def prefix_of(st: CheckpointedStageState[Any], edge: EdgeCheckpoint) -> bytes:
    return st._aligned_prefix(edge)


class Spy(BlockRegion):
    """Counts the native record writes, by kind."""

    calls: list[str] = []  # reset per test

    def write_record(self, lba: int, header: bytes, parts: Any, nbytes: int) -> int:
        type(self).calls.append("record")
        return super().write_record(lba, header, parts, nbytes)

    def _write_direct(self, w: Any, lba: int) -> int:
        type(self).calls.append("direct")
        return super()._write_direct(w, lba)


def spy(r: BlockRegion) -> Spy:
    r.__class__ = Spy
    Spy.calls = []
    return r  # type: ignore[return-value]


# -- round trips and the bytes on disk ---------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "gather", "direct", "aio"])
@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 5000, 3 * 4096, 3 << 16, 200_000, 300_007])
def test_an_aligned_state_round_trips_and_is_written_byte_for_byte_from_its_buffer(
    region: BlockRegion, nbytes: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockmod, "AIO_CHUNK", 64 << 10)  # several requests for the larger states
    monkeypatch.setattr(blockmod, "DIRECT_SPLIT_MAX", 0)  # (not the two a state this small gets)
    r = spy(region)
    r.record_mode = mode
    st = CheckpointedStageState.with_buffer(r, nbytes, stage=STAGE)
    assert isinstance(st.state, np.ndarray) and st.state.dtype == np.uint8 and st.state.shape == (nbytes,)
    assert st.buffer is st.state and st.state.flags.writeable and not st.state.any()
    assert nbytes == 0 or st.state.ctypes.data % r.block_size == 0
    store = SlotStore(r, PCHK)
    for i, edge in enumerate((EdgeCheckpoint(1, 2), EdgeCheckpoint(3, 4), EdgeCheckpoint(5, 6))):
        want = fill(st, i)
        seq = st.checkpoint(edge)
        assert Spy.calls[-1] == "direct"
        rec = store.read()
        assert (rec.seq, rec.version) == (seq, 4)
        prefix = prefix_of(st, edge)
        assert (DATA_OFFSET + len(prefix)) % r.block_size == 0  # the state starts on a block boundary
        image = pack_record(
            PCHK,
            prefix + want,
            seq=seq,
            tag=0,
            slot=rec.slot,
            block_size=r.block_size,
            slot_blocks=store.slot_blocks,
            version=4,
        )
        at = rec.slot * store.slot_blocks
        assert r.read_blocks(at, len(image) // r.block_size) == image
        got = CheckpointedStageState.restore(r)
        assert isinstance(got.state, np.ndarray) and bytes(got.state) == want and got.edge == edge
        assert got.buffer is got.state and (nbytes == 0 or got.state.ctypes.data % r.block_size == 0)
    if (mode == "aio" and nbytes >= r.block_size) or (mode == "auto" and nbytes > blockmod.AIO_CHUNK):
        assert r._aio and not r._aio_failed  # the AIO path ran (and its context is kept)
    # auto: a small checkpoint record on a regular file with O_DIRECT goes direct (BlockRegion.record_path)
    small_direct = mode == "auto" and r._auto_mode(nbytes + r.block_size, checkpoint=True) == "direct"
    if small_direct:
        assert not r.is_blockdev and nbytes + r.block_size <= blockmod.DIRECT_SMALL_MAX
    if mode in ("gather", "auto") and nbytes <= blockmod.AIO_CHUNK and not small_direct:
        assert r._buffered_fd is not None  # through the page cache
    if mode in ("direct", "aio") or small_direct:
        assert r._buffered_fd is None and bool(r._aio) == (mode == "aio" and nbytes >= r.block_size)
    assert Spy.calls.count("record") == 0


def test_a_restored_aligned_state_keeps_checkpointing_without_a_copy(region: BlockRegion) -> None:
    st = CheckpointedStageState.with_buffer(region, 10_000, stage=STAGE, edge=EdgeCheckpoint(7, 7))
    fill(st, 1)
    st.checkpoint()
    again = CheckpointedStageState.restore(spy(region), stage=STAGE, codec="raw")
    again.state[:3] = (1, 2, 3)
    again.checkpoint(EdgeCheckpoint(8, 8))
    assert Spy.calls == ["direct"]
    last = CheckpointedStageState.restore(region)
    assert bytes(last.state) == bytes(again.state) and last.edge == EdgeCheckpoint(8, 8)


def test_rebinding_the_state_checkpoints_that_object_as_version_3(region: BlockRegion) -> None:
    st = CheckpointedStageState.with_buffer(spy(region), 5000, stage=STAGE)
    st.state = b"something else"  # type: ignore[assignment]
    st.checkpoint()
    assert Spy.calls == ["record"]
    assert SlotStore(region, PCHK).read().version == 3
    got = CheckpointedStageState.restore(region)
    assert got.state == b"something else" and got.buffer is None


def test_ordinary_states_are_still_written_as_version_3(region: BlockRegion) -> None:
    CheckpointedStageState({"a": 1}, region).checkpoint()
    assert SlotStore(region, PCHK).read().version == 3
    CheckpointedStageState(b"raw", region, codec="raw").checkpoint()
    assert SlotStore(region, PCHK).read().version == 3


def test_with_buffer_checks_its_arguments_and_the_slot(tmp_path: Path) -> None:
    with open_block(tmp_path / "small.img", create_size=4 * 4096) as r:  # slots of 2 blocks
        for bad in (-1, 1.5, True, "8"):
            with pytest.raises(FabricValueError):
                CheckpointedStageState.with_buffer(r, bad)  # type: ignore[arg-type]
        CheckpointedStageState.with_buffer(r, 4096)  # one block of state beside the header block
        with pytest.raises(CapacityExceeded):
            CheckpointedStageState.with_buffer(r, 4097)


def test_write_record_direct_refuses_what_it_cannot_write_from_where_it_lies(tmp_path: Path) -> None:
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        bs = r.block_size
        buf = np.zeros(3 * bs, dtype=np.uint8)
        off = -buf.ctypes.data % bs
        aligned = buf[off : off + bs]
        head = bytes(bs)
        assert r.takes_direct(memoryview(aligned)) and r.takes_direct(b"short")
        with pytest.raises(Misaligned):
            r.write_record_direct(0, head, buf[off + 1 : off + 1 + bs])  # a block at an odd address
        with pytest.raises(Misaligned):
            r.write_record_direct(0, head[:100], aligned)
        with pytest.raises(Misaligned):
            r.write_record_direct(0, head + b"x", aligned)
        with pytest.raises(CapacityExceeded):
            r.write_record_direct(r.nblocks - 1, head, aligned)
        assert not r.takes_direct(memoryview(np.zeros((bs, 2), dtype=np.uint8).T))  # not contiguous
        store = SlotStore(r, PCHK)
        with pytest.raises(Misaligned):
            store.write_direct(b"x" * 10, aligned)  # the prefix does not end on a block boundary
        with pytest.raises(FabricValueError):
            store.write_direct(bytes(bs - DATA_OFFSET), aligned, version=7)
        # an unaligned buffer through the store: the ordinary (copying) path, the same record
        pos = store.write_direct(bytes(bs - DATA_OFFSET), buf[off + 1 : off + 1 + bs], version=4)
        assert store.read().data == bytes(bs - DATA_OFFSET) + bytes(buf[off + 1 : off + 1 + bs])
        assert pos.seq == 1
        r.lease.free()
        with pytest.raises(Exception, match="freed"):
            r.write_record_direct(0, head, aligned)


def test_devices_without_the_direct_path_get_the_same_record(tmp_path: Path) -> None:
    with open_block(tmp_path / "r.img", create_size=64 * 4096) as r:
        st = CheckpointedStageState.with_buffer(r, 9000, stage=STAGE)
        want = fill(st, 5)
        st.checkpoint(EdgeCheckpoint(1, 1))
        direct_image = snapshot(r)
        mem = MemDevice(block_size=4096, nblocks=64)
        st2 = CheckpointedStageState.with_buffer(mem, 9000, stage=STAGE)  # type: ignore[arg-type]
        st2.state[:] = st.state
        st2.checkpoint(EdgeCheckpoint(1, 1))
        assert snapshot(mem) == direct_image and mem.syncs == 1
        got = CheckpointedStageState.restore(mem)  # type: ignore[arg-type]
        assert bytes(got.state) == want and got.buffer is got.state


def test_the_direct_aio_path_sends_up_to_1_5_mib_of_data_in_two_equal_requests() -> None:
    bs, chunk = 4096, blockmod.AIO_CHUNK
    assert blockmod._direct_chunk(1 << 20, bs) == 512 << 10  # 1 MiB: two of 512 KiB
    assert blockmod._direct_chunk(3 << 19, bs) == 768 << 10  # DIRECT_SPLIT_MAX itself: two
    assert blockmod._direct_chunk((3 << 19) + bs, bs) == chunk  # above it: AIO_CHUNK requests
    assert blockmod._direct_chunk(2 << 20, bs) == chunk
    assert blockmod._direct_chunk(301 * bs, bs) == 151 * bs  # an odd count: the first one a block longer
    assert blockmod._direct_chunk(3 * bs, bs) == chunk  # never below AIO_CHUNK (one request then)
    for whole in range(bs, 2 << 20, 37 * bs):  # never more than two requests up to the limit
        c = blockmod._direct_chunk(whole, bs)
        assert c % bs == 0 and c >= chunk and (whole > blockmod.DIRECT_SPLIT_MAX or -(-whole // c) <= 2)


def test_a_1_mib_aligned_checkpoint_goes_out_in_two_requests_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = blockmod.lib

    class Lib:  # the native library, with the chunk each direct write is given noted
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def gf_slot_write_direct(self, *args: Any) -> int:
            seen.append(args[-2])
            return int(real.gf_slot_write_direct(*args))

    monkeypatch.setattr(blockmod, "lib", Lib())
    with open_block(tmp_path / "big.img", create_size=4 << 20) as r:
        r.record_mode = "aio"
        st = CheckpointedStageState.with_buffer(r, 1 << 20, stage=STAGE)
        for i in range(3):
            want = fill(st, 20 + i)
            st.checkpoint(EdgeCheckpoint(i, i))
            got = CheckpointedStageState.restore(r)
            assert bytes(got.state) == want and got.edge == EdgeCheckpoint(i, i)
        assert r._aio and not r._aio_failed  # the AIO path ran
        # the lane's writes: one native call (gf_lane_write) with the same chunk, by the gated
        # lanes' AIO context
        lane = st._lane
        assert lane is not None and lane.lane.gated and lane.lane.c.chunk == 512 << 10
        assert lane.lane.c.aio_ctx == r._gate_aio[0] != 0
    assert seen and seen == [512 << 10] * len(seen)


def test_a_refused_aio_request_writes_the_record_again_in_one_request(tmp_path: Path) -> None:
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        r.record_mode = "aio"
        st = CheckpointedStageState.with_buffer(r, 100_000, stage=STAGE)
        r._aio.append(0xDEAD)  # not a context the kernel knows: io_submit refuses it
        want = fill(st, 9)
        st.checkpoint()
        assert r._aio_failed
        r._aio.clear()
        assert bytes(CheckpointedStageState.restore(r).state) == want
        fill(st, 10)
        st.checkpoint()  # no AIO from now on: one request
        assert bytes(CheckpointedStageState.restore(r).state) == bytes(st.state)


def test_a_gated_aio_lane_whose_context_is_refused_writes_the_record_in_one_request(tmp_path: Path) -> None:
    """The lane of a 1 MiB aligned state writes by the gated lanes' AIO context, in one native call
    (gf_lane_write); once the kernel refuses that context, the call writes the record again in one
    request (rc 1), AIO is off for the region and the lane is stale; every record restores."""
    with open_block(tmp_path / "r.img", create_size=4 * SIZE) as r:
        st = CheckpointedStageState.with_buffer(r, 1 << 20, stage=STAGE)
        fill(st, 1)
        st.checkpoint()
        lane = st._lane
        assert lane is not None and lane.lane.gated and st._fast is not None
        ctx = r._gate_aio[0]
        assert lane.lane.c.aio_ctx == ctx and ctx not in r._aio
        want = fill(st, 2)
        st.checkpoint()  # through the lane, by AIO
        assert bytes(CheckpointedStageState.restore(r).state) == want and not r._aio_failed
        blockmod.lib.gf_aio_destroy(ctx)  # the kernel no longer knows it: io_submit refuses
        want = fill(st, 3)
        st.checkpoint()
        r._gate_aio.clear()  # destroyed here, not by the region
        assert r._aio_failed and not lane.live
        assert bytes(CheckpointedStageState.restore(r).state) == want
        want = fill(st, 4)
        st.checkpoint()  # a new lane, without AIO
        st.checkpoint()
        assert bytes(CheckpointedStageState.restore(r).state) == want


def test_a_build_that_reads_only_version_3_refuses_an_aligned_record(region: BlockRegion) -> None:
    st = CheckpointedStageState.with_buffer(region, 5000, stage=STAGE)
    st.checkpoint()
    old = SlotFormat(b"PCHK", 3, "checkpoint", legacy_version=2)  # what the previous build spoke
    with pytest.raises(VersionMismatch):
        SlotStore(region, old).read()


# -- torn writes ------------------------------------------------------------------


def _history(r: BlockRegion, nbytes: int) -> tuple[CheckpointedStageState[Any], bytes, EdgeCheckpoint]:
    st = CheckpointedStageState.with_buffer(r, nbytes, stage=STAGE)
    for i in range(2):
        prev = fill(st, 100 + i)
        st.checkpoint(EdgeCheckpoint(i + 1, i + 1))
    return st, prev, EdgeCheckpoint(2, 2)


def _changed_sectors(before: bytes, after: bytes) -> list[tuple[int, bytes]]:
    return [
        (off, after[off : off + SECTOR])
        for off in range(0, len(after), SECTOR)
        if before[off : off + SECTOR] != after[off : off + SECTOR]
    ]


@pytest.mark.parametrize(("mode", "split"), [("gather", "two"), ("direct", "two"), ("aio", "two"), ("aio", "chunks")])
@pytest.mark.parametrize("nbytes", [4096, 20_000, 300_000])
def test_an_aligned_checkpoint_torn_anywhere_restores_the_previous_one_and_never_touches_the_other_slot(
    region: BlockRegion, nbytes: int, mode: str, split: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native direct path's own write (a file and a loop device; one request or AIO requests
    in any completion order): any subset of its sectors that is not all of them leaves the
    previous checkpoint, and the slot holding it is byte for byte what it was."""
    monkeypatch.setattr(blockmod, "AIO_CHUNK", 32 << 10)
    if split == "chunks":  # AIO_CHUNK requests, else the two equal ones a state this small gets
        monkeypatch.setattr(blockmod, "DIRECT_SPLIT_MAX", 0)
    region.record_mode = mode
    st, prev, prev_edge = _history(region, nbytes)
    store = SlotStore(region, PCHK)
    newest = store.read()
    sb, bs = store.slot_blocks, region.block_size
    before = snapshot(region)
    new = fill(st, 7)
    pos = st.checkpoint(EdgeCheckpoint(99, 98))
    after = snapshot(region)
    other = slice(newest.slot * sb * bs, (newest.slot + 1) * sb * bs)
    assert after[other] == before[other]  # the slot with the previous record was not written
    secs = _changed_sectors(before, after)
    assert secs and all((off // (sb * bs)) != newest.slot for off, _ in secs)
    rng = random.Random(nbytes)
    subsets = [set(range(k)) for k in range(len(secs))]  # every prefix in issue order
    subsets += [set(range(k, len(secs))) for k in range(1, len(secs))]  # every suffix (header first lands)
    subsets += [set(rng.sample(range(len(secs)), rng.randrange(len(secs)))) for _ in range(40)]
    for chosen in subsets:
        image = bytearray(before)
        for i in chosen:
            off, data = secs[i]
            image[off : off + len(data)] = data
        region.write_blocks(0, image)
        got = CheckpointedStageState.restore(region)
        assert bytes(got.state) == prev and got.edge == prev_edge, (len(chosen), len(secs))
    region.write_blocks(0, after)
    got = CheckpointedStageState.restore(region)
    assert bytes(got.state) == new and got.edge == EdgeCheckpoint(99, 98) and got.last_seq == pos


def test_an_aligned_checkpoint_recorded_through_a_wrapper_tears_like_any_record(region: BlockRegion) -> None:
    """The same record through a device wrapper (the ordinary path, sector by sector in issue
    order): every cut that leaves a sector of it unwritten leaves the previous checkpoint."""
    _st, prev, prev_edge = _history(region, 9000)
    image = snapshot(region)
    rec = RecordingDevice(region)
    nxt = CheckpointedStageState.restore(rec)  # type: ignore[arg-type]
    assert nxt.buffer is not None
    nxt.state[:] = 0xAB
    nxt.checkpoint(EdgeCheckpoint(50, 50))
    writes = [op for op in rec.ops if op.kind == "write"]
    assert len(writes) == 1
    lba, data = writes[0].lba, writes[0].data
    for cut in range(0, len(data), SECTOR):
        torn = bytearray(image)
        at = lba * region.block_size
        torn[at : at + cut] = data[:cut]
        region.write_blocks(0, torn)
        got = CheckpointedStageState.restore(region)
        if torn[at : at + len(data)] == data:  # every sector that differs has landed: it is whole
            assert bytes(got.state) == bytes([0xAB]) * 9000, cut
        else:
            assert bytes(got.state) == prev and got.edge == prev_edge, cut
    torn = bytearray(image)
    torn[lba * region.block_size : lba * region.block_size + len(data)] = data
    region.write_blocks(0, torn)
    assert bytes(CheckpointedStageState.restore(region).state) == bytes([0xAB]) * 9000


# -- forged envelopes ----------------------------------------------------------------


def _forge(region: BlockRegion, envelope: bytes, state: bytes, version: int = 4) -> None:
    store = SlotStore(region, PCHK)
    store.write([envelope, state], version=version)


@pytest.mark.parametrize(
    ("flags", "pad", "fill_pad", "codec", "why"),
    [
        (0x02, 0, 0, 2, "flags"),
        (ALIGNED | 0x80, 0, 0, 2, "flags"),
        (ALIGNED, 1 << 30, 0, 2, "padding"),
        (ALIGNED, 8, 1, 2, "padding"),
        (ALIGNED, 0, 0, 1, "msgpack"),
    ],
)
def test_a_forged_aligned_envelope_is_refused(
    region: BlockRegion, flags: int, pad: int, fill_pad: int, codec: int, why: str
) -> None:
    CheckpointedStageState.with_buffer(region, 100, stage=STAGE).checkpoint()  # a good one in the other slot
    stage = STAGE.encode()
    envelope = struct.pack("<BBHIQQ", codec, flags, len(stage), pad, 1, 1) + stage
    body = (bytes([fill_pad]) * min(pad, 8)) + b"state"
    _forge(region, envelope, body)
    with pytest.raises(Corrupted, match=why):
        CheckpointedStageState.restore(region)


def test_version_3_ignores_the_envelope_bytes_version_4_reads(region: BlockRegion) -> None:
    """A version 3 record with nonzero bytes where version 4 keeps flags and pad_len (an older
    build never read them) still restores as before: the state right after the stage name."""
    stage = STAGE.encode()
    envelope = struct.pack("<BBHIQQ", 2, 0x7F, len(stage), 12345, 4, 5) + stage
    _forge(region, envelope, b"plain state", version=3)
    got = CheckpointedStageState.restore(region)
    assert got.state == b"plain state" and got.edge == EdgeCheckpoint(4, 5) and got.buffer is None
    assert ENVELOPE_SIZE == 24


def test_the_store_keeps_one_writer_per_buffer_and_a_closed_one_writes_nothing(tmp_path: Path) -> None:
    r = open_block(tmp_path / "w.img", create_size=SIZE)
    st = CheckpointedStageState.with_buffer(r, 50_000, stage=STAGE)
    st.checkpoint()
    w = st._store._direct
    assert w is not None and w.n == 50_000
    st.checkpoint()
    assert st._store._direct is w  # the checks and the C pointers were paid once
    other = CheckpointedStageState.with_buffer(r, 50_000, stage=STAGE)
    other._store = st._store  # another buffer through the same store: a new writer
    other.checkpoint()
    assert st._store._direct is not w and w._mm.closed
    w2 = r.direct_writer(r.block_size, other.state)
    w2.close()
    w2.close()  # idempotent
    with pytest.raises(Disconnected):
        w2.write(0)
    w3 = r.direct_writer(r.block_size, other.state)
    r.lease.free()
    with pytest.raises(LeaseExpired):
        w3.write(0)
    w3.close()
    with pytest.raises(LeaseExpired):
        st.checkpoint()


def test_a_forked_child_checkpoints_its_aligned_state_through_the_parents_region(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AIO contexts do not survive fork: the child's aligned checkpoint still lands whole."""
    monkeypatch.setattr(blockmod, "AIO_CHUNK", 8192)
    r = open_block(tmp_path / "f.img", create_size=SIZE)
    r.record_mode = "aio"
    st = CheckpointedStageState.with_buffer(r, 30_000, stage=STAGE)
    fill(st, 1)
    st.checkpoint()
    assert r._aio  # the parent's context exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            want = fill(st, 2)
            st.checkpoint()
            code = 0 if bytes(CheckpointedStageState.restore(r).state) == want else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(CheckpointedStageState.restore(r).state) == bytes(
        np.frombuffer(random.Random(2).randbytes(30_000), dtype=np.uint8)
    )
    r.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    codec=hst.one_of(hst.sampled_from([1, 2]), hst.integers(0, 255)),
    flags=hst.one_of(hst.sampled_from([0, ALIGNED]), hst.integers(0, 255)),
    stage_len=hst.one_of(hst.integers(0, 12), hst.integers(0, 0xFFFF)),
    pad=hst.one_of(hst.integers(0, 40), hst.integers(0, 0xFFFFFFFF)),
    body=hst.one_of(
        hst.binary(max_size=600),
        hst.builds(lambda n, tail: b"stage" + bytes(n) + tail, hst.integers(0, 60), hst.binary(max_size=80)),
    ),
)
def test_any_version_4_envelope_restores_or_raises_a_typed_error(
    codec: int, flags: int, stage_len: int, pad: int, body: bytes
) -> None:
    """Whatever a forger puts in a checksummed version 4 record's envelope: a state, or Corrupted
    (or FabricValueError for a stage name that is not one), never another exception."""
    dev = MemDevice(block_size=512, nblocks=16)
    envelope = struct.pack("<BBHIQQ", codec, flags, stage_len, pad, 1, 2)
    SlotStore(dev, PCHK).write([envelope, body], version=4)
    try:
        got = CheckpointedStageState.restore(dev)  # type: ignore[arg-type]
    except (Corrupted, FabricValueError):
        return
    assert got.edge == EdgeCheckpoint(1, 2)
    if flags & ALIGNED:
        assert isinstance(got.state, np.ndarray) and got.buffer is got.state
