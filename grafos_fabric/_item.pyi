"""Types of grafos_fabric._item (native/gf_item.c)."""

from contextlib import AbstractContextManager
from typing import Any

import numpy as np

class ItemBase:
    """Base of grafos_fabric.queue.Item: the buffer protocol and the release bookkeeping."""

    def __new__(cls, q: Any, token: int, offset: int, length: int, seq: int, batch: Any) -> ItemBase: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __len__(self) -> int: ...
    def release(self) -> None: ...
    def _byte_view(self) -> memoryview: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...
    @property
    def released(self) -> bool: ...
    @property
    def length(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def _token(self) -> int: ...
    @property
    def _q(self) -> Any: ...
    @property
    def _batch(self) -> Any: ...
    @property
    def _exports(self) -> int: ...

class Span:
    """A buffer over part of a queue's data area that holds the queue."""

    def __new__(cls, q: Any, offset: int, length: int, writable: bool = ...) -> Span: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Releaser:
    """The native release path of a queue's items (private)."""

    def __new__(cls, consumer_buffer: Any, /) -> Releaser: ...
    def close(self) -> None: ...

GF_NATIVE_ABI: int

def bind(released_exc: type[BaseException], corrupted_exc: type[BaseException], /) -> None: ...

class Fast:
    """The single-item hot path of a mapped queue handle (private: see native/gf_item.c)."""

    def __new__(cls, typed: bool, /) -> Fast: ...
    def set_producer(self, producer_buffer: Any, ring: Any, plock: Any, /) -> None: ...
    def set_consumer(
        self,
        consumer_buffer: Any,
        releaser: Releaser,
        item_type: type,
        address: int,
        capacity: int,
        fmt: bytes | None,
        itemsize: int,
        prefetch_bytes: int,
        tid: int,
        /,
    ) -> None: ...
    def set_array_dtype(self, dtype: np.dtype[Any], /) -> None: ...
    def note_thread(self, tid: int | None, /) -> None: ...
    def close(self) -> None: ...
    def refill(self) -> tuple[int, int, int, int] | int: ...
    def take(self, k: int, /) -> tuple[int, list[int], list[int], list[int]] | None: ...
    def __iter__(self) -> Fast: ...
    def __next__(self) -> tuple[int, int, int, int]: ...
    @property
    def pending(self) -> int: ...

class PLock:
    """A handle's producer lock: threading.RLock's rules, taken by the native reservation without a Python call."""

    def __new__(cls) -> PLock: ...
    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> None: ...
    def _is_owned(self) -> bool: ...
    @property
    def _count(self) -> int: ...

class QueueBase:
    """Base of FabricQueue: its single-item calls in C (private: see native/gf_item.c)."""

    def push(self, buf: Any, timeout: float | None = None) -> int:
        """Push one item, waiting for space; returns its sequence number.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first."""
    def try_push(self, buf: Any, /) -> bool:
        """Push one item; False when the ring is full (never waits)."""
    def pop(self, timeout: float | None = None) -> Any:
        """Pop one item, waiting for it; ``TimeoutError`` when ``timeout`` passes."""
    def try_pop(self) -> Any:
        """Pop one item, or None when the queue is empty (never waits)."""
    def pop_array(self, timeout: float | None = None) -> np.ndarray[Any, Any]:
        """Pop one item as a read-only array of the queue's dtype (uint8 without one);
        its ring space is reused once that array and every view of it are gone."""
    def reserve(self, nbytes: int, timeout: float | None = None) -> AbstractContextManager[Any]:
        """Zero-copy production: ``with q.reserve(n) as buf: ...`` writes the item in
        place; it is published on exit (aborted when the block raises)."""
    def _fast_bind(self, fast: Fast | None, /) -> None: ...
    _reserver: int | None
    _reserving: bool
    _give_back_after_reserve: bool
    _commit_len: int
    last_seq: int

class LaneRef:
    """A record lane's ``struct gf_lane`` (checkpoint()'s native write), by the cffi buffer over it."""

    def __new__(cls, buffer: Any, /) -> LaneRef: ...

def checkpoint(state: Any, edge: Any = None, /) -> int:
    """CheckpointedStageState.checkpoint, its fast path in C (native/gf_ckpt.c)."""

def checkpoint_setup(
    state_type: type,
    edge_type: type,
    active: Any,
    observe: Any,
    native_write: Any,
    store_type: type,
    cell_type: type,
    /,
) -> None:
    """What checkpoint() compares with: CheckpointedStageState, EdgeCheckpoint, LeaseState.ACTIVE,
    the observe module, lib.gf_lane_write, SlotStore, LocalLeaseCell."""

class CheckpointBase:
    """CheckpointedStageState's base: the attributes checkpoint() reads, in C (private)."""

    state: Any
    edge: Any
    stage: Any
    codec: Any
    observer: Any
    last_seq: Any
    _fast: Any
    _lock: Any

class SlotStoreBase:
    """SlotStore's base: its newest (slot, seq), which checkpoint() reads and sets, in C (private).

    ``_newest`` reads back what was set (None, a ``(slot, seq)`` tuple, or any other object, which
    checkpoint() leaves to the Python path); it cannot be deleted."""

    _newest: Any

class LeaseCellBase:
    """LocalLeaseCell's base: the state and deadline checkpoint() reads, in C (private)."""

    _state: Any
    _deadline: Any
