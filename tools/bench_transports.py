"""The transports ``grafos-bench`` measures, and the loops that drive them.

Each transport is a :class:`Transport`: the parent calls :meth:`Transport.setup`
once per case (it creates the queue, socket address or fabric queue and
returns a picklable *handle*), then starts a producer and a consumer process
that call :meth:`Transport.producer` and :meth:`Transport.consumer` with that
handle, and finally calls :meth:`Transport.teardown`.

Every process runs the same two drivers, :func:`drive_producer` and
:func:`drive_consumer`; a transport only supplies the *step* closures that do
the transport's own calls in a tight loop:

* a producer step pushes a fixed number of items (a chunk of single calls, or
  one batch) and returns how many it pushed;
* a consumer step takes up to ``limit`` items, reads every byte of each
  payload (:func:`toucher` per item; :func:`touch_array` / :func:`touch_many`
  once per batch) and returns how many it took, 0 when nothing came within
  :data:`POLL_S`.

End of stream: the producer pushes for ``duration`` seconds, then publishes
its count in the shared ``total``; the consumer stops once it has taken that
many. (A count fixed in advance cannot fit one duration to transports whose
rates differ a hundredfold; a count published at the end ends the stream just
as exactly.) The consumer times the stream itself, from the first step after a short
warm-up to its last item, so process start-up and teardown are never counted.

Why one module of ~900 lines: one short, independent :class:`Transport` per
peer (``mp.Queue``, faster-fifo, zmq, zmq packed, the fabric queue, a bare
shared-memory pipe) beside the two drivers they share; the forkserver imports
it whole (below), and a module per peer would only scatter that one table.

This module is imported by the forkserver before it forks the workers, so it
imports every installed peer at module level (missing peers are ``None``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def _optional(module: str) -> Any:
    """The module, or None when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the environment
        return None


faster_fifo: Any = _optional("faster_fifo")  # peer
zmq: Any = _optional("zmq")  # peer

log = logging.getLogger(__name__)

#: How long a consumer step waits for an item before it returns 0 and the
#: consumer re-reads the producer's published total.
POLL_S = 0.05
#: Payloads up to this size are touched with zlib.adler32 (cheapest per call);
#: larger ones with a numpy reduction over a uint64 view (memory-bandwidth bound).
SMALL_TOUCH = 512
#: A worker that sees no progress for this long gives up with an error.
STALL_S = 30.0

ProducerStep = Callable[[], int]
ConsumerStep = Callable[[int], int]


@dataclass(frozen=True)
class CaseSpec:
    """One measurement: a transport, a mode and an item size."""

    transport: str
    mode: str  # "single", "batch" or "reserve"
    size: int
    duration: float
    batch: int  # items per batch call (batch mode)
    chunk: int  # single-call items between clock reads (producer) / total checks (consumer)
    capacity: int  # bytes of buffering allowed (the fabric ring; peers get the same)
    warmup: float  # seconds of the stream the consumer leaves out of the timing

    @property
    def name(self) -> str:
        return f"{self.transport}/{self.mode}/{fmt_size(self.size)}"


def fmt_size(n: int) -> str:
    """``64`` -> ``"64 B"``, ``4096`` -> ``"4 KiB"``, ``1 << 20`` -> ``"1 MiB"``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------
# Touching payloads: read every byte, the same way for every transport.


def touch(buf: Any) -> int:
    """Read every byte of one payload (any C-contiguous buffer) and fold it to an int."""
    n = memoryview(buf).nbytes
    if n <= SMALL_TOUCH:
        return zlib.adler32(buf)
    if n % 8 == 0:
        return int(np.frombuffer(buf, dtype=np.uint64).sum())
    return int(np.frombuffer(buf, dtype=np.uint8).sum(dtype=np.uint64))


def toucher(size: int) -> Callable[[Any], int]:
    """The cheapest :func:`touch` equivalent for payloads of ``size`` bytes."""
    if size <= SMALL_TOUCH:
        return zlib.adler32
    if size % 8 == 0:
        return lambda buf: int(np.frombuffer(buf, dtype=np.uint64).sum())
    return lambda buf: int(np.frombuffer(buf, dtype=np.uint8).sum(dtype=np.uint64))


def touch_array(arr: np.ndarray) -> int:
    """Read every byte of a (possibly row-strided) uint8 array of items in one reduction."""
    if arr.ndim >= 1 and arr.shape[-1] % 8 == 0 and arr.strides[-1] == arr.itemsize:
        return int(arr.view(np.uint64).sum())
    return int(arr.sum(dtype=np.uint64))


def touch_many(bufs: Sequence[Any]) -> int:
    """Read every byte of a list of received payloads: one join, one reduction.

    This is the fastest way we found to touch a peer's batch from Python
    (a per-item loop costs more than the copy the join makes).
    """
    return touch(b"".join(bufs))


def _operands(size: int, rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 arrays (``(rows, size)`` with rows) whose sum is the produced item
    (the reserve/produce cases: production in place against production then copy-in)."""
    rng = np.random.default_rng(3)
    shape: tuple[int, ...] = (rows, size) if rows else (size,)
    return rng.integers(0, 128, shape, dtype=np.uint8), rng.integers(0, 128, shape, dtype=np.uint8)


def make_payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-constant payload bytes of ``size``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def make_payloads(size: int, n: int) -> list[bytes]:
    """``n`` distinct payload objects for one batch.

    Distinct objects matter: pickle memoizes an object repeated in a list, so
    ``[payload] * n`` would send one payload and ``n - 1`` back-references.
    """
    rows = np.random.default_rng(2).integers(0, 256, (n, size), dtype=np.uint8)
    return [row.tobytes() for row in rows]


# ---------------------------------------------------------------------------
# Drivers shared by every transport.


def drive_producer(step: ProducerStep, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
    """Wait until the consumer is ready, run ``step`` for ``spec.duration`` seconds, publish the count."""
    if not ctl["ready"].wait(STALL_S):
        raise TimeoutError("consumer never became ready")
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + spec.duration
    while time.perf_counter() < deadline:
        n += step()
    t1 = time.perf_counter()
    ctl["total"].value = n
    return {"role": "producer", "pushed": n, "seconds": t1 - t0}


def drive_consumer(step: ConsumerStep, spec: CaseSpec, ctl: dict[str, Any], limit: int) -> dict[str, Any]:
    """Take items with ``step`` until the producer's published total is reached; time the stream.

    ``limit`` is the most items one step may take (the chunk or batch size);
    near the end it shrinks so the consumer never waits for items that will
    not come. The timed window starts at the first step ending ``spec.warmup``
    seconds after the first item and ends with the last item.
    """
    total = ctl["total"]
    ctl["ready"].set()
    count = 0
    idle_since = time.perf_counter()
    while count == 0:  # the first item starts the clock
        count = step(limit)
        if count == 0 and time.perf_counter() - idle_since > STALL_S:
            raise TimeoutError("no item arrived")
    t_first = t_last = time.perf_counter()
    first = count
    t0, c0 = t_first, count
    warm = spec.warmup <= 0
    while True:
        tot = total.value
        if tot >= 0:
            if count >= tot:
                break
            got = step(min(limit, tot - count))
        else:
            got = step(limit)
        if got:
            count += got
            t_last = time.perf_counter()
            if not warm and t_last - t_first >= spec.warmup:
                warm = True
                t0, c0 = t_last, count
        elif time.perf_counter() - t_last > STALL_S:
            raise TimeoutError(f"stalled after {count} items")
    if count > tot:
        raise RuntimeError(f"consumer took {count} items, producer pushed {tot}")
    if not warm or count == c0:  # too short a stream for a warm-up: time all of it
        t0, c0 = t_first, first
    if count == c0:
        raise RuntimeError(f"stream too short to time ({count} items in one step): use a longer --duration")
    return {"role": "consumer", "items": count - c0, "seconds": max(t_last - t0, 1e-9), "total": count}


# ---------------------------------------------------------------------------
# Transports.


class Transport:
    """Base class; subclasses set :attr:`name`, :attr:`modes`, :attr:`description`."""

    name = ""
    modes: tuple[str, ...] = ()
    description = ""

    @classmethod
    def available(cls) -> str | None:
        """``None`` when usable here, else the reason it is skipped."""
        return None

    def setup(self, spec: CaseSpec, ctx: Any) -> Any:
        """Create the per-case channel in the parent; return a picklable handle for the workers."""
        raise NotImplementedError

    def teardown(self, handle: Any) -> None:
        """Free what :meth:`setup` created (safe to call after a failed case)."""

    def producer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def consumer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class MPQueueTransport(Transport):
    """``multiprocessing.Queue``: put/get of bytes; batched = put/get of a list of bytes."""

    name = "mpqueue"
    modes = ("single", "batch")
    description = "multiprocessing.Queue put/get (batch: one list of items per put)"

    def setup(self, spec: CaseSpec, ctx: Any) -> Any:
        per_msg = spec.size * (spec.batch if spec.mode == "batch" else 1)
        return ctx.Queue(maxsize=max(2, spec.capacity // per_msg))

    def teardown(self, handle: Any) -> None:
        handle.close()
        handle.join_thread()

    def producer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        put = handle.put
        payload = make_payload(spec.size)
        step: ProducerStep
        if spec.mode == "batch":
            items = make_payloads(spec.size, spec.batch)
            n = spec.batch

            def step() -> int:
                put(items)
                return n
        else:
            chunk = range(spec.chunk)
            n = spec.chunk

            def step() -> int:
                for _ in chunk:
                    put(payload)
                return n

        res = drive_producer(step, spec, ctl)
        put(None)  # wakes a consumer blocked in get() (no timeout: that path adds a poll per get)
        ctl["done"].wait(STALL_S)
        return res

    def consumer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        get = handle.get
        t = toucher(spec.size)
        step: ConsumerStep
        if spec.mode == "batch":

            def step(limit: int) -> int:
                items = get()
                if items is None:
                    return 0
                touch_many(items)
                return len(items)

            limit = spec.batch
        else:

            def step(limit: int) -> int:
                for i in range(limit):
                    x = get()
                    if x is None:
                        return i
                    t(x)
                return limit

            limit = spec.chunk
        try:
            return drive_consumer(step, spec, ctl, limit)
        finally:
            ctl["done"].set()


def _identity(x: Any) -> Any:
    return x


class FasterFifoTransport(Transport):
    """faster-fifo: put/get (single), put_many/get_many (batch), raw bytes (no pickling)."""

    name = "faster_fifo"
    modes = ("single", "batch")
    description = "faster_fifo.Queue put/get, put_many/get_many; bytes in, memoryviews out (no pickle)"

    @classmethod
    def available(cls) -> str | None:
        return None if faster_fifo is not None else "faster-fifo is not installed"

    def setup(self, spec: CaseSpec, ctx: Any) -> Any:
        per_msg = spec.size * (spec.batch if spec.mode == "batch" else 1)
        nbytes = max(spec.capacity, 4 * (per_msg + 64 * spec.batch))
        return faster_fifo.Queue(max_size_bytes=nbytes, loads=_identity, dumps=_identity)

    def teardown(self, handle: Any) -> None:
        handle.close()

    def producer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        payload = make_payload(spec.size)
        step: ProducerStep
        if spec.mode == "batch":
            put_many = handle.put_many
            items = make_payloads(spec.size, spec.batch)
            n = spec.batch

            def step() -> int:
                put_many(items, True, STALL_S)
                return n
        else:
            put = handle.put
            chunk = range(spec.chunk)
            n = spec.chunk

            def step() -> int:
                for _ in chunk:
                    put(payload, True, STALL_S)
                return n

        res = drive_producer(step, spec, ctl)
        ctl["done"].wait(STALL_S)
        return res

    def consumer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        empty = faster_fifo.Empty
        t = toucher(spec.size)
        step: ConsumerStep
        if spec.mode == "batch":
            get_many = handle.get_many

            def step(limit: int) -> int:
                try:
                    items = get_many(block=True, timeout=POLL_S, max_messages_to_get=limit)
                except empty:
                    return 0
                touch_many(items)
                return len(items)

            limit = spec.batch
        else:
            get = handle.get

            def step(limit: int) -> int:
                for i in range(limit):
                    try:
                        x = get(True, POLL_S)
                    except empty:
                        return i
                    t(x)
                return limit

            limit = spec.chunk
        try:
            return drive_consumer(step, spec, ctl, limit)
        finally:
            ctl["done"].set()


class ZmqTransport(Transport):
    """pyzmq PUSH/PULL over ipc://: send/recv (single), send_multipart/recv_multipart (batch).

    A batch is one multipart message with one frame per item, so item
    boundaries survive; :class:`ZmqPackedTransport` packs a batch into one
    frame instead. Messages of 64 KiB or more go zero-copy (``copy=False``),
    as pyzmq recommends.
    """

    name = "zmq"
    modes: tuple[str, ...] = ("single", "batch")
    description = "pyzmq PUSH/PULL ipc:// send/recv (batch: send_multipart, one frame per item)"
    packed = False

    @classmethod
    def available(cls) -> str | None:
        return None if zmq is not None else "pyzmq is not installed"

    def setup(self, spec: CaseSpec, ctx: Any) -> Any:
        fd, path = tempfile.mkstemp(prefix="grafos-bench-", suffix=".ipc")
        os.close(fd)
        os.unlink(path)
        return "ipc://" + path

    def teardown(self, handle: Any) -> None:
        path = handle[len("ipc://") :]
        if os.path.exists(path):
            os.unlink(path)

    @staticmethod
    def _hwm(spec: CaseSpec) -> int:
        per_msg = spec.size * (spec.batch if spec.mode == "batch" else 1)
        return max(2, spec.capacity // per_msg // 2)  # each side buffers half

    def producer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        context = zmq.Context()
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self._hwm(spec))
        sock.setsockopt(zmq.LINGER, int(STALL_S * 1000))
        # Connect only once the consumer has bound: a connect to a missing ipc path
        # is retried after zmq's reconnect interval, which would eat into the run.
        if not ctl["ready"].wait(STALL_S):
            raise TimeoutError("consumer never became ready")
        sock.connect(handle)
        copy = spec.size < 65536
        payload = make_payload(spec.size)
        step: ProducerStep
        if self.packed:
            send = sock.send
            frame = b"".join(make_payloads(spec.size, spec.batch))
            copy_frame = len(frame) < 65536
            n = spec.batch

            def step() -> int:
                send(frame, 0, copy_frame)
                return n
        elif spec.mode == "batch":
            send_multipart = sock.send_multipart
            items = make_payloads(spec.size, spec.batch)
            n = spec.batch

            def step() -> int:
                send_multipart(items, 0, copy)
                return n
        else:
            send = sock.send
            chunk = range(spec.chunk)
            n = spec.chunk

            def step() -> int:
                for _ in chunk:
                    send(payload, 0, copy)
                return n

        try:
            res = drive_producer(step, spec, ctl)
            ctl["done"].wait(STALL_S)
            return res
        finally:
            sock.close()
            context.term()

    def consumer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        context = zmq.Context()
        sock = context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self._hwm(spec))
        sock.setsockopt(zmq.RCVTIMEO, int(POLL_S * 1000))
        sock.bind(handle)
        again = zmq.Again
        copy = spec.size < 65536
        t = toucher(spec.size)
        step: ConsumerStep
        if self.packed:
            recv = sock.recv
            size = spec.size
            copy_frame = spec.size * spec.batch < 65536

            def step(limit: int) -> int:
                try:
                    x: Any = recv(0, copy_frame)
                except again:
                    return 0
                buf = x if copy_frame else x.buffer
                touch(buf)
                return memoryview(buf).nbytes // size

            limit = spec.batch
        elif spec.mode == "batch":
            recv_multipart = sock.recv_multipart

            def step(limit: int) -> int:
                try:
                    frames = recv_multipart(0, copy)
                except again:
                    return 0
                touch_many(frames)
                return len(frames)

            limit = spec.batch
        else:
            recv = sock.recv

            def step(limit: int) -> int:
                for i in range(limit):
                    try:
                        x: Any = recv(0, copy)
                    except again:
                        return i
                    t(x if copy else x.buffer)
                return limit

            limit = spec.chunk
        try:
            return drive_consumer(step, spec, ctl, limit)
        finally:
            ctl["done"].set()
            sock.close()
            context.term()


class ZmqPackedTransport(ZmqTransport):
    """pyzmq PUSH/PULL over ipc://, a batch of fixed-size items packed into one frame.

    The reader frames the items itself (``len // size``): the cheapest way to
    batch with zmq when every item has one size, as in this benchmark.
    """

    name = "zmq_packed"
    modes = ("batch",)
    description = "pyzmq PUSH/PULL ipc://, a batch packed into one frame of n x size bytes (reader splits by size)"
    packed = True


class FabricTransport(Transport):
    """grafos-fabric FabricQueue on a driver (``shm`` by default).

    single: push/pop; single_array: push / ``pop_array`` (the item as a ready
    array, released with it), the consumer otherwise as in single; batch: push_batch of a 2-D array / pop_batch with one
    reduction over ``Batch.array()``; reserve: ``with q.reserve(n) as buf:
    np.add(a, b, out=buf)`` (the item produced in place) / pop; produce: the
    same ``np.add`` into the producer's own buffer, then ``push`` (copy-in), the
    like-for-like baseline of reserve; reserve_batch: ``with q.reserve_batch(k,
    n) as rows: np.add(A, B, out=rows)`` / pop_batch; produce_batch: the same
    into the producer's own rows, then ``push_batch``. The parent creates the queue; both workers
    attach through its locator bytes, mapped (the default) or, with
    ``mapped=False``, through the one-sided ring protocol (what an RDMA client
    of a memory node speaks), which the shm driver also offers.
    """

    name = "fabric"
    modes = ("single", "single_array", "batch", "reserve", "produce", "reserve_batch", "produce_batch")
    description = "grafos_fabric.FabricQueue"
    ttl = 300.0

    def __init__(self, url: str = "", mapped: bool = True) -> None:
        self.url = url  # the parent's fabric (workers get it back in the handle)
        self.mapped = mapped  # how the workers attach
        self._queues: dict[bytes, Any] = {}
        self._fabric: Any = None

    @classmethod
    def available(cls) -> str | None:
        try:
            import grafos_fabric as gf
        except Exception as exc:  # pragma: no cover - broken install
            return f"grafos_fabric does not import: {exc}"
        if not hasattr(gf, "FabricQueue") or not hasattr(gf, "open_fabric"):
            return "grafos_fabric.FabricQueue is not available in this build"
        return None

    def setup(self, spec: CaseSpec, ctx: Any) -> Any:
        import grafos_fabric as gf

        if self._fabric is None:
            self._fabric = gf.open_fabric(self.url)
        q = gf.FabricQueue.create(self._fabric, capacity=spec.capacity, ttl=self.ttl)
        data = bytes(q.locator())
        self._queues[data] = q
        return (self.url, data, self.mapped)

    def teardown(self, handle: Any) -> None:
        q = self._queues.pop(handle[1], None)
        if q is not None:
            q.free()  # close, and give the region back to the fabric now

    def close(self) -> None:
        """Free every queue still open and close the fabric (end of the run).

        The run's shm namespace is its own (``bench-<pid>``), so whatever is
        left of it goes too: segments and the namespace's generation counter.
        """
        for data in list(self._queues):
            self.teardown((self.url, data, self.mapped))
        fabric, self._fabric = self._fabric, None
        if fabric is None:
            return
        ns = getattr(fabric, "namespace", None) if getattr(fabric, "driver", None) == "shm" else None
        with contextlib.suppress(Exception):
            fabric.reap()
        if hasattr(fabric, "close"):
            fabric.close()
        if ns:
            from grafos_fabric.drivers.shm import SHM_DIR

            with contextlib.suppress(OSError):
                for name in os.listdir(SHM_DIR):
                    if name.startswith(f"grafos.{ns}.") or name == f"grafos-gen.{ns}":
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(SHM_DIR, name))

    @staticmethod
    def _attach(handle: Any) -> tuple[Any, Any]:
        import grafos_fabric as gf

        url, data, mapped = handle
        fabric = gf.open_fabric(url)
        return fabric, gf.FabricQueue.attach(fabric, gf.QueueLocator.from_bytes(data), mapped=mapped)

    def producer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        fabric, q = self._attach(handle)
        payload = make_payload(spec.size)
        step: ProducerStep
        if spec.mode == "batch":
            push_batch = q.push_batch
            rows = np.array([np.frombuffer(b, dtype=np.uint8) for b in make_payloads(spec.size, spec.batch)])
            n = spec.batch

            def step() -> int:
                pushed: int = push_batch(rows, timeout=STALL_S)
                if pushed != n:
                    raise RuntimeError(f"push_batch pushed {pushed} of {n}")
                return n
        elif spec.mode == "reserve":
            # zero-copy production, what reserve is for: the item is computed in place
            reserve = q.reserve
            a, b = _operands(spec.size)
            add = np.add
            chunk = range(spec.chunk)
            n = spec.chunk
            size = spec.size

            def step() -> int:
                for _ in chunk:
                    with reserve(size, timeout=STALL_S) as buf:
                        add(a, b, out=buf)
                return n
        elif spec.mode == "produce":
            # the same production into a buffer of the producer's, then push (copy-in): what reserve saves
            push = q.push
            a, b = _operands(spec.size)
            tmp = np.empty(spec.size, dtype=np.uint8)
            add = np.add
            chunk = range(spec.chunk)
            n = spec.chunk

            def step() -> int:
                for _ in chunk:
                    add(a, b, out=tmp)
                    push(tmp, timeout=STALL_S)
                return n
        elif spec.mode == "reserve_batch":
            reserve_batch = q.reserve_batch
            ra, rb = _operands(spec.size, spec.batch)
            add = np.add
            nb, size = spec.batch, spec.size

            def step() -> int:
                with reserve_batch(nb, size, timeout=STALL_S) as rows:
                    k = len(rows)
                    add(ra[:k], rb[:k], out=rows)
                return k
        elif spec.mode == "produce_batch":
            push_batch = q.push_batch
            ra, rb = _operands(spec.size, spec.batch)
            tmp2 = np.empty((spec.batch, spec.size), dtype=np.uint8)
            add = np.add
            nb = spec.batch

            def step() -> int:
                add(ra, rb, out=tmp2)
                pushed: int = push_batch(tmp2, timeout=STALL_S)
                if pushed != nb:
                    raise RuntimeError(f"push_batch pushed {pushed} of {nb}")
                return nb
        else:
            push = q.push
            chunk = range(spec.chunk)
            n = spec.chunk

            def step() -> int:
                for _ in chunk:
                    push(payload, timeout=STALL_S)
                return n

        try:
            res = drive_producer(step, spec, ctl)
            ctl["done"].wait(STALL_S)
            return res
        finally:
            q.close()
            if hasattr(fabric, "close"):
                fabric.close()

    def consumer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        fabric, q = self._attach(handle)
        t = toucher(spec.size)
        step: ConsumerStep
        if spec.mode in ("batch", "reserve_batch", "produce_batch"):
            pop_batch = q.pop_batch

            def step(limit: int) -> int:
                try:
                    b = pop_batch(limit, timeout=POLL_S)
                except TimeoutError:
                    return 0
                n = len(b)
                if n:
                    arr = b.array()
                    if arr is not None:
                        touch_array(arr)
                    else:  # mixed sizes: never in this benchmark, but stay correct
                        for item in b:
                            t(np.asarray(item))
                b.release()
                return n

            limit = spec.batch
        elif spec.mode == "single_array":
            pop_array = q.pop_array

            def step(limit: int) -> int:
                for i in range(limit):
                    try:
                        arr = pop_array(timeout=POLL_S)
                    except TimeoutError:
                        return i
                    t(arr)
                    del arr  # the item's space goes back with its array
                return limit

            limit = spec.chunk
        else:
            pop = q.pop
            asarray = np.asarray

            def step(limit: int) -> int:
                for i in range(limit):
                    try:
                        item = pop(timeout=POLL_S)
                    except TimeoutError:
                        return i
                    t(asarray(item))
                    item.release()
                return limit

            limit = spec.chunk
        try:
            return drive_consumer(step, spec, ctl, limit)
        finally:
            ctl["done"].set()
            q.close()
            if hasattr(fabric, "close"):
                fabric.close()


class ShmPipeTransport(Transport):
    """Not a queue: the bare cross-process ceiling, to tell framing cost from hardware cost.

    A ring of fixed-size numpy slots in shared memory; the producer
    ``np.copyto``s each item into the next slot and bumps a tail counter, the
    consumer reduces each slot it sees and bumps a head counter (once per
    step); both spin, nothing is framed, nothing is checked. Its ratio to
    ``np.copyto`` is what moving a payload from one core to another costs on
    this machine. Correct only under x86's store ordering (TSO), so it runs
    only there.
    """

    name = "shm_pipe"
    modes = ("pipe",)
    description = (
        "bare two-process pipeline, not a queue: numpy slots in shared memory, np.copyto in, "
        "one reduction out, spinning counters, no framing (the cross-core ceiling)"
    )

    @classmethod
    def available(cls) -> str | None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
            return "the bare pipeline relies on x86 store ordering"
        return None

    def setup(self, spec: CaseSpec, ctx: Any) -> Any:
        slots = max(2, min(1 << 16, spec.capacity // spec.size))
        return (ctx.RawArray("B", slots * spec.size), ctx.RawArray("q", 32), slots)

    @staticmethod
    def _views(handle: Any, size: int) -> tuple[np.ndarray, np.ndarray, int]:
        buf, ctr, slots = handle
        ring = np.frombuffer(buf, dtype=np.uint8).reshape(slots, size)
        return ring, np.frombuffer(ctr, dtype=np.int64), slots  # tail at [0], head at [16]

    def producer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        ring, ctr, slots = self._views(handle, spec.size)
        src = np.frombuffer(make_payload(spec.size), dtype=np.uint8)
        copyto = np.copyto
        chunk = range(spec.chunk)
        k = spec.chunk
        n = 0

        def step() -> int:
            nonlocal n
            for _ in chunk:
                while n - ctr[16] >= slots:  # spin for a free slot
                    pass
                copyto(ring[n % slots], src)
                n += 1
                ctr[0] = n  # publish (x86: stores are not reordered)
            return k

        res = drive_producer(step, spec, ctl)
        ctl["done"].wait(STALL_S)
        return res

    def consumer(self, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> dict[str, Any]:
        ring, ctr, slots = self._views(handle, spec.size)
        t = toucher(spec.size)
        n = 0

        def step(limit: int) -> int:
            nonlocal n
            avail = int(ctr[0]) - n
            if avail <= 0:
                give_up = time.perf_counter() + POLL_S
                while (avail := int(ctr[0]) - n) <= 0:
                    if time.perf_counter() > give_up:
                        return 0
            got = min(avail, limit)
            for i in range(n, n + got):
                t(ring[i % slots])
            n += got
            ctr[16] = n  # free the slots
            return got

        try:
            return drive_consumer(step, spec, ctl, spec.chunk)
        finally:
            ctl["done"].set()


TRANSPORTS: dict[str, type[Transport]] = {
    t.name: t
    for t in (
        FabricTransport,
        MPQueueTransport,
        FasterFifoTransport,
        ZmqTransport,
        ZmqPackedTransport,
        ShmPipeTransport,
    )
}
#: What a user would pick instead of grafos-fabric (the "best peer" is the fastest of these).
PEERS: tuple[str, ...] = ("mpqueue", "faster_fifo", "zmq", "zmq_packed")
#: Ceilings, not alternatives: np.copyto in one process, and the bare cross-process pipeline.
CEILINGS: tuple[str, ...] = ("copyto", "shm_pipe")


def worker_main(role: str, transport_name: str, handle: Any, spec: CaseSpec, ctl: dict[str, Any]) -> None:
    """Entry point of a worker process: run one side, send its result (or the error) to the parent."""
    cpus = ctl.get("cpus")
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except (AttributeError, OSError) as exc:
            log.debug("could not pin %s to %s: %s", role, cpus, exc)
    try:
        transport = TRANSPORTS[transport_name]()
        side = transport.producer if role == "producer" else transport.consumer
        res = side(handle, spec, ctl)
    except BaseException as exc:
        res = {"role": role, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        ctl["done"].set()
        ctl["ready"].set()
    ctl["results"].put(res)
