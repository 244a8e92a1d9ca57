"""What a consumer's rebind costs: the attach path's shortcuts keep their checks."""

from __future__ import annotations

import gc
import os
import secrets
from collections.abc import Iterator

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric.drivers.base import MappedRegion
from grafos_fabric.errors import Unsupported
from grafos_fabric.queue import FabricQueue
from grafos_fabric.queue import _handle as queuemod


@pytest.fixture
def fabric() -> Iterator[gf.Fabric]:
    fab = gf.open_fabric(f"shm://rebind-{os.getpid()}-{secrets.token_hex(3)}")
    yield fab
    fab.reap()


def test_the_mapped_region_check_agrees_with_the_protocol_and_remembers_only_classes_that_pass(
    fabric: gf.Fabric,
) -> None:
    q = FabricQueue.create(fabric, 1 << 16, 30.0)
    try:
        region = q.region
        assert isinstance(region, MappedRegion)
        assert queuemod._is_mapped_region(region) and type(region) in queuemod._MAPPED_TYPES

        class NotMapped:
            mapped = True

        for _ in range(2):  # a failing class is checked every time, never remembered
            assert not queuemod._is_mapped_region(NotMapped())
        assert NotMapped not in queuemod._MAPPED_TYPES
    finally:
        q.free()


def test_a_region_that_is_not_mapped_is_still_refused(fabric: gf.Fabric) -> None:
    q = FabricQueue.create(fabric, 1 << 16, 30.0)
    try:

        class Half:  # says it is mapped, has none of the protocol's members
            mapped = True
            lease = q.region.lease

        with pytest.raises(Unsupported):
            FabricQueue(fabric, Half(), owner=False)  # type: ignore[arg-type]
    finally:
        q.free()


def test_consumers_attached_again_and_again_deliver_every_item_in_order(fabric: gf.Fabric) -> None:
    """The consumer's pending-release arrays are no longer zeroed when it attaches: every attach
    (as a rebind does) must still deliver every item, in order, with its payload."""
    q = FabricQueue.create(fabric, 1 << 16, 30.0)
    try:
        loc = q.locator()
        seq = 0
        for _round in range(20):
            c = FabricQueue.attach(fabric, loc)
            for _ in range(50):
                q.push(np.full(8, seq, dtype=np.int64))
                seq += 1
            got = []
            while True:
                it = c.try_pop()
                if it is None:
                    break
                got.append((it.seq, int(np.asarray(it).view(np.int64)[0])))
                it.release()
            assert [s for s, _ in got] == list(range(seq - 50, seq))
            assert all(s == v for s, v in got)
            c.close()
            gc.collect()
    finally:
        q.free()
