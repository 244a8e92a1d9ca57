"""Durable stage checkpoints: round trips, the PCHK layout, bad input, torn writes, bit flips, kill -9."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from grafos_fabric.checkpoint import CheckpointedStageState, EdgeCheckpoint, StageId
from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import (
    CapacityExceeded,
    Corrupted,
    FabricValueError,
    LeaseExpired,
    NoRecord,
    Revoked,
    VersionMismatch,
)
from grafos_fabric.lease import ManualClock
from grafos_fabric.slots import DATA_OFFSET, HEADER_FIELDS, PCHK, SlotStore, crc32c, pack_header

try:
    from _blockdev import MemDevice, RecordingDevice, apply_sectors, open_kind, sectors, snapshot
except ImportError:  # tests/ imported as a package
    from tests._blockdev import MemDevice, RecordingDevice, apply_sectors, open_kind, sectors, snapshot

SIZE = 64 * 1024
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["file", pytest.param("loop", marks=pytest.mark.blockdev)])
def region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockRegion]:
    with contextlib.ExitStack() as stack:
        yield open_kind(request.param, tmp_path, SIZE, stack)


def restored(dev: Any, **kw: Any) -> tuple[Any, EdgeCheckpoint]:
    got = CheckpointedStageState.restore(dev, **kw)
    return got.state, got.edge


# -- round trips ---------------------------------------------------------------


def test_a_new_stage_state_writes_nothing_until_the_first_checkpoint(region: BlockRegion) -> None:
    before = snapshot(region)
    st = CheckpointedStageState({"n": 1}, region, stage="s")
    assert st.edge == EdgeCheckpoint(0, 0)
    assert snapshot(region) == before
    with pytest.raises(NoRecord):
        CheckpointedStageState.restore(region)


def test_checkpoint_then_restore_returns_the_state_and_the_edge(region: BlockRegion) -> None:
    st = CheckpointedStageState({"count": 41, "names": ["a", "b"], "blob": b"\x00\x01"}, region, stage="map")
    st.checkpoint(EdgeCheckpoint(input_offset=17, output_commit=9))
    got = CheckpointedStageState.restore(region)
    assert got.state == {"count": 41, "names": ["a", "b"], "blob": b"\x00\x01"}
    assert got.edge == EdgeCheckpoint(17, 9)
    assert got.stage == StageId("map")
    assert got.codec == "msgpack"


def test_restore_returns_the_newest_of_many_checkpoints(region: BlockRegion) -> None:
    st = CheckpointedStageState({"i": 0}, region)
    for i in range(1, 8):
        st.state["i"] = i
        assert st.checkpoint(EdgeCheckpoint(i, i * 10)) == i
    assert restored(region) == ({"i": 7}, EdgeCheckpoint(7, 70))


def test_checkpoints_alternate_between_the_two_slots(region: BlockRegion) -> None:
    st = CheckpointedStageState(b"x", region, codec="raw")
    seen = []
    for _ in range(4):
        st.checkpoint()
        seen.append(max((s for s in SlotStore(region, PCHK).scan() if s.record), key=lambda s: s.record.seq).slot)  # type: ignore[union-attr]
    assert seen == [0, 1, 0, 1]


def test_a_restored_stage_keeps_checkpointing_after_its_last_sequence(region: BlockRegion) -> None:
    st = CheckpointedStageState({"i": 1}, region)
    st.checkpoint()
    st.checkpoint()
    again = CheckpointedStageState.restore(region)
    again.state = {"i": 2}
    assert again.checkpoint(EdgeCheckpoint(5, 5)) == 3
    assert restored(region) == ({"i": 2}, EdgeCheckpoint(5, 5))


def test_checkpoint_without_an_edge_keeps_the_last_edge(region: BlockRegion) -> None:
    st = CheckpointedStageState([1], region)
    st.checkpoint(EdgeCheckpoint(3, 4))
    st.state = [2]
    st.checkpoint()
    assert restored(region) == ([2], EdgeCheckpoint(3, 4))


def test_raw_codec_round_trips_bytes_exactly(region: BlockRegion) -> None:
    payload = os.urandom(5000)
    CheckpointedStageState(bytearray(payload), region, codec="raw").checkpoint(EdgeCheckpoint(1, 2))
    got = CheckpointedStageState.restore(region, codec="raw")
    assert got.state == payload
    assert got.codec == "raw"


def test_state_type_decodes_into_a_typed_struct(region: BlockRegion) -> None:
    class Acc(msgspec.Struct):
        total: int
        seen: list[str]

    CheckpointedStageState(Acc(3, ["x"]), region).checkpoint()
    got = CheckpointedStageState.restore(region, state_type=Acc)
    assert got.state == Acc(3, ["x"])


def test_a_state_that_does_not_match_state_type_raises_corrupted(region: BlockRegion) -> None:
    CheckpointedStageState({"total": "nope"}, region).checkpoint()
    with pytest.raises(Corrupted):
        CheckpointedStageState.restore(region, state_type=dict[str, int])


def test_block_store_checkpoint_survives_closing_and_reattaching(tmp_path: Path) -> None:
    from grafos_fabric.drivers.block import BlockStore

    store = BlockStore(tmp_path / "blocks")
    region = store.lease_block(32 * 1024, ttl=30.0)
    CheckpointedStageState({"k": "v"}, region, stage="sink").checkpoint(EdgeCheckpoint(8, 0))
    lease_id = region.lease.id
    region.close()
    with store.attach(lease_id) as again:
        assert restored(again, stage="sink") == ({"k": "v"}, EdgeCheckpoint(8, 0))


# -- the on-block layout ---------------------------------------------------------


def test_slot_zero_has_the_grafos_pchk_header_fields_at_offsets_0_4_8(region: BlockRegion) -> None:
    st = CheckpointedStageState(b"hello", region, codec="raw", stage="st")
    st.checkpoint(EdgeCheckpoint(1, 2))
    block0 = region.read_blocks(0)
    magic, version, data_len = struct.unpack_from("<4sIQ", block0)
    assert (magic, version) == (b"PCHK", 3)
    data = block0[DATA_OFFSET : DATA_OFFSET + data_len]  # a small record shares the header's block
    assert data.endswith(b"st" + b"hello")
    assert crc32c(data) == struct.unpack_from("<I", block0, 32)[0]
    assert crc32c(block0[:48]) == struct.unpack_from("<I", block0, 48)[0]
    assert block0[HEADER_FIELDS:DATA_OFFSET] == bytes(DATA_OFFSET - HEADER_FIELDS)
    assert block0[DATA_OFFSET + data_len :] == bytes(region.block_size - DATA_OFFSET - data_len)


@pytest.mark.parametrize("durability", ["ordered", "single-sync"])
@pytest.mark.parametrize("nbytes", [100, 4096, 3 * 4096 + 5])
def test_a_checkpoint_is_one_write_then_one_sync_in_whole_blocks(
    region: BlockRegion, durability: str, nbytes: int
) -> None:
    rec = RecordingDevice(region)
    st = CheckpointedStageState(os.urandom(nbytes), rec, codec="raw", durability=durability)
    st.checkpoint()
    assert [op.kind for op in rec.ops] == ["write", "sync"]
    assert rec.ops[0].lba == 0
    overhead = DATA_OFFSET + 24 + len("stage")  # slot header, checkpoint envelope, stage name
    assert len(rec.ops[0].data) == -(-(nbytes + overhead) // region.block_size) * region.block_size


def test_a_4_kib_state_takes_two_4_kib_blocks_not_three(tmp_path: Path) -> None:
    with open_block(tmp_path / "b.img", create_size=SIZE, block_size=4096) as region:
        rec = RecordingDevice(region)
        CheckpointedStageState(os.urandom(4096), rec, codec="raw").checkpoint()
        assert len(rec.ops[0].data) == 2 * 4096


def test_a_legacy_v2_checkpoint_is_still_restored_and_the_next_one_is_v3(region: BlockRegion) -> None:
    data = _good_envelope()
    _write_header(region, 0, _valid_header(region, 0, data, version=2, seq=7), data)
    assert restored(region) == ({"a": 1}, EdgeCheckpoint(1, 1))
    st = CheckpointedStageState.restore(region)
    assert st.last_seq == 7
    st.state = {"b": 2}
    assert st.checkpoint() == 8
    assert struct.unpack_from("<4sI", region.read_blocks(SlotStore(region, PCHK).slot_blocks))[1] == 3
    assert restored(region) == ({"b": 2}, EdgeCheckpoint(1, 1))


# -- bad input -------------------------------------------------------------------


def _write_header(dev: Any, slot: int, header: bytes, data: bytes = b"") -> None:
    """Put ``header`` and ``data`` in ``slot``: data after the header for the current version,
    from the slot's second block for any other (the legacy layout)."""
    store = SlotStore(dev, PCHK)
    bs = dev.block_size
    start = slot * store.slot_blocks
    version = struct.unpack_from("<I", header, 4)[0] if len(header) >= 8 else 0
    if version == PCHK.version:
        body = header + bytes(DATA_OFFSET - len(header)) + data
        dev.write_blocks(start, body + bytes(-len(body) % bs))
        dev.sync()
        return
    block = bytearray(bs)
    block[: len(header)] = header
    if data:
        dev.write_blocks(start + 1, data + bytes(-len(data) % bs))
    dev.write_blocks(start, block)
    dev.sync()


def _valid_header(dev: Any, slot: int, data: bytes, **over: Any) -> bytes:
    store = SlotStore(dev, PCHK)
    fields: dict[str, Any] = {
        "data_len": len(data),
        "seq": 1,
        "tag": 0,
        "data_crc": crc32c(data),
        "slot": slot,
        "block_size": dev.block_size,
        "slot_blocks": store.slot_blocks,
    }
    fields.update(over)
    fmt = over.pop("fmt", PCHK)
    fields.pop("fmt", None)
    return pack_header(fmt, **fields)


def _good_envelope() -> bytes:
    dev = MemDevice(block_size=512, nblocks=8)
    CheckpointedStageState({"a": 1}, dev, stage="s").checkpoint(EdgeCheckpoint(1, 1))
    return SlotStore(dev, PCHK).read().data


def test_wrong_magic_raises_corrupted(region: BlockRegion) -> None:
    data = _good_envelope()
    header = bytearray(_valid_header(region, 0, data))
    header[:4] = b"DCHK"
    _write_header(region, 0, bytes(header), data)
    with pytest.raises(Corrupted) as info:
        CheckpointedStageState.restore(region)
    assert not isinstance(info.value, NoRecord)
    assert "magic" in str(info.value)


def test_unknown_version_with_a_valid_checksum_raises_version_mismatch(region: BlockRegion) -> None:
    data = _good_envelope()
    _write_header(region, 0, _valid_header(region, 0, data, version=5), data)
    with pytest.raises(VersionMismatch):
        CheckpointedStageState.restore(region)


def test_unknown_version_is_refused_even_when_the_other_slot_is_valid(region: BlockRegion) -> None:
    CheckpointedStageState({"old": 1}, region).checkpoint()  # slot 0, seq 1
    data = _good_envelope()
    _write_header(region, 1, _valid_header(region, 1, data, version=9, seq=2), data)
    with pytest.raises(VersionMismatch):
        CheckpointedStageState.restore(region)


def test_a_grafos_v1_pchk_without_checksum_is_refused_with_version_mismatch(region: BlockRegion) -> None:
    data = b"postcard bytes"
    header = struct.pack("<4sIQ", b"PCHK", 1, len(data))  # grafOS layout: padding after data_len
    _write_header(region, 0, header, data)
    with pytest.raises(VersionMismatch):
        CheckpointedStageState.restore(region)


def test_an_absurd_data_length_raises_corrupted_without_reading_it(region: BlockRegion) -> None:
    _write_header(region, 0, _valid_header(region, 0, b"", data_len=1 << 62))
    with pytest.raises(Corrupted) as info:
        CheckpointedStageState.restore(region)
    assert "length" in str(info.value)


def test_a_header_written_for_another_geometry_raises_corrupted(tmp_path: Path) -> None:
    path = tmp_path / "geo.img"
    with open_block(path, create_size=SIZE) as whole:
        CheckpointedStageState({"v": 1}, whole).checkpoint()
        half = whole.length // 2
    with open_block(path, length=half) as smaller, pytest.raises(Corrupted) as info:
        CheckpointedStageState.restore(smaller)
    assert "opened as" in str(info.value)


def test_a_zeroed_lease_raises_no_record_and_never_a_default(region: BlockRegion) -> None:
    with pytest.raises(NoRecord):
        CheckpointedStageState.restore(region)


def test_garbage_in_both_slots_raises_corrupted(region: BlockRegion) -> None:
    region.write_blocks(0, os.urandom(region.nbytes))
    with pytest.raises(Corrupted) as info:
        CheckpointedStageState.restore(region)
    assert not isinstance(info.value, NoRecord)


def test_a_lease_of_one_block_is_too_small(tmp_path: Path) -> None:
    with open_block(tmp_path / "tiny.img", create_size=4096, block_size=4096) as tiny:
        assert tiny.nblocks == 1
        with pytest.raises(CapacityExceeded):
            CheckpointedStageState({}, tiny)


def test_a_state_too_large_for_the_lease_raises_capacity_exceeded_before_writing(region: BlockRegion) -> None:
    CheckpointedStageState({"keep": True}, region).checkpoint(EdgeCheckpoint(1, 1))
    rec = RecordingDevice(region)
    big = CheckpointedStageState(os.urandom(region.nbytes // 2), rec, codec="raw")
    with pytest.raises(CapacityExceeded):
        big.checkpoint(EdgeCheckpoint(2, 2))
    assert rec.ops == []
    assert big.edge == EdgeCheckpoint(0, 0)
    assert restored(region) == ({"keep": True}, EdgeCheckpoint(1, 1))


def test_a_state_that_fills_the_slot_exactly_fits(region: BlockRegion) -> None:
    st = CheckpointedStageState(b"", region, codec="raw", stage="s")
    overhead = 24 + 1
    st.state = bytes(st.capacity - overhead)
    st.checkpoint()
    st.state = bytes(st.capacity - overhead + 1)
    with pytest.raises(CapacityExceeded):
        st.checkpoint()
    assert len(CheckpointedStageState.restore(region).state) == st.capacity - overhead


def test_an_unencodable_state_raises_a_value_error(region: BlockRegion) -> None:
    with pytest.raises(FabricValueError):
        CheckpointedStageState({"f": object()}, region).checkpoint()
    with pytest.raises(FabricValueError):
        CheckpointedStageState({"not": "bytes"}, region, codec="raw").checkpoint()


@pytest.mark.parametrize(
    "kw",
    [{"codec": "pickle"}, {"edge": (1, 2)}, {"stage": ""}, {"durability": "fast"}],
)
def test_bad_constructor_arguments_raise_value_errors(region: BlockRegion, kw: dict[str, Any]) -> None:
    with pytest.raises(FabricValueError):
        CheckpointedStageState({}, region, **kw)


@pytest.mark.parametrize("bad", [-1, 1 << 64, 1.5, True, None])
def test_edge_offsets_must_be_u64(bad: object) -> None:
    with pytest.raises(FabricValueError):
        EdgeCheckpoint(bad, 0)  # type: ignore[arg-type]
    with pytest.raises(FabricValueError):
        EdgeCheckpoint(0, bad)  # type: ignore[arg-type]


def test_restoring_with_another_stage_or_codec_is_refused(region: BlockRegion) -> None:
    CheckpointedStageState({}, region, stage="alpha").checkpoint()
    with pytest.raises(FabricValueError):
        CheckpointedStageState.restore(region, stage="beta")
    with pytest.raises(FabricValueError):
        CheckpointedStageState.restore(region, codec="raw")
    assert CheckpointedStageState.restore(region, stage=StageId("alpha")).stage.name == "alpha"


# -- fail closed -------------------------------------------------------------------


def test_checkpoint_after_the_block_lease_expires_raises_and_keeps_the_old_one(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "exp.img"
    region = open_block(path, create_size=SIZE, ttl=10.0, clock=clock)
    st = CheckpointedStageState({"v": 1}, region)
    st.checkpoint(EdgeCheckpoint(1, 1))
    clock.advance(11.0)
    st.state = {"v": 2}
    with pytest.raises(LeaseExpired):
        st.checkpoint(EdgeCheckpoint(2, 2))
    assert st.edge == EdgeCheckpoint(1, 1)
    with pytest.raises(LeaseExpired):
        CheckpointedStageState.restore(region)
    region.close()
    with open_block(path) as again:
        assert restored(again) == ({"v": 1}, EdgeCheckpoint(1, 1))


def test_checkpoint_after_revoke_raises_revoked(region: BlockRegion) -> None:
    st: CheckpointedStageState[dict[str, int]] = CheckpointedStageState({}, region)
    region.lease.revoke()
    with pytest.raises(Revoked):
        st.checkpoint()


# -- flush observer ---------------------------------------------------------------


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def on_flush_start(self, lease_id: str) -> None:
        self.calls.append(("start", lease_id))
        if self.fail:
            raise RuntimeError("observer start broke")

    def on_flush_complete(self, lease_id: str) -> None:
        self.calls.append(("complete", lease_id))
        if self.fail:
            raise RuntimeError("observer complete broke")


def test_the_observer_hears_start_and_complete_exactly_once_per_checkpoint(region: BlockRegion) -> None:
    obs = Recorder()
    st: CheckpointedStageState[dict[str, int]] = CheckpointedStageState({}, region, observer=obs)
    st.checkpoint()
    st.checkpoint()
    lid = region.lease.id
    assert obs.calls == [("start", lid), ("complete", lid)] * 2


def test_the_observer_hears_complete_when_the_checkpoint_fails(region: BlockRegion) -> None:
    obs = Recorder()
    st = CheckpointedStageState(os.urandom(region.nbytes), region, codec="raw", observer=obs, lease_id="L7")
    with pytest.raises(CapacityExceeded):
        st.checkpoint()
    region.lease.revoke()
    st.state = b"small"
    with pytest.raises(Revoked):
        st.checkpoint()
    assert obs.calls == [("start", "L7"), ("complete", "L7")] * 2


def test_an_observer_that_raises_changes_nothing_and_is_logged(
    region: BlockRegion, caplog: pytest.LogCaptureFixture
) -> None:
    obs = Recorder(fail=True)
    st: CheckpointedStageState[Any] = CheckpointedStageState({"v": 1}, region, observer=obs)
    with caplog.at_level(logging.ERROR, logger="grafos_fabric.checkpoint"):
        assert st.checkpoint(EdgeCheckpoint(3, 3)) == 1
    assert restored(region) == ({"v": 1}, EdgeCheckpoint(3, 3))
    assert "observer" in caplog.text
    st.state = os.urandom(region.nbytes)
    st.codec = "raw"
    with pytest.raises(CapacityExceeded):
        st.checkpoint()
    assert [c[0] for c in obs.calls] == ["start", "complete", "start", "complete"]


# -- torn writes and bit flips -----------------------------------------------------


def _stream(dev: Any, history: int, new_state: bytes, durability: str) -> tuple[bytes, list[tuple[int, bytes]], Any]:
    """Write ``history`` real checkpoints, then record (not apply) one more.

    Returns the image before the recorded one, its sector writes, and the previous (state, edge).
    """
    st = CheckpointedStageState(b"", dev, codec="raw", stage="torn", durability=durability)  # type: ignore[arg-type]
    for h in range(history):
        st.state = bytes([h + 1]) * (300 + 700 * h)
        st.checkpoint(EdgeCheckpoint(h + 1, h + 1))
    prev = restored(dev)
    image = snapshot(dev)
    rec = RecordingDevice(dev)
    nxt = CheckpointedStageState.restore(rec, durability=durability)  # type: ignore[arg-type]
    nxt.state = new_state
    nxt.checkpoint(EdgeCheckpoint(99, 98))
    return image, sectors(rec.ops, dev.block_size), prev


def _expect_new(image: bytes, secs: list[tuple[int, bytes]], applied: set[int], dev: Any) -> bool:
    """Whether the new record is complete on disk: its header sector and every changed data sector landed."""
    slot_bytes = SlotStore(dev, PCHK).slot_blocks * dev.block_size
    header_offsets = {0, slot_bytes}
    for i, (off, data) in enumerate(secs):
        if off in header_offsets:
            if i not in applied:
                return False
        elif i not in applied and image[off : off + len(data)] != data:
            return False
    return True


@pytest.mark.parametrize("durability", ["ordered", "single-sync"])
@pytest.mark.parametrize("history", [1, 2])
@pytest.mark.parametrize("nbytes", [100, 4000, 20000])
def test_a_torn_write_at_every_sector_boundary_restores_the_previous_checkpoint(
    region: BlockRegion, durability: str, history: int, nbytes: int
) -> None:
    new_state = os.urandom(nbytes)
    image, secs, prev = _stream(region, history, new_state, durability)
    for cut in range(len(secs) + 1):
        apply_sectors(region, image, secs[:cut])
        got = restored(region)
        if _expect_new(image, secs, set(range(cut)), region):
            assert got == (new_state, EdgeCheckpoint(99, 98)), f"cut {cut}/{len(secs)}"
        else:
            assert got == prev, f"cut {cut}/{len(secs)}: expected the previous checkpoint"
    assert cut == len(secs) and got[0] == new_state  # the full write is the new checkpoint


@pytest.mark.parametrize("durability", ["ordered", "single-sync"])
def test_a_write_torn_in_any_sector_order_restores_the_previous_checkpoint(
    region: BlockRegion, durability: str
) -> None:
    rng = random.Random(1234)
    new_state = os.urandom(9000)
    image, secs, prev = _stream(region, 2, new_state, durability)
    assert len(secs) > 1
    for _ in range(60):  # one request: any subset of its sectors may land, the header's included
        chosen = set(rng.sample(range(len(secs)), rng.randrange(len(secs))))
        apply_sectors(region, image, [secs[i] for i in sorted(chosen)])
        got = restored(region)
        expect_new = _expect_new(image, secs, chosen, region)
        assert got == ((new_state, EdgeCheckpoint(99, 98)) if expect_new else prev)


def _flip(dev: Any, byte_offset: int, bit: int) -> None:
    bs = dev.block_size
    lba = byte_offset // bs
    block = bytearray(dev.read_blocks(lba))
    block[byte_offset % bs] ^= 1 << bit
    dev.write_blocks(lba, block)


def test_random_bit_flips_in_the_newest_checkpoint_restore_the_previous_one(region: BlockRegion) -> None:
    rng = random.Random(42)
    st = CheckpointedStageState({"gen": 1, "pad": b"a" * 3000}, region)
    st.checkpoint(EdgeCheckpoint(1, 1))
    prev = restored(region)
    st.state = {"gen": 2, "pad": b"b" * 6000}
    st.checkpoint(EdgeCheckpoint(2, 2))
    newest = SlotStore(region, PCHK).read()
    slot_off = newest.slot * SlotStore(region, PCHK).slot_blocks * region.block_size
    data_off = slot_off + DATA_OFFSET
    targets = [(slot_off + b, bit) for b in range(48) for bit in range(8)]  # every header bit under the CRC
    targets += [(data_off + rng.randrange(len(newest.data)), rng.randrange(8)) for _ in range(120)]
    for off, bit in targets:
        _flip(region, off, bit)
        assert restored(region) == prev, f"flip at byte {off} bit {bit}"
        _flip(region, off, bit)
    for _ in range(40):  # several bits at once
        flips = [(data_off + rng.randrange(len(newest.data)), rng.randrange(8)) for _ in range(rng.randint(2, 8))]
        flips = list(dict.fromkeys(flips))
        for off, bit in flips:
            _flip(region, off, bit)
        assert restored(region) == prev
        for off, bit in flips:
            _flip(region, off, bit)
    assert restored(region)[1] == EdgeCheckpoint(2, 2)


def test_bit_flips_in_the_older_slot_leave_the_newest_checkpoint(region: BlockRegion) -> None:
    rng = random.Random(7)
    st = CheckpointedStageState({"v": 1}, region)
    st.checkpoint(EdgeCheckpoint(1, 1))
    st.state = {"v": 2}
    st.checkpoint(EdgeCheckpoint(2, 2))
    older = 0  # byte offset of slot 0, which holds seq 1
    for _ in range(60):
        off, bit = older + rng.randrange(48), rng.randrange(8)
        _flip(region, off, bit)
        assert restored(region) == ({"v": 2}, EdgeCheckpoint(2, 2))
        _flip(region, off, bit)


def test_after_falling_back_the_next_checkpoint_replaces_the_damaged_slot(region: BlockRegion) -> None:
    st = CheckpointedStageState({"v": 1}, region)
    st.checkpoint()
    st.state = {"v": 2}
    st.checkpoint()
    slot1 = SlotStore(region, PCHK).slot_blocks * region.block_size
    _flip(region, slot1 + 20, 3)  # damage the newest (slot 1) header
    back = CheckpointedStageState.restore(region)
    assert back.state == {"v": 1}
    back.state = {"v": 3}
    back.checkpoint(EdgeCheckpoint(3, 3))
    assert restored(region) == ({"v": 3}, EdgeCheckpoint(3, 3))
    assert [s.state for s in SlotStore(region, PCHK).scan()] == ["valid", "valid"]


# -- kill -9 while checkpointing -------------------------------------------------------

CHILD = r"""
import sys
from grafos_fabric.drivers.block import open_block
from grafos_fabric.checkpoint import CheckpointedStageState, EdgeCheckpoint
from grafos_fabric.errors import NoRecord

region = open_block(sys.argv[1])
try:
    st = CheckpointedStageState.restore(region, stage="victim")
    i = st.state["i"]
except NoRecord:
    st = CheckpointedStageState({"i": 0, "blob": b""}, region, stage="victim")
    i = 0
sys.stdout.write(f"start {i}\n")  # one write per line: atomic on a pipe
sys.stdout.flush()
while True:
    i += 1
    st.state = {"i": i, "blob": bytes([i % 251]) * (500 + (i * 997) % 12000)}
    st.checkpoint(EdgeCheckpoint(i, 2 * i))
    sys.stdout.write(f"done {i}\n")
    sys.stdout.flush()
"""


def _kill_loop(path: Path, rounds: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    restored_at: list[int] = []
    for _ in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline().split()
        if not first or first[0] != "start":
            proc.kill()
            raise AssertionError(f"child failed to start: {proc.stderr.read()[-2000:]}")
        start = int(first[1])
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read().split("\n")[:-1]  # a line the kill cut short has no newline
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        done = [int(line.split()[1]) for line in rest if line.startswith("done")]
        last_done = done[-1] if done else start
        with open_block(path) as region:
            try:
                got = CheckpointedStageState.restore(region, stage="victim")
            except NoRecord:
                # killed before its first checkpoint completed (a loaded machine): nothing to restore is right
                assert not done and start == 0, f"no checkpoint on disk, but {last_done} completed"
                restored_at.append(0)
                continue
        i = got.state["i"]
        # the newest completed checkpoint, or the one whose "done" the kill cut off
        assert i in (last_done, last_done + 1), f"restored {i}, last completed {last_done}"
        assert got.edge == EdgeCheckpoint(i, 2 * i)
        assert got.state["blob"] == bytes([i % 251]) * (500 + (i * 997) % 12000)
        restored_at.append(i)
    return restored_at


def test_kill_9_while_checkpointing_restores_a_checkpoint_the_process_completed(tmp_path: Path) -> None:
    path = tmp_path / "victim.img"
    open_block(path, create_size=SIZE).close()
    progress = _kill_loop(path, rounds=4, seed=1)
    assert progress == sorted(progress)


@pytest.mark.stress
def test_kill_9_loop_stress_always_restores_a_completed_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "victim.img"
    open_block(path, create_size=SIZE).close()
    deadline = time.monotonic() + 15.0
    rounds = 0
    while rounds < 40 and time.monotonic() < deadline:
        _kill_loop(path, rounds=5, seed=rounds)
        rounds += 5
    assert rounds >= 5


# -- the benchmark ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dir", pytest.param("loop", marks=pytest.mark.blockdev)])
def test_the_checkpoint_bench_reports_each_case_next_to_the_raw_sync_rate(tmp_path: Path, kind: str) -> None:
    from grafos_fabric.tools.bench_checkpoint import run_checkpoint_bench

    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        if kind == "dir":
            target = str(tmp_path)
        else:
            try:
                from _blockdev import loop_device
            except ImportError:
                from tests._blockdev import loop_device
            target = stack.enter_context(loop_device(tmp_path / "bench.img", 1 << 20))
        rows = run_checkpoint_bench(target, sizes=(4096, 65536), seconds=0.06, progress=lines.append, rounds=3)
    assert [r["case"] for r in rows] == [
        "checkpoint 4 KiB ordered",
        "checkpoint 4 KiB single-sync",
        "checkpoint 4 KiB ordered aligned-buffer",  # the state in with_buffer's array: no copy
        "checkpoint 4 KiB single-sync aligned-buffer",
        "checkpoint 64 KiB ordered",
        "checkpoint 64 KiB single-sync",
        "checkpoint 64 KiB ordered aligned-buffer",
        "checkpoint 64 KiB single-sync aligned-buffer",
    ]
    for r in rows:
        assert set(r) == {
            "case",
            "size",
            "ops_per_s",
            "baseline_ops_per_s",
            "ratio",
            "ratio_min",
            "ratio_max",
            "rounds",
            "target",
            "met",
            "baseline",
            "baselines",
            "ratio_vs_pwrite_fdatasync",
            "ratio_vs_pwrite_fdatasync_min",
            "ratio_vs_pwrite_fdatasync_max",
            "met_vs_pwrite_fdatasync",
            "latency_ratio",
            "cpu_over_us",
            "ratio_same_memory",
        }
        assert r["latency_ratio"] is None and r["cpu_over_us"] is None  # only taken op by op
        assert r["ops_per_s"] > 0 and r["baseline_ops_per_s"] > 0 and r["rounds"] == 3
        # the baseline is the fastest raw write measured, and the plain aligned pwrite + fdatasync is one of them
        assert r["baseline_ops_per_s"] == max(r["baselines"].values()) == r["baselines"][r["baseline"]]
        assert "aligned O_DIRECT pwrite + fdatasync" in r["baselines"] and r["ratio_vs_pwrite_fdatasync"] > 0
        assert 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]  # the median of the rounds
        assert r["target"] == (0.9 if " ordered" in r["case"] else 0.95)
        assert r["met"] == (r["ratio"] >= r["target"])
        # the issue's own baseline (the median of the rounds), with its spread
        lo, mid, hi = (r[f"ratio_vs_pwrite_fdatasync{k}"] for k in ("_min", "", "_max"))
        assert 0 < lo <= mid <= hi
        assert r["met_vs_pwrite_fdatasync"] == (mid >= r["target"])
    assert len(lines) == 8 and all("best raw write" in line and "median of 3 rounds" in line for line in lines)
    assert list(tmp_path.glob(".grafos-ckpt-bench-*")) == []  # the scratch file is gone


def test_the_checkpoint_bench_adds_forced_record_paths_a_control_and_the_record_size(tmp_path: Path) -> None:
    from grafos_fabric.tools.bench_checkpoint import run_checkpoint_bench

    rows = run_checkpoint_bench(
        tmp_path, sizes=(4096,), seconds=0.06, rounds=2, modes=("gather", "direct", "aio"), control=True
    )
    assert [r["case"] for r in rows] == [
        "checkpoint 4 KiB ordered",
        "checkpoint 4 KiB single-sync",
        "checkpoint 4 KiB ordered aligned-buffer",
        "checkpoint 4 KiB single-sync aligned-buffer",
        "checkpoint 4 KiB single-sync [gather]",
        "checkpoint 4 KiB single-sync aligned-buffer [gather]",
        "checkpoint 4 KiB single-sync [direct]",
        "checkpoint 4 KiB single-sync aligned-buffer [direct]",
        "checkpoint 4 KiB single-sync [aio]",
        "checkpoint 4 KiB single-sync aligned-buffer [aio]",
        "control 4 KiB",
        "raw O_DIRECT write of the record's size 4 KiB",
        "raw O_DIRECT write of the record's size, two places 4 KiB",
        "raw O_DIRECT write of the record's size, two places, the state copied in first 4 KiB",
    ]
    for r in rows:
        assert r["ops_per_s"] > 0 and 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert [r["target"] for r in rows] == [0.9, 0.95, 0.9, 0.95, *[0.95] * 6, 1.0, 1.0, 1.0, 1.0]


def test_the_checkpoint_bench_shows_the_fresh_copy_floor_only_where_a_checkpoint_copies(tmp_path: Path) -> None:
    """The control row of a raw write whose buffer just had the state copied in (what a COPY lane
    writes) is there for a state the checkpoint copies, not for one over AIO_CHUNK, which a
    checkpoint writes from its own pages."""
    from grafos_fabric.drivers.block import AIO_CHUNK
    from grafos_fabric.tools.bench_checkpoint import run_checkpoint_bench

    big = 2 * AIO_CHUNK
    rows = run_checkpoint_bench(tmp_path, sizes=(4096, big), seconds=0.04, rounds=1, control=True)
    fresh = [r["size"] for r in rows if "the state copied in first" in r["case"]]
    assert fresh == [4096]
    assert all(r["ops_per_s"] > 0 for r in rows)


def test_the_checkpoint_bench_can_take_turns_op_by_op(tmp_path: Path) -> None:
    from grafos_fabric.tools.bench_checkpoint import main, run_checkpoint_bench

    rows = run_checkpoint_bench(tmp_path, sizes=(4096,), seconds=0.1, rounds=2, op_by_op=True, control=True)
    for r in rows:
        assert r["ops_per_s"] > 0 and 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["latency_ratio"] is not None and r["latency_ratio"] > 0
        assert isinstance(r["cpu_over_us"], float)  # CPU per op over the best raw write's (either sign)
    assert main([str(tmp_path), "--sizes", "4096", "--seconds", "0.05", "--rounds", "1", "--op-by-op"]) == 0


def _cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore over a mapping that faults none in)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("op_by_op", [False, True])
def test_the_checkpoint_bench_starts_every_turn_with_no_page_cache_left_by_the_buffered_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op_by_op: bool
) -> None:
    # the buffered baseline leaves the pages it wrote cached, and while any page of the file is
    # cached every O_DIRECT write to it is slower: the bench drops them after every turn, outside
    # the timing, so no case pays for what another left behind
    import grafos_fabric.tools.bench_checkpoint as bc

    real_run_for, real_fadvise = bc._run_for, os.posix_fadvise
    seen: list[int] = []  # cached pages of the scratch file as each turn (op by op: each op) starts
    after_buffered: list[int] = []  # ... and right after a buffered baseline's own turn

    def scratch() -> Path:
        (path,) = tmp_path.glob(".grafos-ckpt-bench-*")
        return path

    def run_for(fn: Any, seconds: float) -> tuple[int, float]:
        seen.append(_cached_pages(scratch()))
        out = real_run_for(fn, seconds)
        if getattr(fn, "__name__", "") == "bytes_dsync":
            after_buffered.append(_cached_pages(scratch()))
        return out

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        if op_by_op and advice == os.POSIX_FADV_DONTNEED:
            seen.append(_cached_pages(scratch()))  # what the op just run left
        real_fadvise(fd, offset, length, advice)
        if advice == os.POSIX_FADV_DONTNEED:
            seen.append(_cached_pages(scratch()))

    monkeypatch.setattr(bc, "_run_for", run_for)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    rows = bc.run_checkpoint_bench(tmp_path, sizes=(16384,), seconds=0.05, rounds=2, op_by_op=op_by_op)
    assert rows and all(r["ops_per_s"] > 0 for r in rows)
    if not op_by_op:
        assert after_buffered and max(after_buffered) > 0  # the buffered baseline does leave pages
        assert len(seen) > 8 and set(seen) == {0}  # and no turn starts with any
    else:
        # after each op the pages it left (the buffered baseline's: some), then none once dropped
        assert max(seen[0::2]) > 0 and set(seen[1::2]) == {0}


def test_the_checkpoint_bench_can_keep_the_page_cache_to_show_what_it_costs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --keep-page-cache: the bench as it ran before the drop, so the cost can be measured again
    import grafos_fabric.tools.bench_checkpoint as bc

    real_run_for = bc._run_for
    seen: list[int] = []

    def run_for(fn: Any, seconds: float) -> tuple[int, float]:
        (path,) = tmp_path.glob(".grafos-ckpt-bench-*")
        seen.append(_cached_pages(path))
        return real_run_for(fn, seconds)

    monkeypatch.setattr(bc, "_run_for", run_for)
    rows = bc.run_checkpoint_bench(tmp_path, sizes=(16384,), seconds=0.05, rounds=2, keep_page_cache=True)
    assert rows and all(r["ops_per_s"] > 0 for r in rows)
    assert max(seen) > 0  # some turn starts with the buffered baseline's pages still cached
    assert bc.main([str(tmp_path), "--sizes", "4096", "--seconds", "0.05", "--rounds", "1", "--keep-page-cache"]) == 0


def test_the_checkpoint_bench_draws_new_buffers_and_states_for_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # how a large write is split into device requests depends on where its buffer's pages lie in
    # physical memory, for as long as the buffer lives: each round gets new ones, so no run's
    # ratio rests on one draw
    import grafos_fabric.tools.bench_checkpoint as bc

    made: list[int] = []
    states: list[int] = []
    real_mmap, real_state = bc.mmap.mmap, bc.CheckpointedStageState

    class Counting(real_state):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            states.append(1)
            super().__init__(*a, **k)

    def mm(*a: Any, **k: Any) -> Any:
        m = real_mmap(*a, **k)
        if sys._getframe(1).f_code.co_filename == bc.__file__:  # the bench's own, not the region's
            made.append(id(m))
        return m

    monkeypatch.setattr(bc.mmap, "mmap", mm)
    monkeypatch.setattr(bc, "CheckpointedStageState", Counting)
    rows = bc.run_checkpoint_bench(tmp_path, sizes=(4096,), seconds=0.06, rounds=3)
    assert len(rows) == 4 and all(r["rounds"] == 3 and r["ops_per_s"] > 0 for r in rows)
    assert len(made) == 3  # the raw writes' buffer, once a round
    assert len(states) == 3 * 4  # the four candidates' states, once a round (with_buffer ones too)


def test_the_checkpoint_bench_pairs_large_bytes_states_with_a_raw_write_of_their_own_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 1 MiB write's speed depends on its pages' physical pieces: the candidates' bytes state
    # is one object, and a 4th baseline writes O_DIRECT from that object's own pages, so a round's
    # ratio compares the software on the same memory rather than two draws of it
    import grafos_fabric.tools.bench_checkpoint as bc
    from grafos_fabric.drivers.block import AIO_CHUNK

    values: list[Any] = []
    owned: list[tuple[Any, memoryview | None]] = []
    real_state, real_own = bc.CheckpointedStageState, bc._own_pages

    class Recording(real_state):  # type: ignore[misc,valid-type]
        def __init__(self, value: Any, *a: Any, **k: Any) -> None:
            values.append(value)
            super().__init__(value, *a, **k)

    def own(data: bytes, block: int, length: int) -> memoryview | None:
        v = real_own(data, block, length)
        owned.append((data, v))
        return v

    monkeypatch.setattr(bc, "CheckpointedStageState", Recording)
    monkeypatch.setattr(bc, "_own_pages", own)
    size = 2 * AIO_CHUNK
    with open_block(str(tmp_path / "probe.img"), create_size=1 << 16) as probe:
        direct = probe.direct
    rows = bc.run_checkpoint_bench(tmp_path, sizes=(4096, size), seconds=0.06, rounds=2)
    small = [r for r in rows if r["size"] == 4096]
    large = [r for r in rows if r["size"] == size]
    assert small and large
    assert all(bc.OWN_PAGES not in r["baselines"] for r in small)  # a small state is copied, not paired
    if not direct:  # no O_DIRECT here (a filesystem that refuses it): no raw O_DIRECT write to pair
        assert all(bc.OWN_PAGES not in r["baselines"] for r in large)
        return
    assert all(bc.OWN_PAGES in r["baselines"] and r["baselines"][bc.OWN_PAGES] > 0 for r in large)
    # the bytes rows' ratio to the raw write of their own pages; the aligned-buffer rows write other pages
    for r in large:
        paired = r["case"].endswith(("ordered", "single-sync"))
        assert (r["ratio_same_memory"] is not None and r["ratio_same_memory"] > 0) == paired, r["case"]
    assert all(r["ratio_same_memory"] is None for r in small)
    big = [(d, v) for d, v in owned if len(d) == size]
    assert len(big) == 2  # one draw a round
    for data, view in big:
        assert view is not None and view.obj is data  # the bytes object's own memory
        assert len(view) % 4096 == 0 and size - 4096 <= len(view) <= size
        assert int(np.frombuffer(view, dtype=np.uint8).ctypes.data) % 4096 == 0
        # both bytes candidates (ordered, single-sync) checkpoint that very object
        assert sum(1 for v in values if v is data) == 2


def test_own_pages_is_the_block_aligned_inside_of_a_bytes_object() -> None:
    from grafos_fabric.tools.bench_checkpoint import _own_pages

    data = os.urandom(5 * 4096 + 100)
    view = _own_pages(data, 4096, 1 << 20)
    assert view is not None and view.obj is data
    addr = int(np.frombuffer(data, dtype=np.uint8).ctypes.data)
    at = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
    assert at % 4096 == 0 and addr <= at < addr + 4096 and at + len(view) <= addr + len(data)
    assert len(view) in (4 * 4096, 5 * 4096) and bytes(view) == data[at - addr : at - addr + len(view)]
    assert _own_pages(data, 4096, 2 * 4096) is not None and len(_own_pages(data, 4096, 2 * 4096) or b"") == 8192
    assert _own_pages(os.urandom(100), 4096, 1 << 20) is None  # no whole block inside


def test_the_checkpoint_bench_refuses_nonsense_arguments(tmp_path: Path) -> None:
    from grafos_fabric.tools.bench_checkpoint import run_checkpoint_bench

    with pytest.raises(FabricValueError):
        run_checkpoint_bench(tmp_path, sizes=(0,), seconds=0.01)
    with pytest.raises(FabricValueError):
        run_checkpoint_bench(tmp_path, sizes=(4096,), seconds=0)
    with pytest.raises(FabricValueError):
        run_checkpoint_bench(tmp_path, sizes=(4096,), seconds=0.01, rounds=0)
    with pytest.raises(FabricValueError):
        run_checkpoint_bench(tmp_path, sizes=(4096,), seconds=0.01, modes=("fastest",))


def test_a_checkpoint_never_overwrites_a_record_of_an_unknown_version(region: BlockRegion) -> None:
    data = _good_envelope()
    _write_header(region, 0, _valid_header(region, 0, data, version=5), data)
    before = snapshot(region)
    with pytest.raises(VersionMismatch):
        CheckpointedStageState({"new": 1}, region).checkpoint()
    assert snapshot(region) == before


def test_a_checkpoint_never_overwrites_records_written_with_another_geometry(tmp_path: Path) -> None:
    path = tmp_path / "geo2.img"
    with open_block(path, create_size=SIZE) as whole:
        CheckpointedStageState({"v": 1}, whole).checkpoint()
        half = whole.length // 2
    with open_block(path, length=half) as smaller, pytest.raises(Corrupted):
        CheckpointedStageState({"v": 2}, smaller).checkpoint()
    with open_block(path) as whole:
        assert restored(whole)[0] == {"v": 1}
