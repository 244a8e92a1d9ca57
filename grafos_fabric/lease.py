"""Leases: a TTL, renewal, fail-closed expiry, revocation and a generation.

A :class:`Lease` binds a resource (a memory region, a block range) to a
deadline. Its state lives in a :class:`LeaseCell`: for shared memory that cell
is the segment header, so every process attached to the region sees the same
deadline and the same revoke; for process-local resources it is a plain object.

Time comes from an injectable :class:`Clock`. Deadlines are integer
nanoseconds in that clock's domain. :class:`MonotonicClock` (the default) is
``CLOCK_MONOTONIC``, which is system wide on Linux, so processes on one machine
agree on it; :class:`ManualClock` lets a test expire a lease at an exact step.

Clock domains: every clock names the domain its nanoseconds belong to
(:func:`clock_domain`). ``HOST_CLOCK_DOMAIN`` (0) is ``CLOCK_MONOTONIC``, which
any process on the host can read; every :class:`ManualClock` (and any other
injected clock) is a private domain of its own, so a deadline written under it
is only judged by holders of that very clock (see ``drivers/shm.py``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import observe
from ._item import LeaseCellBase
from .errors import FabricValueError, LeaseExpired, Revoked

__all__ = [
    "HOST_CLOCK_DOMAIN",
    "BackgroundRenewer",
    "Clock",
    "Lease",
    "LeaseCell",
    "LeaseState",
    "LocalLeaseCell",
    "ManualClock",
    "MonotonicClock",
    "RenewalManager",
    "RenewalPolicy",
    "check_ttl",
    "clock_domain",
]

log = logging.getLogger(__name__)

NS = 1_000_000_000
HOST_CLOCK_DOMAIN = 0  # CLOCK_MONOTONIC: one clock for every process on the host
MAX_TTL = 10 * 365 * 24 * 3600.0  # ten years: anything longer is a mistake


class Clock(Protocol):
    """A source of time in integer nanoseconds.

    ``native`` is true when the clock is ``CLOCK_MONOTONIC``: the native layer
    then reads the time itself instead of being handed it on every call.
    """

    native: bool

    def now_ns(self) -> int: ...


class MonotonicClock:
    """``CLOCK_MONOTONIC`` (system wide on Linux)."""

    native = True
    domain = HOST_CLOCK_DOMAIN

    def now_ns(self) -> int:
        return time.monotonic_ns()


class ManualClock:
    """A clock that only moves when told to: for deterministic tests."""

    native = False

    def __init__(self, start: float = 1000.0) -> None:
        self._t = int(start * NS)
        # a private clock domain: only holders of this object can judge its deadlines
        self.domain = secrets.randbits(63) | 1

    def now_ns(self) -> int:
        return self._t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise FabricValueError("a clock does not go backwards")
        self._t += int(seconds * NS)

    def set(self, seconds: float) -> None:
        t = int(seconds * NS)
        if t < self._t:
            raise FabricValueError("a clock does not go backwards")
        self._t = t


DEFAULT_CLOCK: Clock = MonotonicClock()

_private_domains: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
_private_domains_by_id: dict[int, int] = {}


def clock_domain(clock: Clock) -> int:
    """The domain ``clock``'s nanoseconds belong to: ``HOST_CLOCK_DOMAIN`` (0) for
    ``CLOCK_MONOTONIC``, else a nonzero id private to this clock object.

    A clock may name its domain with a ``domain`` attribute (an int in
    ``[0, 2**63)``); a non-native clock without one gets a random private id,
    the same for as long as the object lives.
    """
    if getattr(clock, "native", False):
        return HOST_CLOCK_DOMAIN
    dom = getattr(clock, "domain", None)
    if isinstance(dom, int) and not isinstance(dom, bool) and 0 < dom < (1 << 63):
        return dom
    try:
        found = _private_domains.get(clock)
        if found is None:
            found = _private_domains[clock] = secrets.randbits(63) | 1
        return found
    except TypeError:  # neither hashable nor weakly referenceable: keyed by identity
        return _private_domains_by_id.setdefault(id(clock), secrets.randbits(63) | 1)


class LeaseState:
    """Values of the lease state word (shared with the native layer)."""

    BUILDING = 0
    ACTIVE = 1
    REVOKED = 2
    FREED = 3


class LeaseCell(Protocol):
    """Where a lease's mutable state lives (a segment header, or memory)."""

    def load_state(self) -> int: ...
    def load_deadline_ns(self) -> int: ...
    def store_deadline_ns(self, deadline_ns: int) -> None: ...
    def store_state(self, state: int) -> None: ...


class LocalLeaseCell(LeaseCellBase):
    """Lease state in this process only (block leases, tests).

    ``_state`` and ``_deadline`` live in a C struct (``grafos_fabric._item.LeaseCellBase``), which
    ``CheckpointedStageState.checkpoint()`` reads without attribute lookups."""

    def __init__(self, deadline_ns: int, state: int = LeaseState.ACTIVE) -> None:
        self._deadline = deadline_ns
        self._state = state

    def load_state(self) -> int:
        return self._state

    def load_deadline_ns(self) -> int:
        return self._deadline

    def store_deadline_ns(self, deadline_ns: int) -> None:
        self._deadline = deadline_ns

    def store_state(self, state: int) -> None:
        self._state = state


def check_ttl(ttl: float) -> float:
    """Validate a TTL in seconds; raise :class:`FabricValueError` for nonsense."""
    try:
        value = float(ttl)
    except (TypeError, ValueError, OverflowError):
        raise FabricValueError(f"ttl must be a number of seconds, got {ttl!r:.40}") from None
    if not (value > 0.0) or value > MAX_TTL:
        raise FabricValueError(f"ttl must be in (0, {MAX_TTL:.0f}] seconds, got {ttl!r}")
    return value


class Lease:
    """A leased resource: id, generation, TTL, deadline; renew, revoke, fail closed.

    ``check()`` is what every data operation calls: it raises
    :class:`LeaseExpired` once the deadline has passed and :class:`Revoked`
    after :meth:`revoke`. Expiry is final: a lease past its deadline cannot be
    renewed (the resource may already be reclaimed).
    """

    def __init__(
        self,
        lease_id: str,
        *,
        ttl: float,
        generation: int,
        cell: LeaseCell,
        clock: Clock | None = None,
        resource: str = "",
        on_free: Callable[[Lease], None] | None = None,
    ) -> None:
        self.id = lease_id
        self.ttl = check_ttl(ttl)
        self.generation = int(generation)
        self.clock: Clock = clock or DEFAULT_CLOCK
        self.resource = resource
        self._cell = cell
        self._on_free = on_free
        self._freed = False

    # -- state --------------------------------------------------------------
    @property
    def deadline_ns(self) -> int:
        return self._cell.load_deadline_ns()

    def remaining(self) -> float:
        """Seconds until the deadline (negative once expired)."""
        return (self._cell.load_deadline_ns() - self.clock.now_ns()) / NS

    @property
    def expired(self) -> bool:
        return self.clock.now_ns() >= self._cell.load_deadline_ns()

    @property
    def revoked(self) -> bool:
        return self._cell.load_state() == LeaseState.REVOKED

    @property
    def freed(self) -> bool:
        return self._freed or self._cell.load_state() == LeaseState.FREED

    @property
    def live(self) -> bool:
        return self._cell.load_state() == LeaseState.ACTIVE and not self.expired

    def check(self) -> None:
        """Raise unless the lease is live (``Revoked`` before ``LeaseExpired``)."""
        state = self._cell.load_state()
        if state == LeaseState.REVOKED:
            raise Revoked(f"lease {self.id} on {self.resource or 'resource'} was revoked")
        if state != LeaseState.ACTIVE:
            raise LeaseExpired(f"lease {self.id} on {self.resource or 'resource'} was freed")
        if self.clock.now_ns() >= self._cell.load_deadline_ns():
            raise LeaseExpired(f"lease {self.id} on {self.resource or 'resource'} expired")

    # -- lifecycle ----------------------------------------------------------
    def renew(self, ttl: float | None = None) -> float:
        """Extend the deadline to now + ``ttl`` (default: the lease's TTL).

        Returns the new remaining time in seconds. Raises ``LeaseExpired`` or
        ``Revoked`` when the lease is no longer live: a renewal never
        resurrects a lease.
        """
        self.check()
        if ttl is not None:
            self.ttl = check_ttl(ttl)
        deadline = self.clock.now_ns() + int(self.ttl * NS)
        self._cell.store_deadline_ns(deadline)
        observe.count("lease_renewals")
        log.debug("renewed lease %s for %.3fs", self.id, self.ttl)
        return self.ttl

    def revoke(self) -> None:
        """Revoke the lease: every later operation raises ``Revoked``. Idempotent."""
        if self._cell.load_state() in (LeaseState.ACTIVE, LeaseState.BUILDING):
            self._cell.store_state(LeaseState.REVOKED)
            observe.count("lease_revokes")
            observe.emit("lease.revoked", lease=self.id, resource=self.resource, generation=self.generation)
            log.info("revoked lease %s", self.id)

    def free(self) -> None:
        """Give the resource back (idempotent)."""
        if self._freed:
            return
        self._freed = True
        observe.count("lease_frees")
        observe.emit("lease.freed", lease=self.id, resource=self.resource, generation=self.generation)
        if self._on_free is not None:
            self._on_free(self)

    def __repr__(self) -> str:
        state = "revoked" if self.revoked else ("expired" if self.expired else "live")
        return f"<Lease {self.id} gen={self.generation} {state} remaining={self.remaining():.3f}s>"


@dataclass(frozen=True)
class RenewalPolicy:
    """When to renew: at ``renew_at_fraction`` of the TTL, ± ``jitter_fraction``.

    Defaults follow grafOS ``RenewalPolicy``: renew once 75 % of the TTL has
    elapsed, jitter ±10 % of the TTL, failed renewals retried with exponential
    backoff capped at ``max_backoff_secs``. The jitter is deterministic,
    seeded from the lease id (no PRNG), so a test can predict it.
    """

    renew_at_fraction: float = 0.75
    jitter_fraction: float = 0.10
    initial_backoff_secs: float = 0.05
    max_backoff_secs: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 < self.renew_at_fraction < 1.0:
            raise FabricValueError("renew_at_fraction must be in (0, 1)")
        if not 0.0 <= self.jitter_fraction < min(self.renew_at_fraction, 1.0 - self.renew_at_fraction):
            raise FabricValueError("jitter_fraction must be smaller than both sides of renew_at_fraction")
        if self.initial_backoff_secs <= 0 or self.max_backoff_secs < self.initial_backoff_secs:
            raise FabricValueError("backoff must satisfy 0 < initial <= max")

    def jitter(self, lease_id: str) -> float:
        """A deterministic value in [-1, 1] derived from the lease id."""
        digest = hashlib.blake2b(lease_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / float(1 << 64) * 2.0 - 1.0

    def renewal_deadline_ns(self, created_ns: int, expires_ns: int, lease_id: str) -> int:
        """The instant (ns) at which a lease valid over [created, expires] is due."""
        total = expires_ns - created_ns
        offset = total * (self.renew_at_fraction + self.jitter_fraction * self.jitter(lease_id))
        return created_ns + int(offset)

    def backoff(self, failures: int) -> float:
        return min(self.max_backoff_secs, self.initial_backoff_secs * (2 ** max(0, failures - 1)))


class RenewalManager:
    """Renews the leases it tracks when they are due; call :meth:`tick` regularly."""

    def __init__(self, policy: RenewalPolicy | None = None, clock: Clock | None = None) -> None:
        self.policy = policy or RenewalPolicy()
        self.clock: Clock = clock or DEFAULT_CLOCK
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def track(self, lease: Lease) -> None:
        with self._lock:
            self._entries[lease.id] = _Entry(lease, self._due(lease, self.clock.now_ns()))

    def untrack(self, lease: Lease) -> None:
        with self._lock:
            self._entries.pop(lease.id, None)

    def _due(self, lease: Lease, now_ns: int) -> int:
        return self.policy.renewal_deadline_ns(now_ns, lease.deadline_ns, lease.id)

    def tick(self) -> list[Lease]:
        """Renew every tracked lease that is due; returns those renewed.

        Leases that are revoked or already expired are dropped from tracking
        (renewal never resurrects them); transient failures back off.
        """
        now = self.clock.now_ns()
        renewed: list[Lease] = []
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            if now < entry.due_ns:
                continue
            lease = entry.lease
            if lease.revoked or lease.expired or lease.freed:
                self.untrack(lease)
                continue
            try:
                lease.renew()
            except (Revoked, LeaseExpired):
                self.untrack(lease)
                continue
            except Exception:  # a transport failure: retry with backoff
                observe.count("lease_renewal_failures")
                entry.failures += 1
                entry.due_ns = now + int(self.policy.backoff(entry.failures) * NS)
                log.warning("renewal of lease %s failed (%d times)", lease.id, entry.failures, exc_info=True)
                continue
            entry.failures = 0
            entry.due_ns = self._due(lease, self.clock.now_ns())
            renewed.append(lease)
        return renewed

    def next_due_ns(self) -> int | None:
        with self._lock:
            return min((e.due_ns for e in self._entries.values()), default=None)


@dataclass
class _Entry:
    lease: Lease
    due_ns: int
    failures: int = 0


class BackgroundRenewer:
    """A daemon thread that runs a :class:`RenewalManager` until stopped."""

    def __init__(self, manager: RenewalManager | None = None, *, poll: float = 0.05) -> None:
        self.manager = manager or RenewalManager()
        self._poll = poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grafos-renewer", daemon=True)

    def start(self) -> BackgroundRenewer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.manager.tick()
            due = self.manager.next_due_ns()
            wait = self._poll if due is None else max(0.001, min(self._poll, (due - self.manager.clock.now_ns()) / NS))
            self._stop.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> BackgroundRenewer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
