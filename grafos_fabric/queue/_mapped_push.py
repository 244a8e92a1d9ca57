"""The mapped producer: push, push_batch and reservations, the C hot path.

Every call claims the producer role on first use (``_producer``: the role id
CAS, the role lock, takeover or fence-and-seal by a higher epoch) and then
runs one native call on the mapped ring (``native/gf_native.c``). Waiting for
space sleeps on the ring's futex in slices (``_wait_space``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from .. import errors as E
from .._ffi import ffi, lib
from .._item import Span
from .._types import ItemLike
from ._handle import _QueueHandle
from ._layout import _SPIN, FULL, OK, _batch_items, _check_int, _deadline
from ._roles import _PRODUCER_ID_OFF, _ROLE_PRODUCER, _reclaim_role, _role_id

log = logging.getLogger(__name__)


class _Reservation:
    """``with q.reserve(n) as buf:`` (see :meth:`FabricQueue.reserve`): reused, one per
    thread and handle, so a reservation costs no generator or context object."""

    __slots__ = ("active", "nbytes", "out", "p", "q", "timeout")

    def __init__(self) -> None:
        self.q: Any = None
        self.out = ffi.new("uint64_t[2]")
        self.nbytes = 0
        self.timeout: float | None = None
        self.active = False
        self.p: Any = None

    def __enter__(self) -> np.ndarray[Any, Any]:
        q = self.q
        if q is None or self.active:
            raise E.FabricValueError("enter a reservation once, right after q.reserve(n): `with q.reserve(n) as buf:`")
        nbytes = self.nbytes
        out = self.out
        plock = q._plock
        deadline: float | None = None
        first = True
        while True:
            plock.acquire()
            try:
                p = q._prod or q._producer()
                rc = lib.gf_reserve(p, nbytes, q._now(), out)
                if rc == OK:
                    break
                if rc != FULL:
                    q._raise(rc, "reserve")
            except BaseException:
                plock.release()
                self.q = None
                raise
            plock.release()
            try:
                if first:
                    deadline = _deadline(self.timeout)
                    first = False
                q._wait_space(nbytes, deadline)
            except BaseException:
                self.q = None
                raise
        self.p = p
        self.active = True
        q._reserver = threading.get_ident()
        q._reserving = True
        q._commit_len = nbytes
        off = out[0]
        # the view holds a Span that holds this handle (and so the mapping); Span checks the range
        buf = np.frombuffer(Span(q, off, nbytes, True), dtype=np.uint8)  # type: ignore[call-overload]
        dt = q.dtype
        return buf if dt is None else buf.view(dt)

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if not self.active:
            return
        q = self.q
        p = self.p
        self.active = False
        self.p = None
        self.q = None
        try:
            if et is not None:
                lib.gf_abort(p)
                return
            out = self.out
            rc = lib.gf_commit(p, q._commit_len, out + 1)
            if rc != OK:
                q._raise(rc, "commit")
            q.last_seq = out[1]
        finally:
            q._reserving = False
            q._reserver = None
            if q._give_back_after_reserve:
                q._give_back_producer(p)
            q._plock.release()


class _RowsReservation:
    """``with q.reserve_batch(n, size) as rows:`` (see :meth:`_MappedProducer.reserve_batch`):
    a small object instead of a generator-based context manager (a few µs less per batch)."""

    __slots__ = ("n", "outs", "p", "q", "size", "timeout")

    def __init__(self, q: Any, n: int, size: int, timeout: float | None) -> None:
        self.q: Any = q
        self.n = n
        self.size = size
        self.timeout = timeout
        self.outs = ffi.new("uint64_t[2]")
        self.p: Any = None

    def __enter__(self) -> np.ndarray[Any, Any]:
        if self.p is not None or self.q is None:
            raise E.FabricValueError("enter a reservation once, right after q.reserve_batch(n, size)")
        q, self.q = self.q, None
        view: np.ndarray[Any, Any] = q._enter_rows(self)
        self.q = q
        return view

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if self.p is None:
            return
        q, self.q = self.q, None
        q._exit_rows(self, et is not None)


class _MappingPin:
    """What the data-area array of a handle's native reservations is made over (with
    Span): the region, which holds the mapping, and the data area's bounds."""

    __slots__ = ("_item_info", "region")

    def __init__(self, q: _QueueHandle) -> None:
        self._item_info = q._item_info[:4]
        self.region = q.region


class _MappedProducer(_QueueHandle):
    """The producer side of a mapped handle (see the module docstring)."""

    def _producer(self) -> Any:
        p = self._prod
        if p is not None:
            return p
        with self._plock:  # two threads making the first push: one claims, the other uses it
            if self._prod is not None:
                return self._prod
            self._check_open()
            self.lease.check()
            epoch = self.epoch if self._epoch is None else self._epoch
            supported, lock = self._lock_role(_ROLE_PRODUCER)
            try:
                cur = self.epoch
                holder = int(lib.gf_load_acquire_at(self._ring, _PRODUCER_ID_OFF))
                self._admit_producer(epoch, cur, holder, supported, lock)  # gf_producer_init takes the role
                p = ffi.new("gf_producer *")
                role_id = _role_id(locked=lock is not None)
                rc = lib.gf_producer_init(
                    p, self._ring, self.region.nbytes, self._lease_ptrs[0], self._lease_ptrs[1], epoch, role_id
                )
                if rc == lib.GF_E_ROLE and self._take_over and lock is not None:
                    if _reclaim_role(self._ring, _PRODUCER_ID_OFF):
                        rc = lib.gf_producer_init(
                            p, self._ring, self.region.nbytes, self._lease_ptrs[0], self._lease_ptrs[1], epoch, role_id
                        )
                if rc != OK:
                    self._raise(rc, "claiming the producer role", epoch=epoch)
                if lock is not None:
                    self._role_locks[_ROLE_PRODUCER] = lock
                    lock = None
            finally:
                if lock is not None:
                    lock.release()
            self._epoch = epoch
            if self._fast is not None:  # pushes and reservations go natively from here
                # reservation views are slices of one array over the data area, which pins the
                # mapping through the region (not this handle: the handle holds the array)
                span = Span(_MappingPin(self), 0, self.capacity, True)
                ring = np.frombuffer(span, dtype=np.uint8)  # type: ignore[call-overload]
                self._fast.set_producer(ffi.buffer(p), ring, self._plock)
                self._fast_p = p
            self._prod = p
            return p

    # -- producing -------------------------------------------------------------------
    def _as_item(self, buf: Any) -> Any:
        """Validate one item; returns what the C call takes (bytes or a cdata)."""
        dt = self.dtype
        if isinstance(buf, str):
            raise E.FabricTypeError("items are bytes-like or numpy arrays, not str: encode str first (s.encode())")
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
        except TypeError:
            raise E.FabricTypeError(
                f"items are bytes-like objects or numpy arrays, got {type(buf).__name__}: pass bytes (or "
                "bytearray, memoryview, a numpy array)"
            ) from None
        except (BufferError, ValueError) as exc:
            raise E.DtypeMismatch(f"item must be bytes-like and contiguous: {exc}") from None

    def _slow_try_push(self, buf: ItemLike) -> bool:
        """Push one item; False when the ring is full (never waits)."""
        return self._push1(buf) is not None

    def _push1(self, buf: Any) -> int | None:
        item = buf if type(buf) is bytes and self.dtype is None else self._as_item(buf)
        n = len(item)
        p = self._prod or self._producer()
        try:
            seq = self._tls.seq
        except AttributeError:
            seq = self._tls.seq = ffi.new("uint64_t *")
        # no Python lock: the native producer serializes pushes itself
        rc = lib.gf_push(p, item, n, 0 if self._native_clock else self._clock.now_ns(), seq)
        if rc == OK:
            return seq[0]
        if rc == FULL:
            return None
        if rc == lib.GF_E_CLAIMED and self._reserver != threading.get_ident():
            with self._plock:  # another thread's reservation is open: wait for its commit
                return self._push1(buf)
        if rc == lib.GF_E_TOO_LARGE:
            raise E.ItemTooLarge(f"item of {n} bytes exceeds the queue's max_item of {self.max_item}")
        if rc == lib.GF_E_ARG and n == 0:
            raise E.FabricValueError("empty items are not allowed")
        self._raise(rc, "push")
        return None  # unreachable

    def _slow_push(self, buf: ItemLike, timeout: float | None = None) -> int:
        """Push one item, waiting for space; returns its sequence number.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first."""
        if timeout is not None and not (type(timeout) is float and timeout >= 0.0):
            _deadline(timeout)  # refuse a bad timeout even when no wait is needed
        seq = self._push1(buf)
        if seq is not None:
            return seq
        deadline = _deadline(timeout)
        n = len(self._as_item(buf))
        while True:
            self._wait_space(n, deadline)
            seq = self._push1(buf)
            if seq is not None:
                return seq

    def _check_size(self) -> None:
        """Before a blocking wait: ``Corrupted`` if a co-tenant shrank the segment under
        this mapping (a driver that can tell offers ``check_size``; one ``fstat``)."""
        check = getattr(self.region, "check_size", None)
        if check is not None:
            check()

    def _wait_space(self, nbytes: int, deadline: float | None) -> None:
        """Sleep (without the producer lock) until ``nbytes`` may fit, a slice at most."""
        p = self._prod or self._producer()
        slice_ns = self._slice(deadline)
        if slice_ns <= 0:
            raise TimeoutError("timed out waiting for space in the queue")
        self._check_size()
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
        ``TimeoutError.args[1]`` holds that count). Items of one call keep their
        order; calls from other threads may interleave with it between ring-fulls.
        """
        deadline = _deadline(timeout)
        if isinstance(bufs, np.ndarray):
            return self._push_rows(bufs, deadline, timeout)
        items = _batch_items(bufs, self._as_item)
        if not items:
            self._prod or self._producer()  # a closed handle refuses even an empty batch
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
        pushed = ffi.new("uint64_t *")
        done = 0
        offset = 0
        total = len(items)
        while done < total:
            with self._plock:
                p = self._prod or self._producer()
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

    def _push_rows(self, arr: np.ndarray[Any, Any], deadline: float | None, timeout: float | None) -> int:
        n, length = self._check_rows(arr)
        if n == 0:
            self._prod or self._producer()  # a closed handle refuses even an empty batch
            return 0
        stride = arr.strides[0]
        base = ffi.cast("uint8_t *", arr.ctypes.data)
        pushed = ffi.new("uint64_t *")
        done = 0
        while done < n:
            with self._plock:
                p = self._prod or self._producer()
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

    def _give_back_after_fast_reserve(self) -> None:
        """A native reservation ended after close() came: give the producer role back."""
        if self._give_back_after_reserve and self._fast_p is not None:
            self._give_back_producer(self._fast_p)

    _fast_p: Any = None

    def _slow_reserve(self, nbytes: int, timeout: float | None = None) -> AbstractContextManager[np.ndarray[Any, Any]]:
        """Zero-copy production: write the item in place, published on exit.

        ``with q.reserve(n) as buf: buf[:] = ...`` — ``buf`` is a writable view of
        the ring (uint8, or the queue's dtype). Leaving the block normally
        commits the item; an exception aborts it (nothing is published). Call
        ``q.commit_len(k)`` inside the block to publish only the first ``k`` bytes
        (a whole number of dtype elements). ``buf`` keeps the mapping alive (a
        view kept after the block, or after the queue is gone, never crashes;
        after the block its bytes belong to the queue again).

        While a reservation is open the handle's producer side is held: pushes
        from other threads wait for it; a push from inside the block raises.
        ``close()`` from another thread gives the producer role up only when the
        block ends.

        What it returns is a context manager to enter at once (``with``): it is
        reused by the next ``reserve`` of this thread, so a reservation makes no
        Python objects but the view.
        """
        res = getattr(self._tls, "res", None)
        if res is None or res.active:  # one reusable reservation per thread (a nested one gets its own)
            res = self._tls.res = _Reservation()
        if type(nbytes) is not int or not 0 < nbytes <= self.max_item or (
            self.dtype is not None and nbytes % self.dtype.itemsize
        ):
            nbytes = _check_int("reserve size", nbytes, 1)
            if nbytes > self.max_item:
                raise E.ItemTooLarge(f"reservation of {nbytes} bytes exceeds the queue's max_item of {self.max_item}")
            if self.dtype is not None and nbytes % self.dtype.itemsize:
                raise E.DtypeMismatch(
                    f"reservation must be a multiple of {self.dtype.itemsize} bytes for {self.dtype}"
                )
        if timeout is not None and not (type(timeout) is float and timeout >= 0.0):
            _deadline(timeout)  # refuse a bad timeout now, not inside the with statement
        res.q = self  # dropped again on exit: no lasting cycle through this handle's thread-locals
        res.nbytes = nbytes
        res.timeout = timeout
        return res

    def reserve_batch(
        self, n: int, size: int, timeout: float | None = None
    ) -> AbstractContextManager[np.ndarray[Any, Any]]:
        """Zero-copy production of many items of ``size`` bytes: ``(k, size)`` rows
        written in place, published together on exit.

        ``with q.reserve_batch(n, size) as rows: np.add(a, b, out=rows)`` —
        ``rows`` is a writable 2-D view of the ring (uint8, or the queue's dtype:
        ``(k, size // itemsize)``) of ``k`` contiguous records, ``1 <= k <= n``:
        fewer than ``n`` where the ring wraps or has room for fewer (waits, like
        :meth:`reserve`, only until one fits). Leaving the block normally
        publishes all ``k`` (one release store); ``q.commit_rows(j)`` inside it
        publishes only the first ``j``; an exception publishes none. The view
        keeps the mapping alive, as :meth:`reserve`'s does; the same rules for
        other threads and ``close()`` apply. Bad arguments raise here, before the
        ``with`` block is entered.
        """
        n = _check_int("reserve_batch rows", n, 1)
        size = _check_int("reserve size", size, 1)
        if size > self.max_item:
            raise E.ItemTooLarge(f"reservation of {size} bytes exceeds the queue's max_item of {self.max_item}")
        dt = self.dtype
        if dt is not None and size % dt.itemsize:
            raise E.DtypeMismatch(f"reservation must be a multiple of {dt.itemsize} bytes for {dt}")
        if timeout is not None and not (type(timeout) is float and timeout >= 0.0):
            _deadline(timeout)  # refuse a bad timeout now, not inside the with statement
        return _RowsReservation(self, n, size, timeout)

    def _enter_rows(self, r: _RowsReservation) -> np.ndarray[Any, Any]:
        """``_RowsReservation.__enter__``: reserve the rows (waiting for room) under the
        producer lock, which stays held until ``_exit_rows``; the ``(k, size)`` view."""
        n, size = r.n, r.size
        outs = r.outs
        plock = self._plock
        first = True
        deadline: float | None = None
        while True:
            plock.acquire()
            try:
                p = self._prod or self._producer()
                rc = lib.gf_reserve_rows(p, n, size, self._now(), outs, outs + 1)
                if rc == OK:
                    break
                if rc != FULL:
                    self._raise(rc, "reserve_batch")
            except BaseException:
                plock.release()
                raise
            plock.release()
            if first:
                deadline = _deadline(r.timeout)
                first = False
            self._wait_space(size, deadline)
        off, k = int(outs[0]), int(outs[1])
        stride = int(lib.gf_record_size(size))
        span = (k - 1) * stride + size
        if k < 1 or off + span > self.capacity:  # the native layer never does this: refuse, don't overrun
            lib.gf_abort(p)
            plock.release()
            raise E.Corrupted(f"reserve_batch: {k} rows at {off} lie outside the ring")
        try:
            # one array over the rows, made straight from a Span (it holds this handle, so the
            # mapping; it checks the range): rows `stride` bytes apart, `size` bytes each
            rows: np.ndarray[Any, Any] = np.ndarray(
                (k, size), dtype=np.uint8, buffer=Span(self, off, span, True), strides=(stride, 1)  # type: ignore[arg-type]
            )
            dt = self.dtype
            view = rows if dt is None else rows.view(dt)
        except BaseException:
            lib.gf_abort(p)
            plock.release()
            raise
        r.p = p
        self._reserver = threading.get_ident()
        self._reserving = True
        self._rows_commit = k
        return view

    def _exit_rows(self, r: _RowsReservation, failed: bool) -> None:
        """``_RowsReservation.__exit__``: commit ``_rows_commit`` rows (abort when the block
        raised), then give the producer lock back."""
        p = r.p
        r.p = None
        try:
            if failed:
                lib.gf_abort(p)
                return
            outs = r.outs
            k = self._rows_commit
            rc = lib.gf_commit_rows(p, k, outs)
            if rc != OK:
                self._raise(rc, "commit")
            self.last_seq = int(outs[0]) + k - 1
        finally:
            self._rows_commit = 0
            self._reserving = False
            self._reserver = None
            if self._give_back_after_reserve:
                self._give_back_producer(p)
            self._plock.release()

    _rows_commit = 0

    def commit_rows(self, k: int) -> None:
        """Inside ``reserve_batch()``: publish only the first ``k`` rows."""
        self._check_open()
        if not self._rows_commit:
            raise E.FabricValueError("commit_rows is for inside a reserve_batch() block")
        k = _check_int("commit rows", k, 1)
        if k > self._rows_commit:
            raise E.FabricValueError(f"commit_rows needs k in (0, {self._rows_commit}] inside reserve_batch")
        self._rows_commit = k

    # _commit_len and last_seq (-1 until an item is reserved here) are attributes of QueueBase

    def commit_len(self, nbytes: int) -> None:
        """Inside ``reserve()``: publish only the first ``nbytes`` bytes (a whole
        number of the queue's dtype elements)."""
        self._check_open()
        if not self._reserving:
            raise E.FabricValueError("commit_len is for inside a reserve() block")
        nbytes = _check_int("commit length", nbytes, 1)
        if nbytes > self._commit_len:
            raise E.FabricValueError(f"commit length must be in (0, {self._commit_len}]")
        dt = self.dtype
        if dt is not None and nbytes % dt.itemsize:
            raise E.DtypeMismatch(f"commit length must be a multiple of {dt.itemsize} bytes for {dt}")
        self._commit_len = nbytes

    # -- consuming -------------------------------------------------------------------
    def _wait_writable(self, nbytes: int, deadline: float | None) -> None:
        """Wait (GIL released) until ``nbytes`` may fit, for the asyncio worker."""
        self._wait_space(nbytes, deadline)

    def _give_back_producer(self, p: Any) -> None:
        lib.gf_producer_close(p)  # takes the native producer lock: no push is mid-copy after it
        lock = self._role_locks.pop(_ROLE_PRODUCER, None)
        if lock is not None:
            lock.release()
