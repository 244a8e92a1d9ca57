"""The consumer's sequence gate: deliver, drop (a duplicate) or gap (items lost).

A pure data structure (no I/O): :class:`EdgeConsumer` asks it about every
item (or run of items) it reads, and about every queue it binds.

Two positions::

    expected : the sequence of the next item to deliver (None before the first
               one, on a fresh start: the first item seen sets it)
    qpos     : the sequence the current queue delivers next (its items are
               numbered contiguously from its first_seq)

* an item ``seq < expected`` was delivered before: **drop** it;
* ``seq == expected``: **deliver** it;
* ``seq > expected``: items were lost: **gap**, ``EdgeError(SEQUENCE_GAP)``,
  never a delivery.

``expected - qpos`` items of the current queue are duplicates ahead (after a
rebind to a queue that replays from below ``expected``): the consumer pops
and drops them in bulk. Invariants: ``expected`` never decreases; every item
delivered had ``seq == expected`` at the time, so no sequence is delivered
twice and none is skipped.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from ..errors import EdgeError

__all__ = ["SEQUENCE_GAP", "SequenceGate", "Verdict"]

SEQUENCE_GAP = "SequenceGap"
"""``EdgeError.kind`` when the consumer would have to skip sequence numbers (items lost)."""


class Verdict(enum.Enum):
    DELIVER = "deliver"
    DROP = "drop"
    GAP = "gap"


class SequenceGate:
    """Deliver / drop / gap for one consumer (``where`` names it in errors)."""

    __slots__ = ("delivered", "dropped", "expected", "qpos", "where")

    def __init__(self, expected: int | None, where: str = "consumer") -> None:
        self.expected = expected
        self.qpos = 0
        self.delivered = 0
        self.dropped = 0
        self.where = where

    def verdict(self, seq: int) -> Verdict:
        """What to do with an item numbered ``seq`` (changes nothing)."""
        exp = self.expected
        if exp is None or seq == exp:
            return Verdict.DELIVER
        return Verdict.DROP if seq < exp else Verdict.GAP

    @property
    def duplicates_ahead(self) -> int:
        """How many of the current queue's next items were delivered already."""
        exp = self.expected
        return 0 if exp is None else max(0, exp - self.qpos)

    def bind(self, first_seq: int, generation: int) -> None:
        """A queue numbering its items from ``first_seq`` becomes the current one;
        ``EdgeError(SEQUENCE_GAP)`` when it starts past ``expected`` (items lost)."""
        exp = self.expected
        if exp is not None and first_seq > exp:
            raise EdgeError(
                SEQUENCE_GAP,
                f"{self.where}: generation {generation} starts at {first_seq}, but {exp} is next: items were lost",
            )
        self.qpos = first_seq

    def admit(self, seq: int) -> bool:
        """One item read from the current queue: True to deliver it, False to drop it;
        ``EdgeError(SEQUENCE_GAP)`` on a gap."""
        self.qpos = seq + 1
        exp = self.expected
        if exp is None:
            exp = seq
        if seq < exp:
            self.dropped += 1
            return False
        if seq > exp:
            raise EdgeError(SEQUENCE_GAP, f"{self.where}: got {seq} while {exp} is next: items were lost")
        self.expected = seq + 1
        self.delivered += 1
        return True

    def admit_run(self, seqs: np.ndarray[Any, Any]) -> bool:
        """A run of items read from the current queue (a batch, popped while
        ``duplicates_ahead`` was what it is now: at most that many when it is
        positive). True to deliver them all, False to drop them all;
        ``EdgeError(SEQUENCE_GAP)`` when they are not numbered contiguously from ``qpos``."""
        n = len(seqs)
        first = int(seqs[0])
        if first != self.qpos or int(seqs[-1]) != first + n - 1:
            raise EdgeError(SEQUENCE_GAP, f"{self.where}: batch {first}..{int(seqs[-1])} where {self.qpos} is next")
        dup = self.duplicates_ahead
        self.qpos += n
        if dup > 0:
            self.dropped += n
            return False
        if self.expected is None:
            self.expected = first
        self.expected += n
        self.delivered += n
        return True

    def taken_before(self, first_read: int, queue_first: int) -> bool:
        """The first item this handle reads from a queue is past the queue's
        ``first_seq``: an earlier consumer took the ones before it."""
        return first_read > self.qpos and self.qpos == queue_first
