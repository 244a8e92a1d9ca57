"""Roles across fork() and pid namespaces (issue 9, "Concurrency").

A child after fork() never acts through its parent's roles (ForkedHandle); role
liveness is the kernel's (an open-file-description lock per role on the
segment file), so a live holder in another pid namespace keeps its role and a
killed one's role can be taken over."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E

WAIT = 60.0


def _in_child(body: Any) -> int:
    """Run ``body()`` in a forked child; its return value (a small int) is the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            code = int(body())
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_cannot_use_its_parents_handle_and_the_parent_keeps_working(make_pair):
    tx, rx = make_pair()
    tx.push_batch([b"before fork", b"second", b"third"])
    held = rx.pop(timeout=WAIT)  # the consumer role is claimed, the prefetch holds the rest
    ops = [
        lambda: tx.push(b"from the child"),
        lambda: tx.try_push(b"from the child"),
        lambda: tx.push_batch([b"a"]),
        lambda: rx.try_pop(),
        lambda: rx.pop(timeout=0),
        lambda: rx.pop_batch(4, timeout=0),
        lambda: tx.epoch,
        lambda: tx.seal(),
        lambda: tx.locator(),
        lambda: tx.free(),
    ]

    def child() -> int:
        bad = 0
        for k, op in enumerate(ops):
            try:
                op()
                bad |= 1 << k
            except E.ForkedHandle as exc:
                if "attach again" not in str(exc):
                    bad |= 1 << k
            except BaseException:
                bad |= 1 << k
        tx.close()  # a no-op in the child: it must not give the parent's roles back
        rx.close()
        if held.tobytes() != b"before fork":  # views made before the fork stay readable
            bad |= 1 << 20
        held.release()  # and releasing in the child does not release the parent's item
        return 0 if bad == 0 else min(bad, 97)

    assert _in_child(child) == 0
    # the parent's handles and roles are untouched
    assert rx.outstanding >= 1 and not held.released
    tx.push(b"after the child")
    assert [rx.pop(timeout=WAIT).tobytes() for _ in range(3)] == [b"second", b"third", b"after the child"]
    held.release()
    with pytest.raises(E.RoleTaken):
        gf.FabricQueue.attach(tx.fabric, tx.locator()).push(b"the parent still holds the producer role")


def test_a_forked_child_can_attach_again(fabric, queue_mode):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT)
    loc = bytes(q.locator())
    q.push(b"from the parent")

    def child() -> int:
        mine = gf.FabricQueue.attach(gf.open_fabric(fabric.url), loc, mapped=queue_mode == "mapped")
        item = mine.pop(timeout=WAIT)
        ok = item.tobytes() == b"from the parent"
        item.release()
        mine.close()
        return 0 if ok else 1

    assert _in_child(child) == 0


_HOLDER_AND_FORK = textwrap.dedent(
    """
    import os, sys, time
    import grafos_fabric as gf
    q = gf.FabricQueue.attach(gf.open_fabric(sys.argv[1]), bytes.fromhex(sys.argv[2]))
    q.push(b"holder")  # claims the producer role and its lock
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)  # let go of the test's pipes
        os.dup2(null, 2)
        time.sleep(120)  # a child that outlives its parent, holding an inherited copy of the fd
        os._exit(0)
    print(pid, flush=True)
    os._exit(0)  # the holder dies without close()
    """
)


def test_a_role_is_free_once_its_holder_dies_even_if_a_forked_child_lives_on(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT)
    out = subprocess.run(
        [sys.executable, "-c", _HOLDER_AND_FORK, fabric.url, bytes(q.locator()).hex()],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    grandchild = int(out.stdout.split()[0])
    try:
        with pytest.raises(E.RoleTaken):
            gf.FabricQueue.attach(fabric, q.locator()).push(b"not without take_over")
        successor = gf.FabricQueue.attach(fabric, q.locator(), take_over=True)
        successor.push(b"successor")  # the child closed its copy of the lock's fd at fork
        assert [q.pop(timeout=WAIT).tobytes() for _ in range(2)] == [b"holder", b"successor"]
    finally:
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_take_over_is_refused_while_the_holder_is_a_live_handle_of_this_process(fabric, queue_mode):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT)
    holder = gf.FabricQueue.attach(fabric, q.locator(), mapped=queue_mode == "mapped")
    assert holder.try_pop() is None  # claims the consumer role
    holder.push(b"mine")  # and the producer role
    if queue_mode == "onesided":
        with pytest.raises(E.Unsupported):
            gf.FabricQueue.attach(fabric, q.locator(), mapped=False, take_over=True)
    thief = gf.FabricQueue.attach(fabric, q.locator(), take_over=True)
    with pytest.raises(E.RoleTaken):
        thief.push(b"thief")
    with pytest.raises(E.RoleTaken):
        thief.try_pop()
    del holder  # dropped without close(): its role locks go with it, so the role is provably free
    import gc

    gc.collect()
    thief.push(b"took over")
    assert thief.try_pop().tobytes() == b"mine"


# -- pid namespaces ------------------------------------------------------------------------------------------

# Runs as pid 1 of a fresh pid namespace: forks until the child's pid is one that
# is NOT alive in the outer namespace (so a pid-based liveness check would call
# the live holder dead), and that child holds the producer role until killed.
_NS_LAUNCHER = textwrap.dedent(
    """
    import os, sys, time
    outer = set(int(p) for p in sys.argv[3].split(","))
    while True:
        pid = os.fork()
        if pid == 0:
            if os.getpid() in outer:
                os._exit(0)
            import grafos_fabric as gf
            q = gf.FabricQueue.attach(gf.open_fabric(sys.argv[1]), bytes.fromhex(sys.argv[2]))
            q.push(b"alive in another pid namespace")
            print("ready", os.getpid(), flush=True)
            time.sleep(300)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
            break
    """
)


def _unshare_pid_ns() -> str | None:
    """Why a pid-namespace test can't run here (None: it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create a pid namespace (unshare -p)"
    if shutil.which("unshare") is None:
        return "needs util-linux unshare"
    probe = subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", "--kill-child", "true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"unshare -p is not permitted here: {probe.stderr.strip()[:200]}"
    return None


@pytest.mark.skipif(_unshare_pid_ns() is not None, reason=str(_unshare_pid_ns()))
def test_a_live_producer_in_another_pid_namespace_is_not_taken_over_and_a_killed_one_is(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=120)
    outer = ",".join(p for p in os.listdir("/proc") if p.isdigit())
    args = [fabric.url, bytes(q.locator()).hex(), outer]
    proc = subprocess.Popen(
        ["unshare", "-p", "-f", "--mount-proc", "--kill-child", sys.executable, "-c", _NS_LAUNCHER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read() if proc.stderr else line
        assert q.pop(timeout=WAIT).tobytes() == b"alive in another pid namespace"
        thief = gf.FabricQueue.attach(fabric, q.locator(), take_over=True)
        with pytest.raises(E.RoleTaken):
            thief.push(b"thief")  # the holder is alive: take_over must not steal its role
        assert q.try_pop() is None
    finally:
        proc.kill()  # SIGKILL to unshare; --kill-child kills the namespace's init, and with it the holder
        proc.wait(WAIT)
    deadline = time.monotonic() + WAIT
    while True:  # the kernel drops the lock when the holder is gone (asynchronously to our wait)
        try:
            gf.FabricQueue.attach(fabric, q.locator(), take_over=True).push(b"successor")
            break
        except E.RoleTaken:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert q.pop(timeout=WAIT).tobytes() == b"successor"


# -- higher epochs: never in place over a live producer ---------------------------------------------------


@pytest.mark.parametrize("old_mapped", [True, False])
@pytest.mark.parametrize("new_mapped", [True, False])
def test_a_higher_epoch_fences_and_seals_a_live_producer_on_either_path(fabric, old_mapped, new_mapped):
    base = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT, epoch=5)
    old = gf.FabricQueue.attach(fabric, base.locator(), mapped=old_mapped)
    old.push(b"old")
    newer = gf.FabricQueue.attach(fabric, base.locator(), mapped=new_mapped, epoch=6)
    with pytest.raises(E.QueueSealed, match="relocate"):
        newer.push(b"new")
    assert base.epoch == 6 and base.sealed
    with pytest.raises((E.StaleEpoch, E.QueueSealed)):
        old.push(b"stale")
    assert base.pop(timeout=WAIT).tobytes() == b"old"
    with pytest.raises(E.QueueSealed):
        base.pop(timeout=WAIT)


@pytest.mark.parametrize("new_mapped", [True, False])
def test_a_higher_epoch_takes_over_in_place_from_a_closed_or_dead_producer(fabric, new_mapped):
    base = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=WAIT, epoch=5)
    old = gf.FabricQueue.attach(fabric, base.locator())
    old.push(b"old")
    old.close()
    gf.FabricQueue.attach(fabric, base.locator(), mapped=new_mapped, epoch=6).push(b"in place")
    assert [base.pop(timeout=WAIT).tobytes() for _ in range(2)] == [b"old", b"in place"]
    assert base.epoch == 6 and not base.sealed
