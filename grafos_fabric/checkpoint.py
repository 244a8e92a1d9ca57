"""Durable stage checkpoints: ``(state, input_offset, output_commit)`` on a block lease.

A :class:`CheckpointedStageState` keeps a stage's own ``state`` and its
:class:`EdgeCheckpoint`; ``checkpoint()`` writes both to the block lease and is
durable when it returns; ``CheckpointedStageState.restore(block_lease)`` reads
the newest valid checkpoint back, or raises (``NoRecord`` when none was ever
written, ``Corrupted`` when every slot is damaged, ``VersionMismatch`` for an
unknown format). It never hands out a default.

On the block lease a checkpoint is a ``PCHK`` record in the two-slot format of
:mod:`grafos_fabric.slots` (grafOS ``PCHK`` header fields, plus slot sequence
and CRC32C; a torn write falls back to the previous checkpoint). The record's
data is this envelope, then the state bytes::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  codec (u8)   |   flags (u8)  |        stage_len (u16)        |  0
    +---------------------------------------------------------------+
    |                        pad_len (u32)                          |  4
    +---------------------------------------------------------------+
    |                  input_offset (u64)                           |  8
    +                                                               +
    |                                                               | 12
    +---------------------------------------------------------------+
    |                  output_commit (u64)                          | 16
    +                                                               +
    |                                                               | 20
    +---------------------------------------------------------------+
    |        stage name (UTF-8, stage_len bytes), then pad_len      | 24
    |        zero bytes, then the state (msgpack via msgspec for    |
    |        codec 1, raw bytes for 2)                              |
    +---------------------------------------------------------------+

Little-endian. ``flags`` and ``pad_len`` are 0 in a ``PCHK`` version 3 record
(a reader of version 3 ignores both bytes, as older builds did). Version 4 is
a checkpoint of a state kept in an aligned buffer
(:meth:`CheckpointedStageState.with_buffer`): ``flags`` bit 0 (``ALIGNED``) is
set, and ``pad_len`` zero bytes put the state at a block boundary of the slot
(the slot header is 64 bytes, so ``64 + 24 + stage_len + pad_len`` is a
multiple of the block size), where ``O_DIRECT`` can write it from the buffer
itself; a reader refuses other flags, a ``pad_len`` that runs past the data,
and pad bytes that are not zero (``Corrupted``). A version 4 record without
``ALIGNED`` holds a ``raw`` ``bytes`` state written from the object's own memory
(a checkpoint lane's split write, below): ``pad_len`` zero bytes put the
state's first byte at a block-aligned memory address on a block boundary of
the slot, and it is restored as ``bytes``. Older builds refuse version 4
(``VersionMismatch``) rather than misread the padding as state.

How a checkpoint is written: the first ones go the ordinary way (encode, the
slot store's ``write``/``write_direct``, observers and metrics). Once a
``raw`` state has been written twice with one length as ``bytes`` (or once as
the aligned buffer) on a ``BlockRegion``, the state keeps a *lane*
(:class:`grafos_fabric.slots.SlotLane` over
:class:`grafos_fabric.drivers.block.RecordLane`): the header and envelope
packed by one ``struct.pack_into`` into a prepared buffer and one native call
whose arguments were made once; about 250 bytecodes of Python per checkpoint
against 500-660 the ordinary way, which is most of what a checkpoint cost
over a raw write of its bytes on an ext4 file (README "Checkpoint speed"). Where
the lane needs no AIO context (records up to 128 KiB) and the lease runs on the
monotonic clock, ``checkpoint()`` is one Python frame of about 110 bytecodes
around one native call, ``gf_lane_write``, given a C struct of the lane's write
prepared once (``RecordLane.c``, ``SlotLane.fast``, the envelope's constant
fields packed once by ``SlotLane.prime``): it checks the lease's deadline, the
lane's generation and whether it is closed, puts the sequence number, slot,
``input_offset`` and ``output_commit`` into the header and envelope, and
writes inside the region's native gate instead of its I/O lock. A
``bytes`` state over 128 KiB that would go out by AIO is then written from its
own memory (only the bytes before its first block-aligned address are copied,
into the header block), as version 4 without ``ALIGNED``. Observers, metrics
(``observe`` on), another stage name or codec, another length or kind of
state, or a region that changed how it writes take the ordinary path, which
writes the same data.

The stage writes, a restarted stage reads; the record becomes
visible when its slot header lands (see :mod:`grafos_fabric.slots`). State is
msgpack or raw bytes: nothing read back can run code (no pickle, anywhere).
A msgpack state nests at most :data:`MAX_STATE_DEPTH` containers deep: deeper
states are refused when encoded (``FabricValueError``) and when read back
(``Corrupted``, checked by an iterative scan before the decoder sees the
bytes), so no checkpoint can be written that cannot be read, and no forged one
can exhaust the stack.
"""

from __future__ import annotations

import logging
import mmap
import struct
import time
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import msgspec
import numpy as np

from . import observe
from ._ffi import ffi, lib
from ._item import CheckpointBase, LaneRef, PLock
from ._item import checkpoint as _native_checkpoint
from ._item import checkpoint_setup as _native_checkpoint_setup
from ._memory import HUGE_MIN, huge_mmap, huge_pages
from .errors import CapacityExceeded, Corrupted, FabricError, FabricValueError
from .lease import LeaseState, LocalLeaseCell
from .slots import DATA_OFFSET, PCHK, BlockDevice, Durability, SlotLane, SlotStore

__all__ = [
    "MAX_STATE_DEPTH",
    "CheckpointFlushObserver",
    "CheckpointedStageState",
    "Codec",
    "EdgeCheckpoint",
    "StageId",
]

log = logging.getLogger(__name__)

S = TypeVar("S")
Codec = Literal["msgpack", "raw"]
_CODEC_IDS: dict[str, int] = {"msgpack": 1, "raw": 2}
_CODEC_NAMES: dict[int, Codec] = {1: "msgpack", 2: "raw"}
_ENVELOPE = struct.Struct("<BBHIQQ")
ENVELOPE_SIZE = _ENVELOPE.size  # 24
ALIGNED = 0x01  # envelope flag (version 4): the state starts at a block boundary, restored into a buffer
_PLAIN_VERSION, _ALIGNED_VERSION = 3, 4  # PCHK record versions: slots.PCHK.version, its variant
MAX_STAGE_NAME = 1024
_U64 = (1 << 64) - 1
_ACTIVE = LeaseState.ACTIVE
_ENCODER = msgspec.msgpack.Encoder()
MAX_STATE_DEPTH = 256  # containers a msgpack state may nest (msgspec recurses once per level)

if not hasattr(lib, "gf_msgpack_depth"):  # pragma: no cover - only on a stale build
    raise ImportError("stale grafos_fabric native build (no gf_msgpack_depth): rebuild it with `pip install -e .`")


def _msgpack_depth(buf: Any) -> int:
    """Nesting depth of the one msgpack value in ``buf``; -1 malformed, -2 deeper than MAX_STATE_DEPTH."""
    view = memoryview(buf).cast("B")
    return int(lib.gf_msgpack_depth(ffi.from_buffer("uint8_t[]", view), len(view), MAX_STATE_DEPTH))


@dataclass(frozen=True)
class StageId:
    """A stage's unique name (non-empty, at most 1024 bytes of UTF-8)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise FabricValueError(f"a stage id is a non-empty str, got {self.name!r}")
        if len(self.name.encode("utf-8")) > MAX_STAGE_NAME:
            raise FabricValueError(f"a stage id is at most {MAX_STAGE_NAME} bytes of UTF-8")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class EdgeCheckpoint:
    """How far a stage got on its edges.

    ``input_offset``: the sequence number of the next input item to consume
    (everything before it is reflected in the state). ``output_commit``: the
    sequence number of the next output item to produce (everything before it
    was produced). Both u64.
    """

    input_offset: int = 0
    output_commit: int = 0

    def __post_init__(self) -> None:
        for name in ("input_offset", "output_commit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
                raise FabricValueError(f"{name} must be a u64, got {value!r}")


@runtime_checkable
class CheckpointFlushObserver(Protocol):
    """Told when a checkpoint flush starts and ends (grafOS ``CheckpointFlushObserver``).

    ``on_flush_start`` runs exactly once when ``checkpoint()`` starts and
    ``on_flush_complete`` exactly once when it ends, whether it succeeded or
    failed. Neither may block. An exception from either is logged and
    ignored: it never changes whether the checkpoint succeeds.
    """

    def on_flush_start(self, lease_id: str) -> None: ...
    def on_flush_complete(self, lease_id: str) -> None: ...


def _aligned_array(nbytes: int, block_size: int) -> np.ndarray[Any, Any]:
    """A zeroed, writable uint8 array of ``nbytes`` whose first byte is ``block_size``-aligned
    (2 MiB-aligned on transparent huge pages from ``_memory.HUGE_MIN`` bytes, where the kernel
    has them: a large record then goes to the device as a few physical pieces, not hundreds)."""
    if nbytes >= HUGE_MIN and huge_pages():
        mm, skip = huge_mmap(nbytes)
        return np.frombuffer(mm, dtype=np.uint8)[skip : skip + nbytes]
    align = max(block_size, mmap.PAGESIZE)
    size = -(-max(nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE + align - mmap.PAGESIZE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # a forked child's copy is its own
    base = np.frombuffer(mm, dtype=np.uint8)
    skip = -base.ctypes.data % align
    return base[skip : skip + nbytes]


def _stage(stage: StageId | str) -> StageId:
    return stage if isinstance(stage, StageId) else StageId(stage)


class CheckpointedStageState(CheckpointBase, Generic[S]):
    """A stage's state plus its edge offsets, checkpointed to a block lease.

    Nothing is written until the first :meth:`checkpoint`. ``codec`` is
    ``"msgpack"`` (any value msgspec encodes: dicts, lists, str, bytes, ints,
    floats, msgspec Structs, dataclasses...) or ``"raw"`` (the state is a
    bytes-like object). ``durability`` is passed to the slot store
    (``"ordered"`` or ``"single-sync"``: since slot format v3 both are one
    write and one flush, torn writes caught by the CRCs; see
    :mod:`grafos_fabric.slots`). ``lease_id`` is what the observer is told
    (default: the block lease's lease id).
    """

    def __init__(
        self,
        state: S,
        block_lease: BlockDevice,
        *,
        stage: StageId | str = "stage",
        observer: CheckpointFlushObserver | None = None,
        codec: Codec = "msgpack",
        edge: EdgeCheckpoint | None = None,
        lease_id: str | None = None,
        durability: Durability = "ordered",
    ) -> None:
        if codec not in _CODEC_IDS:
            raise FabricValueError(f"codec must be 'msgpack' or 'raw', got {codec!r}")
        if edge is not None and not isinstance(edge, EdgeCheckpoint):
            raise FabricValueError(f"edge must be an EdgeCheckpoint, got {type(edge).__name__}")
        self.state: S = state
        self.block_lease = block_lease
        self.stage = _stage(stage)
        self.observer = observer
        self.codec: Codec = codec
        self.edge: EdgeCheckpoint = edge if edge is not None else EdgeCheckpoint()
        self.lease_id = lease_id if lease_id is not None else str(block_lease.lease.id)
        self.last_seq: int | None = None
        self._store = SlotStore(block_lease, PCHK, durability=durability)
        self._buffer: np.ndarray[Any, Any] | None = None  # with_buffer's state, written from where it lies
        self._prefix_tail: tuple[StageId, int, int, bytes] | None = None  # stage name + padding, once
        self._lane: SlotLane | None = None  # checkpoint()'s prepared write (see _make_lane)
        self._lane_env: tuple[int, int, int, int] = (0, 0, 0, 0)  # the lane's constant envelope fields
        self._lane_want = -1  # a bytes state's length at the last ordinary write (a lane after two alike)
        self._lane_stage: StageId | None = None  # the stage name the lane's prefix holds
        # the lane's SlotLane.fast (primed), its data, stage and LaneRef: checkpoint()'s one native
        # call (native/gf_ckpt.c reads this tuple)
        self._fast: tuple[Any, Any, Any, SlotStore, Any, StageId, LaneRef] | None = None
        # checkpoint() calls, one at a time: a lane points its native write at the state's own
        # memory, and a second thread re-pointing it mid-write would free what the first one reads.
        # A PLock (threading.RLock's rules) because checkpoint() in C takes it without a Python call.
        self._lock = PLock()

    @classmethod
    def with_buffer(
        cls,
        block_lease: BlockDevice,
        nbytes: int,
        *,
        stage: StageId | str = "stage",
        observer: CheckpointFlushObserver | None = None,
        edge: EdgeCheckpoint | None = None,
        lease_id: str | None = None,
        durability: Durability = "ordered",
    ) -> CheckpointedStageState[np.ndarray[Any, Any]]:
        """A stage state kept in a block-aligned buffer that checkpoints without a copy.

        ``state`` is a writable numpy ``uint8`` array of ``nbytes`` (zeroed, its first byte on a
        block boundary, owned by this object: ``state.view(np.float32)``, ``np.add(a, b,
        out=...)`` into a view of it, ``state[:] = ...``). ``checkpoint()`` writes it as a
        ``PCHK`` version 4 record whose state starts at a block boundary of the slot, so on a
        ``BlockRegion`` a state over 128 KiB goes to the device by ``O_DIRECT`` from the buffer
        itself, its CRC32C computed while the write is in flight, and a smaller one in one
        ``RWF_DSYNC`` write through the page cache, which measured faster there
        (``BlockRegion.write_record_direct``; nothing is copied by this library either way);
        other devices get the same bytes through the ordinary path. Keep ``state`` bound to this
        array (rebinding it to something else checkpoints that object, codec ``"raw"``, with a
        copy, as version 3) and do not change it from another thread while ``checkpoint()``
        runs (the record would fail its CRC on read, and the previous checkpoint would be
        restored: never a mix). The buffer is private memory (a forked child writes its own
        copy); from 1 MiB it sits on transparent huge pages where the kernel has them, so the
        device gets a few physical pieces instead of one per 4 KiB page (``grafos_fabric._memory``:
        1 MiB checkpoints 1.14-1.41x the best raw write here, against 0.89-1.03x on small pages;
        ``GRAFOS_NO_HUGE_PAGES=1`` turns it off; the cost is up to 2 MiB more resident memory).
        :meth:`restore` of such a checkpoint gives the state back in a
        new buffer of the same kind. ``CapacityExceeded`` at once when ``nbytes`` does not fit
        the lease's slot next to the envelope and the padding.
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise FabricValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        inst: CheckpointedStageState[np.ndarray[Any, Any]] = cls(  # type: ignore[assignment]
            _aligned_array(nbytes, int(block_lease.block_size)),  # type: ignore[arg-type]
            block_lease,
            stage=stage,
            observer=observer,
            codec="raw",
            edge=edge,
            lease_id=lease_id,
            durability=durability,
        )
        need = len(inst._aligned_prefix(inst.edge)) + nbytes
        if need > inst.capacity:
            raise CapacityExceeded(
                f"an aligned state of {nbytes} bytes needs {need} bytes of the slot, which holds {inst.capacity}"
            )
        inst._buffer = inst.state
        return inst

    @property
    def buffer(self) -> np.ndarray[Any, Any] | None:
        """The aligned state buffer (:meth:`with_buffer`, or restored from such a checkpoint), else None."""
        return self._buffer

    def _aligned_prefix(self, edge: EdgeCheckpoint) -> bytes:
        """Envelope, stage name and zero padding up to the slot's next block boundary (version 4)."""
        cached = self._prefix_tail
        if cached is None or cached[0] is not self.stage:
            stage = self.stage.name.encode("utf-8")
            pad = -(DATA_OFFSET + ENVELOPE_SIZE + len(stage)) % int(self.block_lease.block_size)
            cached = self._prefix_tail = (self.stage, len(stage), pad, stage + bytes(pad))
        _, stage_len, pad, tail = cached
        return _ENVELOPE.pack(_CODEC_IDS["raw"], ALIGNED, stage_len, pad, edge.input_offset, edge.output_commit) + tail

    @property
    def capacity(self) -> int:
        """The most bytes an encoded checkpoint (envelope + stage name + state) can take."""
        return self._store.capacity

    # -- encoding ------------------------------------------------------------
    def _encode(self, edge: EdgeCheckpoint) -> list[Any]:
        stage = self.stage.name.encode("utf-8")
        if self.codec == "raw":
            body: Any = self.state
            if type(body) is bytes:  # as it is: the slot store may write it without a copy
                pass
            else:
                try:
                    body = memoryview(self.state).cast("B")  # type: ignore[arg-type]
                except TypeError:
                    raise FabricValueError(
                        f"codec 'raw' needs a bytes-like state, got {type(self.state).__name__}"
                    ) from None
        else:
            too_deep = (
                f"state nests deeper than {MAX_STATE_DEPTH} containers: flatten it, or encode it yourself "
                "and use codec='raw'"
            )
            try:
                body = _ENCODER.encode(self.state)
            except RecursionError:
                raise FabricValueError(too_deep) from None
            except (TypeError, ValueError, OverflowError) as exc:
                raise FabricValueError(f"state cannot be encoded as msgpack: {exc}") from exc
            if _msgpack_depth(body) < 0:
                raise FabricValueError(too_deep)
        head = _ENVELOPE.pack(_CODEC_IDS[self.codec], 0, len(stage), 0, edge.input_offset, edge.output_commit)
        return [head + stage, body]

    # -- checkpoint ----------------------------------------------------------
    def _make_lane(self) -> None:
        """After an ordinary write: prepare the next ones (a ``SlotLane``) where they will look alike.

        A lane writes a ``raw`` state that is ``bytes`` of the length written last time (made after
        two ordinary writes of that length, so a state whose size keeps changing does not make one
        per write) or the aligned buffer, of this stage name, on a ``BlockRegion``: the same record
        the slot store would write, its header and envelope packed in one call and the native
        call's arguments made once (``BlockRegion.record_lane``). A lane that no longer fits (the
        state's type or length changed, the region changed how it writes) is replaced here after
        the next ordinary write; checkpoints with an observer or while observing (metrics) take
        the ordinary path.
        """
        lane = self._lane
        state: Any = self.state
        if lane is not None and lane.live and lane.data is not None and self._lane_stage is self.stage:
            if state is lane.data or (type(state) is bytes and len(state) == lane.lane.n):
                return  # it still fits (it was skipped for an observer, or the slot was unknown)
        if lane is not None:
            self._lane = None
            self._fast = None
            lane.close()
        if self.codec != "raw":
            return
        buffer = self._buffer
        if buffer is not None and state is buffer:
            prefix = self._aligned_prefix(self.edge)
            fields = (_CODEC_IDS["raw"], ALIGNED, *_ENVELOPE.unpack_from(prefix)[2:4])
            data: Any = buffer
            version = _ALIGNED_VERSION
            tail = prefix[ENVELOPE_SIZE:]
        elif type(state) is bytes:
            if self._lane_want != len(state):
                self._lane_want = len(state)
                return
            tail = self.stage.name.encode("utf-8")
            fields = (_CODEC_IDS["raw"], 0, len(tail), 0)
            data, version = state, _PLAIN_VERSION
        else:
            return
        try:  # a large bytes state may go out from its own memory, as version 4 without ALIGNED
            new = self._store.lane(_ENVELOPE, tail, data, version=version, split_version=_ALIGNED_VERSION)
        except (FabricError, OSError) as exc:  # the checkpoint is durable; the ordinary path keeps writing
            log.debug("no checkpoint lane for stage %s: %s", self.stage, exc)
            return
        if new is not None:
            self._lane, self._lane_env, self._lane_stage = new, fields, self.stage
            if new.fast is not None:  # the envelope's constant fields, packed once (with a split
                # lane's zero bytes for its current data; _retake primes them again when they change)
                new.prime(*fields[:3], fields[3] + new.pad, 0, 0)
                self._fast = (*new.fast, data, self.stage, LaneRef(ffi.buffer(new.fast[1])))

    def _notify(self, method: str) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, method)(self.lease_id)
        except Exception:
            log.exception("checkpoint flush observer %s(%s) raised; ignored", method, self.lease_id)

    def checkpoint(self, edge: EdgeCheckpoint | None = None) -> int:
        """Write ``(state, edge)`` durably; returns the record's slot sequence number.

        ``edge`` (when given) becomes :attr:`edge` once the checkpoint is
        durable. Raises at once when the write fails (``CapacityExceeded``
        before anything is written when the encoded state does not fit;
        ``LeaseExpired``/``Revoked`` when the block lease is gone;
        ``FabricValueError`` when the state cannot be encoded; ``OSError`` from
        the device): the stage should halt rather than run on uncheckpointed.
        The previous checkpoint stays readable whatever happens. Calls from
        several threads run one at a time.
        """
        # native/gf_ckpt.c: under self._lock, the checks on self._fast and the lane's one native
        # call, in C; else self._checkpoint_lane(edge); self._retake() when the state object
        # changed, self._failed(...) when the native write failed. In C, a 4 KiB checkpoint takes
        # 2.1-2.6 us of CPU less than this method did in Python (README "Checkpoint speed").
        return _native_checkpoint(self, edge)

    def _retake(self) -> bool:
        """checkpoint()'s fast path: point the lane at a new ``bytes`` state of its length (True).

        Where the new state needs other zero bytes before it (a split lane's
        :attr:`~grafos_fabric.slots.SlotLane.pad`, which the header and the envelope carry), the
        lane packs its header anew and the envelope is primed again here."""
        lane, fast = self._lane, self._fast
        if lane is None or fast is None:
            return False
        pad = lane.pad
        if not lane.take(self.state):
            return False
        if lane.pad != pad:
            c, f, n, p = self._lane_env
            lane.prime(c, f, n, p + lane.pad, 0, 0)
        self._fast = (*fast[:4], self.state, *fast[5:])
        return True

    def _failed(
        self, rc: int, newest: tuple[int, int], slot: int, seq: int, edge: EdgeCheckpoint | None, target: EdgeCheckpoint
    ) -> int:
        """checkpoint()'s fast path after its native write returned ``rc`` (not 0, not GF_LANE_AGAIN)."""
        lane = self._lane
        if lane is None or lane.failed(rc, newest, slot, seq) is None:  # raises, or nothing was written
            return self._checkpoint(edge)
        self.edge = target
        self.last_seq = seq
        return seq

    def _checkpoint_lane(self, edge: EdgeCheckpoint | None) -> int:
        """checkpoint() through the lane the careful way (SlotLane.write), else the ordinary way."""
        lane = self._lane
        if lane is not None and self.observer is None and observe._current is None:
            target = self.edge if edge is None else edge
            state = self.state
            rl = lane.lane
            if (
                type(target) is EdgeCheckpoint
                and self.stage is self._lane_stage
                and self.codec == "raw"
                and (rl.data is state or rl.take(state))
            ):
                c, f, n, pad = self._lane_env
                wrote = lane.write(c, f, n, pad + rl.pad, target.input_offset, target.output_commit)
                if wrote is not None:
                    self.edge = target
                    self.last_seq = wrote
                    return wrote
        return self._checkpoint(edge)

    def _checkpoint(self, edge: EdgeCheckpoint | None) -> int:
        """checkpoint() the ordinary way: observers, metrics, the slot store's write; then a lane."""
        if edge is not None and type(edge) is not EdgeCheckpoint and not isinstance(edge, EdgeCheckpoint):
            raise FabricValueError(f"edge must be an EdgeCheckpoint, got {type(edge).__name__}")
        if self.observer is not None:
            self._notify("on_flush_start")
        obs = observe.current()  # the counters only when observing (this call is on a stage's hot path)
        t0 = time.perf_counter() if obs is not None else 0.0
        ok = False
        try:
            target = edge if edge is not None else self.edge
            buffer = self._buffer
            if buffer is not None and self.state is buffer:  # with_buffer: no copy
                seq = self._store.write_direct(self._aligned_prefix(target), buffer, version=_ALIGNED_VERSION).seq
            else:
                seq = self._store.write(self._encode(target)).seq
            self.edge = target
            self.last_seq = seq
            ok = True
            self._make_lane()
            return seq
        finally:
            if self.observer is not None:
                self._notify("on_flush_complete")
            if obs is not None:
                obs.count("checkpoint_flushes" if ok else "checkpoint_failures", 1, stage=self.stage.name)
                if ok:
                    obs.latency("checkpoint_flush", time.perf_counter() - t0, stage=self.stage.name)

    # -- restore -------------------------------------------------------------
    @classmethod
    def restore(
        cls,
        block_lease: BlockDevice,
        *,
        stage: StageId | str | None = None,
        observer: CheckpointFlushObserver | None = None,
        codec: Codec | None = None,
        state_type: Any = None,
        lease_id: str | None = None,
        durability: Durability = "ordered",
    ) -> CheckpointedStageState[Any]:
        """The newest valid checkpoint on ``block_lease`` as a new instance.

        Raises ``NoRecord`` (a ``Corrupted``) when no checkpoint was ever
        written, ``Corrupted`` when none is valid or the newest valid one does
        not decode (or does not match ``state_type``), ``VersionMismatch`` for
        a format this build does not speak, and ``FabricValueError`` when
        ``stage`` or ``codec`` is given and differs from what was written.
        ``state_type`` is handed to msgspec to decode the state into a typed
        value (a Struct, a dataclass, ``dict[str, int]``...).
        """
        store = SlotStore(block_lease, PCHK, durability=durability)
        record = store.read()
        data = record.data
        if len(data) < ENVELOPE_SIZE:
            raise Corrupted(f"checkpoint of {len(data)} bytes is shorter than its {ENVELOPE_SIZE}-byte envelope")
        codec_id, flags, stage_len, pad, input_offset, output_commit = _ENVELOPE.unpack_from(data)
        if record.version != _ALIGNED_VERSION:
            flags = pad = 0  # reserved in versions 2 and 3: never read
        written_codec = _CODEC_NAMES.get(codec_id)
        if written_codec is None:
            raise Corrupted(f"checkpoint names unknown codec {codec_id}")
        if flags & ~ALIGNED:
            raise Corrupted(f"checkpoint envelope has unknown flags {flags:#x} (damaged or forged)")
        if flags & ALIGNED and written_codec != "raw":
            raise Corrupted("checkpoint claims an aligned state with codec msgpack (damaged or forged)")
        if ENVELOPE_SIZE + stage_len > len(data):
            raise Corrupted(f"checkpoint stage name of {stage_len} bytes runs past its {len(data)} bytes")
        if ENVELOPE_SIZE + stage_len + pad > len(data):
            raise Corrupted(f"checkpoint padding of {pad} bytes runs past its {len(data)} bytes")
        start = ENVELOPE_SIZE + stage_len
        if pad and any(data[start : start + pad]):
            raise Corrupted("checkpoint padding is not zero (damaged or forged)")
        try:
            written_stage = StageId(bytes(data[ENVELOPE_SIZE : ENVELOPE_SIZE + stage_len]).decode("utf-8"))
        except (UnicodeDecodeError, FabricValueError) as exc:
            raise Corrupted(f"checkpoint stage name does not decode: {exc}") from exc
        if stage is not None and _stage(stage) != written_stage:
            raise FabricValueError(
                f"the checkpoint belongs to stage {written_stage.name!r}, not {_stage(stage).name!r}"
            )
        if codec is not None and codec != written_codec:
            raise FabricValueError(f"the checkpoint was written with codec {written_codec!r}, not {codec!r}")
        body = memoryview(data)[start + pad :]
        state: Any
        buffer = None
        if flags & ALIGNED:
            state = buffer = _aligned_array(len(body), int(block_lease.block_size))
            state[:] = np.frombuffer(body, dtype=np.uint8)
        elif written_codec == "raw":
            state = bytes(body)
        else:
            depth = _msgpack_depth(body)
            if depth == lib.GF_MSGPACK_TOO_DEEP:
                raise Corrupted(
                    f"checkpoint state nests deeper than {MAX_STATE_DEPTH} containers (this build never writes "
                    "one): the record is forged or damaged; restore an older copy or start the stage afresh"
                )
            if depth < 0:
                raise Corrupted("checkpoint state is not one well-formed msgpack value (damaged or forged)")
            try:
                state = (
                    msgspec.msgpack.decode(body, type=state_type)
                    if state_type is not None
                    else msgspec.msgpack.decode(body)
                )
            except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                raise Corrupted(f"checkpoint state does not decode: {exc}") from exc
            except RecursionError:
                raise FabricValueError(
                    f"restore ran out of stack decoding a state {depth} containers deep: call it from a "
                    "shallower stack (or raise sys.setrecursionlimit)"
                ) from None
        inst: CheckpointedStageState[Any] = cls.__new__(cls)
        inst.state = state
        inst.block_lease = block_lease
        inst.stage = written_stage
        inst.observer = observer
        inst.codec = written_codec
        inst.edge = EdgeCheckpoint(input_offset, output_commit)
        inst.lease_id = lease_id if lease_id is not None else str(block_lease.lease.id)
        inst.last_seq = record.seq
        inst._store = store
        inst._buffer = buffer
        inst._prefix_tail = None
        inst._lane = None
        inst._lane_env = (0, 0, 0, 0)
        inst._lane_want = -1
        inst._lane_stage = None
        inst._fast = None
        inst._lock = PLock()
        log.debug("restored checkpoint of stage %s (seq %d, slot %d)", written_stage, record.seq, record.slot)
        return inst

    def into_block_lease(self) -> BlockDevice:
        """The block lease (the state object is dropped)."""
        return self.block_lease

    def __repr__(self) -> str:
        return (
            f"<CheckpointedStageState stage={self.stage.name!r} edge={self.edge} codec={self.codec} "
            f"last_seq={self.last_seq}>"
        )


# checkpoint() in C reads state, edge, stage, codec, observer, last_seq, _fast and _lock from
# CheckpointBase's struct on a CheckpointedStageState itself, the store's newest from SlotStoreBase's
# on a SlotStore, the lease's state and deadline from LeaseCellBase's on a LocalLeaseCell (by name
# on a subclass's object)
_native_checkpoint_setup(
    CheckpointedStageState, EdgeCheckpoint, _ACTIVE, observe, lib.gf_lane_write, SlotStore, LocalLeaseCell
)
