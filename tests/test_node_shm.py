"""The ``nodeshm`` driver: the node package's device-free registrar and client, in this process.

The same client code path as the remote drivers (grants over TCP, one-sided
operations on the span), with the span a tmpfs file of the node. The attacks
on the control plane are ``test_node_attacks.py``; here: the data path, the
fence (a revoked, freed or expired span fails closed for every holder), the
files the registrar leaves behind, and the one-sided queue on top.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator

import numpy as np
import pytest

from grafos_fabric.drivers.node.auth import load_policy
from grafos_fabric.drivers.node.server import NodeServer
from grafos_fabric.drivers.node.shmfile import LOCK_NAME, NodeShmFabric, ShmFileRegistrar
from grafos_fabric.errors import (
    CapabilityDenied,
    CapacityExceeded,
    Corrupted,
    FabricValueError,
    LeaseExpired,
    QueueClosed,
    Revoked,
    Unsupported,
)
from grafos_fabric.lease import ManualClock

SECRET = secrets.token_bytes(32)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def node(clock: ManualClock) -> Iterator[NodeServer]:
    n = NodeServer(ShmFileRegistrar(4 << 20), load_policy(SECRET), port=0, clock=clock, reap_interval=0.01).start()
    yield n
    n.close()


@pytest.fixture
def fabric(node: NodeServer) -> Iterator[NodeShmFabric]:
    f = NodeShmFabric("127.0.0.1", node.port, secret=SECRET)
    yield f
    f.close()


def test_write_read_and_atomics_reach_the_span(fabric):
    region = fabric.alloc(8192, ttl=30.0)
    assert region.mapped is False
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)
    region.write(100, data)
    out = np.zeros(5000, dtype=np.uint8)
    region.read_into(100, out)
    assert np.array_equal(out, data)
    region.store64(8, 0x0102030405060708)
    assert region.faa64(8, 1) == 0x0102030405060708
    assert region.cas64(8, 0x0102030405060709, 5) == 0x0102030405060709
    assert region.load64(8) == 5


def test_a_new_lease_reads_as_zeros_even_on_reused_pool_bytes(fabric):
    first = fabric.alloc(4096, ttl=30.0)
    first.write(0, b"\xff" * 4096)
    fabric.free(first.lease)
    second = fabric.alloc(4096, ttl=30.0)
    out = bytearray(4096)
    second.read_into(0, out)
    assert out == bytearray(4096)


def test_out_of_range_and_misaligned_operations_are_refused(fabric):
    region = fabric.alloc(64, ttl=30.0)
    with pytest.raises(CapacityExceeded):
        region.write(60, b"12345")
    with pytest.raises(CapacityExceeded):
        region.read_into(-1, bytearray(1))
    with pytest.raises(FabricValueError, match="aligned"):
        region.load64(4)
    with pytest.raises(Unsupported):
        region.view()


def test_span_files_are_owner_only_and_go_when_the_lease_ends(node, fabric):
    reg = node.registrar
    assert isinstance(reg, ShmFileRegistrar)
    assert stat.S_IMODE(os.stat(reg.dir).st_mode) == 0o700
    region = fabric.alloc(4096, ttl=30.0)
    (name,) = [n for n in os.listdir(reg.dir) if n != LOCK_NAME]
    assert len(name) == 32 and stat.S_IMODE(os.stat(os.path.join(reg.dir, name)).st_mode) == 0o600
    region.lease.revoke()
    assert [n for n in os.listdir(reg.dir) if n != LOCK_NAME] == []


def test_a_revoke_by_another_holder_fails_closed_for_every_holder(node, fabric):
    region = fabric.alloc(4096, ttl=30.0)
    region.store64(0, 1)
    other = NodeShmFabric("127.0.0.1", node.port, secret=SECRET)
    try:
        theirs = other.attach(fabric.share(region, "attach,write,revoke"))
        assert theirs.load64(0) == 1
        theirs.lease.revoke()
    finally:
        other.close()
    assert region.lease.live  # the owner's cache has not heard of it yet...
    with pytest.raises(Revoked):
        region.load64(0)  # ...but the fenced span tells it, and the node says why
    with pytest.raises(Revoked):
        region.store64(0, 2)


def test_a_lease_the_node_expired_fails_as_lease_expired(node, clock, fabric):
    region = fabric.alloc(4096, ttl=30.0)
    clock.advance(31.0)  # the node's clock only
    deadline = 100
    while node.table.status(region.lease.id)[0] != "expired" and deadline:
        deadline -= 1
        import time

        time.sleep(0.01)
    assert region.lease.live
    with pytest.raises(LeaseExpired, match="expired"):
        region.read_into(0, bytearray(8))


def test_a_read_only_attach_maps_the_file_read_only(node, fabric):
    region = fabric.alloc(4096, ttl=30.0)
    region.store64(0, 9)
    other = NodeShmFabric("127.0.0.1", node.port, secret=SECRET)
    try:
        ro = other.attach(fabric.share(region, "attach"))
        assert ro.load64(0) == 9
        for op in (lambda: ro.store64(0, 1), lambda: ro.write(0, b"x"), lambda: ro.cas64(0, 9, 1)):
            with pytest.raises(CapabilityDenied):
                op()
        assert region.load64(0) == 9
    finally:
        other.close()


def test_a_grant_naming_a_file_outside_the_node_directory_is_refused(node, fabric, monkeypatch):
    from grafos_fabric.drivers.node import shmfile

    real = shmfile.FileSpan.access
    monkeypatch.setattr(shmfile.FileSpan, "access",
                        lambda self, writable: {**real(self, writable), "path": "/etc/passwd"})
    with pytest.raises(Corrupted, match="no span file"):
        fabric.alloc(64, ttl=30.0)


def test_closing_the_fabric_closes_its_regions(fabric):
    region = fabric.alloc(64, ttl=30.0)
    fabric.close()
    with pytest.raises(QueueClosed):
        region.load64(0)


def test_after_a_node_restart_old_leases_end_as_lease_expired_and_new_ones_work(clock):
    first = NodeServer(ShmFileRegistrar(1 << 20), load_policy(SECRET), port=0, clock=clock).start()
    port = first.port
    f = NodeShmFabric("127.0.0.1", port, secret=SECRET)
    try:
        old = f.alloc(64, ttl=30.0)
        old.store64(0, 1)
        first.close()
        second = NodeServer(ShmFileRegistrar(1 << 20), load_policy(SECRET), port=port, clock=clock).start()
        try:
            with pytest.raises(LeaseExpired, match="unknown"):
                old.load64(0)
            new = f.alloc(64, ttl=30.0)
            new.store64(0, 2)
            assert new.load64(0) == 2
        finally:
            second.close()
    finally:
        f.close()


def test_the_one_sided_queue_carries_items_in_order_through_a_node(fabric):
    from grafos_fabric.queue import FabricQueue, OneSidedQueue

    producer = OneSidedQueue.create(fabric, capacity=1 << 16, ttl=30.0)
    consumer = FabricQueue.attach(fabric, producer.locator())
    try:
        sent = [np.full(100 + i, i % 251, dtype=np.uint8) for i in range(200)]
        got: list[np.ndarray] = []
        for item in sent:
            producer.push(item, timeout=30.0)
            while (popped := consumer.try_pop()) is not None:
                got.append(np.array(popped))
                popped.release()
        while len(got) < len(sent):
            popped = consumer.pop(timeout=30.0)
            got.append(np.array(popped))
            popped.release()
        assert all(np.array_equal(a, b) for a, b in zip(got, sent, strict=True))
    finally:
        consumer.close()
        producer.close()


def test_a_shared_ref_outlives_the_owners_renewals_but_not_the_lease(node, clock, fabric):
    region = fabric.alloc(64, ttl=10.0)
    ref = region.ref()  # what a queue locator carries
    for _ in range(5):  # the owner renews several times; the old deadline is long gone
        clock.advance(8.0)
        region.lease.renew(10.0)
    other = NodeShmFabric("127.0.0.1", node.port, secret=SECRET, clock=clock)
    try:
        theirs = other.attach(ref)
        region.store64(0, 3)
        assert theirs.load64(0) == 3
        region.lease.revoke()
        with pytest.raises(Revoked):
            other.attach(ref)
    finally:
        other.close()


def test_an_owner_that_attaches_its_own_lease_through_a_consumer_ref_keeps_its_rights(fabric):
    region = fabric.alloc(64, ttl=10.0)
    consumer_side = fabric.attach(region.ref())  # same process, same lease, a weaker capability
    assert consumer_side.lease.id == region.lease.id
    region.lease.renew(20.0)  # still the owner's capability: renew and revoke work
    region.lease.revoke()
    with pytest.raises(Revoked):
        consumer_side.load64(0)


def test_span_directories_of_dead_nodes_are_reaped_and_nothing_else(tmp_path):
    """A node holds a lock on its span directory; the next node made in the same root removes
    the directories whose lock nobody holds (nodes killed without closing), and leaves a live
    node's, one without a lock file (an older build's), another user's, and a symlink."""
    import fcntl
    import subprocess
    import sys

    root = str(tmp_path)
    live = ShmFileRegistrar(1 << 20, root=root)
    assert sorted(os.listdir(live.dir)) == [LOCK_NAME]  # the lock, under its name, already held:
    probe = os.open(os.path.join(live.dir, LOCK_NAME), os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)
    child = subprocess.run(  # a node process that dies without closing (os._exit: nothing cleaned up)
        [sys.executable, "-c", "import os, sys\nfrom grafos_fabric.drivers.node.shmfile import ShmFileRegistrar\n"
         "r = ShmFileRegistrar(1 << 20, root=sys.argv[1]); r.register(0, 4096)\nprint(r.dir, flush=True)\n"
         "os._exit(0)", root], capture_output=True, text=True, check=True)
    dead = child.stdout.strip()
    assert os.path.isdir(dead) and len(os.listdir(dead)) == 2  # the lock and a span file
    old = os.path.join(root, "grafos-node.older")
    os.mkdir(old, 0o700)  # no lock file
    other = os.path.join(root, "grafos-node.other")
    os.mkdir(other, 0o700)
    open(os.path.join(other, LOCK_NAME), "w").close()
    if os.geteuid() == 0:
        os.chown(other, 65534, 65534)
    link = os.path.join(root, "grafos-node.link")
    os.symlink(dead, link)
    try:
        nxt = ShmFileRegistrar(1 << 20, root=root)  # reaps first
        try:
            assert not os.path.exists(dead)
            assert os.path.isdir(live.dir) and os.path.isdir(nxt.dir) and os.path.isdir(old)
            assert os.path.islink(link)
            assert os.path.isdir(other) == (os.geteuid() == 0)  # only root could hand it to another user
            region_file = live.register(0, 4096).path  # the live node still works
            assert os.path.exists(region_file)
        finally:
            nxt.close()
        assert not os.path.exists(nxt.dir)
    finally:
        live.close()
    assert not os.path.exists(live.dir)
