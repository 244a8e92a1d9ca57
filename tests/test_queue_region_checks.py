"""The queue follows its region: the region's clock domain, and a segment shrunk under a waiter."""

from __future__ import annotations

import os

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.shm import SHM_DIR
from grafos_fabric.lease import ManualClock


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "onesided"])
def test_a_manual_clock_fabric_uses_a_host_clock_queue_on_the_host_clock(namespace: str, mapped: bool) -> None:
    host = gf.open_fabric(f"shm://{namespace}")
    tx = gf.FabricQueue.create(host, capacity=4096, ttl=60.0)
    tx.push(b"on the host clock")
    manual = gf.open_fabric(f"shm://{namespace}", clock=ManualClock(start=10.0**9))
    rx = gf.FabricQueue.attach(manual, bytes(tx.locator()), mapped=mapped)
    # judged by the manual clock the lease would be long expired; it is not: it lives on the host clock
    assert rx.pop(timeout=5).tobytes() == b"on the host clock"
    tx.free()


def test_a_segment_shrunk_before_a_blocking_wait_raises_corrupted(namespace: str) -> None:
    """The check runs before every blocking wait. (A truncation that lands while a
    thread is inside an access can still raise SIGBUS: README, shared-memory limits.)"""
    fabric = gf.open_fabric(f"shm://{namespace}")
    q = gf.FabricQueue.create(fabric, capacity=1 << 16, ttl=60.0)
    rx = gf.FabricQueue.attach(fabric, bytes(q.locator()))
    assert rx.try_pop() is None  # the consumer role is claimed, the queue is empty
    name = os.path.join(SHM_DIR, f"grafos.{namespace}.{q.region.ref().name}")
    assert os.path.exists(name)
    os.truncate(name, 2 * 4096)  # a co-tenant cuts the data area; the headers stay mapped
    with pytest.raises(E.Corrupted):
        rx.pop(timeout=5)
    with pytest.raises(E.Corrupted):
        rx.pop(timeout=5)  # and stays refused
