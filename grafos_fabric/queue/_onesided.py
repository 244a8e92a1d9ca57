"""The one-sided ring protocol: a FabricQueue on a region this process cannot map.

Same ring, same records, same API as :class:`~grafos_fabric.queue.FabricQueue`
(``native/gf_ring.h`` is the layout and the protocol), but every access to the
region is one of the driver protocol's one-sided operations (``read_into``,
``write``, ``cas64``, ``faa64``, ``load64``, ``store64``): what RDMA gives a
client of a memory node. A mapped handle and a one-sided handle work on the
same ring at the same time, in either role.

The protocol's decisions are not in this module: they are the ring core's
pure functions (``native/gf_ring_core.h``), the very ones the mapped path's C
code calls, reached through cffi (``lib.gf_ring_*``). This module orders the
remote reads, writes and atomics around them: it loads the shared words and
hands them to the core, and writes out or reads in the bytes the core framed
or will parse. The handle is three modules: ``_onesided_handle`` (state, local
buffers, header words, seal and epoch), ``_onesided_push`` (the producer) and
this one (create/attach, the consumer, close). The role state is the C structs (``gf_producer`` /
``gf_consumer``, allocated with ``ffi.new``), not a Python copy of them.

Producer
    Frames records locally (``gf_ring_frame``, in C) in a staging image laid
    out like the ring's data area (registered with the fabric when the driver
    can register memory), exactly as the mapped path lays them out
    (16-byte headers, 16-byte aligned records, a PADDING record where a record
    would straddle the end of the ring), writes them with one ``write`` per
    contiguous span (two when a batch crosses the wrap), then publishes with
    one ``cas64`` of the tail word whose expected value carries this
    producer's epoch tag and no SEALED bit (SYNC POINT: ring-publish). A stale
    epoch or a sealed ring fails that CAS *at the target*:
    :class:`~grafos_fabric.errors.StaleEpoch` /
    :class:`~grafos_fabric.errors.QueueSealed`. ``next_seq`` is stored before
    the CAS. Before writing a byte the producer loads the tail word and checks
    that it is still its own (as ``gf_native.c``'s ``prod_owner`` does). It keeps
    a head cache and loads ``head`` only when the cache says there is no room.
    A push or a batch that fits costs four operations: the owner check, the
    WRITE (two across the wrap), the ``next_seq`` store and the CAS.

Consumer
    Loads the tail word (SYNC POINT: ring-publish), reads the span of
    published records up to the wrap (at most ``read_chunk`` bytes, but every
    record whole) with one ``read_into`` into a local buffer laid out like the
    ring and as large as it (registered with the fabric when it can register
    memory), and parses the headers locally with the core (``gf_ring_take``,
    in C), validating every length,
    type, bound and sequence number (:class:`~grafos_fabric.errors.Corrupted`
    for anything the C producer cannot have written: remote bytes are never
    trusted). Items (:class:`OneSidedItem`, an :class:`~grafos_fabric.queue.Item`)
    and batches (the mapped queue's :class:`~grafos_fabric.queue.Batch`) are numpy
    views of the local buffer, zero-copy after the READ. Releasing frees space by storing
    ``head`` (SYNC POINT: ring-release), once per release of the oldest
    outstanding item or batch. A released item's bytes in the local buffer are
    overwritten by a later READ, just as the ring's are by a later push.

Waiting
    No futex over RDMA: blocking calls poll with exponential backoff (a few
    immediate re-checks, then sleeps from 20 us up to 1 ms) and always honour
    their timeout (``TimeoutError``). A one-sided producer that waits for space
    counts itself in the ring's ``space_waiters`` word (``faa64``), so a
    consumer that holds items while the ring is empty gets
    :class:`~grafos_fabric.errors.HeldItemsStall` instead of a deadlock, on
    either path. A one-sided side cannot wake a *mapped* peer sleeping on a
    futex: that peer wakes at the end of its wait slice (50 ms at most), so a
    mixed pair that waits often is slower than two mapped handles.

Leases
    Every region operation checks the lease and fails closed; calls that find
    their answer in local buffers check the lease themselves, so nothing is
    returned after expiry or revoke. Unlike the mapped handle, reading the
    header (``epoch``, ``acked``, ``sealed``, ``stats()``) of a freed or
    expired queue raises too: there is nothing left to read remotely.

Limits (shared with the mapped path, or of RDMA itself)
    The owner check before writing narrows, but cannot close, the window in
    which a producer whose epoch is superseded mid-batch writes record bytes
    past the old tail; so a higher epoch takes the role over in place only
    from a provably gone holder (none, or its role lock free where the region
    has role locks), and otherwise fences and seals the queue
    (``QueueSealed``: relocate to a fresh queue), as the mapped path does.
    When a mapped handle on the memory node and a one-sided handle over RDMA
    share one ring, the CPU's and the
    HCA's atomics on the same word are atomic with respect to each other only
    with ``IBV_ATOMIC_GLOB`` support."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from .. import errors as E
from .._ffi import ffi, lib
from .._item import PLock
from ..drivers.base import Fabric
from ..lease import check_ttl
from ..locator import QueueLocator
from ._handle import register_one_sided
from ._items import Batch, Item
from ._layout import (
    _POS_MASK,
    DEFAULT_CAPACITY,
    RING_HEADER,
    STALL_GRACE,
    _check_int,
    _deadline,
    _item_info,
    _next_pow2,
    _ring_geometry,
)
from ._onesided_handle import (
    _CONSUMER_ID,
    _END,
    _HEAD,
    _OK,
    _ONESIDED_PEERS,
    _PRODUCER_ID,
    _READ,
    _SPACE_WAITERS,
    _TAIL,
    _TAIL_REACHED,
    _VERSION_WORD,
    OneSidedItem,
    _Backoff,
    _Consumer,
    _LocalBuffer,
    _rec_size,
)
from ._onesided_push import _OneSidedProducer
from ._roles import _ROLE_CONSUMER, _ROLE_PRODUCER, _role_id

log = logging.getLogger(__name__)


class OneSidedQueue(_OneSidedProducer):
    """A FabricQueue reached only with one-sided operations (see the module docstring).

    Get one with :meth:`create` (allocates a region and builds the ring with
    one-sided writes), :meth:`attach`, or ``FabricQueue.attach(..., mapped=False)``
    (also what a driver whose regions never map, like verbs, gets). The public
    API is FabricQueue's; :meth:`reserve` copies on commit (see there).
    """

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
    ) -> OneSidedQueue:
        """Allocate a leased region and build the ring in it with one-sided writes.

        Arguments as :meth:`FabricQueue.create`. The header is built locally,
        the version word is cleared first, the rest of the header written, and
        the version word stored last (``store64``, release), so an attacher
        sees ``NotReady`` or a whole ring, never a half-built one. Works on any
        driver, mapped or not (a mapped region offers the one-sided ops too).
        """
        cap, max_item, _dt, dtext = _ring_geometry(capacity, max_item, epoch, first_seq, dtype)
        ttl = check_ttl(ttl)
        t0 = time.perf_counter()
        region = fabric.alloc(RING_HEADER + cap, ttl)
        t1 = time.perf_counter()
        try:
            hdr = ffi.new("gf_ring_header *")
            raw_dtype = dtext.encode("ascii")
            # the header image the mapped path builds too (everything but the version word)
            rc = int(
                lib.gf_ring_build(hdr, RING_HEADER + cap, cap, max_item, first_seq, epoch, raw_dtype, len(raw_dtype), 0)
            )
            if rc != _OK:
                raise E.FabricValueError(f"cannot build a ring of capacity {cap}, max_item {max_item} (status {rc})")
            image = np.frombuffer(ffi.buffer(hdr), dtype=np.uint8).copy()
            if image.nbytes != RING_HEADER:
                raise E.Corrupted(f"ring header is {image.nbytes} bytes, expected {RING_HEADER}")
            hdr.version = lib.GF_RING_LAYOUT_VERSION
            ready = int(np.frombuffer(ffi.buffer(hdr), dtype=np.uint64)[_VERSION_WORD // 8])
            region.store64(_VERSION_WORD, 0)  # an old ring's version goes first
            region.write(_VERSION_WORD + 8, image[_VERSION_WORD + 8 :])
            if _VERSION_WORD:
                region.write(0, image[:_VERSION_WORD])
            region.flush()
            region.store64(_VERSION_WORD, ready)  # SYNC POINT: ring-ready
        except BaseException:
            region.lease.free()
            raise
        log.debug("created one-sided queue %s (capacity %d, max_item %d; alloc %.3f ms, ring build %.3f ms)",
                  region.ref().name, cap, max_item, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
        return cls(fabric, region, None, epoch=epoch, owner=True)

    @classmethod
    def attach(
        cls,
        fabric: Fabric,
        locator: QueueLocator | bytes,
        *,
        epoch: int | None = None,
        mapped: bool = False,
        take_over: bool = False,
    ) -> OneSidedQueue:
        """Attach to the queue a locator names, one-sided (``mapped`` is accepted
        for FabricQueue's signature and ignored: this class never maps).
        ``take_over`` is refused: a one-sided handle cannot tell whether a role's
        holder, possibly on another host, is alive."""
        if take_over:
            raise E.Unsupported("take_over needs the holder's host: attach mapped on the node that holds the ring")
        if not isinstance(locator, QueueLocator):
            locator = QueueLocator.from_bytes(locator)
        region = fabric.attach(locator.region, mapped=False)
        return cls(fabric, region, locator, epoch=epoch)

    # -- consuming -------------------------------------------------------------------

    def _consumer(self) -> _Consumer:
        c = self._c
        if c is not None:
            return c
        self._check_live()
        r = self.region
        supported, lock = self._lock_role(_ROLE_CONSUMER)
        if supported and lock is None:
            raise E.RoleTaken("a live consumer holds this queue's consumer role (claiming the consumer role)")
        cid = _role_id(locked=lock is not None)
        try:
            found = r.cas64(_CONSUMER_ID, 0, cid)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lib.gf_ring_claimed(found, cid) != _OK:
            if lock is not None:
                lock.release()
            raise E.RoleTaken("another process holds this role on the queue: claiming the consumer role")
        try:
            head = r.load64(_HEAD)
            w = r.load64(_TAIL)  # SYNC POINT: ring-publish
            pend_cap = min(1 << 20, max(64, _next_pow2(self.capacity // 32)))
            c = _Consumer(cid, pend_cap)
            if c.start(self.capacity, self.max_item, head, w) != _OK:
                raise E.Corrupted(f"ring positions make no sense (head {head}, tail {w & _POS_MASK})")
            if self._mirror is None:
                self._mirror = _LocalBuffer(self.fabric, self.capacity)
                self._locals.append(self._mirror)
                self._data = self._mirror.ptr  # what Item/Batch view (offsets are ring indices)
                self._item_info = _item_info(self._data, self.capacity, self.dtype)
        except BaseException:
            r.cas64(_CONSUMER_ID, cid, 0)
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            self._role_locks[_ROLE_CONSUMER] = lock
        self._c = c
        self._announce()
        return c

    def _consumer_ready(self, strict: bool = True) -> _Consumer:
        """The consumer, ready to pop; ``HeldItemsStall`` when all its release
        tokens are out (unless ``strict`` is false: with several popping threads
        another may be about to release, and the caller waits instead)."""
        self._check_live()
        c = self._c or self._consumer()
        if self._cons_tid != threading.get_ident():
            self._note_consumer_thread()
        if c.st.head != c.head_stored:
            self._store_head(c)  # an earlier store of head failed: try again
        if strict and not self._cons_multi and c.held >= c.pend_cap:
            raise E.HeldItemsStall("too many unreleased items: pop")
        return c

    def _load_tail(self, c: _Consumer) -> int:
        """Load the tail word and hand it to the core (``gf_ring_set_tail``: validated,
        into the tail cache); returns its answer: GF_OK, GF_EMPTY or GF_END."""
        w = self.region.load64(_TAIL)  # SYNC POINT: ring-publish
        rc = int(lib.gf_ring_set_tail(c.st, w))
        if rc < 0:
            pos = w & _POS_MASK
            raise E.Corrupted(f"the ring's tail ({pos}) is outside [{c.st.rpos}, {c.st.head + self.capacity}]")
        return rc

    def _fill(self, c: _Consumer, upto: int) -> None:
        """READ published bytes from ``read_pos`` (up to the wrap, the tail, and
        the read chunk, but at least up to ``upto``) into the local mirror."""
        m = self._mirror
        assert m is not None
        start = c.read_pos
        idx = start & self._mask
        end = min(int(c.st.tail_cache), start + (self.capacity - idx))
        n = min(end - start, max(self._read_chunk, upto - start))
        self.region.read_into(RING_HEADER + idx, m.array[idx : idx + n])
        c.read_pos = start + n

    def _take(self, c: _Consumer, max_items: int, po: Any, pl: Any, ps: Any, io: Any) -> int:
        """Parse records from the mirror with the core (``gf_ring_take``, the
        mapped pop's parser), bringing in the tail word and the bytes it asks
        for: up to ``max_items`` into ``po``/``pl``/``ps`` (pointers to uint64
        offsets, lengths, sequence numbers; ``io``: count and common length, out). Returns the count, leaving the
        state as it was when a remote operation fails (nothing taken); raises
        ``Corrupted`` only when nothing good came before the bad record (else the
        good ones go out and the next call reports it, as in C) and
        ``QueueSealed`` when sealed and drained."""
        m = self._mirror
        assert m is not None
        st = c.st
        start = (int(st.rpos), int(st.last_seq), int(st.have_seq))
        io[0] = io[1] = 0
        need = self._need
        try:
            while True:
                rc = int(lib.gf_ring_take(st, m.ptr, c.read_pos, max_items, po, pl, ps, io, io + 1, need))
                if c.read_pos < st.rpos:
                    c.read_pos = int(st.rpos)  # past a padding record: the mirror starts over at index 0
                if rc == _READ:
                    self._fill(c, int(need[0]))
                    continue
                if rc == _TAIL_REACHED:
                    rc = self._load_tail(c)
                    if rc == _OK:
                        continue
                break
        except E.Corrupted:
            if io[0]:
                return int(io[0])
            raise
        except BaseException:
            st.rpos, st.last_seq, st.have_seq = start  # nothing taken: the records stay queued
            raise
        n = int(io[0])
        if n == 0:
            if rc == _END:
                raise self._sealed_error("sealed and drained")
            if rc < 0:
                raise E.Corrupted(f"bad record at position {st.rpos}")
        return n

    def _pend_push(self, c: _Consumer) -> int:
        """A release token for what was just taken (up to the read position)."""
        token = self._token_out
        if lib.gf_ring_pend_push(c.st, c.st.rpos, token) != _OK:  # the callers checked held < pend_cap
            raise E.HeldItemsStall("too many unreleased items: pop")
        return int(token[0])

    def try_pop(self) -> Item | None:
        """Pop one item, or None when the queue is empty (never waits).

        Raises ``QueueSealed`` once a sealed queue is drained."""
        with self._clock_lock:
            c = self._consumer_ready()
            if c.held >= c.pend_cap:
                return None  # other threads hold every token: nothing to hand out until they release
            one = self._one
            if not self._take(c, 1, one, one + 1, one + 2, self._take_io):
                return None
            token = self._pend_push(c)
            return OneSidedItem(self, token, int(one[0]), int(one[1]), int(one[2]), None)

    def pop(self, timeout: float | None = None) -> Item:
        """Pop one item, polling for it; ``TimeoutError`` when ``timeout`` passes."""
        deadline = _deadline(timeout)
        backoff = _Backoff(deadline)
        stall: list[Any] = [None, -1]
        while True:
            item = self.try_pop()
            if item is not None:
                return item
            self._poll_data(backoff, stall)

    def _wait_readable(self, deadline: float | None) -> None:
        """Poll (with backoff) until the tail moves past what this consumer read,
        for the asyncio worker; ``TimeoutError`` at the deadline. The consumer
        lock is held only for each check, never while pausing."""
        backoff = _Backoff(deadline)
        stall: list[Any] = [None, -1]
        while True:
            with self._clock_lock:
                c = self._consumer_ready(strict=False)
                if c.st.rpos != c.st.tail_cache or self._load_tail(c) != lib.GF_EMPTY:
                    return
            self._poll_data(backoff, stall)

    def _wait_writable(self, nbytes: int, deadline: float | None) -> None:
        """Wait until ``nbytes`` may fit, for the asyncio worker (``_wait_space``
        takes the producer lock for each poll, not while pausing)."""
        self._wait_space(nbytes, deadline)

    def _poll_data(self, backoff: _Backoff, stall: list[Any]) -> None:
        """One poll for data, without the consumer lock while it pauses: raise
        ``HeldItemsStall`` if waiting would deadlock (as the mapped queue judges
        it, with the same grace when several threads pop from this handle), else
        pause (``TimeoutError`` at the deadline)."""
        with self._clock_lock:
            c = self._consumer_ready(strict=False)
            held = c.held
            waiters = 0
            if held and held < c.pend_cap:
                waiters = self.region.load64(_SPACE_WAITERS)
                # The producer waits for space. Not a stall if records were
                # published after this consumer last looked (the tail is read
                # after the waiters word): return and pop again.
                if waiters and (c.st.rpos != c.st.tail_cache or self._load_tail(c) != lib.GF_EMPTY):
                    stall[0] = None
                    return
        if held and (waiters or held >= c.pend_cap):
            message = (
                f"the producer waits for space that {held} unreleased "
                "items/batches pin, and the queue is empty: release items before waiting for more"
            )
            if not self._cons_multi:
                raise E.HeldItemsStall(message)
            now = time.monotonic()
            if stall[0] is None or stall[1] != held:
                stall[0], stall[1] = now, held
            elif now - stall[0] >= STALL_GRACE:
                raise E.HeldItemsStall(message)
        else:
            stall[0] = None
        backoff.pause("an item")

    def pop_batch(self, max_items: int, timeout: float | None = None) -> Batch:
        """Pop up to ``max_items`` items parsed from one READ.

        Waits until at least one item is there (``timeout=0``: returns an empty
        batch at once; ``timeout>0``: ``TimeoutError`` when it passes). A batch
        stops at the ring's wrap point, so it may hold fewer items than are
        queued; its payloads are contiguous (in the local buffer, as in the ring).
        """
        max_items = _check_int("max_items", max_items, 1, 1 << 62)
        deadline = _deadline(timeout)
        backoff = _Backoff(deadline)
        stall: list[Any] = [None, -1]
        while True:
            with self._clock_lock:
                c = self._consumer_ready()
                full = c.held >= c.pend_cap
                batch = None if full else self._take_batch(c, max_items)
            if batch is not None:
                return batch
            if timeout == 0:
                return Batch.empty()
            self._poll_data(backoff, stall)

    def _take_batch(self, c: _Consumer, max_items: int) -> Batch | None:
        # a batch never holds more records than fit in the ring (the smallest is 32 bytes)
        max_items = min(max_items, self.capacity // _rec_size(1))
        offs = np.empty(max_items, dtype=np.uint64)
        lens = np.empty(max_items, dtype=np.uint64)
        seqs = np.empty(max_items, dtype=np.uint64)
        io = self._take_io
        po, pl, ps = (ffi.from_buffer("uint64_t[]", a) for a in (offs, lens, seqs))
        n = self._take(c, max_items, po, pl, ps, io)
        if n == 0:
            return None
        token = self._pend_push(c)
        return Batch(self, token, offs[:n], lens[:n], seqs[:n], int(io[1]))

    def _release_token(self, token: int) -> None:
        c = self._c
        if c is None:
            return
        if lib.gf_ring_release(c.st, token) == 1:
            self._store_head(c)
        if self.closed:
            self._maybe_give_back_consumer()

    def _maybe_give_back_consumer(self) -> None:
        """After close: give the consumer role back once nothing popped here is
        unreleased (as the mapped queue does)."""
        c = self._c
        if c is not None and self.closed and c.held == 0:
            try:
                self.region.cas64(_CONSUMER_ID, c.id, 0)
            except (E.FabricError, E.FabricValueError) as exc:
                log.debug("could not give the consumer role back: %s", exc)
            self._c = None
            lock = self._role_locks.pop(_ROLE_CONSUMER, None)
            if lock is not None:
                lock.release()

    def _store_head(self, c: _Consumer) -> None:
        """Free the space of the oldest released items/batches: one ``store64`` of
        the head the core computed (``gf_ring_release``). Reentrant-safe (a
        garbage-collected item may release while this handle is mid-call, or on
        another thread): whoever holds the lock stores, then re-checks, so a
        smaller head is never stored after a larger one."""
        while True:
            if not c.lock.acquire(blocking=False):
                return
            try:
                head = int(c.st.head)
                if head != c.head_stored:
                    try:
                        self.region.store64(_HEAD, head)  # SYNC POINT: ring-release
                        c.head_stored = head
                    except (E.FabricError, E.FabricValueError) as exc:
                        log.debug("could not store head %d: %s", head, exc)
                        return
            finally:
                c.lock.release()
            if int(c.st.head) == c.head_stored:
                return

    @property
    def outstanding(self) -> int:
        """Items and batches popped here and not yet released."""
        c = self._c
        return 0 if c is None else c.held

    # -- teardown --------------------------------------------------------------------
    def close(self) -> None:
        """Give up the producer role, and the consumer role once nothing popped
        here is unreleased (items popped earlier keep releasing into this handle
        until then), and deregister this handle's local buffers (idempotent).
        Views of popped items stay readable (they are local memory). Every
        later push, pop or reservation raises ``QueueClosed``. A push or an open
        reservation in progress on another thread is let finish first (no
        record bytes are written after the role is given up)."""
        if self.closed:
            return
        self.closed = True
        if self._forked:
            return  # the roles are the parent's: nothing of them is given back here
        self._aio_shutdown()
        with self._plock:
            if self._inflight:  # write-behind: confirm what is in flight before the role goes
                try:
                    self._settle(len(self._inflight))
                except (E.FabricError, E.FabricValueError) as exc:
                    log.warning("closing a queue handle: publications in flight failed (their items are not "
                                "in the queue; call flush() before close() to get this error): %s", exc)
            p = self._p
            self._p = None
            if p is not None:
                try:
                    self.region.cas64(_PRODUCER_ID, p.id, 0)
                except (E.FabricError, E.FabricValueError) as exc:
                    log.debug("could not give the producer role back: %s", exc)
            lock = self._role_locks.pop(_ROLE_PRODUCER, None)
            if lock is not None:
                lock.release()
        self._maybe_give_back_consumer()
        if self._announced:
            try:
                self.region.faa64(_ONESIDED_PEERS, -1)
            except (E.FabricError, E.FabricValueError) as exc:
                log.debug("could not take back the one-sided peer count: %s", exc)
            self._announced = False
        self._finalizer()

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        self._p = None
        self._c = None
        self._inflight.clear()  # the parent's publications, on the parent's endpoints
        self._plock = PLock()
        self._clock_lock = threading.RLock()

    def __enter__(self) -> OneSidedQueue:
        return self

    def __repr__(self) -> str:
        return f"<OneSidedQueue {self.region.ref().name} capacity={self.capacity}>"


register_one_sided(OneSidedQueue)  # FabricQueue hands this class out for regions that don't map
