"""The standby queue: the producer's next queue, made and announced ahead of time.

A relocation used to allocate the next queue, build its ring, publish it, and
only then could the consumer (which finds the old queue sealed and drained)
read the new handoff record and attach (map) the new queue: all of it at the
critical moment. With a standby:

1. After each relocation, off the critical path (the producer's next call
   once its replay is in), the producer creates the next queue *dormant*:
   its epoch is the current generation ``g``, which no producer of
   generation ``g + 1`` pushes at. It announces the queue's locator in the
   handoff record of generation ``g`` (:meth:`HandoffWriter.announce`: the
   same record re-written with a standby field, durable like a publish).
2. The consumer reads the announcement (it polls the record while busy until
   it has one: at most every ``poll_interval``) and attaches the standby
   (maps it) at once, also off the critical path.
3. At the next relocation the producer *activates* the standby:
   :meth:`FabricQueue.rebase` stores ``first_seq`` (the replay start) and then
   advances its epoch to ``g + 1``; then it publishes record ``g + 1`` naming it
   (durable), seals the old queue, and only then pushes into it.
4. The consumer finds the old queue sealed and drained; its attached standby
   shows epoch ``g + 1`` and is not sealed: it re-reads ``first_seq`` and binds,
   with no allocation, no mapping and no durable read at that moment. It reads
   record ``g + 1`` later, off the critical path, to learn the next standby
   (and to check that the record names the queue it bound).

Why a consumer may bind an activated standby before reading record ``g + 1``:
the standby was named by the durable record ``g`` (validated: CRC, locator
checksum, a dormant epoch below ``g + 1``); only its producer can push into it,
and that producer pushes only after record ``g + 1`` naming it is durable.
Whoever moves the edge elsewhere *seals* the standby first: the producer
itself when it cannot use it (a failed rebase or publish, ``close``), and a
producer taking the edge over (it seals the standby the record announces, as
it fences the current queue). A consumer on a sealed standby finds it drained
(nothing was ever pushed) and falls back to reading the record. A standby
whose header is not as announced (another epoch, sealed, a ``first_seq`` past
the consumer's position) is never bound: the consumer takes the durable path,
where the record decides. The segment's bytes are untrusted like any queue's:
a co-tenant who can write them can make the switch fail or fall back, and
every record's sequence number still goes through the consumer's gate.

Placement: the standby is allocated like any queue, except that a fabric of
several nodes offering ``allocating_away_from(ref)`` is asked for another node
than the current queue's (a relocation after that node dies then needs no
allocation either), and one that still landed there is made again later.
``tools/ucx_pipeline.py``'s ``FailoverFabric`` offers it (only another node that
is up: never the current one, see its docstring and the README, "Standby
queue"); a failed make is retried after 50 ms, doubling to 1 s.

Memory: one more ring of the edge's ``capacity`` per producer (on shm,
reserved at create like every segment), for as long as the producer runs; it
is sealed and freed on ``close``/``free``, and a producer that dies leaves it
to expire with its lease (the reaper frees it, as it does the current queue).
``standby=False`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from .. import errors as E
from ..checkpoint import StageId
from ..drivers.base import Fabric, RegionRef
from ..fence import EdgeGeneration
from ..handoff import HandoffRecord, HandoffWriter
from ..locator import QueueLocator
from ..queue import FabricQueue

__all__ = ["StandbyQueue", "announced_standby", "fence_announced"]

log = logging.getLogger("grafos_fabric.pipeline")

_RETRY_FIRST_S = 0.05  # after a failed create, the next try waits this long, doubling ...
_RETRY_S = 1.0  # ... up to this (the edge works without a standby; a fabric placing it elsewhere may
# have no other node up for a moment: its node's restart)
_REPLACE_S = 0.25  # a standby on the current queue's node: the first try elsewhere after this long
_REPLACE_MAX_S = 8.0  # ... then doubling (one node up only: an alloc and a free now and then)
_FAILURES = (E.FabricError, E.FabricValueError, OSError)


def _node(ref: RegionRef) -> tuple[str, str, int]:
    return ref.driver, ref.host, ref.port


class StandbyQueue:
    """The producer's dormant next queue (see the module docstring); one per producer."""

    def __init__(
        self,
        fabric: Fabric,
        stage: StageId,
        *,
        capacity: int,
        ttl: float,
        dtype: Any,
        max_item: int | None,
        enabled: bool = True,
    ) -> None:
        self.fabric = fabric
        self.stage = stage
        self.capacity = capacity
        self.ttl = ttl
        self.dtype = dtype
        self.max_item = max_item
        self.enabled = enabled
        self.q: FabricQueue | None = None
        self.due = False  # a relocation used (or lost) the standby: make the next one
        self.made = 0
        self.used = 0
        self.missed = 0  # relocations that allocated because no usable standby was there
        self._retry_at = 0.0
        self._retry_every = _RETRY_FIRST_S
        # on the current queue's node (no other node took it): made again elsewhere now and then
        self.colocated = False
        self._replace_at = 0.0
        self._replace_every = _REPLACE_S
        self._orphans: list[FabricQueue] = []  # standbys on a lost node: freed on discard (or reaped)

    # -- making one --------------------------------------------------------------------
    def after_relocation(self) -> None:
        """A relocation finished: the next call makes the next standby (when enabled)."""
        self.due = self.enabled and self.q is None
        self._replace_every = _REPLACE_S

    def make(self, generation: EdgeGeneration, writer: HandoffWriter, current: RegionRef | None = None) -> None:
        """Create the dormant queue (epoch = ``generation``) and announce it in that
        generation's record. Failures are logged: the edge works without a standby.

        ``current``: where the current queue lives. A fabric of several nodes that offers
        ``allocating_away_from(ref)`` (a context manager: allocations inside it try another
        node than ``ref``'s first) gets the standby on another node, so that losing the
        current queue's node does not take the standby along."""
        now = time.monotonic()
        if now < self._retry_at:
            return
        self.due = False
        away = getattr(self.fabric, "allocating_away_from", None)
        placed = callable(away) and current is not None
        placement: Any = away(current) if away is not None and placed else contextlib.nullcontext()
        old = self.q  # a standby on the current queue's node, being replaced
        try:
            with placement:
                q = FabricQueue.create(
                    self.fabric,
                    self.capacity,
                    self.ttl,
                    dtype=self.dtype,
                    max_item=self.max_item,
                    epoch=int(generation),
                )
        except _FAILURES as exc:
            log.warning("stage %s: could not make a standby queue: %s", self.stage, exc)
            self._retry_at = now + self._retry_every
            self._retry_every = min(self._retry_every * 2, _RETRY_S)
            self.due = old is None
            return
        self._retry_every = _RETRY_FIRST_S
        self.colocated = placed and current is not None and _node(q.region.ref()) == _node(current)
        if self.colocated:
            self._replace_at = now + self._replace_every
            self._replace_every = min(self._replace_every * 2, _REPLACE_MAX_S)
        else:
            self._replace_every = _REPLACE_S
        if old is not None:
            if self.colocated:  # no other node took it either: keep the one announced
                self._drop(q, seal=False)
                return
            self._drop(old, seal=True)  # a consumer that attached it falls back, then learns the new one
        self.q = q
        self.made += 1
        try:
            writer.announce(bytes(q.locator()))
        except E.StaleEpoch as exc:  # a newer generation is on disk: this one will never be used
            log.info("stage %s: standby not announced (%s); dropped", self.stage, exc)
            self.discard()
        except _FAILURES as exc:  # kept: a relocation may still use it (the consumer attaches it then)
            log.warning("stage %s: could not announce the standby queue: %s", self.stage, exc)

    def check_placement(self) -> None:
        """A standby on the current queue's node (another node was down when it was made) is
        made again, away from it, once a while has passed (``due``; the next call makes it)."""
        if self.colocated and self.q is not None and time.monotonic() >= self._replace_at:
            self.colocated = False
            self.due = True

    def renew(self) -> None:
        q = self.q
        if q is None:
            return
        try:
            q.lease.renew()
        except _FAILURES as exc:
            log.info("stage %s: the standby queue's lease is gone (%s); a new one follows", self.stage, exc)
            self.q = None
            self.due = self.enabled
            self._drop(q, seal=False)

    # -- using one ---------------------------------------------------------------------
    def take(self, start: int, generation: EdgeGeneration, lost: RegionRef | None) -> FabricQueue | None:
        """Activate the standby for ``generation`` numbering from ``start`` and hand it
        over (the caller publishes it); None when there is none or it cannot be used
        (then it is sealed and freed). ``lost``: a queue whose node does not answer; a
        standby on the same node is not touched (each try would wait for that node)."""
        q, self.q = self.q, None
        if q is None:
            self.missed += 1
            return None
        if lost is not None and _node(q.region.ref()) == _node(lost) and lost.host:
            log.info("stage %s: the standby is on the node that was lost; allocating instead", self.stage)
            self.missed += 1
            self._orphans.append(q)
            return None
        try:
            q.rebase(start, int(generation))
        except _FAILURES as exc:
            log.warning("stage %s: the standby queue cannot be used (%s); allocating instead", self.stage, exc)
            self.missed += 1
            self._drop(q, seal=True)
            return None
        self.used += 1
        return q

    def unusable(self, q: FabricQueue) -> None:
        """A taken standby whose publish failed: seal it (a consumer that bound it leaves) and free it."""
        self._drop(q, seal=True)

    def discard(self) -> None:
        """Seal and free the standby (close, or a newer generation made it useless)."""
        q, self.q = self.q, None
        self.due = False
        self.colocated = False
        if q is not None:
            self._drop(q, seal=True)
        orphans, self._orphans = self._orphans, []
        for o in orphans:
            self._drop(o, seal=True)

    def _drop(self, q: FabricQueue, *, seal: bool) -> None:
        try:
            if seal:
                q.seal(0)
        except _FAILURES as exc:
            log.debug("stage %s: could not seal the standby queue: %s", self.stage, exc)
        try:
            q.free()
        except _FAILURES as exc:
            log.debug("stage %s: could not free the standby queue: %s", self.stage, exc)


def announced_standby(rec: HandoffRecord) -> QueueLocator | None:
    """The standby a record announces, validated: None when there is none; ``Corrupted``
    (or ``VersionMismatch``) when its locator does not decode, or its epoch is not
    below the next generation (a standby is dormant until it is activated)."""
    if not rec.standby:
        return None
    loc = QueueLocator.from_bytes(rec.standby)
    if loc.epoch > int(rec.generation):
        raise E.Corrupted(
            f"handoff generation {int(rec.generation)} announces a standby at epoch {loc.epoch}: "
            "a standby is dormant (at most the record's generation) until it is activated"
        )
    return loc


def fence_announced(fabric: Fabric, rec: HandoffRecord, stage: StageId) -> None:
    """A takeover: seal the standby ``rec`` announces, so that a consumer never binds it
    (its producer is the predecessor, which is being fenced out). Best effort: a
    standby that cannot be reached cannot be activated by anyone either... except its
    producer, whose publish the takeover's publish then refuses."""
    try:
        loc = announced_standby(rec)
    except (E.Corrupted, E.VersionMismatch) as exc:
        log.warning("stage %s: the handoff record announces a damaged standby (%s); ignored", stage, exc)
        return
    if loc is None:
        return
    try:
        q = FabricQueue.attach(fabric, loc)
    except _FAILURES as exc:
        log.debug("stage %s: the predecessor's standby is unreachable: %s", stage, exc)
        return
    try:
        q.seal(0)
    except _FAILURES as exc:
        log.debug("stage %s: could not seal the predecessor's standby: %s", stage, exc)
    finally:
        q.close()
