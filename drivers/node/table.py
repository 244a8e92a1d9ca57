"""The node's pool allocator and lease table (pure bookkeeping: no sockets, no device).

The table drives a :class:`~.registrar.Registrar` (register on alloc; fence
then deregister on revoke, free, expiry or shutdown) and enforces each
tenant's quota and lease count. Lease ids are 128-bit random hex
(``secrets.token_hex(16)``): nothing about one lease tells a stranger the id
of another.
"""

from __future__ import annotations

import collections
import logging
import mmap
import secrets
import threading
from dataclasses import dataclass, field

from grafos_fabric import observe
from grafos_fabric.errors import CapacityExceeded, FabricValueError, LeaseExpired, QuotaExceeded, Revoked
from grafos_fabric.lease import NS, Clock, MonotonicClock, check_ttl

from .registrar import RegisteredSpan, Registrar, RegistrarSession
from .wire import ACTIVE, EXPIRED, FREED, MAX_REGION, REVOKED, UNKNOWN

__all__ = ["Allocator", "LeaseTable", "ServerLease", "TenantUsage"]

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE


class Allocator:
    """First-fit allocation of page-aligned spans of ``[0, size)``, with coalescing free."""

    def __init__(self, size: int, align: int = PAGE) -> None:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise FabricValueError(f"bad allocator size {size} / alignment {align}")
        self.size = size - size % align
        self.align = align
        self._free: list[tuple[int, int]] = [(0, self.size)] if self.size else []  # (offset, length), sorted

    def round(self, nbytes: int) -> int:
        return (nbytes + self.align - 1) // self.align * self.align

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def alloc(self, nbytes: int) -> int:
        """The offset of a span of ``round(nbytes)`` bytes; ``CapacityExceeded`` when none fits."""
        need = self.round(nbytes)
        for i, (off, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, n - need)
                return off
        raise CapacityExceeded(f"pool cannot fit {nbytes} bytes ({self.free_bytes} free, fragmented)")

    def release(self, offset: int, nbytes: int) -> None:
        n = self.round(nbytes)
        spans = sorted([*self._free, (offset, n)])
        merged: list[tuple[int, int]] = []
        for off, ln in spans:
            if merged and merged[-1][0] + merged[-1][1] > off:
                raise FabricValueError(f"double free of pool span at {offset}")
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + ln)
            else:
                merged.append((off, ln))
        self._free = merged


@dataclass(eq=False)
class ServerLease:
    """The node's record of one lease."""

    lease_id: str
    tenant: str
    generation: int
    offset: int
    nbytes: int
    ttl: float
    deadline_ns: int
    state: str = ACTIVE
    span: RegisteredSpan | None = None
    holders: list[RegistrarSession] = field(default_factory=list)


@dataclass
class TenantUsage:
    leases: int = 0
    bytes: int = 0


class LeaseTable:
    """The memory node's leases: alloc, attach, renew, free, revoke, status, reap.

    Expiry is enforced in two places: every call first retires the leases whose
    deadline has passed, and the node's reaper calls :meth:`reap` regularly so
    remote access stops promptly even when no request comes in. Retiring a
    lease fences and deregisters its span (exactly once), returns the memory
    to the pool and keeps a tombstone, so a later status query says *why* the
    lease is gone (``expired``, ``revoked`` or ``freed``) instead of
    ``unknown``. Generations grow by one per allocation, for the node's life.
    Quotas: ``alloc(..., quota_bytes=, max_leases=)`` counts the tenant's live
    leases (rounded sizes) before touching the pool.
    """

    def __init__(
        self,
        pool_size: int,
        registrar: Registrar,
        clock: Clock | None = None,
        *,
        align: int = PAGE,
        tombstones: int = 4096,
        node_tag: str | None = None,
    ) -> None:
        self.allocator = Allocator(pool_size, align)
        self.registrar = registrar
        self.clock: Clock = clock or MonotonicClock()
        self.node_tag = node_tag or secrets.token_hex(4)
        self._leases: dict[str, ServerLease] = {}
        self.quarantined: list[tuple[int, int]] = []  # (offset, nbytes) whose fence/deregistration failed
        self._tombs: collections.OrderedDict[str, ServerLease] = collections.OrderedDict()
        self._max_tombs = tombstones
        self._gen = 0
        self._usage: dict[str, TenantUsage] = collections.defaultdict(TenantUsage)
        self._lock = threading.RLock()

    # -- queries -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._leases)

    def leases(self) -> list[ServerLease]:
        with self._lock:
            return list(self._leases.values())

    def usage(self, tenant: str) -> TenantUsage:
        with self._lock:
            u = self._usage.get(tenant)
            return TenantUsage(u.leases, u.bytes) if u else TenantUsage()

    @property
    def quarantined_bytes(self) -> int:
        return sum(n for _, n in self.quarantined)

    def remaining(self, lease: ServerLease) -> float:
        return (lease.deadline_ns - self.clock.now_ns()) / NS

    def find(self, lease_id: str) -> ServerLease:
        """The live lease ``lease_id``; typed failure when it is gone."""
        with self._lock:
            self.reap()
            lease = self._leases.get(lease_id)
            if lease is not None:
                return lease
            tomb = self._tombs.get(lease_id)
            if tomb is None:
                raise LeaseExpired(f"lease {lease_id} is unknown to node {self.node_tag}")
            if tomb.state == REVOKED:
                raise Revoked(f"lease {lease_id} was revoked")
            raise LeaseExpired(f"lease {lease_id} was {tomb.state}")

    def lookup(self, lease_id: str) -> ServerLease | None:
        """The live lease or its tombstone (``None`` when never seen or forgotten)."""
        with self._lock:
            self.reap()
            return self._leases.get(lease_id) or self._tombs.get(lease_id)

    def status(self, lease_id: str) -> tuple[str, int, float]:
        """``(state, generation, remaining seconds)``; state ``unknown`` when never seen (or forgotten)."""
        with self._lock:
            lease = self.lookup(lease_id)
            if lease is None:
                return UNKNOWN, 0, 0.0
            remaining = self.remaining(lease) if lease.state == ACTIVE else 0.0
            return lease.state, lease.generation, remaining

    # -- lifecycle -----------------------------------------------------------
    def alloc(self, nbytes: int, ttl: float, *, tenant: str = "default", quota_bytes: int = 0,
              max_leases: int = 0) -> ServerLease:
        """A new lease of ``nbytes`` for ``tenant``. ``QuotaExceeded`` when the tenant's
        ``quota_bytes``/``max_leases`` (0: unlimited) would be passed; ``CapacityExceeded`` when
        the pool cannot fit it. Nothing changes on either error."""
        ttl = check_ttl(ttl)
        if not isinstance(nbytes, int) or not 0 < nbytes <= MAX_REGION:
            raise FabricValueError(f"nbytes must be in (0, {MAX_REGION}], got {nbytes}")
        with self._lock:
            self.reap()
            rounded = self.allocator.round(nbytes)
            use = self._usage[tenant]
            if max_leases and use.leases + 1 > max_leases:
                observe.count("node_denials", reason="quota_leases")
                raise QuotaExceeded(f"tenant {tenant} holds {use.leases} leases: its limit is {max_leases}")
            if quota_bytes and use.bytes + rounded > quota_bytes:
                observe.count("node_denials", reason="quota_bytes")
                raise QuotaExceeded(f"tenant {tenant} holds {use.bytes} bytes; {rounded} more would pass "
                                    f"its quota of {quota_bytes}")
            offset = self.allocator.alloc(nbytes)
            try:
                span = self.registrar.register(offset, rounded)
            except BaseException:
                self.allocator.release(offset, nbytes)
                raise
            self._gen += 1
            lease = ServerLease(
                lease_id=secrets.token_hex(16),
                tenant=tenant,
                generation=self._gen,
                offset=offset,
                nbytes=nbytes,
                ttl=ttl,
                deadline_ns=self.clock.now_ns() + int(ttl * NS),
                span=span,
            )
            self._leases[lease.lease_id] = lease
            use.leases += 1
            use.bytes += rounded
            observe.count("node_leases_granted", tenant=tenant)
            log.info("lease %s (%s): %d bytes at pool offset %d for %.3fs", lease.lease_id, tenant, nbytes,
                     offset, ttl)
            return lease

    def attach(self, lease_id: str, generation: int) -> ServerLease:
        """The live lease ``lease_id`` of ``generation``; ``LeaseExpired``/``Revoked`` when it is gone."""
        with self._lock:
            lease = self.find(lease_id)
            if lease.generation != generation:
                raise LeaseExpired(f"lease {lease_id} generation {generation} is gone (now {lease.generation})")
            return lease

    def renew(self, lease_id: str, ttl: float) -> float:
        """Extend to now + ``ttl``; returns the remaining seconds. Never resurrects a lease."""
        ttl = check_ttl(ttl)
        with self._lock:
            lease = self.find(lease_id)
            lease.ttl = ttl
            lease.deadline_ns = self.clock.now_ns() + int(ttl * NS)
            return self.remaining(lease)

    def free(self, lease_id: str) -> None:
        """Give the lease back. Idempotent: freeing a lease that is already gone is not an error."""
        with self._lock:
            self.reap()
            lease = self._leases.get(lease_id)
            if lease is not None:
                self._retire(lease, FREED)

    def revoke(self, lease_id: str) -> None:
        """Revoke the lease: remote access stops now; status says ``revoked``. Idempotent."""
        with self._lock:
            self.reap()
            lease = self._leases.get(lease_id)
            if lease is not None:
                self._retire(lease, REVOKED)
                return
            if lease_id not in self._tombs:
                raise LeaseExpired(f"lease {lease_id} is unknown to node {self.node_tag}")

    def drop_holder(self, session: RegistrarSession) -> None:
        """Forget ``session`` as a holder of every lease (its connection ended)."""
        with self._lock:
            for lease in self._leases.values():
                if session in lease.holders:
                    lease.holders = [h for h in lease.holders if h is not session]

    def reap(self) -> int:
        """Retire every lease past its deadline; returns how many."""
        with self._lock:
            now = self.clock.now_ns()
            due = [lease for lease in self._leases.values() if now >= lease.deadline_ns]
            for lease in due:
                self._retire(lease, EXPIRED)
            return len(due)

    def close(self) -> None:
        """Fence and deregister everything (node shutdown): clients see their leases as freed."""
        with self._lock:
            for lease in list(self._leases.values()):
                self._retire(lease, FREED)

    def _retire(self, lease: ServerLease, state: str) -> None:
        """End a lease. Its memory goes back to the pool only once remote access
        to it is gone: if fencing or deregistration fails, the span is
        quarantined (never handed out again), because a new tenant's bytes
        would be reachable through the old key."""
        del self._leases[lease.lease_id]
        use = self._usage[lease.tenant]
        use.leases -= 1
        use.bytes -= self.allocator.round(lease.nbytes)
        lease.state = state
        span, lease.span = lease.span, None
        holders, lease.holders = lease.holders, []
        self._tombs[lease.lease_id] = lease
        while len(self._tombs) > self._max_tombs:
            self._tombs.popitem(last=False)
        observe.count("node_leases_ended", reason=state)
        try:
            if span is not None:
                self.registrar.fence(span, holders)
                self.registrar.deregister(span)
        except Exception:
            self.quarantined.append((lease.offset, lease.nbytes))
            log.exception("lease %s %s, but fencing/deregistering its span failed: %d bytes quarantined",
                          lease.lease_id, state, lease.nbytes)
            return
        self.allocator.release(lease.offset, lease.nbytes)
        log.info("lease %s %s", lease.lease_id, state)
