"""Leases: TTL, renewal, fail-closed expiry, revocation, renewal policy."""

from __future__ import annotations

import time

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.lease import (
    NS,
    BackgroundRenewer,
    Lease,
    LocalLeaseCell,
    ManualClock,
    RenewalManager,
    RenewalPolicy,
)


def make_lease(clock: ManualClock, ttl: float = 10.0, lease_id: str = "abc") -> Lease:
    return Lease(lease_id, ttl=ttl, generation=1, cell=LocalLeaseCell(clock.now_ns() + int(ttl * NS)), clock=clock)


def test_lease_is_live_until_its_deadline_and_expired_at_it():
    clock = ManualClock()
    lease = make_lease(clock)
    clock.advance(9.999999)
    lease.check()
    assert lease.remaining() == pytest.approx(1e-6, abs=1e-7)
    clock.advance(0.000001)
    assert lease.expired
    with pytest.raises(E.LeaseExpired):
        lease.check()


def test_renew_extends_from_now_and_can_change_the_ttl():
    clock = ManualClock()
    lease = make_lease(clock)
    clock.advance(5)
    lease.renew()
    assert lease.remaining() == pytest.approx(10)
    lease.renew(ttl=2)
    assert lease.remaining() == pytest.approx(2)
    assert lease.ttl == 2


def test_expired_lease_cannot_be_renewed():
    clock = ManualClock()
    lease = make_lease(clock)
    clock.advance(11)
    with pytest.raises(E.LeaseExpired):
        lease.renew()


def test_revoked_lease_raises_revoked_before_expired_and_stays_revoked():
    clock = ManualClock()
    lease = make_lease(clock)
    lease.revoke()
    lease.revoke()
    with pytest.raises(E.Revoked):
        lease.check()
    clock.advance(100)
    with pytest.raises(E.Revoked):
        lease.check()
    with pytest.raises(E.Revoked):
        lease.renew()


def test_status_codes_match_grafos():
    assert E.Disconnected.code == -1
    assert E.LeaseExpired.code == -2
    assert E.Fenced.code == -3
    assert E.CapacityExceeded.code == -4
    assert E.Unsupported.code == -5
    assert E.Revoked.code == -6
    assert isinstance(E.from_status(-6), E.Revoked)
    assert E.from_status(-77).code == -77
    assert issubclass(E.FabricValueError, ValueError)
    assert issubclass(E.StaleEpoch, E.FabricError)


def test_every_native_status_maps_through_the_one_table_to_its_typed_exception():
    from grafos_fabric._ffi import lib, raise_status

    expected = {
        "GF_E_DISCONNECTED": E.Disconnected, "GF_E_EXPIRED": E.LeaseExpired, "GF_E_FENCED": E.StaleEpoch,
        "GF_E_CAPACITY": E.CapacityExceeded, "GF_E_UNSUPPORTED": E.Unsupported, "GF_E_REVOKED": E.Revoked,
        "GF_E_SEALED": E.QueueSealed, "GF_E_ROLE": E.RoleTaken, "GF_E_TOO_LARGE": E.ItemTooLarge,
        "GF_E_CORRUPT": E.Corrupted, "GF_E_NOT_READY": E.NotReady, "GF_E_VERSION": E.VersionMismatch,
        "GF_E_HELD": E.HeldItemsStall, "GF_E_CLAIMED": E.FabricValueError, "GF_E_ARG": E.FabricValueError,
    }  # fmt: skip
    assert set(expected) == {n for n in dir(lib) if n.startswith("GF_E_")}
    for name, cls in expected.items():
        with pytest.raises(cls) as info:
            raise_status(getattr(lib, name), "doing it", seal_seq=7, epoch=3)
        assert type(info.value) is cls, name
        assert str(info.value).endswith(": doing it")
    with pytest.raises(E.QueueSealed) as sealed:
        raise_status(lib.GF_E_SEALED, seal_seq=7)
    assert sealed.value.seal_seq == 7
    with pytest.raises(E.FabricError) as unknown:
        raise_status(-99, "x")
    assert unknown.value.code == -99 and type(unknown.value) is E.FabricError


def test_from_status_uses_the_caller_message_and_tells_a_stale_epoch_from_a_plain_fence():
    assert str(E.from_status(-2, "the node expired it")) == "the node expired it"
    assert str(E.from_status(-2, context="pushing")) == "lease expired: pushing"
    assert type(E.from_status(-3)) is E.Fenced
    stale = E.from_status(-3, epoch=4, current=5)
    assert isinstance(stale, E.StaleEpoch) and (stale.epoch, stale.current) == (4, 5)
    assert isinstance(E.from_status(E.STATUS_ACCESS_DENIED), E.AccessDenied)
    assert type(E.from_status(E.STATUS_ARG, "bad")) is E.FabricValueError


def test_renewal_policy_is_due_at_three_quarters_with_deterministic_jitter():
    policy = RenewalPolicy()
    due_a = policy.renewal_deadline_ns(0, 100 * NS, "lease-a")
    assert due_a == policy.renewal_deadline_ns(0, 100 * NS, "lease-a")
    for lid in ("a", "b", "c", "d", "e"):
        due = policy.renewal_deadline_ns(0, 100 * NS, lid)
        assert 65 * NS <= due <= 85 * NS
    assert len({policy.renewal_deadline_ns(0, 100 * NS, x) for x in "abcdef"}) > 1


def test_renewal_policy_rejects_nonsense():
    with pytest.raises(E.FabricValueError):
        RenewalPolicy(renew_at_fraction=1.5)
    with pytest.raises(E.FabricValueError):
        RenewalPolicy(jitter_fraction=0.5)


def test_backoff_doubles_and_is_capped():
    policy = RenewalPolicy(initial_backoff_secs=0.1, max_backoff_secs=1.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_manager_renews_only_when_due_and_drops_revoked_leases():
    clock = ManualClock()
    mgr = RenewalManager(RenewalPolicy(jitter_fraction=0.0), clock=clock)
    a = make_lease(clock, lease_id="a")
    b = make_lease(clock, lease_id="b")
    mgr.track(a)
    mgr.track(b)
    clock.advance(7)
    assert mgr.tick() == []
    b.revoke()
    clock.advance(0.6)
    assert mgr.tick() == [a]
    assert a.remaining() == pytest.approx(10)
    clock.advance(8)
    assert mgr.tick() == [a]  # b is no longer tracked


class _FlakyCell(LocalLeaseCell):
    def __init__(self, deadline_ns: int, failures: int) -> None:
        super().__init__(deadline_ns)
        self.failures = failures

    def store_deadline_ns(self, deadline_ns: int) -> None:
        if self.failures:
            self.failures -= 1
            raise E.Disconnected("control plane unreachable")
        super().store_deadline_ns(deadline_ns)


def test_manager_backs_off_after_a_failed_renewal_and_retries():
    clock = ManualClock()
    mgr = RenewalManager(RenewalPolicy(jitter_fraction=0.0, initial_backoff_secs=0.5), clock=clock)
    lease = Lease("f", ttl=10, generation=1, cell=_FlakyCell(clock.now_ns() + 10 * NS, 1), clock=clock)
    mgr.track(lease)
    clock.advance(7.6)
    assert mgr.tick() == []
    clock.advance(0.4)
    assert mgr.tick() == []  # still backing off
    clock.advance(0.2)
    assert mgr.tick() == [lease]


def test_background_renewer_keeps_a_shared_memory_lease_alive(namespace):
    """The renewer's thread renews on the fabric's clock. A manual clock steps past each renewal
    and the test waits (in real time, generously) for the thread to renew before it steps on:
    a stalled machine slows the test down but cannot expire the lease (with real time, a 0.3 s TTL
    renewed at 75 % left the thread 75 ms to be scheduled; a loaded machine can take longer)."""
    clock = ManualClock()
    fabric = gf.open_fabric(f"shm://{namespace}", clock=clock)
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=0.3)
    granted = clock.now_ns()
    renewals = 0
    with BackgroundRenewer(RenewalManager(clock=clock), poll=0.01) as renewer:
        renewer.manager.track(q.lease)
        for _ in range(40):  # 40 steps of 25 ms: a second of the lease's clock, more than three TTLs
            due = renewer.manager.next_due_ns()
            assert due is not None and due < q.lease.deadline_ns  # due (75 % +- 10 %) before it expires
            before = q.lease.deadline_ns
            clock.advance(0.025)  # never past the deadline: each renewal is due at most 0.255 s in
            if clock.now_ns() < due:
                continue
            end = time.monotonic() + 60
            # the thread's next tick renews it, then sets when the next renewal is due (both, before
            # the next step reads that)
            while q.lease.deadline_ns == before or (renewer.manager.next_due_ns() or 0) <= clock.now_ns():
                assert time.monotonic() < end, "the background renewer did not renew a due lease"
                time.sleep(0.001)
            renewals += 1
        assert clock.now_ns() - granted > 3 * 0.3 * NS and renewals >= 3
        q.push(b"still alive after more than three TTLs")
    assert q.pop(timeout=1).tobytes().startswith(b"still alive")
    clock.advance(0.3)  # and with no renewer it expires on the same clock: the renewals were needed
    with pytest.raises(E.LeaseExpired):
        q.push(b"late")
