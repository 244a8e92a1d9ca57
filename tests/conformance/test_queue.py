"""FabricQueue behaviour through its API: the queue conformance suite.

Runs on every access pair of shm and on every driver (tests/conformance/conftest.py);
a test that needs the shm driver itself says so with its marker.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E

pytestmark = pytest.mark.drivers("shm", "nodeshm", "ucx-tcp", "ucx-sm", "ucx-map", "softverbs", "verbs")


def test_items_come_out_in_order_with_consecutive_sequence_numbers(make_pair):
    tx, rx = make_pair()
    seqs = [tx.push(bytes([i]) * (i + 1)) for i in range(50)]
    assert seqs == list(range(50))
    for i in range(50):
        item = rx.pop(timeout=1)
        assert item.seq == i
        assert item.tobytes() == bytes([i]) * (i + 1)
        item.release()


def test_first_seq_sets_the_first_sequence_number(make_pair):
    tx, rx = make_pair(first_seq=1000)
    assert tx.push(b"a") == 1000
    assert tx.push(b"b") == 1001
    assert rx.pop(timeout=1).seq == 1000


def test_try_pop_on_empty_returns_none_and_try_push_on_full_returns_false(make_pair):
    tx, rx = make_pair(capacity=4096)
    assert rx.try_pop() is None
    pushed = 0
    while tx.try_push(b"z" * 100):
        pushed += 1
        assert pushed < 1000
    assert pushed > 10
    assert tx.try_push(b"z" * 100) is False
    item = rx.try_pop()
    assert item is not None
    item.release()
    assert tx.try_push(b"z" * 100) is True


def test_pop_times_out_with_timeout_error(make_pair):
    _, rx = make_pair()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        rx.pop(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04


def test_push_times_out_when_the_ring_stays_full(make_pair):
    tx, _ = make_pair(capacity=4096)
    while tx.try_push(b"q" * 200):
        pass
    with pytest.raises(TimeoutError):
        tx.push(b"q" * 200, timeout=0.05)


def test_asarray_of_an_item_is_a_zero_copy_view_of_ring_memory(make_pair, queue_mode):
    tx, rx = make_pair()
    tx.push(b"abcdef")
    item = rx.pop(timeout=1)
    a = np.asarray(item)
    b = np.asarray(item)
    assert a.tobytes() == b"abcdef"
    assert a.dtype == np.uint8
    assert not a.flags.writeable
    if queue_mode == "mapped":
        lo = rx.region.address()
        assert lo <= a.ctypes.data < lo + rx.region.nbytes
    assert np.shares_memory(a, b) or a.ctypes.data == b.ctypes.data


def test_view_survives_deleting_the_item_and_the_queue_and_a_gc(make_pair):
    tx, rx = make_pair()
    tx.push(b"persistent")
    view = np.asarray(rx.pop(timeout=1))
    del rx
    gc.collect()
    assert view.tobytes() == b"persistent"


def test_space_is_freed_only_when_the_item_and_its_views_are_gone(make_pair):
    tx, rx = make_pair(capacity=4096)
    payload = b"k" * 1000
    while tx.try_push(payload):
        pass
    item = rx.pop(timeout=1)
    view = np.asarray(item)
    del item
    gc.collect()
    assert tx.try_push(payload) is False  # the view still pins the space
    del view
    gc.collect()
    assert tx.try_push(payload) is True


def test_release_with_context_manager_frees_space(make_pair):
    tx, rx = make_pair(capacity=4096)
    payload = b"m" * 1000
    while tx.try_push(payload):
        pass
    with rx.pop(timeout=1) as item:
        assert item.tobytes() == payload
    assert item.released
    assert tx.try_push(payload) is True
    with pytest.raises(E.FabricValueError):
        item.array()


def test_out_of_order_release_frees_space_up_to_the_oldest_unreleased_item(make_pair):
    tx, rx = make_pair(capacity=4096)
    payload = b"o" * 900
    while tx.try_push(payload):
        pass
    first = rx.pop(timeout=1)
    second = rx.pop(timeout=1)
    second.release()
    assert tx.try_push(payload) is False
    first.release()
    assert tx.try_push(payload) is True
    assert tx.try_push(payload) is True


def test_batch_pop_returns_seqs_and_a_two_dimensional_view(make_pair):
    tx, rx = make_pair()
    rows = np.arange(32 * 10, dtype=np.uint8).reshape(32, 10)
    assert tx.push_batch(rows) == 32
    batch = rx.pop_batch(100, timeout=1)
    assert len(batch) == 32
    assert list(batch.seqs) == list(range(32))
    np.testing.assert_array_equal(batch.array(), rows)
    assert [item.tobytes() for item in batch] == [r.tobytes() for r in rows]
    batch.release()


def test_push_batch_of_a_list_of_variable_sized_items(make_pair):
    tx, rx = make_pair()
    items = [bytes([i]) * (1 + i % 7) for i in range(100)]
    assert tx.push_batch(items) == 100
    got = []
    while len(got) < 100:
        with rx.pop_batch(64, timeout=1) as b:
            got.extend(b.tolist())
    assert got == items


def test_batch_of_mixed_lengths_refuses_a_two_dimensional_view(make_pair):
    tx, rx = make_pair()
    tx.push_batch([b"a", b"bb"])
    b = rx.pop_batch(10, timeout=1)
    with pytest.raises(E.FabricValueError):
        b.array()


def test_pop_batch_with_zero_timeout_returns_an_empty_batch(make_pair):
    _, rx = make_pair()
    b = rx.pop_batch(10, timeout=0)
    assert len(b) == 0 and not b


def test_push_batch_with_zero_timeout_pushes_what_fits(make_pair):
    tx, rx = make_pair(capacity=4096)
    n = tx.push_batch(np.zeros((1000, 48), dtype=np.uint8), timeout=0)
    assert 0 < n < 1000
    got = 0
    while True:
        b = rx.pop_batch(1000, timeout=0)
        if not b:
            break
        got += len(b)
        b.release()
    assert got == n


def test_push_batch_waits_for_a_consumer_in_another_thread(make_pair):
    tx, rx = make_pair(capacity=4096)
    total = 5000
    received: list[int] = []

    def consume() -> None:
        while len(received) < total:
            with rx.pop_batch(256, timeout=5) as b:
                received.extend(int(s) for s in b.seqs)

    t = threading.Thread(target=consume)
    t.start()
    assert tx.push_batch(np.ones((total, 24), dtype=np.uint8), timeout=10) == total
    t.join(10)
    assert received == list(range(total))


def test_reserve_commit_publishes_an_item_written_in_place(make_pair):
    tx, rx = make_pair()
    with tx.reserve(8) as buf:
        buf[:] = np.frombuffer(b"inplace!", dtype=np.uint8)
    item = rx.pop(timeout=1)
    assert item.tobytes() == b"inplace!"
    assert item.seq == tx.last_seq == 0


def test_reserve_can_commit_fewer_bytes(make_pair):
    tx, rx = make_pair()
    with tx.reserve(100) as buf:
        buf[:3] = [1, 2, 3]
        tx.commit_len(3)
    assert rx.pop(timeout=1).tobytes() == b"\x01\x02\x03"


def test_reserve_aborts_on_exception_and_publishes_nothing(make_pair):
    tx, rx = make_pair()
    with pytest.raises(RuntimeError), tx.reserve(16) as buf:
        buf[:] = 7
        raise RuntimeError("producer failed mid-item")
    assert rx.try_pop() is None
    assert tx.push(b"next") == 0  # the aborted item took no sequence number
    assert rx.pop(timeout=1).tobytes() == b"next"


def test_dtype_queue_returns_arrays_of_that_dtype(make_pair):
    tx, rx = make_pair(dtype=np.float32)
    a = np.arange(10, dtype=np.float32)
    tx.push(a)
    out = np.asarray(rx.pop(timeout=1))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)
    tx.push_batch(np.ones((5, 3), dtype=np.float32))
    b = rx.pop_batch(10, timeout=1)
    assert b.array().shape == (5, 3) and b.array().dtype == np.float32


def test_structured_dtype_round_trips_through_the_header(make_pair):
    dt = np.dtype([("id", "<u4"), ("x", "<f8")])
    tx, rx = make_pair(dtype=dt)
    rec = np.array([(1, 2.5), (3, 4.5)], dtype=dt)
    tx.push(rec)
    out = np.asarray(rx.pop(timeout=1))
    assert out.dtype == dt
    assert out["x"].tolist() == [2.5, 4.5]


def test_wrong_dtype_and_non_contiguous_arrays_are_rejected(make_pair):
    tx, rx = make_pair(dtype=np.float32)
    with pytest.raises(E.DtypeMismatch):
        tx.push(np.zeros(4, dtype=np.float64))
    with pytest.raises(E.DtypeMismatch):
        tx.push(b"bytes are not float32 arrays")
    with pytest.raises(E.DtypeMismatch):
        tx.push(np.zeros((4, 4), dtype=np.float32)[:, 1])
    with pytest.raises(E.DtypeMismatch):
        tx.push_batch(np.zeros((4, 4), dtype=np.int32))
    assert rx.try_pop() is None  # nothing half-pushed


def test_non_contiguous_array_on_a_bytes_queue_is_rejected(make_pair):
    tx, _ = make_pair()
    with pytest.raises(E.DtypeMismatch):
        tx.push(np.zeros((8, 8), dtype=np.uint8)[:, ::2])
    with pytest.raises(E.DtypeMismatch):
        tx.push(np.array([object()], dtype=object))


def test_oversize_and_empty_items_get_typed_errors_and_lose_nothing(make_pair):
    tx, rx = make_pair(max_item=100)
    tx.push(b"before")
    with pytest.raises(E.ItemTooLarge):
        tx.push(b"x" * 101)
    with pytest.raises(E.ItemTooLarge):
        tx.push_batch([b"ok", b"x" * 101])
    with pytest.raises(E.ItemTooLarge):
        tx.push_batch(np.zeros((3, 101), dtype=np.uint8))
    with pytest.raises(E.FabricValueError):
        tx.push(b"")
    tx.push(b"after")
    assert [rx.pop(timeout=1).tobytes() for _ in range(2)] == [b"before", b"after"]
    assert rx.try_pop() is None


@pytest.mark.parametrize("capacity", [0, -1, 1 << 50, 2.5, "big", True])
def test_absurd_capacities_are_rejected(fabric, capacity):
    with pytest.raises(E.FabricValueError):
        gf.FabricQueue.create(fabric, capacity=capacity, ttl=5)


@pytest.mark.parametrize("ttl", [0, -3, float("nan"), "soon", 1e12])
def test_absurd_ttls_are_rejected(fabric, ttl):
    with pytest.raises(E.FabricValueError):
        gf.FabricQueue.create(fabric, capacity=4096, ttl=ttl)


def test_capacity_is_rounded_up_to_a_power_of_two(fabric):
    q = gf.FabricQueue.create(fabric, capacity=5000, ttl=5)
    assert q.capacity == 8192


def test_push_and_pop_after_close_raise_queue_closed(make_pair):
    tx, rx = make_pair()
    tx.close()
    rx.close()
    tx.close()  # idempotent
    fresh_tx = gf.FabricQueue.attach(tx.fabric, tx.locator())
    with pytest.raises(E.QueueClosed):
        tx.push(b"x")
    with pytest.raises(E.QueueClosed):
        rx.pop(timeout=0)
    fresh_tx.push(b"still works for a new handle")


def test_a_second_producer_is_refused(make_pair):
    tx, rx = make_pair()
    tx.push(b"first producer")
    other = gf.FabricQueue.attach(tx.fabric, tx.locator())
    with pytest.raises(E.RoleTaken):
        other.push(b"second producer")
    assert rx.pop(timeout=1).tobytes() == b"first producer"
    assert rx.try_pop() is None


def test_a_second_consumer_is_refused(make_pair):
    tx, rx = make_pair()
    tx.push(b"a")
    rx.pop(timeout=1)
    other = gf.FabricQueue.attach(tx.fabric, tx.locator())
    with pytest.raises(E.RoleTaken):
        other.try_pop()


def test_revoked_lease_fails_closed_for_both_sides(make_pair):
    tx, rx = make_pair()
    tx.push(b"a")
    tx.lease.revoke()
    with pytest.raises(E.Revoked):
        tx.push(b"b")
    with pytest.raises(E.Revoked):
        rx.pop(timeout=1)
    with pytest.raises(E.Revoked):
        tx.lease.renew()


def test_expired_lease_fails_closed_at_the_exact_step(namespace):
    clock = gf.ManualClock()
    fabric = gf.open_fabric(f"shm://{namespace}", clock=clock)
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=10.0)
    q.push(b"one")
    clock.advance(9.999)
    q.push(b"two")
    assert q.pop(timeout=0).tobytes() == b"one"
    clock.advance(0.001)
    with pytest.raises(E.LeaseExpired):
        q.push(b"three")
    with pytest.raises(E.LeaseExpired):
        q.try_pop()  # nothing stale is returned, though "two" is still in the ring
    with pytest.raises(E.LeaseExpired):
        q.lease.renew()


def test_renewal_extends_the_deadline_for_every_attached_handle(namespace):
    clock = gf.ManualClock()
    fabric = gf.open_fabric(f"shm://{namespace}", clock=clock)
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=10.0)
    other = gf.FabricQueue.attach(fabric, q.locator())
    clock.advance(8)
    q.lease.renew()
    clock.advance(8)
    q.push(b"alive")
    assert other.pop(timeout=0).tobytes() == b"alive"
    assert other.lease.remaining() == pytest.approx(2.0)


def test_sealed_queue_refuses_pushes_and_drains_then_raises(make_pair):
    tx, rx = make_pair()
    tx.push(b"a")
    tx.push(b"b")
    assert rx.seal(seal_seq=7) is True
    assert rx.seal() is False
    with pytest.raises(E.QueueSealed):
        tx.push(b"c")
    assert rx.pop(timeout=1).tobytes() == b"a"
    assert rx.pop(timeout=1).tobytes() == b"b"
    with pytest.raises(E.QueueSealed) as info:
        rx.pop(timeout=1)
    assert info.value.seal_seq == 7


def test_producer_with_an_older_epoch_is_fenced_at_the_target(make_pair):
    tx, rx = make_pair(epoch=3)
    tx.push(b"epoch 3")
    tx.close()  # the old producer is gone: the newer one takes the role over in place
    newer = gf.FabricQueue.attach(tx.fabric, tx.locator(), epoch=4)
    newer.push(b"epoch 4")
    assert rx.epoch == 4
    stale = gf.FabricQueue.attach(tx.fabric, tx.locator(), epoch=3)
    with pytest.raises(E.StaleEpoch):
        stale.push(b"stale write")
    older = gf.FabricQueue.attach(tx.fabric, tx.locator(), epoch=2)
    with pytest.raises(E.StaleEpoch):
        older.push(b"older still")
    got = [rx.pop(timeout=1).tobytes() for _ in range(2)]
    assert got == [b"epoch 3", b"epoch 4"]
    assert rx.try_pop() is None


def test_a_newer_epoch_never_takes_over_a_live_producer_in_place_it_fences_and_seals(make_pair):
    tx, rx = make_pair(epoch=3)
    tx.push(b"epoch 3")
    newer = gf.FabricQueue.attach(tx.fabric, tx.locator(), epoch=4)
    with pytest.raises(E.QueueSealed, match="fresh queue"):
        newer.push(b"epoch 4")  # tx is alive (it may be mid-copy): no in-place takeover
    assert rx.epoch == 4 and rx.sealed
    with pytest.raises((E.StaleEpoch, E.QueueSealed)):
        tx.push(b"stale write")  # fenced at the target
    assert rx.pop(timeout=1).tobytes() == b"epoch 3"
    with pytest.raises(E.QueueSealed):
        rx.pop(timeout=1)


def test_advance_epoch_only_moves_forward(make_pair):
    tx, _ = make_pair(epoch=5)
    with pytest.raises(E.StaleEpoch):
        tx.advance_epoch(5)
    tx.advance_epoch(6)
    assert tx.epoch == 6


def test_acked_only_grows(make_pair):
    tx, rx = make_pair(first_seq=10)
    assert tx.acked == 10
    rx.set_acked(15)
    rx.set_acked(12)
    assert tx.acked == 15


def test_holding_items_while_waiting_raises_instead_of_deadlocking(make_pair):
    tx, rx = make_pair(capacity=4096)
    held = []
    done = threading.Event()

    def produce() -> None:
        try:
            for _ in range(200):
                tx.push(b"h" * 200, timeout=30)
        except TimeoutError:
            pass
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    with pytest.raises(E.HeldItemsStall):
        while True:
            held.append(rx.pop(timeout=5))
    n_held = len(held)
    assert n_held > 5
    held.clear()
    gc.collect()
    rest = 0
    while n_held + rest < 200:  # generous waits: the slow drivers (softverbs) on a loaded machine
        try:
            rx.pop(timeout=30).release()
            rest += 1
        except TimeoutError:
            break
    t.join(30)
    assert n_held + rest == 200


def test_a_producer_waiting_for_space_is_no_stall_while_records_wait_unread(make_pair):
    """The consumer holds an item and has seen the ring empty; then records are
    published and the producer waits for space. The wait before the next pop
    must see the new records and return, not raise ``HeldItemsStall`` (it did:
    the holding-items test above failed this way under load)."""
    from grafos_fabric.queue import OneSidedQueue
    from grafos_fabric.queue._onesided_handle import _SPACE_WAITERS, _Backoff

    tx, rx = make_pair(capacity=4096)
    tx.push(b"a" * 200)
    held = [rx.pop(timeout=30)]
    assert rx.try_pop() is None  # this consumer has looked, and the ring was empty
    pushed = 1
    while tx.try_push(b"b" * 200):  # then the ring fills behind its back
        pushed += 1
    assert pushed > 2
    blocked = threading.Thread(target=tx.push, args=(b"c" * 200,), kwargs={"timeout": 120})
    blocked.start()
    deadline = time.monotonic() + 60
    while not tx.region.load64(_SPACE_WAITERS) & 0xFFFFFFFF:  # the producer now waits for space
        assert time.monotonic() < deadline, "the producer never waited for space"
        time.sleep(0.005)
    if isinstance(rx, OneSidedQueue):
        rx._poll_data(_Backoff(time.monotonic() + 30), [None, -1])
    else:
        rx._wait_data(time.monotonic() + 30, [None, -1])
    got = rx.pop(timeout=30)
    assert bytes(got) == b"b" * 200
    held.append(got)
    for item in held:
        item.release()
    held.clear()
    rest = 0
    while pushed + 1 - 2 - rest > 0:
        rx.pop(timeout=30).release()
        rest += 1
    blocked.join(60)
    assert not blocked.is_alive()
    assert rx.try_pop() is None  # every record came out once: a, the b's, c


def test_locator_round_trips_and_attaches(make_pair):
    tx, _ = make_pair(dtype=np.int16, epoch=2, first_seq=5)
    loc = tx.locator()
    again = gf.QueueLocator.from_bytes(bytes(loc))
    assert again == loc
    assert again.epoch == 2 and again.first_seq == 5 and again.dtype


def test_wrap_around_keeps_every_payload_contiguous_and_intact(make_pair):
    tx, rx = make_pair(capacity=4096)
    rng = np.random.default_rng(1)
    expected = []
    for _ in range(3000):
        n = int(rng.integers(1, 700))
        payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        while not tx.try_push(payload):
            item = rx.try_pop()
            assert item is not None
            assert item.tobytes() == expected.pop(0)
            item.release()
        expected.append(payload)
    while expected:
        with rx.pop(timeout=1) as item:
            assert item.tobytes() == expected.pop(0)


def test_batch_stops_at_the_wrap_even_without_a_padding_record(make_pair):
    tx, rx = make_pair(capacity=4096)
    # 240-byte payloads make 256-byte records: 16 fill the ring exactly, so the
    # record after the 16th starts at index 0 with no padding in between.
    for i in range(16):
        assert tx.try_push(bytes([i]) * 240)
    with rx.pop_batch(8, timeout=1) as first:
        assert len(first) == 8
    for i in range(16, 24):
        assert tx.try_push(bytes([i]) * 240)
    tail_part = rx.pop_batch(100, timeout=1)
    assert list(tail_part.seqs) == list(range(8, 16))
    np.testing.assert_array_equal(tail_part.array()[:, 0], np.arange(8, 16))
    head_part = rx.pop_batch(100, timeout=1)
    assert list(head_part.seqs) == list(range(16, 24))
    np.testing.assert_array_equal(head_part.array()[:, 0], np.arange(16, 24))


def test_close_gives_the_consumer_role_back_once_nothing_is_outstanding(make_pair):
    tx, rx = make_pair()
    tx.push_batch([b"a", b"b"])
    held = rx.pop(timeout=1)
    rx.close()
    with pytest.raises(E.RoleTaken):
        gf.FabricQueue.attach(tx.fabric, tx.locator()).try_pop()  # the held item keeps the role
    held.release()
    rx2 = gf.FabricQueue.attach(tx.fabric, tx.locator())
    rx2.close()
    rx3 = gf.FabricQueue.attach(tx.fabric, tx.locator())
    assert rx3.pop(timeout=1).tobytes() == b"b"


@pytest.mark.drivers("shm")  # offers a foreign (non-shm) locator to the shm driver
def test_attach_with_corrupt_truncated_or_foreign_locators_raises_typed_errors(fabric):
    import dataclasses
    import struct

    import crc32c

    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    raw = bytes(q.locator())
    with pytest.raises(E.Corrupted):
        gf.FabricQueue.attach(fabric, b"not a locator at all")
    with pytest.raises(E.Corrupted):
        gf.FabricQueue.attach(fabric, raw[:-3])  # truncated
    flipped = bytearray(raw)
    flipped[20] ^= 0x40
    with pytest.raises(E.Corrupted):
        gf.FabricQueue.attach(fabric, bytes(flipped))  # checksum catches it
    newer = bytearray(raw)
    newer[4] = 99  # version byte, checksum recomputed: a locator from a future build
    newer[-4:] = struct.pack("<I", crc32c.crc32c(bytes(newer[:-4])))
    with pytest.raises(E.VersionMismatch):
        gf.FabricQueue.attach(fabric, bytes(newer))
    loc = q.locator()
    foreign = dataclasses.replace(loc, region=dataclasses.replace(loc.region, driver="verbs"))
    with pytest.raises(E.Unsupported):
        gf.FabricQueue.attach(fabric, foreign)  # a memory node's queue, offered to the shm driver
    with pytest.raises(E.Corrupted):
        gf.FabricQueue.attach(fabric, dataclasses.replace(loc, capacity=8192))  # stale geometry
    q.push(b"still intact")
    assert gf.FabricQueue.attach(fabric, raw).pop(timeout=1).tobytes() == b"still intact"
    q.free()
    with pytest.raises(E.LeaseExpired):
        gf.FabricQueue.attach(fabric, raw)  # the region is gone
