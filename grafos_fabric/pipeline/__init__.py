"""Relocatable stage edges: a queue that survives the loss of its lease.

A pipeline edge is a :class:`~grafos_fabric.queue.FabricQueue` in leased
memory plus a *handoff record* on a block lease that says where the edge lives
now (``HandoffWriter``/``HandoffReader``, generation = fence epoch). One
:class:`EdgeProducer` and one :class:`EdgeConsumer` share the block lease::

    blk = open_block(path, create_size=1 << 20)      # both sides open the same file
    tx = RelocatableQueueEdge.producer(fabric, blk, capacity=1 << 22, ttl=30.0, stage=StageId("src"))
    rx = RelocatableQueueEdge.consumer(fabric, blk, stage=StageId("sink"))
    seq = tx.push(buf); tx.push_batch(rows)
    item = rx.pop(timeout=1.0); item.seq; np.asarray(item); rx.ack(item.seq)

Sequence numbers
    Every item carries an *edge sequence number*, assigned by the producer and
    continuous across queues: a queue is created with ``first_seq`` = the
    sequence its first item will carry and the ring numbers items from there.
    The consumer delivers items in sequence order and drops every item whose
    sequence it has already delivered (``stats()["dropped_duplicates"]``).
    Delivery is at-least-once *across restarts* of the consumer; within one
    consumer's lifetime no sequence is delivered twice.

Acknowledgement and the replay window
    ``rx.ack(seq)`` publishes ``acked = seq + 1`` in the current queue's header:
    "every item below it is durably processed". Call it only once the effect of
    those items is durable (after the stage's checkpoint); a consumer that
    restarts from an ``input_offset`` below its last ack cannot be replayed to.
    The producer keeps a copy of every item from the last ``acked`` it has read
    (the *replay window*). The window is bounded by ``window`` bytes; when it is
    full, ``push`` waits for acks (backpressure on a consumer that never acks)
    and raises ``TimeoutError`` when its timeout runs out.

Relocation (producer)
    When a push (or a wait inside one) fails with ``LeaseExpired``,
    ``Revoked``, ``Disconnected``, ``QueueSealed`` or ``StaleEpoch``, or on an
    explicit :meth:`EdgeProducer.relocate`, the producer: takes a new queue
    whose epoch is the next handoff generation and whose ``first_seq`` is the
    replay start (its *standby*, made ahead of time and activated now with
    ``FabricQueue.rebase``, or else a freshly allocated one; see *Standby*
    below); publishes ``bytes(locator)`` through its ``HandoffWriter``;
    seals the old queue (when it is still reachable) with the replay start as
    ``seal_seq``; and then replays its window from the replay start before the
    caller's item goes in. After ``Disconnected`` (the queue's node does not
    answer: killed, stopped, cut off) it neither reads the old queue's ack nor
    seals it, since each would wait for or reconnect to that node: the replay
    starts at the last ack it read, and the old queue is freed once the
    consumer is on the new one. The caller sees no error unless relocation itself
    fails: after ``max_attempts`` failed allocations or publishes it raises
    ``EdgeError(EdgeError.RELOCATION_FAILED)``; the call's item was not
    accepted, the window is kept, and a later call tries again. A producer
    whose handoff publish is refused because a newer generation is on disk,
    or whose queue's epoch was advanced past its own, has been *fenced* by a
    successor: it raises :class:`~grafos_fabric.errors.StaleEpoch` (a
    ``Fenced``) on that call and every later one. It never gets an item into
    the successor's queue (it never learns its locator, and that queue's
    producer role and epoch are the successor's: the ring refuses an older
    epoch at the target).

    The replay start is the consumer's ``acked`` (the largest value the
    producer has read from any of its queues), or, when the old queue was
    sealed by a restarted consumer, the ``seal_seq`` it asked for. A
    ``seal_seq`` below the start of the window cannot be honoured (some
    consumer acked past it, so the items are gone from the window): the
    producer logs a warning and replays from the window's start; a consumer
    that really needs the missing items then raises ``SequenceGap`` (see
    below), so nothing is lost silently.

Standby (both sides; :mod:`.standby`)
    After each relocation (on its next call, once the replay is in) the
    producer makes the *next* queue: dormant (its epoch is the current
    generation, which no producer of the next one pushes at), announced in
    the current generation's handoff record (``HandoffWriter.announce``:
    the same record re-written with a ``standby`` field). The consumer reads
    the announcement (it polls the record while busy until it has one, at
    most every ``poll_interval``, backing off while nothing is announced) and
    attaches the standby at once. At the next relocation the producer
    activates it (``rebase``: ``first_seq`` = the replay start, then the
    epoch advanced), publishes it, seals the old queue and only then pushes
    into it; the consumer, finding the old queue done, sees the standby's
    epoch advanced and binds it: no allocation, mapping or durable read at
    that moment. It reads the new record afterwards (off the critical path),
    which names the queue it bound, or, when it does not (a producer that
    took over published another queue at that generation), it moves to the
    one named. A standby that is sealed, at another epoch or starts past the
    consumer's position is never bound (the record decides). A producer
    taking the edge over seals its predecessor's announced standby; a
    producer seals and frees its standby when it cannot use it and on
    ``close``; a dead producer's standby expires with its lease and is
    reaped. Cost: one more ring of ``capacity`` bytes per edge, one more
    durable write per relocation (off the critical path).
    ``producer(..., standby=False)`` turns it off.

Rebind (consumer)
    The consumer polls the handoff reader when its queue is empty (every
    ``poll_interval`` seconds while it waits), when the queue is sealed and
    drained, and when it fails (``LeaseExpired``, ``Revoked``,
    ``Disconnected``, ``RoleTaken``); first, it binds an activated standby. On a new generation it seals the old queue
    (if live) with its position as ``seal_seq``, drains what the old queue
    still holds (having attached the new queue already, when it found the new
    generation while idle, so the switch costs no attach), binds the new
    queue, re-publishes its ack there, and skips
    the items below its position (their number is known exactly: a queue's
    items are numbered contiguously from its ``first_seq``). An item whose
    sequence is *above* the consumer's position would mean lost items; the
    consumer raises ``EdgeError("SequenceGap")`` rather than deliver it.

Restarts
    *Producer*: ``producer(..., output_commit=N)`` adopts the generation on
    disk (``HandoffWriter.from_disk``), attaches the queue the current record
    names and fences it (``advance_epoch`` to the new generation, then
    ``seal``), publishes a new queue and expects the caller to re-produce from
    ``tx.next_seq``: that is ``N``, or further when the old queue is still
    readable and shows the consumer acked more. A zombie predecessor gets
    ``StaleEpoch``/``QueueSealed`` at its old queue and ``StaleEpoch`` from its
    writer. The right ``output_commit`` to checkpoint is ``tx.acked`` (what
    the consumer durably has), not what was pushed: items pushed but not acked
    live only in the (volatile) window and the queue.
    *Consumer*: ``consumer(..., input_offset=N)`` seals the current queue with
    ``seal_seq=N`` and waits for the next generation; the producer sees the
    seal, relocates and replays from ``N``.

Choices where the grafOS docs are silent (see also DESIGN.md)
    * ``try_push`` raises ``EdgeError(EdgeError.QUEUE_FULL)`` when the ring or
      the window is full (grafOS ``push`` returns ``Err(QueueFull)``); the
      consumer's ``try_pop`` returns ``None`` when empty (grafOS ``Ok(None)``).
    * The handoff record is published *before* the old queue is sealed, so a
      consumer that sees the seal finds the next generation already on disk.
    * The producer renews its current queue's lease from its own calls once
      half the TTL has passed, and every quarter TTL while it waits for space
      (``renew=True``); a producer that makes no calls for a whole TTL loses
      the queue and relocates on its next call (an idle stage calls
      :meth:`EdgeProducer.poll` to keep it, and to notice a consumer's seal).
    * Old queues are retired, not freed, when the producer moves on (a consumer
      may still drain them); they are freed once the consumer has claimed a
      newer queue, on :meth:`EdgeProducer.close`, or by the fabric's reaper
      after their lease runs out.
    * A push that times out after its item reached some queue returns the
      sequence (the item is accepted and will be replayed); otherwise it rolls
      the item back and raises ``TimeoutError``.
    * ``rx.relocate()`` switches at once without draining the old queue (what
      it held comes again from the replay).
    * A rebind reads the handoff record from the block lease. A reader needs
      no ``O_DIRECT`` (only the writer's durability matters): opening the
      consumer's block file with ``open_block(path, direct=False)`` makes the
      poll a page-cache read (Linux keeps it coherent with ``O_DIRECT``
      writes), which matters on devices where one direct read costs ~0.3 ms.
    * ``consumer(..., mapped=False)`` reads queues with one-sided operations
      only (the RDMA ring protocol), on any driver.
    * One thread per edge side: the edge objects are not thread-safe.

The edge uses only ``FabricQueue``, the fabric protocol (``alloc``/``attach``
through ``FabricQueue``; ``drivers.base`` for the type) and the block-lease
protocol (through the handoff records); it never imports a driver.

Modules (each holds one concept; this one only re-exports)
    * :mod:`.window`: :class:`ReplayWindow`, the producer's copy of what the
      consumer has not acked, its five sequence counters and their invariants
      (a pure data structure);
    * :mod:`.gate`: :class:`SequenceGate`, the consumer's deliver / drop / gap
      decision (a pure data structure);
    * :mod:`.edge`: :class:`RelocatableQueueEdge`, what both sides share;
    * :mod:`.producer`: :class:`EdgeProducer`, a state machine
      (:class:`ProducerState`: RELOCATING -> BOUND -> RELOCATING ... -> FENCED)
      with one guarded call site for a lost queue;
    * :mod:`.consumer`: :class:`EdgeConsumer`;
    * :mod:`.standby`: :class:`StandbyQueue`, the producer's next queue made
      ahead of time, and the consumer's checks of an announced one;
    * waits use the library's one :class:`~grafos_fabric.backoff.Backoff`.
"""

from __future__ import annotations

from ..checkpoint import CheckpointedStageState, EdgeCheckpoint, StageId
from ..errors import EdgeError
from ..fence import EdgeGeneration
from .consumer import EdgeConsumer
from .edge import RelocatableQueueEdge
from .gate import SEQUENCE_GAP, SequenceGate, Verdict
from .producer import EdgeProducer, ProducerState
from .standby import StandbyQueue
from .window import ReplayWindow

__all__ = [
    "SEQUENCE_GAP",
    "CheckpointedStageState",
    "EdgeCheckpoint",
    "EdgeConsumer",
    "EdgeError",
    "EdgeGeneration",
    "EdgeProducer",
    "ProducerState",
    "RelocatableQueueEdge",
    "ReplayWindow",
    "SequenceGate",
    "StageId",
    "StandbyQueue",
    "Verdict",
]
