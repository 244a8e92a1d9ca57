"""Checkpoint lanes (slots.SlotLane over drivers.block.RecordLane): the prepared write a
CheckpointedStageState keeps for a bytes state of one length or its aligned buffer. The same
records as the ordinary path (byte for byte where the format is the same), a large bytes state
written from its own memory (PCHK version 4 without ALIGNED), when the ordinary path takes over,
typed errors, and torn writes of the lane's own requests on a file and a loop device."""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grafos_fabric import observe
from grafos_fabric.checkpoint import ENVELOPE_SIZE, CheckpointedStageState, EdgeCheckpoint, StageId
from grafos_fabric.drivers import block as blockmod
from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import Disconnected, LeaseExpired, VersionMismatch
from grafos_fabric.slots import DATA_OFFSET, PCHK, SlotFormat, SlotStore, pack_record

try:
    from _blockdev import SECTOR, MemDevice, open_kind, snapshot
except ImportError:  # tests/ imported as a package
    from tests._blockdev import SECTOR, MemDevice, open_kind, snapshot

SIZE = 4 << 20
STAGE = "lane"
_ENV = struct.Struct("<BBHIQQ")


@pytest.fixture(params=["file", pytest.param("loop", marks=pytest.mark.blockdev)])
def region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockRegion]:
    with contextlib.ExitStack() as stack:
        yield open_kind(request.param, tmp_path, SIZE, stack)


def state_of(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def slot_image(region: BlockRegion, store: SlotStore, slot: int, nbytes: int) -> bytes:
    return region.read_blocks(slot * store.slot_blocks, nbytes // region.block_size)


@pytest.mark.parametrize("mode", ["auto", "gather", "direct", "aio"])
@pytest.mark.parametrize("nbytes", [1, 4096, 5000, 200_000, 300_007])
def test_a_bytes_state_goes_through_a_lane_and_writes_what_the_ordinary_path_writes(
    region: BlockRegion, nbytes: int, mode: str
) -> None:
    """Version 3 lanes write pack_record's bytes; a split lane (a large state by AIO) writes
    version 4 without ALIGNED, its zero padding putting the state's first block-aligned byte on a
    block boundary; every record restores to the bytes state, fresh objects of the same length
    included (each at its own address)."""
    region.record_mode = mode
    st = CheckpointedStageState(state_of(nbytes, 0), region, codec="raw", stage=STAGE)
    store = SlotStore(region, PCHK)
    bs = region.block_size
    lanes = set()
    for i in range(6):
        if i >= 3:  # a new object each time, as a program makes them
            st.state = state_of(nbytes, i)
        edge = EdgeCheckpoint(i, 2 * i)
        seq = st.checkpoint(edge)
        rec = store.read()
        assert rec.seq == seq == i + 1
        got = CheckpointedStageState.restore(region)
        assert type(got.state) is bytes and got.state == st.state and got.edge == edge and got.codec == "raw"
        codec, flags, stage_len, pad, *_ = _ENV.unpack_from(rec.data)
        assert (codec, flags, stage_len) == (2, 0, len(STAGE))
        if rec.version == 3:
            image = pack_record(
                PCHK,
                _ENV.pack(2, 0, len(STAGE), 0, i, 2 * i) + STAGE.encode() + st.state,
                seq=seq,
                tag=0,
                slot=rec.slot,
                block_size=bs,
                slot_blocks=store.slot_blocks,
            )
            assert slot_image(region, store, rec.slot, len(image)) == image
        else:  # the split lane's record: the state's first aligned byte on a block boundary
            assert rec.version == 4 and st._lane is not None and st._lane.lane.split
            addr = int(blockmod.ffi.cast("uintptr_t", blockmod.ffi.from_buffer(st.state)))
            k = -addr % bs
            assert (DATA_OFFSET + ENVELOPE_SIZE + stage_len + pad + k) % bs == 0 and pad < bs
            assert rec.data[ENVELOPE_SIZE + stage_len + pad :] == st.state
        if st._lane is not None:
            lanes.add(id(st._lane))
    assert st._lane is not None and len(lanes) == 1  # made once (after two ordinary writes), kept
    split = mode in ("auto", "aio") and nbytes > blockmod.AIO_CHUNK
    assert st._lane.lane.split == split
    assert store.read().version == (4 if split else 3)


def test_a_lane_checkpoint_runs_a_few_hundred_bytecodes(tmp_path: Path) -> None:
    """What the lane is for: the Python around the I/O (the ordinary path ran ~660 bytecodes for a
    bytes state, ~500 for an aligned one). Counted, not timed."""
    import sys

    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        for st in (
            CheckpointedStageState(state_of(4096, 1), r, codec="raw", stage=STAGE),
            CheckpointedStageState(state_of(1 << 20, 1), r, codec="raw", stage=STAGE),
            CheckpointedStageState.with_buffer(r, 1 << 20, stage=STAGE),
        ):
            for _ in range(3):
                st.checkpoint()
            count = 0

            def trace(frame: Any, event: str, arg: Any) -> Any:
                nonlocal count
                frame.f_trace_opcodes = True
                count += event == "opcode"
                return trace

            sys.settrace(trace)
            try:
                st.checkpoint()
            finally:
                sys.settrace(None)
            assert 0 < count < 300, count


def test_a_small_lane_checkpoint_is_one_python_frame_around_one_native_call_and_takes_no_lock(
    tmp_path: Path,
) -> None:
    """A 4 KiB bytes state on a file: checkpoint() calls no other Python function (one native call,
    grafos_fabric._item.checkpoint, which takes the state's lock and calls gf_lane_write with the
    lane's prepared gf_lane: the lease's deadline checked, the header's sequence and slot and the
    envelope's two offsets put in natively), under 10 bytecodes (its one line; the checks ran as
    about 110 bytecodes of Python before native/gf_ckpt.c, 190 in two frames before that), and
    the region's I/O lock is not taken (the region's gate, in the native call, guards the
    descriptor instead): held by another thread, the checkpoint still completes. Counted, not
    timed."""
    import sys
    import threading

    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(4096, 1), r, codec="raw", stage=STAGE, durability="single-sync")
        for _ in range(3):
            st.checkpoint()
        assert st._lane is not None and st._lane.lane.gated
        calls: list[str] = []
        opcodes = 0
        errors: list[BaseException] = []
        done = threading.Event()

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                calls.append(frame.f_code.co_qualname)

        def trace(frame: Any, event: str, arg: Any) -> Any:
            nonlocal opcodes
            frame.f_trace_opcodes = True
            opcodes += event == "opcode"
            return trace

        first, second = EdgeCheckpoint(5, 6), EdgeCheckpoint(7, 8)

        def run() -> None:
            try:
                sys.setprofile(profile)
                try:
                    st.checkpoint(first)
                finally:
                    sys.setprofile(None)
                sys.settrace(trace)
                try:
                    st.checkpoint(second)
                finally:
                    sys.settrace(None)
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)
            finally:
                done.set()

        with r._io_lock:  # a lane write that took it would wait here for good
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            assert done.wait(120), "the lane's checkpoint waited for the region's I/O lock"
        worker.join()
        assert not errors, errors
        assert calls == ["CheckpointedStageState.checkpoint"]
        assert 0 < opcodes < 10, opcodes  # the method's one line (native/gf_ckpt.c does the rest)
        got = CheckpointedStageState.restore(r)
        assert got.state == state_of(4096, 1) and got.edge == EdgeCheckpoint(7, 8) and got.last_seq == 5


def test_a_region_closed_while_a_lane_write_is_on_its_way_refuses_it(tmp_path: Path) -> None:
    """The close lands between the lane's checks and its native call (no lock between them): the
    gate, shut by close() before the descriptors go, refuses the write (-EBADF, nothing written),
    and checkpoint() raises Disconnected; the previous checkpoint is what a reader finds."""
    path = tmp_path / "r.img"
    r = open_block(path, create_size=SIZE)
    st = CheckpointedStageState(state_of(4096, 1), r, codec="raw", stage=STAGE)
    for _ in range(3):
        st.checkpoint()
    lane = st._lane
    assert lane is not None and lane.lane.gated and st._fast is not None
    real = st._fast[0]

    def close_first(*args: Any) -> int:
        r.close()
        return int(real(*args))

    st._fast = (close_first, *st._fast[1:])
    st.state = state_of(4096, 2)
    with pytest.raises(Disconnected):
        st.checkpoint()
    with open_block(path) as again:
        got = CheckpointedStageState.restore(again)
        assert got.state == state_of(4096, 1) and got.last_seq == 3


def test_the_ordinary_path_takes_over_where_the_lane_does_not_fit(tmp_path: Path) -> None:
    """Another length, another stage name, a state of another kind, an observer, metrics, a changed
    record mode: each record is still right, written the ordinary way where the lane cannot."""
    calls: list[str] = []

    class Obs:
        def on_flush_start(self, lease_id: str) -> None:
            calls.append("start")

        def on_flush_complete(self, lease_id: str) -> None:
            calls.append("end")

    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(5000, 1), r, codec="raw", stage=STAGE)
        for _ in range(3):
            st.checkpoint()
        lane = st._lane
        assert lane is not None

        def check(want_stage: str = STAGE) -> None:
            got = CheckpointedStageState.restore(r)
            assert got.state == bytes(st.state) and got.stage.name == want_stage

        st.state = state_of(6000, 2)  # another length: ordinary, and no lane for it yet
        st.checkpoint()
        check()
        assert st._lane is None
        st.checkpoint()  # the second of that length: a lane for it
        assert st._lane is not None and st._lane.lane.n == 6000
        st.stage = StageId("renamed")
        st.checkpoint()
        check("renamed")
        st.state = bytearray(state_of(6000, 3))  # not bytes: ordinary (a copy), no lane
        st.checkpoint()
        check("renamed")
        assert st._lane is None
        st.state = state_of(6000, 4)
        st.checkpoint()
        st.checkpoint()
        assert st._lane is not None
        st.observer = Obs()
        st.checkpoint()
        check("renamed")
        assert calls == ["start", "end"]
        st.observer = None
        obs = observe.enable()
        try:
            st.checkpoint()
        finally:
            observe.disable()
        assert obs.snapshot()["counters"]
        check("renamed")
        lane = st._lane
        r.record_mode = "direct"  # the region changes how it writes: the lane is stale
        assert not lane.live
        seq = st.checkpoint()
        check("renamed")
        assert st._lane is not lane and st._lane is not None and st._lane.live
        assert st.checkpoint() == seq + 1  # through the new lane
        check("renamed")


def test_a_lane_fails_closed_like_the_ordinary_path(tmp_path: Path) -> None:
    with open_block(tmp_path / "r.img", create_size=SIZE, ttl=60) as r:
        st = CheckpointedStageState(state_of(4096, 1), r, codec="raw", stage=STAGE)
        for _ in range(3):
            st.checkpoint()
        assert st._lane is not None
        r._cell.store_deadline_ns(0)  # the lease's deadline passed
        st.state = state_of(4096, 2)
        with pytest.raises(LeaseExpired):
            st.checkpoint()
    with pytest.raises(Disconnected):  # the region is closed
        st.checkpoint()
    with open_block(tmp_path / "r.img") as again:
        assert CheckpointedStageState.restore(again).state == state_of(4096, 1)
        st2 = CheckpointedStageState(state_of(4096, 5), again, codec="raw", stage=STAGE)
        for _ in range(3):
            st2.checkpoint()
        lane = st2._lane
        assert lane is not None
        lane.close()  # a closed lane writes nothing: the ordinary path writes the record
        st2.state = state_of(4096, 6)
        with pytest.raises(Disconnected):
            lane.lane.write(0)
        st2.checkpoint()
        assert CheckpointedStageState.restore(again).state == state_of(4096, 6)


def test_devices_without_record_lanes_keep_the_ordinary_path() -> None:
    dev = MemDevice(block_size=4096, nblocks=256)
    st = CheckpointedStageState(state_of(300_000, 1), dev, codec="raw", stage=STAGE)
    for _ in range(3):
        st.checkpoint()
    assert st._lane is None
    assert CheckpointedStageState.restore(dev).state == state_of(300_000, 1)


def test_a_build_that_reads_only_version_3_refuses_a_split_record(tmp_path: Path) -> None:
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(300_000, 1), r, codec="raw", stage=STAGE)
        for _ in range(3):
            st.checkpoint()
        assert SlotStore(r, PCHK).read().version == 4
        old = SlotFormat(b"PCHK", 3, "checkpoint", legacy_version=2)
        with pytest.raises(VersionMismatch):
            SlotStore(r, old).read()


def test_a_refused_aio_context_makes_the_lane_stale_and_the_record_lands(tmp_path: Path) -> None:
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(300_000, 1), r, codec="raw", stage=STAGE)
        for _ in range(3):
            st.checkpoint()
        lane = st._lane
        assert lane is not None and lane.lane.split
        # a gated lane's writes use the gated lanes' context, not the region's (see _gate_aio_ctx)
        assert lane.lane.gated and lane.lane._ctx == r._gate_aio[0] != r._aio[0]
        ctx = r._gate_aio[0]
        blockmod.lib.gf_aio_destroy(ctx)  # the kernel no longer knows it: io_submit refuses
        st.state = state_of(300_000, 2)
        st.checkpoint()  # rewritten in one request by the native fallback (rc 1)
        r._gate_aio.clear()
        assert r._aio_failed and not lane.live
        assert CheckpointedStageState.restore(r).state == state_of(300_000, 2)
        st.state = state_of(300_000, 3)
        st.checkpoint()  # ordinary, then a lane without AIO (so without the split)
        st.checkpoint()
        assert st._lane is not None and not st._lane.lane.split
        assert CheckpointedStageState.restore(r).state == state_of(300_000, 3)


def _changed_sectors(before: bytes, after: bytes) -> list[tuple[int, bytes]]:
    return [
        (off, after[off : off + SECTOR])
        for off in range(0, len(after), SECTOR)
        if before[off : off + SECTOR] != after[off : off + SECTOR]
    ]


@pytest.mark.parametrize(("nbytes", "mode"), [(4096, "auto"), (20_000, "direct"), (300_000, "auto"), (300_001, "aio")])
def test_a_lane_checkpoint_torn_anywhere_restores_the_previous_one(
    region: BlockRegion, nbytes: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane's own write (gathered, one O_DIRECT request, or split AIO requests from the bytes'
    memory): any subset of its sectors short of all leaves the previous checkpoint, and never
    touches the slot that holds it."""
    monkeypatch.setattr(blockmod, "DIRECT_SPLIT_MAX", 0)  # AIO_CHUNK requests: more of them
    region.record_mode = mode
    st = CheckpointedStageState(state_of(nbytes, 1), region, codec="raw", stage=STAGE)
    for i in range(3):
        st.state = state_of(nbytes, 10 + i)
        st.checkpoint(EdgeCheckpoint(i, i))
    assert st._lane is not None
    prev, prev_edge = st.state, st.edge
    store = SlotStore(region, PCHK)
    newest = store.read()
    sb, bs = store.slot_blocks, region.block_size
    before = snapshot(region)
    st.state = state_of(nbytes, 99)
    seq = st.checkpoint(EdgeCheckpoint(99, 98))
    after = snapshot(region)
    other = slice(newest.slot * sb * bs, (newest.slot + 1) * sb * bs)
    assert after[other] == before[other]
    secs = _changed_sectors(before, after)
    assert secs
    rng = random.Random(nbytes)
    subsets = [set(range(k)) for k in range(len(secs))]
    subsets += [set(range(k, len(secs))) for k in range(1, len(secs))]
    subsets += [set(rng.sample(range(len(secs)), rng.randrange(len(secs)))) for _ in range(30)]
    for chosen in subsets:
        image = bytearray(before)
        for j in chosen:
            off, data = secs[j]
            image[off : off + len(data)] = data
        region.write_blocks(0, image)
        got = CheckpointedStageState.restore(region)
        assert got.state == prev and got.edge == prev_edge, (len(chosen), len(secs))
    region.write_blocks(0, after)
    got = CheckpointedStageState.restore(region)
    assert got.state == st.state and got.edge == EdgeCheckpoint(99, 98) and got.last_seq == seq


def test_a_split_record_with_forged_padding_is_refused(tmp_path: Path) -> None:
    """The padding a split record carries is checked like an aligned one's: not zero, Corrupted."""
    from grafos_fabric.errors import Corrupted

    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(300_000, 1), r, codec="raw", stage=STAGE)
        for _ in range(3):
            st.checkpoint()
        store = SlotStore(r, PCHK)
        rec = store.read()
        assert rec.version == 4
        _c, _f, stage_len, pad, *_ = _ENV.unpack_from(rec.data)
        assert pad > 0
        data = bytearray(rec.data)
        data[ENVELOPE_SIZE + stage_len] = 1
        image = pack_record(
            PCHK,
            bytes(data),
            seq=rec.seq + 1,
            tag=0,
            slot=1 - rec.slot,
            block_size=r.block_size,
            slot_blocks=store.slot_blocks,
            version=4,
        )
        r.write_blocks((1 - rec.slot) * store.slot_blocks, image)
        with pytest.raises(Corrupted):
            CheckpointedStageState.restore(r)


def test_a_lane_that_cannot_be_made_leaves_a_durable_checkpoint_and_the_ordinary_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_a: Any, **_k: Any) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(SlotStore, "lane", refuse)
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(4096, 1), r, codec="raw", stage=STAGE)
        for i in range(4):
            assert st.checkpoint() == i + 1
        assert st._lane is None
        assert CheckpointedStageState.restore(r).state == state_of(4096, 1)


# -- gf_lane_write, attacked directly (the native half of a gated lane) ---------------------------


def _gated_lane(tmp_path: Path, mode: str = "auto") -> tuple[BlockRegion, CheckpointedStageState[Any], Any]:
    r = open_block(tmp_path / "r.img", create_size=SIZE)
    r.record_mode = mode
    st = CheckpointedStageState(state_of(4096, 1), r, codec="raw", stage=STAGE, durability="single-sync")
    for _ in range(3):
        st.checkpoint()
    assert st._fast is not None and st._lane is not None and st._lane.lane.c is not None
    return r, st, st._lane.lane.c


def _live_deadline() -> int:
    import time

    return time.monotonic_ns() + 60 * 10**9


@pytest.mark.parametrize("mode", ["auto", "gather", "direct"])
def test_gf_lane_write_refuses_a_bad_lane_and_writes_nothing(tmp_path: Path, mode: str) -> None:
    """Every field gf_lane_write relies on is checked before anything is written: a NULL lane, a
    third slot, offsets for the two values outside the head or over its header, a head shorter
    than the header, an unknown kind, no gate, a buffer too small for the record (gf_slot_write's
    own check), a negative position: -EINVAL, and both slots keep their bytes."""
    from grafos_fabric._ffi import ffi, lib

    r, st, c = _gated_lane(tmp_path, mode)
    with r:
        store = SlotStore(r, PCHK)
        before = [slot_image(r, store, i, 2 * r.block_size) for i in (0, 1)]
        seq = st.last_seq + 1
        einval = -__import__("errno").EINVAL
        assert lib.gf_lane_write(ffi.NULL, seq, 0, 1, 2, _live_deadline()) == einval
        assert lib.gf_lane_write(c, seq, 2, 1, 2, _live_deadline()) == einval
        for field, bad in [
            ("at", [8, 0]),  # inside the header
            ("at", [0, c.hdr_len - 4]),  # runs past the head
            ("at", [0, c.hdr_len + 64]),
            ("hdr_len", 32),
            ("kind", 7),
            ("gate", ffi.NULL),
            ("pos", [-4096, 0]),
        ] + ([("nbytes", 64)] if c.kind == lib.GF_LANE_COPY else []):
            saved = getattr(c, field)
            saved = list(saved) if field in ("at", "pos") else saved
            setattr(c, field, bad)
            try:
                assert lib.gf_lane_write(c, seq, 0, 1, 2, _live_deadline()) == einval, field
            finally:
                setattr(c, field, saved)
        assert [slot_image(r, store, i, 2 * r.block_size) for i in (0, 1)] == before
        assert st.checkpoint(EdgeCheckpoint(9, 10)) == seq  # the lane as it was still writes
        got = CheckpointedStageState.restore(r)
        assert got.edge == EdgeCheckpoint(9, 10) and got.last_seq == seq


def test_gf_lane_write_writes_nothing_for_a_closed_or_stale_lane_a_dead_lease_or_a_forged_seq(
    tmp_path: Path,
) -> None:
    """GF_LANE_AGAIN, nothing written: after gf_lane_close, after the gate's generation moved
    (gf_gate_bump: the region changed how it writes), past the lease's deadline, and for a
    sequence over 2**63 - 1; -EBADF once the region is closed (its gate shut). checkpoint() then
    goes the careful way: a typed error, or the record through the ordinary path."""
    from grafos_fabric._ffi import lib

    r, st, c = _gated_lane(tmp_path)
    store = SlotStore(r, PCHK)
    before = [slot_image(r, store, i, 2 * r.block_size) for i in (0, 1)]
    seq = st.last_seq + 1
    again = lib.GF_LANE_AGAIN
    assert lib.gf_lane_write(c, seq, 0, 1, 2, 0) == again  # the deadline has passed
    assert lib.gf_lane_write(c, 1 << 63, 0, 1, 2, _live_deadline()) == again
    assert lib.gf_lane_write(c, (1 << 64) - 1, 0, 1, 2, _live_deadline()) == again
    gen = lib.gf_gate_gen(r._gate)
    lib.gf_gate_bump(r._gate)
    assert lib.gf_gate_gen(r._gate) == gen + 1
    assert lib.gf_lane_write(c, seq, 0, 1, 2, _live_deadline()) == again
    c.gen = gen + 1
    lib.gf_lane_close(c)
    assert lib.gf_lane_write(c, seq, 0, 1, 2, _live_deadline()) == again
    assert [slot_image(r, store, i, 2 * r.block_size) for i in (0, 1)] == before
    c.closed = 0  # (only to reach the shut gate below)
    r.close()
    assert lib.gf_lane_write(c, seq, 0, 1, 2, _live_deadline()) == -__import__("errno").EBADF
    with pytest.raises(Disconnected):
        st.checkpoint()
    with open_block(tmp_path / "r.img") as again_r:
        assert CheckpointedStageState.restore(again_r).last_seq == seq - 1


def test_a_checkpoint_through_a_stale_closed_or_expired_lane_is_still_right(tmp_path: Path) -> None:
    """Through checkpoint(): a lane made stale by the region (record_mode set) is replaced after
    one ordinary write; a lease past its deadline raises LeaseExpired and writes nothing; a lane
    closed under the state (internal misuse) is not written through (its buffers are gone): the
    ordinary path writes the record; the newest record is always the last one that returned."""
    r, st, _c = _gated_lane(tmp_path)
    with r:
        old = st._lane
        r.record_mode = "gather"  # stale: gf_lane_write says so, the ordinary path writes
        seq = st.checkpoint(EdgeCheckpoint(1, 1))
        assert st._lane is not old and st._fast is not None
        assert CheckpointedStageState.restore(r).last_seq == seq
        assert st.checkpoint(EdgeCheckpoint(2, 2)) == seq + 1  # the new lane, one native call
        r._cell.store_deadline_ns(0)
        with pytest.raises(LeaseExpired):
            st.checkpoint(EdgeCheckpoint(3, 3))
        r._cell.store_deadline_ns(_live_deadline())
        assert st._lane is not None
        st._lane.close()
        assert st.checkpoint(EdgeCheckpoint(4, 4)) == seq + 2
        got = CheckpointedStageState.restore(r)
        assert got.last_seq == seq + 2 and got.edge == EdgeCheckpoint(4, 4) and got.state == state_of(4096, 1)


@pytest.mark.parametrize("aligned", [False, True])
def test_one_native_call_writes_each_kind_of_small_state_and_a_new_bytes_object_each_time(
    tmp_path: Path, aligned: bool
) -> None:
    """Up to 128 KiB, both kinds of state take checkpoint()'s one-call path (SlotLane.fast), a new
    bytes object of the lane's length re-points the lane without leaving it, and every record
    restores to what was checkpointed, with its edge."""
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        if aligned:
            st: CheckpointedStageState[Any] = CheckpointedStageState.with_buffer(r, 100_000, stage=STAGE)
        else:
            st = CheckpointedStageState(state_of(100_000, 0), r, codec="raw", stage=STAGE)
        for _ in range(3):
            st.checkpoint()
        fast = st._fast
        assert fast is not None and fast[1] is st._lane.lane.c  # type: ignore[union-attr]
        for i in range(1, 6):
            if aligned:
                st.state[:] = i
                want: Any = bytes([i]) * 100_000
            else:
                st.state = want = state_of(100_000, i)
            seq = st.checkpoint(EdgeCheckpoint(i, 2 * i))
            assert st._fast is not None and st._fast[1] is fast[1]  # the same lane all along
            got = CheckpointedStageState.restore(r)
            assert bytes(got.state) == want and got.edge == EdgeCheckpoint(i, 2 * i) and got.last_seq == seq


def _page_offset(data: bytes) -> int:
    return int(blockmod.ffi.cast("uintptr_t", blockmod.ffi.from_buffer(data))) % 4096


def _two_offsets(n: int) -> tuple[bytes, bytes]:
    """Two bytes objects of ``n`` bytes whose first bytes lie at other page offsets (so a split
    lane needs other zero padding for each)."""
    held = [state_of(n, 100 + i) for i in range(64)]
    first = held[0]
    for other in held[1:]:
        if _page_offset(other) != _page_offset(first):
            return first, other
    pytest.skip("64 objects of one size all at one page offset: the allocator left nothing to test")


def test_a_split_lane_takes_states_at_other_page_offsets_in_one_native_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large bytes state by AIO goes through a gated split lane (the gated lanes' AIO context):
    re-pointed at objects whose bytes start at other page offsets, it packs its header and the
    envelope's padding anew, and every checkpoint after the lane is made is one native call
    (gf_lane_write; the careful SlotLane.write is never called); each restores to its state."""
    from grafos_fabric.slots import SlotLane

    careful: list[int] = []
    real_write = SlotLane.write

    def counted(self: SlotLane, *fields: Any) -> int | None:
        careful.append(1)
        return real_write(self, *fields)

    n = 300_000
    a, b = _two_offsets(n)
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(a, r, codec="raw", stage=STAGE, durability="single-sync")
        for _ in range(3):
            st.checkpoint()
        lane = st._lane
        assert lane is not None and lane.lane.split and lane.lane.gated and st._fast is not None
        assert lane.lane._ctx == r._gate_aio[0] and lane.lane.c.aio_ctx == r._gate_aio[0]
        monkeypatch.setattr(SlotLane, "write", counted)
        pads = set()
        for i, state in enumerate([b, a, b, b, a]):
            st.state = state
            seq = st.checkpoint(EdgeCheckpoint(i, i + 1))
            pads.add(lane.pad)
            rec = SlotStore(r, PCHK).read()
            assert rec.seq == seq and rec.version == 4
            got = CheckpointedStageState.restore(r)
            assert got.state == state and got.edge == EdgeCheckpoint(i, i + 1)
        assert len(pads) == 2, pads  # the two objects did need other padding
        assert careful == []  # every one through gf_lane_write
        assert st._lane is lane  # no rebuild


def test_checkpoints_from_two_threads_on_one_state_run_one_at_a_time(tmp_path: Path) -> None:
    """Two threads re-pointing one state at new large bytes objects and checkpointing it, as fast
    as they can: no crash (a lane's native write reads the object's own memory, which a
    re-pointing from the other thread would otherwise free under it), every checkpoint lands,
    and what is restored is one of the states written, whole."""
    import threading

    n = 300_000
    states = [state_of(n, 200 + i) for i in range(6)]
    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(states[0], r, codec="raw", stage=STAGE, durability="single-sync")
        for _ in range(3):
            st.checkpoint()
        assert st._lane is not None and st._lane.lane.gated
        errors: list[BaseException] = []
        seqs: list[int] = []

        def run(k: int) -> None:
            try:
                for i in range(150):
                    st.state = bytes(states[(k + i) % len(states)])  # a new object each time
                    seqs.append(st.checkpoint())
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert sorted(seqs) == list(range(4, 4 + 300))  # each checkpoint its own sequence number
        got = CheckpointedStageState.restore(r)
        assert got.state in states and got.last_seq == 303


@pytest.mark.parametrize("nbytes", [4096, 300_000])
def test_a_gated_lane_that_o_direct_refuses_turns_direct_off_and_writes_nothing(tmp_path: Path, nbytes: int) -> None:
    """RecordLane._failed(-EINVAL) for a gated lane's write to the O_DIRECT descriptor (a
    filesystem that took the flag at open and refused the write): direct I/O off for the region,
    False (nothing written: the caller's ordinary path writes the record, buffered), not an
    OSError; the next checkpoint lands."""
    import errno

    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(nbytes, 1), r, codec="raw", stage=STAGE)
        for _ in range(3):
            st.checkpoint()
        lane = st._lane
        assert lane is not None and lane.lane.gated and r.direct
        assert lane.lane._fd_used == r._fd
        with r._io_lock:
            assert lane.lane._failed(-errno.EINVAL) is False
        assert not r.direct and not lane.live
        st.state = state_of(nbytes, 2)
        st.checkpoint()
        assert CheckpointedStageState.restore(r).state == state_of(nbytes, 2)
