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
    |  codec (u8)   | reserved (0)  |        stage_len (u16)        |  0
    +---------------------------------------------------------------+
    |                        reserved (0)                           |  4
    +---------------------------------------------------------------+
    |                  input_offset (u64)                           |  8
    +                                                               +
    |                                                               | 12
    +---------------------------------------------------------------+
    |                  output_commit (u64)                          | 16
    +                                                               +
    |                                                               | 20
    +---------------------------------------------------------------+
    |        stage name (UTF-8, stage_len bytes), then the state    | 24
    |        (msgpack via msgspec for codec 1, raw bytes for 2)     |
    +---------------------------------------------------------------+

Little-endian. The stage writes, a restarted stage reads; the record becomes
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
import struct
import time
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import msgspec

from . import observe
from ._ffi import ffi, lib
from .errors import Corrupted, FabricValueError
from .slots import PCHK, BlockDevice, Durability, SlotStore

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
MAX_STAGE_NAME = 1024
_U64 = (1 << 64) - 1
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


def _stage(stage: StageId | str) -> StageId:
    return stage if isinstance(stage, StageId) else StageId(stage)


class CheckpointedStageState(Generic[S]):
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
        The previous checkpoint stays readable whatever happens.
        """
        if edge is not None and not isinstance(edge, EdgeCheckpoint):
            raise FabricValueError(f"edge must be an EdgeCheckpoint, got {type(edge).__name__}")
        self._notify("on_flush_start")
        t0 = time.perf_counter()
        ok = False
        try:
            target = edge if edge is not None else self.edge
            seq = self._store.write(self._encode(target)).seq
            self.edge = target
            self.last_seq = seq
            ok = True
            return seq
        finally:
            self._notify("on_flush_complete")
            observe.count("checkpoint_flushes" if ok else "checkpoint_failures", stage=self.stage.name)
            if ok:
                observe.latency("checkpoint_flush", time.perf_counter() - t0, stage=self.stage.name)

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
        codec_id, _r0, stage_len, _r1, input_offset, output_commit = _ENVELOPE.unpack_from(data)
        written_codec = _CODEC_NAMES.get(codec_id)
        if written_codec is None:
            raise Corrupted(f"checkpoint names unknown codec {codec_id}")
        if ENVELOPE_SIZE + stage_len > len(data):
            raise Corrupted(f"checkpoint stage name of {stage_len} bytes runs past its {len(data)} bytes")
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
        body = data[ENVELOPE_SIZE + stage_len :]
        state: Any
        if written_codec == "raw":
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
