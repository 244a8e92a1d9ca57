"""The consuming side of a relocatable edge: rebind on a new generation, dedup by sequence.

The consumer reads the current queue; every item (or batch) it reads goes
through its :class:`~grafos_fabric.pipeline.gate.SequenceGate` (deliver,
drop a duplicate, or raise on a gap). It looks for a newer generation in the
handoff record when its queue is empty (every ``poll_interval``), sealed and
drained, or failed; see the package docstring ("Rebind") for the protocol.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import errors as E
from .. import observe
from ..backoff import Backoff
from ..checkpoint import StageId
from ..drivers.base import Fabric, RegionRef
from ..errors import EdgeError
from ..fence import EdgeGeneration, FenceEpoch
from ..handoff import HandoffReader, HandoffRecord
from ..locator import QueueLocator
from ..queue import Batch, FabricQueue, Item, _deadline
from ..slots import BlockDevice
from .edge import _CONSUMER_LOST, DEFAULT_CONSUMER_STAGE, RelocatableQueueEdge, _queue_stats, _remaining
from .gate import SequenceGate
from .standby import announced_standby

__all__ = ["EdgeConsumer"]

log = logging.getLogger("grafos_fabric.pipeline")

#: A read of the current queue that fails with ``Disconnected`` while its node says the lease is
#: live (``Disconnected.lease_live``: only this handle's connection was lost) is tried again on the
#: same queue up to this many times in a row before the queue counts as lost. A UCX node fences a
#: client's whole session when another lease the session held ends (a standby replaced, a retired
#: queue freed): the queues it still holds there are live, and dropping one would leave the consumer
#: waiting for a generation its producer, which never lost the queue, does not publish.
_LIVE_RETRIES = 3


def _close_quietly(q: FabricQueue) -> None:
    """Close a handle that is not the current queue (a standby, an early attach): its node may be
    gone, and what that raises is no failure of the queue in use."""
    try:
        q.close()
    except (E.FabricError, OSError) as exc:
        log.debug("closing a side queue handle: %s", exc)


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
        self._gate = SequenceGate(input_offset, f"stage {self.stage}")  # deliver / drop / gap
        self._acked_local = input_offset or 0
        self._rebinds = 0
        self._pending: HandoffRecord | None = None  # a newer generation, seen while the old queue drains
        self._ready: tuple[int, FabricQueue] | None = None  # the pending generation's queue, attached early
        self._lost_at: float | None = None  # when the current queue was found done (rebind timer)
        self._next_poll = 0.0
        self._seen: dict[int, float] = {}  # generation -> when a poll first returned it (monotonic)
        # the producer's standby queue, attached ahead: (the generation it is for, its locator,
        # the handle, when its announcement was read); see grafos_fabric.pipeline.standby
        self._sb: tuple[int, QueueLocator, FabricQueue, float] | None = None
        self._sb_tick = 1  # pops until the fast path next looks at the clock for a busy poll
        self._sb_next_poll = 0.0
        self._sb_every = poll_interval  # busy polls back off (x2, to 64 poll_intervals) while they find nothing
        self._sb_binds = 0
        self._unconfirmed: RegionRef | None = None  # a standby bound before its generation's record was read
        self._sb_refused = 0
        self._live_retries = 0  # lease-live Disconnected retries of the current queue in a row
        self._reconnects = 0  # ... in all (stats: "reconnects")
        rec = self._reader.poll()
        if rec is None:
            return
        self._learn(rec)
        if input_offset is not None:
            # restart: seal what the predecessor was reading, ask for a replay from input_offset
            try:
                old = FabricQueue.attach(fabric, QueueLocator.from_bytes(rec.payload))
                old.seal(input_offset)
                old.close()
            except (E.FabricError, E.FabricValueError, OSError) as exc:
                log.debug("stage %s: the current queue is unreachable: %s", self.stage, exc)
            self._gen = rec.generation
            self._lost_at = time.monotonic()
            log.info("stage %s: restarted at %d; sealed generation %d", self.stage, input_offset, int(rec.generation))
            return
        self._attach(rec)

    # -- state ---------------------------------------------------------------------------
    @property
    def position(self) -> int | None:
        """The sequence of the next item to deliver (None before the first one, on a fresh start)."""
        return self._gate.expected

    @property
    def acked(self) -> int:
        """What this consumer acked: every sequence below it is durably processed."""
        return self._acked_local

    def ack(self, seq: int) -> None:
        """Publish that every item up to and including ``seq`` is durably processed.

        Call it after the stage's checkpoint (the producer trims its replay
        window to it). Acks only grow; ``seq`` must have been delivered."""
        exp = self._gate.expected
        if exp is None or seq >= exp:
            raise E.FabricValueError(f"cannot ack {seq}: delivered up to {exp}")
        if seq + 1 > self._acked_local:
            self._acked_local = seq + 1
            q = self._q
            if q is not None:
                try:
                    q.set_acked(self._acked_local)
                except E.Disconnected as exc:
                    if not exc.lease_live:
                        raise
                    self._reconnects += 1  # only the connection was lost: acked only grows, so once more
                    q.set_acked(self._acked_local)

    # -- binding ---------------------------------------------------------------------------
    def _attach(self, rec: HandoffRecord) -> bool:
        """Bind to the queue ``rec`` names; False when it is already gone."""
        loc = QueueLocator.from_bytes(rec.payload)
        q = self._take_ready(rec) or self._take_standby(int(rec.generation), loc)
        if q is None:
            try:
                q = FabricQueue.attach(self.fabric, loc, mapped=self.mapped)
            except (E.LeaseExpired, E.Revoked, E.Disconnected, E.NotReady) as exc:
                log.info("stage %s: generation %d is already gone: %s", self.stage, int(rec.generation), exc)
                self._gen = rec.generation
                return False
        return self._bind(q, rec.generation)

    def _bind(self, q: FabricQueue, generation: EdgeGeneration, *, standby: bool = False) -> bool:
        """``q`` (of ``generation``) becomes the current queue."""
        first = q.first_seq
        exp = self._gate.expected
        try:
            self._gate.bind(first, int(generation))
        except EdgeError:
            q.close()
            raise
        had = self._q is not None or self._lost_at is not None
        self._unconfirmed = None
        self._q = q
        self._gen = generation
        self._live_retries = 0
        self._sb_every = self.poll_interval  # the next standby is announced soon: look for it
        self._sb_next_poll = time.monotonic() + self.poll_interval
        if self._acked_local > first:
            q.set_acked(self._acked_local)
        if had:
            self._rebinds += 1
            now = time.monotonic()  # one instant: the sample and the event's t_bound agree
            dt = now - self._lost_at if self._lost_at is not None else 0.0
            if self._lost_at is not None:
                self._rebind_s.append(dt)
            event = {
                "generation": int(generation),
                "first_seq": first,
                "position": exp,
                "ms": dt * 1e3,
                # monotonic times: queue found done, newer record (or the standby's announcement)
                # first read, bound to its queue
                "t_lost": self._lost_at,
                "t_seen": self._seen.get(int(generation)),
                "t_bound": now,
                "standby": standby,
            }
            self._events.append(event)
            observe.count("edge_rebinds", stage=self.stage.name)
            observe.latency("edge_rebind", dt, stage=self.stage.name)
            observe.emit("edge.rebound", stage=self.stage.name, **event)
        self._lost_at = None
        log.debug("stage %s: bound to generation %d (first_seq %d)", self.stage, int(generation), first)
        return True

    # -- the standby (grafos_fabric.pipeline.standby) ----------------------------------------
    def _learn(self, rec: HandoffRecord) -> None:
        """Attach the standby ``rec`` announces (off the critical path). ``Corrupted`` when the
        announcement does not validate; a standby that cannot be attached is left out."""
        sb = self._sb
        if sb is not None and sb[0] <= int(rec.generation):  # the generation the standby was for is out
            self._sb = None
            if sb[0] == int(rec.generation) and self._as_published(sb[2], QueueLocator.from_bytes(rec.payload)):
                self._close_ready()
                self._ready = (sb[0], sb[2])  # it is that generation's queue: attached already
            else:
                _close_quietly(sb[2])
        loc = announced_standby(rec)
        if loc is None:
            return
        gen = int(rec.generation) + 1
        sb = self._sb
        if sb is not None and sb[0] == gen and sb[1].region == loc.region:
            return
        self._close_standby()
        try:
            q = FabricQueue.attach(self.fabric, loc, mapped=self.mapped)
        except (E.FabricError, E.FabricValueError, OSError) as exc:
            log.debug("stage %s: the standby for generation %d not attached: %s", self.stage, gen, exc)
            return
        self._sb = (gen, loc, q, time.monotonic())

    def _take_standby(self, generation: int, loc: QueueLocator) -> FabricQueue | None:
        """The attached standby when it is the queue ``loc`` names for ``generation`` (no second
        attach of the same queue); a standby for that generation that is another queue is closed."""
        sb = self._sb
        if sb is None or sb[0] != generation:
            return None
        self._sb = None
        if sb[1].region == loc.region and not sb[2].closed and self._as_published(sb[2], loc):
            return sb[2]
        _close_quietly(sb[2])
        return None

    @staticmethod
    def _as_published(q: FabricQueue, loc: QueueLocator) -> bool:
        """A standby handle, attached while it was dormant, is the queue the durable record
        ``loc`` names as it was published: same region, epoch and first_seq (re-read)."""
        if q.closed or q.region.ref() != loc.region:
            return False
        try:
            return q.epoch == loc.epoch and q.reread_first_seq() == loc.first_seq
        except (E.FabricError, OSError):
            return False

    def _bind_standby(self) -> bool:
        """The critical moment: the queue is done. Bind the standby if its producer activated it
        for the next generation (epoch advanced, not sealed); False: take the durable path."""
        sb = self._sb
        gen = self._gen
        if sb is None or gen is None or sb[0] != int(gen) + 1:
            return False
        q = sb[2]
        for attempt in range(2):
            try:
                if q.epoch != sb[0]:
                    return False  # not activated (yet): the producer has not moved
                if q.sealed:
                    self._refuse_standby("it was sealed (fenced)")
                    return False
                first = q.reread_first_seq()  # SYNC POINT: queue-rebase (after the epoch)
                break
            except (E.FabricError, OSError) as exc:
                if attempt == 0 and isinstance(exc, E.Disconnected) and exc.lease_live:
                    self._reconnects += 1  # only the connection was lost (a session fence): read it again
                    continue
                self._refuse_standby(f"it cannot be read ({type(exc).__name__}: {exc})")
                return False
        else:  # pragma: no cover - the loop breaks or returns
            return False
        exp = self._gate.expected
        if exp is not None and first > exp:
            self._refuse_standby(f"it starts at {first}, past {exp}")
            return False
        self._sb = None
        self._seen = {sb[0]: sb[3]}
        self._sb_binds += 1
        self._bind(q, FenceEpoch(sb[0]), standby=True)
        self._unconfirmed = sb[1].region
        return True

    def _refuse_standby(self, why: str) -> None:
        log.info("stage %s: not binding the standby: %s; reading the handoff record", self.stage, why)
        self._sb_refused += 1
        self._close_standby()

    def _close_standby(self) -> None:
        sb, self._sb = self._sb, None
        if sb is not None:
            _close_quietly(sb[2])

    def _maybe_learn(self) -> None:
        """While busy, read the handoff record now and then: every ``poll_interval`` while no
        standby for the next generation is known (backing off, x2 up to 64 intervals, while
        nothing is announced: a producer without a standby), every 64 once one is (the
        producer may replace it: one on the current queue's node is made again elsewhere).
        A newer generation found here is attached at once (pending)."""
        now = time.monotonic()
        if now < self._sb_next_poll or self._pending is not None:
            return
        try:
            rec = self._poll()
        except E.FabricError as exc:  # a side handle's node (a standby's): never the queue in use
            log.info("stage %s: reading the handoff record while busy: %s", self.stage, exc)
            self._sb_next_poll = now + self._sb_every
            return
        sb = self._sb
        gen = self._gen
        if sb is not None and gen is not None and sb[0] == int(gen) + 1:
            self._sb_every = 64 * self.poll_interval
        elif rec is None:
            self._sb_every = min(self._sb_every * 2, 64 * self.poll_interval)
        self._sb_next_poll = now + self._sb_every
        if rec is not None:
            self._pending = rec
            try:
                self._preattach(rec)
            except E.FabricError as exc:  # attached when the switch comes
                log.info("stage %s: generation %d not attached early: %s", self.stage, int(rec.generation), exc)

    def _preattach(self, rec: HandoffRecord) -> None:
        """Attach the queue of a newer generation now, while the old queue drains: the switch
        then costs no attach. Best effort: a queue that cannot be attached now is attached (and
        its failure reported) when the switch comes."""
        if self._ready is not None and self._ready[0] == int(rec.generation):
            return
        self._close_ready()
        loc = QueueLocator.from_bytes(rec.payload)
        q = self._take_standby(int(rec.generation), loc)
        if q is not None:
            self._ready = (int(rec.generation), q)
            return
        try:
            q = FabricQueue.attach(self.fabric, loc, mapped=self.mapped)
        except (E.FabricError, E.FabricValueError, OSError) as exc:
            log.debug("stage %s: generation %d not attached early: %s", self.stage, int(rec.generation), exc)
            return
        self._ready = (int(rec.generation), q)

    def _take_ready(self, rec: HandoffRecord) -> FabricQueue | None:
        """The queue attached early for ``rec``'s generation (None: none was; an early queue of
        another generation is closed)."""
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        if ready[0] == int(rec.generation) and not ready[1].closed:
            return ready[1]
        _close_quietly(ready[1])
        return None

    def _close_ready(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            _close_quietly(ready[1])

    def _drop_current(self) -> None:
        q = self._q
        if q is not None:
            q.close()
        self._q = None
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    def _poll(self) -> HandoffRecord | None:
        """A record of a newer generation than the current one, or None. Every record read
        (amendments too) is learned from (its standby); a record at the current generation that
        names another queue than the one bound (a standby bound at the critical moment, when a
        producer taking over published elsewhere) is returned too: the consumer moves there."""
        rec = self._reader.poll(amendments=True)
        if rec is None:
            return None
        self._learn(rec)
        if self._gen is not None and rec.generation <= self._gen:
            bound = self._unconfirmed
            if rec.generation < self._gen or bound is None:
                return None
            self._unconfirmed = None
            if QueueLocator.from_bytes(rec.payload).region == bound:
                return None  # the record names the standby bound at the critical moment: confirmed
            log.warning(
                "stage %s: the record of generation %d names another queue than the one bound; moving there",
                self.stage,
                int(rec.generation),
            )
        self._seen = {int(rec.generation): time.monotonic()}
        return rec

    def _rebind(self, deadline: float | None) -> None:
        """Without a queue: wait for a newer generation and attach it."""
        backoff = Backoff(deadline, first=50e-6, cap=2e-3)
        while self._q is None:
            if self._pending is None and self._bind_standby():
                return
            rec = self._pending or self._poll()
            self._pending = None
            if rec is not None:
                if self._attach(rec):
                    return
                continue
            if backoff.expired():
                raise TimeoutError(f"stage {self.stage}: no new generation of the edge within the timeout")
            backoff.sleep()

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
                exp = self._gate.expected
                q.seal(exp if exp is not None else q.acked)
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
        # a newer generation: seal the old queue (a zombie producer stops there) and drain it;
        # attach the new one meanwhile, so the switch costs no attach
        self._pending = rec
        self._seal_current()
        self._preattach(rec)
        return True

    # -- popping ---------------------------------------------------------------------------------
    def _next(self, max_items: int, timeout: float | None, batch: bool) -> Item | Batch | None:
        self._check_open()
        deadline = _deadline(timeout)
        while True:
            if self._q is None:
                if timeout == 0:
                    if self._pending is None and self._bind_standby():
                        continue
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
                self._maybe_learn()  # before the read: what it raises must not lose an item read
                out, again = self._read(q, max_items, wait, batch)
                if out is not None:
                    self._live_retries = 0
                    return out
                if again:
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
                if self._pending is None and self._bind_standby():
                    continue
                if self._pending is None:
                    self._pending = self._poll()
                if self._pending is not None and self._attach(self._pending):
                    self._pending = None
            except _CONSUMER_LOST as exc:
                if self._retry_live(exc):
                    continue
                if isinstance(exc, E.RoleTaken):
                    self._seal_current()
                log.info("stage %s: queue of generation %s lost (%s: %s)", self.stage, self._gen,
                         type(exc).__name__, exc)
                self._drop_current()

    def _retry_live(self, exc: BaseException) -> bool:
        """``exc`` (a read of the current queue failed): True when the same queue is read again,
        because only this handle's connection was lost (``Disconnected.lease_live``; the one-sided
        ring leaves its state as it was when an operation fails, and its next operation reconnects),
        at most :data:`_LIVE_RETRIES` times in a row."""
        if not isinstance(exc, E.Disconnected) or not exc.lease_live or self._live_retries >= _LIVE_RETRIES:
            return False
        self._live_retries += 1
        self._reconnects += 1
        log.info("stage %s: queue of generation %s: the connection was lost, the lease is live (%s); reading it "
                 "again", self.stage, self._gen, exc)
        return True

    def _read(self, q: FabricQueue, max_items: int, wait: float, batch: bool) -> tuple[Item | Batch | None, bool]:
        """One read from ``q`` through the gate: ``(what to deliver, False)`` or
        ``(None, again)``; ``again``: something was read and dropped, read on."""
        gate = self._gate
        dup = gate.duplicates_ahead
        if dup > 0 or batch:  # dup > 0: duplicates ahead in this queue, dropped in bulk
            try:
                b = q.pop_batch(min(dup, 1 << 16) if dup > 0 else max_items, timeout=wait)
            except TimeoutError:
                return None, False
            if not len(b):
                return None, False
            if self._taken_before(q, int(b.seqs[0])):
                b.release()
                return None, True
            if gate.admit_run(b.seqs):
                return b, False
            b.release()
            return None, True
        try:
            item = q.try_pop() if wait == 0.0 else q.pop(timeout=wait)
        except TimeoutError:
            return None, False
        if item is None:
            return None, False
        if self._taken_before(q, item.seq):
            item.release()
            return None, True
        if gate.admit(item.seq):
            return item, False
        item.release()
        return None, True

    def _taken_before(self, q: FabricQueue, first: int) -> bool:
        """The first record this handle reads from ``q`` is past the queue's first
        sequence: an earlier consumer (one that crashed and whose role was taken
        over, or one that closed) took the records before it, and what it took
        may not be durable. Seal the queue with this consumer's position (or the
        queue's ack) and move on: the producer replays from there."""
        gate = self._gate
        if not gate.taken_before(first, q.first_seq):
            return False
        log.info(
            "stage %s: generation %s was partly consumed before this consumer (starts at %d, not %d): asking for "
            "a replay",
            self.stage,
            self._gen,
            first,
            gate.qpos,
        )
        self._seal_current()
        self._drop_current()
        return True

    def pop(self, timeout: float | None = None) -> Item:
        """The next item in sequence order (``item.seq``, ``np.asarray(item)``), rebinding as needed.

        ``TimeoutError`` when nothing arrives within ``timeout`` seconds."""
        q = self._q
        gate = self._gate
        exp = gate.expected
        if q is not None and exp is not None and exp == gate.qpos and not self.closed:
            self._sb_tick -= 1
            if not self._sb_tick:  # every 64 pops: the clock (the busy poll), before the pop
                self._sb_tick = 64
                self._maybe_learn()  # what it raises must not lose an item popped
            try:  # the common case: the next item is there and is the one expected
                it = q.try_pop()
            except E.FabricError:
                it = None  # the slow path meets the same failure and rebinds
            if it is not None:
                if gate.admit(it.seq):
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
        self._close_ready()
        self._close_standby()
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
            "delivered": self._gate.delivered,
            "dropped_duplicates": self._gate.dropped,
            "position": self._gate.expected,
            "acked": self._acked_local,
            "standby_binds": self._sb_binds,
            "standby_refused": self._sb_refused,
            "reconnects": self._reconnects,
            "pending_generation": None if self._pending is None else int(self._pending.generation),
            "queue": _queue_stats(self._q),
        }
        out.update(self._rebind_stats())
        return out

    def __repr__(self) -> str:
        gen = None if self._gen is None else int(self._gen)
        return f"<EdgeConsumer stage={self.stage.name!r} generation={gen} position={self._gate.expected}>"
