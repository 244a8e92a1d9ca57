"""The one-sided handle's state: local buffers, header words and seal/epoch over one-sided ops.

Base of the one-sided producer and consumer (``_onesided_push``,
``_onesided``; the protocol is described in ``_onesided``'s docstring). Here:
the protocol's constants (header offsets, CAS retry bound, the sequence
limit), the consumer's C state wrapper, the registered local buffers, the
header reads and the bounded CAS loops of ``seal``, ``set_acked`` and
``advance_epoch``."""

from __future__ import annotations

import collections
import logging
import mmap
import threading
import weakref
from typing import Any

import numpy as np

from .. import errors as E
from .._ffi import ffi, lib
from ..backoff import Backoff
from ..drivers.base import Fabric, Region
from ..locator import QueueLocator
from ._items import Item
from ._layout import RING_HEADER, _check_int, _dtype_from_str
from ._mapped import FabricQueue

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
_FIRST_SEQ = _hoff("first_seq")
_HEAD = _hoff("head")
_ACKED = _hoff("acked")
_SPACE_WAITERS = _hoff("space_waiters")  # a u64 of its own, 8-byte aligned: faa64 counts a waiter
_U64 = (1 << 64) - 1
_CAS_TRIES = 100_000  # a CAS loop that loses this many races in a row is fighting a writer outside the protocol

_SEALED = int(lib.GF_TAIL_SEALED)
_POS_MASK = int(lib.GF_TAIL_POS_MASK)
_ALIGN = int(lib.GF_RECORD_ALIGN)
_OK = int(lib.GF_OK)
_FULL = int(lib.GF_FULL)
_END = int(lib.GF_END)
_DONE = int(lib.GF_DONE)  # a CAS step of the core: the word already says it
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
    pointer to it (which does not by itself keep it alive: ``keep`` does), ``addr`` its address."""

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
        self.addr = int(ffi.cast("uintptr_t", self.ptr))
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


class _OneSidedHandle(FabricQueue):
    """A FabricQueue handle reached only with one-sided operations: state and header words."""

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
        self._zc: list[tuple[int, int, int]] = []  # the spans of records framed without a copy (_direct)
        # write-behind (set_write_behind): publications posted and not yet confirmed, oldest first
        # (token, the tail word expected, what), and the error that ended it
        self._wb = False
        self._wb_depth = 1  # write-behind: publications left unconfirmed when a push returns
        self._inflight: collections.deque[tuple[Any, int, str]] = collections.deque()
        self._wb_error: BaseException | None = None
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
            if lib.gf_ring_acked_step(cur, seq) == _DONE:
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
        desired = ffi.new("uint64_t *")  # the word the core computes for the CAS
        w = self.region.load64(_TAIL)
        if lib.gf_ring_seal_step(w, desired) == _DONE:  # sealed already
            return False
        self.region.store64(_SEAL_SEQ, seal_seq)
        for _ in range(_CAS_TRIES):
            found = self.region.cas64(_TAIL, w, int(desired[0]))  # SYNC POINT: ring-publish
            if found == w:
                return True
            w = found
            if lib.gf_ring_seal_step(w, desired) == _DONE:
                return False
        raise _cas_lost("sealing")

    def advance_epoch(self, new_epoch: int) -> None:
        """Move the queue's epoch forward (``cas64`` on the epoch, then on the tail
        word's tag): producers stamped older fail their next publish at the
        target. Raises ``StaleEpoch`` unless ``new_epoch`` is newer."""
        new_epoch = _check_int("epoch", new_epoch)
        self._check_handle()
        cur = self.region.load64(_EPOCH)
        for _ in range(_CAS_TRIES):
            if lib.gf_ring_epoch_step(cur, new_epoch) != _OK:
                raise E.StaleEpoch(epoch=new_epoch, current=cur)
            found = self.region.cas64(_EPOCH, cur, new_epoch)
            if found == cur:
                break
            cur = found
        else:
            raise _cas_lost("advancing the epoch")
        w = self.region.load64(_TAIL)
        for _ in range(_CAS_TRIES):
            found = self.region.cas64(_TAIL, w, int(lib.gf_ring_retag(w, new_epoch)))
            if found == w:
                return
            w = found
        raise _cas_lost("advancing the epoch")

    def rebase(self, first_seq: int, epoch: int) -> None:
        """As :meth:`FabricQueue.rebase`, with one-sided operations: the words are
        stored and flushed before the epoch's compare-and-swap."""
        first_seq = _check_int("first_seq", first_seq)
        epoch = _check_int("epoch", epoch)
        self._check_live()
        if not self.owner or self._p is not None:
            raise E.FabricValueError("only the creating handle rebases a queue, before its first push")
        r = self.region
        tail = r.load64(_TAIL)
        if tail & _SEALED:
            raise self._sealed_error("rebasing a sealed queue (it was fenced)")
        if tail & _POS_MASK or r.load64(_PRODUCER_ID) or r.load64(_HEAD):
            raise E.FabricValueError("rebasing a queue that was used: only a fresh queue is renumbered")
        cur = r.load64(_EPOCH)
        if epoch <= cur:
            raise E.StaleEpoch("rebasing a queue", epoch=epoch, current=cur)
        r.store64(_FIRST_SEQ, first_seq)
        r.store64(_NEXT_SEQ, first_seq)
        r.store64(_ACKED, first_seq)
        r.flush()
        self.advance_epoch(epoch)  # SYNC POINT: queue-rebase (the words above before the epoch)
        self.first_seq = first_seq
        self._epoch = epoch

    def reread_first_seq(self) -> int:
        """As :meth:`FabricQueue.reread_first_seq` (one ``load64``)."""
        self._check_handle()
        self.first_seq = self.region.load64(_FIRST_SEQ)
        return self.first_seq

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

    def _sealed_error(self, what: str) -> E.QueueSealed:
        return E.QueueSealed(f"queue is sealed: {what}", seal_seq=self.seal_seq)
