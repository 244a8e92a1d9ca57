"""grafos-fabric: leased fabric memory queues for grafOS-style pipelines.

>>> import grafos_fabric as gf
>>> fabric = gf.open_fabric()                       # $GRAFOS_FABRIC or shm://default
>>> q = gf.FabricQueue.create(fabric, capacity=1 << 20, ttl=30.0)

Layers, top to bottom: ``pipeline`` (relocatable edges, checkpoints),
``locator`` (queue locators, handoff records), ``queue`` (FabricQueue),
``fence`` (epochs), ``lease`` (TTL, renewal), ``errors``; drivers below in
``grafos_fabric.drivers`` (shm, block, the memory node's control plane
``node`` and its drivers ``verbs`` and ``nodeshm``).
"""

from __future__ import annotations

from . import errors, observe
from .checkpoint import CheckpointedStageState, CheckpointFlushObserver, EdgeCheckpoint, StageId
from .drivers import open_fabric
from .drivers.block import BlockRegion, BlockStore, open_block
from .fence import EdgeGeneration, Fenced, FenceEpoch, FenceGuard
from .lease import BackgroundRenewer, Lease, ManualClock, MonotonicClock, RenewalManager, RenewalPolicy
from .locator import HandoffReader, HandoffRecord, HandoffWriter, QueueLocator
from .pipeline import EdgeError, RelocatableQueueEdge
from .queue import Batch, FabricQueue, Item

__all__ = [
    "BackgroundRenewer",
    "Batch",
    "BlockRegion",
    "BlockStore",
    "CheckpointFlushObserver",
    "CheckpointedStageState",
    "EdgeCheckpoint",
    "EdgeError",
    "EdgeGeneration",
    "FabricQueue",
    "FenceEpoch",
    "FenceGuard",
    "Fenced",
    "HandoffReader",
    "HandoffRecord",
    "HandoffWriter",
    "Item",
    "Lease",
    "ManualClock",
    "MonotonicClock",
    "QueueLocator",
    "RelocatableQueueEdge",
    "RenewalManager",
    "RenewalPolicy",
    "StageId",
    "errors",
    "observe",
    "open_block",
    "open_fabric",
]
__version__ = "0.1.0"
