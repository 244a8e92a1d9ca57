"""grafos_fabric._item.PLock, a handle's producer lock in C (native/gf_item.c):
threading.RLock's rules (reentrant, released only by its holder), blocking with
the GIL released, KeyboardInterrupt while blocked, and fork()."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from grafos_fabric._item import PLock

WAIT = 60.0


def test_it_is_reentrant_and_only_its_holder_releases_it():
    lk = PLock()
    assert lk.acquire() is True and lk.acquire() is True
    assert lk._count == 2 and lk._is_owned()
    errs: list[BaseException] = []

    def other() -> None:
        try:
            lk.release()
        except BaseException as exc:
            errs.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(WAIT)
    assert len(errs) == 1 and isinstance(errs[0], RuntimeError)
    lk.release()
    lk.release()
    assert lk._count == 0 and not lk._is_owned()
    with pytest.raises(RuntimeError):
        lk.release()
    with lk:
        with lk:
            assert lk._count == 2
    assert lk._count == 0
    with pytest.raises(TypeError):
        PLock(1)  # type: ignore[call-arg]


def test_threads_take_it_one_at_a_time():
    lk = PLock()
    box = [0]
    n, k = 5000, 4

    def work() -> None:
        for i in range(n):
            with lk:
                with lk:
                    v = box[0]
                    if i % 64 == 0:
                        time.sleep(0)  # give the GIL away while holding the lock
                    box[0] = v + 1

    threads = [threading.Thread(target=work) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert box[0] == n * k and lk._count == 0


def test_a_blocked_acquire_wakes_when_the_holder_releases():
    lk = PLock()
    got = threading.Event()
    lk.acquire()

    def waiter() -> None:
        with lk:
            got.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not got.wait(0.1)  # held here: the waiter must not get it
    lk.release()
    assert got.wait(WAIT)
    t.join(WAIT)
    assert lk._count == 0


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
def test_keyboard_interrupt_reaches_a_blocked_acquire_and_leaves_it_not_taken():
    lk = PLock()
    held, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with lk:
            held.set()
            leave.wait(WAIT)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(WAIT)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            lk.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not lk._is_owned()
    leave.set()
    t.join(WAIT)
    assert lk.acquire() is True and lk._count == 1  # the holder's release woke nobody wrongly
    lk.release()


def _in_child(fn: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_can_take_a_lock_another_thread_of_the_parent_held():
    lk = PLock()
    held, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with lk:
            held.set()
            leave.wait(WAIT)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(WAIT)

    def child() -> int:
        if lk._count != 0 or lk._is_owned():  # that thread does not exist here
            return 2
        lk.acquire()
        lk.release()
        return 0

    try:
        assert _in_child(child) == 0
    finally:
        leave.set()
        t.join(WAIT)
    assert lk._count == 0


def test_a_forked_child_keeps_what_the_forking_thread_held():
    lk = PLock()

    def child() -> int:
        if lk._count != 1 or not lk._is_owned():
            return 2
        lk.release()
        return 0 if lk._count == 0 else 3

    with lk:
        assert _in_child(child) == 0
        assert lk._count == 1  # the parent's is its own
    assert lk._count == 0
