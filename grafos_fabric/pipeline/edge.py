"""What both sides of a relocatable edge share: the base class, the failure sets, helpers.

:class:`RelocatableQueueEdge` holds the common state (fabric, block lease,
stage, the queue in use and its generation, rebind samples and events) and
builds the two sides (:meth:`RelocatableQueueEdge.producer`,
:meth:`RelocatableQueueEdge.consumer`). Those factories import the side
modules when called: the sides subclass this class, so this module cannot
import them at its top.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from .. import errors as E
from .. import observe
from ..checkpoint import CheckpointedStageState, EdgeCheckpoint, StageId
from ..drivers.base import Fabric
from ..fence import EdgeGeneration
from ..lease import Lease
from ..queue import FabricQueue
from ..slots import BlockDevice, Durability

if TYPE_CHECKING:
    from .consumer import EdgeConsumer
    from .producer import EdgeProducer

__all__ = ["DEFAULT_CONSUMER_STAGE", "DEFAULT_PRODUCER_STAGE", "RelocatableQueueEdge"]

# Failures of the current queue that relocation (producer) or rebind (consumer) answers.
_QUEUE_LOST: tuple[type[BaseException], ...] = (
    E.LeaseExpired,
    E.Revoked,
    E.Disconnected,
    E.QueueSealed,
    E.StaleEpoch,
)
_CONSUMER_LOST: tuple[type[BaseException], ...] = (E.LeaseExpired, E.Revoked, E.Disconnected, E.RoleTaken)
_SAMPLES = 8192  # rebind-time samples kept for the percentiles
DEFAULT_PRODUCER_STAGE = StageId("src")
DEFAULT_CONSUMER_STAGE = StageId("sink")


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _offset(value: int | EdgeCheckpoint | CheckpointedStageState[Any] | None, field: str) -> int | None:
    """An offset given as an int, an EdgeCheckpoint or a CheckpointedStageState."""
    if value is None:
        return None
    if isinstance(value, CheckpointedStageState):
        value = value.edge
    if isinstance(value, EdgeCheckpoint):
        value = getattr(value, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise E.FabricValueError(f"{field} must be a non-negative int, got {value!r}")
    return value


def _queue_stats(q: FabricQueue | None) -> dict[str, Any] | None:
    """A side's current queue's header words for ``stats()`` (epoch, sealed, acked, items in it),
    None without one, ``{"error": ...}`` where it cannot be read (a stats call never raises for it)."""
    if q is None:
        return None
    try:
        return {"epoch": q.epoch, "sealed": q.sealed, "acked": q.acked, "items": len(q)}
    except (E.FabricError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _stage(stage: StageId | str) -> StageId:
    return stage if isinstance(stage, StageId) else StageId(stage)


class RelocatableQueueEdge:
    """One side of a relocatable edge. Build with :meth:`producer` or :meth:`consumer`.

    Common surface: ``generation`` (the handoff generation of the queue in use),
    ``lease`` (that queue's lease: ``tx.lease.revoke()`` kills it), ``relocate()``,
    ``stats()``, ``close()``. See the package docstring (:mod:`grafos_fabric.pipeline`) for the protocol.
    """

    role = "edge"

    def __init__(self, fabric: Fabric, blk: BlockDevice, stage: StageId | str) -> None:
        self.fabric = fabric
        self.blk = blk
        self.stage = _stage(stage)
        self._q: FabricQueue | None = None
        self._gen: EdgeGeneration | None = None
        self._rebind_s: deque[float] = deque(maxlen=_SAMPLES)
        self._events: deque[dict[str, Any]] = deque(maxlen=256)
        self._reasons: Counter[str] = Counter()
        self.closed = False

    # -- construction ----------------------------------------------------------------
    @classmethod
    def producer(
        cls,
        fabric: Fabric,
        blk: BlockDevice,
        capacity: int = 1 << 22,
        ttl: float = 30.0,
        *,
        stage: StageId | str = DEFAULT_PRODUCER_STAGE,
        window: int | None = None,
        output_commit: int | EdgeCheckpoint | CheckpointedStageState[Any] | None = None,
        dtype: Any = None,
        max_item: int | None = None,
        renew: bool = True,
        max_attempts: int = 5,
        durability: Durability = "ordered",
        standby: bool = True,
        write_behind: bool = False,
    ) -> EdgeProducer:
        """The producing side; see :class:`EdgeProducer`."""
        from .producer import EdgeProducer  # the sides subclass this class: imported on use

        return EdgeProducer(
            fabric,
            blk,
            capacity=capacity,
            ttl=ttl,
            stage=stage,
            window=window,
            output_commit=_offset(output_commit, "output_commit"),
            dtype=dtype,
            max_item=max_item,
            renew=renew,
            max_attempts=max_attempts,
            durability=durability,
            standby=standby,
            write_behind=write_behind,
        )

    @classmethod
    def consumer(
        cls,
        fabric: Fabric,
        blk: BlockDevice,
        *,
        stage: StageId | str = DEFAULT_CONSUMER_STAGE,
        input_offset: int | EdgeCheckpoint | CheckpointedStageState[Any] | None = None,
        poll_interval: float = 0.005,
        mapped: bool = True,
    ) -> EdgeConsumer:
        """The consuming side; see :class:`EdgeConsumer`."""
        from .consumer import EdgeConsumer

        return EdgeConsumer(
            fabric,
            blk,
            stage=stage,
            input_offset=_offset(input_offset, "input_offset"),
            poll_interval=poll_interval,
            mapped=mapped,
        )

    # -- common state ------------------------------------------------------------------
    @property
    def generation(self) -> EdgeGeneration | None:
        """The handoff generation of the queue in use (None before the first one)."""
        return self._gen

    @property
    def lease(self) -> Lease:
        """The current queue's lease (``E.QueueClosed`` when there is no queue)."""
        if self._q is None:
            raise E.QueueClosed(f"{self.role} of stage {self.stage} has no queue right now")
        return self._q.lease

    @property
    def queue(self) -> FabricQueue | None:
        """The queue in use (for inspection; do not push or pop on it directly)."""
        return self._q

    def _rebind_stats(self) -> dict[str, float]:
        s = list(self._rebind_s)
        return {
            "rebind_p50_ms": observe.percentile(s, 0.50) * 1e3,
            "rebind_p99_ms": observe.percentile(s, 0.99) * 1e3,
            "rebind_max_ms": (max(s) if s else 0.0) * 1e3,
        }

    def events(self) -> list[dict[str, Any]]:
        """The last 256 relocations (producer: generation, reason, first_seq, replay, ms)
        or rebinds (consumer: generation, first_seq, position, ms), oldest first."""
        return list(self._events)

    def rebind_times(self) -> list[float]:
        """The recorded rebind times in seconds (the last 8192)."""
        return list(self._rebind_s)

    def __enter__(self) -> RelocatableQueueEdge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        self.closed = True
