"""FabricQueue: a bounded SPSC queue in a leased region, zero-copy on the way out.

This package is the queue; import its names from here (``from grafos_fabric.queue
import FabricQueue, OneSidedQueue, Item, Batch``). Its modules, each importing
only the ones above it (no cycle; ``tests/whitebox/test_queue_package.py``)::

    _layout            ring geometry, dtype helpers, header offsets, status codes, deadlines
    _items             Item and Batch: popped bytes, zero-copy views of the ring
    _roles             producer/consumer ids, the role-lock marker, reclaiming a dead holder's role
    _protocols         iteration, len() and asyncio on top of push/pop (QueueProtocols)
    _handle            _QueueHandle: a handle's state, header words, seal/epoch, the claim verdict, fork
    _mapped_push       the mapped producer side: push, push_batch, reserve (C hot path)
    _mapped            FabricQueue: create/attach, the mapped consumer side, close
    _onesided_handle   the one-sided handle's state, header words over one-sided ops
    _onesided_push     the one-sided producer: frame locally, WRITE, CAS the tail
    _onesided          OneSidedQueue: create/attach, the one-sided consumer, close

The mapped classes are one chain (``_QueueHandle`` <- ``_MappedProducer`` <-
``FabricQueue``), and so are the one-sided ones (``FabricQueue`` <-
``_OneSidedHandle`` <- ``_OneSidedProducer`` <- ``OneSidedQueue``): one class per
concern and file, each file under ~500 lines. ``FabricQueue`` hands out the
one-sided class for regions that don't map through a registry
(``register_one_sided``), so no module imports one below it.

The ring protocol and layout are in ``native/gf_ring.h``; the push/pop hot path
is C (``grafos_fabric._native``) running on memory mapped into the process.

Lifetime of what ``pop`` returns
--------------------------------
An :class:`Item` (or a :class:`Batch`) pins its bytes in the ring. ``np.asarray(item)``
is a read-only view of the ring memory, not a copy. The space is freed when
the item is released: explicitly (``item.release()``, ``with item:``), or when
the item *and every array made from it* are gone. After an explicit
``release()`` the producer may overwrite the bytes, so views taken earlier must
not be used (the memory stays mapped; it never crashes). Items are freed in
any order; the ring reclaims space up to the oldest unreleased item.

**The rule for consumers that hold items:** the ring cannot reuse space that
an unreleased item pins. A consumer that keeps items (or batches) while it
waits for more can starve the producer; when that would deadlock — the ring
is empty for the consumer, the producer is waiting for space, and this
consumer holds unreleased items — ``pop``/``pop_batch`` raise
:class:`~grafos_fabric.errors.HeldItemsStall` instead of waiting. Copy what you
keep (``item.tobytes()``, ``np.array(item)``) and release the item.

Roles: one producer and one consumer per queue, claimed on first push / first
pop; a second claimant gets :class:`~grafos_fabric.errors.RoleTaken`. A held
role also holds the region's role lock (on shm an open-file-description lock
on the segment file, dropped by the kernel when the holder exits), which is
how ``take_over=True`` tells a dead holder from a live one, in any pid
namespace. A producer stamped with an epoch older than the queue's is
rejected at the target (:class:`~grafos_fabric.errors.StaleEpoch`): the tail
word it must compare-and-swap to publish carries the epoch.

Takeover by a higher epoch happens in place only when the old producer is
provably gone (no holder, or its role lock is free). A live producer may be
mid-copy, writing record bytes past the tail where the new one would publish;
so instead the queue is fenced and *sealed* and the newcomer gets
:class:`~grafos_fabric.errors.QueueSealed` (relocate to a fresh queue). What
remains: the fenced producer, while alive, may still write record bytes past
the sealed tail of the old ring; they are never published.

Threads share a handle safely (each item to exactly one popping thread); a
handle inherited across ``fork()`` raises
:class:`~grafos_fabric.errors.ForkedHandle` in the child. See
:class:`FabricQueue`.
"""

from __future__ import annotations

from ._handle import register_one_sided
from ._items import Batch, Item
from ._layout import DEFAULT_CAPACITY
from ._layout import _deadline as _deadline  # shared with grafos_fabric.pipeline
from ._mapped import FabricQueue
from ._onesided import OneSidedQueue
from ._onesided_handle import OneSidedItem
from ._protocols import QueueProtocols

__all__ = [
    "DEFAULT_CAPACITY",
    "Batch",
    "FabricQueue",
    "Item",
    "OneSidedItem",
    "OneSidedQueue",
    "QueueProtocols",
    "register_one_sided",
]
