"""Handoff records: publish/poll, generations, racing writers (threads and processes), torn writes, fuzzing."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from grafos_fabric.checkpoint import CheckpointedStageState
from grafos_fabric.drivers.block import BlockRegion, open_block
from grafos_fabric.errors import (
    CapacityExceeded,
    Corrupted,
    FabricValueError,
    Fenced,
    LeaseExpired,
    NoRecord,
    StaleEpoch,
)
from grafos_fabric.fence import FenceEpoch
from grafos_fabric.handoff import HandoffReader, HandoffRecord, HandoffWriter
from grafos_fabric.lease import ManualClock
from grafos_fabric.slots import GHOF, PCHK, SlotHeader, SlotStore, crc32c, pack_record

try:
    from _blockdev import MemDevice, RecordingDevice, apply_sectors, open_kind, reopen, sectors, snapshot
    from _realtime import SteppedTime
except ImportError:  # tests/ imported as a package
    from tests._blockdev import MemDevice, RecordingDevice, apply_sectors, open_kind, reopen, sectors, snapshot
    from tests._realtime import SteppedTime

SIZE = 32 * 1024
REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(params=["file", pytest.param("loop", marks=pytest.mark.blockdev)])
def region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockRegion]:
    with contextlib.ExitStack() as stack:
        yield open_kind(request.param, tmp_path, SIZE, stack)


# -- publish and poll --------------------------------------------------------------


def test_poll_returns_none_before_anything_is_published(region: BlockRegion) -> None:
    reader = HandoffReader(region)
    assert reader.poll() is None
    assert reader.last_generation is None
    with pytest.raises(NoRecord):
        reader.current()


def test_publish_bumps_the_generation_and_the_reader_sees_each_once(region: BlockRegion) -> None:
    writer = HandoffWriter(region)
    assert writer.generation == FenceEpoch(0)
    with reopen(region) as other:
        reader = HandoffReader(other)
        assert writer.publish(b"loc-1") == FenceEpoch(1)
        rec = reader.poll()
        assert rec is not None and rec.generation == FenceEpoch(1) and rec.payload == b"loc-1"
        assert reader.poll() is None
        writer.publish(b"loc-2")
        writer.publish(b"loc-3")
        rec = reader.poll()
        assert rec is not None and (int(rec.generation), rec.payload) == (3, b"loc-3")
        assert reader.poll() is None


def test_a_reader_given_since_skips_what_it_already_knows(region: BlockRegion) -> None:
    writer = HandoffWriter(region)
    writer.publish(b"a")
    writer.publish(b"b")
    reader = HandoffReader(region, since=2)
    assert reader.poll() is None
    writer.publish(b"c")
    rec = reader.poll()
    assert rec is not None and rec.payload == b"c"


# -- the standby announcement -----------------------------------------------------------


def test_a_record_carries_a_standby_apart_from_its_payload(region: BlockRegion) -> None:
    writer = HandoffWriter(region)
    writer.publish(b"plain")
    rec = HandoffReader(region).current()
    assert (rec.payload, rec.standby) == (b"plain", b"")
    writer.publish(b"cur", standby=b"next")
    rec = HandoffReader(region).current()
    assert (int(rec.generation), rec.payload, rec.standby) == (2, b"cur", b"next")
    writer.publish(b"GHSB looks tagged")  # a payload that starts with the tag is never misread
    rec = HandoffReader(region).current()
    assert (rec.payload, rec.standby) == (b"GHSB looks tagged", b"")


def test_announce_rewrites_the_same_generation_and_readers_see_it_when_asked(region: BlockRegion) -> None:
    writer = HandoffWriter(region)
    with pytest.raises(FabricValueError):
        writer.announce(b"sb")  # nothing published by this writer yet
    writer.publish(b"cur")
    reader = HandoffReader(region)
    first = reader.poll(amendments=True)
    assert first is not None and first.standby == b""
    published = first.published_ns
    assert writer.announce(b"sb-1") == FenceEpoch(1)
    plain = HandoffReader(region, since=1)
    assert plain.poll() is None  # not a new generation
    rec = reader.poll(amendments=True)
    assert rec is not None and (int(rec.generation), rec.payload, rec.standby) == (1, b"cur", b"sb-1")
    assert rec.published_ns == published  # when the generation was published, not amended
    assert reader.poll(amendments=True) is None
    writer.announce(b"sb-2")
    rec = reader.poll(amendments=True)
    assert rec is not None and rec.standby == b"sb-2"
    assert writer.publish(b"cur-2") == FenceEpoch(2)


def test_announce_is_refused_once_another_writer_moved_on(region: BlockRegion) -> None:
    writer = HandoffWriter(region)
    writer.publish(b"mine")
    HandoffWriter.from_disk(region).publish(b"theirs")
    with pytest.raises(StaleEpoch):
        writer.announce(b"sb")
    rec = HandoffReader(region).current()
    assert (int(rec.generation), rec.payload, rec.standby) == (2, b"theirs", b"")


def test_a_tagged_record_whose_length_runs_past_it_is_corrupted(region: BlockRegion) -> None:
    bad = struct.pack("<Q", time.time_ns()) + b"GHSB" + struct.pack("<I", 1000) + b"short"
    SlotStore(region, GHOF).write(bad, tag=1)
    with pytest.raises(Corrupted, match="runs past"):
        HandoffReader(region).current()
    SlotStore(region, GHOF).write(struct.pack("<Q", 1) + b"GHS", tag=2)  # a plain payload, 3 bytes
    assert HandoffReader(region).current().payload == b"GHS"
    SlotStore(region, GHOF).write(struct.pack("<Q", 1) + b"GHSB\x01", tag=3)
    with pytest.raises(Corrupted, match="standby tag"):
        HandoffReader(region).current()


def test_records_carry_the_publish_time(region: BlockRegion) -> None:
    before = time.time_ns()
    HandoffWriter(region).publish(b"t")
    rec = HandoffReader(region).current()
    assert before <= rec.published_ns <= time.time_ns()


def test_an_empty_payload_is_a_valid_record(region: BlockRegion) -> None:
    HandoffWriter(region).publish(b"")
    assert HandoffReader(region).current().payload == b""


def test_a_payload_too_large_for_the_lease_raises_capacity_exceeded(region: BlockRegion) -> None:
    writer = HandoffWriter(region)
    writer.publish(b"small")
    with pytest.raises(CapacityExceeded):
        writer.publish(bytes(writer.capacity + 1))
    assert writer.generation == FenceEpoch(1)
    assert HandoffReader(region).current().payload == b"small"
    writer.publish(bytes(writer.capacity))


def test_a_payload_that_is_not_bytes_is_refused(region: BlockRegion) -> None:
    with pytest.raises(FabricValueError):
        HandoffWriter(region).publish("text")


def test_handoff_on_an_expired_lease_fails_closed(tmp_path: Path) -> None:
    clock = ManualClock()
    with open_block(tmp_path / "h.img", create_size=SIZE, ttl=1.0, clock=clock) as region:
        writer = HandoffWriter(region)
        reader = HandoffReader(region)
        writer.publish(b"x")
        clock.advance(2.0)
        with pytest.raises(LeaseExpired):
            writer.publish(b"y")
        with pytest.raises(LeaseExpired):
            reader.poll()


# -- generations and fencing -----------------------------------------------------------


def test_a_writer_behind_the_disk_is_refused_with_stale_epoch(region: BlockRegion) -> None:
    first = HandoffWriter(region)
    second = HandoffWriter(region)
    first.publish(b"first")
    with pytest.raises(StaleEpoch) as info:
        second.publish(b"second")
    assert isinstance(info.value, Fenced)
    assert (info.value.epoch, info.value.current) == (0, 1)
    assert HandoffReader(region).current().payload == b"first"


def test_a_writer_claiming_an_old_generation_is_refused(region: BlockRegion) -> None:
    w = HandoffWriter(region)
    for i in range(3):
        w.publish(b"%d" % i)
    with pytest.raises(StaleEpoch):
        HandoffWriter(region, generation=2).publish(b"zombie")
    assert HandoffWriter(region, generation=3).publish(b"ok") == FenceEpoch(4)


def test_a_restarted_writer_resumes_from_the_generation_on_disk(region: BlockRegion) -> None:
    w = HandoffWriter(region)
    w.publish(b"1")
    w.publish(b"2")
    region.close()
    with open_block(region.path, region.offset, region.length) as again:
        resumed = HandoffWriter.from_disk(again)
        assert resumed.generation == FenceEpoch(2)
        assert resumed.next_generation == FenceEpoch(3)
        assert resumed.publish(b"3") == FenceEpoch(3)
        with pytest.raises(StaleEpoch):
            w_old = HandoffWriter(again, generation=2)
            w_old.publish(b"late")


def test_a_reader_survives_a_writer_restart(region: BlockRegion) -> None:
    reader = HandoffReader(region)
    HandoffWriter(region).publish(b"a")
    assert reader.poll() is not None
    HandoffWriter.from_disk(region).publish(b"b")
    rec = reader.poll()
    assert rec is not None and (int(rec.generation), rec.payload) == (2, b"b")


def test_threads_racing_on_separate_handles_win_each_generation_once(region: BlockRegion) -> None:
    wins: dict[int, list[int]] = {0: [], 1: []}
    handles = [reopen(region), reopen(region)]

    def producer(me: int) -> None:
        w = HandoffWriter.from_disk(handles[me])
        for _ in range(40):
            try:
                wins[me].append(int(w.publish(b"%d" % me)))
            except StaleEpoch:
                w = HandoffWriter.from_disk(handles[me])

    threads = [threading.Thread(target=producer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.close()
    everything = wins[0] + wins[1]
    assert sorted(everything) == list(range(1, len(everything) + 1))
    assert int(HandoffReader(region).current().generation) == len(everything)


RACER = r"""
import sys
from grafos_fabric.drivers.block import open_block
from grafos_fabric.errors import StaleEpoch
from grafos_fabric.handoff import HandoffWriter


def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")  # one write per line
    sys.stdout.flush()


region = open_block(sys.argv[1])
name = sys.argv[2]
writer = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "adopt":
        writer = HandoffWriter.from_disk(region)
        say("ready", int(writer.generation))
    elif cmd[0] == "go":
        try:
            say("won", int(writer.publish(name.encode())))
        except StaleEpoch as exc:
            say("lost", exc.current)
    elif cmd[0] == "spin":
        won = []
        writer = HandoffWriter.from_disk(region)
        for _ in range(int(cmd[1])):
            try:
                won.append(int(writer.publish(name.encode())))
            except StaleEpoch:
                writer = HandoffWriter.from_disk(region)
        say("spun", *won)
    else:
        break
"""


def _racers(path: str) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", RACER, path, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for name in ("A", "B")
    ]


def _ask(procs: list[subprocess.Popen[str]], line: str) -> list[list[str]]:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(line + "\n")
        p.stdin.flush()
    out = []
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        words = p.stdout.readline().split()
        if not words:  # the child died: show why
            p.kill()
            raise AssertionError(f"racer exited: {p.stderr.read()[-2000:]}")
        out.append(words)
    return out


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert p.stdin is not None
            p.stdin.write("quit\n")
            p.stdin.close()
    for p in procs:
        p.wait(timeout=10)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def test_two_processes_racing_from_one_generation_exactly_one_wins(region: BlockRegion) -> None:
    procs = _racers(region.path)
    try:
        for round_ in range(6):
            ready = _ask(procs, "adopt")
            assert ready == [["ready", str(round_)], ["ready", str(round_)]]
            results = _ask(procs, "go")
            kinds = sorted(r[0] for r in results)
            assert kinds == ["lost", "won"], results
            assert all(r[1] == str(round_ + 1) for r in results)
            winner = "A" if results[0][0] == "won" else "B"
            assert HandoffReader(region).current().payload == winner.encode()
    finally:
        _stop(procs)


@pytest.mark.stress
def test_two_processes_publishing_flat_out_never_share_a_generation(region: BlockRegion) -> None:
    procs = _racers(region.path)
    try:
        results = _ask(procs, "spin 150")
    finally:
        _stop(procs)
    won = [int(g) for r in results for g in r[1:]]
    assert all(r[0] == "spun" for r in results)
    assert sorted(won) == list(range(1, len(won) + 1))
    assert len(won) >= 150


def test_wait_returns_a_record_published_by_another_thread(region: BlockRegion) -> None:
    reader = HandoffReader(reopen(region), since=0)
    timer = threading.Timer(0.05, lambda: HandoffWriter(region).publish(b"late"))
    timer.start()
    try:
        rec = reader.wait(timeout=5.0)
    finally:
        timer.join()
        reader.block_lease.close()  # type: ignore[attr-defined]
    assert rec.payload == b"late"


def test_wait_raises_timeout_error_when_nothing_new_arrives(region: BlockRegion) -> None:
    HandoffWriter(region).publish(b"old")
    reader = HandoffReader(region, since=1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.wait(timeout=0.1)
    assert time.monotonic() - t0 >= 0.09  # it waited (a stalled machine only makes this longer)


def test_wait_gives_up_at_its_deadline_and_not_before(region: BlockRegion, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock that moves only while the reader sleeps: the wait ends at its deadline, to the
    microsecond, whatever the real machine does meanwhile (a real-time upper bound could fail on a stall)."""
    import grafos_fabric.backoff
    import grafos_fabric.handoff

    HandoffWriter(region).publish(b"old")
    reader = HandoffReader(region, since=1)
    clock = SteppedTime(limit=60.0)
    monkeypatch.setattr(grafos_fabric.handoff, "time", clock)
    monkeypatch.setattr(grafos_fabric.backoff, "time", clock)
    t0 = clock.now
    with pytest.raises(TimeoutError, match=r"within 2\.5s"):
        reader.wait(timeout=2.5, initial_backoff=0.001, max_backoff=0.2)
    assert clock.now - t0 == pytest.approx(2.5, abs=1e-6)
    assert clock.sleeps >= 2.5 / 0.2  # it polled all along, backing off to max_backoff at most


@pytest.mark.parametrize("kw", [{"timeout": -1}, {"initial_backoff": 0}, {"initial_backoff": 1, "max_backoff": 0.5}])
def test_wait_refuses_bad_arguments(region: BlockRegion, kw: dict[str, float]) -> None:
    with pytest.raises(FabricValueError):
        HandoffReader(region).wait(**kw)


# -- torn writes and corruption -----------------------------------------------------


@pytest.mark.parametrize("durability", ["ordered", "single-sync"])
def test_a_torn_publish_shows_the_previous_or_the_new_generation_never_garbage(
    region: BlockRegion, durability: str
) -> None:
    writer = HandoffWriter(region, durability=durability)  # type: ignore[arg-type]
    writer.publish(b"previous" * 50)
    image = snapshot(region)
    rec = RecordingDevice(region)
    HandoffWriter(rec, durability=durability).publish(os.urandom(3000))  # type: ignore[arg-type]
    secs = sectors(rec.ops, region.block_size)
    seen = set()
    for cut in range(len(secs) + 1):
        apply_sectors(region, image, secs[:cut])
        got = HandoffReader(region).current()
        seen.add(int(got.generation))
        if int(got.generation) == 1:
            assert got.payload == b"previous" * 50
        else:
            assert int(got.generation) == 2 and len(got.payload) == 3000
    assert seen == {1, 2}
    assert int(HandoffReader(region).current().generation) == 2


def test_a_reader_raises_when_every_record_is_corrupt(region: BlockRegion) -> None:
    w = HandoffWriter(region)
    w.publish(b"a")
    w.publish(b"b")
    reader = HandoffReader(region)
    assert reader.poll() is not None
    slot_blocks = SlotStore(region, GHOF).slot_blocks
    for slot in (0, 1):
        block = bytearray(region.read_blocks(slot * slot_blocks))
        block[17] ^= 0x40
        region.write_blocks(slot * slot_blocks, block)
    with pytest.raises(Corrupted):
        reader.poll()
    with pytest.raises(Corrupted):
        HandoffReader(region).poll()
    with pytest.raises(Corrupted):
        w.publish(b"c")  # the writer will not guess a generation over damage


def test_a_reader_raises_when_the_generation_goes_backwards(region: BlockRegion) -> None:
    w = HandoffWriter(region)
    w.publish(b"a")
    w.publish(b"b")
    reader = HandoffReader(region)
    assert reader.poll() is not None
    newest = SlotStore(region, GHOF).read()
    lba = newest.slot * SlotStore(region, GHOF).slot_blocks
    block = bytearray(region.read_blocks(lba))
    block[9] ^= 1
    region.write_blocks(lba, block)
    with pytest.raises(Corrupted, match="backwards"):
        reader.poll()


def test_a_handoff_area_is_not_read_as_a_checkpoint_nor_the_reverse(region: BlockRegion) -> None:
    HandoffWriter(region).publish(b"x")
    with pytest.raises(Corrupted, match="magic"):
        CheckpointedStageState.restore(region)
    region.write_blocks(0, bytes(region.nbytes))
    CheckpointedStageState({}, region).checkpoint()
    with pytest.raises(Corrupted, match="magic"):
        HandoffReader(region).poll()


# -- fuzzing the decoders ------------------------------------------------------------

TYPED = (Corrupted, FabricValueError)  # Corrupted, NoRecord and VersionMismatch are FabricValueErrors
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mem_with_records() -> tuple[MemDevice, list[HandoffRecord]]:
    dev = MemDevice(block_size=512, nblocks=8)
    w = HandoffWriter(dev)
    w.publish(b"first locator")
    w.publish(b"second locator, longer " * 10)
    r0, r1 = (HandoffRecord._from_slot(st.record) for st in SlotStore(dev, GHOF).scan() if st.record is not None)
    return dev, [r0, r1]


MAGIC = hst.sampled_from([b"", b"GHOF", b"PCHK", b"GHOF\x01\x00\x00\x00", b"PCHK\x02\x00\x00\x00"])


@FUZZ
@given(MAGIC, hst.binary(max_size=2040), MAGIC, hst.binary(max_size=2040))
def test_random_bytes_give_a_record_none_or_a_typed_error(m0: bytes, b0: bytes, m1: bytes, b1: bytes) -> None:
    dev = MemDevice(block_size=512, nblocks=8)
    dev.data[: len(m0 + b0)] = m0 + b0
    dev.data[2048 : 2048 + len(m1 + b1)] = m1 + b1
    for action in (lambda: HandoffReader(dev).poll(), lambda: CheckpointedStageState.restore(dev)):
        try:
            action()
        except TYPED:
            pass


@FUZZ
@given(hst.lists(hst.tuples(hst.integers(0, 512 * 8 - 1), hst.integers(0, 255)), min_size=1, max_size=12))
def test_mutated_handoff_records_give_a_known_record_or_a_typed_error(mutations: list[tuple[int, int]]) -> None:
    dev, known = _mem_with_records()
    for off, value in mutations:
        dev.data[off] = value
    try:
        got = HandoffReader(dev).current()
    except TYPED:
        return
    assert got in known


@FUZZ
@given(hst.binary(max_size=1500), hst.integers(0, (1 << 64) - 1), hst.sampled_from([GHOF, PCHK]))
def test_random_data_under_valid_checksums_gives_a_value_or_a_typed_error(data: bytes, tag: int, fmt: Any) -> None:
    dev = MemDevice(block_size=512, nblocks=8)
    store = SlotStore(dev, fmt)
    record = pack_record(fmt, data, seq=1, tag=tag, slot=0, block_size=512, slot_blocks=4)
    dev.data[: len(record)] = record
    assert store.read().data == data
    try:
        if fmt is GHOF:
            rec = HandoffReader(dev).current()
            assert rec.payload == data[8:] and int(rec.generation) == tag
        else:
            CheckpointedStageState.restore(dev)
    except TYPED:
        pass


@FUZZ
@given(hst.binary(min_size=0, max_size=600))
def test_slot_header_parse_takes_any_bytes(raw: bytes) -> None:
    try:
        hdr = SlotHeader.parse(raw)
    except Corrupted:
        assert len(raw) < 56
        return
    assert hdr.crc_ok == (crc32c(raw[:48]) == int.from_bytes(raw[48:52], "little"))


def test_fuzz_corpus_is_not_trivially_all_errors() -> None:
    rng = random.Random(3)
    dev, known = _mem_with_records()
    results = []
    for _ in range(200):
        d2 = MemDevice(block_size=512, nblocks=8)
        d2.data[:] = dev.data
        d2.data[rng.randrange(len(d2.data))] ^= 1 << rng.randrange(8)
        try:
            results.append(HandoffReader(d2).current() in known)
        except TYPED:
            results.append(False)
    assert any(results) and all(r in (True, False) for r in results)


def test_a_writer_ahead_of_the_disk_publishes_the_generation_after_its_own(region: BlockRegion) -> None:
    HandoffWriter(region).publish(b"one")
    assert HandoffWriter(region, generation=5).publish(b"jump") == FenceEpoch(6)
    reader = HandoffReader(region, since=1)
    rec = reader.poll()
    assert rec is not None and int(rec.generation) == 6
    with pytest.raises(StaleEpoch):
        HandoffWriter(region, generation=1).publish(b"behind")
