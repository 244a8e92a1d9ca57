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
pop; a second claimant gets :class:`~grafos_fabric.errors.RoleTaken`. A
producer stamped with an epoch older than the queue's is rejected at the
target (:class:`~grafos_fabric.errors.StaleEpoch`): the tail word it must
compare-and-swap to publish carries the epoch.
"""

from __future__ import annotations

import ast
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from . import _item, observe
from . import errors as E
from ._ffi import ffi, lib, raise_status
from ._item import Item
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
#: ``reserve(n)`` of at most this many bytes writes into a staging buffer that is
#: pushed on commit: below it, building a view of the ring costs more than the copy
#: (measured: see the README's performance notes). Larger reservations, and every
#: ``reserve_batch``, are views of the ring itself (zero-copy).
RESERVE_STAGE_MAX = 1024

OK = int(lib.GF_OK)
FULL = int(lib.GF_FULL)
EMPTY = int(lib.GF_EMPTY)
END = int(lib.GF_END)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dtype_to_str(dtype: np.dtype[Any]) -> str:
    if dtype.hasobject:
        raise E.DtypeMismatch(f"dtype {dtype} holds Python objects: only plain data can live in shared memory")
    descr = np.lib.format.dtype_to_descr(dtype)
    text = descr if isinstance(descr, str) else repr(descr)
    if len(text.encode()) > int(lib.GF_DTYPE_MAX):
        raise E.FabricValueError(f"dtype description too long for the ring header: {text[:40]}...")
    return text


def _dtype_from_str(text: str) -> np.dtype[Any] | None:
    if not text:
        return None
    try:
        descr: Any = text if not text.startswith("[") else ast.literal_eval(text)  # literals only: no code runs
        return np.lib.format.descr_to_dtype(descr)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise E.Corrupted(f"bad dtype in queue header: {text!r}") from exc


def _ring_geometry(
    capacity: Any, max_item: Any, epoch: Any, first_seq: Any, dtype: Any
) -> tuple[int, int, np.dtype[Any] | None, str]:
    """Validate ``create`` arguments: ``(capacity rounded up, max_item, dtype, dtype text)``.

    Shared by the mapped and the one-sided ``create`` so both build the same ring."""
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise E.FabricValueError(f"capacity must be an int number of bytes, got {capacity!r}")
    if capacity <= 0 or capacity > MAX_CAPACITY:
        raise E.FabricValueError(f"capacity must be in (0, {MAX_CAPACITY}] bytes, got {capacity}")
    cap = max(MIN_CAPACITY, _next_pow2(capacity))
    biggest = cap // 2 - RECORD_HEADER
    if max_item is None:
        max_item = biggest
    elif not isinstance(max_item, int) or isinstance(max_item, bool) or not 0 < max_item <= biggest:
        raise E.FabricValueError(f"max_item must be an int in (0, {biggest}] for a {cap}-byte ring")
    if not isinstance(epoch, int) or epoch < 0 or not isinstance(first_seq, int) or first_seq < 0:
        raise E.FabricValueError("epoch and first_seq must be non-negative ints")
    dt = None if dtype is None else np.dtype(dtype)
    dtext = "" if dt is None else _dtype_to_str(dt)
    if dt is not None and max_item < dt.itemsize:
        raise E.FabricValueError(f"max_item {max_item} is smaller than one {dt} element")
    return cap, max_item, dt, dtext


def _addr(ptr: Any) -> int:
    return int(ffi.cast("uintptr_t", ptr))


def _finish_array(arr: np.ndarray[Any, Any], dtype: Any, copy: Any) -> np.ndarray[Any, Any]:
    """``Item.__array__(dtype, copy)`` past the zero-copy view (called from ``_item``)."""
    if dtype is not None and np.dtype(dtype) != arr.dtype:
        return arr.astype(dtype)
    return arr.copy() if copy else arr


def _buffer_format(dtype: np.dtype[Any] | None) -> bytes | None:
    """The PEP 3118 format items of this dtype export (``memoryview(item).format``),
    or None when the dtype has none numpy reads back as itself (items then still
    convert with ``np.asarray``, through ``__array__``)."""
    if dtype is None:
        return b"B"
    try:
        probe: Any = np.empty(1, dtype)
        fmt = memoryview(probe).format
        back = np.asarray(memoryview(probe))
    except (ValueError, TypeError, BufferError, NotImplementedError):
        return None
    return fmt.encode("ascii") if back.dtype == dtype else None


def _rows_view(ring: np.ndarray[Any, Any], off: int, rows: int, length: int, stride: int, dtype: Any) -> Any:
    """The writable ``(rows, length)`` view of reserved rows (called from ``_item``)."""
    arr = np.lib.stride_tricks.as_strided(ring[off:], shape=(rows, length), strides=(stride, 1))
    return arr if dtype is None else arr.view(dtype)


if _item.GF_NATIVE_ABI != lib.gf_native_abi():  # pragma: no cover - only on a stale build
    raise ImportError("stale grafos_fabric._item build (native ABI differs): reinstall grafos-fabric")
_ENTRY_POINTS = (
    "gf_pop_batch", "gf_release", "gf_push", "gf_consumer_outstanding", "gf_reserve", "gf_commit", "gf_abort",
    "gf_reserve_rows", "gf_commit_rows", "gf_record_size",
)
_item.bind(
    {name: _addr(ffi.addressof(lib, name)) for name in _ENTRY_POINTS},
    np.frombuffer,
    E.FabricValueError,
    _finish_array,
    _rows_view,
    E.Corrupted,
)

# One popped item (a C type, ``grafos_fabric._item``): ``item.seq``, ``len(item)``,
# and the payload through the buffer protocol, read-only and zero-copy:
# ``memoryview(item)``, ``np.asarray(item)`` / ``item.array()`` (uint8, or the
# queue's dtype), ``np.frombuffer(item, dt)``; ``bytes(item)`` / ``item.tobytes()``
# copy. ``item.release()`` (or ``with item:``) lets it go; its ring space is reused
# once it is released (or garbage) and every view made from it is gone.


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
        dt = self._q.dtype if self._q is not None else None
        return arr if dt is None else arr.view(dt)

    def __getitem__(self, i: int) -> Item:
        self._check()
        n = len(self._offsets)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("batch index out of range")
        q = self._q
        assert q is not None
        return q._item_core().batch_item(self, int(self._offsets[i]), int(self.lengths[i]), int(self.seqs[i]),
                                         _addr(q._data))

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
        dt = self._q.dtype if self._q is not None else None
        return arr if dt is None else arr.view(dt)

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


class FabricQueue(QueueProtocols):
    """A bounded single-producer single-consumer queue in a leased region.

    Create with :meth:`create` (allocates and leases the region) or attach with
    :meth:`attach` (from a :class:`QueueLocator`, e.g. in another process).
    """

    # the single-item hot path (grafos_fabric._item), made with the roles
    _fc: Any = None  # consumer: prefetch + item factory
    _fp: Any = None  # producer: one native call per push
    _icore: Any = None  # item factory of a handle without a native consumer (one-sided)
    _item_type: Any = Item

    def __init__(self, fabric: Fabric, region: Region, *, owner: bool, epoch: int | None = None) -> None:
        self.fabric = fabric
        self.region = region
        self.lease: Lease = region.lease
        self.owner = owner
        self._clock = fabric.clock
        self._native_clock = bool(getattr(fabric.clock, "native", False))
        if not region.mapped or not isinstance(region, MappedRegion):
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
        self._epoch = epoch
        self._prod: Any = None
        self._cons: Any = None
        self._pend: tuple[Any, Any] | None = None  # keeps the consumer's token arrays alive
        self._seq_out = ffi.new("uint64_t *")
        self._prefetch_bytes = max(4096, self.capacity // 8)
        self._fmt = _buffer_format(self.dtype)
        self._take_over = False
        self.closed = False

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
            from .onesided import OneSidedQueue

            return OneSidedQueue.create(
                fabric, capacity, ttl, dtype=dtype, max_item=max_item, epoch=epoch, first_seq=first_seq
            )
        cap, max_item, _dt, dtext = _ring_geometry(capacity, max_item, epoch, first_seq, dtype)
        ttl = check_ttl(ttl)
        region = fabric.alloc(RING_HEADER + cap, ttl)
        if not isinstance(region, MappedRegion):
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

        ``take_over=True`` lets this handle claim a role whose holder process
        died without closing (checked by pid, on this host): a consumer then
        resumes at ``head``, so what the dead one popped but never released
        comes again. Without it such a role stays taken (``RoleTaken``)."""
        if not isinstance(locator, QueueLocator):
            locator = QueueLocator.from_bytes(locator)
        region = fabric.attach(locator.region, mapped=mapped)
        if not region.mapped:
            from .onesided import OneSidedQueue

            return OneSidedQueue(fabric, region, locator, epoch=epoch)
        q = cls(fabric, region, owner=False, epoch=epoch)
        q._take_over = take_over
        if q.capacity != locator.capacity or q.max_item != locator.max_item:
            raise E.Corrupted("the queue at this locator has another geometry: the locator is stale or foreign")
        return q

    def locator(self) -> QueueLocator:
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
        return int(lib.gf_load_acquire_at(self._ring, _EPOCH_OFF))

    @property
    def sealed(self) -> bool:
        return bool(lib.gf_load_acquire_at(self._ring, _TAIL_OFF) & _SEALED)

    @property
    def seal_seq(self) -> int:
        return int(lib.gf_load_acquire_at(self._ring, _SEAL_SEQ_OFF))

    @property
    def acked(self) -> int:
        """The consumer's durable commit: every sequence below it is processed."""
        return int(lib.gf_load_acquire_at(self._ring, _ACKED_OFF))

    def set_acked(self, seq: int) -> None:
        """Publish that every item with sequence < ``seq`` is durably processed.

        ``acked`` only grows (a smaller value is ignored)."""
        cur = self.acked
        while seq > cur:
            found = int(lib.gf_cas_at(self._ring, _ACKED_OFF, cur, seq))
            if found == cur:
                return
            cur = found

    def seal(self, seal_seq: int = 0) -> bool:
        """Seal the queue: no push succeeds afterwards; the consumer drains what
        was published, then gets ``QueueSealed``. Returns False if already sealed."""
        return int(lib.gf_ring_seal(self._ring, seal_seq)) == OK

    def advance_epoch(self, new_epoch: int) -> None:
        """Move the queue's epoch forward: producers stamped older are fenced at
        their next publish. Raises ``StaleEpoch`` unless ``new_epoch`` is newer."""
        rc = lib.gf_ring_advance_epoch(self._ring, new_epoch)
        if rc != OK:
            raise E.StaleEpoch(epoch=new_epoch, current=self.epoch)

    def stats(self) -> dict[str, int | bool]:
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

    def _check_open(self) -> None:
        if self.closed:
            raise E.QueueClosed("queue is closed")

    def _producer(self) -> Any:
        p = self._prod
        if p is not None:
            return p
        self._check_open()
        self.lease.check()
        p = ffi.new("gf_producer *")
        epoch = self.epoch if self._epoch is None else self._epoch
        role_id = _role_id()
        args = (p, self._ring, self.region.nbytes, self._lease_ptrs[0], self._lease_ptrs[1], epoch, role_id)
        rc = lib.gf_producer_init(*args)
        if rc == lib.GF_E_ROLE and self._take_over and _reclaim_role(self._ring, _PRODUCER_ID_OFF):
            rc = lib.gf_producer_init(*args)
        if rc != OK:
            self._raise(rc, "claiming the producer role", epoch=epoch)
        self._epoch = epoch
        self._prod = p
        self._fp = _item.Producer(
            queue=self,
            keep=p,
            producer=_addr(p),
            clock=None if self._native_clock else self._clock.now_ns,
            validate=self._push_buffer,
            on_error=self._push_error,
            typed=self.dtype is not None,
        )
        return p

    def _consumer(self) -> Any:
        c = self._cons
        if c is not None:
            return c
        self._check_open()
        self.lease.check()
        cap = min(1 << 20, max(64, _next_pow2(self.capacity // 32)))
        pend_end = ffi.new("uint64_t[]", cap)
        pend_done = ffi.new("uint8_t[]", cap)
        c = ffi.new("gf_consumer *")
        role_id = _role_id()
        lease_state, lease_deadline = self._lease_ptrs
        args = (c, self._ring, self.region.nbytes, lease_state, lease_deadline, role_id, pend_end, pend_done, cap)
        rc = lib.gf_consumer_init(*args)
        if rc == lib.GF_E_ROLE and self._take_over and _reclaim_role(self._ring, _CONSUMER_ID_OFF):
            rc = lib.gf_consumer_init(*args)
        if rc != OK:
            self._raise(rc, "claiming the consumer role")
        self._pend = (pend_end, pend_done)
        self._cons = c
        lease_state, lease_deadline = self._lease_ptrs
        self._fc = _item.Consumer(
            queue=self,
            keep=(c, pend_end, pend_done),
            consumer=_addr(c),
            release_cb=None,
            on_error=self._pop_error,
            on_lease=self.lease.check,
            on_closed=self._maybe_give_back_consumer,
            clock=None if self._native_clock else self._clock.now_ns,
            dtype=_U8 if self.dtype is None else self.dtype,
            fmt=self._fmt,
            item_type=Item,
            data=_addr(self._data),
            lease_state=_addr(lease_state),
            lease_deadline=_addr(lease_deadline),
            prefetch_bytes=self._prefetch_bytes,
        )
        return c

    def _item_core(self) -> Any:
        """What makes this handle's items (the consumer core once the role is claimed)."""
        core = self._fc or self._icore
        if core is None:
            core = self._icore = _item.Consumer(
                queue=self,
                keep=None,
                consumer=0,
                release_cb=self._release_token,
                on_error=self._pop_error,
                on_lease=self.lease.check,
                on_closed=None,
                clock=None,
                dtype=_U8 if self.dtype is None else self.dtype,
                fmt=_buffer_format(self.dtype),
                item_type=self._item_type,
                data=0,
                lease_state=0,
                lease_deadline=0,
                prefetch_bytes=0,
            )
        return core

    def _pop_error(self, rc: int) -> None:
        """A native pop's failure, raised as its typed error (called from ``_item``)."""
        if rc == END:
            raise E.QueueSealed("queue is sealed and drained", seal_seq=self.seal_seq)
        self._raise(rc, "pop")

    def _raise(self, rc: int, what: str, epoch: int | None = None) -> None:
        observe.count("queue_errors", status=rc, op=what)
        if rc == lib.GF_E_EXPIRED or rc == lib.GF_E_REVOKED:
            self.lease.check()  # the lease's own message (revoked vs expired vs freed)
        if rc == lib.GF_E_FENCED:
            raise E.StaleEpoch(f"{what}: fenced", epoch=self._epoch if epoch is None else epoch, current=self.epoch)
        raise_status(rc, what, seal_seq=self.seal_seq)

    # -- producing -------------------------------------------------------------------
    def _as_item(self, buf: Any) -> Any:
        """Validate one item; returns what the C call takes (bytes or a cdata)."""
        dt = self.dtype
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
        except (TypeError, BufferError, ValueError) as exc:
            raise E.DtypeMismatch(f"item must be bytes-like and contiguous: {exc}") from None

    def try_push(self, buf: Any) -> bool:
        """Push one item; False when the ring is full (never waits)."""
        fp = self._fp
        return (fp.try_push(buf) if fp is not None else self._push1(buf)) is not None

    def _push_buffer(self, buf: Any) -> Any:
        """Validate one item for the native push (called from ``_item`` for
        anything but plain bytes): a contiguous buffer of the queue's dtype."""
        dt = self.dtype
        if dt is not None:
            if not isinstance(buf, np.ndarray):
                raise E.DtypeMismatch(f"this queue carries {dt} arrays; got {type(buf).__name__}")
            if buf.dtype != dt:
                raise E.DtypeMismatch(f"this queue carries {dt} arrays; got {buf.dtype}")
        if isinstance(buf, np.ndarray):
            if not buf.flags.c_contiguous:
                raise E.DtypeMismatch("array is not C-contiguous: pass np.ascontiguousarray(a)")
            if buf.dtype.hasobject:
                raise E.DtypeMismatch("arrays of Python objects cannot be pushed")
            return buf
        try:
            mv = memoryview(buf)
        except TypeError as exc:
            raise E.DtypeMismatch(f"item must be bytes-like and contiguous: {exc}") from None
        if not mv.c_contiguous:
            raise E.DtypeMismatch("item must be bytes-like and contiguous: this buffer is not")
        return mv

    def _push_error(self, rc: int, n: int, buf: Any = None) -> None:
        """A native push's failure, raised as its typed error (called from ``_item``)."""
        if rc == lib.GF_E_TOO_LARGE:
            raise E.ItemTooLarge(f"item of {n} bytes exceeds the queue's max_item of {self.max_item}")
        if rc == lib.GF_E_ARG and n == 0:
            raise E.FabricValueError("empty items are not allowed")
        self._raise(rc, "push")

    def _push1(self, buf: Any) -> int | None:
        fp = self._fp
        if fp is None:
            self._producer()
            fp = self._fp
        return fp.try_push(buf)

    def push(self, buf: Any, timeout: float | None = None) -> int:
        """Push one item, waiting for space; returns its sequence number.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first."""
        fp = self._fp
        seq = fp.try_push(buf) if fp is not None else self._push1(buf)
        if seq is not None:
            return seq
        deadline = _deadline(timeout)
        n = len(self._as_item(buf))
        while True:
            self._wait_space(n, deadline)
            seq = self._push1(buf)
            if seq is not None:
                return seq

    def _wait_space(self, nbytes: int, deadline: float | None) -> None:
        p = self._prod or self._producer()
        slice_ns = self._slice(deadline)
        if slice_ns <= 0:
            raise TimeoutError("timed out waiting for space in the queue")
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
        ``TimeoutError.args[1]`` holds that count).
        """
        p = self._prod or self._producer()
        pushed = ffi.new("uint64_t *")
        deadline = _deadline(timeout)
        if isinstance(bufs, np.ndarray):
            return self._push_rows(p, bufs, pushed, deadline, timeout)
        items = [self._as_item(b) for b in bufs]
        if not items:
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
        done = 0
        offset = 0
        total = len(items)
        while done < total:
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

    def _push_rows(
        self, p: Any, arr: np.ndarray[Any, Any], pushed: Any, deadline: float | None, timeout: float | None
    ) -> int:
        n, length = self._check_rows(arr)
        if n == 0:
            return 0
        stride = arr.strides[0]
        base = ffi.cast("uint8_t *", arr.ctypes.data)
        done = 0
        while done < n:
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

    def _reservation(self) -> Any:
        """This handle's reusable reservation (made on first use)."""
        res = self._res
        if res is None:
            if self._fp is None:
                self._producer()
            region: Any = self.region
            whole = region.view() if hasattr(region, "view") else ffi.buffer(self._ring, RING_HEADER + self.capacity)
            ring = np.frombuffer(whole, dtype=np.uint8)[RING_HEADER : RING_HEADER + self.capacity]
            stage = np.empty(min(RESERVE_STAGE_MAX, self.max_item), dtype=np.uint8)
            res = self._res = _item.Reservation(
                producer=self._fp,
                queue=self,
                ring=ring,
                dtype=self.dtype,
                slow_enter=self._reserve_slow,
                bad_arm=self._bad_reserve,
                stage=stage,
                slow_push=self._push_staged_slow,
                max_item=self.max_item,
                itemsize=1 if self.dtype is None else self.dtype.itemsize,
            )
            self._stage = stage
        return res

    def _bad_reserve(self, nbytes: Any, rows: Any, timeout: Any) -> None:
        """Raise the typed error for bad ``reserve`` arguments (called from ``_item``)."""
        if type(nbytes) is not int or nbytes <= 0:
            raise E.FabricValueError(f"reserve needs a positive int size, got {nbytes!r}")
        if type(rows) is not int or rows < 0:
            raise E.FabricValueError(f"reserve_batch needs a positive int number of rows, got {rows!r}")
        if nbytes > self.max_item:
            raise E.ItemTooLarge(f"reservation of {nbytes} bytes exceeds the queue's max_item of {self.max_item}")
        if self.dtype is not None and nbytes % self.dtype.itemsize:
            raise E.DtypeMismatch(f"reservation must be a multiple of {self.dtype.itemsize} bytes for {self.dtype}")
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise E.FabricValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        raise E.FabricValueError(f"bad reservation ({nbytes!r}, {rows!r})")

    def _push_staged_slow(self, nbytes: int, timeout: float | None) -> int:
        """Commit of a staged (small) reservation when the ring was full: wait, then push it."""
        p = self._prod or self._producer()
        deadline = _deadline(timeout)
        src = ffi.from_buffer(self._stage)
        seq = ffi.new("uint64_t *")
        while True:
            self._wait_space(nbytes, deadline)
            rc = lib.gf_push(p, src, nbytes, self._now(), seq)
            if rc == OK:
                return int(seq[0])
            if rc != FULL:
                self._push_error(rc, nbytes)

    def reserve(self, nbytes: int, timeout: float | None = None) -> AbstractContextManager[np.ndarray[Any, Any]]:
        """Zero-copy production: write the item in place, published on exit.

        ``with q.reserve(n) as buf: buf[:] = ...`` (or ``np.add(a, b, out=buf)``):
        ``buf`` is a writable view of the ring (uint8, or the queue's dtype).
        Leaving the block normally commits the item; an exception aborts it
        (nothing is published). Call ``q.commit_len(k)`` inside the block to
        publish only the first ``k`` bytes. The reservation object is reused by
        every ``reserve`` of this handle (one is open at a time); don't write to
        ``buf`` after the block: the item is published then. Items of at most
        ``RESERVE_STAGE_MAX`` bytes are written to a staging buffer and copied in
        on commit (cheaper than a view of the ring at that size); larger ones are
        written in the ring itself.
        """
        return (self._res or self._reservation()).arm(nbytes, 0, timeout)

    def reserve_batch(
        self, n: int, size: int, timeout: float | None = None
    ) -> AbstractContextManager[np.ndarray[Any, Any]]:
        """Zero-copy production of up to ``n`` items of ``size`` bytes at once.

        ``with q.reserve_batch(n, size) as rows: np.add(a, b, out=rows)``: ``rows``
        is a writable ``(k, size)`` view (``(k, size // itemsize)`` of the queue's
        dtype) of ``k`` contiguous records, ``1 <= k <= n``: it stops at the ring's
        wrap point and at what fits now (check ``len(rows)``). Leaving the block
        publishes the ``k`` items with one native call; an exception publishes
        none; ``q.commit_rows(j)`` inside the block publishes only the first ``j``.
        """
        if type(n) is not int or n <= 0:
            raise E.FabricValueError(f"reserve_batch needs a positive int number of rows, got {n!r}")
        return (self._res or self._reservation()).arm(size, n, timeout)

    def _reserve_slow(self, nbytes: int, rows: int, timeout: float | None) -> tuple[int, int]:
        """Wait for room for a reservation, then take it: ``(payload offset, rows)``."""
        p = self._prod or self._producer()
        deadline = _deadline(timeout)
        off = ffi.new("uint64_t *")
        got = ffi.new("uint64_t *")
        while True:
            self._wait_space(nbytes, deadline)
            if rows:
                rc = lib.gf_reserve_rows(p, rows, nbytes, self._now(), off, got)
            else:
                rc = lib.gf_reserve(p, nbytes, self._now(), off)
                got[0] = 1
            if rc == OK:
                return int(off[0]), int(got[0])
            if rc != FULL:
                self._push_error(rc, nbytes)

    _res: Any = None
    _stage: Any = None
    last_seq = -1

    def commit_len(self, nbytes: int) -> None:
        """Inside ``reserve()``: publish only the first ``nbytes`` bytes."""
        res = self._res
        if res is None or not res.active or res.batch:
            raise E.FabricValueError("commit_len is for inside a `with q.reserve(n)` block")
        res.set_commit(nbytes)

    def commit_rows(self, k: int) -> None:
        """Inside ``reserve_batch()``: publish only the first ``k`` rows."""
        res = self._res
        if res is None or not res.active or not res.batch:
            raise E.FabricValueError("commit_rows is for inside a `with q.reserve_batch(n, size)` block")
        res.set_commit(k)

    # -- consuming -------------------------------------------------------------------
    def try_pop(self) -> Item | None:
        """Pop one item, or None when the queue is empty (never waits).

        Raises ``QueueSealed`` once a sealed queue is drained.

        Single pops are served from a *prefetch* (in C, ``grafos_fabric._item``):
        one native call takes the published records up to ``PREFETCH_ITEMS`` (and
        an eighth of the ring), each with a release token of its own, and the
        following pops hand them out one by one after a lease check, without
        touching the producer's cache lines. The prefetch state changes only
        with the GIL held, so threads sharing a handle never see it half-updated."""
        fc = self._fc
        if fc is None:
            self._consumer()
            fc = self._fc
        return fc.try_pop()

    def pop(self, timeout: float | None = None) -> Item:
        """Pop one item, waiting for it; ``TimeoutError`` when ``timeout`` passes."""
        fc = self._fc
        item = fc.try_pop() if fc is not None else self.try_pop()
        if item is not None:
            return item
        deadline = _deadline(timeout)
        while True:
            self._wait_data(deadline)
            item = self.try_pop()
            if item is not None:
                return item

    def _wait_data(self, deadline: float | None) -> None:
        c = self._cons or self._consumer()
        if lib.gf_consumer_outstanding(c) and lib.gf_load_acquire_at(self._ring, _SPACE_WAITERS_OFF) & 0xFFFFFFFF:
            raise E.HeldItemsStall(
                f"the queue is empty and the producer waits for space that {int(lib.gf_consumer_outstanding(c))} "
                "unreleased items/batches of this consumer pin (arrays made from them pin it too): "
                "release them, or drop the arrays, before waiting for more"
            )
        slice_ns = self._slice(deadline)
        if slice_ns <= 0:
            raise TimeoutError("timed out waiting for an item")
        rc = lib.gf_wait_data(c, slice_ns, _SPIN)
        if rc < 0:
            self._raise(rc, "waiting for data")
        # the lease is checked by the next native pop itself

    def _wait_readable(self, deadline: float | None) -> None:
        """Wait (GIL released) until data may be there, for the asyncio worker."""
        self._wait_data(deadline)

    def _wait_writable(self, nbytes: int, deadline: float | None) -> None:
        """Wait (GIL released) until ``nbytes`` may fit, for the asyncio worker."""
        self._wait_space(nbytes, deadline)

    def pop_batch(self, max_items: int, timeout: float | None = None) -> Batch:
        """Pop up to ``max_items`` items with one native call.

        Waits until at least one item is there (``timeout=0``: returns an empty
        batch at once; ``timeout>0``: ``TimeoutError`` when it passes). A batch
        stops at the ring's wrap point, so it may hold fewer items than are
        queued; its payloads are contiguous.
        """
        if not isinstance(max_items, int) or max_items <= 0:
            raise E.FabricValueError(f"max_items must be a positive int, got {max_items!r}")
        if self._fc is not None and self._fc.prefetched():
            return self._batch_from_prefetch(max_items)
        c = self._cons or self._consumer()
        deadline = _deadline(timeout)
        offs = np.empty(max_items, dtype=np.uint64)
        lens = np.empty(max_items, dtype=np.uint64)
        seqs = np.empty(max_items, dtype=np.uint64)
        po = ffi.from_buffer("uint64_t[]", offs)
        pl = ffi.from_buffer("uint64_t[]", lens)
        ps = ffi.from_buffer("uint64_t[]", seqs)
        outs = ffi.new("uint64_t[3]")
        while True:
            rc = lib.gf_pop_batch(c, max_items, _NO_BYTE_LIMIT, 0, self._now(), po, pl, ps, outs, outs + 1, outs + 2)
            if rc == OK:
                n = int(outs[0])
                return Batch(self, outs[1], offs[:n], lens[:n], seqs[:n], outs[2])
            if rc == END:
                raise E.QueueSealed("queue is sealed and drained", seal_seq=self.seal_seq)
            if rc != EMPTY:
                self._raise(rc, "pop_batch")
            if timeout == 0:
                return Batch.empty()
            self._wait_data(deadline)

    def _batch_from_prefetch(self, max_items: int) -> Batch:
        """Items prefetched by single pops go out first, in order, as a batch
        that carries their (consecutive) release tokens."""
        self.lease.check()
        got = self._fc.take_prefetched(max_items)
        if got is None:
            return Batch.empty()
        token, offs_l, lens_l, seqs_l = got
        offs = np.array(offs_l, dtype=np.uint64)
        lens = np.array(lens_l, dtype=np.uint64)
        seqs = np.array(seqs_l, dtype=np.uint64)
        uniform = int(lens[0]) if bool((lens == lens[0]).all()) else 0
        return Batch(self, token, offs, lens, seqs, uniform, ntokens=len(offs))

    def _release_token(self, token: int) -> None:
        c = self._cons
        if c is not None:
            lib.gf_release(c, token)
            if self.closed:
                self._maybe_give_back_consumer()

    @property
    def outstanding(self) -> int:
        """Items and batches popped here and not yet released."""
        c = self._cons
        return 0 if c is None else int(lib.gf_consumer_outstanding(c))

    def _slice(self, deadline: float | None) -> int:
        """How long one native wait may sleep: until the deadline, at most a slice."""
        cap = _POLL_SLICE_NS if lib.gf_load_acquire_at(self._ring, _ONESIDED_OFF) else _WAIT_SLICE_NS
        if deadline is None:
            return cap
        return min(cap, int((deadline - time.monotonic()) * NS))

    # -- teardown --------------------------------------------------------------------
    def close(self) -> None:
        """Give up this handle's roles (idempotent): the producer role at once,
        the consumer role when nothing popped here is still unreleased (else it
        stays with this handle, whose items keep releasing into it). Views of
        popped items stay readable; the region stays leased until its lease is
        freed or expires."""
        if self.closed:
            return
        self.closed = True
        if self._fc is not None:
            self._fc.closed = 1
        self._aio_shutdown()
        if self._prod is not None:
            lib.gf_producer_close(self._prod)
        self._maybe_give_back_consumer()

    def _maybe_give_back_consumer(self) -> None:
        """After close: give the consumer role back once no item handed out here
        is unreleased. Items prefetched but never handed out stay unreleased, so
        ``head`` stays before them and the next consumer reads them again."""
        c = self._cons
        fc = self._fc
        prefetched = 0 if fc is None else fc.prefetched()
        if c is not None and self.closed and lib.gf_consumer_outstanding(c) == prefetched:
            lib.gf_consumer_close(c)
            if fc is not None:
                fc.drop_prefetched()

    def free(self) -> None:
        """Close and give the region back to the fabric now."""
        self.close()
        self.lease.free()

    def __enter__(self) -> FabricQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FabricQueue {self.region.ref().name} capacity={self.capacity} epoch={self.epoch}>"


_PRODUCER_ID_OFF = int(ffi.offsetof("gf_ring_header", "producer_id"))
_CONSUMER_ID_OFF = int(ffi.offsetof("gf_ring_header", "consumer_id"))


_PID_ROLE = 1 << 63  # marks an id that carries its holder's pid (one-sided ids never do)


def _role_id() -> int:
    """A producer/consumer id: marker bit, the holder's pid in bits 62..32, random low bits."""
    return _PID_ROLE | ((os.getpid() & 0x7FFFFFFF) << 32) | secrets.randbits(32) | 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it's just not ours
    return True


def _reclaim_role(ring: Any, offset: int) -> bool:
    """Free a role whose holder process is gone (crashed without ``close``).

    The id's pid is checked on this host, which is where a mapped queue's other
    processes live. A live holder keeps its role (``RoleTaken`` stands)."""
    holder = int(lib.gf_load_acquire_at(ring, offset))
    pid = (holder >> 32) & 0x7FFFFFFF
    if not holder & _PID_ROLE or pid == 0 or pid == os.getpid() or _pid_alive(pid):
        return False
    if int(lib.gf_cas_at(ring, offset, holder, 0)) != holder:
        return False
    log.warning("took over a queue role whose holder (pid %d) is gone", pid)
    return True


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise E.FabricValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    return time.monotonic() + timeout
