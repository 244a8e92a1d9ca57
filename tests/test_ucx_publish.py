"""UCX ``publish``: the one-sided producer's records, sequence word and tail CAS in one call.

The CAS is posted right after the puts, ordered behind them by ``ucp_worker_fence``
(``publish_order = 0``), or after a flush that is waited for (``publish_order = 1``). These
tests check the ordering the ring protocol needs: at the node, the CAS must see the bytes
the puts carried, every time; a CAS that overtook a put would find the old word."""

from __future__ import annotations

import mmap
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric.drivers import ucx
from grafos_fabric.errors import CapacityExceeded, FabricValueError, QueueClosed

needs_ucx = pytest.mark.skipif(ucx.available() is not None, reason=f"UCX unavailable: {ucx.available()}")
pytestmark = needs_ucx

SECRET = secrets.token_bytes(32)
N = 256 << 10  # bytes per publication's records


@pytest.fixture(params=["tcp", "sm,tcp"])
def fabric(request: pytest.FixtureRequest) -> Iterator[Any]:
    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer

    tls = request.param
    reg = ucx.UcxRegistrar(8 << 20, host="127.0.0.1", tls=tls, net_devices="lo", progress="busy")
    node = NodeServer(reg, load_policy(SECRET), port=0).start()
    f = ucx.UcxFabric("127.0.0.1", node.port, secret=SECRET, tls=tls, net_devices="lo")
    try:
        yield f
    finally:
        f.close()
        node.close()


def _local(nbytes: int) -> tuple[np.ndarray[Any, Any], int, mmap.mmap]:
    mm = mmap.mmap(-1, nbytes)
    arr = np.frombuffer(mm, dtype=np.uint8)
    return arr, arr.ctypes.data, mm


@pytest.mark.parametrize("order", [0, 1], ids=["fence", "flush"])
def test_the_tail_cas_sees_the_records_and_the_sequence_word_every_time(fabric: Any, order: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """300 publications of 256 KiB, half of them split in two spans (the wrap): each CAS
    compares against a word that only that publication's put carries (the last word of the
    records, or the sequence word), so it succeeds only if it ran after the put landed."""
    monkeypatch.setattr(ucx.UcxRegion, "publish_order", order)
    r = fabric.alloc(4 * N, ttl=600.0)
    try:
        buf, addr, _mm = _local(2 * N)
        words = buf.view(np.uint64)
        seq_off = 3 * N
        for i in range(1, 301):
            marker = (i << 8) | 0x5A
            words[:] = i
            if i % 2:  # one span; the CAS on the records' last word
                words[N // 8 - 1] = marker
                found, _ = r.publish([(addr, N, 0)], seq_off, i, N - 8, marker, marker | 1)
                assert found == marker, f"publication {i}: the CAS ran before the put landed ({found:#x})"
                assert r.load64(N - 8) == marker | 1
            else:  # two spans (as at the ring's wrap); the CAS on the sequence word
                spans = [(addr + N // 2, N // 2, N), (addr, N // 2, 2 * N)]
                found, _ = r.publish(spans, seq_off, i, seq_off, i, i | 1 << 63)
                assert found == i, f"publication {i}: the CAS ran before the sequence word landed ({found:#x})"
                assert r.load64(seq_off) == i | 1 << 63
        back = bytearray(N // 2)
        r.read_into(2 * N, back)
        assert np.frombuffer(back, np.uint64).tolist() == [300] * (N // 16)
    finally:
        r.close()


def test_a_failed_compare_changes_nothing_but_the_records_land(fabric: Any) -> None:
    r = fabric.alloc(2 * N, ttl=600.0)
    try:
        buf, addr, _mm = _local(N)
        buf[:] = 7
        r.store64(N + 8, 40)
        assert r.publish([(addr, N, 0)], N, 99, N + 8, 41, 50) == (40, -1)  # compare fails: returns the word
        assert r.load64(N + 8) == 40
        assert r.load64(N) == 99
        r.store64(N + 16, 12345)  # a head word: read after the CAS, returned with the tail word found
        assert r.publish([(addr, 64, 0)], N, 100, N + 8, 40, 41, N + 16) == (40, 12345)
        assert r.load64(N + 8) == 41
        back = bytearray(N)
        r.read_into(0, back)
        assert bytes(back) == bytes([7]) * N
    finally:
        r.close()


def test_bad_ranges_alignment_and_a_closed_region_fail_typed(fabric: Any) -> None:
    r = fabric.alloc(N, ttl=600.0)
    _buf, addr, _mm = _local(N)
    with pytest.raises(CapacityExceeded):
        r.publish([(addr, N, 8)], 0, 1, 8, 0, 1)  # records past the end
    with pytest.raises(CapacityExceeded):
        r.publish([(addr, 64, 0), (addr, 64, N - 32)], 0, 1, 8, 0, 1)  # the second span past the end
    with pytest.raises(CapacityExceeded):
        r.publish([(addr, 64, 0)], N, 1, 8, 0, 1)  # the sequence word past the end
    with pytest.raises(FabricValueError):
        r.publish([(addr, 64, 0)], 12, 1, 16, 0, 1)  # an unaligned sequence word
    with pytest.raises(FabricValueError):
        r.publish([(addr, 64, 0)], 8, 1, 20, 0, 1)  # an unaligned tail word
    with pytest.raises(FabricValueError):
        r.publish([(addr, 8, 64)] * 65, 8, 1, 16, 0, 1)  # more spans than one call takes
    with pytest.raises(FabricValueError):
        r.publish([(addr, 64, 0)], 8, 1, 16, 0, 1, 36)  # an unaligned head word
    with pytest.raises(CapacityExceeded):
        r.publish([(addr, 64, 0)], 8, 1, 16, 0, 1, N)  # the head word past the end
    assert r.load64(8) == 0  # none of them wrote anything
    r.close()
    with pytest.raises(QueueClosed):
        r.publish([(addr, 64, 0)], 8, 1, 16, 0, 1)


def test_a_one_sided_producer_publishes_each_push_in_one_call(fabric: Any) -> None:
    """The queue's producer uses ``publish`` where the region has it: one call per push (no
    separate write, store64 or cas64), and the items come out whole and in order."""
    q = gf.FabricQueue.create(fabric, capacity=1 << 20, ttl=600.0)
    tx = gf.FabricQueue.attach(fabric, bytes(q.locator()), mapped=False)
    rx = gf.FabricQueue.attach(fabric, bytes(q.locator()), mapped=False)
    calls: dict[str, int] = {}
    region = tx.region
    for name in ("publish", "write", "store64", "cas64"):
        method = getattr(region, name)

        def counted(*a: Any, _m: Any = method, _n: str = name) -> Any:
            calls[_n] = calls.get(_n, 0) + 1
            return _m(*a)

        setattr(region, name, counted)
    try:
        tx.push(b"x" * 100)  # claims the producer role (its own operations), then publishes
        calls.clear()
        for i in range(50):
            tx.push(bytes([i]) * (1000 + i))
        assert calls == {"publish": 50}
        assert tx.push_batch(np.full((8, 4096), 3, np.uint8)) == 8
        assert calls == {"publish": 51}
        assert bytes(rx.pop(timeout=5.0)) == b"x" * 100
        for i in range(50):
            it = rx.pop(timeout=5.0)
            assert bytes(it) == bytes([i]) * (1000 + i)
            it.release()
        b = rx.pop_batch(8, timeout=5.0)
        assert len(b) == 8 and int(b.array().sum()) == 3 * 8 * 4096
        b.release()
    finally:
        tx.close()
        rx.close()
        q.free()


def test_big_items_go_out_from_the_callers_memory_and_come_out_whole(fabric: Any) -> None:
    """Items of 64 KiB and more are not copied into the staging image: ``publish`` gets a span
    whose address is the item's own (push) or the row's (push_batch), the headers and tail
    padding from the staging image; across many wraps of a 1 MiB ring, with odd sizes (tail
    padding) and small items (framed with a copy) between them, every item comes out whole."""
    q = gf.FabricQueue.create(fabric, capacity=1 << 20, ttl=600.0)
    tx = gf.FabricQueue.attach(fabric, bytes(q.locator()), mapped=False)
    rx = gf.FabricQueue.attach(fabric, bytes(q.locator()), mapped=False)
    region = tx.region
    seen: list[list[tuple[int, int, int]]] = []
    publish = region.publish

    def spy(spans: list[tuple[int, int, int]], *rest: Any) -> Any:
        seen.append(list(spans))
        return publish(spans, *rest)

    region.publish = spy
    rng = np.random.default_rng(7)
    try:
        for i in range(40):
            n = (64 << 10) + int(rng.integers(0, 200_000)) if i % 4 else 1000 + i  # every 4th small
            item = rng.integers(0, 256, n, dtype=np.uint8)
            seen.clear()
            tx.push(item, timeout=5.0)
            (spans,) = seen
            direct = any(a == item.ctypes.data and m == n for a, m, _ in spans)
            assert direct == (n >= 64 << 10), spans  # small items are copied into the staging image
            got = rx.pop(timeout=5.0)
            assert bytes(got) == item.tobytes(), f"item {i} ({n} bytes) came out changed"
            got.release()
        big = rng.integers(0, 256, (6, 90_000), dtype=np.uint8)
        for batch in (big, big[::2], big[1:4]):  # contiguous rows, rows with a stride, an offset view
            seen.clear()
            assert tx.push_batch(batch, timeout=5.0) == len(batch)
            addrs = {a for spans in seen for a, _, _ in spans}
            assert all(batch[r].ctypes.data in addrs for r in range(len(batch)))  # each from its own memory
            for r in range(len(batch)):
                got = rx.pop(timeout=5.0)
                assert bytes(got) == batch[r].tobytes()
                got.release()
    finally:
        region.publish = publish
        tx.close()
        rx.close()
        q.free()


# ---------------------------------------------------------------------------
# write-behind (OneSidedQueue.set_write_behind)
# ---------------------------------------------------------------------------


def _pair(fabric: Any, capacity: int = 1 << 20) -> tuple[Any, Any, Any]:
    q = gf.FabricQueue.create(fabric, capacity=capacity, ttl=600.0)
    tx = gf.FabricQueue.attach(fabric, bytes(q.locator()), mapped=False)
    rx = gf.FabricQueue.attach(fabric, bytes(q.locator()), mapped=False)
    return q, tx, rx


def test_write_behind_keeps_one_publication_in_flight_and_every_item_comes_out(fabric: Any) -> None:
    """A push returns with its CAS in flight (one at most), the buffer reusable at once: the
    item comes out as it was when pushed, big (sent from the caller's memory) or small."""
    q, tx, rx = _pair(fabric)
    tx.set_write_behind()
    rng = np.random.default_rng(3)
    buf = np.zeros(200_000, np.uint8)
    sent: list[bytes] = []
    try:
        for i in range(60):
            n = 100 + i if i % 3 == 0 else 70_000 + 1000 * i
            buf[:n] = rng.integers(0, 256, n, dtype=np.uint8)
            tx.push(buf[:n], timeout=5.0)
            sent.append(buf[:n].tobytes())
            buf[:n] = 0xEE  # reused at once: what went out must be what was there at push time
            assert len(tx._inflight) <= 1
            if i % 5 == 4:  # the consumer keeps up every few items
                tx.flush()
                assert not tx._inflight
                while sent:
                    got = rx.pop(timeout=5.0)
                    assert bytes(got) == sent.pop(0)
                    got.release()
        rows = rng.integers(0, 256, (5, 100_000), dtype=np.uint8)
        assert tx.push_batch(rows, timeout=5.0) == 5
        tx.flush()
        for r in range(5):
            got = rx.pop(timeout=5.0)
            assert bytes(got) == rows[r].tobytes()
            got.release()
        tx.set_write_behind(False)
        tx.push(b"synchronous again", timeout=5.0)
        assert not tx._inflight
        assert bytes(rx.pop(timeout=5.0)) == b"synchronous again"
    finally:
        tx.close()
        rx.close()
        q.free()


def test_a_deeper_write_behind_leaves_that_many_in_flight_and_loses_nothing(fabric: Any) -> None:
    """``set_write_behind(depth=3)``: up to three publications stay unconfirmed after a push
    (their CASes chained, each expecting the one before), everything comes out in order;
    lowering the depth confirms the excess at once; a bad depth is a typed error."""
    from grafos_fabric.queue._onesided_push import WRITE_BEHIND_MAX_DEPTH

    q, tx, rx = _pair(fabric)
    for bad in (0, WRITE_BEHIND_MAX_DEPTH + 1, 1.5, True):
        with pytest.raises(gf.errors.FabricValueError):
            tx.set_write_behind(depth=bad)
    tx.set_write_behind(depth=3)
    try:
        seen = 0
        for i in range(12):
            tx.push(bytes([i]) * 70_000, timeout=5.0)
            seen = max(seen, len(tx._inflight))
            assert len(tx._inflight) <= 3
        assert seen == 3  # the depth is used, not just allowed
        tx.set_write_behind(depth=1)  # the excess is confirmed now
        assert len(tx._inflight) <= 1
        tx.flush()
        for i in range(12):
            got = rx.pop(timeout=5.0)
            assert bytes(got) == bytes([i]) * 70_000
            got.release()
    finally:
        tx.close()
        rx.close()
        q.free()


def test_close_confirms_what_write_behind_left_in_flight(fabric: Any) -> None:
    q, tx, rx = _pair(fabric)
    tx.set_write_behind()
    tx.push(b"a" * 90_000, timeout=5.0)
    tx.push(b"b" * 90_000, timeout=5.0)
    assert len(tx._inflight) == 1
    tx.close()  # confirms the last one before giving the producer role back
    assert bytes(rx.pop(timeout=5.0)) == b"a" * 90_000
    assert bytes(rx.pop(timeout=5.0)) == b"b" * 90_000
    rx.close()
    q.free()


def test_a_seal_under_write_behind_raises_at_confirmation_and_on_every_later_call(fabric: Any) -> None:
    """The consumer seals the queue while a publication is in flight: its CAS finds the sealed
    tail word, so the next push (or flush) raises QueueSealed, and every later one too; what
    was confirmed before the seal comes out, what was not is not in the queue."""
    q, tx, rx = _pair(fabric)
    tx.set_write_behind()
    try:
        tx.push(b"confirmed", timeout=5.0)
        tx.flush()
        tx.push(b"in flight", timeout=5.0)  # posted; its CAS is confirmed by the next call
        assert len(tx._inflight) == 1
        assert rx.seal() is True
        # the CAS of the publication in flight may have run before or after the seal: either it is
        # in the queue (before the seal) or the next call raises
        try:
            tx.push(b"after the seal", timeout=5.0)
            tx.flush()
        except gf.errors.QueueSealed:
            pass
        with pytest.raises(gf.errors.QueueSealed):
            tx.push(b"later", timeout=5.0)
        with pytest.raises(gf.errors.QueueSealed):
            tx.flush()
        assert not tx._inflight
        got = []
        with pytest.raises(gf.errors.QueueSealed):  # sealed and drained, after what was confirmed
            while True:
                got.append(bytes(rx.pop(timeout=5.0)))
        assert got[0] == b"confirmed" and set(got[1:]) <= {b"in flight"}
    finally:
        tx.close()
        rx.close()
        q.free()


def test_write_behind_is_refused_where_the_region_cannot_post_a_publication(tmp_path: Any) -> None:
    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer
    from grafos_fabric.drivers.node.shmfile import NodeShmFabric, ShmFileRegistrar

    node = NodeServer(ShmFileRegistrar(4 << 20), load_policy(SECRET), port=0).start()
    f = NodeShmFabric("127.0.0.1", node.port, secret=SECRET)
    try:
        q = gf.FabricQueue.create(f, capacity=1 << 16, ttl=60.0)
        tx = gf.FabricQueue.attach(f, bytes(q.locator()), mapped=False)
        with pytest.raises(gf.errors.Unsupported):
            tx.set_write_behind()
        tx.push(b"still synchronous", timeout=5.0)
        tx.flush()  # nothing in flight: returns at once
        tx.close()
        q.free()
    finally:
        f.close()
        node.close()


def test_a_publication_posted_into_a_sealed_queue_fails_at_flush_and_nothing_of_it_comes_out(fabric: Any) -> None:
    q, tx, rx = _pair(fabric)
    tx.set_write_behind()
    try:
        tx.push(b"before", timeout=5.0)
        tx.flush()
        assert rx.seal() is True
        tx.push(b"x" * 80_000, timeout=5.0)  # write-behind makes no owner check: posted, not confirmed
        with pytest.raises(gf.errors.QueueSealed) as first:
            tx.flush()
        assert first.value.__cause__ is not None  # raised again from the stored error
        with pytest.raises(gf.errors.QueueSealed) as again:
            tx.flush()
        assert again.value is not first.value and again.value.seal_seq == first.value.seal_seq
        for call in (lambda: tx.push(b"y", timeout=5.0), tx.flush, lambda: tx.push_batch(np.ones((2, 8), np.uint8))):
            with pytest.raises(gf.errors.QueueSealed):
                call()
        assert bytes(rx.pop(timeout=5.0)) == b"before"
        with pytest.raises(gf.errors.QueueSealed):
            rx.pop(timeout=5.0)
    finally:
        tx.close()
        rx.close()
        q.free()


def test_the_head_read_with_each_publication_keeps_the_producer_from_loading_head(fabric: Any) -> None:
    """Six times round a 64 KiB ring with the consumer keeping up: the producer's only load per
    push is its owner check (the tail word); its head cache comes from the head word each
    publication reads after its CAS, so it never stops to load head itself."""
    q, tx, rx = _pair(fabric, capacity=1 << 16)
    loads: list[int] = []
    load64 = tx.region.load64
    try:
        tx.push(b"first", timeout=5.0)  # claims the producer role (loads of its own)
        assert bytes(rx.pop(timeout=5.0)) == b"first"

        def counted(off: int) -> int:
            loads.append(off)
            return load64(off)

        tx.region.load64 = counted
        for i in range(100):
            tx.push(bytes([i]) * 4000, timeout=5.0)
            got = rx.pop(timeout=5.0)
            assert bytes(got) == bytes([i]) * 4000
            got.release()
        assert len(loads) == 100 and len(set(loads)) == 1  # one word, the tail: the owner check
    finally:
        tx.region.load64 = load64
        tx.close()
        rx.close()
        q.free()
