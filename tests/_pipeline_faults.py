"""Fault injection for relocatable-edge tests: a fault plan, a faulty fabric and a faulty block lease.

A :class:`FaultPlan` maps step numbers to faults ("lease expires at step N",
"handoff write fails at step M"...). The test loop calls ``plan.apply(step,
edge)`` before each step; faults that act on the fabric or the block lease
(allocation failures, write failures) are armed as counters that the wrappers
consume, so the next allocation or write fails exactly as often as asked.
Everything is deterministic: time only moves with the ManualClock.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field
from typing import Any

from grafos_fabric import errors as E
from grafos_fabric.lease import ManualClock

FAULTS = ("expire", "revoke", "seal", "relocate", "alloc_fails", "write_fails", "sync_fails", "consumer_relocate")


@dataclass
class FaultPlan:
    """``{step: [fault, ...]}``; ``count`` is how many times an armed failure fires."""

    steps: dict[int, list[str]] = field(default_factory=dict)
    count: int = 1
    alloc_failures: int = 0
    write_failures: int = 0
    fail_sync_in: int = 0  # the n-th sync from now fails (1: the next one); 0: none
    fired: list[tuple[int, str]] = field(default_factory=list)

    def at(self, step: int, *faults: str) -> FaultPlan:
        for f in faults:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}")
            self.steps.setdefault(step, []).append(f)
        return self

    @classmethod
    def random(cls, seed: int, steps: int, n_faults: int, faults: tuple[str, ...] = FAULTS) -> FaultPlan:
        rng = random.Random(seed)
        plan = cls()
        for _ in range(n_faults):
            plan.at(rng.randrange(1, steps), rng.choice(faults))
        return plan

    def apply(self, step: int, clock: ManualClock, tx: Any, rx: Any) -> None:
        for fault in self.steps.get(step, ()):
            self.fired.append((step, fault))
            if fault == "expire":
                clock.advance(tx.ttl * 2)
            elif fault == "revoke":
                tx.lease.revoke()
            elif fault == "seal":
                q = tx.queue
                q.seal(tx.acked)
            elif fault == "relocate":
                tx.relocate(timeout=0)
            elif fault == "consumer_relocate":
                rx.relocate()
            elif fault == "alloc_fails":
                self.alloc_failures += self.count
            elif fault == "write_fails":
                self.write_failures += self.count
            elif fault == "sync_fails":  # the sync of the next publish (odd steps) or of the one after (even)
                self.fail_sync_in = 1 + step % 2


class FaultyFabric:
    """A fabric whose ``alloc`` fails while the plan has allocation failures armed."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner = inner
        self.plan = plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def alloc(self, nbytes: int, ttl: float) -> Any:
        if self.plan.alloc_failures > 0:
            self.plan.alloc_failures -= 1
            raise E.CapacityExceeded("injected: allocation failed")
        return self._inner.alloc(nbytes, ttl)


class FaultyBlock:
    """A block lease whose ``write_blocks`` fails (EIO) while the plan has write failures armed."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner = inner
        self.plan = plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def sync(self) -> None:
        if self.plan.fail_sync_in > 0:
            self.plan.fail_sync_in -= 1
            if self.plan.fail_sync_in == 0:
                raise OSError(errno.EIO, "injected: sync failed")
        self._inner.sync()

    def write_blocks(self, lba: int, buf: Any) -> int:
        if self.plan.write_failures > 0:
            self.plan.write_failures -= 1
            raise OSError(errno.EIO, "injected: block write failed")
        return int(self._inner.write_blocks(lba, buf))
