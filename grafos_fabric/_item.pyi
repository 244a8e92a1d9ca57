"""Type stubs for grafos_fabric._item (native/gf_item.c)."""

from collections.abc import Callable
from typing import Any

import numpy as np

GF_NATIVE_ABI: int
PREFETCH_ITEMS: int

class Item:
    """One popped item: ``seq``, ``len()``, a zero-copy read-only buffer."""

    @property
    def seq(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def released(self) -> bool: ...
    @property
    def data(self) -> memoryview: ...
    @property
    def _token(self) -> int: ...
    @property
    def _q(self) -> Any: ...
    @property
    def _exports(self) -> int: ...
    def array(self) -> np.ndarray[Any, Any]: ...
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def tobytes(self) -> bytes: ...
    def release(self) -> None: ...
    def __len__(self) -> int: ...
    def __enter__(self) -> Item: ...
    def __exit__(self, *exc: object) -> None: ...

class Consumer:
    closed: int
    multi: int
    queue: Any
    def __init__(
        self,
        queue: Any,
        keep: Any,
        consumer: int,
        release_cb: Callable[[int], None] | None,
        on_error: Callable[[int], None],
        on_lease: Callable[[], None],
        on_closed: Callable[[], None] | None,
        clock: Callable[[], int] | None,
        dtype: np.dtype[Any],
        fmt: bytes | None,
        item_type: type[Item],
        data: int,
        lease_state: int,
        lease_deadline: int,
        prefetch_bytes: int,
    ) -> None: ...
    def try_pop(self) -> Item | None: ...
    def item(self, token: int, offset: int, length: int, seq: int, base: int) -> Item: ...
    def batch_item(self, batch: Any, offset: int, length: int, seq: int, base: int) -> Item: ...
    def prefetched(self) -> int: ...
    def take_prefetched(self, k: int) -> tuple[int, list[int], list[int], list[int]] | None: ...
    def drop_prefetched(self) -> None: ...
    def note_thread(self) -> None: ...

class Producer:
    def __init__(
        self,
        queue: Any,
        keep: Any,
        producer: int,
        clock: Callable[[], int] | None,
        validate: Callable[[Any], Any],
        on_error: Callable[[int, int, Any], int | None],
        typed: bool,
    ) -> None: ...
    def try_push(self, buf: Any) -> int | None: ...

def bind(
    entry_points: dict[str, int],
    frombuffer: Any,
    released_exc: Any,
    finish_array: Any,
    rows_view: Any,
    corrupted_exc: Any,
) -> None: ...

class Reservation:
    seq: int
    rows: int
    active: bool
    batch: bool
    def __init__(
        self,
        producer: Producer,
        queue: Any,
        ring: Any,
        dtype: Any,
        slow_enter: Any,
        bad_arm: Any,
        stage: Any,
        slow_push: Any,
        max_item: int,
        itemsize: int,
    ) -> None: ...
    def __enter__(self) -> np.ndarray[Any, Any]: ...
    def __exit__(self, *exc: object) -> bool: ...
    def arm(self, nbytes: int, rows: int, timeout: float | None) -> Reservation: ...
    def set_commit(self, k: int) -> None: ...
