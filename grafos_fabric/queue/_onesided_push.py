"""The one-sided producer: frame records locally, WRITE them, CAS the tail to publish.

See ``_onesided``'s docstring for the protocol; the framing itself is the ring
core's (``gf_ring_frame`` / ``gf_ring_reserve_in`` in C)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .. import errors as E
from .._ffi import ffi, lib
from .._types import ItemLike
from ._layout import RECORD_HEADER, RING_HEADER, _batch_items, _check_int, _deadline
from ._onesided_handle import (
    _EPOCH,
    _FULL,
    _HEAD,
    _NEXT_SEQ,
    _NO_PAD,
    _OK,
    _PRODUCER_ID,
    _SPACE_WAITERS,
    _TAIL,
    _U64,
    _Backoff,
    _LocalBuffer,
    _OneSidedHandle,
    _rec_size,
)
from ._roles import _ROLE_PRODUCER, _role_id

log = logging.getLogger(__name__)

#: items at least this big are pushed without a copy into the staging image where the region
#: publishes from the caller's memory (UCX): the record then takes two or three puts instead
#: of one, all posted in the same call (not tuned: tests/test_ucx_publish.py checks the path,
#: bench_ucx measures it only at 1 MiB)
DIRECT_MIN = 64 << 10
#: the most spans one publish of items pushed without a copy carries (gfu_publish takes 64)
DIRECT_SPANS = 64
#: write-behind: publications left unconfirmed when a push returns (set_write_behind's default
#: depth, and the most it takes: a handle holds up to depth + 1 of its endpoint's GFU_PUB_SLOTS
#: (16) publication slots, which every queue handle on that endpoint shares)
WRITE_BEHIND_DEPTH = 1
WRITE_BEHIND_MAX_DEPTH = 4


def _span(spans: list[tuple[int, int, int]], addr: int, n: int, off: int) -> None:
    """Append a span of the staging image, merged into the last one where both continue it."""
    if spans:
        a, m, o = spans[-1]
        if a + m == addr and o + m == off:
            spans[-1] = (a, m + n, o)
            return
    spans.append((addr, n, off))


class _OneSidedProducer(_OneSidedHandle):
    """The producer side of a one-sided handle (see the module docstring)."""

    # -- producing -------------------------------------------------------------------
    def _producer(self) -> Any:
        p = self._p
        if p is not None:
            return p
        with self._plock:
            if self._p is not None:
                return self._p
            self._check_live()
            r = self.region
            epoch = self.epoch if self._epoch is None else self._epoch
            supported, lock = self._lock_role(_ROLE_PRODUCER)
            try:
                pid = _role_id(locked=lock is not None)
                cur = r.load64(_EPOCH)
                holder = r.load64(_PRODUCER_ID)
                if self._admit_producer(epoch, cur, holder, supported, lock) == lib.GF_CLAIM_TAKEOVER:
                    self.advance_epoch(epoch)
                    r.store64(_PRODUCER_ID, pid)  # take over: the old holder is gone (or there was none)
                elif lib.gf_ring_claimed(r.cas64(_PRODUCER_ID, 0, pid), pid) != _OK:
                    raise E.RoleTaken("another process holds this role on the queue: claiming the producer role")
                try:
                    w = r.load64(_TAIL)  # SYNC POINT: ring-publish
                    head = r.load64(_HEAD)  # SYNC POINT: ring-release
                    next_seq = r.load64(_NEXT_SEQ)
                    p = ffi.new("gf_producer *")
                    rc = int(lib.gf_ring_prod_start(p, self.capacity, self.max_item, epoch, w, head, next_seq))
                    if rc != _OK:  # the core also refuses a next_seq within 2**40 of wrapping (GF_SEQ_LIMIT)
                        raise self._ring_error(rc, "claiming the producer role", epoch, w)
                except BaseException:
                    r.cas64(_PRODUCER_ID, pid, 0)
                    raise
                p.id = pid
                if lock is not None:
                    self._role_locks[_ROLE_PRODUCER] = lock
                    lock = None
            finally:
                if lock is not None:
                    lock.release()
            self._epoch = epoch
            self._p = p
            self._announce()
            return p

    def _producer_ready(self) -> Any:
        self._check_live()
        if self._wb_error is not None:
            raise self._wb_failed()
        p = self._p or self._producer()
        if p.reserved:
            raise E.FabricValueError("a reservation is outstanding: commit or abort it first")
        return p

    def _ring_error(self, rc: int, what: str, epoch: int, w: int) -> Exception:
        """The typed error for a refusal of the core (sealed, fenced, corrupt)."""
        if rc == lib.GF_E_SEALED:
            return self._sealed_error(what)
        if rc == lib.GF_E_FENCED:
            return E.StaleEpoch(f"{what}: fenced", epoch=epoch, current=self.region.load64(_EPOCH))
        return E.Corrupted(f"{what}: the ring's positions or sequence number make no sense (tail word {w:#x})")

    def _check_owner(self, p: Any, what: str) -> None:
        """Is the tail word still ours (``gf_ring_owns``)? Checked before writing a
        byte, as the mapped producer does."""
        w = self.region.load64(_TAIL)  # SYNC POINT: ring-publish
        if lib.gf_ring_owns(p, w) == _OK:
            return
        raise self._lost_tail(p, w, what)

    def _lost_tail(self, p: Any, w: int, what: str) -> Exception:
        """The tail word isn't what this producer published: why, as the core
        judges it (``gf_ring_lost_tail``) with the epoch as it is now."""
        cur = self.region.load64(_EPOCH)
        rc = int(lib.gf_ring_lost_tail(p, w, cur))
        if rc == lib.GF_E_CORRUPT:
            return E.Corrupted(f"{what}: the ring's tail word ({w:#x}) was rewritten outside the protocol")
        if rc == lib.GF_E_FENCED:
            return E.StaleEpoch(f"{what}: fenced", epoch=int(p.epoch), current=cur)
        return self._ring_error(rc, what, int(p.epoch), w)

    def _refresh_head(self, p: Any) -> None:
        h = self.region.load64(_HEAD)  # SYNC POINT: ring-release
        if lib.gf_ring_set_head(p, h) != _OK:
            raise E.Corrupted(f"the ring's head ({h}) is outside [{p.head_cache}, {p.tail}]")

    def _seen_head(self, p: Any, h: int) -> None:
        """A head word a publication read (after its CAS, so at most the tail it published): into
        the head cache where it moves it on. The core checks it as a loaded one; an older reading
        than the cache (a later publication confirmed first cannot happen, but a reading may lag
        a load made meanwhile) is left out."""
        if p is None or h < int(p.head_cache):
            return
        if lib.gf_ring_set_head(p, h) != _OK:
            raise E.Corrupted(f"the ring's head ({h}) is outside [{p.head_cache}, {p.tail}]")

    def _stage(self) -> _LocalBuffer:
        """The staging image: local memory laid out like the ring's data area
        (index = position & mask), where the core frames records before they are
        written out; a frame never holds more than the ring's free space."""
        st = self._staging
        if st is None:
            st = self._staging = _LocalBuffer(self.fabric, self.capacity)
            self._locals.append(st)
        return st

    def _begin(self, p: Any) -> None:
        self._f_start = int(p.claim)
        self._f_pad = _NO_PAD
        self._zc.clear()

    def _reserve_in(self, p: Any, st: _LocalBuffer, nbytes: int, refresh: bool = True) -> tuple[int, bool]:
        """``gf_ring_reserve_in`` of a record of ``nbytes`` in the staging image (its payload index
        in ``self._io[0]``, the padding record's in ``self._io[2]``), once more after a load of
        head when it does not fit and ``refresh``. Returns the status and whether head was loaded."""
        out = self._io
        out[2] = _NO_PAD
        rc = int(lib.gf_ring_reserve_in(p, st.ptr, nbytes, out, out + 2))
        if rc != _FULL or not refresh:
            return rc, False
        self._refresh_head(p)
        return int(lib.gf_ring_reserve_in(p, st.ptr, nbytes, out, out + 2)), True

    def _direct_ok(self, nbytes: int) -> bool:
        """Whether items of ``nbytes`` go out without a copy (:meth:`_direct`): big enough that
        the copy into the staging image costs more than two more puts, and a region that can
        publish from the caller's memory (``publish``: UCX)."""
        return nbytes >= DIRECT_MIN and getattr(self.region, "publish", None) is not None

    def _direct(self, p: Any, st: _LocalBuffer, addr: int, n: int, count: int, stride: int) -> int:
        """Frame ``count`` items of ``n`` bytes (at ``addr``, ``stride`` bytes apart) without
        copying them: the core reserves each record in the staging image and writes its header
        there (``gf_ring_reserve_in`` / ``gf_ring_commit_in``, as ``reserve`` does), and the
        record's spans go into ``self._zc`` for ``publish``: the padding record's header at a
        wrap, the record's header and tail padding from the staging image, the payload straight
        from the caller's memory. As many as the head cache says fit, then, after one load of
        head, as many more as fit (and as ``publish`` takes). Returns how many were framed."""
        out, zc, mask = self._io, self._zc, self._mask
        base = st.addr
        refreshed = False
        done = 0
        while done < count and len(zc) + 4 <= DIRECT_SPANS:
            claim = int(p.claim) & mask
            rc, loaded = self._reserve_in(p, st, n, refresh=not refreshed)
            refreshed = refreshed or loaded
            if rc == _FULL:
                break
            if rc != _OK:
                raise E.FabricValueError(f"cannot frame this item (status {rc})")  # checked before: unreachable
            off, pad = int(out[0]), int(out[2])
            rc = int(lib.gf_ring_commit_in(p, st.ptr, n, out))
            if rc != _OK:
                lib.gf_ring_abort_in(p)
                raise E.FabricValueError(f"cannot frame this item (status {rc})")  # unreachable
            if pad != _NO_PAD:
                _span(zc, base + claim, pad + RECORD_HEADER - claim, RING_HEADER + claim)
            _span(zc, base + off - RECORD_HEADER, RECORD_HEADER, RING_HEADER + off - RECORD_HEADER)
            zc.append((addr + done * stride, n, RING_HEADER + off))
            tail = _rec_size(n) - RECORD_HEADER - n
            if tail:
                zc.append((base + off + n, tail, RING_HEADER + off + n))
            done += 1
        return done

    def _frame(self, p: Any, st: _LocalBuffer, src: Any, lens: Any, n: int, row_len: int, row_stride: int) -> int:
        """Frame items into the staging image with the core (``gf_ring_frame``),
        from item ``self._io[0]`` on: as many as the head cache says fit, then,
        after one load of head, as many more as fit. Returns how many were framed."""
        io = self._io
        before = int(io[0])
        io[2] = self._f_pad
        refreshed = False
        while True:
            rc = int(lib.gf_ring_frame(p, st.ptr, src, lens, n, row_len, row_stride, io))
            if rc == _OK:
                break
            if rc != _FULL:
                raise E.FabricValueError(f"cannot frame this item (status {rc})")  # checked before: unreachable
            if refreshed:
                break
            self._refresh_head(p)
            refreshed = True
        self._f_pad = int(io[2])
        return int(io[0]) - before

    def _write_frame(self, p: Any, st: _LocalBuffer) -> None:
        """WRITE the framed records: one write per contiguous span of the ring
        (up to the padding record's header, then from index 0, at the wrap)."""
        start, end = self._f_start, int(p.claim)
        if end == start:
            return
        idx = start & self._mask
        if idx + (end - start) <= self.capacity:
            self.region.write(RING_HEADER + idx, st.array[idx : idx + (end - start)])
            return
        first = self._f_pad + RECORD_HEADER if self._f_pad != _NO_PAD else self.capacity
        self.region.write(RING_HEADER + idx, st.array[idx:first])
        self.region.write(RING_HEADER, st.array[: end & self._mask])

    def _spans(self, p: Any, st: _LocalBuffer) -> list[tuple[int, int, int]]:
        """The frame's spans as ``publish`` takes them, the same as :meth:`_write_frame`'s
        writes: (address, length, region offset) of the records up to the wrap, then of
        those past it. The records of items pushed without a copy (:meth:`_direct`) are
        already in ``self._zc``: their spans are those."""
        zc = self._zc
        if zc:
            return zc
        start, end = self._f_start, int(p.claim)
        idx = start & self._mask
        if idx + (end - start) <= self.capacity:
            return [(st.addr + idx, end - start, RING_HEADER + idx)]
        first = self._f_pad + RECORD_HEADER if self._f_pad != _NO_PAD else self.capacity
        return [(st.addr + idx, first - idx, RING_HEADER + idx), (st.addr, end & self._mask, RING_HEADER)]

    def _publish(self, p: Any, st: _LocalBuffer, what: str) -> None:
        """Write the frame, store next_seq, then CAS the tail word (fenced at the
        target): the arguments and the outcome are the core's. A region with a
        ``publish`` operation (UCX) does all three in one call, the CAS ordered
        after the WRITEs at the target without waiting for them first."""
        head = -1
        try:
            r: Any = self.region  # publish, publish_post: optional operations (UCX regions have them)
            publish = getattr(r, "publish", None)
            if publish is not None:
                if p.claim == p.tail:
                    return
                expected = int(lib.gf_ring_publish_expected(p))
                if self._wb:
                    token = r.publish_post(self._spans(p, st), _NEXT_SEQ, int(p.next_seq), _TAIL, expected,
                                           int(lib.gf_ring_publish_desired(p)), _HEAD)
                    lib.gf_ring_published(p, expected)  # as if confirmed: the next CAS expects this one's tail
                    self._inflight.append((token, expected, what))
                    if len(self._inflight) > self._wb_depth:
                        self._settle(1)
                    return
                # the head word read with it (after the CAS): the head cache for free, no load later
                found, head = publish(self._spans(p, st), _NEXT_SEQ, int(p.next_seq),
                                      _TAIL, expected, int(lib.gf_ring_publish_desired(p)), _HEAD)
            else:
                self._write_frame(p, st)
                if p.claim == p.tail:
                    return
                r.store64(_NEXT_SEQ, int(p.next_seq))  # a release: the record WRITEs are complete before it
                # SYNC POINT: ring-publish (records and next_seq before the tail word)
                found = r.cas64(_TAIL, int(lib.gf_ring_publish_expected(p)), int(lib.gf_ring_publish_desired(p)))
        except BaseException:
            lib.gf_ring_rollback(p)
            raise
        finally:
            self._f_start = int(p.claim)
            self._f_pad = _NO_PAD
            self._zc.clear()
        if lib.gf_ring_published(p, found) != _OK:
            raise self._lost_tail(p, found, what)
        self._seen_head(p, head)

    def _full(self, p: Any, what: str) -> None:
        """Nothing fit: raise if that is because the ring is sealed or we are fenced."""
        self._settle(len(self._inflight))
        self._check_owner(p, what)

    # -- write-behind ---------------------------------------------------------------
    def set_write_behind(self, on: bool = True, depth: int = WRITE_BEHIND_DEPTH) -> None:
        """Write-behind publication (off by default; regions with ``publish_post``: UCX).

        On: a push returns once its records were handed to the transport (the
        caller's buffer may be reused) with their publication, the tail CAS, in
        flight; it is confirmed during a later push (at most ``depth``, default
        1, up to ``WRITE_BEHIND_MAX_DEPTH``, stay unconfirmed), by :meth:`flush`,
        or by ``close``. The next item's records then stream while the previous
        one's CAS travels, instead of the producer waiting a round trip per
        item. The price: an item is in the queue only once its publication is
        confirmed, and a publication that fails (the queue sealed, the
        producer fenced, the node gone) raises at that confirmation, from a
        later call, and the unconfirmed items are not in the queue (a
        pipeline's replay window re-sends them after it relocates). Every
        later call raises the same error. No owner check is made per push (it
        would wait behind the records in flight): the CAS chain refuses a
        tail someone else moved, and a live holder is never taken over in
        place (the queue is sealed instead). Off: pending publications are
        confirmed first (:meth:`flush`)."""
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= WRITE_BEHIND_MAX_DEPTH:
            raise E.FabricValueError(f"depth must be an int in [1, {WRITE_BEHIND_MAX_DEPTH}], got {depth!r}")
        with self._plock:
            if on and getattr(self.region, "publish_post", None) is None:
                raise E.Unsupported(f"write-behind needs a region that can post a publication "
                                    f"({type(self.region).__name__} cannot)")
            if not on:
                self._settle(len(self._inflight))
            elif len(self._inflight) > depth:
                self._settle(len(self._inflight) - depth)
            self._wb = bool(on)
            self._wb_depth = depth

    def flush(self) -> None:
        """Confirm every publication still in flight (write-behind); raises the first one's
        error (then every later push raises it too). Returns at once when none is."""
        with self._plock:
            if self._wb_error is not None:
                raise self._wb_failed()
            self._settle(len(self._inflight))

    def _settle(self, n: int) -> None:
        """Confirm the ``n`` oldest publications in flight. A CAS that found another tail word
        (or a failed wait) ends write-behind on this handle: the rest are waited for (they can
        only fail too: each expects the one before it), and the error is raised, now and by
        every later push."""
        inflight = self._inflight
        r: Any = self.region
        while n > 0 and inflight:
            token, expected, what = inflight.popleft()
            n -= 1
            try:
                found, head = r.publish_wait(token)
                if found == expected:
                    self._seen_head(self._p, head)
                    continue
                err: BaseException = self._lost_tail(self._p, found, what)
            except (E.FabricError, E.FabricValueError) as exc:
                err = exc
            self._wb_error = err
            while inflight:  # leave nothing in flight on the endpoint
                try:
                    r.publish_wait(inflight.popleft()[0])
                except (E.FabricError, E.FabricValueError) as exc:
                    log.debug("a publication after a failed one: %s", exc)
            raise self._wb_failed()

    def _wb_failed(self) -> BaseException:
        """The error that ended write-behind on this handle, raised again: a copy (its
        arguments and attributes, e.g. ``epoch``/``seal_seq``) chained to the first."""
        err = self._wb_error
        assert err is not None
        try:
            again = copy.copy(err)
        except Exception:
            return err
        again.__cause__ = err
        return again

    def _item_bytes(self, buf: Any) -> np.ndarray[Any, Any]:
        item = self._as_item(buf)
        if isinstance(item, bytes):
            return np.frombuffer(item, dtype=np.uint8)
        return np.frombuffer(ffi.buffer(item), dtype=np.uint8)

    def try_push(self, buf: ItemLike) -> bool:
        """Push one item; False when the ring is full (never waits)."""
        with self._plock:
            return self._push1(buf) is not None

    def _push1(self, buf: Any) -> int | None:
        p = self._producer_ready()
        src = self._item_bytes(buf)
        n = src.nbytes
        if n == 0:
            raise E.FabricValueError("empty items are not allowed")
        if n > self.max_item:
            raise E.ItemTooLarge(f"item of {n} bytes exceeds the queue's max_item of {self.max_item}")
        if not self._wb:
            self._check_owner(p, "push")
        st = self._stage()
        self._begin(p)
        if self._direct_ok(n):
            framed = self._direct(p, st, src.ctypes.data, n, 1, n)  # src lives until the publish returns
        else:
            self._io[0] = self._io[1] = 0
            framed = self._frame(p, st, ffi.from_buffer("char[]", src), ffi.NULL, 1, n, n)
        if not framed:
            self._full(p, "push")
            return None
        seq = int(p.next_seq) - 1
        self._publish(p, st, "push")
        return seq

    def push(self, buf: ItemLike, timeout: float | None = None) -> int:
        """Push one item, polling for space; returns its sequence number.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first."""
        deadline = _deadline(timeout)
        while True:
            with self._plock:
                seq = self._push1(buf)
            if seq is not None:
                return seq
            self._wait_space(len(self._item_bytes(buf)), deadline)

    def _wait_space(self, nbytes: int, deadline: float | None) -> None:
        """Poll ``head`` until a record of ``nbytes`` fits, counting this producer in
        ``space_waiters`` meanwhile; raises on seal, fencing, expiry, or timeout."""
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("timed out waiting for space in the queue")  # timeout=0: no remote op
        r = self.region
        backoff = _Backoff(deadline)
        counted = False
        try:
            while True:
                with self._plock:  # each poll under the producer lock; the pause without it
                    p = self._producer_ready()
                    need = int(lib.gf_ring_need(p, nbytes))
                    self.lease.check()
                    self._refresh_head(p)
                    if lib.gf_ring_room(p, need):
                        return
                    self._check_owner(p, "waiting for space")
                    if not counted:
                        r.faa64(_SPACE_WAITERS, 1)
                        counted = True
                        continue  # re-check head once now that a consumer can see us
                backoff.pause("space in the queue")
        finally:
            if counted:
                try:
                    r.faa64(_SPACE_WAITERS, _U64)  # -1
                except (E.FabricError, E.FabricValueError) as exc:
                    log.debug("could not uncount a space waiter: %s", exc)

    def push_batch(self, bufs: Sequence[Any] | np.ndarray[Any, Any], timeout: float | None = None) -> int:
        """Push many items: framed locally (in C), one WRITE per contiguous span and
        one tail CAS per frame; returns how many were pushed.

        ``bufs`` is a 2-D array whose rows are the items (the fast path), or a
        sequence of bytes-like items. With ``timeout=0`` it pushes what fits and
        returns; otherwise it waits for space until all are pushed (or raises
        ``TimeoutError``, after which the items counted so far are in the queue:
        ``TimeoutError.args[1]`` holds that count).
        """
        with self._plock:
            p = self._producer_ready()
            deadline = _deadline(timeout)
            if isinstance(bufs, np.ndarray):
                n, length = self._check_rows(bufs)
                if n == 0:
                    return 0
                if self._direct_ok(length):  # bufs stays alive and unchanged: it is an argument
                    return self._push_frames(p, bufs.ctypes.data, None, n, length, bufs.strides[0], deadline, timeout)
                base = ffi.cast("char *", bufs.ctypes.data)  # bufs stays alive: it is an argument
                return self._push_frames(p, base, ffi.NULL, n, length, bufs.strides[0], deadline, timeout)
            items = _batch_items(bufs, self._item_bytes)
            if not items:
                return 0
            lens = np.fromiter((a.nbytes for a in items), dtype=np.uint64, count=len(items))
            if int(lens.min()) == 0:
                raise E.FabricValueError("empty items are not allowed")
            big = int(lens.max())
            if big > self.max_item:
                raise E.ItemTooLarge(f"item of {big} bytes exceeds the queue's max_item of {self.max_item}")
            blob = np.concatenate(items)
            src = ffi.from_buffer("char[]", blob)
            lptr = ffi.from_buffer("uint64_t[]", lens)
            return self._push_frames(p, src, lptr, len(items), 0, 0, deadline, timeout)

    def _push_frames(
        self,
        p: Any,
        src: Any,
        lens: Any,
        total: int,
        row_len: int,
        row_stride: int,
        deadline: float | None,
        timeout: float | None,
    ) -> int:
        """Frame and publish ``total`` items (rows of ``row_len`` bytes
        ``row_stride`` apart at ``src``, or, with ``lens``, payloads of those
        lengths concatenated at ``src``; with ``lens`` None, ``src`` is the rows'
        address and they go out without a copy: :meth:`_direct`), a frame at a time; waits for space
        between frames unless ``timeout`` is 0. Where it stands (items done, their
        source bytes) is kept here, not in ``self._io``: another thread pushes
        through this handle while this one waits without the lock."""
        st = self._stage()
        io = self._io
        done = offset = 0
        while done < total:
            if not self._wb:
                self._check_owner(p, "push_batch")
            self._begin(p)
            if lens is None:  # rows pushed without a copy: src is their address
                framed = self._direct(p, st, src + done * row_stride, row_len, total - done, row_stride)
                done += framed
            else:
                io[0], io[1] = done, offset
                framed = self._frame(p, st, src, lens, total, row_len, row_stride)
            if framed:
                if lens is not None:
                    done, offset = int(io[0]), int(io[1])
                self._publish(p, st, "push_batch")
                continue
            self._full(p, "push_batch")
            if timeout == 0:
                return done
            try:
                self._wait_unlocked(int(lens[done]) if lens is not None and lens != ffi.NULL else row_len, deadline)
            except TimeoutError:
                raise TimeoutError("timed out waiting for space in the queue", done) from None
            p = self._producer_ready()
        return done

    def _wait_unlocked(self, nbytes: int, deadline: float | None) -> None:
        """``_wait_space`` from inside a ``with self._plock`` block: the lock is let
        go for the wait (other threads push, ``close`` proceeds) and taken back."""
        self._plock.release()
        try:
            self._wait_space(nbytes, deadline)
        finally:
            self._plock.acquire()

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[np.ndarray[Any, Any]]:
        """Production in a local buffer, published on exit.

        ``with q.reserve(n) as buf: buf[:] = ...`` — space in the ring is
        claimed first (waiting for it, like ``push``); ``buf`` is a writable view
        of this handle's staging image (uint8, or the queue's dtype), *not* of
        the ring: leaving the block normally copies the record into the ring
        with one WRITE and publishes it (so one-sided reserve/commit copies on
        commit). An exception aborts it (nothing is written or published). Call
        ``q.commit_len(k)`` inside the block to publish only the first ``k`` bytes.
        """
        nbytes = _check_int("reserve size", nbytes, 1)
        with self._plock:
            p = self._producer_ready()
            if nbytes > self.max_item:
                raise E.ItemTooLarge(f"reservation of {nbytes} bytes exceeds the queue's max_item of {self.max_item}")
            if self.dtype is not None and nbytes % self.dtype.itemsize:
                raise E.DtypeMismatch(f"reservation must be a multiple of {self.dtype.itemsize} bytes for {self.dtype}")
            deadline = _deadline(timeout)
            st = self._stage()
            out = self._io
            while True:
                if not self._wb:
                    self._check_owner(p, "reserve")
                self._begin(p)
                rc = self._reserve_in(p, st, nbytes)[0]
                if rc == _OK:
                    break
                if rc != _FULL:
                    raise E.FabricValueError(f"cannot reserve {nbytes} bytes (status {rc})")  # checked before
                self._full(p, "reserve")
                self._wait_unlocked(nbytes, deadline)
                p = self._producer_ready()
            off = int(out[0])
            self._f_pad = int(out[2])
            self._reserving = True
            self._commit_len = nbytes
            buf = st.array[off : off + nbytes]
            try:
                yield buf if self.dtype is None else buf.view(self.dtype)
            except BaseException:
                lib.gf_ring_abort_in(p)
                self._reserving = False
                raise
            self._reserving = False
            rc = int(lib.gf_ring_commit_in(p, st.ptr, self._commit_len, out))
            if rc != _OK:
                lib.gf_ring_abort_in(p)
                raise E.FabricValueError(f"cannot commit {self._commit_len} bytes (status {rc})")
            seq = int(out[0])
            self._publish(p, st, "commit")
            self.last_seq = seq

    @contextmanager
    def reserve_batch(self, n: int, size: int, timeout: float | None = None) -> Iterator[np.ndarray[Any, Any]]:
        """Up to ``n`` items of ``size`` bytes written in a local ``(n, size)`` buffer,
        published on exit with one ``push_batch`` (one-sided: copied on commit, like
        :meth:`reserve`). ``q.commit_rows(k)`` inside the block publishes only the
        first ``k``; an exception publishes none."""
        n = _check_int("reserve_batch rows", n, 1, 1 << 32)
        size = _check_int("reserve size", size, 1)
        if size > self.max_item:
            raise E.ItemTooLarge(f"reservation of {size} bytes exceeds the queue's max_item of {self.max_item}")
        dt = self.dtype
        if dt is not None and size % dt.itemsize:
            raise E.DtypeMismatch(f"reservation must be a multiple of {dt.itemsize} bytes for {dt}")
        n = min(n, max(1, self.capacity // _rec_size(size)))
        rows = np.zeros((n, size), dtype=np.uint8)
        view = rows if dt is None else rows.view(dt)
        outer = self._rows_commit
        self._rows_commit = n
        try:
            yield view
            k = self._rows_commit
        finally:
            self._rows_commit = outer
        self.push_batch(view[:k], timeout=timeout)
