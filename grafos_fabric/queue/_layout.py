"""Ring geometry and the small helpers every queue module shares.

The ring's layout is the native descriptor's (``native/gf_ring.h``): sizes and
offsets are read from it through cffi here, never re-typed. Also: the status
codes the C calls return, argument checks (``_check_int``, dtypes), the
geometry a new ring gets (``_ring_geometry``), the wait slices, and
``_deadline`` (a blocking call's timeout as a monotonic deadline)."""

from __future__ import annotations

import ast
import logging
import math
import numbers
import operator
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import errors as E
from .._ffi import ffi, lib

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


_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


STALL_GRACE = 2.0  # seconds a multi-threaded consumer's stall must last before HeldItemsStall


def _batch_items(bufs: Any, convert: Callable[[Any], Any]) -> list[Any]:
    """The items of a ``push_batch`` argument that is not a 2-D array, each
    through ``convert``; one item, or something that is not a sequence of
    items, is a ``FabricTypeError`` (both access paths)."""
    if isinstance(bufs, (str, bytes, bytearray, memoryview)):
        raise E.FabricTypeError("push_batch takes a sequence of items (or a 2-D array), not one item: use push")
    try:
        return [convert(b) for b in bufs]
    except TypeError as exc:
        if isinstance(exc, E.FabricTypeError):
            raise
        raise E.FabricTypeError(f"push_batch takes a sequence of items, got {type(bufs).__name__}") from None


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
