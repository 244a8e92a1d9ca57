"""grafos-fabric: leased fabric memory queues for grafOS-style pipelines.

>>> import grafos_fabric as gf
>>> fabric = gf.open_fabric()                       # $GRAFOS_FABRIC or shm://default
>>> q = gf.FabricQueue.create(fabric, capacity=1 << 20, ttl=30.0)
"""

from __future__ import annotations

from . import errors
from .drivers import open_fabric
from .lease import Lease, ManualClock, MonotonicClock, RenewalManager, RenewalPolicy
from .locator import QueueLocator
from .queue import Batch, FabricQueue, Item

__all__ = [
    "Batch",
    "FabricQueue",
    "Item",
    "Lease",
    "ManualClock",
    "MonotonicClock",
    "QueueLocator",
    "RenewalManager",
    "RenewalPolicy",
    "errors",
    "open_fabric",
]
__version__ = "0.1.0"
