"""White-box tests of the futex protocol (native/gf_ring.h, "Blocking"): a sleeper
bumps the futex word before it sleeps, and the other side wakes only when the word
moved since its own last wake, so one sleep costs one wake syscall however many
items are published (or released) before the sleeper runs again, and no sleep that
starts after a wake is ever missed."""

from __future__ import annotations

import threading
import time

import grafos_fabric as gf
from grafos_fabric._ffi import ffi, lib

DATA_FUTEX = int(ffi.offsetof("gf_ring_header", "data_futex"))
DATA_WAITERS = int(ffi.offsetof("gf_ring_header", "data_waiters"))
SPACE_FUTEX = int(ffi.offsetof("gf_ring_header", "space_futex"))
SPACE_WAITERS = int(ffi.offsetof("gf_ring_header", "space_waiters"))
SPACE_WANT = int(ffi.offsetof("gf_ring_header", "space_want"))


def _word(view, off: int, n: int) -> int:
    return int.from_bytes(view[off : off + n], "little")


def _set(view, off: int, n: int, v: int) -> None:
    view[off : off + n] = (v % (1 << (8 * n))).to_bytes(n, "little")


def _pair(fabric, capacity: int = 1 << 16):
    q = gf.FabricQueue.create(fabric, capacity=capacity, ttl=60)
    loc = q.locator()
    tx, rx = gf.FabricQueue.attach(fabric, loc), gf.FabricQueue.attach(fabric, loc)
    return q, tx, rx, q.region.view()


def test_a_sleeping_consumer_costs_the_producer_one_wake_not_one_per_publish(fabric):
    q, tx, rx, view = _pair(fabric)
    tx.push(b"x")  # the producer role is claimed
    # what gf_wait_data does before it sleeps: count itself, bump the futex word
    _set(view, DATA_WAITERS, 8, 1)
    slept = _word(view, DATA_FUTEX, 4) + 1
    _set(view, DATA_FUTEX, 4, slept)
    for _ in range(100):  # the sleeper has not run yet: it is still counted
        tx.push(b"y" * 64)
    assert _word(view, DATA_FUTEX, 4) == (slept + 1) % (1 << 32)  # one wake, not 100
    # a new sleep (the word moves again) is woken by the next publish
    _set(view, DATA_FUTEX, 4, slept + 2)
    tx.push(b"z")
    assert _word(view, DATA_FUTEX, 4) == (slept + 3) % (1 << 32)
    _set(view, DATA_WAITERS, 8, 0)
    for h in (tx, rx, q):
        h.close()


def test_a_sleeping_producer_costs_the_consumer_one_wake_not_one_per_release(fabric):
    q, tx, rx, view = _pair(fabric)
    for _ in range(50):
        tx.push(b"a" * 32)
    with rx.pop(timeout=1) as item:  # the consumer role is claimed
        assert item.tobytes() == b"a" * 32
    _set(view, SPACE_WANT, 8, 0)  # every release reaches what the sleeper asked for
    _set(view, SPACE_WAITERS, 8, 1)
    slept = _word(view, SPACE_FUTEX, 4) + 1
    _set(view, SPACE_FUTEX, 4, slept)
    for _ in range(40):
        item = rx.pop(timeout=1)
        item.release()
    assert _word(view, SPACE_FUTEX, 4) == (slept + 1) % (1 << 32)  # one wake, not 40
    _set(view, SPACE_FUTEX, 4, slept + 2)  # a new sleep
    rx.pop(timeout=1).release()
    assert _word(view, SPACE_FUTEX, 4) == (slept + 3) % (1 << 32)
    _set(view, SPACE_WAITERS, 8, 0)
    for h in (tx, rx, q):
        h.close()


def test_a_consumer_that_sleeps_again_right_after_a_wake_is_woken_by_the_next_publish(fabric):
    """The case a wake-once scheme can lose: the producer's last wake left the word as it
    is, and a new sleep starts. The native wait sleeps with a long timeout here (no
    Python wait slices to hide a lost wake): it must come back woken (0), not timed out."""
    q, tx, rx, view = _pair(fabric)
    tx.push(b"first")
    rx.pop(timeout=1).release()  # both roles claimed; the ring is empty
    c = rx._cons
    for round_ in range(3):
        before = _word(view, DATA_FUTEX, 4)
        out: list[int] = []
        t = threading.Thread(target=lambda out=out: out.append(int(lib.gf_wait_data(c, 60_000_000_000, 0))))
        t.start()
        give_up = time.monotonic() + 30
        while _word(view, DATA_FUTEX, 4) == before and time.monotonic() < give_up:
            time.sleep(0.001)  # until it bumped the word: it sleeps, or is about to
        tx.push(b"r%d" % round_)
        t.join(30)
        assert not t.is_alive(), "the sleeper was never woken"
        assert out == [0]  # woken, not timed out
        with rx.pop(timeout=1) as item:
            assert item.tobytes() == b"r%d" % round_
    for h in (tx, rx, q):
        h.close()
