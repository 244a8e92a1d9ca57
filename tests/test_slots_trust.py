"""Hostile slot files (issue 9): forged sequences, deep states, truncated files, fuzzing.

Every bad checkpoint or handoff area gives the newest whole record or an error
from grafos_fabric.errors: never garbage, never a default, never struct.error,
RecursionError or OSError.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from grafos_fabric._native import lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from grafos_fabric.checkpoint import MAX_STATE_DEPTH, CheckpointedStageState, EdgeCheckpoint
from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import Corrupted, FabricValueError, NoRecord
from grafos_fabric.handoff import HandoffReader, HandoffWriter
from grafos_fabric.slots import DATA_OFFSET, GHOF, MAX_SEQ, PCHK, SlotFormat, SlotStore, pack_record

try:
    from _blockdev import MemDevice
except ImportError:  # tests/ imported as a package
    from tests._blockdev import MemDevice

TYPED = (Corrupted, FabricValueError)  # NoRecord and VersionMismatch are Corrupted / FabricValueError
SIZE = 32 * 1024


@pytest.fixture
def region(tmp_path: Path) -> Iterator[BlockRegion]:
    with open_block(tmp_path / "region.img", create_size=SIZE) as r:
        yield r


def _forge(dev: Any, fmt: SlotFormat, slot: int, data: bytes, *, seq: int, tag: int = 0) -> None:
    """A record with valid checksums and any sequence/tag, put straight into ``slot``."""
    store = SlotStore(dev, fmt)
    rec = pack_record(fmt, data, seq=seq, tag=tag, slot=slot, block_size=dev.block_size, slot_blocks=store.slot_blocks)
    dev.write_blocks(slot * store.slot_blocks, rec)
    dev.sync()


def _envelope(state: Any) -> bytes:
    mem = MemDevice(block_size=512, nblocks=64)
    CheckpointedStageState(state, mem, stage="s").checkpoint(EdgeCheckpoint(5, 6))
    return SlotStore(mem, PCHK).read().data


# -- forged sequence numbers (struct.error before) -------------------------------------


def test_a_forged_checkpoint_sequence_of_2_64_minus_1_is_refused_and_the_other_slot_restores(
    region: BlockRegion,
) -> None:
    st = CheckpointedStageState({"real": 1}, region, stage="s")
    st.checkpoint(EdgeCheckpoint(1, 1))  # slot 0, seq 1
    _forge(region, PCHK, 1, _envelope({"forged": 1}), seq=(1 << 64) - 1)
    back = CheckpointedStageState.restore(region)
    assert back.state == {"real": 1} and back.last_seq == 1
    assert back.checkpoint() == 2  # and checkpointing goes on (over the forged slot)
    assert CheckpointedStageState.restore(region).last_seq == 2


def test_a_forged_checkpoint_sequence_alone_raises_corrupted_and_the_next_checkpoint_works(
    region: BlockRegion,
) -> None:
    _forge(region, PCHK, 0, _envelope({"forged": 1}), seq=(1 << 64) - 1)
    with pytest.raises(Corrupted) as info:
        CheckpointedStageState.restore(region)
    assert "seq 18446744073709551615" in str(info.value) and "new lease" in str(info.value)
    st = CheckpointedStageState({"fresh": 1}, region)
    assert st.checkpoint() >= 1  # the writer does not trip over the forged sequence (struct.error before)
    assert CheckpointedStageState.restore(region).state == {"fresh": 1}


def test_a_record_at_the_last_sequence_refuses_the_next_write_with_corrupted(region: BlockRegion) -> None:
    _forge(region, PCHK, 0, _envelope({"edge": 1}), seq=MAX_SEQ)
    st = CheckpointedStageState.restore(region)
    assert st.last_seq == MAX_SEQ
    with pytest.raises(Corrupted, match="new lease"):
        st.checkpoint()
    assert CheckpointedStageState.restore(region).last_seq == MAX_SEQ


def test_a_forged_handoff_sequence_of_2_64_minus_1_is_refused_and_publishing_goes_on(region: BlockRegion) -> None:
    HandoffWriter(region).publish(b"real")  # slot 0, seq 1, generation 1
    _forge(region, GHOF, 1, struct.pack("<Q", 0) + b"forged", seq=(1 << 64) - 1, tag=7)
    rec = HandoffReader(region).current()
    assert rec.payload == b"real" and int(rec.generation) == 1
    assert int(HandoffWriter(region).publish(b"next")) == 2
    assert HandoffReader(region).current().payload == b"next"


def test_a_forged_handoff_generation_past_2_63_raises_corrupted_for_reader_and_writer(region: BlockRegion) -> None:
    _forge(region, GHOF, 0, struct.pack("<Q", 0) + b"forged", seq=1, tag=(1 << 64) - 1)
    with pytest.raises(Corrupted, match="forged"):
        HandoffReader(region).poll()
    with pytest.raises(Corrupted, match="forged"):
        HandoffWriter(region)
    with pytest.raises(Corrupted, match="forged"):
        HandoffWriter(region, generation=3).publish(b"x")


def test_a_writer_claiming_a_generation_past_2_63_is_refused_before_writing(region: BlockRegion) -> None:
    with pytest.raises(FabricValueError, match="2\\*\\*63"):
        HandoffWriter(region, generation=MAX_SEQ).publish(b"x")
    with pytest.raises(NoRecord):
        HandoffReader(region).current()


# -- deeply nested states (RecursionError before) ---------------------------------------


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_a_state_nested_deeper_than_the_bound_is_refused_before_writing(region: BlockRegion) -> None:
    st = CheckpointedStageState({"ok": 1}, region)
    st.checkpoint(EdgeCheckpoint(1, 1))
    for depth in (MAX_STATE_DEPTH + 1, 5000, 100_000):
        st.state = _nested(depth)
        with pytest.raises(FabricValueError, match="nests deeper") as info:
            st.checkpoint(EdgeCheckpoint(2, 2))
        assert not isinstance(info.value, Corrupted)
    back = CheckpointedStageState.restore(region)
    assert (back.state, back.edge) == ({"ok": 1}, EdgeCheckpoint(1, 1))


def test_a_state_exactly_at_the_depth_bound_round_trips(region: BlockRegion) -> None:
    CheckpointedStageState(_nested(MAX_STATE_DEPTH), region).checkpoint()
    assert CheckpointedStageState.restore(region).state == _nested(MAX_STATE_DEPTH)


@pytest.mark.parametrize("depth", [MAX_STATE_DEPTH + 1, 12_000])
def test_a_forged_deeply_nested_state_raises_corrupted_not_recursion_error(region: BlockRegion, depth: int) -> None:
    env = bytearray(_envelope(None))
    body = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]], valid msgpack
    _forge(region, PCHK, 0, bytes(env[:-1]) + body, seq=1)  # the envelope's own body was nil (one byte)
    with pytest.raises(Corrupted, match="nests deeper"):
        CheckpointedStageState.restore(region)


def test_malformed_msgpack_under_valid_checksums_raises_corrupted(region: BlockRegion) -> None:
    env = _envelope(None)
    for body in (b"", b"\xc1", b"\x92\x01", b"\xc0\xc0", b"\xdd\xff\xff\xff\xff", b"\xc6\x00\x00\x00\x09ab"):
        _forge(region, PCHK, 0, env[:-1] + body, seq=1)
        with pytest.raises(Corrupted):
            CheckpointedStageState.restore(region)


def _depth(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for kv in value.items() for v in kv), default=0)
    return 0


MSGPACK_VALUES = hst.recursive(
    hst.none()
    | hst.booleans()
    | hst.integers(-(1 << 63), (1 << 64) - 1)
    | hst.floats(allow_nan=False)
    | hst.text(max_size=40)
    | hst.binary(max_size=300),
    lambda inner: hst.lists(inner, max_size=6) | hst.dictionaries(hst.text(max_size=5), inner, max_size=6),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(MSGPACK_VALUES)
def test_the_native_depth_scan_measures_what_msgspec_encodes(value: Any) -> None:
    buf = msgspec.msgpack.encode(value)
    assert lib.gf_msgpack_depth(buf, len(buf), 1024) == _depth(value)
    for cut in (len(buf) - 1, len(buf) // 2):
        if cut >= 0 and cut < len(buf):
            assert lib.gf_msgpack_depth(buf[:cut], cut, 1024) == lib.GF_MSGPACK_MALFORMED
    extra = buf + b"\x00"
    assert lib.gf_msgpack_depth(extra, len(extra), 1024) == lib.GF_MSGPACK_MALFORMED


@settings(max_examples=500, deadline=None)
@given(hst.binary(max_size=200))
def test_the_native_depth_scan_takes_any_bytes_and_agrees_with_the_decoder(raw: bytes) -> None:
    depth = lib.gf_msgpack_depth(raw, len(raw), 1024)
    try:
        msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return  # the scan may accept bytes the decoder refuses (invalid UTF-8, ext payloads): never the reverse
    assert depth >= 0


# -- truncated files (OSError EIO before) --------------------------------------------------


def test_a_file_truncated_under_the_newest_slot_restores_the_older_slot(region: BlockRegion) -> None:
    st = CheckpointedStageState({"v": 1}, region, stage="s")
    st.checkpoint(EdgeCheckpoint(1, 1))  # slot 0
    st.state = {"v": 2}
    st.checkpoint(EdgeCheckpoint(2, 2))  # slot 1
    os.truncate(region.path, SIZE // 2)  # slot 1 is gone: another process shrank the file
    back = CheckpointedStageState.restore(region)
    assert (back.state, back.edge, back.last_seq) == ({"v": 1}, EdgeCheckpoint(1, 1), 1)


def test_a_file_truncated_under_both_slots_raises_corrupted(region: BlockRegion) -> None:
    CheckpointedStageState({"v": 1}, region).checkpoint()
    os.truncate(region.path, 0)
    with pytest.raises(Corrupted) as info:
        CheckpointedStageState.restore(region)
    assert not isinstance(info.value, NoRecord) and "truncated" in str(info.value)
    with pytest.raises(Corrupted, match="truncated"):
        HandoffReader(region).poll()


def test_reading_blocks_past_the_end_of_a_truncated_file_raises_corrupted(region: BlockRegion) -> None:
    os.truncate(region.path, 4096)
    with pytest.raises(Corrupted, match="truncated"):
        region.read_blocks(region.nblocks - 1)


def test_a_handoff_file_truncated_under_the_newest_slot_reads_the_older_generation(region: BlockRegion) -> None:
    w = HandoffWriter(region)
    w.publish(b"one")  # slot 0
    w.publish(b"two")  # slot 1
    os.truncate(region.path, SIZE // 2)
    rec = HandoffReader(region).current()
    assert (rec.payload, int(rec.generation)) == (b"one", 1)


# -- fuzzing slot files --------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BS, NBLOCKS = 512, 8  # slots of 4 blocks: records of up to 1984 bytes, one block or several


def _known_records(seed: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """An image after 1 to 3 real checkpoints; returns it and [(seq, data)] of the records on disk."""
    rng = random.Random(seed)
    dev = MemDevice(block_size=BS, nblocks=NBLOCKS)
    written = []
    for _ in range(rng.randrange(1, 4)):
        st = CheckpointedStageState(rng.randbytes(rng.randrange(0, 1500)), dev, codec="raw", stage="f")
        seq = st.checkpoint()  # a fresh state scans the disk and writes the other slot
        written.append((seq, SlotStore(dev, PCHK).read().data))
    return bytes(dev.data), written[-2:]  # two slots: older records were overwritten


def _record_intact(image: bytes, buf: bytearray, truncate_at: int | None, seq: int, data: bytes) -> bool:
    """Whether every byte of the record (header, padding to byte 64, data) is as written and readable."""
    start = ((seq - 1) % 2) * (NBLOCKS // 2) * BS
    end = start + DATA_OFFSET + len(data)
    if truncate_at is not None and truncate_at < -(-end // BS) * BS:
        return False
    return image[start:end] == bytes(buf[start:end])


@FUZZ
@given(
    hst.integers(0, 7),
    hst.lists(hst.tuples(hst.integers(0, BS * NBLOCKS - 1), hst.integers(0, 255)), max_size=10),
    hst.one_of(hst.none(), hst.integers(0, BS * NBLOCKS)),
)
def test_mutated_or_truncated_slot_files_give_the_newest_whole_record_or_a_typed_error(
    tmp_path_factory: pytest.TempPathFactory, seed: int, mutations: list[tuple[int, int]], truncate_at: int | None
) -> None:
    image, on_disk = _known_records(seed)
    buf = bytearray(image)
    for off, value in mutations:
        buf[off] = value
    path = tmp_path_factory.mktemp("fuzz") / "slots.img"
    path.write_bytes(bytes(buf))
    with open_block(path, block_size=BS) as region:
        if truncate_at is not None:
            os.truncate(path, truncate_at)
        try:
            got = SlotStore(region, PCHK).read()
        except TYPED:
            got = None
    intact = [rec for rec in on_disk if _record_intact(image, buf, truncate_at, *rec)]
    if got is None:
        assert not intact, "a whole record was on disk and the reader raised"
        return
    assert (got.seq, bytes(got.data)) in on_disk, "a record that was never written (garbage)"
    assert not intact or got.seq >= max(intact)[0], "an older record while a newer whole one was there"


@FUZZ
@given(
    hst.binary(max_size=1900),
    hst.integers(0, (1 << 64) - 1),
    hst.integers(0, (1 << 64) - 1),
    hst.integers(0, (1 << 64) - 1),
    hst.integers(0, 1),
)
def test_forged_sequences_and_lengths_under_valid_checksums_give_a_record_or_a_typed_error(
    data: bytes, seq: int, data_len: int, tag: int, slot: int
) -> None:
    dev = MemDevice(block_size=BS, nblocks=NBLOCKS)
    store = SlotStore(dev, GHOF)
    rec = pack_record(
        GHOF, data, seq=seq, tag=tag, slot=slot, block_size=BS, slot_blocks=NBLOCKS // 2, data_len=data_len
    )[: (NBLOCKS // 2) * BS]
    dev.data[slot * (NBLOCKS // 2) * BS : slot * (NBLOCKS // 2) * BS + len(rec)] = rec
    try:
        got = store.read()
    except TYPED:
        assert not (0 < seq <= MAX_SEQ and data_len == len(data) and DATA_OFFSET + len(data) <= 4 * BS)
        return
    assert (got.seq, got.tag, got.data, got.slot) == (seq, tag, data, slot)
    assert 0 < seq <= MAX_SEQ
    for action in (lambda: HandoffReader(dev).poll(), lambda: HandoffWriter(dev).publish(b"next")):
        with contextlib.suppress(*TYPED):
            action()
