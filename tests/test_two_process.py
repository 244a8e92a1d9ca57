"""Producer and consumer in separate (spawned) processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E

CTX = mp.get_context("spawn")


def _consumer(url: str, loc: bytes, n: int, out: mp.Queue, batch: bool) -> None:
    q = gf.FabricQueue.attach(gf.open_fabric(url), loc)
    seqs: list[int] = []
    checksum = 0
    while len(seqs) < n:
        if batch:
            with q.pop_batch(512, timeout=10) as b:
                seqs.extend(int(s) for s in b.seqs)
                checksum += sum(int(np.asarray(it).sum()) for it in b)
        else:
            with q.pop(timeout=10) as item:
                seqs.append(item.seq)
                checksum += int(np.asarray(item).sum())
    out.put((seqs == list(range(n)), checksum))


def _producer(url: str, loc: bytes, n: int) -> None:
    q = gf.FabricQueue.attach(gf.open_fabric(url), loc)
    for i in range(n):
        q.push(bytes([i % 251]) * (1 + i % 300), timeout=10)


@pytest.mark.parametrize("batch", [False, True])
def test_items_cross_processes_in_order_and_intact(fabric, batch):
    n = 20_000
    q = gf.FabricQueue.create(fabric, capacity=1 << 16, ttl=60)
    loc = bytes(q.locator())
    out: mp.Queue = CTX.Queue()
    cons = CTX.Process(target=_consumer, args=(fabric.url, loc, n, out, batch))
    cons.start()
    for i in range(n):
        q.push(bytes([i % 251]) * (1 + i % 300), timeout=10)
    in_order, checksum = out.get(timeout=60)
    cons.join(10)
    assert in_order
    assert checksum == sum((i % 251) * (1 + i % 300) for i in range(n))


def test_consumer_in_this_process_reads_a_producer_in_another(fabric):
    n = 5000
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=60)
    prod = CTX.Process(target=_producer, args=(fabric.url, bytes(q.locator()), n))
    prod.start()
    for i in range(n):
        with q.pop(timeout=10) as item:
            assert item.seq == i
            assert item.tobytes() == bytes([i % 251]) * (1 + i % 300)
    prod.join(10)
    assert prod.exitcode == 0


def _blocked_pop(url: str, loc: bytes, out: mp.Queue) -> None:
    q = gf.FabricQueue.attach(gf.open_fabric(url), loc)
    out.put("attached")
    try:
        q.pop(timeout=600)  # far past the test's wait for the answer: only the revoke can end it in time
        out.put("popped")
    except E.Revoked:
        out.put("revoked")
    except Exception as exc:  # pragma: no cover - reported to the test
        out.put(repr(exc))


def test_revoke_in_one_process_wakes_a_blocked_consumer_in_another_with_revoked(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=60)
    out: mp.Queue = CTX.Queue()
    p = CTX.Process(target=_blocked_pop, args=(fabric.url, bytes(q.locator()), out))
    p.start()
    assert out.get(timeout=60) == "attached"  # a loaded machine may take long to spawn
    time.sleep(0.3)  # let it block in pop
    q.lease.revoke()
    assert out.get(timeout=120) == "revoked"  # woken by the revoke, not by its 600 s timeout
    p.join(5)


def _push_forever(url: str, loc: bytes, ready: mp.Event) -> None:
    q = gf.FabricQueue.attach(gf.open_fabric(url), loc)
    ready.set()
    i = 0
    while True:
        q.push(i.to_bytes(8, "little"), timeout=30)
        i += 1


def test_killed_producer_leaves_a_consistent_ring(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=60)
    ready = CTX.Event()
    p = CTX.Process(target=_push_forever, args=(fabric.url, bytes(q.locator()), ready))
    p.start()
    ready.wait(10)
    seen = 0
    for _ in range(500):
        with q.pop(timeout=10) as item:
            assert int.from_bytes(item.tobytes(), "little") == item.seq == seen
            seen += 1
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    while True:  # everything published before the kill is intact and in order
        item = q.try_pop()
        if item is None:
            break
        assert int.from_bytes(item.tobytes(), "little") == item.seq == seen
        seen += 1
        item.release()
    assert seen >= 500
    # a new producer takes over with a higher epoch and continues the sequence
    successor = gf.FabricQueue.attach(fabric, q.locator(), epoch=q.epoch + 1)
    assert successor.push(b"after the crash") == seen
    assert q.pop(timeout=1).tobytes() == b"after the crash"


@pytest.mark.stress
def test_stress_millions_of_small_items_in_batches_across_processes(fabric):
    n = 2_000_000
    q = gf.FabricQueue.create(fabric, capacity=1 << 20, ttl=120)
    out: mp.Queue = CTX.Queue()
    cons = CTX.Process(target=_consumer_batched_count, args=(fabric.url, bytes(q.locator()), n, out))
    cons.start()
    rows = np.zeros((4096, 64), dtype=np.uint8)
    sent = 0
    while sent < n:
        k = min(4096, n - sent)
        rows[:k, :8] = np.arange(sent, sent + k, dtype="<u8").view(np.uint8).reshape(k, 8)
        sent += q.push_batch(rows[:k], timeout=30)
    ok, count = out.get(timeout=120)
    cons.join(10)
    assert ok and count == n


def _consumer_batched_count(url: str, loc: bytes, n: int, out: mp.Queue) -> None:
    q = gf.FabricQueue.attach(gf.open_fabric(url), loc)
    count = 0
    ok = True
    while count < n:
        with q.pop_batch(8192, timeout=30) as b:
            ids = b.array()[:, :8].copy().view("<u8").ravel()
            ok &= bool(np.array_equal(ids, b.seqs)) and int(b.seqs[0]) == count
            count += len(b)
    out.put((ok, count))


def _pop_some_and_die(url: str, loc: bytes, n: int) -> None:
    q = gf.FabricQueue.attach(gf.open_fabric(url), loc)
    held = [q.pop(timeout=10) for _ in range(n)]  # popped, never released
    assert len(held) == n
    os._exit(0)  # no close(): the consumer role is left behind


def test_a_consumer_that_died_holding_the_role_is_replaced_and_nothing_is_lost(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=60)
    for i in range(10):
        q.push(i.to_bytes(4, "little"))
    p = CTX.Process(target=_pop_some_and_die, args=(fabric.url, bytes(q.locator()), 4))
    p.start()
    p.join(20)
    assert p.exitcode == 0
    assert q.stats()["consumer"]  # the dead process still holds the role
    with pytest.raises(E.RoleTaken):
        gf.FabricQueue.attach(fabric, q.locator()).try_pop()  # not without asking
    successor = gf.FabricQueue.attach(fabric, q.locator(), take_over=True)
    got = [successor.pop(timeout=1).seq for _ in range(10)]
    assert got == list(range(10))  # the dead consumer's unreleased items come again


def test_a_live_consumer_in_another_process_keeps_its_role(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=60)
    out: mp.Queue = CTX.Queue()
    p = CTX.Process(target=_blocked_pop, args=(fabric.url, bytes(q.locator()), out))
    p.start()
    assert out.get(timeout=60) == "attached"  # a loaded machine may take long to spawn
    deadline = time.monotonic() + 30
    while not q.stats()["consumer"]:  # its pop claims the role
        assert time.monotonic() < deadline, "the other process never claimed the consumer role"
        time.sleep(0.01)
    other = gf.FabricQueue.attach(fabric, q.locator(), take_over=True)
    with pytest.raises(E.RoleTaken):
        other.try_pop()  # a live holder keeps its role, take_over or not
    q.push(b"for the live consumer")
    assert out.get(timeout=30) == "popped"
    p.join(5)
