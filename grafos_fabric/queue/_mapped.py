""":class:`FabricQueue`: create and attach, the mapped consumer side, and close.

The producer side is :class:`~grafos_fabric.queue._mapped_push._MappedProducer`,
the shared state :class:`~grafos_fabric.queue._handle._QueueHandle`; this module
adds the constructors, the consumer (single pops through a prefetch of
records taken with one C call, batches, the held-items stall check) and
teardown."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from .. import errors as E
from .._ffi import ffi, lib, raise_status
from .._item import PLock, Releaser
from ..drivers.base import Fabric
from ..lease import NS, check_ttl
from ..locator import QueueLocator
from ._handle import _is_mapped_region, _one_sided
from ._items import Batch, Item
from ._layout import (
    _EPOCH_MAX,
    _LEASE_ACTIVE,
    _NO_BYTE_LIMIT,
    _NO_PREFETCH,
    _POLL_SLICE_NS,
    _POS_MASK,
    _SEALED,
    _SPACE_WAITERS_OFF,
    _SPIN,
    _TAIL_OFF,
    DEFAULT_CAPACITY,
    EMPTY,
    END,
    OK,
    PREFETCH_ITEMS,
    RING_HEADER,
    STALL_GRACE,
    _check_int,
    _deadline,
    _new_uncleared,
    _next_pow2,
    _ring_geometry,
    _stall_message,
)
from ._mapped_push import _MappedProducer
from ._roles import _CONSUMER_ID_OFF, _ROLE_CONSUMER, _reclaim_role, _role_id

log = logging.getLogger(__name__)

_U8 = np.dtype(np.uint8)


class FabricQueue(_MappedProducer):
    """A bounded single-producer single-consumer queue in a leased region.

    Create with :meth:`create` (allocates and leases the region) or attach with
    :meth:`attach` (from a :class:`QueueLocator`, e.g. in another process).

    Threads: a handle may be shared by threads. Its pushes run one at a time
    and so do its pops; every item goes to exactly one popping thread. Blocking
    calls wait without holding the handle's locks, so other threads (and
    ``close``) are never held up by a waiter. A reservation (:meth:`reserve`)
    holds the producer side until it is committed or aborted.

    Fork: a handle inherited across ``fork()`` is unusable in the child (every
    call raises :class:`~grafos_fabric.errors.ForkedHandle`): attach again there.
    """

    # -- construction --------------------------------------------------------------
    @classmethod
    def create(
        cls,
        fabric: Fabric,
        capacity: int = DEFAULT_CAPACITY,
        ttl: float = 30.0,
        *,
        dtype: Any = None,
        max_item: int | None = None,
        epoch: int = 0,
        first_seq: int = 0,
    ) -> FabricQueue:
        """Allocate a leased region and build a ring of ``capacity`` bytes in it.

        ``capacity`` is rounded up to a power of two (at least 4096);
        ``max_item`` defaults to the largest item that always fits (half the
        ring less a record header). With ``dtype``, items are arrays of that
        dtype: pushes must match it and pops come out in it.
        """
        if not getattr(fabric, "mapped_regions", True):
            return _one_sided().create(
                fabric, capacity, ttl, dtype=dtype, max_item=max_item, epoch=epoch, first_seq=first_seq
            )
        cap, max_item, _dt, dtext = _ring_geometry(capacity, max_item, epoch, first_seq, dtype)
        ttl = check_ttl(ttl)
        region = fabric.alloc(RING_HEADER + cap, ttl)
        if not _is_mapped_region(region):
            region.lease.free()
            raise E.Unsupported(f"{fabric.url}: alloc returned a region that is not mapped here")
        raw = dtext.encode("ascii")
        rc = lib.gf_ring_init(
            region.payload_pointer(),
            region.nbytes,
            cap,
            max_item,
            first_seq,
            epoch,
            raw,
            len(raw),
            0,
        )
        if rc != OK:
            region.lease.free()
            raise_status(rc, "building the ring")
        log.debug("created queue %s (capacity %d, max_item %d)", region.ref().name, cap, max_item)
        return cls(fabric, region, owner=True, epoch=epoch)

    @classmethod
    def attach(
        cls,
        fabric: Fabric,
        locator: QueueLocator | bytes,
        *,
        epoch: int | None = None,
        mapped: bool = True,
        take_over: bool = False,
    ) -> FabricQueue:
        """Attach to the queue a locator names. ``epoch`` stamps this handle's
        pushes (default: the queue's current epoch). ``mapped=False`` (or a
        driver whose regions don't map here, like verbs) speaks the one-sided
        ring protocol (:class:`~grafos_fabric.queue.OneSidedQueue`) with the same API.

        ``take_over=True`` lets this handle claim a role whose holder died (or
        dropped its handle) without closing: a consumer then resumes at
        ``head``, so what the dead one popped but never released comes again.
        Death is proven by the region's role lock (an open-file-description
        lock the kernel drops when its holder exits, in any pid namespace); a
        live holder keeps its role (``RoleTaken``), and so does any holder
        without ``take_over``. Regions without role locks refuse
        ``take_over`` (``Unsupported``).

        A higher ``epoch`` than the queue's fences the current producer. The
        role moves over in place only when no producer holds it or its holder
        is provably gone; a live (or unprovable) holder could still be copying
        record bytes into the ring, so instead the queue is fenced *and sealed*
        and the first push raises ``QueueSealed``: move to a fresh queue (as
        ``RelocatableQueueEdge`` does)."""
        if epoch is not None:
            epoch = _check_int("epoch", epoch, 0, _EPOCH_MAX)
        if not isinstance(locator, QueueLocator):
            locator = QueueLocator.from_bytes(locator)
        if take_over and (not mapped or not getattr(fabric, "mapped_regions", True)):
            raise E.Unsupported("take_over needs the holder's host: attach mapped on the node that holds the ring")
        region = fabric.attach(locator.region, mapped=mapped)
        if not region.mapped:
            return _one_sided()(fabric, region, locator, epoch=epoch)
        if take_over and not callable(getattr(region, "lock_role", None)):
            raise E.Unsupported(f"take_over needs role locks, which {fabric.url} regions don't have")
        q = cls(fabric, region, owner=False, epoch=epoch)
        q._take_over = bool(take_over)
        if q.capacity != locator.capacity or q.max_item != locator.max_item:
            raise E.Corrupted("the queue at this locator has another geometry: the locator is stale or foreign")
        return q

    def _consumer(self) -> Any:
        c = self._cons
        if c is not None:
            return c
        self._check_open()
        self.lease.check()
        supported, lock = self._lock_role(_ROLE_CONSUMER)
        try:
            if supported and lock is None:
                raise E.RoleTaken("a live consumer holds this queue's consumer role (claiming the consumer role)")
            cap = min(1 << 20, max(64, _next_pow2(self.capacity // 32)))
            # not zeroed: the ring writes an entry before it reads it, so the pages fault in as batches
            # use them instead of all at once here (about 1 MiB for a 4 MiB ring, on every rebind)
            pend_end = _new_uncleared("uint64_t[]", cap)
            pend_done = _new_uncleared("uint8_t[]", cap)
            c = ffi.new("gf_consumer *")
            role_id = _role_id(locked=lock is not None)
            lease_state, lease_deadline = self._lease_ptrs
            args = (c, self._ring, self.region.nbytes, lease_state, lease_deadline, role_id, pend_end, pend_done, cap)
            rc = lib.gf_consumer_init(*args)
            if (
                rc == lib.GF_E_ROLE
                and self._take_over
                and lock is not None
                and _reclaim_role(self._ring, _CONSUMER_ID_OFF)
            ):
                rc = lib.gf_consumer_init(*args)
            if rc != OK:
                self._raise(rc, "claiming the consumer role")
            if lock is not None:
                self._role_locks[_ROLE_CONSUMER] = lock
                lock = None
        finally:
            if lock is not None:
                lock.release()
        self._pend = (pend_end, pend_done)
        self._pend_cap = cap
        self._cons_rel = c
        # items release with one native call into c (until close(): then through _release_token)
        rel = Releaser(ffi.buffer(c))
        self._item_info = (*self._item_info[:4], rel)
        fast = self._fast
        if fast is not None:  # single pops go natively from here (the prefetch is the native one)
            addr, capacity, fmt, itemsize = self._item_info[:4]
            fast.set_consumer(ffi.buffer(c), rel, Item, addr, capacity, fmt, itemsize, self._prefetch_bytes, 0)
            fast.set_array_dtype(_U8 if self.dtype is None else self.dtype)  # pop_array's, natively
            self._pf_it = fast
        self._cons = c
        return c

    def _slow_try_pop(self) -> Item | None:
        """Pop one item, or None when the queue is empty (never waits).

        Raises ``QueueSealed`` once a sealed queue is drained.

        Single pops are served from a *prefetch*: one native call takes the
        published records up to ``PREFETCH_ITEMS`` (and an eighth of the ring),
        each with a release token of its own, and the following pops hand them
        out one by one after a lease check, without crossing into C or touching
        the producer's cache lines."""
        t = next(self._pf_it, None)
        if t is not None:
            lw = self._lease_words
            if lw[0] != _LEASE_ACTIVE or self._clock_ns() >= lw[1]:
                self.lease.check()  # fails closed for good (the record stays unreleased: the lease is gone)
            return Item(self, t[0], t[1], t[2], t[3], None)
        with self._clock_lock:
            t = next(self._pf_it, None)  # another thread may have refilled meanwhile
            if t is not None:
                self.lease.check()
                return Item(self, t[0], t[1], t[2], t[3], None)
            return self._refill()

    def _note_consumer_thread(self) -> None:
        """Remember whether consumer calls came from more than one thread (see ``_wait_data``)."""
        tid = threading.get_ident()
        if self._cons_tid != tid:
            if self._cons_tid is None:
                self._cons_tid = tid
            else:
                self._cons_multi = True

    def _refill(self) -> Item | None:
        """With the consumer lock held: prefetch records and hand out the first."""
        c = self._cons or self._consumer()
        if self._cons_tid != threading.get_ident():
            self._note_consumer_thread()
        fast: Any = self._fast
        if fast is not None and id(self._pf_it) == id(fast):
            # refills run natively from the one thread that pops here (none once several do)
            fast.note_thread(0 if self._cons_multi else self._cons_tid)
            t = fast.refill()  # the next record, taken (another thread's native pop may race this one)
            if type(t) is tuple:
                return Item(self, t[0], t[1], t[2], t[3], None)
            return self._refill_failed(t)
        outs = self._outs
        rc = lib.gf_pop_batch(
            c,
            PREFETCH_ITEMS,
            self._prefetch_bytes,
            1,
            0 if self._native_clock else self._clock.now_ns(),
            self._pfa_offs_p,
            self._pfa_lens_p,
            self._pfa_seqs_p,
            outs,
            outs + 1,
            outs + 2,
        )
        if rc == OK:
            n = outs[0]
            token = outs[1]
            if n == 1:
                return Item(self, token, self._pfa_offs_p[0], self._pfa_lens_p[0], self._pfa_seqs_p[0], None)
            offs = self._pfa_offs[:n].tolist()
            lens = self._pfa_lens[:n].tolist()
            seqs = self._pfa_seqs[:n].tolist()
            self._pf_it = zip(range(token + 1, token + n), offs[1:], lens[1:], seqs[1:], strict=True)
            return Item(self, token, offs[0], lens[0], seqs[0], None)
        return self._refill_failed(rc)

    def _refill_failed(self, rc: int) -> Item | None:
        if rc == EMPTY:
            return None
        if rc == END:
            raise E.QueueSealed("queue is sealed and drained", seal_seq=self.seal_seq)
        if rc == lib.GF_E_HELD and self._cons_multi:
            return None  # other threads hold the oldest items: nothing to hand out until they release
        self._raise(rc, "pop")
        return None

    def _slow_pop(self, timeout: float | None = None) -> Item:
        """Pop one item, waiting for it; ``TimeoutError`` when ``timeout`` passes."""
        if timeout is not None and not (type(timeout) is float and timeout >= 0.0):
            _deadline(timeout)  # refuse a bad timeout even when no wait is needed
        item = self.try_pop()
        if item is not None:
            return item
        deadline = _deadline(timeout)
        stall: list[Any] = [None, -1]
        while True:
            self._wait_data(deadline, stall)
            item = self.try_pop()
            if item is not None:
                return item

    def _slow_pop_array(self, timeout: float | None = None) -> np.ndarray[Any, Any]:
        """``pop_array`` where the native path does not serve it: ``pop`` and the item's
        array, whose views hold the item (so its space is reused once they are gone)."""
        return self.pop(timeout).array()

    def _wait_data(self, deadline: float | None, stall: list[Any]) -> None:
        """Sleep (without the consumer lock) until data may have come, a slice at most.

        Raises ``HeldItemsStall`` when waiting would deadlock: the ring is empty
        for this consumer, the producer waits for space, and items popped here
        pin it. When several threads pop from this handle, another thread may
        be about to release what it holds, so the stall is declared only once
        it has lasted ``STALL_GRACE`` seconds with no release."""
        c = self._cons
        if c is None:
            with self._clock_lock:
                c = self._cons or self._consumer()
        elif self.closed or self._forked:
            self._check_open()
        held = int(lib.gf_consumer_outstanding(c))
        tokens_full = held >= self._pend_cap
        if held and (tokens_full or lib.gf_load_acquire_at(self._ring, _SPACE_WAITERS_OFF) & 0xFFFFFFFF):
            if not tokens_full:
                # The producer waits for space. Not a stall if records were
                # published after this consumer last looked (read after the
                # waiters word, so the two observations are ordered): pop again.
                w = int(lib.gf_load_acquire_at(self._ring, _TAIL_OFF))
                if (w & _POS_MASK) != int(c.rpos) or w & _SEALED:
                    stall[0] = None
                    return
            if not self._cons_multi:
                raise E.HeldItemsStall(_stall_message(held))
            now = time.monotonic()
            if stall[0] is None or stall[1] != held:
                stall[0], stall[1] = now, held
            elif now - stall[0] >= STALL_GRACE:
                raise E.HeldItemsStall(_stall_message(held))
        else:
            stall[0] = None
        slice_ns = self._slice(deadline)
        if slice_ns <= 0:
            raise TimeoutError("timed out waiting for an item")
        if tokens_full:  # data may be there, but no token until another thread releases: poll
            time.sleep(min(slice_ns / NS, 0.001))
            return
        if stall[0] is not None:
            slice_ns = min(slice_ns, _POLL_SLICE_NS * 10)
        self._check_size()
        rc = lib.gf_wait_data(c, slice_ns, _SPIN)
        if rc < 0:
            self._raise(rc, "waiting for data")
        # the lease is checked by the next native pop itself

    def _wait_readable(self, deadline: float | None) -> None:
        """Wait (GIL released) until data may be there, for the asyncio worker."""
        self._wait_data(deadline, [None, -1])

    def pop_batch(self, max_items: int, timeout: float | None = None) -> Batch:
        """Pop up to ``max_items`` items with one native call.

        Waits until at least one item is there (``timeout=0``: returns an empty
        batch at once; ``timeout>0``: ``TimeoutError`` when it passes). A batch
        stops at the ring's wrap point, so it may hold fewer items than are
        queued; its payloads are contiguous. (A ``max_items`` larger than the
        ring can hold records is the same as that many.)
        """
        max_items = _check_int("max_items", max_items, 1, 1 << 62)
        deadline = _deadline(timeout)
        if max_items > self._max_records:
            max_items = self._max_records  # no batch holds more records than fit in the ring
        stall: list[Any] = [None, -1]
        while True:
            with self._clock_lock:
                it = self._pf_it
                fast: Any = self._fast
                if it is not _NO_PREFETCH and (id(it) != id(fast) or fast.pending):
                    batch = self._batch_from_prefetch(max_items)
                    if batch is not None:
                        return batch
                c = self._cons or self._consumer()
                if self._cons_tid != threading.get_ident():
                    self._note_consumer_thread()
                offs = np.empty(max_items, dtype=np.uint64)
                lens = np.empty(max_items, dtype=np.uint64)
                seqs = np.empty(max_items, dtype=np.uint64)
                po = ffi.from_buffer("uint64_t[]", offs)
                pl = ffi.from_buffer("uint64_t[]", lens)
                ps = ffi.from_buffer("uint64_t[]", seqs)
                outs = ffi.new("uint64_t[3]")
                rc = lib.gf_pop_batch(
                    c, max_items, _NO_BYTE_LIMIT, 0, self._now(), po, pl, ps, outs, outs + 1, outs + 2
                )
                if rc == OK:
                    n = int(outs[0])
                    return Batch(self, outs[1], offs[:n], lens[:n], seqs[:n], outs[2])
            if rc == END:
                raise E.QueueSealed("queue is sealed and drained", seal_seq=self.seal_seq)
            if rc != EMPTY and not (rc == lib.GF_E_HELD and self._cons_multi):
                self._raise(rc, "pop_batch")
            if timeout == 0:
                return Batch.empty()
            self._wait_data(deadline, stall)

    def _batch_from_prefetch(self, max_items: int) -> Batch | None:
        """Items prefetched by single pops go out first, in order, as a batch that
        carries their (consecutive) release tokens; None when none are left.

        Consumer lock held. The prefetch is taken out of reach first; single pops
        that had already reached it may still take some records, so the batch
        is the first run of consecutive records, and what follows it is put back."""
        self.lease.check()
        fast: Any = self._fast
        if fast is not None and id(self._pf_it) == id(fast):
            # the native prefetch: one run of consecutive records (one refill's), the rest stays
            got = fast.take(max_items)
            if got is None:
                return None
            first, offs_l, lens_l, seqs_l = got
            lens_a = np.array(lens_l, dtype=np.uint64)
            uniform = int(lens_a[0]) if bool((lens_a == lens_a[0]).all()) else 0
            return Batch(
                self, first, np.array(offs_l, dtype=np.uint64), lens_a, np.array(seqs_l, dtype=np.uint64), uniform,
                ntokens=len(offs_l),
            )
        it, self._pf_it = self._pf_it, _NO_PREFETCH
        rest = list(it)
        if not rest:
            return None
        k = 1
        limit = min(len(rest), max_items)
        while k < limit and rest[k][0] == rest[k - 1][0] + 1:
            k += 1
        if k < len(rest):
            self._pf_it = iter(rest[k:])
        first = rest[0][0]
        offs = np.array([t[1] for t in rest[:k]], dtype=np.uint64)
        lens = np.array([t[2] for t in rest[:k]], dtype=np.uint64)
        seqs = np.array([t[3] for t in rest[:k]], dtype=np.uint64)
        uniform = int(lens[0]) if bool((lens == lens[0]).all()) else 0
        return Batch(self, first, offs, lens, seqs, uniform, ntokens=k)

    def _release_token(self, token: int) -> None:
        """Release one token; from any thread, and from finalizers (so it never
        takes the handle's Python locks: the native consumer has its own)."""
        c = self._cons_rel
        if c is not None:
            lib.gf_release(c, token)
            if self.closed:
                self._maybe_give_back_consumer()

    @property
    def outstanding(self) -> int:
        """Items and batches popped here and not yet released."""
        c = self._cons_rel
        return 0 if c is None else int(lib.gf_consumer_outstanding(c))

    # -- teardown --------------------------------------------------------------------
    def close(self) -> None:
        """Give up this handle's roles (idempotent): the producer role at once
        (or when an open reservation ends), the consumer role when nothing
        popped here is still unreleased (else it stays with this handle, whose
        items keep releasing into it). Every later push, pop or reservation on
        this handle raises ``QueueClosed``. Views of popped items stay readable;
        the region stays leased until its lease is freed or expires. Threads
        waiting in this handle's blocking calls wake within one wait slice and
        raise ``QueueClosed``."""
        if self.closed:
            return
        self.closed = True
        if self._fast is not None:
            self._fast.close()  # every call takes the Python path (QueueClosed) from now on
        info = self._item_info
        if len(info) > 4:  # items released from now on go through _release_token (which gives the role back)
            info[4].close()
        if self._forked:
            return  # the roles are the parent's: nothing of them is given back here
        self._aio_shutdown()
        p = self._prod
        self._prod = None
        if p is not None:
            if self._reserving:
                self._give_back_after_reserve = True
            else:
                self._give_back_producer(p)
        with self._clock_lock:
            # prefetched records never handed out stay unreleased: head stays before
            # them, and the next consumer reads them again (each is counted here or
            # taken by a single pop that had already reached the prefetch: never both)
            it, self._pf_it = self._pf_it, _NO_PREFETCH
            self._pf_keep = sum(1 for _ in it)
            self._cons = None
        self._maybe_give_back_consumer()

    def _maybe_give_back_consumer(self) -> None:
        """After close: give the consumer role back once no item handed out here
        is unreleased (the prefetched ones that never went out don't count)."""
        c = self._cons_rel
        if c is not None and self.closed and int(lib.gf_consumer_outstanding(c)) <= self._pf_keep:
            lib.gf_consumer_close(c)  # idempotent under the native consumer lock
            self._cons_rel = None
            lock = self._role_locks.pop(_ROLE_CONSUMER, None)
            if lock is not None:
                lock.release()

    def free(self) -> None:
        """Close and give the region back to the fabric now; later calls raise
        ``QueueFreed`` (a ``QueueClosed``)."""
        if self._forked:
            self._check_handle()
        self.close()
        self._freed = True
        self.lease.free()

    def _after_fork_in_child(self) -> None:
        """In a child after fork(): this handle's roles are the parent's. Forget them
        (without giving anything back), close the inherited role-lock fds (the
        parent's fds keep its locks), and refuse every further call."""
        self._forked = True
        self.closed = True
        self._prod = None
        self._cons = None
        self._cons_rel = None
        self._pf_it = _NO_PREFETCH
        self._plock = PLock()
        self._clock_lock = threading.Lock()
        locks, self._role_locks = self._role_locks, {}
        for lock in locks.values():
            lock.release()

    def __enter__(self) -> FabricQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FabricQueue {self.region.ref().name} capacity={self.capacity} epoch={self.epoch}>"
