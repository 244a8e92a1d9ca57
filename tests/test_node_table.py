"""The memory node's pool allocator and lease table (with tenant quotas), on a manual clock (no device, no sockets)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from grafos_fabric.drivers.node.registrar import RegisteredSpan, RegistrarSession
from grafos_fabric.drivers.node.table import Allocator, LeaseTable
from grafos_fabric.errors import CapacityExceeded, FabricValueError, LeaseExpired, QuotaExceeded, Revoked
from grafos_fabric.lease import ManualClock

# ---------------------------------------------------------------------------
# Allocator
# ---------------------------------------------------------------------------


def test_allocator_hands_out_aligned_spans_first_fit():
    a = Allocator(16 * 4096, align=4096)
    assert a.alloc(1) == 0
    assert a.alloc(4097) == 4096
    assert a.alloc(4096) == 3 * 4096
    assert a.free_bytes == 12 * 4096


def test_allocator_reuses_a_freed_hole_and_coalesces_neighbours():
    a = Allocator(4 * 4096, align=4096)
    offs = [a.alloc(4096) for _ in range(4)]
    a.release(offs[1], 4096)
    a.release(offs[2], 4096)
    assert a.alloc(2 * 4096) == offs[1]  # only possible if the two holes merged
    with pytest.raises(CapacityExceeded):
        a.alloc(1)


def test_allocator_refuses_what_does_not_fit_with_capacity_exceeded():
    a = Allocator(8192, align=4096)
    with pytest.raises(CapacityExceeded, match="8193"):
        a.alloc(8193)


def test_allocator_detects_a_double_free():
    a = Allocator(8192, align=4096)
    off = a.alloc(10)
    a.release(off, 10)
    with pytest.raises(FabricValueError, match="double free"):
        a.release(off, 10)


@pytest.mark.parametrize(("size", "align"), [(0, 4096), (4096, 3000), (4096, 0)])
def test_allocator_rejects_a_nonsense_geometry(size, align):
    with pytest.raises(FabricValueError):
        Allocator(size, align)


# ---------------------------------------------------------------------------
# LeaseTable
# ---------------------------------------------------------------------------


@dataclass
class Span:
    addr: int
    rkey: int
    offset: int = 0
    nbytes: int = 0

    def access(self, writable: bool) -> dict[str, int]:
        return {"addr": self.addr, "rkey": self.rkey}


class Registrar:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, int, int]] = []
        self.live: set[int] = set()
        self._rkey = 0

    def register(self, offset: int, nbytes: int) -> Span:
        if self.fail:
            raise OSError("ibv_reg_mr failed")
        self._rkey += 1
        self.calls.append(("reg", offset, nbytes))
        self.live.add(self._rkey)
        return Span(addr=0x1000_0000 + offset, rkey=self._rkey, offset=offset, nbytes=nbytes)

    def fence(self, span: RegisteredSpan, holders: list[RegistrarSession]) -> None:
        assert isinstance(span, Span) and span.rkey in self.live, "fence comes before deregister"
        self.calls.append(("fence", span.addr - 0x1000_0000, len(holders)))

    def deregister(self, span: RegisteredSpan) -> None:
        assert span.rkey in self.live, f"rkey {span.rkey} deregistered twice"
        self.live.remove(span.rkey)
        self.calls.append(("dereg", span.addr - 0x1000_0000, span.rkey))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=100.0)


@pytest.fixture
def reg() -> Registrar:
    return Registrar()


@pytest.fixture
def table(reg: Registrar, clock: ManualClock) -> LeaseTable:
    return LeaseTable(64 * 4096, reg, clock, align=4096, node_tag="n0")


def test_alloc_registers_the_page_rounded_span_and_sets_the_deadline(table, reg, clock):
    lease = table.alloc(5000, ttl=3.0)
    assert reg.calls == [("reg", 0, 8192)]
    assert lease.span is not None and lease.span.addr == 0x1000_0000
    assert (lease.nbytes, lease.ttl, lease.state) == (5000, 3.0, "active")
    assert lease.deadline_ns == clock.now_ns() + 3_000_000_000
    assert table.status(lease.lease_id) == ("active", lease.generation, 3.0)


def test_generations_grow_and_lease_ids_are_unique(table):
    leases = [table.alloc(1, ttl=1.0) for _ in range(5)]
    assert [x.generation for x in leases] == [1, 2, 3, 4, 5]
    assert len({x.lease_id for x in leases}) == 5
    # 128-bit random hex: nothing in one id (or the node tag) tells a stranger another
    assert all(len(x.lease_id) == 32 and int(x.lease_id, 16) >= 0 and "n0" not in x.lease_id for x in leases)


def test_a_lease_expires_exactly_at_its_deadline_and_is_deregistered_once(table, reg, clock):
    lease = table.alloc(100, ttl=2.0)
    rkey = lease.span.rkey
    clock.advance(1.999999)
    assert table.reap() == 0
    assert rkey in reg.live
    clock.advance(0.000001)
    assert table.reap() == 1
    assert rkey not in reg.live
    assert table.reap() == 0
    assert [c for c in reg.calls if c[0] in ("fence", "dereg")] == [("fence", 0, 0), ("dereg", 0, rkey)]
    assert table.status(lease.lease_id) == ("expired", lease.generation, 0.0)
    assert len(table) == 0


def test_every_request_enforces_expiry_even_without_the_reaper(table, reg, clock):
    lease = table.alloc(100, ttl=1.0)
    clock.advance(5.0)
    with pytest.raises(LeaseExpired, match="expired"):
        table.renew(lease.lease_id, 10.0)
    assert reg.live == set()


def test_renew_extends_from_now_and_never_resurrects(table, clock):
    lease = table.alloc(100, ttl=2.0)
    clock.advance(1.5)
    assert table.renew(lease.lease_id, 4.0) == 4.0
    clock.advance(3.9)
    assert table.reap() == 0
    clock.advance(0.1)
    assert table.reap() == 1
    with pytest.raises(LeaseExpired):
        table.renew(lease.lease_id, 4.0)


def test_revoke_deregisters_at_once_and_later_calls_raise_revoked(table, reg):
    lease = table.alloc(100, ttl=60.0)
    table.revoke(lease.lease_id)
    assert reg.live == set()
    assert table.status(lease.lease_id)[0] == "revoked"
    with pytest.raises(Revoked):
        table.renew(lease.lease_id, 1.0)
    with pytest.raises(Revoked):
        table.attach(lease.lease_id, lease.generation)
    table.revoke(lease.lease_id)  # idempotent


def test_free_returns_the_memory_to_the_pool(reg, clock):
    table = LeaseTable(2 * 4096, reg, clock, align=4096)
    lease = table.alloc(8192, ttl=60.0)
    with pytest.raises(CapacityExceeded):
        table.alloc(1, ttl=60.0)
    table.free(lease.lease_id)
    table.free(lease.lease_id)  # idempotent
    assert table.status(lease.lease_id)[0] == "freed"
    assert table.alloc(8192, ttl=60.0).offset == 0


def test_expired_memory_is_reused_only_after_deregistration(reg, clock):
    table = LeaseTable(4096, reg, clock, align=4096)
    old = table.alloc(4096, ttl=1.0)
    clock.advance(1.0)
    new = table.alloc(4096, ttl=1.0)  # alloc reaps first, so the pool has room again
    assert new.offset == old.offset
    assert reg.calls == [("reg", 0, 4096), ("fence", 0, 0), ("dereg", 0, 1), ("reg", 0, 4096)]


def test_attach_needs_the_current_generation(table):
    lease = table.alloc(10, ttl=60.0)
    assert table.attach(lease.lease_id, lease.generation) is lease
    with pytest.raises(LeaseExpired, match="generation 99"):
        table.attach(lease.lease_id, 99)


def test_a_failed_registration_leaves_no_lease_and_no_lost_memory(clock):
    reg = Registrar(fail=True)
    table = LeaseTable(4096, reg, clock, align=4096)
    with pytest.raises(OSError):
        table.alloc(4096, ttl=1.0)
    assert len(table) == 0
    assert table.allocator.free_bytes == 4096


def test_forgotten_tombstones_report_unknown(reg, clock):
    table = LeaseTable(64 * 4096, reg, clock, align=4096, tombstones=2)
    ids = [table.alloc(1, ttl=60.0).lease_id for _ in range(3)]
    for i in ids:
        table.free(i)
    assert table.status(ids[0])[0] == "unknown"
    assert [table.status(i)[0] for i in ids[1:]] == ["freed", "freed"]
    with pytest.raises(LeaseExpired, match="unknown"):
        table.renew(ids[0], 1.0)


@pytest.mark.parametrize(("nbytes", "ttl"), [(0, 1.0), (-5, 1.0), (1, 0.0), (1, -1.0), (1, float("nan"))])
def test_alloc_rejects_nonsense_sizes_and_ttls(table, nbytes, ttl):
    with pytest.raises(FabricValueError):
        table.alloc(nbytes, ttl)


def test_memory_whose_deregistration_failed_is_quarantined_not_reused(reg, clock):
    table = LeaseTable(4096, reg, clock, align=4096)
    lease = table.alloc(4096, ttl=1.0)

    def broken(span: RegisteredSpan) -> None:
        raise OSError("ibv_dereg_mr failed")

    reg.deregister = broken  # type: ignore[method-assign]
    clock.advance(1.0)
    assert table.reap() == 1
    assert table.status(lease.lease_id)[0] == "expired"
    assert table.quarantined == [(0, 4096)]
    with pytest.raises(CapacityExceeded):
        table.alloc(1, ttl=1.0)


def test_close_deregisters_every_live_lease(table, reg):
    for _ in range(3):
        table.alloc(1, ttl=60.0)
    table.close()
    assert reg.live == set()
    assert len(table) == 0


def test_memory_whose_fence_failed_is_quarantined_and_never_deregistered_into_reuse(reg, clock):
    table = LeaseTable(4096, reg, clock, align=4096)
    lease = table.alloc(4096, ttl=60.0)

    def broken(span: RegisteredSpan, holders: list[RegistrarSession]) -> None:
        raise OSError("could not close the holders' endpoints")

    reg.fence = broken  # type: ignore[method-assign]
    table.revoke(lease.lease_id)
    assert table.quarantined == [(0, 4096)]
    assert reg.live == {lease_rkey(reg)}, "a span whose fence failed must not be deregistered and reused"
    with pytest.raises(CapacityExceeded):
        table.alloc(1, ttl=1.0)


def lease_rkey(reg: Registrar) -> int:
    return next(iter(reg.live))


def test_a_tenant_over_its_byte_quota_is_refused_and_nothing_changes(table, reg):
    table.alloc(4096, ttl=60.0, tenant="a", quota_bytes=3 * 4096)
    table.alloc(4097, ttl=60.0, tenant="a", quota_bytes=3 * 4096)  # rounds to 2 pages: exactly the quota
    calls = list(reg.calls)
    with pytest.raises(QuotaExceeded, match="quota"):
        table.alloc(1, ttl=60.0, tenant="a", quota_bytes=3 * 4096)
    assert reg.calls == calls and len(table) == 2
    assert table.alloc(4096, ttl=60.0, tenant="b", quota_bytes=3 * 4096).tenant == "b"  # others unaffected
    assert (table.usage("a").leases, table.usage("a").bytes) == (2, 3 * 4096)


def test_a_tenant_over_its_lease_count_is_refused_until_one_ends(table):
    first = table.alloc(1, ttl=60.0, tenant="a", max_leases=1)
    with pytest.raises(QuotaExceeded, match="limit is 1"):
        table.alloc(1, ttl=60.0, tenant="a", max_leases=1)
    table.free(first.lease_id)
    assert table.alloc(1, ttl=60.0, tenant="a", max_leases=1).tenant == "a"
    assert table.usage("a").leases == 1
