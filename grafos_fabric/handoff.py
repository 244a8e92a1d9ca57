"""Handoff records: "the edge now lives here, at generation g", durable on a block lease.

A :class:`HandoffWriter` publishes an opaque payload (a queue locator's bytes)
with a generation that only grows; a :class:`HandoffReader` polls the same
block lease and returns a record only when the generation went up since it
last looked. The payload is never interpreted here (``grafos_fabric.locator``
wraps ``QueueLocator`` bytes around this).

On the block lease a handoff is a ``GHOF`` record in the two-slot format of
:mod:`grafos_fabric.slots`: the generation is the slot header's ``tag`` (so it
is covered by the header CRC), and the record's data is::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |  0
    +        published_ns (u64, writer's CLOCK_REALTIME, ns)        +
    |                                                               |  4
    +---------------------------------------------------------------+
    |                 payload (data_len - 8 bytes)                  |  8
    +---------------------------------------------------------------+

A record may also *announce a standby*: the payload the writer means to
publish next (the pipeline's producer keeps its next queue made ahead of time
and names it here, so a reader can prepare for it; :mod:`grafos_fabric.pipeline`).
Such a record (and one whose payload starts with the tag) carries a tag and
the payload's length after the prefix::

    +---------------------------------------------------------------+
    |        published_ns (u64, writer's CLOCK_REALTIME, ns)        |  0
    +---------------------------------------------------------------+
    |                         tag "GHSB"                            |  8
    +---------------------------------------------------------------+
    |                     payload_len (u32)                         | 12
    +---------------------------------------------------------------+
    |   payload (payload_len bytes), then the standby (the rest)    | 16
    +---------------------------------------------------------------+

A record without the tag has no standby (``HandoffRecord.standby == b""``),
which is every record written before the tag existed. The standby is a hint
under the record's CRC: a reader never takes it for the current payload.
:meth:`HandoffWriter.announce` re-writes the writer's last record *at the same
generation* with a new standby (the writer makes its standby after a publish,
off the critical path); :meth:`HandoffReader.poll` returns such an amended
record only when asked (``amendments=True``).

Little-endian. Who writes: one :class:`HandoffWriter` at a time wins. Under an
exclusive ``flock`` on the lease's file or device it reads the newest valid
record, refuses with :class:`~grafos_fabric.errors.StaleEpoch` when that
record's generation is newer than the writer's own (someone else published
since), and otherwise writes generation + 1 (one write, one flush: see
:mod:`grafos_fabric.slots`). A generation above 2**63 - 1 is refused as
forged (``Corrupted``). Two
writers racing from the same generation therefore serialize on the lock and
exactly one of them wins that bump, in one process or in two. Who reads: a
:class:`HandoffReader` reads under a shared ``flock`` (so it never sees a slot
mid-overwrite) and picks the newest valid slot. A torn publish leaves the
previous generation readable; a record that cannot be validated raises
``Corrupted``, never a stale or default value.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .backoff import Backoff
from .errors import Corrupted, FabricValueError, NoRecord, StaleEpoch
from .fence import EdgeGeneration, FenceEpoch
from .slots import GHOF, MAX_SEQ, BlockDevice, Durability, SlotRecord, SlotStore

__all__ = ["STANDBY_TAG", "HandoffReader", "HandoffRecord", "HandoffWriter"]

log = logging.getLogger(__name__)

_PREFIX = struct.Struct("<Q")
PREFIX_SIZE = _PREFIX.size
STANDBY_TAG = b"GHSB"
_TAGGED = struct.Struct("<4sI")

# flock is per open file description: two writers sharing one region object (one
# fd) in two threads would both "hold" it. A per-region thread lock covers that.
# Keyed by id(): devices need not be hashable; the entry goes when the device does.
_THREAD_LOCKS: dict[int, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(dev: Any) -> threading.Lock:
    key = id(dev)
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.get(key)
        if lock is None:
            lock = threading.Lock()
            _THREAD_LOCKS[key] = lock
            with contextlib.suppress(TypeError):  # not weak-referenceable: the entry stays
                weakref.finalize(dev, _THREAD_LOCKS.pop, key, None)
        return lock


@contextlib.contextmanager
def _locked(dev: Any, *, shared: bool) -> Iterator[None]:
    """Thread lock + ``dev.locked()`` (an flock) where the device offers one."""
    with _thread_lock(dev):
        locked = getattr(dev, "locked", None)
        if locked is None:
            yield
        else:
            with locked(shared=shared):
                yield


@dataclass(frozen=True)
class HandoffRecord:
    """A published handoff: its generation, the payload, when and where it was written."""

    generation: EdgeGeneration
    payload: bytes
    published_ns: int
    seq: int
    standby: bytes = b""  #: the payload the writer announced it will publish next (b"": none)

    @classmethod
    def _from_slot(cls, record: SlotRecord) -> HandoffRecord:
        if len(record.data) < PREFIX_SIZE:
            raise Corrupted(f"handoff record of {len(record.data)} bytes is shorter than its {PREFIX_SIZE}-byte prefix")
        if record.tag == 0:
            raise Corrupted("handoff record at generation 0 (the first publish is generation 1)")
        if record.tag > MAX_SEQ:
            raise Corrupted(
                f"handoff record at generation {record.tag}, past 2**63 - 1 (no edge gets there: the record is "
                "forged or damaged); publish on a fresh block lease and point the readers at it"
            )
        (published_ns,) = _PREFIX.unpack_from(record.data)
        body = bytes(record.data[PREFIX_SIZE:])
        standby = b""
        if body[: len(STANDBY_TAG)] == STANDBY_TAG:
            if len(body) < _TAGGED.size:
                raise Corrupted(f"handoff record with a standby tag but {len(body)} bytes after its prefix")
            _, n = _TAGGED.unpack_from(body)
            if n > len(body) - _TAGGED.size:
                raise Corrupted(f"handoff payload length {n} runs past the record ({len(body) - _TAGGED.size} bytes)")
            standby = body[_TAGGED.size + n :]
            body = body[_TAGGED.size : _TAGGED.size + n]
        return cls(FenceEpoch(record.tag), body, published_ns, record.seq, standby)


def _as_bytes(value: Any, what: str) -> bytes:
    try:
        return memoryview(value).cast("B").tobytes()
    except TypeError:
        raise FabricValueError(f"a handoff {what} is bytes-like, got {type(value).__name__}") from None


def _encode(published_ns: int, payload: bytes, standby: bytes) -> bytes:
    """The record's data: the plain layout, or the tagged one when there is a standby (or
    the payload itself starts with the tag, so that it is never misread)."""
    if not standby and payload[: len(STANDBY_TAG)] != STANDBY_TAG:
        return _PREFIX.pack(published_ns) + payload
    return _PREFIX.pack(published_ns) + _TAGGED.pack(STANDBY_TAG, len(payload)) + payload + standby


def _read_newest(store: SlotStore) -> HandoffRecord | None:
    """The newest valid record, None when none was ever published; raises when damaged."""
    try:
        return HandoffRecord._from_slot(store.read())
    except NoRecord:
        return None


class HandoffWriter:
    """Publishes payloads with increasing generations (see the module docstring).

    ``generation=None`` (the default) adopts the generation on disk (zero when
    nothing was published yet): that is how a restarted producer resumes, and
    :meth:`from_disk` says so explicitly; it raises ``Corrupted`` when no
    record on disk validates (it will not guess). Passing a generation makes
    the writer claim it: its next publish is refused if the disk has moved
    past it.
    """

    def __init__(
        self,
        block_lease: BlockDevice,
        *,
        generation: FenceEpoch | int | None = None,
        durability: Durability = "ordered",
    ) -> None:
        self.block_lease = block_lease
        self._store = SlotStore(block_lease, GHOF, durability=durability)
        if generation is None:
            with _locked(block_lease, shared=True):
                newest = _read_newest(self._store)
            self._generation = newest.generation if newest is not None else FenceEpoch.zero()
        else:
            self._generation = FenceEpoch(generation)
        self._last_payload: bytes | None = None  # what this writer published last (announce re-writes it)

    @classmethod
    def from_disk(cls, block_lease: BlockDevice, *, durability: Durability = "ordered") -> HandoffWriter:
        """A writer at the generation currently on disk (restart)."""
        return cls(block_lease, generation=None, durability=durability)

    @property
    def generation(self) -> EdgeGeneration:
        """The generation this writer last published or adopted."""
        return self._generation

    @property
    def next_generation(self) -> EdgeGeneration:
        """The generation the next successful :meth:`publish` will have."""
        return self._generation.bump()

    @property
    def capacity(self) -> int:
        """The largest payload a record can carry, in bytes."""
        return self._store.capacity - PREFIX_SIZE

    def publish(self, payload: Any, *, standby: Any = None) -> EdgeGeneration:
        """Durably publish ``payload`` at the next generation and return that generation.

        ``standby`` (optional, bytes-like) announces the payload this writer
        means to publish next (see the module docstring). Raises
        ``StaleEpoch`` (a ``Fenced``) when the generation on disk is newer
        than this writer's: another writer won. ``CapacityExceeded`` when the
        payload does not fit the lease (nothing written), ``Corrupted`` when
        no valid record can be read back to check against (the writer will
        not guess a generation), ``LeaseExpired``/``Revoked`` when the lease
        is gone.
        """
        body = _as_bytes(payload, "payload")
        extra = b"" if standby is None else _as_bytes(standby, "standby")
        data = _encode(time.time_ns(), body, extra)
        with _locked(self.block_lease, shared=False):
            newest = _read_newest(self._store)
            on_disk = newest.generation if newest is not None else FenceEpoch.zero()
            if on_disk > self._generation:
                raise StaleEpoch(epoch=int(self._generation), current=int(on_disk))
            new = self._generation.bump()
            if int(new) > MAX_SEQ:
                raise FabricValueError(
                    f"generation {int(new)} is past 2**63 - 1, which readers refuse as forged: "
                    "publish from a writer at a real generation (HandoffWriter.from_disk)"
                )
            self._last_payload = None  # until the write is known to have landed
            self._store.write(data, tag=int(new), refresh=True)
            self._generation = new
            self._last_payload = body
        log.info("published handoff generation %d (%d payload bytes)", int(new), len(body))
        return new

    def announce(self, standby: Any) -> EdgeGeneration:
        """Re-write this writer's last record, at the same generation, announcing ``standby``.

        The payload and generation stay; readers see the amendment with
        ``HandoffReader.poll(amendments=True)``. Refused like :meth:`publish`:
        ``StaleEpoch`` when a newer generation is on disk (or the record at
        this generation is not the one this writer published), and
        ``FabricValueError`` when this writer has not published yet."""
        extra = _as_bytes(standby, "standby")
        body = self._last_payload
        if body is None:
            raise FabricValueError("announce re-writes this writer's last record: publish first")
        with _locked(self.block_lease, shared=False):
            newest = _read_newest(self._store)
            if newest is None or newest.generation < self._generation:
                raise Corrupted(f"announcing at generation {int(self._generation)}: the record on disk is older")
            if newest.generation > self._generation or newest.payload != body:
                current = int(newest.generation)
                raise StaleEpoch(epoch=int(self._generation), current=max(current, int(self._generation) + 1))
            self._store.write(_encode(newest.published_ns, body, extra), tag=int(self._generation), refresh=True)
        log.debug("announced a standby at handoff generation %d (%d bytes)", int(self._generation), len(extra))
        return self._generation

    def __repr__(self) -> str:
        return f"<HandoffWriter generation={int(self._generation)}>"


class HandoffReader:
    """Polls a block lease for handoff records newer than the last one it returned.

    ``since`` is the generation already known (default: none, so the first
    :meth:`poll` returns the current record if there is one).
    """

    def __init__(self, block_lease: BlockDevice, *, since: FenceEpoch | int | None = None) -> None:
        self.block_lease = block_lease
        self._store = SlotStore(block_lease, GHOF)
        self._last: FenceEpoch | None = None if since is None else FenceEpoch(since)
        self._last_seq = 0  # slot sequence of the last record returned (amendments have a higher one)

    @property
    def last_generation(self) -> EdgeGeneration | None:
        """The generation of the last record returned (or ``since``)."""
        return self._last

    def current(self) -> HandoffRecord:
        """The newest record on disk, new or not; ``NoRecord`` when nothing was published."""
        with _locked(self.block_lease, shared=True):
            return HandoffRecord._from_slot(self._store.read())

    def poll(self, *, amendments: bool = False) -> HandoffRecord | None:
        """The newest record if its generation is newer than the last one seen, else None.

        With ``amendments=True``, also a record at the last generation seen
        that was re-written since it was returned (:meth:`HandoffWriter.announce`).
        None also when nothing was published yet. Raises ``Corrupted`` when no
        record validates, or when the generation on disk went *backwards*
        (the newest record was lost): never a stale value.
        """
        with _locked(self.block_lease, shared=True):
            newest = _read_newest(self._store)
        if newest is None:
            if self._last is not None and self._last > FenceEpoch.zero():
                raise Corrupted(f"handoff generation {int(self._last)} was seen, and now no record is readable")
            return None
        if self._last is None or newest.generation > self._last:
            self._last = newest.generation
            self._last_seq = newest.seq
            return newest
        if newest.generation < self._last:
            raise Corrupted(
                f"handoff generation went backwards from {int(self._last)} to {int(newest.generation)}: "
                "the newest record was lost"
            )
        if amendments and newest.seq > self._last_seq:
            self._last_seq = newest.seq
            return newest
        return None

    def wait(
        self,
        timeout: float | None = None,
        *,
        initial_backoff: float = 0.0005,
        max_backoff: float = 0.05,
    ) -> HandoffRecord:
        """Poll until a newer record appears; ``TimeoutError`` after ``timeout`` seconds (None: forever).

        Sleeps between polls, doubling from ``initial_backoff`` up to ``max_backoff``.
        """
        if timeout is not None and timeout < 0:
            raise FabricValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        if not 0 < initial_backoff <= max_backoff:
            raise FabricValueError("backoff must satisfy 0 < initial_backoff <= max_backoff")
        backoff = Backoff(
            None if timeout is None else time.monotonic() + timeout, first=initial_backoff, cap=max_backoff
        )
        while True:
            record = self.poll()
            if record is not None:
                return record
            if backoff.expired():
                last = "none" if self._last is None else str(int(self._last))
                raise TimeoutError(f"no handoff newer than generation {last} within {timeout}s")
            backoff.sleep()

    def __repr__(self) -> str:
        last = None if self._last is None else int(self._last)
        return f"<HandoffReader last_generation={last}>"
