"""The driver protocol's region operations (drivers/base.py ``Region``), the same on every driver.

One client allocates, a second attaches through the region's ref and reaches it
one-sided (for shm: a second handle on the same fabric); both see the same
bytes and the same atomics, out-of-range and misaligned operations get typed
errors, and a revoked lease fails closed for every holder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from grafos_fabric import errors as E

pytestmark = pytest.mark.drivers("shm", "nodeshm", "ucx-tcp", "ucx-sm", "ucx-map", "softverbs", "verbs")


def two_holders(driver: Any, nbytes: int = 8192) -> tuple[Any, Any]:
    owner = driver.fabric.alloc(nbytes, ttl=driver.ttl)
    other = driver.consumer_fabric.attach(owner.ref(), mapped=False)
    return owner, other


def test_bytes_written_by_one_holder_are_read_by_the_other(driver):
    owner, other = two_holders(driver)
    assert other.mapped is False
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)
    owner.write(100, data)
    out = np.zeros(5000, dtype=np.uint8)
    other.read_into(100, out)
    assert np.array_equal(out, data)
    other.write(6000, b"back")
    other.flush()
    got = bytearray(4)
    owner.read_into(6000, got)
    assert got == b"back"


def test_atomics_return_the_old_value_and_are_seen_by_both_holders(driver):
    owner, other = two_holders(driver)
    owner.store64(8, 0x0102030405060708)
    owner.flush()
    assert other.load64(8) == 0x0102030405060708
    assert other.faa64(8, 1) == 0x0102030405060708
    assert other.cas64(8, 0x0102030405060709, 5) == 0x0102030405060709
    assert other.cas64(8, 0x0102030405060709, 6) == 5  # a failed compare leaves the word alone
    assert owner.load64(8) == 5


def test_a_new_lease_reads_as_zeros(driver):
    owner, _ = two_holders(driver, 4096)
    out = bytearray(b"\xff" * 4096)
    owner.read_into(0, out)
    assert out == bytearray(4096)


def test_out_of_range_and_misaligned_operations_get_typed_errors(driver):
    _, other = two_holders(driver, 4096)
    with pytest.raises(E.CapacityExceeded):
        other.write(4092, b"12345")
    with pytest.raises((E.CapacityExceeded, E.FabricValueError)):
        other.read_into(-1, bytearray(1))
    with pytest.raises(E.FabricValueError, match="align"):
        other.load64(4)
    with pytest.raises(E.FabricValueError, match="align"):
        other.cas64(12, 0, 1)


def test_a_revoked_lease_fails_closed_for_every_holder(driver):
    owner, other = two_holders(driver, 4096)
    owner.write(0, b"before")
    owner.lease.revoke()
    for holder in (owner, other):
        with pytest.raises((E.Revoked, E.LeaseExpired)):
            holder.read_into(0, bytearray(6))
        with pytest.raises((E.Revoked, E.LeaseExpired)):
            holder.write(0, b"after")


def test_a_holder_fenced_by_one_revoke_keeps_its_other_leases_and_never_regains_the_revoked_one(driver):
    """A revoke fences every holder of that lease (UCX: the node destroys their sessions' workers);
    a holder then reconnects for the leases it still has, and the new connection must not
    reopen the revoked one (over tcp/sm an rkey is no capability)."""
    owner, other = two_holders(driver, 4096)
    keep_owner, keep_other = two_holders(driver, 4096)
    other.read_into(0, bytearray(8))  # both holders have used both regions before the revoke
    keep_other.read_into(0, bytearray(8))
    owner.lease.revoke()
    keep_owner.write(0, b"still")
    keep_owner.flush()
    got = bytearray(5)
    for _ in range(2):  # the first call may be the one that finds the fence; the second reconnects
        try:
            keep_other.read_into(0, got)
            break
        except E.Disconnected:
            continue
    assert got == b"still"
    for holder in (owner, other):
        with pytest.raises((E.Revoked, E.LeaseExpired)):
            holder.read_into(0, bytearray(6))
        with pytest.raises((E.Revoked, E.LeaseExpired)):
            holder.write(0, b"after")


def test_a_failed_read_or_write_leaves_the_callers_buffer_unexported(driver):
    """A read_into/write that raises (out of range, or a revoked lease) holds no export of the
    caller's buffer once it has raised: the traceback keeps the raising frame alive, and a
    memoryview still exported from it cannot be released, and crashes CPython 3.11 if the GC
    clears it (a SIGSEGV seen on UCX 1.22 before that driver released its views)."""
    owner, other = two_holders(driver)
    for region in (owner, other):
        arr = np.zeros(64, dtype=np.uint8)
        for op in (region.read_into, region.write):
            mv = memoryview(arr)
            with pytest.raises(E.FabricError) as failed:
                op(region.nbytes - 8, mv)  # 56 bytes past the end
            mv.release()  # BufferError if a view of it is still alive in the traceback
            del failed
    owner.lease.revoke()
    arr = np.zeros(64, dtype=np.uint8)
    for op in (other.read_into, other.write, owner.read_into, owner.write):
        mv = memoryview(arr)
        with pytest.raises(E.FabricError) as failed:
            op(0, mv)
        mv.release()
        del failed
