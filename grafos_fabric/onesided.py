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
or will parse. The role state is the C structs (``gf_producer`` /
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
    with ``IBV_ATOMIC_GLOB`` support.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import errors as E
from ._ffi import ffi, lib
from ._types import ItemLike
from .backoff import Backoff
from .drivers.base import Fabric, Region
from .lease import check_ttl
from .locator import QueueLocator
from .queue import (
    _LOCKED_ROLE,
    _ROLE_CONSUMER,
    _ROLE_PRODUCER,
    DEFAULT_CAPACITY,
    RECORD_HEADER,
    RING_HEADER,
    STALL_GRACE,
    Batch,
    FabricQueue,
    Item,
    _check_int,
    _deadline,
    _dtype_from_str,
    _item_info,
    _next_pow2,
    _ring_geometry,
    _role_id,
    register_one_sided,
)

__all__ = ["OneSidedItem", "OneSidedQueue"]

log = logging.getLogger(__name__)


def _hoff(name: str) -> int:
    return int(ffi.offsetof("gf_ring_header", name))


def _roff(name: str) -> int:
    return int(ffi.offsetof("gf_record_header", name))


# Ring header words (offsets in the region's payload; the ring is at offset 0).
_VERSION_WORD = _hoff("version") & ~7  # the aligned 64-bit word holding the version (and the magic)
_EPOCH = _hoff("epoch")
_SEAL_SEQ = _hoff("seal_seq")
_PRODUCER_ID = _hoff("producer_id")
_CONSUMER_ID = _hoff("consumer_id")
_ONESIDED_PEERS = _hoff("onesided_peers")
_TAIL = _hoff("tail")
_NEXT_SEQ = _hoff("next_seq")
_HEAD = _hoff("head")
_ACKED = _hoff("acked")
_SPACE_WAITERS = _hoff("space_waiters")  # a u64 of its own, 8-byte aligned: faa64 counts a waiter
_U64 = (1 << 64) - 1
_SEQ_LIMIT = _U64 - (1 << 40)  # a producer starts only below this (its u64 sequence numbers must not wrap)
_CAS_TRIES = 100_000  # a CAS loop that loses this many races in a row is fighting a writer outside the protocol

_SEALED = int(lib.GF_TAIL_SEALED)
_TAG_MASK = int(lib.GF_TAIL_TAG_MASK)
_POS_MASK = int(lib.GF_TAIL_POS_MASK)
_ALIGN = int(lib.GF_RECORD_ALIGN)
_OK = int(lib.GF_OK)
_FULL = int(lib.GF_FULL)
_END = int(lib.GF_END)
_TAIL_REACHED = int(lib.GF_TAIL)
_READ = int(lib.GF_READ)
_NO_PAD = _U64  # "no padding record in this frame" (gf_ring_frame leaves *pad_at as it was)

# Record header fields, as indices into u32 / u64 views of a 16-aligned record.
_LEN32 = _roff("length") // 4
_SEQ64 = _roff("seq") // 8

DEFAULT_READ_CHUNK = 1 << 22  # bytes one READ brings in at most (a record is always read whole)
DEFAULT_STAGING = 1 << 22  # initial staging buffer; grows to fit the largest record pushed
_PAGE = mmap.PAGESIZE
_SPIN_POLLS = 16  # immediate re-checks before the first sleep
_SLEEP_MIN = 20e-6
_SLEEP_MAX = 1e-3


def _rec_size(length: int) -> int:
    """``gf_record_size``: header + payload rounded up to the record alignment."""
    return int(lib.gf_record_size(length))


def _cas_lost(what: str) -> E.Corrupted:
    """The error for a CAS retry loop that ran out of tries (``for ... in range(_CAS_TRIES)``):
    a peer following the protocol makes us lose a few races; a writer that changes the
    word all the time must not keep us spinning."""
    return E.Corrupted(f"{what}: the word kept changing ({_CAS_TRIES} lost compare-and-swaps)")


class _Backoff(Backoff):
    """The ring's polling (the shared :class:`~grafos_fabric.backoff.Backoff`):
    ``_SPIN_POLLS`` immediate re-checks, then sleeps from 20 us up to 1 ms."""

    __slots__ = ()

    def __init__(self, deadline: float | None) -> None:
        super().__init__(deadline, first=_SLEEP_MIN, cap=_SLEEP_MAX, spin=_SPIN_POLLS)


class _Consumer:
    """This handle's consumer role: the core's state (``st``, a ``gf_consumer``:
    read position, tail cache, last sequence number, head, and the release
    tokens of the items/batches that pin ring space until released, in
    ``pend_end``/``pend_done``), what the local mirror holds (``read_pos``),
    and the head last stored in the ring (``head_stored``; ``lock``: one store
    at a time)."""

    __slots__ = ("head_stored", "id", "lock", "pend_cap", "pend_done", "pend_end", "read_pos", "st")

    def __init__(self, cid: int, pend_cap: int) -> None:
        self.id = cid
        self.st = ffi.new("gf_consumer *")
        self.pend_cap = pend_cap
        self.pend_end = ffi.new("uint64_t[]", pend_cap)
        self.pend_done = ffi.new("uint8_t[]", pend_cap)
        self.head_stored = self.read_pos = 0
        self.lock = threading.Lock()

    def start(self, capacity: int, max_item: int, head: int, tail_word: int) -> int:
        rc = int(
            lib.gf_ring_cons_start(
                self.st, capacity, max_item, head, tail_word, self.pend_end, self.pend_done, self.pend_cap
            )
        )
        self.head_stored = self.read_pos = int(self.st.head)
        return rc

    @property
    def held(self) -> int:
        """Items and batches handed out and not yet released."""
        return int(self.st.pend_next - self.st.pend_first)


class _LocalBuffer:
    """Page-aligned local memory for READs and WRITEs: registered with the fabric
    when the driver can register memory (``fabric.register(nbytes)``, e.g. verbs),
    else anonymous memory. ``array`` is a writable uint8 view; ``ptr`` a cdata
    pointer to it (which does not by itself keep it alive: ``keep`` does)."""

    def __init__(self, fabric: Fabric, nbytes: int) -> None:
        register = getattr(fabric, "register", None)
        self.registered: Any = None
        if callable(register):
            self.registered = register(nbytes)
            arr = np.asarray(self.registered.array(np.uint8))[:nbytes]
        else:
            mm = mmap.mmap(-1, max(_PAGE, (nbytes + _PAGE - 1) // _PAGE * _PAGE))
            arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
        self.array: np.ndarray[Any, Any] = arr
        self.keep = ffi.from_buffer(arr, require_writable=True)
        self.ptr = ffi.cast("uint8_t *", self.keep)
        self.u32 = arr[: nbytes - nbytes % 8].view(np.uint32)
        self.u64 = arr[: nbytes - nbytes % 8].view(np.uint64)
        self.nbytes = nbytes


def _deregister(buffers: list[_LocalBuffer]) -> None:
    """Give registered local buffers back to the fabric (idempotent). The memory
    itself stays until the last view of it is gone; only the registration ends."""
    while buffers:
        reg = buffers.pop().registered
        if reg is not None:
            try:
                reg.close()
            except Exception as exc:  # teardown must not raise: log and go on
                log.debug("could not deregister a local buffer: %s", exc)


class OneSidedItem(Item):
    """An :class:`~grafos_fabric.queue.Item` popped one-sided: its views are of this
    handle's local buffer, and releasing it goes through the core's release
    tokens (``gf_ring_release``) and a ``store64`` of head, not a mapped consumer."""

    __slots__ = ()


class OneSidedQueue(FabricQueue):
    """A FabricQueue reached only with one-sided operations (see the module docstring).

    Get one with :meth:`create` (allocates a region and builds the ring with
    one-sided writes), :meth:`attach`, or ``FabricQueue.attach(..., mapped=False)``
    (also what a driver whose regions never map, like verbs, gets). The public
    API is FabricQueue's; :meth:`reserve` copies on commit (see there).
    """

    def __init__(
        self,
        fabric: Fabric,
        region: Region,
        locator: QueueLocator | None = None,
        *,
        epoch: int | None = None,
        owner: bool = False,
        read_chunk: int = DEFAULT_READ_CHUNK,
    ) -> None:
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
            raise E.FabricValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not isinstance(read_chunk, int) or read_chunk < _ALIGN:
            raise E.FabricValueError(f"read_chunk must be an int of at least {_ALIGN} bytes, got {read_chunk!r}")
        self.fabric = fabric
        self.region = region
        self.lease = region.lease
        self.owner = owner
        self._clock = getattr(region.lease, "clock", None) or fabric.clock  # the region's clock domain
        self.closed = False
        self._epoch = epoch
        self._prod = None
        self._cons = None
        self._p: Any = None  # the producer's core state: a gf_producer (ffi.new), once the role is taken
        self._c: _Consumer | None = None
        self._staging: _LocalBuffer | None = None
        self._mirror: _LocalBuffer | None = None
        # registered local buffers are deregistered on close, or once this handle
        # and every item and view of it are gone
        self._locals: list[_LocalBuffer] = []
        self._finalizer = weakref.finalize(self, _deregister, self._locals)
        self._read_chunk = read_chunk & ~(_ALIGN - 1)
        # one producer and one consumer per handle, but callers may share a handle
        # between threads: each role's calls run one at a time (reentrant, so a
        # push inside reserve() gets its typed error instead of a deadlock); no
        # lock is held while a call sleeps
        self._init_handle_state()
        self._clock_lock = threading.RLock()
        hdr = self._read_header()
        self.capacity = int(hdr.capacity)
        self.max_item = int(hdr.max_item)
        self.first_seq = int(hdr.first_seq)
        self.dtype = _dtype_from_str(ffi.string(hdr.dtype, int(hdr.dtype_len)).decode("ascii", "replace"))
        self._mask = self.capacity - 1
        if locator is not None and (self.capacity != locator.capacity or self.max_item != locator.max_item):
            raise E.Corrupted("the queue at this locator has another geometry: the locator is stale or foreign")
        # the frame being built by the producer in the staging image (see _frame / _write_frame):
        # the position it starts at, and the index of a padding record in it
        self._f_start = 0
        self._f_pad = _NO_PAD
        # in/out words of the core's framing calls (next item, its source offset, padding index),
        # used under the producer lock
        self._io = ffi.new("uint64_t[3]")
        # the consumer's (under the consumer lock): out-words of gf_ring_take, one item's arrays
        self._take_io = ffi.new("uint64_t[2]")
        self._need = ffi.new("uint64_t *")
        self._one = ffi.new("uint64_t[3]")  # one item's offset, length, sequence number
        self._token_out = ffi.new("uint64_t *")

    def _read_header(self) -> Any:
        """Read and validate the ring header (the C checks, on a local copy)."""
        word = self.region.load64(_VERSION_WORD)  # SYNC POINT: ring-ready (acquire, before the rest)
        raw = np.zeros(RING_HEADER, dtype=np.uint8)
        self.region.read_into(0, raw)
        raw.view(np.uint64)[_VERSION_WORD // 8] = word  # judge readiness by the word read with acquire
        buf = ffi.from_buffer(raw)
        rc = int(lib.gf_ring_check(buf, self.region.nbytes))
        if rc != _OK:
            if rc == lib.GF_E_NOT_READY:
                raise E.NotReady("the queue's ring is still being built")
            if rc == lib.GF_E_VERSION:
                raise E.VersionMismatch(f"the ring has a layout version other than {lib.GF_RING_LAYOUT_VERSION}")
            raise E.Corrupted("not a grafos-fabric ring (bad magic, geometry or header)")
        self._header_keep = (raw, buf)
        return ffi.cast("gf_ring_header *", buf)

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
        region = fabric.alloc(RING_HEADER + cap, ttl)
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
        log.debug("created one-sided queue %s (capacity %d, max_item %d)", region.ref().name, cap, max_item)
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

    # -- header state ----------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The queue's fence epoch (in the remote header)."""
        self._check_handle()
        return self.region.load64(_EPOCH)

    @property
    def sealed(self) -> bool:
        self._check_handle()
        return bool(self.region.load64(_TAIL) & _SEALED)

    @property
    def seal_seq(self) -> int:
        self._check_handle()
        return self.region.load64(_SEAL_SEQ)

    @property
    def acked(self) -> int:
        """The consumer's durable commit: every sequence below it is processed."""
        self._check_handle()
        return self.region.load64(_ACKED)

    def set_acked(self, seq: int) -> None:
        """Publish that every item with sequence < ``seq`` is durably processed
        (``cas64``; ``acked`` only grows, a smaller value is ignored)."""
        seq = _check_int("acked", seq)
        cur = self.acked
        for _ in range(_CAS_TRIES):
            if seq <= cur:
                return
            found = self.region.cas64(_ACKED, cur, seq)
            if found == cur:
                return
            cur = found
        raise _cas_lost("setting acked")

    def seal(self, seal_seq: int = 0) -> bool:
        """Seal the queue (``cas64`` of the tail word): no push succeeds afterwards;
        the consumer drains what was published, then gets ``QueueSealed``.
        Returns False if already sealed."""
        seal_seq = _check_int("seal_seq", seal_seq)
        self._check_handle()
        w = self.region.load64(_TAIL)
        if w & _SEALED:
            return False
        self.region.store64(_SEAL_SEQ, seal_seq)
        for _ in range(_CAS_TRIES):
            found = self.region.cas64(_TAIL, w, w | _SEALED)  # SYNC POINT: ring-publish
            if found == w:
                return True
            if found & _SEALED:
                return False
            w = found
        raise _cas_lost("sealing")

    def advance_epoch(self, new_epoch: int) -> None:
        """Move the queue's epoch forward (``cas64`` on the epoch, then on the tail
        word's tag): producers stamped older fail their next publish at the
        target. Raises ``StaleEpoch`` unless ``new_epoch`` is newer."""
        new_epoch = _check_int("epoch", new_epoch)
        self._check_handle()
        cur = self.region.load64(_EPOCH)
        for _ in range(_CAS_TRIES):
            if new_epoch <= cur:
                raise E.StaleEpoch(epoch=new_epoch, current=cur)
            found = self.region.cas64(_EPOCH, cur, new_epoch)
            if found == cur:
                break
            cur = found
        else:
            raise _cas_lost("advancing the epoch")
        tag = int(lib.gf_ring_tag(new_epoch))
        w = self.region.load64(_TAIL)
        for _ in range(_CAS_TRIES):
            found = self.region.cas64(_TAIL, w, (w & ~_TAG_MASK & _U64) | tag)
            if found == w:
                return
            w = found
        raise _cas_lost("advancing the epoch")

    def stats(self) -> dict[str, int | bool]:
        self._check_handle()
        r = self.region
        tail = r.load64(_TAIL)
        head = r.load64(_HEAD)
        return {
            "capacity": self.capacity,
            "max_item": self.max_item,
            "epoch": self.epoch,
            "tail": tail & _POS_MASK,
            "head": head,
            "used": (tail & _POS_MASK) - head,
            "next_seq": r.load64(_NEXT_SEQ),
            "acked": self.acked,
            "sealed": bool(tail & _SEALED),
            "producer": bool(r.load64(_PRODUCER_ID)),
            "consumer": bool(r.load64(_CONSUMER_ID)),
        }

    # -- checks ----------------------------------------------------------------------
    def _check_live(self) -> None:
        if self.closed or self._forked or self._freed:
            self._check_open()
        self.lease.check()  # fail closed even when the answer is already in a local buffer

    def _sealed_error(self, what: str) -> E.QueueSealed:
        return E.QueueSealed(f"queue is sealed: {what}", seal_seq=self.seal_seq)

    # -- producing -------------------------------------------------------------------
    def _producer(self) -> Any:
        p = self._p
        if p is not None:
            return p
        with self._plock:
            if self._p is not None:
                return self._p
            self._check_live()
            r = self.region
            epoch = self.epoch if self._epoch is None else self._epoch
            supported, lock = self._lock_role(_ROLE_PRODUCER)
            try:
                pid = _role_id(locked=lock is not None)
                cur = r.load64(_EPOCH)
                if epoch < cur:
                    raise E.StaleEpoch("claiming the producer role: fenced", epoch=epoch, current=cur)
                holder = r.load64(_PRODUCER_ID)
                if epoch > cur and holder != 0 and not (lock is not None and holder & _LOCKED_ROLE):
                    self._fence_and_seal(epoch)  # a live or unprovable holder may be mid-write: never in place
                if supported and lock is None:
                    raise E.RoleTaken("a live producer holds this queue's producer role (claiming the producer role)")
                if epoch > cur:
                    self.advance_epoch(epoch)
                    r.store64(_PRODUCER_ID, pid)  # take over: the old holder is gone (or there was none)
                else:
                    found = r.cas64(_PRODUCER_ID, 0, pid)
                    if found not in (0, pid):
                        raise E.RoleTaken("another process holds this role on the queue: claiming the producer role")
                try:
                    w = r.load64(_TAIL)  # SYNC POINT: ring-publish
                    head = r.load64(_HEAD)  # SYNC POINT: ring-release
                    next_seq = r.load64(_NEXT_SEQ)
                    p = ffi.new("gf_producer *")
                    rc = int(lib.gf_ring_prod_start(p, self.capacity, self.max_item, epoch, w, head, next_seq))
                    if rc != _OK:
                        raise self._ring_error(rc, "claiming the producer role", epoch, w)
                    if next_seq > _SEQ_LIMIT:  # would overflow u64 framing within 2**40 items: not a real count
                        raise E.Corrupted(f"the ring's next sequence number ({next_seq}) is too close to 2**64")
                except BaseException:
                    r.cas64(_PRODUCER_ID, pid, 0)
                    raise
                p.id = pid
                if lock is not None:
                    self._role_locks[_ROLE_PRODUCER] = lock
                    lock = None
            finally:
                if lock is not None:
                    lock.release()
            self._epoch = epoch
            self._p = p
            self._announce()
            return p

    def _producer_ready(self) -> Any:
        self._check_live()
        p = self._p or self._producer()
        if p.reserved:
            raise E.FabricValueError("a reservation is outstanding: commit or abort it first")
        return p

    def _ring_error(self, rc: int, what: str, epoch: int, w: int) -> Exception:
        """The typed error for a refusal of the core (sealed, fenced, corrupt)."""
        if rc == lib.GF_E_SEALED:
            return self._sealed_error(what)
        if rc == lib.GF_E_FENCED:
            return E.StaleEpoch(f"{what}: fenced", epoch=epoch, current=self.region.load64(_EPOCH))
        return E.Corrupted(f"{what}: the ring's positions make no sense (tail word {w:#x})")

    def _check_owner(self, p: Any, what: str) -> None:
        """Is the tail word still ours (``gf_ring_owns``)? Checked before writing a
        byte, as the mapped producer does."""
        w = self.region.load64(_TAIL)  # SYNC POINT: ring-publish
        if lib.gf_ring_owns(p, w) == _OK:
            return
        raise self._lost_tail(p, w, what)

    def _lost_tail(self, p: Any, w: int, what: str) -> Exception:
        """The tail word isn't what this producer published: why, as the core
        judges it (``gf_ring_lost_tail``) with the epoch as it is now."""
        cur = self.region.load64(_EPOCH)
        rc = int(lib.gf_ring_lost_tail(p, w, cur))
        if rc == lib.GF_E_CORRUPT:
            return E.Corrupted(f"{what}: the ring's tail word ({w:#x}) was rewritten outside the protocol")
        if rc == lib.GF_E_FENCED:
            return E.StaleEpoch(f"{what}: fenced", epoch=int(p.epoch), current=cur)
        return self._ring_error(rc, what, int(p.epoch), w)

    def _refresh_head(self, p: Any) -> None:
        h = self.region.load64(_HEAD)  # SYNC POINT: ring-release
        if lib.gf_ring_set_head(p, h) != _OK:
            raise E.Corrupted(f"the ring's head ({h}) is outside [{p.head_cache}, {p.tail}]")

    def _stage(self) -> _LocalBuffer:
        """The staging image: local memory laid out like the ring's data area
        (index = position & mask), where the core frames records before they are
        written out; a frame never holds more than the ring's free space."""
        st = self._staging
        if st is None:
            st = self._staging = _LocalBuffer(self.fabric, self.capacity)
            self._locals.append(st)
        return st

    def _begin(self, p: Any) -> None:
        self._f_start = int(p.claim)
        self._f_pad = _NO_PAD

    def _frame(self, p: Any, st: _LocalBuffer, src: Any, lens: Any, n: int, row_len: int, row_stride: int) -> int:
        """Frame items into the staging image with the core (``gf_ring_frame``),
        from item ``self._io[0]`` on: as many as the head cache says fit, then,
        after one load of head, as many more as fit. Returns how many were framed."""
        io = self._io
        before = int(io[0])
        io[2] = self._f_pad
        refreshed = False
        while True:
            rc = int(lib.gf_ring_frame(p, st.ptr, src, lens, n, row_len, row_stride, io))
            if rc == _OK:
                break
            if rc != _FULL:
                raise E.FabricValueError(f"cannot frame this item (status {rc})")  # checked before: unreachable
            if refreshed:
                break
            self._refresh_head(p)
            refreshed = True
        self._f_pad = int(io[2])
        return int(io[0]) - before

    def _write_frame(self, p: Any, st: _LocalBuffer) -> None:
        """WRITE the framed records: one write per contiguous span of the ring
        (up to the padding record's header, then from index 0, at the wrap)."""
        start, end = self._f_start, int(p.claim)
        if end == start:
            return
        idx = start & self._mask
        if idx + (end - start) <= self.capacity:
            self.region.write(RING_HEADER + idx, st.array[idx : idx + (end - start)])
            return
        first = self._f_pad + RECORD_HEADER if self._f_pad != _NO_PAD else self.capacity
        self.region.write(RING_HEADER + idx, st.array[idx:first])
        self.region.write(RING_HEADER, st.array[: end & self._mask])

    def _publish(self, p: Any, st: _LocalBuffer, what: str) -> None:
        """Write the frame, store next_seq, then CAS the tail word (fenced at the
        target): the arguments and the outcome are the core's."""
        try:
            self._write_frame(p, st)
            if p.claim == p.tail:
                return
            r = self.region
            r.store64(_NEXT_SEQ, int(p.next_seq))  # a release: the record WRITEs are complete before it
            # SYNC POINT: ring-publish (records and next_seq before the tail word)
            found = r.cas64(_TAIL, int(lib.gf_ring_publish_expected(p)), int(lib.gf_ring_publish_desired(p)))
        except BaseException:
            lib.gf_ring_rollback(p)
            raise
        finally:
            self._f_start = int(p.claim)
            self._f_pad = _NO_PAD
        if lib.gf_ring_published(p, found) != _OK:
            raise self._lost_tail(p, found, what)

    def _full(self, p: Any, what: str) -> None:
        """Nothing fit: raise if that is because the ring is sealed or we are fenced."""
        self._check_owner(p, what)

    def _item_bytes(self, buf: Any) -> np.ndarray[Any, Any]:
        item = self._as_item(buf)
        if isinstance(item, bytes):
            return np.frombuffer(item, dtype=np.uint8)
        return np.frombuffer(ffi.buffer(item), dtype=np.uint8)

    def try_push(self, buf: ItemLike) -> bool:
        """Push one item; False when the ring is full (never waits)."""
        with self._plock:
            return self._push1(buf) is not None

    def _push1(self, buf: Any) -> int | None:
        p = self._producer_ready()
        src = self._item_bytes(buf)
        n = src.nbytes
        if n == 0:
            raise E.FabricValueError("empty items are not allowed")
        if n > self.max_item:
            raise E.ItemTooLarge(f"item of {n} bytes exceeds the queue's max_item of {self.max_item}")
        self._check_owner(p, "push")
        st = self._stage()
        self._begin(p)
        self._io[0] = self._io[1] = 0
        if not self._frame(p, st, ffi.from_buffer("char[]", src), ffi.NULL, 1, n, n):
            self._full(p, "push")
            return None
        seq = int(p.next_seq) - 1
        self._publish(p, st, "push")
        return seq

    def push(self, buf: ItemLike, timeout: float | None = None) -> int:
        """Push one item, polling for space; returns its sequence number.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first."""
        deadline = _deadline(timeout)
        while True:
            with self._plock:
                seq = self._push1(buf)
            if seq is not None:
                return seq
            self._wait_space(len(self._item_bytes(buf)), deadline)

    def _wait_space(self, nbytes: int, deadline: float | None) -> None:
        """Poll ``head`` until a record of ``nbytes`` fits, counting this producer in
        ``space_waiters`` meanwhile; raises on seal, fencing, expiry, or timeout."""
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("timed out waiting for space in the queue")  # timeout=0: no remote op
        r = self.region
        backoff = _Backoff(deadline)
        counted = False
        try:
            while True:
                with self._plock:  # each poll under the producer lock; the pause without it
                    p = self._producer_ready()
                    need = int(lib.gf_ring_need(p, nbytes))
                    self.lease.check()
                    self._refresh_head(p)
                    if lib.gf_ring_room(p, need):
                        return
                    self._check_owner(p, "waiting for space")
                    if not counted:
                        r.faa64(_SPACE_WAITERS, 1)
                        counted = True
                        continue  # re-check head once now that a consumer can see us
                backoff.pause("space in the queue")
        finally:
            if counted:
                try:
                    r.faa64(_SPACE_WAITERS, _U64)  # -1
                except (E.FabricError, E.FabricValueError) as exc:
                    log.debug("could not uncount a space waiter: %s", exc)

    def push_batch(self, bufs: Sequence[Any] | np.ndarray[Any, Any], timeout: float | None = None) -> int:
        """Push many items: framed locally (in C), one WRITE per contiguous span and
        one tail CAS per frame; returns how many were pushed.

        ``bufs`` is a 2-D array whose rows are the items (the fast path), or a
        sequence of bytes-like items. With ``timeout=0`` it pushes what fits and
        returns; otherwise it waits for space until all are pushed (or raises
        ``TimeoutError``, after which the items counted so far are in the queue:
        ``TimeoutError.args[1]`` holds that count).
        """
        with self._plock:
            p = self._producer_ready()
            deadline = _deadline(timeout)
            if isinstance(bufs, np.ndarray):
                n, length = self._check_rows(bufs)
                if n == 0:
                    return 0
                base = ffi.cast("char *", bufs.ctypes.data)  # bufs stays alive: it is an argument
                return self._push_frames(p, base, ffi.NULL, n, length, bufs.strides[0], deadline, timeout)
            if isinstance(bufs, (str, bytes, bytearray, memoryview)):  # as FabricQueue.push_batch
                raise E.FabricTypeError("push_batch takes a sequence of items (or a 2-D array), not one item: use push")
            try:
                items = [self._item_bytes(b) for b in bufs]
            except TypeError as exc:
                if isinstance(exc, E.FabricTypeError):
                    raise
                raise E.FabricTypeError(f"push_batch takes a sequence of items, got {type(bufs).__name__}") from None
            if not items:
                return 0
            lens = np.fromiter((a.nbytes for a in items), dtype=np.uint64, count=len(items))
            if int(lens.min()) == 0:
                raise E.FabricValueError("empty items are not allowed")
            big = int(lens.max())
            if big > self.max_item:
                raise E.ItemTooLarge(f"item of {big} bytes exceeds the queue's max_item of {self.max_item}")
            blob = np.concatenate(items)
            src = ffi.from_buffer("char[]", blob)
            lptr = ffi.from_buffer("uint64_t[]", lens)
            return self._push_frames(p, src, lptr, len(items), 0, 0, deadline, timeout)

    def _push_frames(
        self,
        p: Any,
        src: Any,
        lens: Any,
        total: int,
        row_len: int,
        row_stride: int,
        deadline: float | None,
        timeout: float | None,
    ) -> int:
        """Frame and publish ``total`` items (rows of ``row_len`` bytes
        ``row_stride`` apart at ``src``, or, with ``lens``, payloads of those
        lengths concatenated at ``src``), a frame at a time; waits for space
        between frames unless ``timeout`` is 0. Where it stands (items done, their
        source bytes) is kept here, not in ``self._io``: another thread pushes
        through this handle while this one waits without the lock."""
        st = self._stage()
        io = self._io
        done = offset = 0
        while done < total:
            self._check_owner(p, "push_batch")
            self._begin(p)
            io[0], io[1] = done, offset
            framed = self._frame(p, st, src, lens, total, row_len, row_stride)
            if framed:
                done, offset = int(io[0]), int(io[1])
                self._publish(p, st, "push_batch")
                continue
            self._full(p, "push_batch")
            if timeout == 0:
                return done
            try:
                self._wait_unlocked(int(lens[done]) if lens != ffi.NULL else row_len, deadline)
            except TimeoutError:
                raise TimeoutError("timed out waiting for space in the queue", done) from None
            p = self._producer_ready()
        return done

    def _wait_unlocked(self, nbytes: int, deadline: float | None) -> None:
        """``_wait_space`` from inside a ``with self._plock`` block: the lock is let
        go for the wait (other threads push, ``close`` proceeds) and taken back."""
        self._plock.release()
        try:
            self._wait_space(nbytes, deadline)
        finally:
            self._plock.acquire()

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[np.ndarray[Any, Any]]:
        """Production in a local buffer, published on exit.

        ``with q.reserve(n) as buf: buf[:] = ...`` — space in the ring is
        claimed first (waiting for it, like ``push``); ``buf`` is a writable view
        of this handle's staging image (uint8, or the queue's dtype), *not* of
        the ring: leaving the block normally copies the record into the ring
        with one WRITE and publishes it (so one-sided reserve/commit copies on
        commit). An exception aborts it (nothing is written or published). Call
        ``q.commit_len(k)`` inside the block to publish only the first ``k`` bytes.
        """
        nbytes = _check_int("reserve size", nbytes, 1)
        with self._plock:
            p = self._producer_ready()
            if nbytes > self.max_item:
                raise E.ItemTooLarge(f"reservation of {nbytes} bytes exceeds the queue's max_item of {self.max_item}")
            if self.dtype is not None and nbytes % self.dtype.itemsize:
                raise E.DtypeMismatch(f"reservation must be a multiple of {self.dtype.itemsize} bytes for {self.dtype}")
            deadline = _deadline(timeout)
            st = self._stage()
            out = self._io
            while True:
                self._check_owner(p, "reserve")
                self._begin(p)
                out[2] = _NO_PAD
                rc = int(lib.gf_ring_reserve_in(p, st.ptr, nbytes, out, out + 2))
                if rc == _FULL:
                    self._refresh_head(p)
                    rc = int(lib.gf_ring_reserve_in(p, st.ptr, nbytes, out, out + 2))
                if rc == _OK:
                    break
                if rc != _FULL:
                    raise E.FabricValueError(f"cannot reserve {nbytes} bytes (status {rc})")  # checked before
                self._full(p, "reserve")
                self._wait_unlocked(nbytes, deadline)
                p = self._producer_ready()
            off = int(out[0])
            self._f_pad = int(out[2])
            self._reserving = True
            self._commit_len = nbytes
            buf = st.array[off : off + nbytes]
            try:
                yield buf if self.dtype is None else buf.view(self.dtype)
            except BaseException:
                lib.gf_ring_abort_in(p)
                self._reserving = False
                raise
            self._reserving = False
            rc = int(lib.gf_ring_commit_in(p, st.ptr, self._commit_len, out))
            if rc != _OK:
                lib.gf_ring_abort_in(p)
                raise E.FabricValueError(f"cannot commit {self._commit_len} bytes (status {rc})")
            seq = int(out[0])
            self._publish(p, st, "commit")
            self.last_seq = seq

    @contextmanager
    def reserve_batch(self, n: int, size: int, timeout: float | None = None) -> Iterator[np.ndarray[Any, Any]]:
        """Up to ``n`` items of ``size`` bytes written in a local ``(n, size)`` buffer,
        published on exit with one ``push_batch`` (one-sided: copied on commit, like
        :meth:`reserve`). ``q.commit_rows(k)`` inside the block publishes only the
        first ``k``; an exception publishes none."""
        n = _check_int("reserve_batch rows", n, 1, 1 << 32)
        size = _check_int("reserve size", size, 1)
        if size > self.max_item:
            raise E.ItemTooLarge(f"reservation of {size} bytes exceeds the queue's max_item of {self.max_item}")
        dt = self.dtype
        if dt is not None and size % dt.itemsize:
            raise E.DtypeMismatch(f"reservation must be a multiple of {dt.itemsize} bytes for {dt}")
        n = min(n, max(1, self.capacity // _rec_size(size)))
        rows = np.zeros((n, size), dtype=np.uint8)
        view = rows if dt is None else rows.view(dt)
        outer = self._rows_commit
        self._rows_commit = n
        try:
            yield view
            k = self._rows_commit
        finally:
            self._rows_commit = outer
        self.push_batch(view[:k], timeout=timeout)

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
        if found not in (0, cid):
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

    _announced = False

    def _announce(self) -> None:
        """Count this handle in the ring's ``onesided_peers``: a mapped peer sleeping
        on a futex can't be woken by one-sided operations, so while the count is
        non-zero it waits in short slices instead (``close`` takes the count back;
        a handle that dies without ``close`` leaves it up, which costs the mapped
        side only some extra wake-ups)."""
        if not self._announced:
            self.region.faa64(_ONESIDED_PEERS, 1)
            self._announced = True

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
        self._plock = threading.RLock()
        self._clock_lock = threading.RLock()

    def __enter__(self) -> OneSidedQueue:
        return self

    def __repr__(self) -> str:
        return f"<OneSidedQueue {self.region.ref().name} capacity={self.capacity}>"


register_one_sided(OneSidedQueue)  # FabricQueue hands this class out for regions that don't map
