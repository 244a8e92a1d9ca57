"""Items export their payload through the buffer protocol (grafos_fabric._item),
and reservations (reserve / reserve_batch) write items in place.

The lifetime rule under test: an item's ring space is reused only once the item
is released (release(), ``with``, or garbage) *and* every export of it (memoryview,
numpy array) is gone; views keep the mapping alive after the queue is gone.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from typing import Any

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E


def _fill(tx: Any, payload: bytes) -> int:
    n = 0
    while tx.try_push(payload):
        n += 1
    return n


# -- the buffer protocol on items ---------------------------------------------------


def test_memoryview_of_an_item_is_a_read_only_zero_copy_byte_view(make_pair, queue_mode):
    tx, rx = make_pair()
    tx.push(b"hello, buffer")
    item = rx.pop(timeout=5)
    mv = memoryview(item)
    assert mv.readonly
    assert mv.format == "B" and mv.itemsize == 1 and mv.shape == (13,)
    assert mv.tobytes() == b"hello, buffer"
    with pytest.raises(TypeError):
        mv[0] = 1
    if queue_mode == "mapped":
        lo = rx.region.address()
        addr = np.frombuffer(item, dtype=np.uint8).ctypes.data
        assert lo <= addr < lo + rx.region.nbytes  # the ring's own bytes, not a copy


def test_frombuffer_asarray_bytes_array_and_data_all_see_the_payload(make_pair):
    tx, rx = make_pair()
    payload = bytes(range(64))
    tx.push(payload)
    item = rx.pop(timeout=5)
    a = np.frombuffer(item, dtype=np.uint8)
    b = np.asarray(item)
    assert a.tobytes() == b.tobytes() == bytes(item) == item.tobytes() == item.array().tobytes() == payload
    assert item.data.tobytes() == payload and item.data.readonly
    assert not a.flags.writeable and not b.flags.writeable
    assert np.frombuffer(item, dtype="<u8").tolist() == np.frombuffer(payload, dtype="<u8").tolist()
    assert len(item) == item.nbytes == 64


def test_a_writable_export_is_refused(make_pair):
    tx, rx = make_pair()
    tx.push(b"read only")
    item = rx.pop(timeout=5)
    with pytest.raises(TypeError, match="not writable"):
        (ctypes.c_char * len(item)).from_buffer(item)  # asks for a writable export
    arr = np.asarray(item)
    with pytest.raises(ValueError):
        arr[0] = 1


def test_items_of_a_dtype_queue_export_that_dtype(make_pair):
    tx, rx = make_pair(dtype=np.float32)
    tx.push(np.arange(6, dtype=np.float32))
    item = rx.pop(timeout=5)
    mv = memoryview(item)
    assert mv.itemsize == 4 and mv.shape == (6,)
    arr = np.asarray(item)
    assert arr.dtype == np.float32 and arr.tolist() == [0, 1, 2, 3, 4, 5]
    assert np.frombuffer(item, dtype=np.float32).tolist() == arr.tolist()
    assert item.data.format == "B" and item.data.nbytes == 24


def test_a_structured_dtype_comes_back_as_itself(make_pair):
    dt = np.dtype([("x", "<i4"), ("y", "<f8")])
    tx, rx = make_pair(dtype=dt)
    rows = np.zeros(3, dtype=dt)
    rows["x"] = [1, 2, 3]
    rows["y"] = [0.5, 1.5, 2.5]
    tx.push(rows)
    arr = np.asarray(rx.pop(timeout=5))
    assert arr.dtype == dt
    assert arr["x"].tolist() == [1, 2, 3] and arr["y"].tolist() == [0.5, 1.5, 2.5]


def test_an_item_made_by_hand_cannot_point_outside_the_queues_data_area(make_pair):
    tx, rx = make_pair(capacity=4096)
    tx.push(b"x")
    rx.pop(timeout=5).release()
    for offset, length in ((4096, 1), (4000, 200), (0, 4097), (1 << 63, 8), (0, 0), (0, -1)):
        with pytest.raises(E.FabricValueError):
            gf.Item(rx, 0, offset, length, 0, None)
    with pytest.raises(TypeError):
        gf.Item()


def test_a_dtype_without_a_buffer_format_still_gives_arrays(make_pair):
    dt = np.dtype("datetime64[ns]")
    tx, rx = make_pair(dtype=dt)
    vals = np.array([1, 2, 3], dtype=dt)
    tx.push(vals)
    item = rx.pop(timeout=5)
    assert np.asarray(item).dtype == dt and np.asarray(item).tolist() == vals.tolist()
    assert item.tobytes() == vals.tobytes() and item.data.nbytes == 24
    with pytest.raises(BufferError):
        memoryview(item)


# -- lifetime: exports pin the space, and the mapping ---------------------------------------


def test_a_memoryview_survives_deleting_the_item_and_the_queue_and_a_gc(make_pair):
    tx, rx = make_pair()
    tx.push(b"still here")
    mv = memoryview(rx.pop(timeout=5))
    arr = np.frombuffer(rx.pop(timeout=5) if tx.push(b"and here") >= 0 else None, dtype=np.uint8)
    del rx
    gc.collect()
    assert mv.tobytes() == b"still here"
    assert arr.tobytes() == b"and here"


@pytest.mark.parametrize("export", ["memoryview", "frombuffer", "asarray"])
def test_space_is_freed_only_after_the_last_export_is_gone(make_pair, export):
    tx, rx = make_pair(capacity=4096)
    payload = b"k" * 1000
    assert _fill(tx, payload) >= 2
    item = rx.pop(timeout=5)
    make = {
        "memoryview": memoryview,
        "frombuffer": lambda it: np.frombuffer(it, dtype=np.uint8),
        "asarray": np.asarray,
    }[export]
    first, second = make(item), make(item)
    del item
    gc.collect()
    assert tx.try_push(payload) is False  # two exports pin the space
    del first
    gc.collect()
    assert tx.try_push(payload) is False  # one still does
    assert bytes(second[:3]) == b"kkk"
    del second
    gc.collect()
    assert tx.try_push(payload) is True


def test_release_with_a_live_export_defers_the_free_to_the_export(make_pair):
    tx, rx = make_pair(capacity=4096)
    payload = b"d" * 1000
    _fill(tx, payload)
    item = rx.pop(timeout=5)
    mv = memoryview(item)
    item.release()
    assert item.released
    assert tx.try_push(payload) is False  # the export still pins it
    with pytest.raises(E.FabricValueError):
        memoryview(item)  # a released item makes no new views
    with pytest.raises(E.FabricValueError):
        np.asarray(item)
    with pytest.raises(E.FabricValueError):
        bytes(item)
    mv.release()
    assert tx.try_push(payload) is True


def test_an_item_without_exports_frees_its_space_on_release(make_pair):
    tx, rx = make_pair(capacity=4096)
    payload = b"r" * 1000
    _fill(tx, payload)
    item = rx.pop(timeout=5)
    assert item.tobytes() == payload
    item.release()
    assert tx.try_push(payload) is True


def test_batch_items_export_buffers_that_pin_the_batch(make_pair):
    tx, rx = make_pair(capacity=4096)
    payload = b"b" * 500
    _fill(tx, payload)
    batch = rx.pop_batch(3, timeout=5)
    assert len(batch) == 3
    views = [memoryview(it) for it in batch]
    assert all(v.tobytes() == payload for v in views)
    batch.release()
    assert tx.try_push(payload) is False  # views of its items pin the batch's span
    assert views[1].tobytes() == payload
    del views
    gc.collect()
    assert tx.try_push(payload) is True


def test_items_popped_by_threads_sharing_a_handle_are_each_delivered_once(make_pair):
    tx, rx = make_pair(capacity=1 << 16)
    total = 2000
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []
    pushed = threading.Event()  # the end of the stream (not a quiet spell: a loaded machine stalls the producer)

    def consume(k: int) -> None:
        try:
            while True:
                try:
                    item = rx.pop(timeout=0.05)
                except TimeoutError:
                    if pushed.is_set():
                        return
                    continue
                got[k].append(int(np.frombuffer(item, dtype="<u8")[0]))
                item.release()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    assert rx.try_pop() is None  # claim the consumer role before the threads share the handle
    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for i in range(total):
        tx.push(np.array([i], dtype="<u8").tobytes(), timeout=10)
    pushed.set()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(got[0] + got[1]) == list(range(total))
    assert got[0] == sorted(got[0]) and got[1] == sorted(got[1])


# -- reservations -------------------------------------------------------------------------


def test_reserve_batch_hands_out_rows_and_publishes_them_with_one_commit(make_pair, access):
    if access.startswith("onesided"):
        pytest.skip("a one-sided producer's reserve_batch is a local (n, size) buffer pushed on exit: "
                    "no wrap-limited rows, no last_seq")
    tx, rx = make_pair(capacity=1 << 16)
    with tx.reserve_batch(8, 32) as rows:
        assert rows.shape == (8, 32) and rows.flags.writeable
        np.add(np.arange(8, dtype=np.uint8)[:, None], np.zeros((8, 32), dtype=np.uint8), out=rows)
    assert tx.last_seq == 7
    batch = rx.pop_batch(16, timeout=5)
    assert batch.seqs.tolist() == list(range(8))
    assert batch.array()[:, 0].tolist() == list(range(8)) and batch.array().shape == (8, 32)


def test_reserve_batch_commit_rows_publishes_a_prefix_and_reuses_the_rest(make_pair):
    tx, rx = make_pair(capacity=1 << 16)
    with tx.reserve_batch(6, 8) as rows:
        rows[:] = 5
        tx.commit_rows(2)
    assert tx.push(b"after") == 2  # the four dropped rows took no sequence numbers
    got = [rx.pop(timeout=5) for _ in range(3)]
    assert [i.seq for i in got] == [0, 1, 2]
    assert [i.tobytes() for i in got] == [b"\x05" * 8, b"\x05" * 8, b"after"]
    with pytest.raises(E.FabricValueError):
        tx.commit_rows(1)  # outside a block


def test_reserve_batch_aborts_on_exception(make_pair):
    tx, rx = make_pair()
    with pytest.raises(RuntimeError), tx.reserve_batch(4, 16) as rows:
        rows[:] = 1
        raise RuntimeError("producer failed mid-batch")
    assert rx.try_pop() is None
    assert tx.push(b"next") == 0


def test_reserve_batch_stops_at_the_wrap_point(make_pair, access):
    if access.startswith("onesided"):
        pytest.skip("a one-sided producer's reserve_batch is a local (n, size) buffer pushed on exit: "
                    "no wrap-limited rows, no last_seq")
    tx, rx = make_pair(capacity=4096)
    record = 64  # a 48-byte payload plus its 16-byte header
    for _ in range(60):  # 3840 of 4096 bytes: 4 records before the wrap
        tx.push(b"x" * 48)
    rx.pop_batch(64, timeout=5).release()
    with tx.reserve_batch(10, 48) as rows:
        assert len(rows) == (4096 - 60 * record) // record == 4
        rows[:] = np.arange(4, dtype=np.uint8)[:, None]
    tail = rx.pop_batch(10, timeout=5)
    assert tail.array()[:, 0].tolist() == [0, 1, 2, 3]
    with tx.reserve_batch(3, 48) as rows:  # the next one starts at the front
        assert len(rows) == 3
        rows[:] = 9


def test_reserve_batch_of_a_dtype_queue_is_in_that_dtype(make_pair):
    tx, rx = make_pair(dtype=np.float64)
    with tx.reserve_batch(3, 32) as rows:
        assert rows.dtype == np.float64 and rows.shape == (3, 4)
        rows[:] = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert rx.pop_batch(3, timeout=5).array().tolist() == np.arange(12, dtype=np.float64).reshape(3, 4).tolist()
    with pytest.raises(E.DtypeMismatch):
        with tx.reserve_batch(2, 12):
            pass


def test_a_row_view_outlives_the_queue(make_pair):
    tx, _rx = make_pair()
    with tx.reserve_batch(2, 16) as rows:
        rows[:] = 3
    kept = rows
    del tx, _rx
    gc.collect()
    assert kept.tolist() == [[3] * 16] * 2  # the view pins the mapping; reading it is safe


def test_one_sided_reserve_batch_copies_on_commit(fabric):
    owner = gf.FabricQueue.create(fabric, capacity=1 << 16, ttl=30)
    tx = gf.FabricQueue.attach(fabric, bytes(owner.locator()), mapped=False)
    try:
        with tx.reserve_batch(4, 8) as rows:
            rows[:] = np.arange(4, dtype=np.uint8)[:, None]
            tx.commit_rows(3)
        with pytest.raises(RuntimeError), tx.reserve_batch(2, 8) as rows:
            raise RuntimeError("nothing published")
        batch = owner.pop_batch(10, timeout=5)
        assert batch.seqs.tolist() == [0, 1, 2]
        assert batch.array()[:, 0].tolist() == [0, 1, 2]
        assert [bytes(memoryview(it)) for it in batch] == [bytes([k]) * 8 for k in range(3)]
    finally:
        tx.close()
        owner.free()


def test_an_item_dropped_in_a_forked_child_does_not_release_the_parents_space(make_pair):
    import os

    tx, rx = make_pair(capacity=4096)
    payload = b"f" * 1000
    _fill(tx, payload)
    item = rx.pop(timeout=5)
    pid = os.fork()
    if pid == 0:  # the child: its copy of the item must not move the parent's ring head
        try:
            del item
            gc.collect()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert tx.try_push(payload) is False  # still pinned by the parent's item
    item.release()
    assert tx.try_push(payload) is True


def test_items_release_natively_until_close_then_through_the_queue(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    try:
        for k in range(3):
            q.push(bytes([k]) * 100)
        a, b, c = q.pop(timeout=5), q.pop(timeout=5), q.pop(timeout=5)
        assert q.outstanding == 3
        a.release()  # the native path (a Releaser in the queue's _item_info)
        assert len(q._item_info) == 5 and q.outstanding == 2
        view = memoryview(b)
        q.close()  # from now on releases go through _release_token, which gives the role back at 0
        del b
        assert q.outstanding == 2  # the view still pins b
        view.release()
        assert q.outstanding == 1 and q._cons_rel is not None  # c is still out: the role stays
        c.release()
        assert q._cons_rel is None  # nothing unreleased: the consumer role was given back
        rx = gf.FabricQueue.attach(fabric, q.locator())
        assert rx.try_pop() is None  # the role is free again
        rx.close()
    finally:
        q.free()


def test_the_releaser_refuses_a_buffer_that_is_not_a_consumer():
    from grafos_fabric._item import Releaser

    with pytest.raises(ValueError):
        Releaser(bytearray(8))
    with pytest.raises((TypeError, BufferError)):
        Releaser(b"\0" * 256)  # not writable


def test_a_handle_that_pops_can_still_reserve_and_reserve_batch(fabric):
    """One handle in both roles: once it popped, its _item_info carries the releaser;
    the reservation views (Span) read the same tuple."""
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=30)
    try:
        q.push(b"first")
        assert q.pop(timeout=5).tobytes() == b"first"
        with q.reserve(8) as buf:
            buf[:] = 4
        with q.reserve_batch(3, 8) as rows:
            rows[:] = 5
        assert q.pop(timeout=5).tobytes() == b"\x04" * 8
        assert q.pop_batch(8, timeout=5).array().tolist() == [[5] * 8] * len(rows)
    finally:
        q.free()
