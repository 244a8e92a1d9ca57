"""Items crossing between the mapped and the one-sided paths, through the queue API only.

Each test runs on the three cross pairs (``mapped->onesided``, ``onesided->mapped``,
``onesided->onesided``) of the shm driver; ``mapped->mapped`` is test_queue.py's.
A ring of 4096 bytes by default, so that a few items wrap it.
"""

from __future__ import annotations

import collections
import gc
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grafos_fabric as gf
from grafos_fabric import errors as E

# shm only: the tests attach further handles through the shm fabric; cross pairs only (see above)
pytestmark = [
    pytest.mark.drivers("shm"),
    pytest.mark.access("mapped->onesided", "onesided->mapped", "onesided->onesided"),
]


def make(make_pair: Any, **kwargs: Any) -> tuple[Any, Any]:
    kwargs.setdefault("capacity", 4096)
    return make_pair(**kwargs)


program = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 1500)),
        st.tuples(st.just("batch"), st.lists(st.integers(1, 300), min_size=1, max_size=20)),
        st.tuples(st.just("rows"), st.tuples(st.integers(1, 40), st.integers(1, 200))),
        st.tuples(st.just("reserve"), st.tuples(st.integers(1, 800), st.integers(1, 800))),
        st.tuples(st.just("pop"), st.just(0)),
        st.tuples(st.just("pop_batch"), st.integers(1, 16)),
        st.tuples(st.just("release_oldest"), st.just(0)),
        st.tuples(st.just("release_newest"), st.just(0)),
    ),
    max_size=100,
)


def test_items_cross_between_paths_in_order_and_intact_through_many_wraps(make_pair):
    tx, rx = make(make_pair)
    rng = np.random.default_rng(7)
    expected: collections.deque[tuple[int, bytes]] = collections.deque()
    seq = 0
    for _ in range(3000):
        payload = rng.integers(0, 256, int(rng.integers(1, 900)), dtype=np.uint8).tobytes()
        while not tx.try_push(payload):
            item = rx.try_pop()
            assert item is not None
            want = expected.popleft()
            assert (item.seq, item.tobytes()) == want
            item.release()
        expected.append((seq, payload))
        seq += 1
    while expected:
        with rx.pop(timeout=1) as item:
            assert (item.seq, item.tobytes()) == expected.popleft()
    assert rx.try_pop() is None


def test_row_batches_cross_between_paths_through_the_wrap(make_pair):
    tx, rx = make(make_pair, capacity=8192)
    rows = (np.arange(4000 * 40) % 251).astype(np.uint8).reshape(4000, 40)
    sent = 0
    got: list[bytes] = []
    seqs: list[int] = []
    while len(got) < len(rows):
        if sent < len(rows):
            sent += tx.push_batch(rows[sent:], timeout=0)
        b = rx.pop_batch(97, timeout=1)
        np.testing.assert_array_equal(b.array(), rows[len(got) : len(got) + len(b)])
        got.extend(b.tolist())
        seqs.extend(int(s) for s in b.seqs)
        b.release()
    assert seqs == list(range(len(rows)))


def test_strided_rows_and_variable_items_in_one_stream(make_pair):
    tx, rx = make(make_pair, capacity=1 << 14, dtype=np.float32)
    big = np.arange(60 * 8, dtype=np.float32).reshape(60, 8)
    assert tx.push_batch(big[::2, :5]) == 30  # strided rows, contiguous within each row
    assert tx.push_batch([np.full(k, k, dtype=np.float32) for k in range(1, 20)]) == 19
    b = rx.pop_batch(30, timeout=1)
    np.testing.assert_array_equal(b.array(), big[::2, :5])
    b.release()
    for k in range(1, 20):
        with rx.pop(timeout=1) as item:
            out = np.asarray(item)
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, np.full(k, k, dtype=np.float32))


def test_a_record_that_ends_exactly_at_the_ring_end_needs_no_padding(make_pair):
    tx, rx = make(make_pair)
    for i in range(16):  # 240-byte payloads: 256-byte records, 16 fill 4096 bytes exactly
        assert tx.try_push(bytes([i]) * 240)
    assert not tx.try_push(b"x")
    first = rx.pop_batch(100, timeout=1)
    assert list(first.seqs) == list(range(16))
    first.release()
    for i in range(16, 20):
        assert tx.try_push(bytes([i]) * 240)
    nxt = rx.pop_batch(100, timeout=1)
    assert list(nxt.seqs) == [16, 17, 18, 19]
    assert nxt.array()[:, 0].tolist() == [16, 17, 18, 19]


def test_a_padding_record_fills_the_gap_and_batches_stop_there(make_pair):
    tx, rx = make(make_pair)
    for i in range(3):
        assert tx.try_push(bytes([i]) * 1000)  # 1024-byte records: 3072 used
    with rx.pop_batch(3, timeout=1):
        pass
    assert tx.try_push(b"a" * 900)  # 928 bytes at 3072: ends at 4000, a 96-byte gap remains
    assert tx.try_push(b"b" * 200)  # 224 bytes would straddle: padding, then index 0
    b1 = rx.pop_batch(10, timeout=1)
    assert b1.tolist() == [b"a" * 900]  # the batch stops at the padding
    b2 = rx.pop_batch(10, timeout=1)
    assert b2.tolist() == [b"b" * 200]
    assert list(b2.seqs) == [4]


def test_second_producers_and_consumers_are_refused_across_paths(make_pair, fabric):
    tx, rx = make(make_pair)
    tx.push(b"a")
    rx.pop(timeout=1)
    for mapped in (True, False):
        other = gf.FabricQueue.attach(fabric, tx.locator(), mapped=mapped)
        with pytest.raises(E.RoleTaken):
            other.push(b"second producer")
        with pytest.raises(E.RoleTaken):
            other.try_pop()
    tx.close()
    taker = gf.FabricQueue.attach(fabric, tx.locator(), mapped=False)
    taker.push(b"the role was given back on close")
    assert rx.pop(timeout=1).tobytes() == b"the role was given back on close"


def test_seal_from_either_side_stops_pushes_and_the_consumer_drains_first(make_pair):
    tx, rx = make(make_pair)
    tx.push(b"a")
    tx.push_batch([b"b", b"c"])
    assert rx.seal(seal_seq=9) is True
    assert rx.seal() is False and tx.sealed and rx.sealed
    with pytest.raises(E.QueueSealed):
        tx.push(b"d")
    with pytest.raises(E.QueueSealed):
        tx.push_batch(np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(E.QueueSealed):
        tx.try_push(b"e")
    assert rx.pop_batch(10, timeout=1).tolist() == [b"a", b"b", b"c"]
    with pytest.raises(E.QueueSealed) as info:
        rx.pop_batch(10, timeout=1)
    assert info.value.seal_seq == 9


def test_blocking_calls_time_out_with_timeout_error(make_pair):
    tx, rx = make(make_pair)
    with pytest.raises(TimeoutError):
        rx.pop(timeout=0.03)
    with pytest.raises(TimeoutError):
        rx.pop_batch(4, timeout=0.03)
    while tx.try_push(b"q" * 300):
        pass
    with pytest.raises(TimeoutError):
        tx.push(b"q" * 300, timeout=0.03)
    with pytest.raises(TimeoutError) as info:
        tx.push_batch([b"q" * 300] * 3, timeout=0.03)
    assert info.value.args[1] == 0


def test_a_blocked_producer_resumes_when_a_consumer_thread_frees_space(make_pair):
    tx, rx = make(make_pair)
    total = 3000
    received: list[int] = []

    def consume() -> None:
        while len(received) < total:
            with rx.pop_batch(64, timeout=10) as b:
                received.extend(int(s) for s in b.seqs)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(0, total, 100):
        assert tx.push_batch([bytes([i % 256]) * 30] * 100, timeout=10) == 100
    t.join(20)
    assert received == list(range(total))


def test_holding_items_while_the_producer_waits_raises_held_items_stall(make_pair):
    tx, rx = make(make_pair)
    held = []
    stop = threading.Event()

    def produce() -> None:
        for _ in range(100):
            try:
                tx.push(b"h" * 200, timeout=3)
            except (TimeoutError, E.FabricError):
                break
            if stop.is_set():
                break

    t = threading.Thread(target=produce)
    t.start()
    with pytest.raises(E.HeldItemsStall):
        while True:
            held.append(rx.pop(timeout=3))
    assert len(held) > 5
    stop.set()
    held.clear()
    gc.collect()
    t.join(10)
    assert tx.stats()["used"] >= 0


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=program)
def test_random_operations_across_paths_match_a_fifo_model(make_pair, ops):
    tx, rx = make(make_pair)
    model: collections.deque[tuple[int, bytes]] = collections.deque()
    held: list[Any] = []
    seq = 0

    def payload(s: int, n: int) -> bytes:
        return bytes([s % 256]) * n

    for op, arg in ops:
        if op == "push":
            if tx.try_push(payload(seq, arg)):
                model.append((seq, payload(seq, arg)))
                seq += 1
        elif op == "batch":
            items = [payload(seq + i, n) for i, n in enumerate(arg)]
            k = tx.push_batch(items, timeout=0)
            for p in items[:k]:
                model.append((seq, p))
                seq += 1
        elif op == "rows":
            rows_n, width = arg
            rows = np.array([list(payload(seq + i, width)) for i in range(rows_n)], dtype=np.uint8)
            k = tx.push_batch(rows, timeout=0)
            for r in rows[:k]:
                model.append((seq, r.tobytes()))
                seq += 1
        elif op == "reserve":
            size, keep = arg
            keep = min(keep, size)
            try:
                with tx.reserve(size, timeout=0) as buf:
                    buf[:] = seq % 256
                    tx.commit_len(keep)
            except TimeoutError:
                continue
            model.append((seq, payload(seq, keep)))
            assert tx.last_seq == seq
            seq += 1
        elif op == "pop":
            item = rx.try_pop()
            if not model:
                assert item is None
            else:
                assert item is not None
                assert (item.seq, item.tobytes()) == model.popleft()
                held.append(item)
        elif op == "pop_batch":
            b = rx.pop_batch(arg, timeout=0)
            assert len(b) <= min(arg, len(model))
            if model:
                assert len(b) >= 1
            for item in b:
                assert (item.seq, item.tobytes()) == model.popleft()
            held.append(b)
        elif op == "release_oldest" and held:
            held.pop(0).release()
        elif op == "release_newest" and held:
            held.pop().release()
    for h in held:
        h.release()
    while model:
        with rx.pop(timeout=1) as item:
            assert (item.seq, item.tobytes()) == model.popleft()
    assert rx.try_pop() is None
    stats = tx.stats()
    assert stats["head"] == stats["tail"] and stats["next_seq"] == seq
    tx.free()
