"""The one-sided ring protocol (grafos_fabric.queue's one-sided modules) on the shm driver's one-sided ops, white-box.

Header pokes and operation counts (a recording region logs every one-sided op);
construction and attach; fencing at the target (the tail CAS); leases failing
closed; corrupt remote bytes; processes across paths; threads. The same
behaviour seen only through the queue API, on every access pair, is
tests/conformance/ (test_queue_paths.py here; test_queue.py and
test_queue_model.py with one-sided producers through the matrix).
"""

from __future__ import annotations

import collections
import gc
import multiprocessing as mp
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.queue import OneSidedItem, OneSidedQueue

CTX = mp.get_context("spawn")
RING = int(lib.GF_RING_HEADER_SIZE)
REC = int(lib.GF_RECORD_HEADER_SIZE)
TAIL = int(ffi.offsetof("gf_ring_header", "tail"))
HEAD = int(ffi.offsetof("gf_ring_header", "head"))
NEXT_SEQ = int(ffi.offsetof("gf_ring_header", "next_seq"))
VERSION = int(ffi.offsetof("gf_ring_header", "version"))
CAPACITY = int(ffi.offsetof("gf_ring_header", "capacity"))
MAGIC = int(ffi.offsetof("gf_ring_header", "magic"))
R_LEN = int(ffi.offsetof("gf_record_header", "length"))
R_TYPE = int(ffi.offsetof("gf_record_header", "type"))
R_SEQ = int(ffi.offsetof("gf_record_header", "seq"))
POS = int(lib.GF_TAIL_POS_MASK)
SEALED = int(lib.GF_TAIL_SEALED)


def rec_size(n: int) -> int:
    return int(lib.gf_record_size(n))


# -- helpers ----------------------------------------------------------------------------


class RecordingRegion:
    """A region that forwards every one-sided op to a real one and logs it;
    ``before[(op, offset)]`` runs once just before that op reaches the target."""

    mapped = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lease = inner.lease
        self.nbytes = inner.nbytes
        self.log: list[tuple[str, int]] = []
        self.before: dict[tuple[str, int], Callable[[], None]] = {}

    def _op(self, name: str, offset: int) -> None:
        self.log.append((name, offset))
        hook = self.before.pop((name, offset), None)
        if hook is not None:
            hook()

    def count(self, name: str, offset: int | None = None) -> int:
        return sum(1 for n, o in self.log if n == name and (offset is None or o == offset))

    def ref(self) -> Any:
        return self.inner.ref()

    def address(self) -> int:
        raise E.Unsupported("not mapped")

    def view(self) -> memoryview:
        raise E.Unsupported("not mapped")

    def read_into(self, offset: int, buf: Any) -> None:
        self._op("read_into", offset)
        self.inner.read_into(offset, buf)

    def write(self, offset: int, buf: Any) -> None:
        self._op("write", offset)
        self.inner.write(offset, buf)

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        self._op("cas64", offset)
        return int(self.inner.cas64(offset, expected, desired))

    def faa64(self, offset: int, add: int) -> int:
        self._op("faa64", offset)
        return int(self.inner.faa64(offset, add))

    def load64(self, offset: int) -> int:
        self._op("load64", offset)
        return int(self.inner.load64(offset))

    def store64(self, offset: int, value: int) -> None:
        self._op("store64", offset)
        self.inner.store64(offset, value)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


class RecordingFabric:
    """A fabric whose ``alloc`` hands out RecordingRegions (to watch ``create``):
    like verbs, its regions are reached one-sided only."""

    mapped_regions = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url
        self.driver = inner.driver
        self.clock = inner.clock
        self.regions: list[RecordingRegion] = []

    def alloc(self, nbytes: int, ttl: float) -> RecordingRegion:
        r = RecordingRegion(self.inner.alloc(nbytes, ttl))
        self.regions.append(r)
        return r

    def attach(self, ref: Any, *, mapped: bool = True) -> Any:
        return self.inner.attach(ref, mapped=mapped)

    def free(self, lease: Any) -> None:
        lease.free()

    def reap(self) -> int:
        return int(self.inner.reap())

    def close(self) -> None:
        self.inner.close()


def one_sided(fabric: Any, q: Any, *, epoch: int | None = None) -> tuple[OneSidedQueue, RecordingRegion]:
    """A one-sided handle on ``q``'s ring whose region ops are recorded."""
    region = RecordingRegion(fabric.attach(q.region.ref(), mapped=False))
    return OneSidedQueue(fabric, region, q.locator(), epoch=epoch), region


def ring_bytes(mapped_q: Any) -> np.ndarray:
    """The mapped handle's ring (header + data) as a writable byte array."""
    return np.frombuffer(mapped_q.region.view(), dtype=np.uint8)


def make(fabric: Any, pair: str, **kwargs: Any) -> tuple[Any, Any]:
    """(producer, consumer) on one queue, for a pairing of paths."""
    kwargs.setdefault("capacity", 4096)
    kwargs.setdefault("ttl", 60.0)
    if pair == "mapped->onesided":
        tx = gf.FabricQueue.create(fabric, **kwargs)
        rx = gf.FabricQueue.attach(fabric, bytes(tx.locator()), mapped=False)
    elif pair == "onesided->mapped":
        tx = OneSidedQueue.create(fabric, **kwargs)
        rx = gf.FabricQueue.attach(fabric, bytes(tx.locator()))
    else:
        tx = OneSidedQueue.create(fabric, **kwargs)
        rx = OneSidedQueue.attach(fabric, bytes(tx.locator()))
    return tx, rx


# -- construction and attach --------------------------------------------------------------


def test_record_sizes_and_the_space_waiter_word_agree_with_the_native_layout():
    from grafos_fabric.queue import _onesided_handle as onesided

    assert all(onesided._rec_size(n) == rec_size(n) for n in range(1, 600))
    assert onesided._SPACE_WAITERS % 8 == 0  # a u64 of its own: faa64 needs 8-byte alignment
    hdr = ffi.new("gf_ring_header *")
    hdr.space_waiters = 1
    hdr.space_futex = 0xFFFFFFFF  # the futex word is apart from the waiter count
    word = np.frombuffer(ffi.buffer(hdr), dtype=np.uint64)[onesided._SPACE_WAITERS // 8]
    assert int(word) == 1


def test_attach_with_mapped_false_returns_a_one_sided_queue_with_the_same_api(fabric):
    tx = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    rx = gf.FabricQueue.attach(fabric, tx.locator(), mapped=False)
    assert isinstance(rx, OneSidedQueue) and isinstance(rx, gf.FabricQueue)
    assert not rx.region.mapped
    assert (rx.capacity, rx.max_item, rx.first_seq, rx.dtype) == (tx.capacity, tx.max_item, tx.first_seq, tx.dtype)
    assert rx.locator() == tx.locator()


# FabricQueue members that never touch the ring (or only through members that are overridden)
PROTOCOL_FREE = {"locator", "commit_len", "commit_rows", "free", "__exit__", "__init_subclass__"}


def test_every_public_fabric_queue_member_has_a_one_sided_version():
    """A member added to FabricQueue that talks to the native ring must get a
    one-sided version too: inherited as is, it would reach for a mapping that
    a one-sided handle doesn't have."""
    missing = [
        name
        for name, member in vars(gf.FabricQueue).items()
        if (not name.startswith("_") or name in ("__enter__", "__exit__", "__repr__"))
        and (callable(member) or isinstance(member, (property, classmethod)))
        and name not in PROTOCOL_FREE
        and name not in vars(OneSidedQueue)
    ]
    assert missing == []


def test_create_builds_the_header_with_one_sided_writes_version_word_last(fabric):
    rec = RecordingFabric(fabric)
    q = OneSidedQueue.create(rec, capacity=5000, ttl=30, dtype=np.int16, epoch=3, first_seq=40)
    ops = rec.regions[0].log
    word = VERSION & ~7
    assert ops[0] == ("store64", word)  # an old version is cleared first
    ready = ops.index(("store64", word), 1)  # the version is stored after every header write
    assert {name for name, _ in ops[1:ready]} == {"write"}
    assert all(name in ("load64", "read_into") for name, _ in ops[ready + 1 :])  # the handle reads it back
    # a mapped attacher sees exactly what the native builder would have built
    m = gf.FabricQueue.attach(fabric, q.locator())
    assert (m.capacity, m.max_item, m.first_seq, m.epoch, m.acked) == (8192, 8192 // 2 - REC, 40, 3, 40)
    assert m.dtype == np.dtype(np.int16)
    assert m.stats()["next_seq"] == 40 and not m.sealed


def test_fabric_queue_create_on_a_fabric_without_mapped_regions_builds_a_one_sided_queue(fabric):
    rec = RecordingFabric(fabric)
    q = gf.FabricQueue.create(rec, capacity=4096, ttl=30, first_seq=7)
    assert isinstance(q, OneSidedQueue)
    assert rec.regions and q.region is rec.regions[0]
    assert q.push(b"over one-sided ops only") == 7
    rx = gf.FabricQueue.attach(fabric, q.locator())  # and a mapped peer reads it
    assert rx.pop(timeout=1).tobytes() == b"over one-sided ops only"


def test_a_small_read_chunk_still_reads_every_record_whole(fabric):
    m = gf.FabricQueue.create(fabric, capacity=8192, ttl=30)
    region = RecordingRegion(fabric.attach(m.region.ref(), mapped=False))
    rx = OneSidedQueue(fabric, region, m.locator(), read_chunk=32)
    rng = np.random.default_rng(3)
    expected: collections.deque[bytes] = collections.deque()
    for _ in range(2000):
        payload = rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes()
        while not m.try_push(payload):
            b = rx.pop_batch(5, timeout=1)
            assert b.tolist() == [expected.popleft() for _ in range(len(b))]
            b.release()
        expected.append(payload)
    while expected:
        with rx.pop(timeout=1) as item:
            assert item.tobytes() == expected.popleft()
    assert region.count("read_into") > 2000  # chunks of 32 bytes, then the rest of each record
    with pytest.raises(E.FabricValueError):
        OneSidedQueue(fabric, region, m.locator(), read_chunk=8)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"capacity": 0}, E.FabricValueError),
        ({"capacity": 2.5}, E.FabricValueError),
        ({"capacity": 4096, "max_item": 4096}, E.FabricValueError),
        ({"capacity": 4096, "epoch": -1}, E.FabricValueError),
        ({"capacity": 4096, "ttl": 0}, E.FabricValueError),
        ({"capacity": 4096, "dtype": object}, E.DtypeMismatch),
    ],
)
def test_create_rejects_bad_arguments_with_typed_errors(fabric, kwargs, error):
    kwargs.setdefault("ttl", 5)
    with pytest.raises(error):
        OneSidedQueue.create(fabric, **kwargs)


def _raw_region(fabric: Any) -> tuple[Any, np.ndarray]:
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    return q, ring_bytes(q)


def test_attaching_a_half_built_ring_raises_not_ready(fabric):
    q, raw = _raw_region(fabric)
    raw[VERSION : VERSION + 4] = 0
    with pytest.raises(E.NotReady):
        OneSidedQueue.attach(fabric, q.locator())


@pytest.mark.parametrize(
    ("where", "value", "error"),
    [
        (VERSION, 99, E.VersionMismatch),
        (MAGIC, 0x12345678, E.Corrupted),
        (CAPACITY, 3000, E.Corrupted),
        (CAPACITY, 1 << 20, E.Corrupted),
    ],
)
def test_attaching_a_foreign_or_damaged_header_gets_a_typed_error(fabric, where, value, error):
    q, raw = _raw_region(fabric)
    raw.view(np.uint32)[where // 4] = value & 0xFFFFFFFF
    with pytest.raises(error):
        OneSidedQueue.attach(fabric, q.locator())


def test_a_locator_with_another_geometry_is_refused(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    loc = q.locator()
    from dataclasses import replace

    with pytest.raises(E.Corrupted):
        OneSidedQueue.attach(fabric, replace(loc, capacity=8192))


# -- interop in one process ------------------------------------------------------------------


def test_a_one_sided_batch_over_the_wrap_is_written_in_two_spans_and_published_once(fabric):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    tx, region = one_sided(fabric, m)
    rx = gf.FabricQueue.attach(fabric, m.locator())
    assert tx.push_batch(np.ones((40, 48), dtype=np.uint8)) == 40  # 64-byte records: 2560 bytes
    with rx.pop_batch(100, timeout=1) as b:
        assert len(b) == 40
    region.log.clear()
    rows = np.arange(40 * 100, dtype=np.uint32).astype(np.uint8).reshape(40, 100)  # 128-byte records
    # 12 records fill the ring exactly to its end, 20 more from index 0 up to head
    assert tx.push_batch(rows, timeout=0) == 32
    assert region.count("cas64", TAIL) == 1
    writes = [o for n, o in region.log if n == "write"]
    assert writes == [RING + 2560, RING]  # two spans: before the wrap, and from index 0
    got = []
    while True:
        b = rx.pop_batch(100, timeout=0)
        if not b:
            break
        got.extend(b.tolist())
        b.release()
    assert got == [r.tobytes() for r in rows[:32]]


# -- round trips ------------------------------------------------------------------------------


def test_a_push_batch_costs_one_owner_check_one_write_one_next_seq_store_and_one_cas(fabric):
    m = gf.FabricQueue.create(fabric, capacity=1 << 16, ttl=30)
    tx, region = one_sided(fabric, m)
    tx.push(b"claim the role first")
    region.log.clear()
    assert tx.push_batch([b"x" * (1 + i) for i in range(100)]) == 100
    assert sorted(region.log) == sorted(
        [("load64", TAIL), ("write", region.log[1][1]), ("store64", NEXT_SEQ), ("cas64", TAIL)]
    )
    assert region.count("load64", HEAD) == 0  # the head cache said there was room


def test_the_producer_reads_head_only_when_its_cache_says_the_ring_is_full(fabric):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    tx, region = one_sided(fabric, m)
    rx = gf.FabricQueue.attach(fabric, m.locator())
    pushed = 0
    while tx.try_push(b"p" * 100):
        pushed += 1
    assert region.count("load64", HEAD) == 2  # once at the role claim, once when it ran out
    for _ in range(5):
        rx.pop(timeout=1).release()
    region.log.clear()
    for _ in range(5):
        assert tx.try_push(b"p" * 100)
    assert region.count("load64", HEAD) == 1  # one refresh covered five pushes


def test_the_consumer_reads_a_span_once_parses_locally_and_stores_head_once_per_release(fabric):
    m = gf.FabricQueue.create(fabric, capacity=1 << 16, ttl=30)
    rx, region = one_sided(fabric, m)
    m.push_batch([bytes([i]) * (10 + i) for i in range(50)])
    region.log.clear()  # (attaching read the ring header)
    b = rx.pop_batch(1000, timeout=1)
    assert len(b) == 50
    assert region.count("read_into") == 1
    assert region.count("store64", HEAD) == 0
    b.release()
    assert region.count("store64", HEAD) == 1
    assert m.stats()["head"] == m.stats()["tail"]
    region.log.clear()
    m.push_batch([b"s" * 20] * 10)
    items = [rx.pop(timeout=1) for _ in range(10)]  # single pops: served from one READ
    assert region.count("read_into") == 1
    del items
    gc.collect()


# -- zero copy and lifetimes -----------------------------------------------------------------


def test_items_and_batches_are_views_of_the_local_buffer_that_survive_the_queue(fabric):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    rx = OneSidedQueue.attach(fabric, m.locator())
    m.push(b"zero-copy")
    m.push_batch(np.full((3, 8), 5, dtype=np.uint8))
    item = rx.pop(timeout=1)
    assert isinstance(item, OneSidedItem)
    a = np.asarray(item)
    assert rx._mirror is not None
    local = rx._mirror.array
    assert np.shares_memory(a, local) and not a.flags.writeable
    batch = rx.pop_batch(10, timeout=1)
    assert np.shares_memory(batch.array(), local)
    kept = batch.array()
    del item, batch, rx, local
    gc.collect()
    assert a.tobytes() == b"zero-copy"
    assert kept.tolist() == [[5] * 8] * 3


def test_space_is_freed_when_the_item_and_its_views_are_gone_in_any_order(fabric):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    rx = gf.FabricQueue.attach(fabric, m.locator(), mapped=False)
    payload = b"k" * 900
    while m.try_push(payload):
        pass
    first = rx.pop(timeout=1)
    view = np.asarray(first)
    second = rx.pop(timeout=1)
    second.release()
    assert not m.try_push(payload)  # the oldest item still pins the ring
    del first
    gc.collect()
    assert not m.try_push(payload)  # ... through its view
    del view
    gc.collect()
    assert m.try_push(payload) and m.try_push(payload)
    assert rx.outstanding == 0


class FakeRegistration:
    """Stands in for a verbs LocalBuffer: memory plus a registration to close."""

    def __init__(self, nbytes: int) -> None:
        self.mem = np.zeros(nbytes, dtype=np.uint8)
        self.closed = False

    def array(self, dtype: Any = np.uint8) -> np.ndarray:
        return self.mem.view(dtype)

    def close(self) -> None:
        self.closed = True


class RegisteringFabric(RecordingFabric):
    """A fabric that registers local memory for READ/WRITE targets, like verbs."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.registrations: list[FakeRegistration] = []

    def register(self, nbytes: int) -> FakeRegistration:
        reg = FakeRegistration(nbytes)
        self.registrations.append(reg)
        return reg

    def attach(self, ref: Any, *, mapped: bool = True) -> Any:
        return self.inner.attach(ref, mapped=False)


@pytest.mark.parametrize("how", ["close", "garbage"])
def test_local_buffers_are_registered_with_the_fabric_and_deregistered_at_the_end(fabric, how):
    reg = RegisteringFabric(fabric)
    tx = gf.FabricQueue.create(reg, capacity=4096, ttl=30)
    rx = OneSidedQueue.attach(reg, tx.locator())
    tx.push(b"through registered memory")
    item = rx.pop(timeout=1)
    view = np.asarray(item)
    assert len(reg.registrations) == 2  # the producer's staging, the consumer's mirror
    assert np.shares_memory(view, reg.registrations[1].mem)  # zero-copy from the registered READ target
    if how == "close":
        tx.close()
        rx.close()
    else:
        del tx, rx, item
        gc.collect()
        assert not reg.registrations[1].closed  # a view of it is still alive
        del view
        gc.collect()
    assert all(r.closed for r in reg.registrations)
    if how == "close":
        assert view.tobytes() == b"through registered memory"  # the memory outlives the registration


# -- fencing, roles, seal ------------------------------------------------------------------


def test_a_stale_one_sided_producer_is_rejected_by_the_tail_cas_at_the_target(fabric):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30, epoch=3)
    tx, region = one_sided(fabric, m)
    rx = gf.FabricQueue.attach(fabric, m.locator())
    assert tx.push(b"epoch 3") == 0
    # the takeover lands after the producer's owner check, just before its publish
    region.before[("cas64", TAIL)] = lambda: m.advance_epoch(4)
    with pytest.raises(E.StaleEpoch) as info:
        tx.push(b"written but never published")
    assert info.value.epoch == 3 and info.value.current == 4
    assert region.count("write") == 2  # the bytes went out; the CAS refused to publish them
    with pytest.raises(E.StaleEpoch):
        tx.push(b"and refused before writing from now on")
    assert region.count("write") == 2
    assert rx.pop(timeout=1).tobytes() == b"epoch 3"
    assert rx.try_pop() is None
    assert m.stats()["next_seq"] >= 1


def test_a_seal_that_races_the_publish_fails_the_cas_with_queue_sealed(fabric):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    tx, region = one_sided(fabric, m)
    rx = gf.FabricQueue.attach(fabric, m.locator(), mapped=False)
    tx.push(b"before the seal")

    def seal_now() -> None:
        assert rx.seal(seal_seq=11)

    region.before[("cas64", TAIL)] = seal_now
    with pytest.raises(E.QueueSealed) as info:
        tx.push_batch([b"a", b"b"])
    assert info.value.seal_seq == 11
    assert rx.pop(timeout=1).tobytes() == b"before the seal"
    with pytest.raises(E.QueueSealed):
        rx.pop(timeout=1)


@pytest.mark.parametrize("newer_mapped", [True, False])
def test_takeover_by_a_newer_epoch_fences_the_older_producer_on_either_path(fabric, newer_mapped):
    base = OneSidedQueue.create(fabric, capacity=4096, ttl=30, epoch=3)
    # the older producer is on the other path than the newer one
    old = (
        OneSidedQueue.attach(fabric, base.locator()) if newer_mapped else gf.FabricQueue.attach(fabric, base.locator())
    )
    newer = gf.FabricQueue.attach(fabric, base.locator(), epoch=4, mapped=newer_mapped)
    rx = OneSidedQueue.attach(fabric, base.locator())
    old.push(b"epoch 3")
    stale = type(old).attach(fabric, base.locator(), epoch=3)
    old.close()  # a live producer is never taken over in place (see test_queue.py); a gone one is
    newer.push(b"epoch 4")
    assert rx.epoch == 4
    with pytest.raises(E.StaleEpoch):
        stale.push(b"stale")
    older = OneSidedQueue.attach(fabric, base.locator(), epoch=2)
    with pytest.raises(E.StaleEpoch):
        older.push(b"older still")
    assert [rx.pop(timeout=1).tobytes() for _ in range(2)] == [b"epoch 3", b"epoch 4"]
    assert rx.try_pop() is None


def test_epoch_and_acked_only_move_forward_through_one_sided_atomics(fabric):
    q = OneSidedQueue.create(fabric, capacity=4096, ttl=30, epoch=5, first_seq=10)
    with pytest.raises(E.StaleEpoch):
        q.advance_epoch(5)
    q.advance_epoch(6)
    assert q.epoch == 6
    with pytest.raises(E.StaleEpoch):
        q.push(b"the creator's handle is stamped with epoch 5")
    m = gf.FabricQueue.attach(fabric, q.locator())
    assert m.epoch == 6
    m.push(b"a handle at the current epoch pushes")
    q.set_acked(15)
    q.set_acked(12)
    assert m.acked == 15
    with pytest.raises(E.FabricValueError):
        q.set_acked(-1)
    with pytest.raises(E.FabricValueError):
        q.advance_epoch("7")  # type: ignore[arg-type]


# -- leases fail closed ------------------------------------------------------------------------


def test_an_expired_lease_fails_closed_even_for_bytes_already_read_locally(namespace):
    clock = gf.ManualClock()
    fabric = gf.open_fabric(f"shm://{namespace}", clock=clock)
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=10.0)
    rx = gf.FabricQueue.attach(fabric, m.locator(), mapped=False)
    tx = OneSidedQueue.attach(fabric, OneSidedQueue.create(fabric, capacity=4096, ttl=10.0).locator())
    m.push(b"one")
    m.push(b"two")
    assert rx.pop(timeout=0).tobytes() == b"one"  # "two" is in the local buffer now
    clock.advance(10.0)
    with pytest.raises(E.LeaseExpired):
        rx.try_pop()
    with pytest.raises(E.LeaseExpired):
        rx.pop_batch(10, timeout=0)
    with pytest.raises(E.LeaseExpired):
        tx.push(b"three")
    with pytest.raises(E.LeaseExpired):
        rx.region.load64(TAIL)


def test_a_revoked_lease_fails_closed_for_one_sided_producer_and_consumer(fabric):
    tx, rx = make(fabric, "onesided->onesided")
    tx.push(b"a")
    tx.lease.revoke()
    with pytest.raises(E.Revoked):
        tx.push(b"b")
    with pytest.raises(E.Revoked):
        rx.pop(timeout=1)
    with pytest.raises(E.Revoked):
        rx.region.read_into(0, bytearray(8))


def test_header_reads_of_a_freed_queue_fail_closed_on_the_one_sided_path(fabric):
    tx, rx = make(fabric, "mapped->onesided")
    tx.push(b"a")
    tx.free()
    for read in (lambda: rx.acked, lambda: rx.epoch, lambda: rx.sealed, rx.stats, rx.try_pop):
        with pytest.raises(E.LeaseExpired):
            read()


def test_a_waiting_consumer_notices_a_revoke_instead_of_waiting_out_its_timeout(fabric):
    tx, rx = make(fabric, "onesided->onesided")
    t = threading.Timer(0.05, tx.lease.revoke)
    t.start()
    with pytest.raises(E.Revoked):
        rx.pop(timeout=5)
    t.join()


# -- corrupt remote bytes ----------------------------------------------------------------------


def _corrupt_first_record(m: Any, field: int, value: int, width: int = 4) -> None:
    raw = ring_bytes(m)
    dt = np.uint32 if width == 4 else np.uint64
    raw[RING + field : RING + field + width].view(dt)[0] = value


@pytest.mark.parametrize(
    ("field", "value", "width"),
    [
        (R_TYPE, 7, 4),  # unknown record type
        (R_LEN, 0, 4),  # empty data record
        (R_LEN, 5000, 4),  # longer than max_item
        (R_LEN, 600, 4),  # runs past the published tail
        (R_TYPE, int(lib.GF_RECORD_PADDING), 4),  # padding whose length doesn't reach the ring end
    ],
)
def test_a_corrupt_record_header_raises_corrupted_not_a_crash(fabric, field, value, width):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30, max_item=2000)
    rx = gf.FabricQueue.attach(fabric, m.locator(), mapped=False)
    m.push(b"x" * 100)
    _corrupt_first_record(m, field, value, width)
    with pytest.raises(E.Corrupted):
        rx.try_pop()
    with pytest.raises(E.Corrupted):
        rx.pop_batch(10, timeout=0)


def test_a_sequence_number_that_goes_backwards_is_corrupted(fabric):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30, first_seq=100)
    rx = gf.FabricQueue.attach(fabric, m.locator(), mapped=False)
    m.push_batch(np.ones((4, 8), dtype=np.uint8))
    raw = ring_bytes(m)
    raw[RING + 2 * rec_size(8) + R_SEQ : RING + 2 * rec_size(8) + R_SEQ + 8].view(np.uint64)[0] = 5
    good = rx.pop_batch(10, timeout=0)  # the vectorized run stops before the bad record...
    assert list(good.seqs) == [100, 101]
    with pytest.raises(E.Corrupted):
        rx.pop_batch(10, timeout=0)  # ...which the next call rejects


@pytest.mark.parametrize("failing_read", [1, 3])  # the first record's payload; the second record's
def test_a_read_that_fails_mid_batch_loses_nothing(fabric, failing_read):
    class FlakyRegion(RecordingRegion):
        reads_to_fail = 0

        def read_into(self, offset: int, buf: Any) -> None:
            if self.count("read_into") == failing_read and self.reads_to_fail:
                self.reads_to_fail -= 1
                self.log.append(("read_into-failed", offset))
                raise E.Disconnected("the READ's completion was an error")
            super().read_into(offset, buf)

    m = gf.FabricQueue.create(fabric, capacity=8192, ttl=30)
    region = FlakyRegion(fabric.attach(m.region.ref(), mapped=False))
    rx = OneSidedQueue(fabric, region, m.locator(), read_chunk=64)  # header, then the rest of each record
    region.log.clear()
    m.push_batch([bytes([i]) * 100 for i in range(5)])
    region.reads_to_fail = 1
    with pytest.raises(E.Disconnected):
        rx.pop_batch(10, timeout=0)
    assert region.count("read_into-failed") == 1 and region.count("read_into") == failing_read
    b = rx.pop_batch(10, timeout=0)
    assert b.tolist() == [bytes([i]) * 100 for i in range(5)]
    assert list(b.seqs) == list(range(5))


@pytest.mark.parametrize("bad_tail", ["beyond_capacity", "backwards"])
def test_an_impossible_tail_position_is_corrupted(fabric, bad_tail):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    rx = gf.FabricQueue.attach(fabric, m.locator(), mapped=False)
    m.push(b"a" * 100)
    rx.pop(timeout=1).release()
    raw = ring_bytes(m).view(np.uint64)
    word = int(raw[TAIL // 8])
    pos = 3 * 4096 if bad_tail == "beyond_capacity" else 16
    raw[TAIL // 8] = (word & ~POS & ((1 << 64) - 1)) | pos
    with pytest.raises(E.Corrupted):
        rx.try_pop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.binary(min_size=16, max_size=4096),
    at=st.integers(0, 255),
    tail=st.integers(0, 4096 // 16),
    batch=st.booleans(),
)
def test_random_bytes_in_the_ring_give_items_or_corrupted_and_nothing_else(fabric, junk, at, tail, batch):
    m = gf.FabricQueue.create(fabric, capacity=4096, ttl=30, max_item=1000)
    raw = ring_bytes(m)
    start = at * 16
    n = min(len(junk), 4096 - start)
    raw[RING + start : RING + start + n] = np.frombuffer(junk[:n], dtype=np.uint8)
    raw.view(np.uint64)[TAIL // 8] = tail * 16
    rx = gf.FabricQueue.attach(fabric, m.locator(), mapped=False)
    try:
        for _ in range(300):
            got: Any = rx.pop_batch(7, timeout=0) if batch else rx.try_pop()
            if not got:
                break
            items: list[Any] = list(got) if batch else [got]
            for it in items:
                assert 0 < len(it) <= 1000
                assert len(it.tobytes()) == len(it)
    except E.Corrupted:
        pass
    finally:
        m.free()


# -- reserve / commit, dtype, timeouts, waits ------------------------------------------------


def test_one_sided_reserve_copies_on_commit_and_honours_commit_len_and_abort(fabric):
    tx, rx = make(fabric, "onesided->mapped")
    with tx.reserve(8) as buf:
        buf[:] = np.frombuffer(b"inplace!", dtype=np.uint8)
    assert tx.last_seq == 0
    with tx.reserve(100) as buf:
        buf[:3] = [1, 2, 3]
        tx.commit_len(3)
    with pytest.raises(RuntimeError), tx.reserve(16) as buf:
        buf[:] = 7
        raise RuntimeError("producer failed mid-item")
    with pytest.raises(E.FabricValueError):
        with tx.reserve(8):
            tx.push(b"not while a reservation is open")
    assert [rx.pop(timeout=1).tobytes() for _ in range(2)] == [b"inplace!", b"\x01\x02\x03"]
    assert tx.push(b"next") == 2  # aborted reservations took no sequence number
    assert rx.pop(timeout=1).seq == 2


def test_reserve_waits_for_space_and_times_out(fabric):
    tx, rx = make(fabric, "onesided->onesided")
    while tx.try_push(b"r" * 500):
        pass
    with pytest.raises(TimeoutError), tx.reserve(500, timeout=0.05):
        pass
    rx.pop(timeout=1).release()
    with tx.reserve(500, timeout=1) as buf:
        buf[:] = 1
    assert tx.stats()["used"] <= 4096


# -- across processes ------------------------------------------------------------------------


def _child_producer(url: str, loc: bytes, n: int, one_sided: bool) -> None:
    fabric = gf.open_fabric(url)
    q = gf.FabricQueue.attach(fabric, loc, mapped=not one_sided)
    i = 0
    while i < n:
        k = min(50, n - i)
        if i % 100 == 0:
            for j in range(i, i + k):
                q.push(bytes([j % 251]) * (1 + j % 300), timeout=20)
        else:
            q.push_batch([bytes([j % 251]) * (1 + j % 300) for j in range(i, i + k)], timeout=20)
        i += k


def _child_consumer(url: str, loc: bytes, n: int, one_sided: bool, out: Any) -> None:
    fabric = gf.open_fabric(url)
    q = gf.FabricQueue.attach(fabric, loc, mapped=not one_sided)
    seqs: list[int] = []
    ok = True
    while len(seqs) < n:
        with q.pop_batch(300, timeout=20) as b:
            for it in b:
                seqs.append(it.seq)
                ok &= it.tobytes() == bytes([it.seq % 251]) * (1 + it.seq % 300)
    out.put((seqs == list(range(n)), ok))


@pytest.mark.parametrize(
    ("child", "child_one_sided", "parent_one_sided"),
    [
        ("producer", True, False),
        ("producer", False, True),
        ("producer", True, True),
        ("consumer", True, False),
        ("consumer", False, True),
    ],
)
def test_two_processes_interoperate_across_paths(fabric, child, child_one_sided, parent_one_sided):
    n = 4200  # a multiple of the parent's batches of 60
    creator = OneSidedQueue if parent_one_sided else gf.FabricQueue
    q = creator.create(fabric, capacity=1 << 14, ttl=60)
    loc = bytes(q.locator())
    if child == "producer":
        proc = CTX.Process(target=_child_producer, args=(fabric.url, loc, n, child_one_sided))
        proc.start()
        seqs = []
        for _ in range(n):
            with q.pop(timeout=20) as it:
                assert it.tobytes() == bytes([it.seq % 251]) * (1 + it.seq % 300)
                seqs.append(it.seq)
        proc.join(20)
        assert proc.exitcode == 0
        assert seqs == list(range(n))
    else:
        out = CTX.Queue()
        proc = CTX.Process(target=_child_consumer, args=(fabric.url, loc, n, child_one_sided, out))
        proc.start()
        for i in range(0, n, 60):
            assert q.push_batch([bytes([j % 251]) * (1 + j % 300) for j in range(i, i + 60)], timeout=20) == 60
        in_order, intact = out.get(timeout=60)
        proc.join(20)
        assert in_order and intact


# -- random operation sequences against a model ---------------------------------------------



def test_threads_sharing_one_sided_handles_are_serialized_per_role(fabric):
    tx, rx = make(fabric, "onesided->onesided", capacity=8192)
    per_thread = 300
    received: list[tuple[int, bytes]] = []

    def produce(k: int) -> None:
        for i in range(per_thread):
            tx.push(bytes([k]) * (1 + i % 50), timeout=10)

    def consume() -> None:
        while len(received) < 4 * per_thread:
            try:
                with rx.pop(timeout=0.2) as item:
                    received.append((item.seq, item.tobytes()))
            except TimeoutError:
                continue

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=consume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(s for s, _ in received) == list(range(4 * per_thread))
    counts = collections.Counter(p[0] for _, p in received)
    assert counts == {k: per_thread for k in range(4)}
    assert all(p == bytes([p[0]]) * len(p) for _, p in received)


# -- stress ---------------------------------------------------------------------------------------


def _stress_payload(seq: int) -> bytes:
    return bytes([seq % 251]) * (1 + (seq * 7919) % 1500)


def _stress_producer(url: str, loc: bytes, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = OneSidedQueue.attach(gf.open_fabric(url), loc)
    seq = 0
    while seq < n:
        op = int(rng.integers(0, 3))
        if op == 0:
            assert q.push(_stress_payload(seq), timeout=30) == seq
            seq += 1
        elif op == 1:
            k = min(int(rng.integers(1, 40)), n - seq)
            assert q.push_batch([_stress_payload(s) for s in range(seq, seq + k)], timeout=30) == k
            seq += k
        else:
            p = _stress_payload(seq)
            with q.reserve(len(p) + int(rng.integers(0, 64)), timeout=30) as buf:
                buf[: len(p)] = np.frombuffer(p, dtype=np.uint8)
                q.commit_len(len(p))
            assert q.last_seq == seq
            seq += 1


@pytest.mark.stress
@pytest.mark.parametrize("consumer_one_sided", [True, False])
def test_stress_a_one_sided_producer_process_against_a_consumer_holding_and_releasing(fabric, consumer_one_sided):
    # a mapped consumer sleeps on a futex that a one-sided producer cannot wake:
    # it wakes at the end of its wait slice, so that pairing gets fewer items
    n = 30_000 if consumer_one_sided else 3_000
    creator = OneSidedQueue if consumer_one_sided else gf.FabricQueue
    rx = creator.create(fabric, capacity=1 << 15, ttl=120)
    proc = CTX.Process(target=_stress_producer, args=(fabric.url, bytes(rx.locator()), n, 1))
    proc.start()
    rng = np.random.default_rng(2)
    held: collections.deque[Any] = collections.deque()
    expect = 0
    stalls = 0
    try:
        while expect < n:
            got: Any
            items: list[Any]
            try:
                if rng.random() < 0.5:
                    got = rx.pop_batch(int(rng.integers(1, 64)), timeout=30)
                    items = list(got)
                else:
                    got = rx.pop(timeout=30)
                    items = [got]
            except E.HeldItemsStall:  # what we hold pins the ring the producer waits for
                stalls += 1
                while held:
                    held.popleft().release()
                continue
            for it in items:
                assert it.seq == expect
                assert it.tobytes() == _stress_payload(expect)
                expect += 1
            held.append(got)
            while len(held) > int(rng.integers(0, 4)):
                (held.popleft() if rng.random() < 0.7 else held.pop()).release()
    finally:
        for h in held:
            h.release()
        proc.join(30)
    assert proc.exitcode == 0
    assert rx.try_pop() is None
    assert stalls < n // 10


def _self_checking(nonce: int, n: int) -> bytes:
    body = (nonce.to_bytes(8, "little") * (1 + n // 8))[:n]
    return body + zlib.crc32(body).to_bytes(4, "little")


def _crashing_producer(url: str, loc: bytes, epoch: int) -> None:
    q = OneSidedQueue.attach(gf.open_fabric(url), loc, epoch=epoch)
    rng = np.random.default_rng(epoch)
    nonce = epoch << 32
    while True:  # until SIGKILL, wherever it lands: mid-WRITE, before or after the CAS
        k = int(rng.integers(1, 30))
        batch = [_self_checking(nonce + i, int(rng.integers(1, 700))) for i in range(k)]
        nonce += k
        q.push_batch(batch, timeout=30)


@pytest.mark.stress
def test_killing_one_sided_producers_mid_write_never_publishes_a_torn_record(fabric):
    rx = OneSidedQueue.create(fabric, capacity=1 << 14, ttl=120)
    loc = bytes(rx.locator())
    last = -1
    received = 0
    rng = np.random.default_rng(5)
    for epoch in range(1, 9):  # each producer takes over from a dead one with a newer epoch
        proc = CTX.Process(target=_crashing_producer, args=(fabric.url, loc, epoch))
        proc.start()
        deadline = time.monotonic() + 0.3 + float(rng.random()) * 0.4
        while time.monotonic() < deadline:
            # generous: a spawned producer can take seconds to start under ASan on a loaded machine
            with rx.pop_batch(64, timeout=60) as b:
                for it in b:
                    raw = it.tobytes()
                    assert zlib.crc32(raw[:-4]).to_bytes(4, "little") == raw[-4:], "torn record"
                    assert it.seq > last
                    last = it.seq
                    received += 1
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        while True:  # what the dead producer published is intact
            b = rx.pop_batch(64, timeout=0)
            if not b:
                break
            for it in b:
                raw = it.tobytes()
                assert zlib.crc32(raw[:-4]).to_bytes(4, "little") == raw[-4:], "torn record"
                assert it.seq > last
                last = it.seq
                received += 1
            b.release()
    assert received > 100
    assert rx.epoch == 8
