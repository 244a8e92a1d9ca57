"""FabricQueue: a bounded SPSC queue in a leased region, zero-copy on the way out.

The ring protocol and layout are in ``native/gf_ring.h``; the push/pop hot path
is C (``grafos_fabric._native``) running on memory mapped into the process.

Lifetime of what ``pop`` returns
--------------------------------
An :class:`Item` (or a :class:`Batch`) pins its bytes in the ring. ``np.asarray(item)``
is a read-only view of the ring memory, not a copy. The space is freed when
the item is released: explicitly (``item.release()``, ``with item:``), or when
the item *and every array made from it* are gone. After an explicit
``release()`` the producer may overwrite the bytes, so views taken earlier must
not be used (the memory stays mapped; it never crashes). Items are freed in
any order; the ring reclaims space up to the oldest unreleased item.

**The rule for consumers that hold items:** the ring cannot reuse space that
an unreleased item pins. A consumer that keeps items (or batches) while it
waits for more can starve the producer; when that would deadlock — the ring
is empty for the consumer, the producer is waiting for space, and this
consumer holds unreleased items — ``pop``/``pop_batch`` raise
:class:`~grafos_fabric.errors.HeldItemsStall` instead of waiting. Copy what you
keep (``item.tobytes()``, ``np.array(item)``) and release the item.

Roles: one producer and one consumer per queue, claimed on first push / first
pop; a second claimant gets :class:`~grafos_fabric.errors.RoleTaken`. A held
role also holds the region's role lock (on shm an open-file-description lock
on the segment file, dropped by the kernel when the holder exits), which is
how ``take_over=True`` tells a dead holder from a live one, in any pid
namespace. A producer stamped with an epoch older than the queue's is
rejected at the target (:class:`~grafos_fabric.errors.StaleEpoch`): the tail
word it must compare-and-swap to publish carries the epoch.

Takeover by a higher epoch happens in place only when the old producer is
provably gone (no holder, or its role lock is free). A live producer may be
mid-copy, writing record bytes past the tail where the new one would publish;
so instead the queue is fenced and *sealed* and the newcomer gets
:class:`~grafos_fabric.errors.QueueSealed` (relocate to a fresh queue). What
remains: the fenced producer, while alive, may still write record bytes past
the sealed tail of the old ring; they are never published.

Threads share a handle safely (each item to exactly one popping thread); a
handle inherited across ``fork()`` raises
:class:`~grafos_fabric.errors.ForkedHandle` in the child. See
:class:`FabricQueue`.
"""

from __future__ import annotations

import ast
import logging
import math
import numbers
import operator
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeGuard

import numpy as np

from . import errors as E
from . import observe
from ._ffi import ffi, lib, raise_status
from ._item import GF_NATIVE_ABI as _ITEM_ABI
from ._item import ItemBase, Releaser, Span
from ._item import bind as _bind_item
from ._types import ItemLike
from .drivers.base import Fabric, MappedRegion, Region
from .lease import NS, Lease, check_ttl
from .locator import QueueLocator
from .queue_api import QueueProtocols

__all__ = ["DEFAULT_CAPACITY", "Batch", "FabricQueue", "Item"]

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1 << 20
RING_HEADER = int(lib.GF_RING_HEADER_SIZE)
RECORD_HEADER = int(lib.GF_RECORD_HEADER_SIZE)
MIN_CAPACITY = int(lib.GF_RING_MIN_CAPACITY)
MAX_CAPACITY = int(lib.GF_RING_MAX_CAPACITY)
_SPACE_WAITERS_OFF = int(ffi.offsetof("gf_ring_header", "space_waiters"))
_ACKED_OFF = int(ffi.offsetof("gf_ring_header", "acked"))
_TAIL_OFF = int(ffi.offsetof("gf_ring_header", "tail"))
_EPOCH_OFF = int(ffi.offsetof("gf_ring_header", "epoch"))
_SEAL_SEQ_OFF = int(ffi.offsetof("gf_ring_header", "seal_seq"))
_SEALED = int(lib.GF_TAIL_SEALED)
_POS_MASK = int(lib.GF_TAIL_POS_MASK)
_WAIT_SLICE_NS = 50_000_000  # C waits in slices so Python sees signals and lease changes
_POLL_SLICE_NS = 1_000_000  # ... and in short ones while a one-sided peer (which can't wake us) is attached
_ONESIDED_OFF = int(ffi.offsetof("gf_ring_header", "onesided_peers"))
_SPIN = 4000
_U8 = np.dtype(np.uint8)
_LEASE_ACTIVE = int(lib.GF_LEASE_ACTIVE)
_NO_BYTE_LIMIT = (1 << 64) - 1
PREFETCH_ITEMS = 64

OK = int(lib.GF_OK)
FULL = int(lib.GF_FULL)
EMPTY = int(lib.GF_EMPTY)
END = int(lib.GF_END)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_U64_MAX = (1 << 64) - 1
_EPOCH_MAX = (1 << 63) - 1


def _check_int(name: str, value: Any, lo: int = 0, hi: int = _U64_MAX) -> int:
    """``value`` as an int in ``[lo, hi]``: ``FabricTypeError`` for a non-int
    (bools too; numpy ints are ints), ``FabricValueError`` when it is out of range."""
    if isinstance(value, bool):
        raise E.FabricTypeError(f"{name} must be an int, got bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise E.FabricTypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}") from None
    if not lo <= v <= hi:
        raise E.FabricValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _as_dtype(dtype: Any) -> np.dtype[Any]:
    """A caller's dtype argument as a numpy dtype that can live in shared memory."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError, KeyError, OverflowError, RecursionError, MemoryError) as exc:
        raise E.DtypeMismatch(f"{dtype!r:.60} is not a dtype numpy knows (e.g. 'float32', '<u8'): {exc}") from None
    if dt.hasobject:
        raise E.DtypeMismatch(f"dtype {dt} holds Python objects: only plain data can live in shared memory")
    if dt.itemsize == 0:
        raise E.DtypeMismatch(f"dtype {dt} has no size: give one with a size, e.g. 'V8' or 'S16'")
    return dt


def _dtype_to_str(dtype: np.dtype[Any]) -> str:
    if dtype.hasobject:
        raise E.DtypeMismatch(f"dtype {dtype} holds Python objects: only plain data can live in shared memory")
    descr = np.lib.format.dtype_to_descr(dtype)
    text = descr if isinstance(descr, str) else repr(descr)
    if len(text.encode()) > int(lib.GF_DTYPE_MAX):
        raise E.FabricValueError(f"dtype description too long for the ring header: {text[:40]}...")
    return text


def _dtype_from_str(text: str) -> np.dtype[Any] | None:
    """The dtype a ring header names (untrusted text): None for raw bytes; refuses
    with ``Corrupted`` anything unparseable, holding objects, or of no size."""
    if not text:
        return None
    try:
        descr: Any = text if not text.startswith("[") else ast.literal_eval(text)  # literals only: no code runs
        dt = np.lib.format.descr_to_dtype(descr)
    except Exception:  # untrusted text: whatever numpy or ast raise on it means "corrupt"
        raise E.Corrupted(f"bad dtype in queue header: {text[:60]!r}") from None
    if not isinstance(dt, np.dtype) or dt.hasobject or dt.itemsize == 0:
        raise E.Corrupted(f"queue header names a dtype that cannot live in shared memory: {text[:60]!r}")
    return dt


def _ring_geometry(
    capacity: Any, max_item: Any, epoch: Any, first_seq: Any, dtype: Any
) -> tuple[int, int, np.dtype[Any] | None, str]:
    """Validate ``create`` arguments: ``(capacity rounded up, max_item, dtype, dtype text)``.

    Shared by the mapped and the one-sided ``create`` so both build the same ring."""
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise E.FabricTypeError(f"capacity must be an int number of bytes, got {capacity!r:.40}")
    if capacity <= 0 or capacity > MAX_CAPACITY:
        raise E.FabricValueError(f"capacity must be in (0, {MAX_CAPACITY}] bytes, got {capacity}")
    cap = max(MIN_CAPACITY, _next_pow2(capacity))
    biggest = cap // 2 - RECORD_HEADER
    if max_item is None:
        max_item = biggest
    else:
        max_item = _check_int("max_item", max_item, 1, biggest)
    epoch = _check_int("epoch", epoch, 0, _EPOCH_MAX)
    first_seq = _check_int("first_seq", first_seq, 0, _EPOCH_MAX)
    dt = None if dtype is None else _as_dtype(dtype)
    dtext = "" if dt is None else _dtype_to_str(dt)
    if dt is not None and max_item < dt.itemsize:
        raise E.FabricValueError(f"max_item {max_item} is smaller than one {dt} element")
    return cap, max_item, dt, dtext


def _typed(arr: np.ndarray[Any, Any], dt: np.dtype[Any] | None) -> np.ndarray[Any, Any]:
    """View payload bytes in the queue's dtype; a length that is not a whole
    number of elements (only a foreign writer makes one) is ``Corrupted``."""
    if dt is None:
        return arr
    if arr.shape[-1] % dt.itemsize:
        raise E.Corrupted(f"an item of {arr.shape[-1]} bytes is not a whole number of {dt} elements")
    return arr.view(dt)


def _buffer_format(dt: np.dtype[Any] | None) -> tuple[bytes | None, int]:
    """The PEP 3118 format and size of one element that an item exports (``B``
    without a dtype); ``None`` for a dtype that has no buffer format."""
    if dt is None:
        return b"B", 1
    try:
        fmt = memoryview(np.empty(1, dt)).format  # type: ignore[arg-type]
    except (ValueError, TypeError, BufferError):
        return None, dt.itemsize
    return fmt.encode("ascii"), dt.itemsize


def _item_info(data: Any, capacity: int, dt: np.dtype[Any] | None) -> tuple[int, int, bytes | None, int]:
    """What an :class:`Item` reads from its queue when made: the data area's
    address and size (the C base checks offset and length against them), the
    buffer format and element size."""
    fmt, itemsize = _buffer_format(dt)
    return int(ffi.cast("uintptr_t", data)), capacity, fmt, itemsize


class Item(ItemBase):
    """One popped item: ``seq``, ``len()``, and its payload in place, read-only,
    through the buffer protocol: ``memoryview(item)``, ``np.asarray(item)``,
    ``np.frombuffer(item, dtype)``, ``bytes(item)`` (no copy but the last).

    The base (``grafos_fabric._item.ItemBase``, C) counts the exports: the ring
    space goes back to the queue once the item is released (``release()``,
    ``with item:``, or garbage) and every view made from it is gone. A view
    holds the item, the item its queue, the queue the mapping."""

    __slots__ = ()

    # -- data ----------------------------------------------------------------------
    def array(self) -> np.ndarray[Any, Any]:
        """The payload as a read-only numpy view (uint8, or the queue's dtype)."""
        if self._q._item_info[2] is not None:
            return np.asarray(memoryview(self))  # a typed (or byte) export, checked in C
        # a dtype without a buffer format: a byte export, viewed as the dtype
        return _typed(np.frombuffer(self._byte_view(), _U8), self._q.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        arr = self.array()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    @property
    def data(self) -> memoryview:
        """The payload as a read-only byte memoryview (zero-copy)."""
        return self._byte_view()

    def tobytes(self) -> bytes:
        """A copy of the payload (safe to keep after release)."""
        return self._byte_view().tobytes()  # raises FabricValueError once released

    def __repr__(self) -> str:
        state = "released" if self.released else f"{self.length}B"
        return f"<Item seq={self.seq} {state}>"


class Batch:
    """Items popped together; their payloads are contiguous in the ring.

    ``len(batch)``, iteration and indexing give :class:`Item` objects;
    ``batch.seqs`` and ``batch.lengths`` are numpy arrays; ``batch.array()`` is a
    2-D zero-copy view ``(n, item_len)`` when every item has the same length.
    The batch's ring space is reused once the batch is released (``release()``,
    ``with batch:``, or garbage) and every view made from it is gone.
    """

    __slots__ = (
        "__weakref__", "_base", "_gc", "_ntokens", "_offsets", "_q", "_start", "_token", "lengths", "seqs", "uniform",
    )

    def __init__(
        self,
        q: FabricQueue | None,
        token: int,
        offsets: np.ndarray[Any, Any],
        lengths: np.ndarray[Any, Any],
        seqs: np.ndarray[Any, Any],
        uniform: int,
        ntokens: int = 1,
    ) -> None:
        self._q = q
        self._token = token if q is not None and len(offsets) else -1
        self._ntokens = ntokens  # release tokens token .. token + ntokens - 1
        self._offsets = offsets
        self.lengths = lengths
        self.seqs = seqs
        self.uniform = uniform
        self._gc: Any = None
        self._base: Any = None
        self._start = int(offsets[0]) - RECORD_HEADER if len(offsets) else 0

    @classmethod
    def empty(cls) -> Batch:
        z = np.zeros(0, dtype=np.uint64)
        return cls(None, -1, z, z, z, 0)

    def __len__(self) -> int:
        return len(self._offsets)

    def __bool__(self) -> bool:
        return len(self._offsets) > 0

    def _check(self) -> None:
        if self._token < 0 and len(self._offsets):
            raise E.FabricValueError("batch was released: its bytes may have been reused")

    def _span(self) -> np.ndarray[Any, Any]:
        """The batch's bytes as a read-only array; it (and every view of it) pins the span."""
        base = self._base
        if base is None:
            self._check()
            q = self._q
            assert q is not None
            release = q._release_token
            first, n = self._token, self._ntokens
            span = int(self._offsets[-1]) + int(self.lengths[-1]) - self._start

            def free(_p: Any) -> None:
                for t in range(first, first + n):
                    release(t)

            self._gc = ffi.gc(q._data + self._start, free)
            base = self._base = np.frombuffer(memoryview(ffi.buffer(self._gc, span)).toreadonly(), _U8)
        return base

    def _item_view(self, offset: int, length: int) -> np.ndarray[Any, Any]:
        rel = offset - self._start
        arr = self._span()[rel : rel + length]
        return _typed(arr, self._q.dtype if self._q is not None else None)

    def __getitem__(self, i: int) -> Item:
        self._check()
        try:
            i = operator.index(i)
        except TypeError:
            raise E.FabricTypeError(f"batch indices are ints, got {type(i).__name__}") from None
        n = len(self._offsets)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("batch index out of range")
        assert self._q is not None
        return Item(self._q, 0, int(self._offsets[i]), int(self.lengths[i]), int(self.seqs[i]), self)

    def __iter__(self) -> Iterator[Item]:
        for i in range(len(self._offsets)):
            yield self[i]

    def array(self) -> np.ndarray[Any, Any]:
        """All payloads as one read-only 2-D view ``(n, item_len)`` (or ``(n, k)`` of
        the queue's dtype). Needs every item to have the same length."""
        n = len(self._offsets)
        if n == 0:
            return np.zeros((0, 0), dtype=np.uint8)
        if not self.uniform:
            raise E.FabricValueError("items of this batch have different lengths: use the items one by one")
        length = self.uniform
        stride = int(lib.gf_record_size(length))
        arr = np.lib.stride_tricks.as_strided(
            self._span()[RECORD_HEADER:], shape=(n, length), strides=(stride, 1), writeable=False
        )
        return _typed(arr, self._q.dtype if self._q is not None else None)

    def tolist(self) -> list[bytes]:
        """Copies of every payload."""
        return [item.tobytes() for item in self]

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum()) if len(self.lengths) else 0

    @property
    def released(self) -> bool:
        return self._token < 0

    def release(self) -> None:
        """Let go of the batch (idempotent); its space is reused once its views are gone."""
        token = self._token
        if token < 0:
            return
        self._token = -1
        if self._gc is not None:
            self._base = None
            self._gc = None  # views made from the span keep it; the last one releases
        elif self._q is not None:
            for t in range(token, token + self._ntokens):
                self._q._release_token(t)

    def __del__(self) -> None:
        if self._token >= 0 and self._gc is None and self._q is not None:
            for t in range(self._token, self._token + self._ntokens):
                self._q._release_token(t)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        first = int(self.seqs[0]) if len(self.seqs) else None
        return f"<Batch n={len(self)} first_seq={first}>"


_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)
_MAPPED_TYPES: set[type] = set()  # region classes already seen to satisfy MappedRegion


def _is_mapped_region(region: object) -> TypeGuard[MappedRegion]:
    """``isinstance(region, MappedRegion)``, remembered per class: a runtime Protocol check walks
    every member of the protocol each time (tens of µs on Python 3.11, on every attach and rebind).
    Only a class one of whose instances passed is remembered: its instances all carry the same
    members (the protocol's methods are the class's, its attributes are set by ``__init__``)."""
    t = type(region)
    if t in _MAPPED_TYPES:
        return True
    if isinstance(region, MappedRegion):
        _MAPPED_TYPES.add(t)
        return True
    return False


class _Reservation:
    """``with q.reserve(n) as buf:`` (see :meth:`FabricQueue.reserve`): reused, one per
    thread and handle, so a reservation costs no generator or context object."""

    __slots__ = ("active", "nbytes", "out", "p", "q", "timeout")

    def __init__(self) -> None:
        self.q: Any = None
        self.out = ffi.new("uint64_t[2]")
        self.nbytes = 0
        self.timeout: float | None = None
        self.active = False
        self.p: Any = None

    def __enter__(self) -> np.ndarray[Any, Any]:
        q = self.q
        if q is None or self.active:
            raise E.FabricValueError("enter a reservation once, right after q.reserve(n): `with q.reserve(n) as buf:`")
        nbytes = self.nbytes
        out = self.out
        plock = q._plock
        deadline: float | None = None
        first = True
        while True:
            plock.acquire()
            try:
                p = q._prod or q._producer()
                rc = lib.gf_reserve(p, nbytes, q._now(), out)
                if rc == OK:
                    break
                if rc != FULL:
                    q._raise(rc, "reserve")
            except BaseException:
                plock.release()
                self.q = None
                raise
            plock.release()
            try:
                if first:
                    deadline = _deadline(self.timeout)
                    first = False
                q._wait_space(nbytes, deadline)
            except BaseException:
                self.q = None
                raise
        self.p = p
        self.active = True
        q._reserver = threading.get_ident()
        q._reserving = True
        q._commit_len = nbytes
        off = out[0]
        # the view holds a Span that holds this handle (and so the mapping); Span checks the range
        buf = np.frombuffer(Span(q, off, nbytes, True), dtype=np.uint8)  # type: ignore[call-overload]
        dt = q.dtype
        return buf if dt is None else buf.view(dt)

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if not self.active:
            return
        q = self.q
        p = self.p
        self.active = False
        self.p = None
        self.q = None
        try:
            if et is not None:
                lib.gf_abort(p)
                return
            out = self.out
            rc = lib.gf_commit(p, q._commit_len, out + 1)
            if rc != OK:
                q._raise(rc, "commit")
            q.last_seq = out[1]
        finally:
            q._reserving = False
            q._reserver = None
            if q._give_back_after_reserve:
                q._give_back_producer(p)
            q._plock.release()


class FabricQueue(QueueProtocols):
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

    # set once the data area is known: (address, capacity, format, itemsize[, Releaser])
    _item_info: tuple[Any, ...] = (0, 0, b"B", 1)

    def __init__(self, fabric: Fabric, region: Region, *, owner: bool, epoch: int | None = None) -> None:
        if epoch is not None:
            epoch = _check_int("epoch", epoch, 0, _EPOCH_MAX)
        self.fabric = fabric
        self.region = region
        self.lease: Lease = region.lease
        self.owner = owner
        # the region's lease clock: a host-clock region stays on the host clock even when this
        # fabric was given a manual clock (see drivers/shm.py, clock domains)
        clock = getattr(region.lease, "clock", None) or fabric.clock
        self._clock = clock
        self._native_clock = bool(getattr(clock, "native", False))
        if not region.mapped or not _is_mapped_region(region):
            raise E.Unsupported("this FabricQueue needs a mapped region (see drivers.base.MappedRegion)")
        self._ring = ffi.cast("uint8_t *", region.payload_pointer())
        self._lease_ptrs = region.lease_pointers()
        rc = lib.gf_ring_check(self._ring, region.nbytes)
        if rc != OK:
            raise_status(rc, "attaching the queue")
        hdr = ffi.cast("gf_ring_header *", self._ring)
        self._hdr = hdr
        self.capacity = int(hdr.capacity)
        self.max_item = int(hdr.max_item)
        self.first_seq = int(hdr.first_seq)
        self.dtype = _dtype_from_str(ffi.string(hdr.dtype, int(hdr.dtype_len)).decode("ascii", "replace"))
        self._data = self._ring + RING_HEADER
        self._item_info = _item_info(self._data, self.capacity, self.dtype)
        self._epoch = epoch
        self._prod: Any = None
        self._cons: Any = None
        self._pend: tuple[Any, Any] | None = None  # keeps the consumer's token arrays alive
        self._tls = threading.local()  # per-thread out-parameters of the native push
        # lease words (state, deadline) of the segment header, read without a native call
        self._lease_words = memoryview(ffi.buffer(self._lease_ptrs[0], 16)).cast("Q")
        self._clock_ns = time.monotonic_ns if self._native_clock else self._clock.now_ns
        # records prefetched for single pops, still to hand out: an iterator of
        # (token, offset, length, seq); next() on it is one C call, so under the GIL
        # each record goes to exactly one thread without a Python lock
        self._pf_it: Iterator[tuple[int, int, int, int]] = _NO_PREFETCH
        self._prefetch_bytes = max(4096, self.capacity // 8)
        self._max_records = self.capacity // int(lib.gf_record_size(1))
        self._pfa_offs = np.empty(PREFETCH_ITEMS, dtype=np.uint64)
        self._pfa_lens = np.empty(PREFETCH_ITEMS, dtype=np.uint64)
        self._pfa_seqs = np.empty(PREFETCH_ITEMS, dtype=np.uint64)
        self._pfa_offs_p = ffi.from_buffer("uint64_t[]", self._pfa_offs)
        self._pfa_lens_p = ffi.from_buffer("uint64_t[]", self._pfa_lens)
        self._pfa_seqs_p = ffi.from_buffer("uint64_t[]", self._pfa_seqs)
        self._outs = ffi.new("uint64_t[3]")
        self._take_over = False
        self.closed = False
        self._init_handle_state()

    def _init_handle_state(self) -> None:
        """Locks, role locks and lifecycle flags (shared with OneSidedQueue)."""
        # producer calls run one at a time (reentrant: a push inside reserve() gets
        # its typed error instead of a deadlock); consumer calls too (never held
        # while sleeping, nor by releases, which only take the native lock)
        self._plock = threading.RLock()
        self._clock_lock: Any = threading.Lock()
        self._freed = False
        self._forked = False
        self._role_locks: dict[int, Any] = {}
        self._cons_rel: Any = None  # the native consumer releases go to (kept after close while items are out)
        self._pf_keep = 0  # after close: prefetched records never handed out (stay unreleased)
        self._cons_tid: int | None = None
        self._cons_multi = False  # consumer calls came from more than one thread
        self._pend_cap = 1 << 62  # release tokens the consumer can have out (set when it is claimed)
        self._reserving = False
        self._reserver: int | None = None  # the thread whose reservation is open
        self._give_back_after_reserve = False
        _LIVE.add(self)

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
        ring protocol (``grafos_fabric.onesided``) with the same API.

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

    def locator(self) -> QueueLocator:
        self._check_handle()
        return QueueLocator(
            region=self.region.ref(),
            capacity=self.capacity,
            max_item=self.max_item,
            epoch=self.epoch,
            first_seq=self.first_seq,
            layout=int(lib.GF_RING_LAYOUT_VERSION),
            dtype="" if self.dtype is None else _dtype_to_str(self.dtype),
        )

    # -- header state ----------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The queue's fence epoch (in the shared header)."""
        self._check_handle()
        return int(lib.gf_load_acquire_at(self._ring, _EPOCH_OFF))

    @property
    def sealed(self) -> bool:
        self._check_handle()
        return bool(lib.gf_load_acquire_at(self._ring, _TAIL_OFF) & _SEALED)

    @property
    def seal_seq(self) -> int:
        self._check_handle()
        return int(lib.gf_load_acquire_at(self._ring, _SEAL_SEQ_OFF))

    @property
    def acked(self) -> int:
        """The consumer's durable commit: every sequence below it is processed."""
        self._check_handle()
        return int(lib.gf_load_acquire_at(self._ring, _ACKED_OFF))

    def set_acked(self, seq: int) -> None:
        """Publish that every item with sequence < ``seq`` is durably processed.

        ``acked`` only grows (a smaller value is ignored)."""
        seq = _check_int("acked", seq)
        cur = self.acked
        while seq > cur:
            found = int(lib.gf_cas_at(self._ring, _ACKED_OFF, cur, seq))
            if found == cur:
                return
            cur = found

    def seal(self, seal_seq: int = 0) -> bool:
        """Seal the queue: no push succeeds afterwards; the consumer drains what
        was published, then gets ``QueueSealed``. Returns False if already sealed."""
        seal_seq = _check_int("seal_seq", seal_seq)
        self._check_handle()
        return int(lib.gf_ring_seal(self._ring, seal_seq)) == OK

    def advance_epoch(self, new_epoch: int) -> None:
        """Move the queue's epoch forward: producers stamped older are fenced at
        their next publish. Raises ``StaleEpoch`` unless ``new_epoch`` is newer."""
        new_epoch = _check_int("epoch", new_epoch, 0, _EPOCH_MAX)
        self._check_handle()
        rc = lib.gf_ring_advance_epoch(self._ring, new_epoch)
        if rc != OK:
            raise E.StaleEpoch(epoch=new_epoch, current=self.epoch)

    def stats(self) -> dict[str, int | bool]:
        self._check_handle()
        hdr = self._hdr
        tail = int(lib.gf_load_acquire_at(self._ring, _TAIL_OFF))
        return {
            "capacity": self.capacity,
            "max_item": self.max_item,
            "epoch": self.epoch,
            "tail": tail & _POS_MASK,
            "head": int(hdr.head),
            "used": (tail & _POS_MASK) - int(hdr.head),
            "next_seq": int(hdr.next_seq),
            "acked": self.acked,
            "sealed": bool(tail & _SEALED),
            "producer": bool(hdr.producer_id),
            "consumer": bool(hdr.consumer_id),
        }

    # -- roles -----------------------------------------------------------------------
    def _now(self) -> int:
        return 0 if self._native_clock else self._clock.now_ns()

    def _check_handle(self) -> None:
        """Refuse any use of a freed handle, or of one inherited across fork()."""
        if self._forked:
            raise E.ForkedHandle(
                "this queue handle was inherited across fork(): the child must not act through its parent's "
                "roles; attach again in the child (FabricQueue.attach(fabric, locator))"
            )
        if self._freed:
            raise E.QueueFreed("queue was freed: its region is gone")

    def _check_open(self) -> None:
        if self._forked or self._freed:
            self._check_handle()
        if self.closed:
            raise E.QueueClosed("queue is closed: attach again for a new handle")

    def _lock_role(self, role: int) -> tuple[bool, Any]:
        """Try to take the region's lock for ``role``: ``(supported, lock)``;
        ``lock`` is None when a live holder has it (or locks aren't supported)."""
        take = getattr(self.region, "lock_role", None)
        if not callable(take):
            return False, None
        return True, take(role)

    def _fence_and_seal(self, epoch: int) -> None:
        """A higher-epoch producer found a live (or unprovable) holder: fence it and
        seal the queue, instead of writing where it may still be copying bytes."""
        try:
            self.advance_epoch(epoch)
        except E.StaleEpoch:
            if self.epoch > epoch:
                raise E.StaleEpoch("claiming the producer role: fenced", epoch=epoch, current=self.epoch) from None
        self.seal(0)
        log.warning("queue %s: fenced a live producer at epoch %d and sealed the queue", self.region.ref().name, epoch)
        raise E.QueueSealed(
            f"claiming the producer role at epoch {epoch}: a live producer held it (or its death can't be "
            "proven), so it was fenced and the queue sealed; move to a fresh queue (relocate)",
            seal_seq=self.seal_seq,
        )

    def _producer(self) -> Any:
        p = self._prod
        if p is not None:
            return p
        with self._plock:  # two threads making the first push: one claims, the other uses it
            if self._prod is not None:
                return self._prod
            self._check_open()
            self.lease.check()
            epoch = self.epoch if self._epoch is None else self._epoch
            supported, lock = self._lock_role(_ROLE_PRODUCER)
            try:
                cur = self.epoch
                if epoch < cur:
                    raise E.StaleEpoch("claiming the producer role: fenced", epoch=epoch, current=cur)
                holder = int(lib.gf_load_acquire_at(self._ring, _PRODUCER_ID_OFF))
                if epoch > cur and holder != 0 and not (lock is not None and holder & _LOCKED_ROLE):
                    self._fence_and_seal(epoch)
                if supported and lock is None:
                    raise E.RoleTaken("a live producer holds this queue's producer role (claiming the producer role)")
                p = ffi.new("gf_producer *")
                role_id = _role_id(locked=lock is not None)
                rc = lib.gf_producer_init(
                    p, self._ring, self.region.nbytes, self._lease_ptrs[0], self._lease_ptrs[1], epoch, role_id
                )
                if rc == lib.GF_E_ROLE and self._take_over and lock is not None:
                    if _reclaim_role(self._ring, _PRODUCER_ID_OFF):
                        rc = lib.gf_producer_init(
                            p, self._ring, self.region.nbytes, self._lease_ptrs[0], self._lease_ptrs[1], epoch, role_id
                        )
                if rc != OK:
                    self._raise(rc, "claiming the producer role", epoch=epoch)
                if lock is not None:
                    self._role_locks[_ROLE_PRODUCER] = lock
                    lock = None
            finally:
                if lock is not None:
                    lock.release()
            self._epoch = epoch
            self._prod = p
            return p

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
        self._item_info = (*self._item_info[:4], Releaser(ffi.buffer(c)))
        self._cons = c
        return c

    def _raise(self, rc: int, what: str, epoch: int | None = None) -> None:
        observe.count("queue_errors", status=rc, op=what)
        if rc == lib.GF_E_ARG:
            self._check_open()  # a role closed under this call (close() from another thread)
        if rc == lib.GF_E_EXPIRED or rc == lib.GF_E_REVOKED:
            self.lease.check()  # the lease's own message (revoked vs expired vs freed)
        if rc == lib.GF_E_FENCED:
            raise E.StaleEpoch(f"{what}: fenced", epoch=self._epoch if epoch is None else epoch, current=self.epoch)
        raise_status(rc, what, seal_seq=self.seal_seq)

    # -- producing -------------------------------------------------------------------
    def _as_item(self, buf: Any) -> Any:
        """Validate one item; returns what the C call takes (bytes or a cdata)."""
        dt = self.dtype
        if isinstance(buf, str):
            raise E.FabricTypeError("items are bytes-like or numpy arrays, not str: encode str first (s.encode())")
        if dt is not None:
            if not isinstance(buf, np.ndarray):
                raise E.DtypeMismatch(f"this queue carries {dt} arrays; got {type(buf).__name__}")
            if buf.dtype != dt:
                raise E.DtypeMismatch(f"this queue carries {dt} arrays; got {buf.dtype}")
        if isinstance(buf, bytes):
            return buf
        if isinstance(buf, np.ndarray):
            if not buf.flags.c_contiguous:
                raise E.DtypeMismatch("array is not C-contiguous: pass np.ascontiguousarray(a)")
            if buf.dtype.hasobject:
                raise E.DtypeMismatch("arrays of Python objects cannot be pushed")
        try:
            return ffi.from_buffer(buf)
        except TypeError:
            raise E.FabricTypeError(
                f"items are bytes-like objects or numpy arrays, got {type(buf).__name__}: pass bytes (or "
                "bytearray, memoryview, a numpy array)"
            ) from None
        except (BufferError, ValueError) as exc:
            raise E.DtypeMismatch(f"item must be bytes-like and contiguous: {exc}") from None

    def try_push(self, buf: ItemLike) -> bool:
        """Push one item; False when the ring is full (never waits)."""
        return self._push1(buf) is not None

    def _push1(self, buf: Any) -> int | None:
        item = buf if type(buf) is bytes and self.dtype is None else self._as_item(buf)
        n = len(item)
        p = self._prod or self._producer()
        try:
            seq = self._tls.seq
        except AttributeError:
            seq = self._tls.seq = ffi.new("uint64_t *")
        # no Python lock: the native producer serializes pushes itself
        rc = lib.gf_push(p, item, n, 0 if self._native_clock else self._clock.now_ns(), seq)
        if rc == OK:
            return seq[0]
        if rc == FULL:
            return None
        if rc == lib.GF_E_CLAIMED and self._reserver != threading.get_ident():
            with self._plock:  # another thread's reservation is open: wait for its commit
                return self._push1(buf)
        if rc == lib.GF_E_TOO_LARGE:
            raise E.ItemTooLarge(f"item of {n} bytes exceeds the queue's max_item of {self.max_item}")
        if rc == lib.GF_E_ARG and n == 0:
            raise E.FabricValueError("empty items are not allowed")
        self._raise(rc, "push")
        return None  # unreachable

    def push(self, buf: ItemLike, timeout: float | None = None) -> int:
        """Push one item, waiting for space; returns its sequence number.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first."""
        if timeout is not None and not (type(timeout) is float and timeout >= 0.0):
            _deadline(timeout)  # refuse a bad timeout even when no wait is needed
        seq = self._push1(buf)
        if seq is not None:
            return seq
        deadline = _deadline(timeout)
        n = len(self._as_item(buf))
        while True:
            self._wait_space(n, deadline)
            seq = self._push1(buf)
            if seq is not None:
                return seq

    def _check_size(self) -> None:
        """Before a blocking wait: ``Corrupted`` if a co-tenant shrank the segment under
        this mapping (a driver that can tell offers ``check_size``; one ``fstat``)."""
        check = getattr(self.region, "check_size", None)
        if check is not None:
            check()

    def _wait_space(self, nbytes: int, deadline: float | None) -> None:
        """Sleep (without the producer lock) until ``nbytes`` may fit, a slice at most."""
        p = self._prod or self._producer()
        slice_ns = self._slice(deadline)
        if slice_ns <= 0:
            raise TimeoutError("timed out waiting for space in the queue")
        self._check_size()
        rc = lib.gf_wait_space(p, nbytes, slice_ns, _SPIN)
        if rc < 0:
            self._raise(rc, "waiting for space")
        # lease, seal and fencing are checked by the next native push itself

    def push_batch(self, bufs: Sequence[Any] | np.ndarray[Any, Any], timeout: float | None = None) -> int:
        """Push many items with one native call per ring-full; returns how many.

        ``bufs`` is a 2-D array whose rows are the items (the fast path), or a
        sequence of bytes-like items. With ``timeout=0`` it pushes what fits and
        returns; otherwise it waits for space until all are pushed (or raises
        ``TimeoutError``, after which the items counted so far are in the queue:
        ``TimeoutError.args[1]`` holds that count). Items of one call keep their
        order; calls from other threads may interleave with it between ring-fulls.
        """
        deadline = _deadline(timeout)
        if isinstance(bufs, np.ndarray):
            return self._push_rows(bufs, deadline, timeout)
        if isinstance(bufs, (str, bytes, bytearray, memoryview)):
            raise E.FabricTypeError("push_batch takes a sequence of items (or a 2-D array), not one item: use push")
        try:
            items = [self._as_item(b) for b in bufs]
        except TypeError as exc:
            if isinstance(exc, E.FabricTypeError):
                raise
            raise E.FabricTypeError(f"push_batch takes a sequence of items, got {type(bufs).__name__}") from None
        if not items:
            self._prod or self._producer()  # a closed handle refuses even an empty batch
            return 0
        lens = np.fromiter((len(b) for b in items), dtype=np.uint64, count=len(items))
        if int(lens.min()) == 0:
            raise E.FabricValueError("empty items are not allowed")
        big = int(lens.max())
        if big > self.max_item:
            raise E.ItemTooLarge(f"item of {big} bytes exceeds the queue's max_item of {self.max_item}")
        blob = b"".join(bufs)  # the originals: validated above, joined without a copy each
        src = ffi.from_buffer(blob)
        lptr = ffi.from_buffer("uint64_t[]", lens)
        pushed = ffi.new("uint64_t *")
        done = 0
        offset = 0
        total = len(items)
        while done < total:
            with self._plock:
                p = self._prod or self._producer()
                rc = lib.gf_push_concat(p, src + offset, lptr + done, total - done, self._now(), pushed)
                k = int(pushed[0])
            if k:
                offset += int(lens[done : done + k].sum())
                done += k
            if rc < 0:
                self._raise(rc, "push_batch")
            if done < total and k == 0:
                if timeout == 0:
                    break
                try:
                    self._wait_space(int(lens[done]), deadline)
                except TimeoutError:
                    raise TimeoutError("timed out waiting for space in the queue", done) from None
        return done

    def _check_rows(self, arr: np.ndarray[Any, Any]) -> tuple[int, int]:
        """Validate a 2-D array of rows for ``push_batch``: ``(rows, bytes per row)``."""
        dt = self.dtype
        if arr.ndim != 2:
            raise E.DtypeMismatch(f"push_batch takes a 2-D array whose rows are items, got {arr.ndim}-D")
        if dt is not None and arr.dtype != dt:
            raise E.DtypeMismatch(f"this queue carries {dt} arrays; got {arr.dtype}")
        if arr.dtype.hasobject:
            raise E.DtypeMismatch("arrays of Python objects cannot be pushed")
        if arr.strides[1] != arr.itemsize or arr.strides[0] < 0:
            raise E.DtypeMismatch("rows must be contiguous: pass np.ascontiguousarray(a)")
        n = arr.shape[0]
        length = arr.shape[1] * arr.itemsize
        if n and length == 0:
            raise E.FabricValueError("empty items are not allowed")
        if n and length > self.max_item:
            raise E.ItemTooLarge(f"rows of {length} bytes exceed the queue's max_item of {self.max_item}")
        return n, length

    def _push_rows(self, arr: np.ndarray[Any, Any], deadline: float | None, timeout: float | None) -> int:
        n, length = self._check_rows(arr)
        if n == 0:
            self._prod or self._producer()  # a closed handle refuses even an empty batch
            return 0
        stride = arr.strides[0]
        base = ffi.cast("uint8_t *", arr.ctypes.data)
        pushed = ffi.new("uint64_t *")
        done = 0
        while done < n:
            with self._plock:
                p = self._prod or self._producer()
                rc = lib.gf_push_rows(p, base + done * stride, n - done, stride, length, self._now(), pushed)
                k = int(pushed[0])
            done += k
            if rc < 0:
                self._raise(rc, "push_batch")
            if done < n and k == 0:
                if timeout == 0:
                    break
                try:
                    self._wait_space(length, deadline)
                except TimeoutError:
                    raise TimeoutError("timed out waiting for space in the queue", done) from None
        del arr
        return done

    def reserve(self, nbytes: int, timeout: float | None = None) -> AbstractContextManager[np.ndarray[Any, Any]]:
        """Zero-copy production: write the item in place, published on exit.

        ``with q.reserve(n) as buf: buf[:] = ...`` — ``buf`` is a writable view of
        the ring (uint8, or the queue's dtype). Leaving the block normally
        commits the item; an exception aborts it (nothing is published). Call
        ``q.commit_len(k)`` inside the block to publish only the first ``k`` bytes
        (a whole number of dtype elements). ``buf`` keeps the mapping alive (a
        view kept after the block, or after the queue is gone, never crashes;
        after the block its bytes belong to the queue again).

        While a reservation is open the handle's producer side is held: pushes
        from other threads wait for it; a push from inside the block raises.
        ``close()`` from another thread gives the producer role up only when the
        block ends.

        What it returns is a context manager to enter at once (``with``): it is
        reused by the next ``reserve`` of this thread, so a reservation makes no
        Python objects but the view.
        """
        res = getattr(self._tls, "res", None)
        if res is None or res.active:  # one reusable reservation per thread (a nested one gets its own)
            res = self._tls.res = _Reservation()
        if type(nbytes) is not int or not 0 < nbytes <= self.max_item or (
            self.dtype is not None and nbytes % self.dtype.itemsize
        ):
            nbytes = _check_int("reserve size", nbytes, 1)
            if nbytes > self.max_item:
                raise E.ItemTooLarge(f"reservation of {nbytes} bytes exceeds the queue's max_item of {self.max_item}")
            if self.dtype is not None and nbytes % self.dtype.itemsize:
                raise E.DtypeMismatch(
                    f"reservation must be a multiple of {self.dtype.itemsize} bytes for {self.dtype}"
                )
        if timeout is not None and not (type(timeout) is float and timeout >= 0.0):
            _deadline(timeout)  # refuse a bad timeout now, not inside the with statement
        res.q = self  # dropped again on exit: no lasting cycle through this handle's thread-locals
        res.nbytes = nbytes
        res.timeout = timeout
        return res


    @contextmanager
    def reserve_batch(self, n: int, size: int, timeout: float | None = None) -> Iterator[np.ndarray[Any, Any]]:
        """Zero-copy production of many items of ``size`` bytes: ``(k, size)`` rows
        written in place, published together on exit.

        ``with q.reserve_batch(n, size) as rows: np.add(a, b, out=rows)`` —
        ``rows`` is a writable 2-D view of the ring (uint8, or the queue's dtype:
        ``(k, size // itemsize)``) of ``k`` contiguous records, ``1 <= k <= n``:
        fewer than ``n`` where the ring wraps or has room for fewer (waits, like
        :meth:`reserve`, only until one fits). Leaving the block normally
        publishes all ``k`` (one release store); ``q.commit_rows(j)`` inside it
        publishes only the first ``j``; an exception publishes none. The view
        keeps the mapping alive, as :meth:`reserve`'s does; the same rules for
        other threads and ``close()`` apply.
        """
        n = _check_int("reserve_batch rows", n, 1)
        size = _check_int("reserve size", size, 1)
        if size > self.max_item:
            raise E.ItemTooLarge(f"reservation of {size} bytes exceeds the queue's max_item of {self.max_item}")
        dt = self.dtype
        if dt is not None and size % dt.itemsize:
            raise E.DtypeMismatch(f"reservation must be a multiple of {dt.itemsize} bytes for {dt}")
        outs = ffi.new("uint64_t[2]")
        deadline = _deadline(timeout)
        plock = self._plock
        while True:
            plock.acquire()
            try:
                p = self._prod or self._producer()
                rc = lib.gf_reserve_rows(p, n, size, self._now(), outs, outs + 1)
                if rc == OK:
                    break
                if rc != FULL:
                    self._raise(rc, "reserve_batch")
            except BaseException:
                plock.release()
                raise
            plock.release()
            self._wait_space(size, deadline)
        off, k = int(outs[0]), int(outs[1])
        stride = int(lib.gf_record_size(size))
        span = (k - 1) * stride + size
        if k < 1 or off + span > self.capacity:  # the native layer never does this: refuse, don't overrun
            lib.gf_abort(p)
            plock.release()
            raise E.Corrupted(f"reserve_batch: {k} rows at {off} lie outside the ring")
        flat = np.frombuffer(Span(self, off, span, True), dtype=np.uint8)  # type: ignore[call-overload]  # pins the mapping
        rows = np.lib.stride_tricks.as_strided(flat, shape=(k, size), strides=(stride, 1), writeable=True)
        self._reserver = threading.get_ident()
        self._reserving = True
        self._rows_commit = k
        try:
            try:
                yield rows if dt is None else rows.view(dt)
            except BaseException:
                lib.gf_abort(p)
                raise
            rc = lib.gf_commit_rows(p, self._rows_commit, outs)
            if rc != OK:
                self._raise(rc, "commit")
            self.last_seq = int(outs[0]) + self._rows_commit - 1
        finally:
            self._rows_commit = 0
            self._reserving = False
            self._reserver = None
            if self._give_back_after_reserve:
                self._give_back_producer(p)
            plock.release()

    _rows_commit = 0

    def commit_rows(self, k: int) -> None:
        """Inside ``reserve_batch()``: publish only the first ``k`` rows."""
        self._check_open()
        if not self._rows_commit:
            raise E.FabricValueError("commit_rows is for inside a reserve_batch() block")
        k = _check_int("commit rows", k, 1)
        if k > self._rows_commit:
            raise E.FabricValueError(f"commit_rows needs k in (0, {self._rows_commit}] inside reserve_batch")
        self._rows_commit = k

    _commit_len = 0
    last_seq = -1

    def commit_len(self, nbytes: int) -> None:
        """Inside ``reserve()``: publish only the first ``nbytes`` bytes (a whole
        number of the queue's dtype elements)."""
        self._check_open()
        if not self._reserving:
            raise E.FabricValueError("commit_len is for inside a reserve() block")
        nbytes = _check_int("commit length", nbytes, 1)
        if nbytes > self._commit_len:
            raise E.FabricValueError(f"commit length must be in (0, {self._commit_len}]")
        dt = self.dtype
        if dt is not None and nbytes % dt.itemsize:
            raise E.DtypeMismatch(f"commit length must be a multiple of {dt.itemsize} bytes for {dt}")
        self._commit_len = nbytes

    # -- consuming -------------------------------------------------------------------
    def try_pop(self) -> Item | None:
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
        if rc == EMPTY:
            return None
        if rc == END:
            raise E.QueueSealed("queue is sealed and drained", seal_seq=self.seal_seq)
        if rc == lib.GF_E_HELD and self._cons_multi:
            return None  # other threads hold the oldest items: nothing to hand out until they release
        self._raise(rc, "pop")
        return None

    def pop(self, timeout: float | None = None) -> Item:
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

    def _wait_writable(self, nbytes: int, deadline: float | None) -> None:
        """Wait (GIL released) until ``nbytes`` may fit, for the asyncio worker."""
        self._wait_space(nbytes, deadline)

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
                if self._pf_it is not _NO_PREFETCH:
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

    def _slice(self, deadline: float | None) -> int:
        """How long one native wait may sleep: until the deadline, at most a slice."""
        cap = _POLL_SLICE_NS if lib.gf_load_acquire_at(self._ring, _ONESIDED_OFF) else _WAIT_SLICE_NS
        if deadline is None:
            return cap
        return min(cap, int((deadline - time.monotonic()) * NS))

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

    def _give_back_producer(self, p: Any) -> None:
        lib.gf_producer_close(p)  # takes the native producer lock: no push is mid-copy after it
        lock = self._role_locks.pop(_ROLE_PRODUCER, None)
        if lock is not None:
            lock.release()

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
        self._plock = threading.RLock()
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


# The one-sided handle (grafos_fabric.onesided.OneSidedQueue) subclasses
# FabricQueue, which hands it out for regions that don't map. So that this
# module never imports it back (no import cycle), it registers itself here
# when it is imported, which ``import grafos_fabric`` always does.
_ONE_SIDED: list[Any] = []


def register_one_sided(cls: Any) -> None:
    """Name the class FabricQueue uses for regions reached one-sided (called by
    grafos_fabric.onesided at import)."""
    _ONE_SIDED[:] = [cls]


def _one_sided() -> Any:
    if not _ONE_SIDED:  # pragma: no cover - grafos_fabric/__init__ imports onesided first
        raise E.Unsupported("one-sided queues need grafos_fabric.onesided, which `import grafos_fabric` loads")
    return _ONE_SIDED[0]


_PRODUCER_ID_OFF = int(ffi.offsetof("gf_ring_header", "producer_id"))
_CONSUMER_ID_OFF = int(ffi.offsetof("gf_ring_header", "consumer_id"))

_LOCKED_ROLE = 1 << 63  # marks an id whose holder keeps the region's role lock while it holds the role
_ROLE_PRODUCER = 0  # the role-lock bytes (drivers.shm.ROLE_PRODUCER / ROLE_CONSUMER)
_ROLE_CONSUMER = 1


def _role_id(*, locked: bool) -> int:
    """A producer/consumer id: the lock marker, the holder's pid in bits 62..32
    (for people reading ``inspect``: pids are not unique across pid
    namespaces, so liveness never rests on them), random low bits."""
    return (_LOCKED_ROLE if locked else 0) | ((os.getpid() & 0x7FFFFFFF) << 32) | secrets.randbits(32) | 1


def _reclaim_role(ring: Any, offset: int) -> bool:
    """Free a role whose holder is gone (crashed, or dropped its handle, without ``close``).

    Called only while this handle holds the role's lock: a holder id that says
    it keeps that lock (``_LOCKED_ROLE``) then belongs to a holder the kernel
    has already let go of. Ids without the marker (one-sided peers) can't be
    judged and keep their role (``RoleTaken`` stands)."""
    holder = int(lib.gf_load_acquire_at(ring, offset))
    if not holder & _LOCKED_ROLE:
        return False
    if int(lib.gf_cas_at(ring, offset, holder, 0)) != holder:
        return False
    log.warning("took over a queue role whose holder (pid %d, as it saw itself) is gone", (holder >> 32) & 0x7FFFFFFF)
    return True


STALL_GRACE = 2.0  # seconds a multi-threaded consumer's stall must last before HeldItemsStall


def _stall_message(held: int) -> str:
    return (
        f"the queue is empty and the producer waits for space that {held} unreleased items/batches of this "
        "consumer pin (arrays made from them pin it too): release them, or drop the arrays, before waiting for more"
    )


def _deadline(timeout: Any) -> float | None:
    """A blocking call's deadline on the monotonic clock (None: wait forever)."""
    if timeout is None:
        return None
    if type(timeout) is not float and (not isinstance(timeout, numbers.Real) or isinstance(timeout, bool)):
        raise E.FabricTypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    try:
        t = float(timeout)
    except OverflowError:
        raise E.FabricValueError("timeout is too large: use None to wait forever") from None
    if math.isnan(t) or t < 0:
        raise E.FabricValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    if t > 1e9:  # over 30 years: the same as forever, and keeps the deadline arithmetic finite
        return None
    return time.monotonic() + t


_NO_PREFETCH: Iterator[Any] = iter(())

_bind_item(E.FabricValueError, E.Corrupted)
if _ITEM_ABI != lib.gf_native_abi():  # pragma: no cover - only on a stale build
    raise ImportError(
        f"stale grafos_fabric._item build (native ABI {_ITEM_ABI}, _native has {lib.gf_native_abi()}): "
        "reinstall with `pip install -e .`"
    )

# Every live handle, so a child after fork() can mark the ones it inherited.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for q in list(_LIVE):
        try:
            q._after_fork_in_child()
        except Exception as exc:  # a fork hook must never raise
            log.debug("could not mark an inherited queue handle: %s", exc)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
