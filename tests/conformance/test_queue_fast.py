"""The single-item fast path of a mapped handle (``_item.QueueBase`` + ``Fast``,
native/gf_item.c): ``push``/``try_push``/``pop``/``try_pop`` are one native call
in the common case and fall back to the Python path for everything else. These
pin that the fast path keeps every semantic of the Python path: closed, freed and
forked handles, typed errors, leases, fences, seals, threads, item lifetime.

Every test first *warms* the fast path (the roles claimed, the prefetch filled),
so the call under test really goes through it; ``_warm`` checks that it did.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric._item import QueueBase

WAIT = 60.0


def _warm(q: Any, n: int = 4) -> list[Any]:
    """Push n items and pop one: both roles claimed, n - 1 records prefetched natively."""
    for i in range(n):
        q.push(b"warm %d" % i)
    first = q.pop(timeout=WAIT)
    assert q._fast is not None and q._pf_it is q._fast, "the native fast path is not in use"
    assert q._fast.pending == n - 1
    return [first]


@pytest.fixture
def q(fabric: Any) -> Any:
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT)
    yield q
    q.close()


def test_single_item_calls_are_the_native_methods_on_a_mapped_handle(q):
    assert type(q).push is QueueBase.push and type(q).try_pop is QueueBase.try_pop
    held = _warm(q)
    assert q.try_push(b"x") is True
    seq = q.push(b"y", timeout=1.0)
    assert isinstance(seq, int)
    got = [q.try_pop().tobytes() for _ in range(3)] + [q.pop(timeout=0.5).tobytes(), q.pop().tobytes()]
    assert got == [b"warm 1", b"warm 2", b"warm 3", b"x", b"y"]
    assert q.try_pop() is None
    held[0].release()


@pytest.mark.parametrize("op", ["push", "try_push", "pop", "try_pop"])
def test_a_fast_call_after_close_raises_queue_closed(q, op):
    _warm(q)
    q.close()
    call = {
        "push": lambda: q.push(b"late"),
        "try_push": lambda: q.try_push(b"late"),
        "pop": lambda: q.pop(timeout=0),
        "try_pop": lambda: q.try_pop(),
    }[op]
    with pytest.raises(E.QueueClosed):
        call()


@pytest.mark.parametrize("op", ["push", "try_pop"])
def test_a_fast_call_after_free_raises_queue_freed(q, op):
    _warm(q)
    q.free()
    with pytest.raises(E.QueueFreed):
        q.push(b"late") if op == "push" else q.try_pop()


def test_close_counts_the_native_prefetch_and_the_next_handle_reads_it_again(fabric, q):
    held = _warm(q, 5)  # 4 records prefetched natively, never handed out
    q.close()
    held[0].release()
    rx = gf.FabricQueue.attach(fabric, q.locator())
    assert [rx.pop(timeout=WAIT).tobytes() for _ in range(4)] == [b"warm %d" % i for i in range(1, 5)]


def test_a_forked_child_gets_forked_handle_from_every_fast_call(q):
    held = _warm(q)

    def child() -> int:
        bad = 0
        for k, op in enumerate(
            (
                lambda: q.push(b"c"),
                lambda: q.try_push(b"c"),
                lambda: q.pop(timeout=0),
                lambda: q.try_pop(),
                lambda: q.pop_array(timeout=0),
            )
        ):
            try:
                op()
                bad |= 1 << k
            except E.ForkedHandle:
                pass
            except BaseException:
                bad |= 1 << k
        return bad

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent's prefetch and roles are untouched by the child's attempts
    assert q._fast.pending == 3
    assert [q.try_pop().tobytes() for _ in range(3)] == [b"warm 1", b"warm 2", b"warm 3"]
    held[0].release()


@pytest.mark.parametrize(
    ("buf", "exc"),
    [
        ("text", E.FabricTypeError),
        (12, E.FabricTypeError),
        (object(), E.FabricTypeError),
        ([1, 2], E.FabricTypeError),
        (b"", E.FabricValueError),
        (np.arange(16, dtype=np.uint8)[::2], E.DtypeMismatch),  # not contiguous
        (np.array([object()]), E.DtypeMismatch),
        (np.zeros((4, 4), dtype=np.uint8, order="F"), E.DtypeMismatch),
        (b"x" * 20000, E.ItemTooLarge),
    ],
)
def test_bad_items_get_the_typed_error_from_the_fast_push(q, buf, exc):
    held = _warm(q)
    for call in (lambda: q.push(buf), lambda: q.try_push(buf), lambda: q.push(buf, timeout=1.0)):
        with pytest.raises(exc):
            call()
    assert q.push(b"still fine") > 0
    held[0].release()


def test_bad_timeouts_are_refused_even_when_the_fast_path_could_serve(q):
    held = _warm(q)
    with pytest.raises(E.FabricValueError):
        q.push(b"x", timeout=-1.0)
    with pytest.raises((E.FabricTypeError, E.FabricValueError)):
        q.pop(timeout="soon")
    with pytest.raises(TypeError):
        q.push(b"x", 1.0, 2.0)
    with pytest.raises(TypeError):
        q.pop(wait=1.0)
    assert q.pop(timeout=1).tobytes() == b"warm 1"  # an int timeout: the native path, same answer
    held[0].release()


def test_every_buffer_kind_goes_through_the_fast_push_as_its_bytes(q):
    held = _warm(q)
    bufs = [b"bytes", bytearray(b"bytearray"), memoryview(b"memoryview"), np.arange(5, dtype=np.uint16)]
    for b in bufs:
        q.push(b)
    got = [q.pop(timeout=WAIT).tobytes() for _ in range(3 + len(bufs))][3:]
    assert got == [bytes(memoryview(b).cast("B")) if not isinstance(b, np.ndarray) else b.tobytes() for b in bufs]
    held[0].release()


def test_a_typed_queue_pushes_through_python_and_pops_typed_items_natively(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT, dtype=np.float32)
    a = np.arange(4, dtype=np.float32)
    for k in range(3):
        q.push(a + k)
    with pytest.raises(E.DtypeMismatch):
        q.push(b"\0" * 16)
    first = q.pop(timeout=WAIT)
    assert q._fast.pending == 2
    for k, item in enumerate([first, q.try_pop(), q.pop()]):
        arr = np.asarray(item)
        assert arr.dtype == np.float32 and (arr == a + k).all()
    q.close()


def test_a_fence_is_seen_by_the_next_fast_push(fabric, q):
    held = _warm(q)
    other = gf.FabricQueue.attach(fabric, q.locator())
    other.advance_epoch(q.epoch + 1)
    with pytest.raises(E.StaleEpoch):
        q.push(b"after the fence")
    with pytest.raises(E.StaleEpoch):
        q.try_push(b"after the fence")
    held[0].release()
    other.close()


def test_a_seal_is_seen_by_the_fast_paths(q):
    held = _warm(q, 2)
    q.seal()
    with pytest.raises(E.QueueSealed):
        q.push(b"after the seal")
    assert q.try_pop().tobytes() == b"warm 1"  # what was published before the seal is still read
    with pytest.raises(E.QueueSealed):
        q.try_pop()
    with pytest.raises(E.QueueSealed):
        q.pop(timeout=0)
    held[0].release()


def test_a_revoked_lease_fails_closed_on_the_fast_paths_even_for_prefetched_records(q):
    held = _warm(q)
    q.lease.revoke()
    with pytest.raises(E.Revoked):
        q.push(b"after the revoke")
    with pytest.raises(E.Revoked):
        q.try_pop()  # a record is prefetched natively: it is not handed out
    with pytest.raises(E.Revoked):
        q.pop(timeout=0)
    held[0].release()


def test_an_expired_lease_fails_closed_on_the_fast_paths_even_for_prefetched_records(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT)  # lives through the warm-up, however slow
    held = _warm(q)
    q.lease.renew(0.5)  # then runs out soon: nothing after this needs it alive
    # wait past the lease's deadline on the native (monotonic) clock the fast path reads
    end = time.monotonic() + 30.0
    while q.lease.remaining() > 0 and time.monotonic() < end:
        time.sleep(0.05)
    assert q.lease.remaining() <= 0
    with pytest.raises(E.LeaseExpired):
        q.push(b"after expiry")
    with pytest.raises(E.LeaseExpired):
        q.try_push(b"after expiry")
    with pytest.raises(E.LeaseExpired):
        q.try_pop()  # prefetched natively before the expiry: still not handed out
    held[0].release()


def test_two_threads_popping_natively_get_every_item_exactly_once(q):
    n = 4000
    got: list[list[bytes]] = [[], []]
    stop = threading.Event()

    def popper(k: int) -> None:
        while not stop.is_set() or q._fast.pending:
            item = q.try_pop()
            if item is None:
                time.sleep(0)
                continue
            got[k].append(item.tobytes())
            item.release()

    threads = [threading.Thread(target=popper, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for i in range(n):
        q.push(b"%06d" % i, timeout=WAIT)
    end = time.monotonic() + WAIT
    while len(got[0]) + len(got[1]) < n and time.monotonic() < end:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(WAIT)
    every = got[0] + got[1]
    assert len(every) == n and sorted(every) == [b"%06d" % i for i in range(n)]
    for mine in got:  # each thread sees its items in queue order
        assert mine == sorted(mine)


def test_two_threads_pushing_natively_land_every_item_once(q):
    n = 3000
    out: list[bytes] = []

    def pusher(k: int) -> None:
        for i in range(n):
            q.push(b"%d:%06d" % (k, i), timeout=WAIT)

    threads = [threading.Thread(target=pusher, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    end = time.monotonic() + WAIT
    while len(out) < 2 * n and time.monotonic() < end:
        item = q.pop(timeout=WAIT)
        out.append(item.tobytes())
        item.release()
    for t in threads:
        t.join(WAIT)
    for k in range(2):
        mine = [x for x in out if x.startswith(b"%d:" % k)]
        assert mine == [b"%d:%06d" % (k, i) for i in range(n)]


def test_items_from_the_fast_pop_pin_the_queue_and_its_mapping(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT)
    held = _warm(q)
    item = q.try_pop()
    view = np.asarray(item)
    del q, item
    gc.collect()
    assert view.tobytes() == b"warm 1"
    assert held[0].tobytes() == b"warm 0"


def test_a_fast_pop_item_releases_its_space_only_when_released_and_its_views_are_gone(q):
    held = _warm(q, 2)
    item = q.try_pop()
    assert q._fast.pending == 0
    held[0].release()
    assert q.outstanding == 1  # this item's token (the older one is released)
    mv = memoryview(item)
    item.release()
    assert q.outstanding == 1  # a view is alive: the space is not reused yet
    assert mv.tobytes() == b"warm 1"
    del mv
    assert q.outstanding == 0


# -- the native reservation (QueueBase.reserve -> _item.Reservation) ---------------------------


def test_a_native_reservation_commits_in_place_and_sets_last_seq(q):
    held = _warm(q)
    r = q.reserve(8)
    assert type(r).__name__ == "Reservation"
    with r as buf:
        assert q._reserving and q._reserver == threading.get_ident() and q._commit_len == 8
        buf[:] = np.frombuffer(b"in place", dtype=np.uint8)
    assert not q._reserving and q._reserver is None
    seq = q.last_seq
    assert [q.try_pop() for _ in range(3)] and (item := q.try_pop()).tobytes() == b"in place" and item.seq == seq
    held[0].release()


def test_a_native_reservation_aborts_when_the_block_raises_and_commit_len_shrinks_it(q):
    _warm(q, 1)[0].release()
    with pytest.raises(KeyError):
        with q.reserve(16) as buf:
            buf[:] = 1
            raise KeyError("abort")
    with q.reserve(16) as buf:
        buf[:4] = np.frombuffer(b"abcd", dtype=np.uint8)
        q.commit_len(4)
    assert q.pop(timeout=WAIT).tobytes() == b"abcd"
    assert q.try_pop() is None and q.last_seq >= 1


def test_a_native_reservation_is_entered_once_from_any_thread_as_the_python_one(q):
    held = _warm(q)
    r = q.reserve(8)
    assert type(r).__name__ == "Reservation"
    seen: list[Any] = []

    def other() -> None:
        with r as buf:
            seen.append(q._reserver)
            buf[:] = 5

    t = threading.Thread(target=other)
    t.start()
    t.join(WAIT)
    assert seen and seen[0] not in (None, threading.get_ident())  # the reserver is the thread that entered
    with pytest.raises(E.FabricValueError):
        r.__enter__()  # entered once only
    assert [q.try_pop() for _ in range(3)] and q.try_pop().tobytes() == b"\x05" * 8
    held[0].release()


def test_a_push_inside_a_native_reservation_raises_and_one_from_another_thread_waits(q):
    _warm(q, 1)[0].release()
    done = threading.Event()
    r = q.reserve(4)
    assert type(r).__name__ == "Reservation"
    with r as buf:
        buf[:] = 7
        with pytest.raises(E.FabricValueError, match="reservation is outstanding"):
            q.push(b"inside")
        t = threading.Thread(target=lambda: (q.push(b"other", timeout=WAIT), done.set()))
        t.start()
        assert not done.wait(0.2)  # held up by the open reservation (not a timing claim: it must not finish)
    t.join(WAIT)
    assert done.is_set()
    assert [q.pop(timeout=WAIT).tobytes() for _ in range(2)] == [b"\x07" * 4, b"other"]


def test_close_during_a_native_reservation_gives_the_role_back_when_it_ends(fabric, q):
    _warm(q, 1)[0].release()
    r = q.reserve(4)
    assert type(r).__name__ == "Reservation"
    with r as buf:
        buf[:] = 1
        q.close()
        with pytest.raises(E.RoleTaken):
            gf.FabricQueue.attach(fabric, q.locator()).push(b"not yet")
    other = gf.FabricQueue.attach(fabric, q.locator())
    other.push(b"now")  # the role came back at the end of the block
    with pytest.raises(E.QueueClosed):
        q.reserve(4).__enter__()
    other.close()


def test_a_full_ring_hands_the_native_reservation_to_the_python_one(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=WAIT)
    while q.try_push(b"f" * 1000):
        pass
    with pytest.raises(TimeoutError):
        with q.reserve(1000, timeout=0.05):
            pass
    assert not q._reserving
    q.pop(timeout=WAIT).release()
    with q.reserve(1000, timeout=WAIT) as buf:  # room again: native
        buf[:] = 2
    q.close()


def test_a_native_reservation_view_pins_the_mapping_after_the_queue_is_gone(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT)
    _warm(q, 1)[0].release()
    r = q.reserve(8)
    assert type(r).__name__ == "Reservation"
    with r as buf:
        buf[:] = 3
    kept = buf
    del q
    gc.collect()
    assert kept.tolist() == [3] * 8  # the region's mapping is still there (its bytes belong to the queue)


@pytest.mark.parametrize("bad", [0, -1, 1 << 40, "8", 8.0, None])
def test_bad_reservation_sizes_get_typed_errors_on_the_native_path(q, bad):
    _warm(q)
    with pytest.raises((E.FabricTypeError, E.FabricValueError, E.ItemTooLarge)):
        with q.reserve(bad):
            pass
    assert not q._reserving


def test_a_reservation_view_kept_after_the_block_is_never_handed_out_again(q):
    _warm(q, 1)[0].release()
    kept = []
    for i in range(6):
        with q.reserve(8) as buf:
            buf[:] = i
            kept.append(buf)
    del buf
    assert len({id(k) for k in kept}) == 6  # each kept view is its own object...
    assert len({k.ctypes.data for k in kept}) == 6  # ...over its own item's bytes, which it still shows
    assert [k.tolist() for k in kept] == [[i] * 8 for i in range(6)]
    assert [q.pop(timeout=WAIT).tobytes() for _ in range(6)] == [bytes([i]) * 8 for i in range(6)]


def test_a_free_reservation_view_is_handed_out_again_over_the_next_items_bytes(q):
    _warm(q, 1)[0].release()
    seen = []
    for i in range(6):
        with q.reserve(8) as buf:
            buf[:] = i
            seen.append((id(buf), buf.ctypes.data))
    del buf
    assert len({a for _, a in seen}) == 6  # every reservation got its own bytes
    assert len({i for i, _ in seen}) <= 2  # through at most two array objects (made once, then re-pointed)
    assert [q.pop(timeout=WAIT).tobytes() for _ in range(6)] == [bytes([i]) * 8 for i in range(6)]


@pytest.mark.parametrize(
    "change",
    [
        lambda b: setattr(b.flags, "writeable", False),
        lambda b: setattr(b, "shape", (2, 4)),
        lambda b: setattr(b, "dtype", np.uint16),
    ],
    ids=["read-only", "reshaped", "retyped"],
)
def test_a_reservation_view_changed_in_its_block_is_not_handed_out_again(q, change):
    _warm(q, 1)[0].release()
    for _ in range(2):  # both cached views changed
        with q.reserve(8) as buf:
            buf[:] = 1
            change(buf)
    del buf
    with q.reserve(8) as buf:
        assert buf.shape == (8,) and buf.dtype == np.uint8 and buf.flags.writeable and buf.flags.c_contiguous
        buf[:] = 9
    assert [q.pop(timeout=WAIT).tobytes() for _ in range(3)][-1] == b"\x09" * 8


def test_a_weakly_referenced_reservation_view_is_not_handed_out_again(q):
    import weakref

    _warm(q, 1)[0].release()
    refs = []
    for _ in range(2):
        with q.reserve(8) as buf:
            buf[:] = 1
            refs.append(weakref.ref(buf))
    del buf
    with q.reserve(8) as buf:
        assert all(buf is not r() for r in refs)
        buf[:] = 2


def test_a_reservation_is_not_reused_while_someone_holds_its_bound_exit(q):
    _warm(q, 1)[0].release()
    r = q.reserve(8)
    assert type(r).__name__ == "Reservation"
    assert r.__exit__ is r.__exit__ and r.__enter__ is r.__enter__  # made once, kept
    with r as buf:
        buf[:] = 4
    ex = r.__exit__
    del r
    r2 = q.reserve(8)
    assert r2 is not ex.__self__  # a new one: the old one's __exit__ is held here
    with r2 as buf:
        buf[:] = 5
    assert ex(None, None, None) is None  # not entered: nothing happens
    assert [q.pop(timeout=WAIT).tobytes() for _ in range(2)] == [b"\x04" * 8, b"\x05" * 8]
    assert not q._reserving


def test_a_native_reservation_works_through_its_class_as_exitstack_uses_it(q):
    import contextlib

    _warm(q, 1)[0].release()
    r = q.reserve(8)
    assert type(r).__name__ == "Reservation"
    with contextlib.ExitStack() as stack:  # looks __enter__/__exit__ up on the class
        buf = stack.enter_context(r)
        buf[:] = 6
    r2 = q.reserve(8)
    buf = type(r2).__enter__(r2)
    buf[:] = 7
    assert type(r2).__exit__(r2, None, None, None) is None
    with pytest.raises(TypeError):
        type(r2).__enter__(b"not a reservation")
    assert [q.pop(timeout=WAIT).tobytes() for _ in range(2)] == [b"\x06" * 8, b"\x07" * 8]
    assert not q._reserving


def _no_slow_path(q: Any) -> list[str]:
    """Make every Python fallback of q's single-item calls record its name (and fail)."""
    took: list[str] = []

    def boom(name: str) -> Any:
        def f(*a: Any, **k: Any) -> Any:
            took.append(name)
            raise AssertionError(f"{name} ran: the native path did not serve the call")

        return f

    for name in ("_slow_push", "_slow_try_push", "_slow_pop", "_slow_try_pop", "_slow_reserve"):
        setattr(q, name, boom(name))
    return took


def test_an_int_timeout_is_served_by_the_native_path_like_a_float(q):
    held = _warm(q)
    took = _no_slow_path(q)
    assert q.push(b"int", timeout=5) > 0
    assert q.push(b"zero", timeout=0) > 0
    assert q.pop(timeout=5).tobytes() == b"warm 1"
    with q.reserve(3, timeout=7) as buf:
        buf[:] = np.frombuffer(b"res", dtype=np.uint8)
    assert took == []
    for bad in (True, -1, 1 << 70):  # a bool, a negative or a huge int: the Python path decides
        with pytest.raises(AssertionError):
            q.push(b"x", timeout=bad)
    assert took == ["_slow_push"] * 3
    del q._slow_push, q._slow_try_push, q._slow_pop, q._slow_try_pop, q._slow_reserve
    with pytest.raises((E.FabricTypeError, E.FabricValueError)):
        q.push(b"x", timeout=-1)
    with pytest.raises((E.FabricTypeError, E.FabricValueError)):
        q.push(b"x", timeout=True)
    assert [q.pop(timeout=5).tobytes() for _ in range(5)] == [b"warm 2", b"warm 3", b"int", b"zero", b"res"]
    held[0].release()


def test_the_producer_lock_is_native_and_reentrant_for_the_python_paths(q):
    from grafos_fabric._item import PLock

    assert type(q._plock) is PLock
    _warm(q, 1)[0].release()
    with q.reserve(4) as buf:  # the native reservation holds the lock until its exit
        assert q._plock._is_owned() and q._plock._count == 1
        buf[:] = 1
        with q._plock:  # the same thread takes it again (as the Python paths do)
            assert q._plock._count == 2
    assert q._plock._count == 0 and not q._plock._is_owned()
    with pytest.raises(RuntimeError):
        q._plock.release()
    assert q.pop(timeout=WAIT).tobytes() == b"\x01" * 4


def test_two_threads_reserving_natively_on_one_handle_land_every_item_once_and_whole(q):
    """The producer lock serializes reservations: a thread that finds it held sleeps (GIL
    released) until the other commits; no item is lost, torn or doubled."""
    n = 1500
    _warm(q, 1)[0].release()
    out: list[bytes] = []
    errors: list[BaseException] = []

    def reserver(k: int) -> None:
        try:
            for i in range(n):
                with q.reserve(9, timeout=WAIT) as buf:
                    buf[:] = np.frombuffer(b"%d:%07d" % (k, i), dtype=np.uint8)
                    if i % 50 == 0:
                        time.sleep(0)  # let the other thread find the lock held
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reserver, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    end = time.monotonic() + WAIT
    while len(out) < 2 * n and time.monotonic() < end:
        item = q.pop(timeout=WAIT)
        out.append(item.tobytes())
        item.release()
    for t in threads:
        t.join(WAIT)
    assert not errors
    for k in range(2):
        mine = [x for x in out if x.startswith(b"%d:" % k)]
        assert mine == [b"%d:%07d" % (k, i) for i in range(n)]
    assert q._plock._count == 0


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
def test_keyboard_interrupt_reaches_a_thread_waiting_for_the_producer_lock(q):
    """A reservation waiting for the producer lock (another thread's reservation is open)
    still gets KeyboardInterrupt, leaves nothing held, and the next one works."""
    _warm(q, 1)[0].release()
    entered, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with q.reserve(4) as buf:
            buf[:] = 4
            entered.set()
            leave.wait(WAIT)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(WAIT)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            with q.reserve(4) as buf:  # pragma: no cover - never entered
                buf[:] = 9
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not q._plock._is_owned()
    leave.set()
    t.join(WAIT)
    with q.reserve(4) as buf:
        buf[:] = 5
    assert [q.pop(timeout=WAIT).tobytes() for _ in range(2)] == [b"\x04" * 4, b"\x05" * 4]
    assert q.try_pop() is None and q._plock._count == 0


def _outstanding(q: Any) -> int:
    from grafos_fabric._ffi import lib

    return int(lib.gf_consumer_outstanding(q._cons_rel))


def test_pop_array_hands_out_a_read_only_array_natively_and_frees_its_space_when_it_is_gone(q):
    _warm(q)[0].release()  # so the next item is the oldest one out: its release moves the head
    took = _no_slow_path(q)
    base = _outstanding(q)
    arr = q.pop_array(timeout=5)
    assert took == [] and type(arr) is np.ndarray and arr.dtype == np.uint8
    assert arr.tobytes() == b"warm 1" and not arr.flags.writeable and arr.flags.c_contiguous
    with pytest.raises(ValueError):
        arr[0] = 1  # read-only, like an item's exports
    assert _outstanding(q) == base  # (prefetched records hold their tokens already)
    part = arr[2:]  # a view of it keeps the item (and its space) too
    del arr
    gc.collect()
    assert _outstanding(q) == base and part.tobytes() == b"rm 1"
    del part
    assert _outstanding(q) == base - 1  # the item's space goes back with its last view


def test_pop_array_of_a_typed_queue_is_in_its_dtype_and_an_empty_queue_takes_the_python_path(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT, dtype=np.float32)
    try:
        for i in range(3):
            q.push(np.arange(4, dtype=np.float32) + i)
        first = q.pop(timeout=WAIT)  # claims the consumer and fills the native prefetch
        a = q.pop_array()
        assert a.dtype == np.float32 and a.tolist() == [1.0, 2.0, 3.0, 4.0]
        b = q.pop_array(timeout=WAIT)
        assert b.tolist() == [2.0, 3.0, 4.0, 5.0]
        with pytest.raises(TimeoutError):
            q.pop_array(timeout=0.01)  # empty: the Python path waits and times out
        q.push(np.full(2, 7, dtype=np.float32))
        c = q.pop_array(timeout=WAIT)  # the Python path after the wait (a refill)
        assert c.tolist() == [7.0, 7.0] and not c.flags.writeable
        first.release()
        q.close()
        with pytest.raises(E.QueueClosed):
            q.pop_array(timeout=0)
        assert a.tolist() == [1.0, 2.0, 3.0, 4.0]  # arrays outlive close, as items' views do
    finally:
        q.close()


def test_pop_array_gives_the_same_bytes_on_every_access_pair(make_pair):
    tx, rx = make_pair()
    for i in range(5):
        tx.push(b"item %d" % i)
    got = [rx.pop_array(timeout=WAIT).tobytes() for _ in range(5)]  # the first claims (Python), then native
    assert got == [b"item %d" % i for i in range(5)]


def test_the_native_state_refuses_a_lock_ring_or_dtype_that_is_not_the_handles_kind():
    from grafos_fabric._ffi import ffi
    from grafos_fabric._item import Fast, PLock

    f = Fast(False)
    p = ffi.new("gf_producer *")
    ring = np.zeros(64, dtype=np.uint8)
    for lock, r in (
        (threading.RLock(), ring),  # the lock must be a PLock (taken from C)
        (PLock(), ring[::2]),  # not contiguous
        (PLock(), np.zeros(8, dtype=np.float64)),  # not uint8
        (PLock(), bytearray(64)),  # not an ndarray
        (PLock(), np.zeros((8, 8), dtype=np.uint8)),  # not 1-D
    ):
        with pytest.raises(TypeError):
            f.set_producer(ffi.buffer(p), r, lock)
    ro = np.zeros(64, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(TypeError):
        f.set_producer(ffi.buffer(p), ro, PLock())
    for bad in (np.dtype(object), "u1", None, np.dtype([("a", "O")])):
        with pytest.raises(TypeError):
            f.set_array_dtype(bad)
