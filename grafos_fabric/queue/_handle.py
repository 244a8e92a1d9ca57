"""The mapped handle's state: attach checks, header words, seal and epoch, teardown hooks.

:class:`_QueueHandle` is the base of :class:`~grafos_fabric.queue.FabricQueue`
(and so of the one-sided handle): what every handle has whatever its role.
Also here: the registry through which ``FabricQueue`` hands out the one-sided
class for regions that don't map (``register_one_sided``), so that no mapped
module imports a one-sided one, and the fork hook that marks inherited
handles unusable in a child."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, TypeGuard

import numpy as np

from .. import errors as E
from .. import observe
from .._ffi import ffi, lib, raise_status
from .._item import Fast, PLock, QueueBase
from ..drivers.base import Fabric, MappedRegion, Region
from ..lease import NS, Lease
from ..locator import QueueLocator
from ._layout import (
    _ACKED_OFF,
    _EPOCH_MAX,
    _EPOCH_OFF,
    _NO_PREFETCH,
    _ONESIDED_OFF,
    _POLL_SLICE_NS,
    _POS_MASK,
    _SEAL_SEQ_OFF,
    _SEALED,
    _TAIL_OFF,
    _WAIT_SLICE_NS,
    OK,
    PREFETCH_ITEMS,
    RING_HEADER,
    _check_int,
    _dtype_from_str,
    _dtype_to_str,
    _item_info,
)
from ._protocols import QueueProtocols

log = logging.getLogger(__name__)

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


class _QueueHandle(QueueBase, QueueProtocols):
    """A mapped handle's state, header words and lifecycle checks (no role of its own)."""

    # set once the data area is known: (address, capacity, format, itemsize[, Releaser])
    _item_info: tuple[Any, ...] = (0, 0, b"B", 1)
    # the native single-item path (native/gf_item.c, Fast), or None: see _install_fast
    _fast: Any = None

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
        self._install_fast()

    def _install_fast(self) -> None:
        """``push``/``try_push``/``pop``/``try_pop``/``reserve`` are C methods
        (``_item.QueueBase``): with a ``Fast`` bound they are one native call each in
        the common case, and every other case runs ``_slow_push``/``_slow_try_push``/
        ``_slow_pop``/``_slow_try_pop``/``_slow_reserve``. Only on the native clock (the
        lease deadline is compared with it in C); without a Fast, every call takes the
        Python path."""
        if not self._native_clock:
            return
        fast = Fast(self.dtype is not None)
        self._fast = fast
        self._fast_bind(fast)

    def _init_handle_state(self) -> None:
        """Locks, role locks and lifecycle flags (shared with OneSidedQueue)."""
        # producer calls run one at a time (reentrant: a push inside reserve() gets
        # its typed error instead of a deadlock); consumer calls too (never held
        # while sleeping, nor by releases, which only take the native lock). PLock is
        # threading.RLock's rules in C: the native reservation takes it without a Python call
        self._plock = PLock()
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
        self._check_handle()
        if lib.gf_ring_set_acked(self._ring, seq) != OK:  # the core's step (gf_rc_acked_step), bounded in C
            raise E.Corrupted("setting acked: the word kept changing (lost compare-and-swaps without end)")

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

    def rebase(self, first_seq: int, epoch: int) -> None:
        """Renumber a fresh queue and advance its epoch (a standby made ahead of time, put to use).

        Only the handle that created the queue (``owner``), before any producer
        role was claimed on it and before anything was published: its items
        will be numbered from ``first_seq``, and its epoch becomes ``epoch``
        (this handle's pushes are stamped with it). The words are stored
        first and the epoch advanced last (a compare-and-swap, a full fence):
        a reader that sees the new epoch sees the new ``first_seq``
        (:meth:`reread_first_seq`). ``QueueSealed`` when the queue was sealed
        (fenced), ``StaleEpoch`` unless ``epoch`` is newer than the queue's,
        ``FabricValueError`` when the handle may not rebase it."""
        first_seq = _check_int("first_seq", first_seq, 0, _EPOCH_MAX)
        epoch = _check_int("epoch", epoch, 0, _EPOCH_MAX)
        self._check_open()
        self.lease.check()
        if not self.owner or self._prod is not None:
            raise E.FabricValueError("only the creating handle rebases a queue, before its first push")
        tail = int(lib.gf_load_acquire_at(self._ring, _TAIL_OFF))
        if tail & _SEALED:
            raise E.QueueSealed("rebasing a sealed queue (it was fenced)", seal_seq=self.seal_seq)
        hdr = self._hdr
        if tail & _POS_MASK or int(hdr.producer_id) or int(hdr.head):
            raise E.FabricValueError("rebasing a queue that was used: only a fresh queue is renumbered")
        if epoch <= self.epoch:
            raise E.StaleEpoch("rebasing a queue", epoch=epoch, current=self.epoch)
        hdr.first_seq = first_seq
        hdr.next_seq = first_seq
        hdr.acked = first_seq
        self.advance_epoch(epoch)  # SYNC POINT: queue-rebase (the words above before the epoch)
        self.first_seq = first_seq
        self._epoch = epoch

    def reread_first_seq(self) -> int:
        """Read ``first_seq`` from the header again (after its owner's :meth:`rebase`)
        and keep it as this handle's; call it after seeing the new epoch
        (SYNC POINT: queue-rebase). Untrusted like every header word: the consumer checks
        the sequence numbers of the records against it."""
        self._check_handle()
        self.first_seq = int(self._hdr.first_seq)
        return self.first_seq

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

    def _admit_producer(self, epoch: int, cur: int, holder: int, supported: bool, lock: Any) -> int:
        """The core's verdict on claiming the producer role (``gf_ring_claim_verdict``, the
        same for both paths) from the queue's epoch and the producer id word as loaded and
        what the role lock said: ``GF_CLAIM_TAKEOVER`` or ``GF_CLAIM_CAS``, or the typed
        error: ``StaleEpoch``; ``QueueSealed`` after fencing a live (or unprovable) holder,
        which may be mid-write, and sealing the queue; ``RoleTaken``."""
        state = lib.GF_LOCK_HELD if lock is not None else lib.GF_LOCK_BUSY if supported else lib.GF_LOCK_NONE
        rc = int(lib.gf_ring_claim_verdict(epoch, cur, holder, state))
        if rc == lib.GF_E_FENCED:
            raise E.StaleEpoch("claiming the producer role: fenced", epoch=epoch, current=cur)
        if rc == lib.GF_CLAIM_SEAL:
            self._fence_and_seal(epoch)  # never takes the role in place from a holder that may be writing
        if rc == lib.GF_E_ROLE:
            raise E.RoleTaken("a live producer holds this queue's producer role (claiming the producer role)")
        return rc

    def _raise(self, rc: int, what: str, epoch: int | None = None) -> None:
        observe.count("queue_errors", status=rc, op=what)
        if rc == lib.GF_E_ARG:
            self._check_open()  # a role closed under this call (close() from another thread)
        if rc == lib.GF_E_EXPIRED or rc == lib.GF_E_REVOKED:
            self.lease.check()  # the lease's own message (revoked vs expired vs freed)
        if rc == lib.GF_E_FENCED:
            raise E.StaleEpoch(f"{what}: fenced", epoch=self._epoch if epoch is None else epoch, current=self.epoch)
        raise_status(rc, what, seal_seq=self.seal_seq)

    def _slice(self, deadline: float | None) -> int:
        """How long one native wait may sleep: until the deadline, at most a slice."""
        cap = _POLL_SLICE_NS if lib.gf_load_acquire_at(self._ring, _ONESIDED_OFF) else _WAIT_SLICE_NS
        if deadline is None:
            return cap
        return min(cap, int((deadline - time.monotonic()) * NS))


# The one-sided handle (grafos_fabric.queue._onesided.OneSidedQueue) subclasses
# FabricQueue, which hands it out for regions that don't map. So that no mapped
# module imports it back (no import cycle), it registers itself here when it
# is imported, which importing ``grafos_fabric.queue`` (or any module of it) always does.
_ONE_SIDED: list[Any] = []


def register_one_sided(cls: Any) -> None:
    """Name the class FabricQueue uses for regions reached one-sided (called by
    grafos_fabric.queue._onesided at import)."""
    _ONE_SIDED[:] = [cls]


def _one_sided() -> Any:
    if not _ONE_SIDED:  # pragma: no cover - grafos_fabric/queue/__init__ imports _onesided first
        raise E.Unsupported("one-sided queues need grafos_fabric.queue._onesided (importing the package loads it)")
    return _ONE_SIDED[0]


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
