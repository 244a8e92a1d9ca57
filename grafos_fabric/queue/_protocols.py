"""The Python protocols on top of push/pop: iteration, ``len``, and asyncio.

:class:`QueueProtocols` is a mixin of :class:`~grafos_fabric.FabricQueue` (and so
of the one-sided queue). It only calls the queue's own public operations plus
two waits each queue class gives (``_wait_readable`` / ``_wait_writable``), so
the ring protocol stays where it is.

Sizes are read from the shared header and are **estimates** under
concurrency, like :meth:`queue.Queue.qsize`: the other side may push or pop
between the read and your next call.

asyncio without a busy poll
---------------------------
``await q.apop()`` first tries a non-blocking pop on the event loop's thread.
When the queue is empty it waits in a worker thread (a futex wait on the
mapped ring, with the GIL released; polling with backoff on a one-sided ring)
and then pops on the loop's thread again. The worker only *waits*: it never
pops, so cancelling ``apop`` (``asyncio.wait_for``, task cancellation) loses
no item. Each queue has one private worker pool of two threads (one waiting
for data, one for space), made on first use and shut down by ``close()``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .. import errors as E
from .._ffi import lib
from .._types import ItemLike

# ring layout constants, from the native descriptor (gf_ring.h), never re-typed
_RING_HEADER = int(lib.GF_RING_HEADER_SIZE)
_RECORD_HEADER = int(lib.GF_RECORD_HEADER_SIZE)
_RECORD_ALIGN = int(lib.GF_RECORD_ALIGN)
_DATA = int(lib.GF_RECORD_DATA)
_PADDING = int(lib.GF_RECORD_PADDING)
_MIN_RECORD = int(lib.gf_record_size(1))

if TYPE_CHECKING:
    from ._items import Item

__all__ = ["QueueProtocols"]

# A worker wait never sleeps longer than this, so a cancelled apop frees its
# worker thread soon and a closed queue's pool drains quickly.
_ASYNC_SLICE = 0.05


class QueueProtocols:
    """Iteration, sizes and asyncio for a queue (see the module docstring)."""

    if TYPE_CHECKING:  # what the host class provides
        capacity: int
        closed: bool
        dtype: Any

        def stats(self) -> dict[str, int | bool]: ...
        def try_pop(self) -> Item | None: ...
        def try_push(self, buf: ItemLike) -> bool: ...
        def pop(self, timeout: float | None = None) -> Item: ...
        def _wait_readable(self, deadline: float | None) -> None: ...
        def _wait_writable(self, nbytes: int, deadline: float | None) -> None: ...

    # -- iteration ------------------------------------------------------------------
    def __iter__(self) -> Iterator[Item]:
        """Pop items, waiting for each, until the queue is sealed and drained.

        ``for item in q:`` ends cleanly on :class:`~grafos_fabric.errors.QueueSealed`;
        every other error (expiry, revocation, a closed handle) propagates."""
        while True:
            try:
                item = self.pop()
            except E.QueueSealed:
                return
            yield item

    # -- sizes (estimates) ----------------------------------------------------------
    def qsize(self) -> int:
        """Items published and not yet consumed (freed by the consumer), read from the
        shared header: an estimate while the other side runs."""
        s = self.stats()
        used = int(s["used"])
        if used <= 0:
            return 0
        first = self._seq_at_head(int(s["head"]), int(s["tail"]))
        pending = int(s["next_seq"]) - first if first is not None else 0
        # never report more records than the bytes in use can hold
        return max(0, min(pending, used // _MIN_RECORD or 1))

    def __len__(self) -> int:
        """Same as :meth:`qsize` (an estimate under concurrency)."""
        return self.qsize()

    def __bool__(self) -> bool:
        # a queue object is always true (``if q:`` must not mean "non-empty")
        return True

    def empty(self) -> bool:
        """True when nothing is published past the consumer's freed position (estimate)."""
        return int(self.stats()["used"]) <= 0

    def full(self) -> bool:
        """True when not even the smallest item would fit now (estimate)."""
        s = self.stats()
        smallest = 1 if self.dtype is None else max(1, int(self.dtype.itemsize))
        record = int(lib.gf_record_size(smallest))
        return int(s["capacity"]) - int(s["used"]) < record

    def _seq_at_head(self, head: int, tail: int) -> int | None:
        """The sequence number of the first record at ``head`` (skipping a padding
        record), or None if what is there does not parse. Shared memory is
        untrusted and racy here: every value is range-checked, and a bad read only
        makes the estimate worse."""
        region: Any = getattr(self, "region", None)
        if region is None or tail <= head:
            return None
        mask = self.capacity - 1
        buf = bytearray(_RECORD_HEADER)
        for _ in range(2):
            idx = head & mask
            if idx % _RECORD_ALIGN:
                return None
            try:
                region.read_into(_RING_HEADER + idx, buf)
            except (E.FabricError, E.FabricValueError):
                return None
            length = int.from_bytes(buf[0:4], "little")
            kind = int.from_bytes(buf[4:8], "little")
            if kind == _PADDING:  # padding: the next record starts at the ring's beginning
                head += self.capacity - idx
                if head >= tail:
                    return None
                continue
            if kind != _DATA or length == 0:
                return None
            return int.from_bytes(buf[8:16], "little")
        return None

    # -- asyncio --------------------------------------------------------------------
    def _aio_pool(self) -> ThreadPoolExecutor:
        pool: ThreadPoolExecutor | None = self.__dict__.get("_aio_executor")
        if pool is None:
            with _POOL_LOCK:
                pool = self.__dict__.get("_aio_executor")
                if pool is None:
                    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grafos-fabric-wait")
                    self.__dict__["_aio_executor"] = pool
        return pool

    def _aio_shutdown(self) -> None:
        """Stop the worker pool (called by ``close()``); waiting workers end within a slice."""
        pool = self.__dict__.pop("_aio_executor", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _slice_wait(self, wait: Any, *args: Any) -> None:
        """One bounded wait in a worker thread; a timeout only ends the slice."""
        try:
            wait(*args, time.monotonic() + _ASYNC_SLICE)
        except TimeoutError:
            pass

    async def apop(self, timeout: float | None = None) -> Item:
        """``await`` one item without blocking the event loop.

        ``TimeoutError`` when ``timeout`` seconds pass first; ``QueueSealed`` once a
        sealed queue is drained. Cancelling the call loses no item."""
        deadline = _deadline(timeout)
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise E.QueueClosed("queue is closed")
            item = self.try_pop()
            if item is not None:
                return item
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("timed out waiting for an item")
            await loop.run_in_executor(self._aio_pool(), self._slice_wait, self._wait_readable)

    async def apush(self, buf: ItemLike, timeout: float | None = None) -> None:
        """``await`` until ``buf`` is pushed, without blocking the event loop.

        ``TimeoutError`` when ``timeout`` seconds pass first. Cancelling the call
        pushes nothing (the push itself happens on the loop's thread)."""
        deadline = _deadline(timeout)
        loop = asyncio.get_running_loop()
        nbytes = 0
        while True:
            if self.closed:
                raise E.QueueClosed("queue is closed")
            if self.try_push(buf):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("timed out waiting for space in the queue")
            if not nbytes:  # try_push has validated buf: it exports a buffer
                nbytes = max(1, memoryview(buf).nbytes)  # type: ignore[arg-type]
            await loop.run_in_executor(self._aio_pool(), self._slice_wait, self._wait_writable, nbytes)

    def __aiter__(self) -> AsyncIterator[Item]:
        """``async for item in q``: like ``for``, ends when the queue is sealed and drained."""
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Item]:
        while True:
            try:
                item = await self.apop()
            except E.QueueSealed:
                return
            yield item


_POOL_LOCK = threading.Lock()


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout or timeout < 0:
        raise E.FabricValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    return time.monotonic() + timeout
