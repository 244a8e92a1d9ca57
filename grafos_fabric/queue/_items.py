"""What ``pop``/``pop_batch`` return: :class:`Item` and :class:`Batch`.

Both are zero-copy views of ring memory (or of a one-sided handle's local
buffer) that pin their bytes until released; see the package docstring for
the lifetime rule. The C base (``grafos_fabric._item``) counts buffer exports
and releases the record through the queue's native consumer."""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import errors as E
from .._ffi import ffi, lib
from .._item import GF_NATIVE_ABI as _ITEM_ABI
from .._item import ItemBase
from .._item import bind as _bind_item
from ._layout import _U8, RECORD_HEADER, _typed

if TYPE_CHECKING:
    from ._mapped import FabricQueue

log = logging.getLogger(__name__)


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


_bind_item(E.FabricValueError, E.Corrupted)
if _ITEM_ABI != lib.gf_native_abi():  # pragma: no cover - only on a stale build
    raise ImportError(
        f"stale grafos_fabric._item build (native ABI {_ITEM_ABI}, _native has {lib.gf_native_abi()}): "
        "reinstall with `pip install -e .`"
    )
