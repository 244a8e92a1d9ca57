"""The producer's replay window: a copy of every item the consumer has not acked yet.

A pure data structure (no I/O, no clock, no queue): :class:`EdgeProducer`
drives it, the tests drive it directly (a hypothesis state machine in
``tests/test_pipeline_window.py``).

Positions are edge sequence numbers (64-bit, only growing). Five counters
describe where every item stands::

      acked (read from the consumer's queue header; untrusted, only grows)
        :
    base        qnext            pushed_hi               next_seq
     |            |                  |                      |
     [ in a queue ][ replay: reached a queue before, again ][ new ]
     <------------------ the window: chunks[head:] ------------>

* ``next_seq``: the sequence the next item appended gets.
* ``qnext``: the sequence the *current* queue numbers its next item with;
  ``[qnext, next_seq)`` still has to go into the current queue.
* ``pushed_hi``: one past the highest sequence that ever reached a queue;
  an item below it is *accepted* (it will be replayed, never rolled back).
* ``replay_end``: ``pushed_hi`` at the last rebase (relocation); an item
  below it that goes into a queue again is counted as a replay.
* ``acked``: the largest ack the producer read (the consumer's durable
  commit). The window trims whole chunks below ``min(acked, qnext)``: an item
  not yet in the current queue stays, whatever a header claims.
* ``base``: the lowest sequence the window can replay (the first kept
  chunk's first item, or ``next_seq`` when the window is empty).

Invariants (:meth:`ReplayWindow.check` asserts them; every method keeps them):

1. ``base <= qnext <= next_seq`` and ``replay_end <= pushed_hi <= next_seq``.
   (``qnext`` is usually ``<= pushed_hi`` too; it passes it only when a
   restarted consumer's seal asks for a replay from a sequence that never
   reached a queue: the items in between are the consumer's already.)
2. The kept chunks are contiguous and non-empty: each starts where the one
   before ends, the first starts at ``base``, the last ends at ``next_seq``.
3. ``nbytes`` is the sum of the kept chunks' ``nbytes``.
4. ``acked`` and ``pushed_hi`` never decrease; ``next_seq`` decreases only in
   :meth:`rollback`, and never below ``max(pushed_hi, qnext)``.
5. ``nbytes <= limit``, or the window holds one chunk that was appended
   alone (an item or a batch larger than the limit into an empty window):
   :meth:`has_room` is how callers keep it.
6. No kept chunk lies wholly below ``min(acked, qnext)``: an ack read while
   items waited for the current queue trims them once they are in it
   (:meth:`sent`, :meth:`pushed_one`, :meth:`resume_at`, :meth:`rollback`),
   not only at the next ack that grows. (A window that kept them filled up with items the consumer
   had all acked, and the producer waited for room, for an ack that no
   consumer would send: the pipeline demo hung under VM freezes.)

A chunk is one push (``SINGLE``: the item), or one batch (``ROWS``: a 2-D
array whose rows are items; ``LIST``: a list of items).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

__all__ = ["LIST", "ROWS", "SINGLE", "Chunk", "ReplayWindow", "copy_item"]

SINGLE, ROWS, LIST = 0, 1, 2

_COMPACT_AT = 1024  # dropped chunks kept as None at the front before the list is compacted


def copy_item(buf: Any) -> tuple[Any, int]:
    """A private copy of one item and its size (bytes are immutable and kept as they are)."""
    if isinstance(buf, bytes):
        return buf, len(buf)
    if isinstance(buf, np.ndarray):
        c = np.array(buf, copy=True, order="C")
        return c, int(c.nbytes)
    b = bytes(memoryview(buf).cast("B"))
    return b, len(b)


class Chunk:
    """Items ``[first, first + n)`` of the replay window (one push or one batch)."""

    __slots__ = ("data", "first", "kind", "n", "nbytes")

    def __init__(self, first: int, n: int, kind: int, data: Any, nbytes: int) -> None:
        self.first = first
        self.n = n
        self.kind = kind  # SINGLE: data is the item; ROWS: a 2-D array; LIST: a list of items
        self.data = data
        self.nbytes = nbytes

    @property
    def end(self) -> int:
        return self.first + self.n

    def part(self, k: int) -> Any:
        """The items from index ``k`` on (a single item: the item itself)."""
        return self.data if self.kind == SINGLE else self.data[k:]

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` items (rollback of a partial batch)."""
        if n >= self.n or self.kind == SINGLE:
            return
        self.data = self.data[:n]
        if self.kind == ROWS:
            self.nbytes = int(self.data.nbytes)
        else:
            self.nbytes = sum(len(memoryview(b).cast("B")) for b in self.data)
        self.n = n


class ReplayWindow:
    """The items from the consumer's last ack on, and the counters of the module docstring."""

    __slots__ = ("_chunks", "_head", "acked", "limit", "nbytes", "next_seq", "pushed_hi", "qnext", "replay_end")

    def __init__(self, start: int, limit: int) -> None:
        self.limit = limit
        self.next_seq = start
        self.qnext = start
        self.pushed_hi = start
        self.replay_end = start
        self.acked = start
        self.nbytes = 0
        self._chunks: list[Chunk | None] = []  # None: trimmed, not yet compacted away (before _head)
        self._head = 0

    # -- reading -------------------------------------------------------------------------
    @property
    def base(self) -> int:
        """The lowest sequence the window can replay."""
        h = self._head
        if h < len(self._chunks):
            c = self._chunks[h]
            assert c is not None
            return c.first
        return self.next_seq

    @property
    def items(self) -> int:
        return self.next_seq - self.base

    @property
    def chunks(self) -> int:
        """How many chunks are kept."""
        return len(self._chunks) - self._head

    @property
    def backlog(self) -> bool:
        """Items wait to go into the current queue."""
        return self.qnext != self.next_seq

    def has_room(self, nbytes: int) -> bool:
        """An item of ``nbytes`` may be appended now (an empty window takes anything)."""
        return self.nbytes == 0 or self.nbytes + nbytes <= self.limit

    def next_part(self) -> tuple[Chunk, int]:
        """The chunk holding ``qnext`` and ``qnext``'s index in it (there must be a backlog)."""
        seq = self.qnext
        chunks = self._chunks
        last = len(chunks) - 1
        c = chunks[last]
        assert c is not None
        if c.first > seq:
            i = bisect.bisect_right(chunks, seq, lo=self._head, hi=last, key=_first) - 1
            c = chunks[i]
            assert c is not None
        return c, seq - c.first

    # -- changing ------------------------------------------------------------------------
    def append(self, n: int, kind: int, data: Any, nbytes: int) -> int:
        """Keep ``n`` new items (one chunk); returns the first one's sequence."""
        seq = self.next_seq
        self._chunks.append(Chunk(seq, n, kind, data, nbytes))
        self.nbytes += nbytes
        self.next_seq = seq + n
        return seq

    def pushed_one(self, data: Any, nbytes: int) -> int:
        """The fast path: one new item went straight into the current queue (no backlog)."""
        seq = self.next_seq
        self._chunks.append(Chunk(seq, 1, SINGLE, data, nbytes))
        self.nbytes += nbytes
        self.next_seq = self.qnext = self.pushed_hi = seq + 1
        if self.acked > seq:  # an ack read before the item was in the queue: it counts now (invariant 6)
            self.trim(min(self.acked, seq + 1))
        return seq

    def sent(self, k: int) -> int:
        """``k`` items from ``qnext`` on reached the current queue; returns how many were replays."""
        q = self.qnext
        replayed = min(k, self.replay_end - q) if q < self.replay_end else 0
        end = self.qnext = q + k
        if self.acked > q:  # an ack read while these items waited for the queue counts now that they
            self.trim(min(self.acked, end))  # are in (invariant 6: else a full window of acked items
        if end > self.pushed_hi:  # would wait for an ack that never comes: the consumer has them all)
            self.pushed_hi = end
        return replayed

    def ack(self, acked: int) -> bool:
        """The consumer durably has every item below ``acked``: trim what no queue needs. True when it grew."""
        if acked <= self.acked:
            return False
        self.acked = acked
        self.trim(min(acked, self.qnext))  # items not yet in the current queue stay until they are
        return True

    def trim(self, upto: int) -> None:
        """Drop the chunks whose items are all below ``upto``."""
        chunks = self._chunks
        h = self._head
        while h < len(chunks):
            c = chunks[h]
            assert c is not None
            if c.end > upto:
                break
            self.nbytes -= c.nbytes
            chunks[h] = None
            h += 1
        if h > _COMPACT_AT and h * 2 > len(chunks):
            del chunks[:h]
            h = 0
        self._head = h

    def replay_start(self, seal_seq: int | None) -> tuple[int, bool]:
        """Where a relocation replays from: ``seal_seq`` when a consumer asked for it, else
        ``acked``; clamped into ``[base, next_seq]``. Returns the start and whether
        ``seal_seq`` was below the window (items some consumer acked are gone)."""
        base = self.base
        start = self.acked if seal_seq is None else seal_seq
        below = seal_seq is not None and seal_seq < base
        return min(max(start, base), self.next_seq), below

    def rebase(self, start: int) -> None:
        """A new queue numbers its items from ``start`` (``base <= start <= next_seq``):
        trim below it; what reached a queue before counts as a replay when it goes in again."""
        self.trim(start)
        self.qnext = start
        self.replay_end = self.pushed_hi

    def resume_at(self, acked: int) -> bool:
        """Restart: a queue shows the consumer durably has everything below ``acked``.
        Adopt it; an empty window that is behind jumps there. True when it jumped."""
        if acked > self.acked:
            self.acked = acked
        if self.chunks == 0 and acked > self.next_seq:
            self.next_seq = self.qnext = self.pushed_hi = self.replay_end = acked
            return True
        self.trim(min(self.acked, self.qnext))  # invariant 6
        return False

    def rollback(self, seq: int) -> int:
        """Forget the items ``>= max(seq, pushed_hi, qnext)`` (they never reached a queue); returns ``next_seq``."""
        cut = max(seq, self.pushed_hi, self.qnext)
        chunks = self._chunks
        while len(chunks) > self._head:
            c = chunks[-1]
            assert c is not None
            if c.first < cut:
                break
            chunks.pop()
            self.nbytes -= c.nbytes
        if len(chunks) > self._head:
            c = chunks[-1]
            assert c is not None
            if c.end > cut:
                before = c.nbytes
                c.truncate(cut - c.first)
                self.nbytes -= before - c.nbytes
        self.next_seq = min(self.next_seq, cut)
        self.trim(min(self.acked, self.qnext))  # a cut chunk may now end below the ack (invariant 6)
        return self.next_seq

    # -- the invariants --------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``AssertionError`` naming the first invariant (module docstring) that does not hold."""
        base = self.base
        if not base <= self.qnext <= self.next_seq:
            raise AssertionError(f"1: base {base} <= qnext {self.qnext} <= next_seq {self.next_seq}")
        if not self.replay_end <= self.pushed_hi <= self.next_seq:
            raise AssertionError(
                f"1: replay_end {self.replay_end} <= pushed_hi {self.pushed_hi} <= next_seq {self.next_seq}"
            )
        pos = base
        total = 0
        for c in self._chunks[self._head :]:
            if c is None or c.n < 1 or c.first != pos:
                raise AssertionError(f"2: chunk {c and (c.first, c.n)} where {pos} is next")
            pos = c.end
            total += c.nbytes
        if pos != self.next_seq:
            raise AssertionError(f"2: the chunks end at {pos}, next_seq is {self.next_seq}")
        if total != self.nbytes:
            raise AssertionError(f"3: nbytes {self.nbytes} but the chunks hold {total}")
        if self.nbytes > self.limit and self.chunks > 1:
            raise AssertionError(f"5: {self.nbytes} bytes in {self.chunks} chunks, over the limit {self.limit}")
        done = min(self.acked, self.qnext)
        first = self._chunks[self._head] if self.chunks else None
        if first is not None and first.end <= done:
            raise AssertionError(f"6: a chunk ending at {first.end} is acked and in the queue (below {done}) but kept")


def _first(c: Chunk | None) -> int:
    assert c is not None
    return c.first
