"""The shm driver: segment permissions, attach handshake, reaping, and the
driver protocol's one-sided operations (conformance, run for both modes)."""

from __future__ import annotations

import mmap
import os
import stat

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.drivers.base import Fabric, Region, RegionRef
from grafos_fabric.drivers.shm import HEADER, SHM_DIR, ShmFabric


def _path(fabric, region) -> str:
    return os.path.join(SHM_DIR, f"grafos.{fabric.namespace}.{region.name}")


def test_segments_are_created_owner_only_even_with_a_permissive_umask(fabric):
    old = os.umask(0)
    try:
        region = fabric.alloc(10_000, ttl=5)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(_path(fabric, region)).st_mode)
    assert mode == 0o600


def test_segment_is_sized_to_the_request_rounded_to_pages(fabric):
    region = fabric.alloc(10_000, ttl=5)
    assert os.stat(_path(fabric, region)).st_size == HEADER + 12288
    assert region.nbytes == 12288


def test_fabric_and_region_satisfy_the_driver_protocol(fabric):
    region = fabric.alloc(4096, ttl=5)
    assert isinstance(fabric, Fabric)
    assert isinstance(region, Region)


def test_open_fabric_defaults_to_the_environment_then_shm_default(monkeypatch):
    monkeypatch.delenv("GRAFOS_FABRIC", raising=False)
    assert gf.open_fabric().url == "shm://default"
    monkeypatch.setenv("GRAFOS_FABRIC", "shm://fromenv")
    assert gf.open_fabric().url == "shm://fromenv"


@pytest.mark.parametrize("url", ["tcp://x", "shm://bad name!", "nonsense"])
def test_bad_fabric_urls_raise_value_errors(url):
    with pytest.raises(E.FabricValueError):
        gf.open_fabric(url)


def test_free_unlinks_the_segment_and_later_attach_fails_closed(fabric):
    region = fabric.alloc(4096, ttl=5)
    ref = region.ref()
    path = _path(fabric, region)
    region.lease.free()
    assert not os.path.exists(path)
    with pytest.raises(E.LeaseExpired):
        fabric.attach(ref)
    with pytest.raises(E.LeaseExpired):
        region.load64(0)


def test_reaper_reclaims_expired_and_revoked_segments_only(namespace):
    clock = gf.ManualClock()
    fabric = gf.open_fabric(f"shm://{namespace}", clock=clock)
    short = fabric.alloc(4096, ttl=1)
    long = fabric.alloc(4096, ttl=100)
    revoked = fabric.alloc(4096, ttl=100)
    revoked.lease.revoke()
    clock.advance(2)
    assert fabric.reap() == 2
    assert not os.path.exists(_path(fabric, short))
    assert not os.path.exists(_path(fabric, revoked))
    assert os.path.exists(_path(fabric, long))
    with pytest.raises(E.LeaseExpired):
        short.load64(0)
    long.store64(0, 42)
    assert long.load64(0) == 42


def test_attach_to_a_segment_still_being_built_says_not_ready(fabric):
    region = fabric.alloc(4096, ttl=5)
    path = _path(fabric, region)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), HEADER) as mm:
        mm[8:12] = b"\0\0\0\0"  # layout_version is written last: 0 means not ready
    with pytest.raises(E.NotReady):
        fabric.attach(region.ref())


def test_attach_to_another_layout_version_says_version_mismatch(fabric):
    region = fabric.alloc(4096, ttl=5)
    with open(_path(fabric, region), "r+b") as f, mmap.mmap(f.fileno(), HEADER) as mm:
        mm[8:12] = (99).to_bytes(4, "little")
    with pytest.raises(E.VersionMismatch):
        fabric.attach(region.ref())


def test_truncated_and_foreign_segments_are_corrupted_not_a_crash(fabric):
    region = fabric.alloc(4096, ttl=5)
    path = _path(fabric, region)
    with open(path, "r+b") as f:
        f.truncate(HEADER + 100)  # shorter than the header says
    with pytest.raises(E.Corrupted):
        fabric.attach(region.ref())
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(E.Corrupted):
        fabric.attach(region.ref())
    foreign = os.path.join(SHM_DIR, f"grafos.{fabric.namespace}.foreign")
    with open(foreign, "wb") as f:
        f.write(os.urandom(HEADER + 4096))
    ref = RegionRef("shm", "foreign", 4096, region.lease.id, 1, namespace=fabric.namespace)
    with pytest.raises((E.Corrupted, E.NotReady)):
        fabric.attach(ref)


def test_attach_to_a_reused_name_with_another_lease_fails_closed(fabric):
    region = fabric.alloc(4096, ttl=5)
    ref = region.ref()
    forged = RegionRef("shm", ref.name, ref.nbytes, "00" * 16, 1, namespace=fabric.namespace)
    with pytest.raises(E.LeaseExpired):
        fabric.attach(forged)


def test_queue_on_a_corrupted_ring_header_raises_corrupted(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=5)
    loc = q.locator()
    q.region.view()[8:16] = (12345).to_bytes(8, "little")  # capacity: not a power of two
    with pytest.raises(E.Corrupted):
        gf.FabricQueue.attach(fabric, loc)


def test_garbage_records_from_a_peer_raise_corrupted_and_never_crash(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=5)
    q.push(b"fine")
    view = q.region.view()
    data = 4096  # ring header size: records start here
    view[data : data + 4] = (1 << 30).to_bytes(4, "little")  # absurd record length
    with pytest.raises(E.Corrupted):
        q.try_pop()
    view[data : data + 8] = (4).to_bytes(4, "little") + (77).to_bytes(4, "little")  # unknown record type
    with pytest.raises(E.Corrupted):
        q.try_pop()
    tail_off = int(ffi.offsetof("gf_ring_header", "tail"))
    view[tail_off : tail_off + 8] = (1 << 40).to_bytes(8, "little")  # tail far past head
    with pytest.raises(E.Corrupted):
        q.try_pop()


@pytest.fixture(params=["mapped", "onesided"])
def region_pair(request, fabric):
    """(owner, peer): the peer is attached in the parametrized mode."""
    owner = fabric.alloc(8192, ttl=30)
    peer = fabric.attach(owner.ref(), mapped=request.param == "mapped")
    return owner, peer


def test_one_sided_write_then_read_into_round_trips(region_pair):
    owner, peer = region_pair
    peer.write(100, b"hello fabric")
    buf = bytearray(12)
    owner.read_into(100, buf)
    assert bytes(buf) == b"hello fabric"
    arr = np.zeros(12, dtype=np.uint8)
    peer.read_into(100, arr)
    assert arr.tobytes() == b"hello fabric"


def test_cas64_returns_the_old_value_and_swaps_only_on_match(region_pair):
    owner, peer = region_pair
    owner.store64(64, 5)
    assert peer.cas64(64, 4, 9) == 5
    assert owner.load64(64) == 5
    assert peer.cas64(64, 5, 9) == 5
    assert owner.load64(64) == 9


def test_faa64_adds_and_wraps_at_64_bits(region_pair):
    owner, peer = region_pair
    owner.store64(0, (1 << 64) - 2)
    assert peer.faa64(0, 3) == (1 << 64) - 2
    assert owner.load64(0) == 1
    assert peer.faa64(0, -1) == 1
    assert owner.load64(0) == 0


def test_one_sided_ops_check_bounds_and_alignment(region_pair):
    _, peer = region_pair
    with pytest.raises(E.CapacityExceeded):
        peer.write(8190, b"abc")
    with pytest.raises(E.CapacityExceeded):
        peer.read_into(-1, bytearray(2))
    with pytest.raises(E.FabricValueError):
        peer.load64(3)
    with pytest.raises(E.CapacityExceeded):
        peer.cas64(8192, 0, 1)


def test_one_sided_ops_fail_closed_after_revoke(region_pair):
    owner, peer = region_pair
    owner.lease.revoke()
    with pytest.raises(E.Revoked):
        peer.read_into(0, bytearray(8))
    with pytest.raises(E.Revoked):
        peer.faa64(0, 1)
    with pytest.raises(E.Revoked):
        peer.flush()


def test_one_sided_region_is_not_mapped(fabric):
    owner = fabric.alloc(4096, ttl=5)
    peer = fabric.attach(owner.ref(), mapped=False)
    assert not peer.mapped
    with pytest.raises(E.Unsupported):
        peer.view()
    with pytest.raises(E.Unsupported):
        peer.address()


def test_native_constants_come_from_the_compiled_headers():
    assert ffi.offsetof("gf_ring_header", "tail") % 128 == 0
    assert ffi.offsetof("gf_ring_header", "head") % 128 == 0
    assert ffi.sizeof("gf_record_header") == lib.GF_RECORD_HEADER_SIZE
    assert lib.GF_TAIL_POS_MASK | lib.GF_TAIL_TAG_MASK | lib.GF_TAIL_SEALED == (1 << 64) - 1


def test_shm_namespaces_are_isolated(namespace):
    a = ShmFabric(namespace)
    b = ShmFabric(namespace + "x")
    region = a.alloc(4096, ttl=5)
    assert any(region.name in p for p in a.segments())
    assert not any(region.name in p for p in b.segments())


def test_lease_generations_grow_within_a_namespace_and_are_seen_by_attachers(fabric):
    a = fabric.alloc(4096, ttl=5)
    b = fabric.alloc(4096, ttl=5)
    assert b.lease.generation == a.lease.generation + 1
    assert fabric.attach(b.ref()).lease.generation == b.lease.generation


def test_destroy_removes_the_namespace_and_its_regions_fail_closed(namespace):
    fabric = ShmFabric(namespace)
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    fabric.alloc(4096, ttl=30)
    assert fabric.destroy() == 2
    assert fabric.segments() == []
    assert not os.path.exists(os.path.join(SHM_DIR, f"grafos-gen.{namespace}"))
    with pytest.raises(E.LeaseExpired):
        q.push(b"after destroy")
