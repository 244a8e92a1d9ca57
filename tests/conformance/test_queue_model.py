"""Property-based: random push/pop/release sequences against a plain model, on every access pair (shm)."""

from __future__ import annotations

import collections

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grafos_fabric as gf

ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 1500)),
        st.tuples(st.just("batch"), st.lists(st.integers(1, 300), min_size=1, max_size=20)),
        st.tuples(st.just("pop"), st.just(0)),
        st.tuples(st.just("pop_batch"), st.integers(1, 16)),
        st.tuples(st.just("release_oldest"), st.just(0)),
        st.tuples(st.just("release_newest"), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=ops)
def test_random_operations_match_a_fifo_model(make_pair, program):
    tx, rx = make_pair(capacity=4096)
    model: collections.deque[tuple[int, bytes]] = collections.deque()
    held: list = []
    next_seq = 0
    for op, arg in program:
        if op == "push":
            payload = bytes([next_seq % 256]) * arg
            if tx.try_push(payload):
                model.append((next_seq, payload))
                next_seq += 1
        elif op == "batch":
            payloads = [bytes([(next_seq + i) % 256]) * n for i, n in enumerate(arg)]
            k = tx.push_batch(payloads, timeout=0)
            assert 0 <= k <= len(payloads)
            for p in payloads[:k]:
                model.append((next_seq, p))
                next_seq += 1
        elif op == "pop":
            item = rx.try_pop()
            if not model:
                assert item is None
            else:
                assert item is not None
                seq, payload = model.popleft()
                assert (item.seq, item.tobytes()) == (seq, payload)
                held.append(item)
        elif op == "pop_batch":
            b = rx.pop_batch(arg, timeout=0)
            assert len(b) <= min(arg, len(model))
            if model:
                assert len(b) >= 1
            for item in b:
                seq, payload = model.popleft()
                assert (item.seq, item.tobytes()) == (seq, payload)
            held.append(b)
        elif op == "release_oldest" and held:
            held.pop(0).release()
        elif op == "release_newest" and held:
            held.pop().release()
    for h in held:
        h.release()
    while model:
        seq, payload = model.popleft()
        item = rx.pop(timeout=1)
        assert (item.seq, item.tobytes()) == (seq, payload)
        item.release()
    assert rx.try_pop() is None
    tx.free()


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_decode_as_a_locator_except_with_typed_errors(data):
    try:
        gf.QueueLocator.from_bytes(data)
    except (gf.errors.Corrupted, gf.errors.VersionMismatch):
        pass


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 200), byte=st.integers(0, 255))
def test_any_single_byte_change_to_a_locator_is_detected(pos, byte):
    from grafos_fabric.drivers.base import RegionRef

    loc = gf.QueueLocator(RegionRef("shm", "abcd", 8192, "ff" * 16, 3, namespace="ns"), 4096, 2032, 2, 10)
    raw = bytearray(bytes(loc))
    pos %= len(raw)
    if raw[pos] == byte:
        return
    raw[pos] = byte
    try:
        gf.QueueLocator.from_bytes(bytes(raw))
    except (gf.errors.Corrupted, gf.errors.VersionMismatch):
        return
    raise AssertionError("a corrupted locator decoded without error")
