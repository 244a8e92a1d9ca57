"""Relocatable stage edges: a queue that survives the loss of its lease.

A pipeline edge is a :class:`~grafos_fabric.queue.FabricQueue` in leased
memory plus a *handoff record* on a block lease that says where the edge lives
now (``HandoffWriter``/``HandoffReader``, generation = fence epoch). One
:class:`EdgeProducer` and one :class:`EdgeConsumer` share the block lease::

    blk = open_block(path, create_size=1 << 20)      # both sides open the same file
    tx = RelocatableQueueEdge.producer(fabric, blk, capacity=1 << 22, ttl=30.0, stage=StageId("src"))
    rx = RelocatableQueueEdge.consumer(fabric, blk, stage=StageId("sink"))
    seq = tx.push(buf); tx.push_batch(rows)
    item = rx.pop(timeout=1.0); item.seq; np.asarray(item); rx.ack(item.seq)

Sequence numbers
    Every item carries an *edge sequence number*, assigned by the producer and
    continuous across queues: a queue is created with ``first_seq`` = the
    sequence its first item will carry and the ring numbers items from there.
    The consumer delivers items in sequence order and drops every item whose
    sequence it has already delivered (``stats()["dropped_duplicates"]``).
    Delivery is at-least-once *across restarts* of the consumer; within one
    consumer's lifetime no sequence is delivered twice.

Acknowledgement and the replay window
    ``rx.ack(seq)`` publishes ``acked = seq + 1`` in the current queue's header:
    "every item below it is durably processed". Call it only once the effect of
    those items is durable (after the stage's checkpoint); a consumer that
    restarts from an ``input_offset`` below its last ack cannot be replayed to.
    The producer keeps a copy of every item from the last ``acked`` it has read
    (the *replay window*). The window is bounded by ``window`` bytes; when it is
    full, ``push`` waits for acks (backpressure on a consumer that never acks)
    and raises ``TimeoutError`` when its timeout runs out.

Relocation (producer)
    When a push (or a wait inside one) fails with ``LeaseExpired``,
    ``Revoked``, ``Disconnected``, ``QueueSealed`` or ``StaleEpoch``, or on an
    explicit :meth:`EdgeProducer.relocate`, the producer: allocates a new queue
    whose epoch is the next handoff generation and whose ``first_seq`` is the
    replay start; publishes ``bytes(locator)`` through its ``HandoffWriter``;
    seals the old queue (when it is still reachable) with the replay start as
    ``seal_seq``; and then replays its window from the replay start before the
    caller's item goes in. The caller sees no error unless relocation itself
    fails: after ``max_attempts`` failed allocations or publishes it raises
    ``EdgeError(EdgeError.RELOCATION_FAILED)``; the call's item was not
    accepted, the window is kept, and a later call tries again. A producer
    whose handoff publish is refused because a newer generation is on disk,
    or whose queue's epoch was advanced past its own, has been *fenced* by a
    successor: it raises :class:`~grafos_fabric.errors.StaleEpoch` (a
    ``Fenced``) on that call and every later one. It never gets an item into
    the successor's queue (it never learns its locator, and that queue's
    producer role and epoch are the successor's: the ring refuses an older
    epoch at the target).

    The replay start is the consumer's ``acked`` (the largest value the
    producer has read from any of its queues), or, when the old queue was
    sealed by a restarted consumer, the ``seal_seq`` it asked for. A
    ``seal_seq`` below the start of the window cannot be honoured (some
    consumer acked past it, so the items are gone from the window): the
    producer logs a warning and replays from the window's start; a consumer
    that really needs the missing items then raises ``SequenceGap`` (see
    below), so nothing is lost silently.

Rebind (consumer)
    The consumer polls the handoff reader when its queue is empty (every
    ``poll_interval`` seconds while it waits), when the queue is sealed and
    drained, and when it fails (``LeaseExpired``, ``Revoked``,
    ``Disconnected``, ``RoleTaken``). On a new generation it seals the old queue
    (if live) with its position as ``seal_seq``, drains what the old queue
    still holds, attaches the new queue, re-publishes its ack there, and skips
    the items below its position (their number is known exactly: a queue's
    items are numbered contiguously from its ``first_seq``). An item whose
    sequence is *above* the consumer's position would mean lost items; the
    consumer raises ``EdgeError("SequenceGap")`` rather than deliver it.

Restarts
    *Producer*: ``producer(..., output_commit=N)`` adopts the generation on
    disk (``HandoffWriter.from_disk``), attaches the queue the current record
    names and fences it (``advance_epoch`` to the new generation, then
    ``seal``), publishes a new queue and expects the caller to re-produce from
    ``tx.next_seq``: that is ``N``, or further when the old queue is still
    readable and shows the consumer acked more. A zombie predecessor gets
    ``StaleEpoch``/``QueueSealed`` at its old queue and ``StaleEpoch`` from its
    writer. The right ``output_commit`` to checkpoint is ``tx.acked`` (what
    the consumer durably has), not what was pushed: items pushed but not acked
    live only in the (volatile) window and the queue.
    *Consumer*: ``consumer(..., input_offset=N)`` seals the current queue with
    ``seal_seq=N`` and waits for the next generation; the producer sees the
    seal, relocates and replays from ``N``.

Choices where the grafOS docs are silent (see also DESIGN.md)
    * ``try_push`` raises ``EdgeError(EdgeError.QUEUE_FULL)`` when the ring or
      the window is full (grafOS ``push`` returns ``Err(QueueFull)``); the
      consumer's ``try_pop`` returns ``None`` when empty (grafOS ``Ok(None)``).
    * The handoff record is published *before* the old queue is sealed, so a
      consumer that sees the seal finds the next generation already on disk.
    * The producer renews its current queue's lease from its own calls once
      half the TTL has passed, and every quarter TTL while it waits for space
      (``renew=True``); a producer that makes no calls for a whole TTL loses
      the queue and relocates on its next call (an idle stage calls
      :meth:`EdgeProducer.poll` to keep it, and to notice a consumer's seal).
    * Old queues are retired, not freed, when the producer moves on (a consumer
      may still drain them); they are freed once the consumer has claimed a
      newer queue, on :meth:`EdgeProducer.close`, or by the fabric's reaper
      after their lease runs out.
    * A push that times out after its item reached some queue returns the
      sequence (the item is accepted and will be replayed); otherwise it rolls
      the item back and raises ``TimeoutError``.
    * ``rx.relocate()`` switches at once without draining the old queue (what
      it held comes again from the replay).
    * A rebind reads the handoff record from the block lease. A reader needs
      no ``O_DIRECT`` (only the writer's durability matters): opening the
      consumer's block file with ``open_block(path, direct=False)`` makes the
      poll a page-cache read (Linux keeps it coherent with ``O_DIRECT``
      writes), which matters on devices where one direct read costs ~0.3 ms.
    * ``consumer(..., mapped=False)`` reads queues with one-sided operations
      only (the RDMA ring protocol), on any driver.
    * One thread per edge side: the edge objects are not thread-safe.

The edge uses only ``FabricQueue``, the fabric protocol (``alloc``/``attach``
through ``FabricQueue``; ``drivers.base`` for the type) and the block-lease
protocol (through the handoff records); it never imports a driver.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import errors as E
from . import observe
from .checkpoint import CheckpointedStageState, EdgeCheckpoint, StageId
from .drivers.base import Fabric
from .errors import EdgeError
from .fence import EdgeGeneration
from .handoff import HandoffReader, HandoffRecord, HandoffWriter
from .lease import NS, Lease
from .locator import QueueLocator
from .queue import Batch, FabricQueue, Item, _deadline
from .slots import BlockDevice, Durability

__all__ = [
    "SEQUENCE_GAP",
    "CheckpointedStageState",
    "EdgeCheckpoint",
    "EdgeConsumer",
    "EdgeError",
    "EdgeGeneration",
    "EdgeProducer",
    "RelocatableQueueEdge",
    "StageId",
]

log = logging.getLogger(__name__)

SEQUENCE_GAP = "SequenceGap"
"""``EdgeError.kind`` when the consumer would have to skip sequence numbers (items lost)."""

# Failures of the current queue that relocation (producer) or rebind (consumer) answers.
_QUEUE_LOST: tuple[type[BaseException], ...] = (
    E.LeaseExpired,
    E.Revoked,
    E.Disconnected,
    E.QueueSealed,
    E.StaleEpoch,
)
_CONSUMER_LOST: tuple[type[BaseException], ...] = (E.LeaseExpired, E.Revoked, E.Disconnected, E.RoleTaken)
_SAMPLES = 8192
DEFAULT_PRODUCER_STAGE = StageId("src")
DEFAULT_CONSUMER_STAGE = StageId("sink")  # rebind-time samples kept for the percentiles


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _offset(value: int | EdgeCheckpoint | CheckpointedStageState[Any] | None, field: str) -> int | None:
    """An offset given as an int, an EdgeCheckpoint or a CheckpointedStageState."""
    if value is None:
        return None
    if isinstance(value, CheckpointedStageState):
        value = value.edge
    if isinstance(value, EdgeCheckpoint):
        value = getattr(value, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise E.FabricValueError(f"{field} must be a non-negative int, got {value!r}")
    return value


def _stage(stage: StageId | str) -> StageId:
    return stage if isinstance(stage, StageId) else StageId(stage)


_SINGLE, _ROWS, _LIST = 0, 1, 2


class _Chunk:
    """Items ``[first, first + n)`` of the replay window (one push or one batch)."""

    __slots__ = ("data", "first", "kind", "n", "nbytes")

    def __init__(self, first: int, n: int, kind: int, data: Any, nbytes: int) -> None:
        self.first = first
        self.n = n
        self.kind = kind  # _SINGLE: data is the item; _ROWS: a 2-D array; _LIST: a list of items
        self.data = data
        self.nbytes = nbytes

    @property
    def end(self) -> int:
        return self.first + self.n

    def part(self, k: int) -> Any:
        """The items from index ``k`` on (a single item: the item itself)."""
        return self.data if self.kind == _SINGLE else self.data[k:]

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` items (rollback of a partial batch)."""
        if n >= self.n or self.kind == _SINGLE:
            return
        self.data = self.data[:n]
        if self.kind == _ROWS:
            self.nbytes = int(self.data.nbytes)
        else:
            self.nbytes = sum(len(memoryview(b).cast("B")) for b in self.data)
        self.n = n


class RelocatableQueueEdge:
    """One side of a relocatable edge. Build with :meth:`producer` or :meth:`consumer`.

    Common surface: ``generation`` (the handoff generation of the queue in use),
    ``lease`` (that queue's lease: ``tx.lease.revoke()`` kills it), ``relocate()``,
    ``stats()``, ``close()``. See the module docstring for the protocol.
    """

    role = "edge"

    def __init__(self, fabric: Fabric, blk: BlockDevice, stage: StageId | str) -> None:
        self.fabric = fabric
        self.blk = blk
        self.stage = _stage(stage)
        self._q: FabricQueue | None = None
        self._gen: EdgeGeneration | None = None
        self._rebind_s: deque[float] = deque(maxlen=_SAMPLES)
        self._events: deque[dict[str, Any]] = deque(maxlen=256)
        self._reasons: Counter[str] = Counter()
        self.closed = False

    # -- construction ----------------------------------------------------------------
    @classmethod
    def producer(
        cls,
        fabric: Fabric,
        blk: BlockDevice,
        capacity: int = 1 << 22,
        ttl: float = 30.0,
        *,
        stage: StageId | str = DEFAULT_PRODUCER_STAGE,
        window: int | None = None,
        output_commit: int | EdgeCheckpoint | CheckpointedStageState[Any] | None = None,
        dtype: Any = None,
        max_item: int | None = None,
        renew: bool = True,
        max_attempts: int = 5,
        durability: Durability = "ordered",
    ) -> EdgeProducer:
        """The producing side; see :class:`EdgeProducer`."""
        return EdgeProducer(
            fabric,
            blk,
            capacity=capacity,
            ttl=ttl,
            stage=stage,
            window=window,
            output_commit=_offset(output_commit, "output_commit"),
            dtype=dtype,
            max_item=max_item,
            renew=renew,
            max_attempts=max_attempts,
            durability=durability,
        )

    @classmethod
    def consumer(
        cls,
        fabric: Fabric,
        blk: BlockDevice,
        *,
        stage: StageId | str = DEFAULT_CONSUMER_STAGE,
        input_offset: int | EdgeCheckpoint | CheckpointedStageState[Any] | None = None,
        poll_interval: float = 0.005,
        mapped: bool = True,
    ) -> EdgeConsumer:
        """The consuming side; see :class:`EdgeConsumer`."""
        return EdgeConsumer(
            fabric,
            blk,
            stage=stage,
            input_offset=_offset(input_offset, "input_offset"),
            poll_interval=poll_interval,
            mapped=mapped,
        )

    # -- common state ------------------------------------------------------------------
    @property
    def generation(self) -> EdgeGeneration | None:
        """The handoff generation of the queue in use (None before the first one)."""
        return self._gen

    @property
    def lease(self) -> Lease:
        """The current queue's lease (``E.QueueClosed`` when there is no queue)."""
        if self._q is None:
            raise E.QueueClosed(f"{self.role} of stage {self.stage} has no queue right now")
        return self._q.lease

    @property
    def queue(self) -> FabricQueue | None:
        """The queue in use (for inspection; do not push or pop on it directly)."""
        return self._q

    def _rebind_stats(self) -> dict[str, float]:
        s = list(self._rebind_s)
        return {
            "rebind_p50_ms": observe.percentile(s, 0.50) * 1e3,
            "rebind_p99_ms": observe.percentile(s, 0.99) * 1e3,
            "rebind_max_ms": (max(s) if s else 0.0) * 1e3,
        }

    def events(self) -> list[dict[str, Any]]:
        """The last 256 relocations (producer: generation, reason, first_seq, replay, ms)
        or rebinds (consumer: generation, first_seq, position, ms), oldest first."""
        return list(self._events)

    def rebind_times(self) -> list[float]:
        """The recorded rebind times in seconds (the last 8192)."""
        return list(self._rebind_s)

    def __enter__(self) -> RelocatableQueueEdge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        self.closed = True


class EdgeProducer(RelocatableQueueEdge):
    """The producing side of a relocatable edge (build with ``RelocatableQueueEdge.producer``).

    ``capacity``/``ttl``/``dtype``/``max_item`` are those of every queue it
    allocates. ``window`` bounds the replay window in bytes (default: four times
    the capacity). ``output_commit`` is where a restarted producer resumes
    (default 0; ``next_seq`` says where the caller re-produces from). ``renew``
    renews the current queue's lease from push calls. ``max_attempts`` bounds
    the allocations/publishes one relocation tries before
    ``EdgeError.RELOCATION_FAILED``. ``durability`` is the handoff writer's
    (``"ordered"`` or ``"single-sync"``: since slot format v3 both are one
    write and one sync; see :mod:`grafos_fabric.slots`).
    """

    role = "producer"

    def __init__(
        self,
        fabric: Fabric,
        blk: BlockDevice,
        *,
        capacity: int = 1 << 22,
        ttl: float = 30.0,
        stage: StageId | str = DEFAULT_PRODUCER_STAGE,
        window: int | None = None,
        output_commit: int | None = None,
        dtype: Any = None,
        max_item: int | None = None,
        renew: bool = True,
        max_attempts: int = 5,
        durability: Durability = "ordered",
    ) -> None:
        super().__init__(fabric, blk, stage)
        self.durability: Durability = durability
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise E.FabricValueError(f"window must be a positive number of bytes, got {window!r}")
        if max_attempts < 1:
            raise E.FabricValueError("max_attempts must be >= 1")
        self.capacity = capacity
        self.ttl = ttl
        self.dtype = dtype
        self.max_item = max_item
        self.window_limit = window if window is not None else 4 * capacity
        self.renew = renew
        self.max_attempts = max_attempts
        self._wait_slice = max(0.001, ttl / 4)
        self._fast = 0
        start = output_commit or 0
        self.next_seq = start  # the sequence the next pushed item gets
        self._acked = start  # the largest acked read from any of our queues
        self._qnext = start  # the sequence the current queue numbers its next item with
        self._pushed_hi = start  # one past the highest sequence that ever reached a queue
        self._replay_end = start  # items below it that go in again are replays
        self._chunks: list[_Chunk] = []
        self._head = 0
        self._wbytes = 0
        self._retired: list[FabricQueue] = []
        self._renew_at = 0
        self._pushed = 0
        self._replayed = 0
        self._relocations = 0
        self._failures = 0
        self._fenced: E.StaleEpoch | None = None
        self._writer = HandoffWriter.from_disk(blk, durability=durability)
        self._reader = HandoffReader(blk)
        self._takeover()

    # -- window ------------------------------------------------------------------------
    @property
    def acked(self) -> int:
        """The consumer's durable commit as last read: every sequence below it is processed.

        Checkpoint this as the stage's ``output_commit``."""
        return self._acked

    @property
    def window_items(self) -> int:
        return self.next_seq - self._wbase

    @property
    def window_bytes(self) -> int:
        return self._wbytes

    @property
    def _wbase(self) -> int:
        """The lowest sequence the window can replay."""
        return self._chunks[self._head].first if self._head < len(self._chunks) else self.next_seq

    def _refresh_acked(self) -> None:
        q = self._q
        if q is not None:
            try:
                a = q.acked
            except (E.FabricError, OSError):  # the current queue is lost: the push that follows relocates
                a = self._acked
            for old in self._retired:  # the consumer may still be acking on a queue we left
                try:
                    a = max(a, old.acked)
                except (E.FabricError, OSError):  # its lease is gone (one-sided reads fail closed)
                    continue
            if a > self._acked:
                self._set_acked(a)

    def _set_acked(self, a: int) -> None:
        self._acked = a
        self._trim(min(a, self._qnext))  # items not yet in the current queue stay until they are

    def _trim(self, upto: int) -> None:
        """Drop window chunks whose items are all below ``upto``."""
        chunks = self._chunks
        h = self._head
        while h < len(chunks) and chunks[h].end <= upto:
            self._wbytes -= chunks[h].nbytes
            chunks[h] = None  # type: ignore[call-overload]
            h += 1
        if h > 1024 and h * 2 > len(chunks):
            del chunks[:h]
            h = 0
        self._head = h

    def _append(self, n: int, kind: int, data: Any, nbytes: int) -> int:
        seq = self.next_seq
        self._chunks.append(_Chunk(seq, n, kind, data, nbytes))
        self._wbytes += nbytes
        self.next_seq = seq + n
        return seq

    def _rollback(self, seq: int) -> int:
        """Forget items ``>= max(seq, pushed_hi)`` (never pushed anywhere); returns the new next_seq."""
        cut = max(seq, self._pushed_hi, self._qnext)
        chunks = self._chunks
        while len(chunks) > self._head and chunks[-1].first >= cut:
            self._wbytes -= chunks.pop().nbytes
        if len(chunks) > self._head and chunks[-1].end > cut:
            c = chunks[-1]
            before = c.nbytes
            c.truncate(cut - c.first)
            self._wbytes -= before - c.nbytes
        self.next_seq = min(self.next_seq, cut)
        return self.next_seq

    def _find(self, seq: int) -> int:
        """Index of the window chunk holding ``seq`` (it must be in the window)."""
        chunks = self._chunks
        last = len(chunks) - 1
        if chunks[last].first <= seq:
            return last
        return bisect.bisect_right(chunks, seq, lo=self._head, hi=last, key=lambda c: c.first) - 1

    @staticmethod
    def _copy(buf: Any) -> tuple[Any, int]:
        """A private copy of one item (bytes are immutable and kept as they are)."""
        if isinstance(buf, bytes):
            return buf, len(buf)
        if isinstance(buf, np.ndarray):
            c = np.array(buf, copy=True, order="C")
            return c, int(c.nbytes)
        b = bytes(memoryview(buf).cast("B"))
        return b, len(b)

    # -- queue health, renewal ---------------------------------------------------------------
    def _maybe_renew(self) -> None:
        q = self._q
        if not self.renew or q is None:
            return
        now = self.fabric.clock.now_ns()
        if now >= self._renew_at:
            q.lease.renew()  # LeaseExpired / Revoked when it is already gone: relocation
            self._renew_at = now + int(self.ttl * NS) // 2

    def _check_queue(self) -> None:
        """Raise the typed failure of the current queue, if it has one (cheap)."""
        q = self._q
        assert q is not None
        q.lease.check()
        if q.sealed:
            raise E.QueueSealed("queue was sealed", seal_seq=q.seal_seq)
        if self._gen is not None and q.epoch > int(self._gen):
            raise E.StaleEpoch(epoch=int(self._gen), current=q.epoch)

    # -- relocation --------------------------------------------------------------------------
    def _takeover(self) -> None:
        """First queue: fence whatever the handoff record names, publish ours."""
        last: BaseException | None = None
        for _ in range(self.max_attempts):
            old: FabricQueue | None = None
            try:
                rec = self._reader.current()
            except E.NoRecord:
                rec = None
            if rec is not None:
                try:
                    old = FabricQueue.attach(self.fabric, QueueLocator.from_bytes(rec.payload))
                    self._resume_after(old.acked)
                except (E.FabricError, E.FabricValueError, OSError) as exc:
                    log.debug(
                        "stage %s: previous queue (generation %d) unreachable: %s", self.stage, int(rec.generation), exc
                    )
            try:
                self._relocate("start" if rec is None else "takeover", old=old, fence=True)
                return
            except E.StaleEpoch as exc:  # another producer published meanwhile: adopt the disk and retry
                last = exc
                self._fenced = None
                self._writer = HandoffWriter.from_disk(self.blk, durability=self.durability)
        raise EdgeError(EdgeError.RELOCATION_FAILED, f"stage {self.stage}: lost every takeover race ({last})")

    def _resume_after(self, acked: int) -> None:
        """Restart: the consumer durably has everything below ``acked``; resume there if it is ahead."""
        if acked > self._acked:
            self._acked = acked
        if not self._chunks and acked > self.next_seq:
            log.info("stage %s: the consumer already acked up to %d; resuming there", self.stage, acked)
            self.next_seq = self._qnext = self._pushed_hi = self._replay_end = acked

    def relocate(self, timeout: float | None = None) -> EdgeGeneration:
        """Move the edge to a new queue now (and replay the window into it); returns the new generation."""
        self._check_open()
        deadline = _deadline(timeout)
        self._relocate("explicit", old=self._q)
        self._drive(deadline, timeout)
        assert self._gen is not None
        return self._gen

    def _replay_start(self, old: FabricQueue | None, seal_seq: int | None, fence: bool) -> int:
        if old is not None and not fence:
            try:
                if old.lease.live:
                    a = old.acked
                    if a > self._acked:
                        self._set_acked(a)
            except (E.FabricError, OSError):  # pragma: no cover - the queue's memory is gone
                pass
        wbase = self._wbase
        start = self._acked
        if seal_seq is not None:
            if seal_seq < wbase:
                log.warning(
                    "stage %s: a replay from %d was asked for, but the window starts at %d (the consumer acked "
                    "past that point); replaying from %d",
                    self.stage,
                    seal_seq,
                    wbase,
                    wbase,
                )
            start = seal_seq
        start = min(max(start, wbase), self.next_seq)
        self._trim(start)
        return start

    def _relocate(
        self, reason: str, *, old: FabricQueue | None, seal_seq: int | None = None, fence: bool = False
    ) -> None:
        t0 = time.perf_counter()
        start = self._replay_start(old, seal_seq, fence)
        last: BaseException | None = None
        newq: FabricQueue | None = None
        gen: EdgeGeneration | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(min(0.05, 0.001 * (2**attempt)))
            try:
                newq = FabricQueue.create(
                    self.fabric,
                    self.capacity,
                    self.ttl,
                    dtype=self.dtype,
                    max_item=self.max_item,
                    epoch=int(self._writer.next_generation),
                    first_seq=start,
                )
            except (E.FabricError, OSError) as exc:
                last = exc
                log.warning("stage %s: allocating a queue failed (attempt %d): %s", self.stage, attempt + 1, exc)
                continue
            payload = bytes(newq.locator())
            try:
                gen = self._publish(payload)
                break
            except E.StaleEpoch as exc:
                newq.free()
                self._failures += 1
                self._fenced = exc
                log.warning("stage %s: fenced out by a newer producer (%s)", self.stage, exc)
                raise
            except (E.FabricError, OSError) as exc:
                newq.free()
                newq = None
                last = exc
                log.warning("stage %s: publishing the handoff failed (attempt %d): %s", self.stage, attempt + 1, exc)
            except BaseException:
                newq.free()  # a damaged handoff record (Corrupted) or an interrupt: not retried
                raise
        if newq is None or gen is None:
            self._failures += 1
            raise EdgeError(
                EdgeError.RELOCATION_FAILED,
                f"stage {self.stage}: relocation failed after {self.max_attempts} attempts: {last}",
            ) from last
        if old is not None:
            self._retire(old, gen if fence else None, start)
        self._q = newq
        self._gen = gen
        self._qnext = start
        self._replay_end = self._pushed_hi  # what reached a queue before: pushing it again is a replay
        self._renew_at = self.fabric.clock.now_ns() + int(self.ttl * NS) // 2
        self._relocations += 1
        self._reasons[reason] += 1
        self._free_retired(force=False)
        dt = time.perf_counter() - t0
        self._rebind_s.append(dt)
        event = {
            "generation": int(gen),
            "reason": reason,
            "first_seq": start,
            "replay": self.next_seq - start,
            "ms": dt * 1e3,
        }
        self._events.append(event)
        observe.count("edge_relocations", stage=self.stage.name, reason=reason)
        observe.latency("edge_relocate", dt, stage=self.stage.name)
        observe.emit("edge.relocated", stage=self.stage.name, **event)
        log.info(
            "stage %s: edge relocated (%s) to generation %d, replaying %d items from %d (%.3f ms)",
            self.stage,
            reason,
            int(gen),
            self.next_seq - start,
            start,
            dt * 1e3,
        )

    def _publish(self, payload: bytes) -> EdgeGeneration:
        """Publish the locator; a publish whose error came after its header landed
        (a failed final sync) left *our* record on disk: that one counts."""
        try:
            return self._writer.publish(payload)
        except (E.FabricError, OSError) as exc:
            try:
                cur: HandoffRecord | None = self._reader.current()
            except (E.FabricError, E.FabricValueError, OSError):
                cur = None
            if cur is None or cur.payload != payload:
                raise
            self._writer = HandoffWriter(self.blk, generation=cur.generation, durability=self.durability)
            log.warning("stage %s: the handoff publish reported %s, but the record landed", self.stage, exc)
            return cur.generation

    def _retire(self, old: FabricQueue, fence_gen: EdgeGeneration | None, seal_seq: int) -> None:
        try:
            if fence_gen is not None:
                try:
                    old.advance_epoch(int(fence_gen))
                except E.StaleEpoch:
                    pass
            old.seal(seal_seq)
        except (E.FabricError, OSError) as exc:  # pragma: no cover - unreachable queue
            log.debug("stage %s: could not seal the old queue: %s", self.stage, exc)
        old.close()
        if old.owner:
            self._retired.append(old)

    def _free_retired(self, *, force: bool) -> None:
        if not self._retired:
            return
        q = self._q
        if not force and q is not None:
            try:
                if not q.stats()["consumer"]:
                    return  # the consumer may still be draining an old queue (and acking there)
                a = max(old.acked for old in self._retired)
                if a > self._acked:
                    self._set_acked(a)
            except (E.FabricError, OSError):  # pragma: no cover
                return
        for old in self._retired:
            try:
                old.free()
            except (E.FabricError, OSError):  # pragma: no cover
                pass
        self._retired.clear()

    def _on_lost(self, exc: BaseException) -> None:
        """Relocate after the current queue failed with ``exc``."""
        if self._fenced is not None:
            raise self._fenced
        old = self._q
        seal_seq: int | None = None
        if isinstance(exc, E.QueueSealed) and old is not None:
            if self._gen is not None and old.epoch > int(self._gen):
                self._fenced = E.StaleEpoch(f"stage {self.stage}: fenced out", epoch=int(self._gen), current=old.epoch)
                raise E.StaleEpoch(
                    f"stage {self.stage}: a successor took the edge over (queue epoch {old.epoch})",
                    epoch=int(self._gen),
                    current=old.epoch,
                ) from exc
            seal_seq = old.seal_seq
        self._relocate(type(exc).__name__, old=old, seal_seq=seal_seq)

    # -- pushing the window into the queue -----------------------------------------------------
    def _catch_up(self, timeout: float | None, deadline: float | None) -> bool:
        """Push window items ``[qnext, next_seq)`` into the current queue.

        True when all are in; False when the queue is full and the time is up
        (``timeout=0``: at once). Raises the queue's failures."""
        q = self._q
        assert q is not None
        while self._qnext < self.next_seq:
            i = self._find(self._qnext)
            c = self._chunks[i]
            k = self._qnext - c.first
            want = c.n - k
            part = c.part(k)
            t = 0.0 if timeout == 0 else _remaining(deadline)
            # wait for space in slices of a quarter TTL, renewing the lease in between
            last_slice = t is not None and t <= self._wait_slice
            w = t if last_slice else self._wait_slice
            if c.kind == _SINGLE:
                if w == 0.0:
                    done = 1 if q.try_push(part) else 0
                else:
                    try:
                        q.push(part, timeout=w)
                        done = 1
                    except TimeoutError:
                        done = 0
            else:
                if w == 0.0:
                    done = q.push_batch(part, timeout=0)
                else:
                    try:
                        done = q.push_batch(part, timeout=w)
                    except TimeoutError as exc:
                        done = int(exc.args[1]) if len(exc.args) > 1 else 0
            if done:
                if self._qnext < self._replay_end:
                    self._replayed += min(done, self._replay_end - self._qnext)
                self._qnext += done
                if self._qnext > self._pushed_hi:
                    self._pushed_hi = self._qnext
            if done < want:
                if last_slice:
                    return False
                self._maybe_renew()  # a long wait for a slow consumer must not cost the lease
        return True

    def _drive(self, deadline: float | None, timeout: float | None) -> bool:
        """Catch the queue up with the window, relocating on failures."""
        streak = 0
        while True:
            try:
                self._maybe_renew()
                if self._retired:
                    self._free_retired(force=False)
                return self._catch_up(timeout, deadline)
            except _QUEUE_LOST as exc:
                streak += 1
                if streak > 4 * self.max_attempts:
                    raise EdgeError(
                        EdgeError.RELOCATION_FAILED, f"stage {self.stage}: {streak} relocations without progress"
                    ) from exc
                self._on_lost(exc)

    def _wait_window(self, nbytes: int, deadline: float | None, timeout: float | None) -> None:
        """Backpressure: wait until the window has room for ``nbytes`` (or is empty)."""
        sleep = 20e-6
        while True:
            self._refresh_acked()
            if self._wbytes == 0 or self._wbytes + nbytes <= self.window_limit:
                return
            try:
                self._drive(deadline, 0)  # the consumer can only ack what is in the queue
                self._check_queue()
            except _QUEUE_LOST as exc:
                self._on_lost(exc)
                continue
            if timeout == 0:
                raise EdgeError(EdgeError.QUEUE_FULL, f"stage {self.stage}: the replay window is full")
            left = _remaining(deadline)
            if left == 0.0:
                raise TimeoutError(f"stage {self.stage}: timed out waiting for the consumer to ack (window full)")
            time.sleep(sleep if left is None else min(sleep, left))
            sleep = min(sleep * 2, 0.001)

    # -- public pushing ---------------------------------------------------------------------------
    def _push_one(self, buf: Any, timeout: float | None) -> int:
        self._check_open()
        deadline = _deadline(timeout)
        data, nbytes = self._copy(buf)
        self._refresh_acked()
        if self._wbytes and self._wbytes + nbytes > self.window_limit:
            self._wait_window(nbytes, deadline, timeout)
        seq = self._append(1, _SINGLE, data, nbytes)
        try:
            ok = self._drive(deadline, timeout)
        except TimeoutError:
            if seq < self._pushed_hi:
                return seq  # the item reached a queue once: it is accepted and will be replayed
            self._rollback(seq)
            raise
        except (EdgeError, E.StaleEpoch, E.FabricValueError):
            if seq >= self._pushed_hi:
                self._rollback(seq)  # never reached a queue: not accepted
            raise
        if not ok:
            if seq < self._pushed_hi:
                return seq
            self._rollback(seq)
            if timeout == 0:
                raise EdgeError(EdgeError.QUEUE_FULL, f"stage {self.stage}: the queue is full")
            raise TimeoutError(f"stage {self.stage}: timed out waiting for space in the queue")
        self._pushed += 1
        return seq

    def push(self, buf: Any, timeout: float | None = None) -> int:
        """Push one item (bytes-like or a numpy array), relocating as needed; returns its sequence.

        Waits for space in the queue and in the replay window; ``TimeoutError``
        when ``timeout`` passes first (the item was not accepted)."""
        seq = self._fast_push(buf)
        return seq if seq >= 0 else self._push_one(buf, timeout)

    def _fast_push(self, buf: Any) -> int:
        """The common case in one go: no backlog, room everywhere, lease not due. -1: take the slow path."""
        q = self._q
        if q is None or self._qnext != self.next_seq or self._retired or self.closed or self._fenced is not None:
            return -1
        self._fast += 1
        if self._fast & 63 == 0:
            self._refresh_acked()
        data, nbytes = self._copy(buf)
        if (self._wbytes and self._wbytes + nbytes > self.window_limit) or (
            self.renew and self.fabric.clock.now_ns() >= self._renew_at
        ):
            return -1
        try:
            if not q.try_push(data):
                return -1
        except _QUEUE_LOST:
            return -1  # the slow path meets the same failure and relocates
        seq = self._append(1, _SINGLE, data, nbytes)
        self._qnext = self._pushed_hi = seq + 1
        self._pushed += 1
        return seq

    def try_push(self, buf: Any) -> int:
        """Push one item without waiting; returns its sequence.

        Raises ``EdgeError(EdgeError.QUEUE_FULL)`` when the queue or the
        replay window is full (nothing was accepted)."""
        seq = self._fast_push(buf)
        return seq if seq >= 0 else self._push_one(buf, 0)

    def push_batch(self, bufs: Sequence[Any] | np.ndarray[Any, Any], timeout: float | None = None) -> int:
        """Push many items (a 2-D array whose rows are items, or a sequence); returns how many.

        Items get consecutive sequences from ``next_seq``. Waits like
        :meth:`push`; on ``TimeoutError`` the items accepted so far stay
        accepted and ``TimeoutError.args[1]`` holds their count. With
        ``timeout=0`` it pushes what fits (in the queue and in the window)
        and returns the count. A batch larger than the whole window goes in
        pieces of at most half the window, each waiting for acks."""
        self._check_open()
        deadline = _deadline(timeout)
        if isinstance(bufs, np.ndarray):
            if bufs.ndim != 2:
                raise E.DtypeMismatch(f"push_batch takes a 2-D array whose rows are items, got {bufs.ndim}-D")
            n = int(bufs.shape[0])
            if n == 0:
                return 0
            data: Any = np.array(bufs, copy=True, order="C")
            nbytes = int(data.nbytes)
            kind = _ROWS
        else:
            items = [self._copy(b) for b in bufs]
            n = len(items)
            if n == 0:
                return 0
            data = [d for d, _ in items]
            nbytes = sum(s for _, s in items)
            kind = _LIST
        if nbytes > self.window_limit and n > 1:
            return self._push_split(bufs, nbytes, deadline, timeout)
        self._refresh_acked()
        if self._wbytes and self._wbytes + nbytes > self.window_limit:
            try:
                self._wait_window(nbytes, deadline, timeout)
            except EdgeError as exc:
                if timeout == 0 and exc.kind == EdgeError.QUEUE_FULL:
                    return 0  # timeout=0: what fits, and nothing fits
                raise
        seq = self._append(n, kind, data, nbytes)
        try:
            ok = self._drive(deadline, timeout)
        except TimeoutError:
            ok = False
        except (EdgeError, E.StaleEpoch, E.FabricValueError):
            self._rollback(seq)  # keeps what reached a queue
            raise
        if not ok:
            kept = max(self._pushed_hi, self._qnext) - seq
            if kept < n:
                self._rollback(seq + max(kept, 0))
            done = max(0, min(n, kept))
            self._pushed += done
            if timeout == 0:
                return done
            raise TimeoutError(f"stage {self.stage}: timed out waiting for space in the queue", done)
        self._pushed += n
        return n

    def _push_split(self, bufs: Any, nbytes: int, deadline: float | None, timeout: float | None) -> int:
        """A batch larger than the whole window goes in pieces of at most half the window."""
        n = len(bufs)
        per = max(1, n * (self.window_limit // 2) // max(1, nbytes))
        done = 0
        while done < n:
            piece = bufs[done : done + per]
            try:
                k = self.push_batch(piece, timeout=0 if timeout == 0 else _remaining(deadline))
            except TimeoutError as exc:
                k = int(exc.args[1]) if len(exc.args) > 1 else 0
                raise TimeoutError(str(exc.args[0]), done + k) from None
            done += k
            if k < len(piece):
                break
        return done

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the consumer has acked every item pushed (relocating as needed).

        ``TimeoutError`` when ``timeout`` passes first."""
        self._check_open()
        deadline = _deadline(timeout)
        sleep = 20e-6
        while True:
            try:
                self._maybe_renew()
                done = self._catch_up(0, deadline)
                self._refresh_acked()
                if done and self._acked >= self.next_seq:
                    return
                self._check_queue()
            except _QUEUE_LOST as exc:
                self._on_lost(exc)
                continue
            left = _remaining(deadline)
            if left == 0.0:
                raise TimeoutError(
                    f"stage {self.stage}: {self.next_seq - self._acked} items not acked within {timeout}s"
                )
            time.sleep(sleep if left is None else min(sleep, left))
            sleep = min(sleep * 2, 0.002)

    def poll(self) -> None:
        """Housekeeping for an idle producer: renew, notice a seal or a lost lease and relocate, push backlog."""
        self._check_open()
        try:
            self._maybe_renew()
            self._catch_up(0, None)
            self._refresh_acked()
            self._check_queue()
        except _QUEUE_LOST as exc:
            self._on_lost(exc)
            self._drive(None, 0)

    def _check_open(self) -> None:
        if self.closed:
            raise E.QueueClosed(f"producer of stage {self.stage} is closed")
        if self._fenced is not None:
            raise E.StaleEpoch(f"stage {self.stage}: this producer was fenced out by a newer one") from self._fenced

    # -- teardown, stats -------------------------------------------------------------------------
    def close(self) -> None:
        """Give up the producer role and free retired queues (idempotent).

        The current queue stays leased until its lease runs out, so the
        consumer can drain it; :meth:`free` gives it back at once."""
        if self.closed:
            return
        self.closed = True
        self._free_retired(force=True)
        if self._q is not None:
            self._q.close()

    def free(self) -> None:
        """Close and free the current queue now (end of the stream)."""
        self.close()
        if self._q is not None:
            try:
                self._q.free()
            except (E.FabricError, OSError):  # pragma: no cover
                pass

    def stats(self) -> dict[str, Any]:
        """Counters: relocations (and why), replayed items, pushes, window, rebind times.

        ``rebind_*_ms`` is the producer's relocation time: from the failure (or
        the ``relocate()`` call) to the new queue published and the old one
        sealed, before the replay."""
        out: dict[str, Any] = {
            "stage": self.stage.name,
            "role": self.role,
            "generation": None if self._gen is None else int(self._gen),
            "relocations": self._relocations,
            "relocation_failures": self._failures,
            "reasons": dict(self._reasons),
            "pushed": self._pushed,
            "replayed": self._replayed,
            "next_seq": self.next_seq,
            "acked": self._acked,
            "window_items": self.window_items,
            "window_bytes": self._wbytes,
        }
        out.update(self._rebind_stats())
        return out

    def __repr__(self) -> str:
        gen = None if self._gen is None else int(self._gen)
        return f"<EdgeProducer stage={self.stage.name!r} generation={gen} next_seq={self.next_seq} acked={self._acked}>"


class EdgeConsumer(RelocatableQueueEdge):
    """The consuming side of a relocatable edge (build with ``RelocatableQueueEdge.consumer``).

    ``input_offset`` (a restart) is the sequence of the next item the stage
    needs: the consumer seals the current queue with it and waits for the
    producer's next generation. Without it, the consumer attaches to the
    current queue and starts with whatever sequence comes first.
    ``poll_interval`` is how often an idle consumer reads the handoff record.
    ``mapped=False`` reads the queues with one-sided operations only (the RDMA
    ring protocol; on the verbs driver that is what every attach does).
    """

    role = "consumer"

    def __init__(
        self,
        fabric: Fabric,
        blk: BlockDevice,
        *,
        stage: StageId | str = DEFAULT_CONSUMER_STAGE,
        input_offset: int | None = None,
        poll_interval: float = 0.005,
        mapped: bool = True,
    ) -> None:
        super().__init__(fabric, blk, stage)
        if poll_interval <= 0:
            raise E.FabricValueError("poll_interval must be positive")
        self.poll_interval = poll_interval
        self.mapped = mapped
        self._reader = HandoffReader(blk)
        self._expected: int | None = input_offset
        self._acked_local = input_offset or 0
        self._qpos = 0  # the sequence the current queue delivers next
        self._delivered = 0
        self._dropped = 0
        self._rebinds = 0
        self._pending: HandoffRecord | None = None  # a newer generation, seen while the old queue drains
        self._lost_at: float | None = None  # when the current queue was found done (rebind timer)
        self._next_poll = 0.0
        rec = self._reader.poll()
        if rec is None:
            return
        if input_offset is not None:
            # restart: seal what the predecessor was reading, ask for a replay from input_offset
            try:
                old = FabricQueue.attach(fabric, QueueLocator.from_bytes(rec.payload))
                old.seal(input_offset)
                old.close()
            except (E.FabricError, E.FabricValueError, OSError) as exc:
                log.debug("stage %s: the current queue is unreachable: %s", self.stage, exc)
            self._gen = rec.generation
            self._lost_at = time.perf_counter()
            log.info("stage %s: restarted at %d; sealed generation %d", self.stage, input_offset, int(rec.generation))
            return
        self._attach(rec)

    # -- state ---------------------------------------------------------------------------
    @property
    def position(self) -> int | None:
        """The sequence of the next item to deliver (None before the first one, on a fresh start)."""
        return self._expected

    @property
    def acked(self) -> int:
        """What this consumer acked: every sequence below it is durably processed."""
        return self._acked_local

    def ack(self, seq: int) -> None:
        """Publish that every item up to and including ``seq`` is durably processed.

        Call it after the stage's checkpoint (the producer trims its replay
        window to it). Acks only grow; ``seq`` must have been delivered."""
        if self._expected is None or seq >= self._expected:
            raise E.FabricValueError(f"cannot ack {seq}: delivered up to {self._expected}")
        if seq + 1 > self._acked_local:
            self._acked_local = seq + 1
            q = self._q
            if q is not None:
                q.set_acked(self._acked_local)

    # -- binding ---------------------------------------------------------------------------
    def _attach(self, rec: HandoffRecord) -> bool:
        """Bind to the queue ``rec`` names; False when it is already gone."""
        try:
            q = FabricQueue.attach(self.fabric, QueueLocator.from_bytes(rec.payload), mapped=self.mapped)
        except (E.LeaseExpired, E.Revoked, E.Disconnected, E.NotReady) as exc:
            log.info("stage %s: generation %d is already gone: %s", self.stage, int(rec.generation), exc)
            self._gen = rec.generation
            return False
        first = q.first_seq
        exp = self._expected
        if exp is not None and first > exp:
            q.close()
            raise EdgeError(
                SEQUENCE_GAP,
                f"stage {self.stage}: generation {int(rec.generation)} starts at {first}, but {exp} is next: "
                "items were lost",
            )
        had = self._q is not None or self._lost_at is not None
        self._q = q
        self._gen = rec.generation
        self._qpos = first
        if self._acked_local > first:
            q.set_acked(self._acked_local)
        if had:
            self._rebinds += 1
            dt = time.perf_counter() - self._lost_at if self._lost_at is not None else 0.0
            if self._lost_at is not None:
                self._rebind_s.append(dt)
            event = {"generation": int(rec.generation), "first_seq": first, "position": exp, "ms": dt * 1e3}
            self._events.append(event)
            observe.count("edge_rebinds", stage=self.stage.name)
            observe.latency("edge_rebind", dt, stage=self.stage.name)
            observe.emit("edge.rebound", stage=self.stage.name, **event)
        self._lost_at = None
        log.debug("stage %s: bound to generation %d (first_seq %d)", self.stage, int(rec.generation), first)
        return True

    def _drop_current(self) -> None:
        q = self._q
        if q is not None:
            q.close()
        self._q = None
        if self._lost_at is None:
            self._lost_at = time.perf_counter()

    def _poll(self) -> HandoffRecord | None:
        rec = self._reader.poll()
        if rec is not None and self._gen is not None and rec.generation <= self._gen:
            return None
        return rec

    def _rebind(self, deadline: float | None) -> None:
        """Without a queue: wait for a newer generation and attach it."""
        sleep = 50e-6
        while self._q is None:
            rec = self._pending or self._poll()
            self._pending = None
            if rec is not None:
                if self._attach(rec):
                    return
                continue
            left = _remaining(deadline)
            if left == 0.0:
                raise TimeoutError(f"stage {self.stage}: no new generation of the edge within the timeout")
            time.sleep(sleep if left is None else min(sleep, left))
            sleep = min(sleep * 2, 0.002)

    def relocate(self) -> bool:
        """Look for a newer generation now and switch to it (without draining the old queue).

        Returns True when it switched. Items the old queue still held come
        again from the new one (the producer replays from the last ack)."""
        rec = self._pending or self._poll()
        self._pending = None
        if rec is None:
            return False
        self._seal_current()
        self._drop_current()
        if not self._attach(rec):
            self._rebind(None)
        return True

    def _seal_current(self) -> None:
        q = self._q
        if q is not None:
            try:
                q.seal(self._expected if self._expected is not None else q.acked)
            except (E.FabricError, OSError):  # pragma: no cover
                pass

    def _empty(self) -> bool:
        """The queue is empty: is there a newer generation? (Polls at most every poll_interval.)"""
        now = time.monotonic()
        if self._pending is None and now < self._next_poll:
            return False
        self._next_poll = now + self.poll_interval
        rec = self._pending or self._poll()
        if rec is None:
            return False
        # a newer generation: seal the old queue (a zombie producer stops there) and drain it
        self._pending = rec
        self._seal_current()
        return True

    # -- popping ---------------------------------------------------------------------------------
    def _accept(self, seq: int) -> bool:
        """Sequence check for one item: True to deliver, False to drop (duplicate)."""
        exp = self._expected
        if exp is None:
            exp = seq
        if seq < exp:
            self._dropped += 1
            return False
        if seq > exp:
            raise EdgeError(SEQUENCE_GAP, f"stage {self.stage}: got {seq} while {exp} is next: items were lost")
        self._expected = seq + 1
        self._delivered += 1
        return True

    def _next(self, max_items: int, timeout: float | None, batch: bool) -> Item | Batch | None:
        self._check_open()
        deadline = _deadline(timeout)
        while True:
            if self._q is None:
                if timeout == 0:
                    rec = self._pending or self._poll()
                    self._pending = None
                    if rec is None or not self._attach(rec):
                        return None
                else:
                    self._rebind(deadline)
                continue
            q = self._q
            left = _remaining(deadline)
            wait = 0.0 if timeout == 0 else (self.poll_interval if left is None else min(self.poll_interval, left))
            try:
                exp = self._expected
                skip = 0 if exp is None else exp - self._qpos
                if skip > 0 or batch:  # skip > 0: duplicates ahead in this queue, dropped in bulk
                    try:
                        b = q.pop_batch(min(skip, 1 << 16) if skip > 0 else max_items, timeout=wait)
                    except TimeoutError:
                        b = None
                    if b is not None and len(b):
                        if self._consumed_before(q, int(b.seqs[0])):
                            b.release()
                            continue
                        self._check_run(b.seqs)
                        n = len(b)
                        self._qpos += n
                        if skip > 0:
                            self._dropped += n
                            b.release()
                            continue
                        if self._expected is None:
                            self._expected = int(b.seqs[0])
                        self._expected += n
                        self._delivered += n
                        return b
                else:
                    try:
                        item = q.try_pop() if wait == 0.0 else q.pop(timeout=wait)
                    except TimeoutError:
                        item = None
                    if item is not None:
                        if self._consumed_before(q, item.seq):
                            item.release()
                            continue
                        self._qpos = item.seq + 1
                        if self._accept(item.seq):
                            return item
                        item.release()
                        continue
                # nothing came within this slice
                if self._empty():
                    continue  # a newer generation: drain the sealed old queue, then switch
                if timeout == 0:
                    return None
                if _remaining(deadline) == 0.0:
                    raise TimeoutError(f"stage {self.stage}: no item within the timeout")
            except E.QueueSealed:
                self._drop_current()
                if self._pending is None:
                    self._pending = self._poll()
                if self._pending is not None and self._attach(self._pending):
                    self._pending = None
            except _CONSUMER_LOST as exc:
                if isinstance(exc, E.RoleTaken):
                    self._seal_current()
                log.info("stage %s: queue of generation %s lost (%s)", self.stage, self._gen, type(exc).__name__)
                self._drop_current()

    def _consumed_before(self, q: FabricQueue, first: int) -> bool:
        """The first record this handle reads from ``q`` is past the queue's first
        sequence: an earlier consumer (one that crashed and whose role was taken
        over, or one that closed) took the records before it, and what it took
        may not be durable. Seal the queue with this consumer's position (or the
        queue's ack) and move on: the producer replays from there."""
        if first <= self._qpos or self._qpos != q.first_seq:
            return False
        log.info(
            "stage %s: generation %s was partly consumed before this consumer (starts at %d, not %d): asking for "
            "a replay",
            self.stage,
            self._gen,
            first,
            self._qpos,
        )
        self._seal_current()
        self._drop_current()
        return True

    def _check_run(self, seqs: np.ndarray[Any, Any]) -> None:
        """Items of a batch from one queue are numbered contiguously from ``qpos``."""
        if int(seqs[0]) != self._qpos or int(seqs[-1]) != self._qpos + len(seqs) - 1:
            raise EdgeError(
                SEQUENCE_GAP, f"stage {self.stage}: batch {int(seqs[0])}..{int(seqs[-1])} where {self._qpos} is next"
            )

    def pop(self, timeout: float | None = None) -> Item:
        """The next item in sequence order (``item.seq``, ``np.asarray(item)``), rebinding as needed.

        ``TimeoutError`` when nothing arrives within ``timeout`` seconds."""
        q = self._q
        exp = self._expected
        if q is not None and exp is not None and exp == self._qpos and not self.closed:
            try:  # the common case: the next item is there and is the one expected
                it = q.try_pop()
            except E.FabricError:
                it = None  # the slow path meets the same failure and rebinds
            if it is not None:
                self._qpos = it.seq + 1
                if self._accept(it.seq):
                    return it
                it.release()
        out = self._next(1, timeout, False)
        if out is None:
            raise TimeoutError(f"stage {self.stage}: no item within the timeout")
        assert isinstance(out, Item)
        return out

    def try_pop(self) -> Item | None:
        """The next item, or None when none is there right now (never waits for data)."""
        out = self._next(1, 0, False)
        assert out is None or isinstance(out, Item)
        return out

    def pop_batch(self, max_items: int, timeout: float | None = None) -> Batch:
        """Up to ``max_items`` next items, in order, as one :class:`Batch` (``.seqs``, ``.array()``).

        Waits for at least one (``timeout=0``: may return an empty batch)."""
        if not isinstance(max_items, int) or max_items <= 0:
            raise E.FabricValueError(f"max_items must be a positive int, got {max_items!r}")
        out = self._next(max_items, timeout, True)
        if out is None:
            if timeout == 0:
                return Batch.empty()
            raise TimeoutError(f"stage {self.stage}: no item within the timeout")
        assert isinstance(out, Batch)
        return out

    def _check_open(self) -> None:
        if self.closed:
            raise E.QueueClosed(f"consumer of stage {self.stage} is closed")

    # -- teardown, stats ---------------------------------------------------------------------------
    def close(self) -> None:
        """Give up the consumer role (idempotent). Items already popped stay readable."""
        if self.closed:
            return
        self.closed = True
        if self._q is not None:
            self._q.close()

    def stats(self) -> dict[str, Any]:
        """Counters: rebinds, delivered, dropped duplicates, position, acked, rebind times.

        ``rebind_*_ms`` is the time from finding the queue done (sealed and
        drained, failed, or superseded) to being bound to the next one,
        including any wait for the producer to publish it."""
        out: dict[str, Any] = {
            "stage": self.stage.name,
            "role": self.role,
            "generation": None if self._gen is None else int(self._gen),
            "rebinds": self._rebinds,
            "relocations": self._rebinds,
            "delivered": self._delivered,
            "dropped_duplicates": self._dropped,
            "position": self._expected,
            "acked": self._acked_local,
        }
        out.update(self._rebind_stats())
        return out

    def __repr__(self) -> str:
        gen = None if self._gen is None else int(self._gen)
        return f"<EdgeConsumer stage={self.stage.name!r} generation={gen} position={self._expected}>"
