"""The producing side of a relocatable edge: a state machine around a replay window.

States (:class:`ProducerState`, ``tx.state``) and the moves between them::

    (start)    -> RELOCATING  take the edge over: fence the queue on disk, publish ours
    RELOCATING -> BOUND       the new queue is published and the old one sealed
    RELOCATING -> BOUND       max_attempts failed: back to the queue it had (EdgeError)
    BOUND      -> RELOCATING  the queue is lost or sealed, or relocate() is called
    RELOCATING -> FENCED      the handoff publish is refused: a newer generation is on disk
    BOUND      -> FENCED      a successor advanced our queue's epoch and sealed it
    any        -> CLOSED      close(); CLOSED is terminal, FENCED only moves to CLOSED

* **BOUND**: pushing into the queue of generation ``tx.generation``. A push
  that meets a lost queue (``LeaseExpired``, ``Revoked``, ``Disconnected``,
  ``QueueSealed``, ``StaleEpoch``) goes through **one guarded call site**,
  :meth:`EdgeProducer._guarded`, which relocates and retries the step.
* **RELOCATING**: allocate a queue at the next generation, publish its
  locator, seal (and at a takeover, fence) the old queue, then rebase the
  window and go back to BOUND; the caller's step then replays the window.
  A relocation that fails ``max_attempts`` times raises
  ``EdgeError(RELOCATION_FAILED)`` and leaves the producer BOUND to the
  queue it had (the next call fails on it again and retries).
* **FENCED**: a newer producer took the edge over; every call raises
  ``StaleEpoch`` (``close()`` still works).

(About 860 lines, over the project's ~800: the state machine, its one guarded
call site and the relocation steps read best in one file; the standby queue's
own logic lives in :mod:`grafos_fabric.pipeline.standby`.)

Waiting for acks (a full window, ``flush``) and between allocation attempts
uses the shared :class:`~grafos_fabric.backoff.Backoff`. The window's counters and
their invariants are in :mod:`grafos_fabric.pipeline.window`.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .. import errors as E
from .. import observe
from ..backoff import Backoff
from ..checkpoint import StageId
from ..drivers.base import Fabric
from ..errors import EdgeError
from ..fence import EdgeGeneration
from ..handoff import HandoffReader, HandoffRecord, HandoffWriter
from ..lease import NS
from ..locator import QueueLocator
from ..queue import FabricQueue, _deadline
from ..slots import BlockDevice, Durability
from .edge import _QUEUE_LOST, DEFAULT_PRODUCER_STAGE, RelocatableQueueEdge, _queue_stats, _remaining
from .standby import StandbyQueue, fence_announced
from .window import LIST, ROWS, SINGLE, ReplayWindow, copy_item

__all__ = ["EdgeProducer", "ProducerState"]

log = logging.getLogger("grafos_fabric.pipeline")

T = TypeVar("T")


class ProducerState(enum.Enum):
    """Where an :class:`EdgeProducer` stands (see the module docstring)."""

    RELOCATING = "relocating"
    BOUND = "bound"
    FENCED = "fenced"
    CLOSED = "closed"


_BOUND = ProducerState.BOUND
_RELOCATING = ProducerState.RELOCATING
_FENCED = ProducerState.FENCED
_CLOSED = ProducerState.CLOSED
#: A queue retired because its node stopped answering is freed no sooner than this after the relocation:
#: freeing it reaches for that node (connects refused, or on a real network a connect timeout), and the
#: moments after a relocation belong to the replay and to the consumer (a stage that also consumes pops
#: in the same thread). The node's own end frees it meanwhile, or its lease runs out.
_UNREACHABLE_FREE_DELAY_S = 0.5

#: The moves the state machine allows (anything else is a bug in this module).
TRANSITIONS: dict[ProducerState, frozenset[ProducerState]] = {
    _RELOCATING: frozenset({_RELOCATING, _BOUND, _FENCED, _CLOSED}),
    _BOUND: frozenset({_RELOCATING, _FENCED, _CLOSED}),
    _FENCED: frozenset({_CLOSED}),
    _CLOSED: frozenset(),
}


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
    write and one sync; see :mod:`grafos_fabric.slots`). ``standby`` keeps the
    next queue made and announced ahead of time (one more ring of ``capacity``
    bytes; :mod:`grafos_fabric.pipeline.standby`). ``write_behind`` turns on
    write-behind publication (``FabricQueue.set_write_behind``) on every queue
    that offers it (one-sided handles of UCX regions; others run as without
    it, ``stats()["write_behind"]`` says which): a push returns with its
    publication in flight, confirmed during the next push, by :meth:`flush`
    or :meth:`poll`. An item is visible to the consumer once confirmed, so a
    producer that goes idle calls :meth:`poll` (or :meth:`flush`); a
    publication that fails relocates the edge like a failed push, and the
    window replays what it carried.
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
        standby: bool = True,
        write_behind: bool = False,
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
        self.renew = renew
        self.max_attempts = max_attempts
        self.write_behind = bool(write_behind)
        self._wb_on = False  # write-behind is on for the current queue
        self._wait_slice = max(0.001, ttl / 4)
        self._fast = 0
        self._w = ReplayWindow(output_commit or 0, window if window is not None else 4 * capacity)
        self._state = _RELOCATING
        self._retired: list[FabricQueue] = []
        self._unreachable: set[int] = set()  # id() of retired queues that failed a read: not read again
        self._free_after = 0.0  # monotonic: retired queues are freed after this (an unreachable one's delay)
        self._renew_at = 0
        self._pushed = 0
        self._replayed = 0
        self._relocations = 0
        self._failures = 0
        self._fenced: E.StaleEpoch | None = None
        self._q_ref: Any = None  # the current queue's RegionRef
        self._standby_used = 0  # StandbyQueue.used at the last relocation (the event says whether it used one)
        self._t_lost = self._t_alloc = self._t_published = 0.0  # the last relocation's steps (monotonic)
        self._writer = HandoffWriter.from_disk(blk, durability=durability)
        self._reader = HandoffReader(blk)
        self._sb = StandbyQueue(
            fabric, self.stage, capacity=capacity, ttl=ttl, dtype=dtype, max_item=max_item, enabled=standby
        )
        self._takeover()

    # -- state -------------------------------------------------------------------------
    @property
    def state(self) -> ProducerState:
        """BOUND, RELOCATING, FENCED or CLOSED (see the module docstring)."""
        return self._state

    def _to(self, new: ProducerState) -> None:
        assert new in TRANSITIONS[self._state], f"producer state {self._state.name} -> {new.name}"
        self._state = new

    def _fence(self, exc: E.StaleEpoch) -> None:
        self._fenced = exc
        self._to(_FENCED)

    @property
    def next_seq(self) -> int:
        """The sequence the next pushed item gets."""
        return self._w.next_seq

    @property
    def acked(self) -> int:
        """The consumer's durable commit as last read: every sequence below it is processed.

        Checkpoint this as the stage's ``output_commit``."""
        return self._w.acked

    @property
    def window_limit(self) -> int:
        """The replay window's bound in bytes."""
        return self._w.limit

    @property
    def window_items(self) -> int:
        return self._w.items

    @property
    def window_bytes(self) -> int:
        return self._w.nbytes

    def _refresh_acked(self) -> None:
        q = self._q
        if q is not None:
            try:
                a = q.acked
            except (E.FabricError, OSError):  # the current queue is lost: the push that follows relocates
                a = self._w.acked
            for old in self._retired:  # the consumer may still be acking on a queue we left
                if id(old) in self._unreachable:
                    continue
                try:
                    a = max(a, old.acked)
                except (E.FabricError, OSError):  # its lease is gone (one-sided reads fail closed)
                    self._unreachable.add(id(old))  # (an unreachable node: each read would reconnect)
                    continue
            self._w.ack(a)

    # -- queue health, renewal ---------------------------------------------------------------
    def _maybe_renew(self) -> None:
        q = self._q
        if not self.renew or q is None:
            return
        now = self.fabric.clock.now_ns()
        if now >= self._renew_at:
            q.lease.renew()  # LeaseExpired / Revoked when it is already gone: relocation
            self._renew_at = now + int(self.ttl * NS) // 2
            self._sb.renew()

    def _renew_slice(self) -> float:
        """How long one wait for space may last: a quarter TTL, cut to end when the renewal is due."""
        if not self.renew:
            return self._wait_slice
        left = (self._renew_at - self.fabric.clock.now_ns()) / NS
        return max(0.001, min(self._wait_slice, left))

    def _check_queue(self) -> None:
        """Raise the typed failure of the current queue, if it has one (cheap)."""
        q = self._q
        assert q is not None
        q.lease.check()
        if q.sealed:
            raise E.QueueSealed("queue was sealed", seal_seq=q.seal_seq)
        if self._gen is not None and q.epoch > int(self._gen):
            raise E.StaleEpoch(epoch=int(self._gen), current=q.epoch)

    # -- the one guarded call site -----------------------------------------------------------
    def _guarded(self, step: Callable[..., T], *args: Any) -> T:
        """Run ``step(*args)``; when the queue is lost under it, relocate and run it again.

        Every failure of the current queue that relocation answers
        (``_QUEUE_LOST``) is caught here and only here. ``4 * max_attempts``
        losses in a row without a step getting through raise
        ``EdgeError(RELOCATION_FAILED)``; a fenced producer raises ``StaleEpoch``."""
        streak = 0
        while True:
            try:
                return step(*args)
            except _QUEUE_LOST as exc:
                streak += 1
                if streak > 4 * self.max_attempts:
                    raise EdgeError(
                        EdgeError.RELOCATION_FAILED, f"stage {self.stage}: {streak} relocations without progress"
                    ) from exc
                self._on_lost(exc)

    def _on_lost(self, exc: BaseException) -> None:
        """Relocate after the current queue failed with ``exc`` (or learn that we were fenced)."""
        if self._fenced is not None:
            raise self._fenced
        old = self._q
        seal_seq: int | None = None
        if isinstance(exc, E.QueueSealed) and old is not None:
            if self._gen is not None and old.epoch > int(self._gen):
                self._fence(E.StaleEpoch(f"stage {self.stage}: fenced out", epoch=int(self._gen), current=old.epoch))
                raise E.StaleEpoch(
                    f"stage {self.stage}: a successor took the edge over (queue epoch {old.epoch})",
                    epoch=int(self._gen),
                    current=old.epoch,
                ) from exc
            seal_seq = old.seal_seq
        # Disconnected: the queue's node does not answer (killed, stopped, cut off). Nothing is read
        # from or written to the old queue now (each try would wait for or reconnect to that node):
        # the replay starts at the last ack read, and the consumer finds the new generation by
        # its own failure or its idle poll of the handoff record (a seal is only a hint to it)
        self._relocate(type(exc).__name__, old=old, seal_seq=seal_seq, reachable=not isinstance(exc, E.Disconnected))

    # -- relocation: RELOCATING -> BOUND ---------------------------------------------------------
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
                fence_announced(self.fabric, rec, self.stage)  # the predecessor's standby: sealed first
                try:
                    old = FabricQueue.attach(self.fabric, QueueLocator.from_bytes(rec.payload))
                    if self._w.resume_at(old.acked):
                        log.info(
                            "stage %s: the consumer already acked up to %d; resuming there", self.stage, self._w.acked
                        )
                except (E.FabricError, E.FabricValueError, OSError) as exc:
                    log.debug(
                        "stage %s: previous queue (generation %d) unreachable: %s", self.stage, int(rec.generation), exc
                    )
            try:
                self._relocate("start" if rec is None else "takeover", old=old, fence=True)
                return
            except E.StaleEpoch as exc:  # another producer published meanwhile: adopt the disk and retry
                last = exc
                self._writer = HandoffWriter.from_disk(self.blk, durability=self.durability)
        raise EdgeError(EdgeError.RELOCATION_FAILED, f"stage {self.stage}: lost every takeover race ({last})")

    def relocate(self, timeout: float | None = None) -> EdgeGeneration:
        """Move the edge to a new queue now (and replay the window into it); returns the new generation."""
        self._check_open()
        deadline = _deadline(timeout)
        self._relocate("explicit", old=self._q)
        self._drive(deadline, timeout)
        assert self._gen is not None
        return self._gen

    def _replay_start(self, old: FabricQueue | None, seal_seq: int | None, fence: bool, reachable: bool = True) -> int:
        w = self._w
        if old is not None and not fence and reachable:
            try:
                if old.lease.live:
                    w.ack(old.acked)
            except (E.FabricError, OSError):  # pragma: no cover - the queue's memory is gone
                pass
        start, below = w.replay_start(seal_seq)
        if below:
            log.warning(
                "stage %s: a replay from %s was asked for, but the window starts at %d (the consumer acked "
                "past that point); replaying from %d",
                self.stage,
                seal_seq,
                start,
                start,
            )
        w.trim(min(start, w.qnext))  # what no queue will need again (rebase trims the rest)
        return start

    def _relocate(
        self,
        reason: str,
        *,
        old: FabricQueue | None,
        seal_seq: int | None = None,
        fence: bool = False,
        reachable: bool = True,
    ) -> None:
        """RELOCATING: new queue, publish, retire the old one, BOUND to the new one.

        ``fence`` (a takeover at start): the old queue is a predecessor's; its
        epoch is advanced to ours, and a ``StaleEpoch`` from the publish is the
        caller's to retry instead of fencing this producer."""
        t0 = time.perf_counter()
        self._t_lost = time.monotonic()
        prev = self._state
        self._to(_RELOCATING)
        try:
            start = self._replay_start(old, seal_seq, fence, reachable)
            log.debug("stage %s: relocating (%s): replay start %d found in %.3f ms", self.stage, reason, start,
                      (time.perf_counter() - t0) * 1e3)
            try:
                lost = self._q_ref if old is not None and not reachable else None
                newq, gen = self._allocate_and_publish(start, lost)
            except E.StaleEpoch as exc:
                self._failures += 1
                log.warning("stage %s: fenced out by a newer producer (%s)", self.stage, exc)
                if not fence:
                    self._fence(exc)
                raise
            if old is not None:
                self._retire(old, gen if fence else None, start, reachable)
            self._bind(newq, gen, start, reason, t0)
        finally:
            if self._state is _RELOCATING:  # it failed: keep the queue we had (the next call retries)
                self._state = prev

    def _allocate_and_publish(self, start: int, lost: Any = None) -> tuple[FabricQueue, EdgeGeneration]:
        """A new queue at the next generation, numbering from ``start``, published through the
        handoff writer; up to ``max_attempts`` tries, with backoff between them. The first try
        activates the standby queue when there is a usable one (``lost``: the region of a
        queue whose node does not answer)."""
        last: BaseException | None = None
        backoff = Backoff(None, first=0.002, cap=0.05)
        for attempt in range(self.max_attempts):
            if attempt:
                backoff.sleep()
            sb = self._sb.take(start, self._writer.next_generation, lost) if attempt == 0 else None
            if sb is not None:
                self._t_alloc = time.monotonic()  # the queue is there: activated, not allocated
            try:
                newq = sb or FabricQueue.create(
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
            self._t_alloc = time.monotonic()
            payload = bytes(newq.locator())
            try:
                gen = self._publish(payload)
                self._t_published = time.monotonic()
                return newq, gen
            except E.StaleEpoch:
                self._sb.unusable(newq)  # sealed, then freed: a consumer that bound it (a standby) leaves
                raise
            except (E.FabricError, OSError) as exc:
                self._sb.unusable(newq)
                last = exc
                log.warning("stage %s: publishing the handoff failed (attempt %d): %s", self.stage, attempt + 1, exc)
            except BaseException:
                self._sb.unusable(newq)  # a damaged handoff record (Corrupted) or an interrupt: not retried
                raise
        self._failures += 1
        raise EdgeError(
            EdgeError.RELOCATION_FAILED,
            f"stage {self.stage}: relocation failed after {self.max_attempts} attempts: {last}",
        ) from last

    def _bind(self, newq: FabricQueue, gen: EdgeGeneration, start: int, reason: str, t0: float) -> None:
        """BOUND to ``newq``: it numbers from ``start``; the window replays from there."""
        self._q = newq
        self._q_ref = newq.region.ref()  # where it lives, known without asking it (it may stop answering)
        self._wb_on = self.write_behind and self._turn_on_write_behind(newq)
        self._gen = gen
        self._w.rebase(start)
        self._renew_at = self.fabric.clock.now_ns() + int(self.ttl * NS) // 2
        self._to(_BOUND)
        self._relocations += 1
        self._reasons[reason] += 1
        # the retired queues are freed once the replay is in (_push_step, _poll_step), not here: a
        # free reaches the old queue's node, which after a node's loss means connects to a dead node
        # (refused at best, the control timeout at worst) while the consumer waits for the replay
        dt = time.perf_counter() - t0
        self._rebind_s.append(dt)
        replay = self._w.next_seq - start
        event = {
            "generation": int(gen),
            "reason": reason,
            "first_seq": start,
            "replay": replay,
            "ms": dt * 1e3,
            # monotonic times (the breakdown of a relocation): failure seen, queue allocated, published, bound
            "t_lost": self._t_lost,
            "t_alloc": self._t_alloc,
            "t_published": self._t_published,
            "t_bound": time.monotonic(),
            "standby": self._sb.used > self._standby_used,
        }
        self._standby_used = self._sb.used
        self._sb.after_relocation()
        self._events.append(event)
        observe.count("edge_relocations", stage=self.stage.name, reason=reason)
        observe.latency("edge_relocate", dt, stage=self.stage.name)
        observe.emit("edge.relocated", stage=self.stage.name, **event)
        log.info(
            "stage %s: edge relocated (%s) to generation %d, replaying %d items from %d (%.3f ms)",
            self.stage,
            reason,
            int(gen),
            replay,
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

    def _turn_on_write_behind(self, q: FabricQueue) -> bool:
        """Write-behind on ``q`` where its handle offers it; False (logged once per queue) where not."""
        turn_on = getattr(q, "set_write_behind", None)
        why = f"{type(q).__name__} has no write-behind"
        if turn_on is not None:
            try:
                turn_on()
                return True
            except E.Unsupported as exc:
                why = str(exc)
        log.info("stage %s: write-behind asked for, but not on this queue: %s", self.stage, why)
        return False

    def _confirm(self) -> None:
        """Write-behind: confirm the current queue's publications in flight (raises their failure)."""
        q = self._q
        if self._wb_on and q is not None:
            q.flush()  # type: ignore[attr-defined]  # (a write-behind handle has it: _turn_on_write_behind)

    def _retire(self, old: FabricQueue, fence_gen: EdgeGeneration | None, seal_seq: int, reachable: bool) -> None:
        if not reachable and old.owner:
            # not sealed, not closed now (both reach the node): freed with the other retired queues
            self._unreachable.add(id(old))
            self._retired.append(old)
            self._free_after = time.monotonic() + _UNREACHABLE_FREE_DELAY_S
            return
        try:
            if fence_gen is not None:
                try:
                    old.advance_epoch(int(fence_gen))
                except E.StaleEpoch:
                    pass
            old.seal(seal_seq)
        except (E.FabricError, OSError) as exc:  # pragma: no cover - unreachable queue
            log.debug("stage %s: could not seal the old queue: %s", self.stage, exc)
        flush = getattr(old, "flush", None) if self._wb_on else None
        if flush is not None:  # write-behind: what is still in flight fails now or lands (the window replays it)
            try:
                flush()
            except (E.FabricError, E.FabricValueError, OSError) as exc:
                log.debug("stage %s: publications in flight on the old queue: %s", self.stage, exc)
        old.close()
        if old.owner:
            self._retired.append(old)

    def _free_retired(self, *, force: bool) -> None:
        if not self._retired or (not force and time.monotonic() < self._free_after):
            return
        q = self._q
        if not force and q is not None:
            try:
                if not q.stats()["consumer"]:
                    return  # the consumer may still be draining an old queue (and acking there)
            except (E.FabricError, OSError):  # pragma: no cover
                return
            # the consumer is on the current queue: the last acks it left in the old ones count.
            # An old queue that cannot be read (its node is gone) is freed all the same: were one
            # failure to keep them all, the producer would never leave its slow path again
            for old in self._retired:
                if id(old) in self._unreachable:
                    continue
                try:
                    self._w.ack(old.acked)
                except (E.FabricError, OSError):
                    continue
        for old in self._retired:
            try:
                old.free()
            except (E.FabricError, OSError):  # pragma: no cover
                pass
        self._retired.clear()
        self._unreachable.clear()

    # -- steps: what the guarded call site runs ------------------------------------------------
    def _catch_up(self, timeout: float | None, deadline: float | None) -> bool:
        """Push window items ``[qnext, next_seq)`` into the current queue.

        True when all are in; False when the queue is full and the time is up
        (``timeout=0``: at once). Raises the queue's failures."""
        q = self._q
        assert q is not None
        w = self._w
        while w.qnext < w.next_seq:
            c, k = w.next_part()
            want = c.n - k
            part = c.part(k)
            t = 0.0 if timeout == 0 else _remaining(deadline)
            # wait for space in slices of a quarter TTL, renewing the lease in between; a slice
            # ends when the renewal is due, so a renewal is never late by up to a slice (with a
            # TTL of 0.5 s that left 125 ms of margin, which a loaded CI machine once ate)
            slice_ = self._renew_slice()
            last_slice = t is not None and t <= slice_
            wait = t if last_slice else slice_
            if c.kind == SINGLE:
                if wait == 0.0:
                    done = 1 if q.try_push(part) else 0
                else:
                    try:
                        q.push(part, timeout=wait)
                        done = 1
                    except TimeoutError:
                        done = 0
            else:
                if wait == 0.0:
                    done = q.push_batch(part, timeout=0)
                else:
                    try:
                        done = q.push_batch(part, timeout=wait)
                    except TimeoutError as exc:
                        done = int(exc.args[1]) if len(exc.args) > 1 else 0
            if done:
                self._replayed += w.sent(done)
            if done < want:
                if last_slice:
                    return False
                self._maybe_renew()  # a long wait for a slow consumer must not cost the lease
        return True

    def _push_step(self, deadline: float | None, timeout: float | None) -> bool:
        self._maybe_renew()
        done = self._catch_up(timeout, deadline)
        if done:
            if self._retired:
                self._free_retired(force=False)  # after the replay: off the consumer's critical path
            self._standby_step()
        return done

    def _standby_step(self) -> None:
        """The next queue, made and announced once the replay after a relocation is in
        (off the consumer's critical path; see :mod:`grafos_fabric.pipeline.standby`), or
        made again away from the current queue's node."""
        sb = self._sb
        sb.check_placement()
        if sb.due and self._gen is not None and self._state is _BOUND:
            sb.make(self._gen, self._writer, self._q_ref)

    def _drive(self, deadline: float | None, timeout: float | None) -> bool:
        """Catch the queue up with the window, relocating on failures."""
        return self._guarded(self._push_step, deadline, timeout)

    def _window_step(self, nbytes: int, deadline: float | None) -> bool:
        """True when the window has room for ``nbytes``; else push the backlog (the
        consumer can only ack what is in the queue) and check the queue."""
        self._refresh_acked()
        if self._w.has_room(nbytes):
            return True
        if self._push_step(deadline, 0):
            self._confirm()  # write-behind: the consumer can ack only what is confirmed
        self._check_queue()
        return False

    def _wait_window(self, nbytes: int, deadline: float | None, timeout: float | None) -> None:
        """Backpressure: wait until the window has room for ``nbytes`` (or is empty)."""
        backoff = Backoff(deadline, first=20e-6, cap=1e-3)
        while not self._guarded(self._window_step, nbytes, deadline):
            if timeout == 0:
                raise EdgeError(EdgeError.QUEUE_FULL, f"stage {self.stage}: the replay window is full")
            if backoff.expired():
                raise TimeoutError(f"stage {self.stage}: timed out waiting for the consumer to ack (window full)")
            backoff.sleep()

    def _flush_step(self) -> bool:
        self._maybe_renew()
        done = self._catch_up(0, None)
        if done:
            self._confirm()  # write-behind: the consumer can ack only what is confirmed
            self._standby_step()
        self._refresh_acked()
        if done and self._w.acked >= self._w.next_seq:
            return True
        self._check_queue()
        return False

    def _poll_step(self) -> None:
        self._maybe_renew()
        if self._catch_up(0, None):
            self._confirm()  # write-behind: an idle producer's last items become visible
            if self._retired:
                self._free_retired(force=False)
            self._standby_step()
        self._refresh_acked()
        self._check_queue()

    # -- public pushing ---------------------------------------------------------------------------
    def _push_one(self, buf: Any, timeout: float | None) -> int:
        self._check_open()
        deadline = _deadline(timeout)
        data, nbytes = copy_item(buf)
        w = self._w
        self._refresh_acked()
        if not w.has_room(nbytes):
            self._wait_window(nbytes, deadline, timeout)
        seq = w.append(1, SINGLE, data, nbytes)
        try:
            ok = self._drive(deadline, timeout)
        except TimeoutError:
            if seq < w.pushed_hi:
                return seq  # the item reached a queue once: it is accepted and will be replayed
            w.rollback(seq)
            raise
        except (EdgeError, E.StaleEpoch, E.FabricValueError):
            if seq >= w.pushed_hi:
                w.rollback(seq)  # never reached a queue: not accepted
            raise
        if not ok:
            if seq < w.pushed_hi:
                return seq
            w.rollback(seq)
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
        """The common case in one go: BOUND, no backlog, room everywhere, lease not due. -1: take the slow path."""
        w = self._w
        if self._state is not _BOUND or w.qnext != w.next_seq or self._retired or self._sb.due:
            return -1
        q = self._q
        assert q is not None
        self._fast += 1
        if self._fast & 63 == 0:
            self._refresh_acked()
            self._sb.check_placement()
        data, nbytes = copy_item(buf)
        if (w.nbytes and w.nbytes + nbytes > w.limit) or (self.renew and self.fabric.clock.now_ns() >= self._renew_at):
            return -1
        try:
            if not q.try_push(data):
                return -1
        except _QUEUE_LOST:
            return -1  # not answered here: the slow path meets the same failure in the guarded call
        seq = w.pushed_one(data, nbytes)
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
            kind = ROWS
        else:
            items = [copy_item(b) for b in bufs]
            n = len(items)
            if n == 0:
                return 0
            data = [d for d, _ in items]
            nbytes = sum(s for _, s in items)
            kind = LIST
        w = self._w
        if nbytes > w.limit and n > 1:
            return self._push_split(bufs, nbytes, deadline, timeout)
        self._refresh_acked()
        if not w.has_room(nbytes):
            try:
                self._wait_window(nbytes, deadline, timeout)
            except EdgeError as exc:
                if timeout == 0 and exc.kind == EdgeError.QUEUE_FULL:
                    return 0  # timeout=0: what fits, and nothing fits
                raise
        seq = w.append(n, kind, data, nbytes)
        try:
            ok = self._drive(deadline, timeout)
        except TimeoutError:
            ok = False
        except (EdgeError, E.StaleEpoch, E.FabricValueError):
            w.rollback(seq)  # keeps what reached a queue
            raise
        if not ok:
            kept = max(w.pushed_hi, w.qnext) - seq
            if kept < n:
                w.rollback(seq + max(kept, 0))
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
        per = max(1, n * (self._w.limit // 2) // max(1, nbytes))
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
        backoff = Backoff(_deadline(timeout), first=20e-6, cap=2e-3)
        while not self._guarded(self._flush_step):
            if backoff.expired():
                raise TimeoutError(
                    f"stage {self.stage}: {self._w.next_seq - self._w.acked} items not acked within {timeout}s"
                )
            backoff.sleep()

    def poll(self) -> None:
        """Housekeeping for an idle producer: renew, notice a seal or a lost lease and relocate, push
        backlog, confirm write-behind publications (the last items pushed become visible)."""
        self._check_open()
        self._guarded(self._poll_step)

    def _check_open(self) -> None:
        if self._state is _CLOSED:
            raise E.QueueClosed(f"producer of stage {self.stage} is closed")
        if self._state is _FENCED:
            raise E.StaleEpoch(f"stage {self.stage}: this producer was fenced out by a newer one") from self._fenced

    # -- teardown, stats -------------------------------------------------------------------------
    def close(self) -> None:
        """Give up the producer role and free retired queues (idempotent).

        The current queue stays leased until its lease runs out, so the
        consumer can drain it; :meth:`free` gives it back at once."""
        if self.closed:
            return
        self.closed = True
        self._to(_CLOSED)
        self._sb.discard()
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
        w = self._w
        out: dict[str, Any] = {
            "stage": self.stage.name,
            "role": self.role,
            "state": self._state.value,
            "generation": None if self._gen is None else int(self._gen),
            "relocations": self._relocations,
            "relocation_failures": self._failures,
            "reasons": dict(self._reasons),
            "pushed": self._pushed,
            "replayed": self._replayed,
            "standby_made": self._sb.made,
            "standby_used": self._sb.used,
            "standby_missed": self._sb.missed,
            "write_behind": self._wb_on,
            "next_seq": w.next_seq,
            "acked": w.acked,
            "window_items": w.items,
            "window_bytes": w.nbytes,
            "queued_to": w.qnext,
            "retired": len(self._retired),
            "retired_unreachable": len(self._unreachable),
            "queue": _queue_stats(self._q),
        }
        out.update(self._rebind_stats())
        return out

    def __repr__(self) -> str:
        gen = None if self._gen is None else int(self._gen)
        return (
            f"<EdgeProducer stage={self.stage.name!r} {self._state.value} generation={gen} "
            f"next_seq={self._w.next_seq} acked={self._w.acked}>"
        )
