"""The shm driver under a hostile or merely unlucky /dev/shm (issue 9, "Resources").

- a /dev/shm smaller than the request (Docker's default is 64 MB): create
  raises ``CapacityExceeded`` instead of a later SIGBUS (a private small tmpfs
  via ``unshare -m``, as root);
- a segment truncated by a co-tenant: ``Corrupted`` at attach and from
  ``check_size()``, before anything touches the missing pages;
- squatters in the namespace (FIFO, symlink, foreign-owned file, junk, a live
  segment with a flipped magic): create still works, reap never hangs and
  never unlinks what it cannot prove is ours and dead;
- the generation counter file goes with the namespace's last region, and
  generations never repeat;
- reaping with two clocks: a reaper on a manual clock never reaps a live
  region of the host clock, and the other way round.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from typing import Any

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.shm import HEADER, SHM_DIR, ShmFabric
from grafos_fabric.lease import ManualClock

NOBODY = 65534  # a uid that is not ours (chown needs root)


def _path(fabric: ShmFabric, region: Any) -> str:
    return os.path.join(SHM_DIR, f"grafos.{fabric.namespace}.{region.name}")


def _gen_path(namespace: str) -> str:
    return os.path.join(SHM_DIR, f"grafos-gen.{namespace}")


def _squat_path(namespace: str, name: str = "00112233aabbccdd") -> str:
    return os.path.join(SHM_DIR, f"grafos.{namespace}.{name}")


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


# -- a /dev/shm too small for the request -----------------------------------------------


def _small_tmpfs_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a private tmpfs over /dev/shm (unshare -m)"
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot mount a private tmpfs here (unshare -m): {probe.stderr.strip() or probe.returncode}"
    return None


SMALL_SHM = """
import json, os
import numpy as np
import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.shm import SHM_DIR, ShmFabric

out = {}
fabric = ShmFabric("small")
# 16 MiB on an 8 MiB /dev/shm: refused at create, nothing left behind
try:
    fabric.alloc(16 << 20, ttl=30)
    out["big"] = "allocated"
except E.CapacityExceeded as exc:
    out["big"] = str(exc)
out["left_after_big"] = sorted(os.listdir(SHM_DIR))
# the same with the free-space precheck fooled (another process took the room since):
# posix_fallocate itself refuses, and the half-made segment is unlinked
import grafos_fabric.drivers.shm as shm
real_free = shm._free_bytes
shm._free_bytes = lambda: 1 << 40
try:
    fabric.alloc(16 << 20, ttl=30)
    out["fallocate"] = "allocated"
except E.CapacityExceeded as exc:
    out["fallocate"] = str(exc)
shm._free_bytes = real_free
out["left_after_fallocate"] = sorted(os.listdir(SHM_DIR))
try:
    gf.FabricQueue.create(fabric, capacity=16 << 20, ttl=30)
    out["queue"] = "created"
except E.CapacityExceeded as exc:
    out["queue"] = "CapacityExceeded"
# fill it with 2 MiB regions: every region that create() returns is backed by pages,
# writing all of it never raises SIGBUS; the one that does not fit is refused
regions, refused = [], None
for _ in range(8):
    try:
        regions.append(fabric.alloc(2 << 20, ttl=30))
    except E.CapacityExceeded as exc:
        refused = str(exc)
        break
for r in regions:
    np.frombuffer(r.view(), dtype=np.uint8)[:] = 0xAB
out["filled"] = len(regions)
out["refused"] = refused
out["sum_ok"] = all(int(np.frombuffer(r.view(), dtype=np.uint8)[-1]) == 0xAB for r in regions)
for r in regions:
    r.lease.free()
out["left_at_end"] = sorted(os.listdir(SHM_DIR))
print(json.dumps(out))
"""


def test_a_region_larger_than_free_shm_is_refused_at_create_not_killed_by_sigbus_later():
    reason = _small_tmpfs_reason()
    if reason:
        pytest.skip(reason)
    script = f'mount -t tmpfs -o size=8m tmpfs {SHM_DIR} && exec "$0" -c "$1"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, sys.executable, SMALL_SHM],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"child died (rc {proc.returncode}: -7 is SIGBUS): {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["big"] != "allocated"
    assert str(16 << 20) in out["big"].replace(",", "") or "16.0 MiB" in out["big"]
    assert "free" in out["big"]
    assert out["left_after_big"] == []  # nothing was made
    assert out["fallocate"] != "allocated" and str(16 << 20) in out["fallocate"]
    assert out["left_after_fallocate"] == []  # the half-made segment was unlinked
    assert out["queue"] == "CapacityExceeded"
    assert 1 <= out["filled"] < 4  # 8 MiB holds three 2 MiB regions (plus headers), not four
    assert out["refused"] is not None and "free" in out["refused"]
    assert out["sum_ok"] is True
    assert out["left_at_end"] == []  # segments and the generation counter are gone


def test_create_refuses_more_than_the_free_space_without_touching_the_pages(fabric):
    free = os.statvfs(SHM_DIR)
    too_big = free.f_bavail * free.f_frsize + (1 << 30)
    if too_big > (1 << 41):
        pytest.skip(f"{SHM_DIR} has more free space than the largest region the driver allows")
    with pytest.raises(E.CapacityExceeded, match="free"):
        fabric.alloc(too_big, ttl=5)
    assert fabric.segments() == []


def _flaky_fallocate(monkeypatch: pytest.MonkeyPatch, *failures: BaseException) -> list[int]:
    import grafos_fabric.drivers.shm as shm

    calls: list[int] = []
    real = os.posix_fallocate
    pending = list(failures)

    def fake(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        if pending:
            raise pending.pop(0)
        real(fd, offset, length)

    monkeypatch.setattr(shm.os, "posix_fallocate", fake)
    return calls


def test_create_retries_a_reservation_interrupted_by_a_signal(fabric, monkeypatch):
    calls = _flaky_fallocate(monkeypatch, InterruptedError(4, "Interrupted system call"))
    region = fabric.alloc(8192, ttl=30)
    assert len(calls) == 2
    region.store64(8184, 1)


def test_an_exception_during_the_reservation_leaves_no_half_made_segment(fabric, monkeypatch):
    _flaky_fallocate(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        fabric.alloc(8192, ttl=30)
    assert fabric.segments() == []
    _flaky_fallocate(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(E.CapacityExceeded, match="free"):
        fabric.alloc(8192, ttl=30)
    assert fabric.segments() == []


def test_a_filesystem_without_fallocate_still_gets_a_sized_segment(fabric, monkeypatch, caplog):
    _flaky_fallocate(monkeypatch, OSError(95, "Operation not supported"))
    with caplog.at_level("WARNING", logger="grafos_fabric.drivers.shm"):
        region = fabric.alloc(8192, ttl=30)
    assert os.path.getsize(_path(fabric, region)) == HEADER + 8192
    assert "SIGBUS" in caplog.text


# -- truncation by a co-tenant ------------------------------------------------------------


def test_attach_to_a_truncated_segment_raises_corrupted(fabric):
    region = fabric.alloc(64 << 10, ttl=30)
    path = _path(fabric, region)
    os.truncate(path, HEADER + 4096)
    with pytest.raises(E.Corrupted):
        fabric.attach(region.ref())
    with pytest.raises(E.Corrupted):
        fabric.attach(region.ref(), mapped=False)


def test_check_size_reports_a_segment_shrunk_under_live_mappings(fabric):
    owner = fabric.alloc(64 << 10, ttl=30)
    peer = fabric.attach(owner.ref(), mapped=False)
    owner.check_size()  # whole: no error
    peer.check_size()
    owner.store64(0, 7)
    os.truncate(_path(fabric, owner), HEADER + 4096)
    with pytest.raises(E.Corrupted, match="truncated"):
        owner.check_size()
    with pytest.raises(E.Corrupted, match="truncated"):
        peer.check_size()
    # once seen, every operation fails closed instead of touching a missing page
    with pytest.raises(E.Corrupted):
        peer.read_into(60 << 10, bytearray(8))
    with pytest.raises(E.Corrupted):
        peer.load64(0)
    with pytest.raises(E.Corrupted):
        owner.view()


def test_check_size_is_fine_on_a_closed_or_whole_region(fabric):
    region = fabric.alloc(4096, ttl=30)
    region.check_size()
    region.close()
    region.check_size()  # nothing mapped is used any more: nothing to report


# -- squatters in the namespace -------------------------------------------------------------


def _reap_in_thread(fabric: ShmFabric, fifo: str | None = None) -> int:
    """Run ``reap`` on a thread: a reaper that blocks in open() on a FIFO fails the test
    instead of hanging the suite (the FIFO is opened for writing to set it free)."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(fabric.reap()), daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():
        if fifo:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        t.join(timeout=10)
        pytest.fail("reap() blocked on a FIFO in the namespace")
    assert result, "reap() raised"
    return int(result[0])


def test_a_fifo_named_like_a_segment_neither_hangs_reap_nor_create(namespace, caplog):
    fifo = _squat_path(namespace)
    os.mkfifo(fifo, 0o600)
    try:
        fabric = ShmFabric(namespace)
        with caplog.at_level("INFO", logger="grafos_fabric.drivers.shm"):
            assert _reap_in_thread(fabric, fifo) == 0
        assert f"reap: skipping {fifo}: a FIFO, not a regular file" in caplog.text  # it says why
        region = fabric.alloc(4096, ttl=30)
        region.store64(0, 1)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not ours to remove
    finally:
        _remove(fifo)


def test_a_fifo_or_symlink_as_the_generation_counter_does_not_stop_create(namespace, tmp_path):
    fabric = ShmFabric(namespace)
    gen = _gen_path(namespace)
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, gen)
    try:
        a = fabric.alloc(4096, ttl=30)
        assert target.read_bytes() == b"precious"  # never followed, never truncated
        assert os.path.islink(gen)
    finally:
        _remove(gen)
    os.mkfifo(gen, 0o600)
    try:
        b = fabric.alloc(4096, ttl=30)
        assert stat.S_ISFIFO(os.lstat(gen).st_mode)
    finally:
        _remove(gen)
    assert b.lease.generation > a.lease.generation


def test_a_symlink_named_like_a_segment_is_neither_followed_nor_removed(namespace, fabric, tmp_path):
    victim = fabric.alloc(4096, ttl=30)  # the link points at a live segment of ours
    victim.lease.revoke()  # ... that a reaper following links would judge dead
    other = ShmFabric(namespace + "x")
    link = _squat_path(other.namespace)
    os.symlink(_path(fabric, victim), link)
    try:
        assert other.reap() == 0
        assert os.path.islink(link)
        assert os.path.exists(_path(fabric, victim))
        other.alloc(4096, ttl=30)
    finally:
        _remove(link)
        other.destroy()


def test_a_directory_named_like_a_segment_is_skipped(namespace):
    d = _squat_path(namespace)
    os.mkdir(d)
    try:
        fabric = ShmFabric(namespace)
        assert fabric.reap() == 0
        fabric.alloc(4096, ttl=30)
        assert os.path.isdir(d)
    finally:
        _remove(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid (chown)")
def test_foreign_owned_segments_and_counter_are_never_touched(namespace):
    fabric = ShmFabric(namespace)
    dead = fabric.alloc(4096, ttl=30)
    dead.lease.revoke()  # provably dead ... but handed to another user below
    path = _path(fabric, dead)
    os.chown(path, NOBODY, NOBODY)
    gen = _gen_path(namespace)
    os.chown(gen, NOBODY, NOBODY)
    before = open(gen, "rb").read()
    assert fabric.reap() == 0
    assert os.path.exists(path)
    region = fabric.alloc(4096, ttl=30)  # create still works ...
    assert open(gen, "rb").read() == before  # ... without writing the foreign counter
    region.lease.free()
    assert os.path.exists(gen)  # nor removing it
    assert os.path.exists(path)


@pytest.mark.parametrize("size", [0, 10, HEADER + 4096])
def test_junk_files_named_like_segments_are_skipped_not_removed(namespace, size, caplog):
    junk = _squat_path(namespace)
    with open(junk, "wb") as f:
        f.write(b"\xff" * size)
    try:
        fabric = ShmFabric(namespace)
        with caplog.at_level("INFO", logger="grafos_fabric.drivers.shm"):
            assert fabric.reap() == 0
        if size:
            assert "not provably a segment of ours" in caplog.text
        region = fabric.alloc(4096, ttl=30)
        assert os.path.getsize(junk) == size
        region.store64(0, 3)
    finally:
        _remove(junk)


def test_a_bit_flip_in_a_live_segments_magic_does_not_get_it_unlinked(namespace):
    mine = ShmFabric(namespace)
    region = mine.alloc(4096, ttl=30)
    path = _path(mine, region)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0x01]))
    other = ShmFabric(namespace)  # another process's view of the namespace
    assert other.reap() == 0
    other.alloc(4096, ttl=30)
    assert os.path.exists(path)
    with open(path, "r+b") as f:
        f.write(first)  # flip it back: the region was never lost
    assert other.attach(region.ref()).load64(0) == 0


def test_a_half_built_segment_of_ours_is_still_reaped_after_the_grace(namespace, monkeypatch):
    import grafos_fabric.drivers.shm as shm

    fabric = ShmFabric(namespace)
    half = _squat_path(namespace)
    with open(half, "wb") as f:
        f.truncate(HEADER + 4096)  # created and sized, header never written
    os.chmod(half, 0o600)
    assert fabric.reap() == 0  # within the grace: someone may be building it
    monkeypatch.setattr(shm, "REAP_GRACE_NS", 0)
    assert fabric.reap() == 1
    assert not os.path.exists(half)


# -- the generation counter ------------------------------------------------------------------


def test_the_generation_counter_goes_with_the_namespaces_last_region(fabric):
    gen = _gen_path(fabric.namespace)
    a = fabric.alloc(4096, ttl=30)
    b = fabric.alloc(4096, ttl=30)
    assert os.path.exists(gen)
    assert stat.S_IMODE(os.stat(gen).st_mode) == 0o600
    a.lease.free()
    assert os.path.exists(gen)  # b still lives
    b.lease.free()
    assert not os.path.exists(gen)
    c = fabric.alloc(4096, ttl=30)
    assert c.lease.generation > b.lease.generation  # a new counter never goes back


def test_reap_removes_the_counter_of_a_namespace_it_emptied(namespace):
    clock = ManualClock()
    fabric = ShmFabric(namespace, clock=clock)
    fabric.alloc(4096, ttl=1)
    clock.advance(2)
    assert fabric.reap() == 1
    assert not os.path.exists(_gen_path(namespace))


GEN_WORKER = """
import json, sys
from grafos_fabric.drivers.shm import ShmFabric
fabric = ShmFabric(sys.argv[1])
gens = []
for i in range(int(sys.argv[2])):
    r = fabric.alloc(4096, ttl=30)
    gens.append(r.lease.generation)
    r.lease.free()  # often the namespace's last region: the counter file goes and comes back
    if i % 7 == 0:
        fabric.reap()
print(json.dumps(gens))
"""


def test_generations_never_repeat_while_the_counter_comes_and_goes(namespace):
    n = 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GEN_WORKER, namespace, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    runs = [json.loads(o[0]) for o in outs]
    for gens in runs:
        assert gens == sorted(gens) and len(set(gens)) == n  # each process sees them grow
    every = [g for gens in runs for g in gens]
    assert len(set(every)) == len(every)  # and no two creates ever got the same one
    assert not os.path.exists(_gen_path(namespace))


# -- two clocks ------------------------------------------------------------------------------


def test_a_reaper_on_a_manual_clock_never_reaps_a_live_host_clock_region(namespace):
    host = ShmFabric(namespace)
    region = host.alloc(4096, ttl=30)
    far_future = ShmFabric(namespace, clock=ManualClock(start=1e9))
    assert far_future.reap() == 0
    assert os.path.exists(_path(host, region))
    region.store64(0, 5)
    # ... and judges host-clock regions by the host clock: a revoked one still goes
    region.lease.revoke()
    assert far_future.reap() == 1


REAP_WITH_MANUAL_CLOCK = """
import sys
from grafos_fabric.drivers.shm import ShmFabric
from grafos_fabric.lease import ManualClock
print(ShmFabric(sys.argv[1], clock=ManualClock(start=float(sys.argv[2]))).reap())
"""


@pytest.mark.parametrize("start", [0.0, 1e9])
def test_another_process_with_a_manual_clock_never_reaps_live_regions(namespace, start):
    host = ShmFabric(namespace)
    region = host.alloc(4096, ttl=30)
    proc = subprocess.run(
        [sys.executable, "-c", REAP_WITH_MANUAL_CLOCK, namespace, str(start)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
    assert os.path.exists(_path(host, region))
    region.lease.check()


def test_a_host_clock_reaper_leaves_a_live_manual_clock_region_alone_until_its_holders_are_gone(namespace):
    clock = ManualClock(start=0.0)  # its deadlines (10 s) are long past on the host clock
    manual = ShmFabric(namespace, clock=clock)
    region = manual.alloc(4096, ttl=10)
    path = _path(manual, region)
    host = ShmFabric(namespace)
    assert host.reap() == 0
    assert os.path.exists(path)
    region.lease.check()  # still live on its own clock
    info = manual.attach(region.ref())  # same clock: attach works and holds it too
    del region
    gc.collect()
    assert host.reap() == 0  # the attached handle still holds the region
    del info
    gc.collect()
    assert host.reap() == 1  # nobody on that clock holds it any more: orphaned, reclaimed
    assert not os.path.exists(path)


def test_the_manual_clock_that_created_a_region_still_expires_it(namespace):
    clock = ManualClock()
    fabric = ShmFabric(namespace, clock=clock)
    region = fabric.alloc(4096, ttl=10)
    assert fabric.reap() == 0
    clock.advance(10)
    assert fabric.reap() == 1
    with pytest.raises(E.LeaseExpired):
        region.load64(0)


def test_attach_judges_a_region_by_the_clock_it_was_created_under(namespace):
    host = ShmFabric(namespace)
    region = host.alloc(4096, ttl=30)
    manual = ShmFabric(namespace, clock=ManualClock(start=1e9))
    peer = manual.attach(region.ref())
    assert 0 < peer.lease.remaining() <= 30  # judged by the host clock, not 1e9 s
    private = ShmFabric(namespace, clock=ManualClock()).alloc(4096, ttl=30)
    with pytest.raises(E.Unsupported, match="clock"):
        host.attach(private.ref())
    with pytest.raises(E.Unsupported, match="clock"):
        ShmFabric(namespace, clock=ManualClock()).attach(private.ref())


def test_segment_info_reports_the_clock_domain(namespace):
    from grafos_fabric.drivers.shm import segment_info

    host = ShmFabric(namespace)
    a = host.alloc(4096, ttl=30)
    clock = ManualClock()
    b = ShmFabric(namespace, clock=clock).alloc(4096, ttl=30)
    ia = segment_info(_path(host, a), ManualClock(start=1e9))
    assert ia["clock"] == "host" and ia["state"] == "active" and 0 < ia["remaining"] <= 30
    ib = segment_info(_path(host, b))
    assert ib["clock"] == "private" and ib["state"] == "active" and ib.get("remaining") is None
    assert segment_info(_path(host, b), clock)["remaining"] == pytest.approx(30.0)


def test_queues_on_a_manual_clock_still_work_end_to_end(namespace):
    clock = ManualClock()
    fabric = ShmFabric(namespace, clock=clock)
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=10)
    rx = gf.FabricQueue.attach(fabric, q.locator())
    q.push(b"x")
    assert rx.pop(timeout=1).tobytes() == b"x"
    clock.advance(10)
    with pytest.raises(E.LeaseExpired):
        q.push(b"y")


def test_ls_and_reap_commands_list_squatters_without_hanging_or_removing_them(namespace, capsys):
    from grafos_fabric.tools.cli import main

    fabric = ShmFabric(namespace)
    region = fabric.alloc(4096, ttl=30)
    fifo = _squat_path(namespace)
    os.mkfifo(fifo, 0o600)
    try:
        result: list[int] = []
        t = threading.Thread(
            target=lambda: result.append(main(["ls", "--fabric", f"shm://{namespace}", "--json"])), daemon=True
        )
        t.start()
        t.join(timeout=60)
        if t.is_alive():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(timeout=10)
            pytest.fail("grafos-fabric ls blocked on a FIFO")
        assert result == [0]
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows[region.name]["state"] == "active"
        assert rows["00112233aabbccdd"]["status"] == "not-ours"
        assert main(["reap", "--fabric", f"shm://{namespace}"]) == 0
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    finally:
        _remove(fifo)
