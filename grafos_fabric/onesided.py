"""The one-sided ring protocol: a FabricQueue on a region this process cannot map.

Same ring, same records, same API as :class:`~grafos_fabric.queue.FabricQueue`
(``native/gf_ring.h`` is the layout and the protocol), but every access to the
region is one of the driver protocol's one-sided operations (``read_into``,
``write``, ``cas64``, ``faa64``, ``load64``, ``store64``): what RDMA gives a
client of a memory node. A mapped handle and a one-sided handle work on the
same ring at the same time, in either role.

Producer
    Frames records locally in a staging buffer (registered with the fabric
    when the driver can register memory), exactly as the C code lays them out
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
    memory), and parses the headers locally, validating every length,
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

import collections
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
_TAG_SHIFT = int(lib.GF_TAIL_TAG_SHIFT)
_TAG_MASK = int(lib.GF_TAIL_TAG_MASK)
_POS_MASK = int(lib.GF_TAIL_POS_MASK)
_DATA = int(lib.GF_RECORD_DATA)
_PADDING = int(lib.GF_RECORD_PADDING)
_ALIGN = int(lib.GF_RECORD_ALIGN)
_MISALIGNED = _ALIGN - 1  # a position with any of these bits set is corrupt
_OK = int(lib.GF_OK)

# Record header fields, as indices into u32 / u64 views of a 16-aligned record.
_LEN32 = _roff("length") // 4
_TYPE32 = _roff("type") // 4
_SEQ64 = _roff("seq") // 8

DEFAULT_READ_CHUNK = 1 << 22  # bytes one READ brings in at most (a record is always read whole)
DEFAULT_STAGING = 1 << 22  # initial staging buffer; grows to fit the largest record pushed
_PAGE = mmap.PAGESIZE
_SPIN_POLLS = 16  # immediate re-checks before the first sleep
_SLEEP_MIN = 20e-6
_SLEEP_MAX = 1e-3


def _rec_size(length: int) -> int:
    """``gf_record_size`` (header + payload rounded up to the record alignment), without a C call."""
    return (RECORD_HEADER + length + _ALIGN - 1) & ~(_ALIGN - 1)


def _tag(epoch: int) -> int:
    return (epoch << _TAG_SHIFT) & _TAG_MASK


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


class _Producer:
    """This handle's producer role: published tail, claim, head cache, sequence numbers."""

    __slots__ = ("claim", "epoch", "head_cache", "id", "next_seq", "pub_seq", "reserved", "tag", "tail")

    def __init__(self, pid: int, epoch: int, tail: int, head: int, next_seq: int) -> None:
        self.id = pid
        self.epoch = epoch
        self.tag = _tag(epoch)
        self.tail = self.claim = tail
        self.head_cache = head
        self.next_seq = self.pub_seq = next_seq
        self.reserved = False


class _Consumer:
    """This handle's consumer role: read position, cached tail, what the local buffer holds,
    and the outstanding items/batches (tokens) that pin ring space until released."""

    __slots__ = (
        "done",
        "head",
        "head_stored",
        "id",
        "last_seq",
        "lock",
        "pend_cap",
        "pend_end",
        "pend_first",
        "pend_next",
        "read_pos",
        "rpos",
        "tail_cache",
    )

    def __init__(self, cid: int, head: int, pend_cap: int) -> None:
        self.id = cid
        self.head = self.head_stored = self.rpos = self.tail_cache = self.read_pos = head
        self.last_seq = -1
        self.pend_first = 0
        self.pend_next = 0
        self.pend_end: collections.deque[int] = collections.deque()
        self.pend_cap = pend_cap
        self.done: set[int] = set()
        self.lock = threading.Lock()


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
    handle's local buffer, and releasing it goes through the queue's release
    bookkeeping (a ``store64`` of head), not the native consumer."""

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
        self._p: _Producer | None = None
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
        # the local frame being built by the producer (see _place / _write_frame)
        self._f_idx = 0
        self._f_sp = 0
        self._f_wrap: int | None = None

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
            hdr.magic = lib.GF_RING_MAGIC
            hdr.version = 0
            hdr.capacity = cap
            hdr.max_item = max_item
            hdr.first_seq = first_seq
            hdr.created_epoch = epoch
            hdr.flags = 0
            hdr.dtype_len = len(raw_dtype)
            ffi.memmove(hdr.dtype, raw_dtype, len(raw_dtype))
            hdr.epoch = epoch
            hdr.tail = _tag(epoch)
            hdr.next_seq = first_seq
            hdr.acked = first_seq
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
        tag = _tag(new_epoch)
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
    def _producer(self) -> _Producer:
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
                w = r.load64(_TAIL)  # SYNC POINT: ring-publish
                tag = _tag(epoch)
                if w & _SEALED or w & _TAG_MASK != tag:
                    r.cas64(_PRODUCER_ID, pid, 0)
                    if w & _SEALED:
                        raise self._sealed_error("claiming the producer role")
                    raise E.StaleEpoch("claiming the producer role: fenced", epoch=epoch, current=self.epoch)
                tail = w & _POS_MASK
                head = r.load64(_HEAD)  # SYNC POINT: ring-release
                if (head | tail) & _MISALIGNED or head > tail or tail - head > self.capacity:
                    r.cas64(_PRODUCER_ID, pid, 0)
                    raise E.Corrupted(f"ring positions make no sense (head {head}, tail {tail})")
                next_seq = r.load64(_NEXT_SEQ)
                if next_seq > _SEQ_LIMIT:  # would overflow u64 framing within 2**40 items: not a real count
                    r.cas64(_PRODUCER_ID, pid, 0)
                    raise E.Corrupted(f"the ring's next sequence number ({next_seq}) is too close to 2**64")
                p = _Producer(pid, epoch, tail, head, next_seq)
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

    def _producer_ready(self) -> _Producer:
        self._check_live()
        p = self._p or self._producer()
        if p.reserved:
            raise E.FabricValueError("a reservation is outstanding: commit or abort it first")
        return p

    def _check_owner(self, p: _Producer, what: str) -> None:
        """Is the tail word still ours (our tag and position, not sealed)? Checked
        before writing a byte, as the C producer does (``prod_owner``)."""
        w = self.region.load64(_TAIL)  # SYNC POINT: ring-publish
        if w == p.tag | p.tail:
            return
        raise self._lost_tail(p, w, what)

    def _lost_tail(self, p: _Producer, w: int, what: str) -> Exception:
        """The tail word isn't what this producer published: sealed, fenced (the
        epoch moved on), or, with our epoch still in place, written by something
        outside the protocol (as ``lost_tail`` in gf_native.c)."""
        if w & _SEALED:
            return self._sealed_error(what)
        cur = self.epoch
        if w & _TAG_MASK != p.tag or cur != p.epoch:
            return E.StaleEpoch(f"{what}: fenced", epoch=p.epoch, current=cur)
        return E.Corrupted(f"{what}: the ring's tail word ({w:#x}) was rewritten outside the protocol")

    def _refresh_head(self, p: _Producer) -> None:
        h = self.region.load64(_HEAD)  # SYNC POINT: ring-release
        if h & _MISALIGNED or h > p.tail or p.tail - h > self.capacity or h < p.head_cache:
            raise E.Corrupted(f"the ring's head ({h}) is outside [{p.head_cache}, {p.tail}]")
        p.head_cache = h

    def _room(self, p: _Producer, need: int) -> bool:
        """Room for ``need`` bytes past the claim? Loads head only when the cache says no."""
        if p.claim + need - p.head_cache <= self.capacity:
            return True
        self._refresh_head(p)
        return p.claim + need - p.head_cache <= self.capacity

    def _staging_for(self, nbytes: int) -> _LocalBuffer:
        """The staging buffer, grown (once, to the largest record asked for) when
        ``nbytes`` don't fit; a frame never holds more than the ring's free space."""
        st = self._staging
        if st is None or st.nbytes < nbytes:
            st = self._staging = _LocalBuffer(self.fabric, max(nbytes, min(self.capacity, DEFAULT_STAGING)))
            self._locals.append(st)
        return st

    def _begin(self, p: _Producer) -> None:
        self._f_idx = p.claim & self._mask
        self._f_sp = 0
        self._f_wrap = None

    def _header(self, st: _LocalBuffer, sp: int, length: int, rtype: int, seq: int) -> None:
        st.u32[sp // 4 + _LEN32] = length
        st.u32[sp // 4 + _TYPE32] = rtype
        st.u64[sp // 8 + _SEQ64] = seq

    def _pad_if_needed(self, p: _Producer, st: _LocalBuffer, rs: int) -> bool:
        """Before a record of ``rs`` bytes: place a PADDING record if it would
        straddle the end of the ring. False when there is no room (for the
        padding and the record) or no staging space."""
        idx = p.claim & self._mask
        pad = self.capacity - idx if idx + rs > self.capacity else 0
        extra = RECORD_HEADER if pad else 0
        if self._f_sp + extra + rs > st.nbytes or not self._room(p, pad + rs):
            return False
        if pad:
            self._header(st, self._f_sp, pad - RECORD_HEADER, _PADDING, 0)
            self._f_sp += RECORD_HEADER
            self._f_wrap = self._f_sp
            p.claim += pad
        return True

    def _place(self, p: _Producer, st: _LocalBuffer, length: int) -> int | None:
        """Frame one DATA record of ``length`` payload bytes at the claim (after a
        PADDING record when it would straddle the wrap); returns the staging
        offset of its payload, or None when it doesn't fit."""
        rs = _rec_size(length)
        if not self._pad_if_needed(p, st, rs):
            return None
        sp = self._f_sp
        self._header(st, sp, length, _DATA, p.next_seq)
        p.next_seq += 1
        st.array[sp + RECORD_HEADER + length : sp + rs] = 0
        self._f_sp = sp + rs
        p.claim += rs
        return sp + RECORD_HEADER

    def _write_frame(self, p: _Producer, st: _LocalBuffer) -> None:
        """WRITE the framed records: one write per contiguous span of the ring."""
        sp = self._f_sp
        if sp == 0:
            return
        first = self._f_wrap if self._f_wrap is not None else min(sp, self.capacity - self._f_idx)
        if first:
            self.region.write(RING_HEADER + self._f_idx, st.array[:first])
        if sp > first:
            self.region.write(RING_HEADER, st.array[first:sp])

    def _publish(self, p: _Producer, st: _LocalBuffer, what: str) -> None:
        """Write the frame, store next_seq, then CAS the tail word (fenced at the target)."""
        try:
            self._write_frame(p, st)
            if p.claim == p.tail:
                return
            r = self.region
            if p.next_seq > _U64:
                raise E.Corrupted("sequence numbers ran past 2**64")
            r.store64(_NEXT_SEQ, p.next_seq)  # a release: the record WRITEs are complete before it
            expected = p.tag | p.tail
            # SYNC POINT: ring-publish (records and next_seq before the tail word)
            found = r.cas64(_TAIL, expected, p.tag | p.claim)
        except BaseException:
            p.claim = p.tail
            p.next_seq = p.pub_seq
            raise
        finally:
            self._f_sp = 0
        if found != expected:
            p.claim = p.tail
            p.next_seq = p.pub_seq
            raise self._lost_tail(p, found, what)
        p.tail = p.claim
        p.pub_seq = p.next_seq

    def _full(self, p: _Producer, what: str) -> None:
        """Nothing fit: raise if that is because the ring is sealed or we are fenced."""
        self._f_sp = 0
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
        st = self._staging_for(RECORD_HEADER + _rec_size(n))
        self._begin(p)
        off = self._place(p, st, n)
        if off is None:
            self._full(p, "push")
            return None
        st.array[off : off + n] = src
        seq = p.next_seq - 1
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
                    rs = _rec_size(nbytes)
                    idx = p.claim & self._mask
                    need = (self.capacity - idx if idx + rs > self.capacity else 0) + rs
                    self.lease.check()
                    self._refresh_head(p)
                    if p.claim + need - p.head_cache <= self.capacity:
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
        """Push many items: framed locally, one WRITE per contiguous span and one
        tail CAS per staging-full; returns how many were pushed.

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
                return self._frame_rows(p, bufs, deadline, timeout)
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
            lens = [a.nbytes for a in items]
            if min(lens) == 0:
                raise E.FabricValueError("empty items are not allowed")
            big = max(lens)
            if big > self.max_item:
                raise E.ItemTooLarge(f"item of {big} bytes exceeds the queue's max_item of {self.max_item}")
            st = self._staging_for(RECORD_HEADER + _rec_size(big))
            done = 0
            total = len(items)
            while done < total:
                self._check_owner(p, "push_batch")
                self._begin(p)
                k = 0
                while done + k < total:
                    off = self._place(p, st, lens[done + k])
                    if off is None:
                        break
                    st.array[off : off + lens[done + k]] = items[done + k]
                    k += 1
                if k:
                    self._publish(p, st, "push_batch")
                    done += k
                    continue
                self._full(p, "push_batch")
                if timeout == 0:
                    break
                try:
                    self._wait_unlocked(lens[done], deadline)
                except TimeoutError:
                    raise TimeoutError("timed out waiting for space in the queue", done) from None
            return done

    def _wait_unlocked(self, nbytes: int, deadline: float | None) -> None:
        """``_wait_space`` from inside a ``with self._plock`` block: the lock is let
        go for the wait (other threads push, ``close`` proceeds) and taken back."""
        self._plock.release()
        try:
            self._wait_space(nbytes, deadline)
        finally:
            self._plock.acquire()

    def _frame_rows(
        self, p: _Producer, arr: np.ndarray[Any, Any], deadline: float | None, timeout: float | None
    ) -> int:
        n, length = self._check_rows(arr)
        if n == 0:
            return 0
        rows = arr.view(np.uint8)  # (n, length) bytes; rows may be strided
        rs = _rec_size(length)
        st = self._staging_for(RECORD_HEADER + rs)
        cap = self.capacity
        done = 0
        while done < n:
            self._check_owner(p, "push_batch")
            self._begin(p)
            k_frame = 0
            while done + k_frame < n:
                if not self._pad_if_needed(p, st, rs):
                    break
                idx = p.claim & self._mask
                want = min(n - done - k_frame, (cap - idx) // rs, (st.nbytes - self._f_sp) // rs)
                if cap - (p.claim - p.head_cache) < want * rs:
                    self._refresh_head(p)
                want = min(want, (cap - (p.claim - p.head_cache)) // rs)
                # _pad_if_needed guaranteed room and staging for one record
                sp = self._f_sp
                block = st.array[sp : sp + want * rs].reshape(want, rs)
                block[:, RECORD_HEADER : RECORD_HEADER + length] = rows[done + k_frame : done + k_frame + want]
                block[:, RECORD_HEADER + length :] = 0
                h32 = block[:, :RECORD_HEADER].view(np.uint32)
                h32[:, _LEN32] = length
                h32[:, _TYPE32] = _DATA
                h64 = block[:, :RECORD_HEADER].view(np.uint64)
                h64[:, _SEQ64] = np.arange(p.next_seq, p.next_seq + want, dtype=np.uint64)
                p.next_seq += want
                p.claim += want * rs
                self._f_sp = sp + want * rs
                k_frame += want
            if k_frame:
                self._publish(p, st, "push_batch")
                done += k_frame
                continue
            self._full(p, "push_batch")
            if timeout == 0:
                break
            try:
                self._wait_unlocked(length, deadline)
            except TimeoutError:
                raise TimeoutError("timed out waiting for space in the queue", done) from None
        return done

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[np.ndarray[Any, Any]]:
        """Production in a local buffer, published on exit.

        ``with q.reserve(n) as buf: buf[:] = ...`` — space in the ring is
        claimed first (waiting for it, like ``push``); ``buf`` is a writable view
        of this handle's staging buffer (uint8, or the queue's dtype), *not* of
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
            st = self._staging_for(RECORD_HEADER + _rec_size(nbytes))
            while True:
                self._check_owner(p, "reserve")
                self._begin(p)
                off = self._place(p, st, nbytes)
                if off is not None:
                    break
                self._full(p, "reserve")
                self._wait_unlocked(nbytes, deadline)
                p = self._producer_ready()
                st = self._staging_for(RECORD_HEADER + _rec_size(nbytes))
            rec_pos = p.claim - _rec_size(nbytes)
            p.reserved = True
            self._reserving = True
            self._commit_len = nbytes
            buf = st.array[off : off + nbytes]
            try:
                yield buf if self.dtype is None else buf.view(self.dtype)
            except BaseException:
                p.claim = p.tail
                p.next_seq = p.pub_seq
                p.reserved = False
                self._reserving = False
                self._f_sp = 0
                raise
            p.reserved = False
            self._reserving = False
            k = self._commit_len
            seq = p.next_seq - 1
            st.u32[(off - RECORD_HEADER) // 4 + _LEN32] = k
            st.array[off + k : off - RECORD_HEADER + _rec_size(k)] = 0
            p.claim = rec_pos + _rec_size(k)
            self._f_sp = off - RECORD_HEADER + _rec_size(k)
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
            pos = w & _POS_MASK
            if (head | pos) & _MISALIGNED or pos < head or pos - head > self.capacity:
                raise E.Corrupted(f"ring positions make no sense (head {head}, tail {pos})")
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
        pend_cap = min(1 << 20, max(64, _next_pow2(self.capacity // 32)))
        c = _Consumer(cid, head, pend_cap)
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
        if c.head != c.head_stored:
            self._advance_head(c)  # an earlier store of head failed: try again
        if strict and not self._cons_multi and c.pend_next - c.pend_first >= c.pend_cap:
            raise E.HeldItemsStall("too many unreleased items: pop")
        return c

    def _load_tail(self, c: _Consumer) -> int:
        """Load the tail word, validate it, update the tail cache; returns the word."""
        w = self.region.load64(_TAIL)  # SYNC POINT: ring-publish
        pos = w & _POS_MASK
        if pos & _MISALIGNED or pos < c.rpos or pos - c.head > self.capacity:
            raise E.Corrupted(f"the ring's tail ({pos}) is outside [{c.rpos}, {c.head + self.capacity}]")
        c.tail_cache = pos
        return w

    def _fill(self, c: _Consumer, upto: int) -> None:
        """READ published bytes from ``read_pos`` (up to the wrap, the tail, and
        the read chunk, but at least up to ``upto``) into the local mirror."""
        m = self._mirror
        assert m is not None
        start = c.read_pos
        idx = start & self._mask
        end = min(c.tail_cache, start + (self.capacity - idx))
        n = min(end - start, max(self._read_chunk, upto - start))
        self.region.read_into(RING_HEADER + idx, m.array[idx : idx + n])
        c.read_pos = start + n

    _EMPTY = -1
    _END = -2
    _WRAP = -3

    def _next_record(self, c: _Consumer, stop_at_wrap: bool) -> int:
        """Index of the next DATA record at ``rpos`` (skipping padding unless
        ``stop_at_wrap``), or _EMPTY, _END (sealed and drained), _WRAP (stopped).
        Every header is validated before it is used."""
        m = self._mirror
        assert m is not None
        cap = self.capacity
        while True:
            if c.rpos == c.tail_cache:
                w = self._load_tail(c)
                if c.tail_cache == c.rpos:
                    return self._END if w & _SEALED else self._EMPTY
            if c.rpos == c.read_pos:
                self._fill(c, c.rpos + RECORD_HEADER)
            idx = c.rpos & self._mask
            length = int(m.u32[idx // 4 + _LEN32])
            rtype = int(m.u32[idx // 4 + _TYPE32])
            if rtype == _PADDING:
                if idx + RECORD_HEADER + length != cap or c.rpos + (cap - idx) > c.tail_cache:
                    raise E.Corrupted(f"bad padding record at position {c.rpos} (length {length})")
                if stop_at_wrap:
                    return self._WRAP
                c.rpos += cap - idx
                c.read_pos = max(c.read_pos, c.rpos)
                continue
            rs = _rec_size(length)
            if rtype != _DATA or length == 0 or length > self.max_item or idx + rs > cap or c.rpos + rs > c.tail_cache:
                raise E.Corrupted(f"bad record at position {c.rpos} (type {rtype}, length {length})")
            if c.rpos + rs > c.read_pos:
                self._fill(c, c.rpos + rs)
            seq = int(m.u64[idx // 8 + _SEQ64])
            if seq <= c.last_seq:
                raise E.Corrupted(f"record at position {c.rpos} has sequence {seq} after {c.last_seq}")
            return idx

    def _pend_push(self, c: _Consumer, end: int) -> int:
        with c.lock:
            token = c.pend_next
            c.pend_end.append(end)
            c.pend_next = token + 1
        return token

    def try_pop(self) -> Item | None:
        """Pop one item, or None when the queue is empty (never waits).

        Raises ``QueueSealed`` once a sealed queue is drained."""
        with self._clock_lock:
            c = self._consumer_ready()
            if c.pend_next - c.pend_first >= c.pend_cap:
                return None  # other threads hold every token: nothing to hand out until they release
            m = self._mirror
            assert m is not None
            idx = self._next_record(c, False)
            if idx == self._EMPTY:
                return None
            if idx == self._END:
                raise self._sealed_error("sealed and drained")
            length = int(m.u32[idx // 4 + _LEN32])
            seq = int(m.u64[idx // 8 + _SEQ64])
            c.rpos += _rec_size(length)
            c.last_seq = seq
            token = self._pend_push(c, c.rpos)
            return OneSidedItem(self, token, idx + RECORD_HEADER, length, seq, None)

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
                if c.rpos != c.tail_cache:
                    return
                w = self._load_tail(c)
                if c.tail_cache != c.rpos or w & _SEALED:
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
            held = c.pend_next - c.pend_first
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
                full = c.pend_next - c.pend_first >= c.pend_cap
                batch = None if full else self._take_batch(c, max_items)
            if batch is not None:
                return batch
            if timeout == 0:
                return Batch.empty()
            self._poll_data(backoff, stall)

    def _take_batch(self, c: _Consumer, max_items: int) -> Batch | None:
        m = self._mirror
        assert m is not None
        # a batch never holds more records than fit in the ring (the smallest is 32 bytes)
        max_items = min(max_items, self.capacity // _rec_size(1))
        offs = np.empty(max_items, dtype=np.uint64)
        lens = np.empty(max_items, dtype=np.uint64)
        seqs = np.empty(max_items, dtype=np.uint64)
        n = 0
        uniform = 0
        rc = 0
        start_rpos, start_seq = c.rpos, c.last_seq
        while n < max_items:
            if n > 0 and c.rpos & self._mask == 0:
                break  # a batch stops at the wrap: its payloads are contiguous
            try:
                rc = self._next_record(c, n > 0)
            except E.Corrupted:
                if n:
                    break  # the good records go out; the next call reports the bad one (as in C)
                raise
            except BaseException:
                c.rpos, c.last_seq = start_rpos, start_seq  # nothing taken: the records stay queued
                raise
            if rc < 0:
                break
            idx = rc
            length = int(m.u32[idx // 4 + _LEN32])
            if n == 0:
                uniform = length
            elif uniform != length:
                uniform = 0
            k = self._uniform_run(c, idx, length, max_items - n) if uniform else 0
            if k:
                rs = _rec_size(length)
                base = idx + np.arange(k, dtype=np.uint64) * rs
                offs[n : n + k] = base + RECORD_HEADER
                lens[n : n + k] = length
                seqs[n : n + k] = m.u64[(base // 8 + _SEQ64).astype(np.intp)]
                c.rpos += k * rs
                c.last_seq = int(seqs[n + k - 1])
                n += k
                continue
            seq = int(m.u64[idx // 8 + _SEQ64])
            offs[n] = idx + RECORD_HEADER
            lens[n] = length
            seqs[n] = seq
            c.rpos += _rec_size(length)
            c.last_seq = seq
            n += 1
        if n == 0:
            if rc == self._END:
                raise self._sealed_error("sealed and drained")
            return None
        token = self._pend_push(c, c.rpos)
        return Batch(self, token, offs[:n], lens[:n], seqs[:n], uniform)

    def _uniform_run(self, c: _Consumer, idx: int, length: int, limit: int) -> int:
        """How many records from ``idx`` on are DATA records of ``length`` bytes
        with increasing sequence numbers, all already in the local buffer and
        before the wrap (validated with numpy, at most ``limit``). The first
        record must already be validated by ``_next_record``."""
        rs = _rec_size(length)
        avail = min(c.read_pos - c.rpos, self.capacity - idx) // rs
        k = min(limit, avail)
        if k <= 1:
            return k
        m = self._mirror
        assert m is not None
        base = (idx + np.arange(k, dtype=np.int64) * rs) // 4
        ok = (m.u32[base + _LEN32] == length) & (m.u32[base + _TYPE32] == _DATA)
        seqs = m.u64[(base // 2 + _SEQ64)]
        ok[1:] &= seqs[1:] > seqs[:-1]
        ok[0] = bool(int(seqs[0]) > c.last_seq)
        bad = np.flatnonzero(~ok)
        return int(bad[0]) if len(bad) else k

    def _release_token(self, token: int) -> None:
        c = self._c
        if c is None:
            return
        c.done.add(token)
        self._advance_head(c)
        if self.closed:
            self._maybe_give_back_consumer()

    def _maybe_give_back_consumer(self) -> None:
        """After close: give the consumer role back once nothing popped here is
        unreleased (as the mapped queue does)."""
        c = self._c
        if c is not None and self.closed and c.pend_next == c.pend_first:
            try:
                self.region.cas64(_CONSUMER_ID, c.id, 0)
            except (E.FabricError, E.FabricValueError) as exc:
                log.debug("could not give the consumer role back: %s", exc)
            self._c = None
            lock = self._role_locks.pop(_ROLE_CONSUMER, None)
            if lock is not None:
                lock.release()

    def _advance_head(self, c: _Consumer) -> None:
        """Free the space of the oldest released items/batches: one ``store64`` of
        ``head``. Reentrant-safe (a garbage-collected item may release while this
        handle is mid-call): whoever holds the lock does the work, and re-checks."""
        while True:
            if not c.lock.acquire(blocking=False):
                return
            try:
                head = c.head
                while c.pend_first < c.pend_next and c.pend_first in c.done:
                    c.done.discard(c.pend_first)
                    head = c.pend_end.popleft()
                    c.pend_first += 1
                c.head = head
                if head != c.head_stored:
                    try:
                        self.region.store64(_HEAD, head)  # SYNC POINT: ring-release
                        c.head_stored = head
                    except (E.FabricError, E.FabricValueError) as exc:
                        log.debug("could not store head %d: %s", head, exc)
            finally:
                c.lock.release()
            if not (c.pend_first < c.pend_next and c.pend_first in c.done):
                return

    @property
    def outstanding(self) -> int:
        """Items and batches popped here and not yet released."""
        c = self._c
        return 0 if c is None else c.pend_next - c.pend_first

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
