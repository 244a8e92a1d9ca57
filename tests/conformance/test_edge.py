"""RelocatableQueueEdge: relocation, rebind, replay window, restarts, fencing.

Every test checks the promise of DESIGN.md "Relocation, end to end": every
sequence delivered, in order, none twice after dedup by sequence; a stale
producer never gets an item into the new queue. The deterministic tests run
one producer and one consumer in one thread on a ManualClock with a fault
plan (tests/_pipeline_faults.py); the cross-process tests fork producers and
consumers (tests/_pipeline_workers.py) and kill them with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _pipeline_faults import FaultPlan, FaultyBlock, FaultyFabric
from _pipeline_workers import consumer_main, dedup_sink, producer_main, wait_pid

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.block import open_block
from grafos_fabric.pipeline import (
    SEQUENCE_GAP,
    EdgeConsumer,
    EdgeError,
    EdgeProducer,
    RelocatableQueueEdge,
    StageId,
)

TTL = 5.0
KILL_ITEMS = 1_000_000  # about 0.4 s of streaming: kills land mid-stream


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def clock() -> gf.ManualClock:
    return gf.ManualClock()


@pytest.fixture
def plan() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def edge_path(tmp_path: Path) -> str:
    path = str(tmp_path / "edge.blk")
    open_block(path, create_size=1 << 20).close()
    return path


@pytest.fixture
def fabric(edge_ns: str, clock: gf.ManualClock, plan: FaultPlan) -> Any:
    return FaultyFabric(gf.open_fabric(f"shm://{edge_ns}", clock=clock), plan)


# Every test that builds its edge with make_edge runs on each access pair of the
# conformance matrix that an edge offers: the producer makes its queues mapped (the
# edge's producer API has no one-sided mode), the consumer reads them mapped (the
# native ring) or one-sided (the RDMA ring protocol over shm).
pytestmark = pytest.mark.access("mapped->mapped", "mapped->onesided")


@pytest.fixture
def make_edge(fabric: Any, edge_path: str, plan: FaultPlan, access: str) -> Callable[..., tuple[Any, Any]]:
    """``make_edge(capacity=, window=, **producer_kw) -> (EdgeProducer, EdgeConsumer)`` on this
    test's fabric, edge block and fault plan, the consumer reading as ``access`` says."""
    mapped = access.split("->")[1] == "mapped"

    def make(*, capacity: int = 1 << 16, window: int | None = None, **kw: Any) -> tuple[EdgeProducer, EdgeConsumer]:
        tx = RelocatableQueueEdge.producer(
            fabric, FaultyBlock(open_block(edge_path), plan), capacity=capacity, ttl=TTL, window=window, **kw
        )
        rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), stage=StageId("sink"), mapped=mapped)
        return tx, rx

    return make


def item(seq: int, tag: int = 0) -> bytes:
    return struct.pack("<QQ", seq, tag)


class Sink:
    """Records what a consumer delivers and checks the promise."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.tags: list[int] = []

    def take(self, it: gf.Item) -> None:
        seq, tag = struct.unpack("<QQ", it.tobytes())
        assert seq == it.seq, f"payload of {it.seq} says {seq}"
        self.seqs.append(it.seq)
        self.tags.append(tag)
        it.release()

    def drain(self, rx: EdgeConsumer, *, ack: bool = True, limit: int = 1 << 30) -> int:
        n = 0
        while n < limit:
            it = rx.try_pop()
            if it is None:
                break
            self.take(it)
            n += 1
        if ack and self.seqs:
            rx.ack(self.seqs[-1])
        return n

    def assert_complete(self, n: int, start: int = 0) -> None:
        assert self.seqs == list(range(start, n)), _first_difference(self.seqs, list(range(start, n)))


def _first_difference(got: list[int], want: list[int]) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"at index {i}: got {a}, want {b} (got {len(got)} items, want {len(want)})"
    return f"got {len(got)} items, want {len(want)}"


def run_stream(
    tx: EdgeProducer,
    rx: EdgeConsumer,
    n: int,
    plan: FaultPlan,
    clock: gf.ManualClock,
    *,
    consume_every: int = 3,
    sink: Sink | None = None,
) -> Sink:
    """One thread: step i applies the plan, pushes item i, and every few steps drains and acks.

    A plan dense enough to exhaust a relocation's attempts makes a call raise
    ``RELOCATION_FAILED``; like a real caller, the loop tries again (the item
    was not accepted), so those paths are covered too."""
    sink = sink or Sink()

    def retrying(call: Callable[[], Any]) -> Any:
        for _ in range(20):
            try:
                return call()
            except EdgeError as exc:
                if exc.kind != EdgeError.RELOCATION_FAILED:
                    raise
                plan.fired.append((-1, "relocation_failed"))
        raise AssertionError("relocation kept failing")

    for step in range(n):
        retrying(lambda step=step: plan.apply(step, clock, tx, rx))
        seq = retrying(lambda step=step: tx.push(item(step), timeout=0))
        assert seq == step
        if step % consume_every == 0:
            sink.drain(rx)
    for _ in range(1000):
        if len(sink.seqs) >= n:
            break
        sink.drain(rx)
        retrying(tx.poll)
    retrying(lambda: tx.flush(timeout=5))
    return sink


# -- deterministic fault injection ------------------------------------------------------------------
def test_stream_without_faults_delivers_every_sequence_once_in_order(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    sink = run_stream(tx, rx, 2000, plan, clock)
    sink.assert_complete(2000)
    assert tx.stats()["relocations"] == 1  # the first queue
    assert rx.stats()["dropped_duplicates"] == 0
    assert tx.acked == 2000


@pytest.mark.parametrize("step", [1, 57, 58, 999])
def test_lease_expiry_at_step_n_relocates_and_loses_nothing(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock, step: int
) -> None:
    tx, rx = make_edge()
    plan.at(step, "expire")
    sink = run_stream(tx, rx, 1000, plan, clock)
    sink.assert_complete(1000)
    st = tx.stats()
    assert st["relocations"] == 2 and st["reasons"].get("LeaseExpired") == 1
    assert int(tx.generation) == int(rx.generation) == 2
    assert rx.stats()["rebinds"] == 1


def test_lease_expiry_replays_the_unacked_items_and_the_consumer_drops_what_it_already_has(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    sink = Sink()
    for i in range(100):
        tx.push(item(i), timeout=0)
    sink.drain(rx, ack=False, limit=60)  # delivered 0..59, acked nothing
    rx.ack(19)  # durable up to 19
    tx.poll()  # the producer reads acked = 20
    clock.advance(TTL * 2)  # the queue's lease runs out with 60..99 still in it
    tx.push(item(100), timeout=0)
    sink.drain(rx)
    sink.assert_complete(101)
    assert tx.stats()["replayed"] == 80  # 20..99 went in again
    assert rx.stats()["dropped_duplicates"] == 40  # 20..59 were delivered before


@pytest.mark.parametrize("fault", ["expire", "revoke", "relocate", "seal"])
def test_a_one_sided_consumer_rebinds_through_every_fault_and_loses_nothing(
    fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock, fault: str
) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), mapped=False)  # the RDMA ring protocol
    for step in (40, 41, 150, 260):
        plan.at(step, fault)
    sink = run_stream(tx, rx, 400, plan, clock)
    sink.assert_complete(400)
    assert type(rx.queue).__name__ == "OneSidedQueue"
    assert tx.stats()["relocations"] >= 4


@pytest.mark.parametrize("step", [0, 10, 499])
def test_revoke_at_step_n_relocates_and_loses_nothing(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock, step: int
) -> None:
    tx, rx = make_edge()
    plan.at(step, "revoke")
    sink = run_stream(tx, rx, 500, plan, clock)
    sink.assert_complete(500)
    assert tx.stats()["reasons"].get("Revoked") == 1


def test_single_sync_handoff_durability_relocates_and_loses_nothing(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge(durability="single-sync")
    plan.at(30, "relocate").at(60, "expire").at(90, "revoke")
    run_stream(tx, rx, 120, plan, clock).assert_complete(120)
    assert tx.durability == "single-sync" and int(tx.generation) == 4


@pytest.mark.parametrize("failures", [1, 4])
def test_handoff_write_failure_at_step_m_is_retried_and_loses_nothing(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock, failures: int
) -> None:
    tx, rx = make_edge()
    plan.count = failures
    plan.at(200, "write_fails").at(201, "expire")
    sink = run_stream(tx, rx, 400, plan, clock)
    sink.assert_complete(400)
    assert plan.write_failures == 0
    assert tx.stats()["relocations"] == 2


def test_a_publish_that_fails_after_its_header_landed_counts_and_does_not_fence_the_producer(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    sink = Sink()
    for i in range(20):
        tx.push(item(i), timeout=0)
    plan.fail_sync_in = 1  # a publish is one write (header and data), then one sync <- this one fails
    gen = tx.relocate(timeout=0)
    assert int(gen) == 2 and plan.fail_sync_in == 0
    for i in range(20, 40):
        tx.push(item(i), timeout=0)
    sink.drain(rx)
    sink.assert_complete(40)
    assert tx.stats()["relocations"] == 2 and tx.stats()["relocation_failures"] == 0


def test_allocation_failure_at_relocation_is_retried(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge(standby=False)  # every relocation allocates (a standby would be used instead)
    plan.count = 3
    plan.at(50, "alloc_fails", "revoke")
    sink = run_stream(tx, rx, 200, plan, clock)
    sink.assert_complete(200)
    assert plan.alloc_failures == 0


def test_a_standby_that_cannot_be_made_leaves_the_edge_working(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    """Allocations fail when the producer makes its next standby, after a relocation that used
    the standby it had: the edge keeps working, and nothing is lost or delivered twice."""
    tx, rx = make_edge()
    plan.count = 3
    plan.at(50, "alloc_fails", "revoke")
    sink = run_stream(tx, rx, 200, plan, clock)
    sink.assert_complete(200)
    assert plan.alloc_failures < 3  # making the next standby met a failure (retried later: 1 s)
    st = tx.stats()
    assert st["relocations"] >= 2 and st["standby_used"] >= 1


def test_relocation_that_fails_every_attempt_raises_relocation_failed_and_keeps_the_window(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge(max_attempts=3)
    sink = Sink()
    for i in range(30):
        tx.push(item(i), timeout=0)
    sink.drain(rx, ack=False, limit=10)
    rx.ack(9)
    tx.lease.revoke()
    plan.write_failures = 3  # every publish attempt fails
    with pytest.raises(EdgeError) as ei:
        tx.push(item(30), timeout=0)
    assert ei.value.kind == EdgeError.RELOCATION_FAILED
    assert tx.stats()["relocation_failures"] == 1
    assert tx.next_seq == 30  # item 30 never reached a queue: it was not accepted
    # the fabric heals: the next call relocates, replays 10..29, and nothing is lost
    assert tx.push(item(30), timeout=0) == 30
    sink.drain(rx)
    sink.assert_complete(31)


def _random_plans(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock, seeds: range
) -> None:
    for seed in seeds:
        rand = FaultPlan.random(seed, steps=600, n_faults=25)
        plan.steps = rand.steps
        plan.alloc_failures = plan.write_failures = plan.fail_sync_in = 0
        tx, rx = make_edge()
        assert tx.next_seq == 0
        try:
            sink = run_stream(tx, rx, 600, plan, clock, consume_every=1 + seed % 4)
            sink.assert_complete(600)
        except BaseException as exc:
            raise AssertionError(f"seed {seed}, plan {sorted(rand.steps.items())}") from exc
        tx.free()
        rx.close()
        os.truncate(edge_path, 0)
        os.truncate(edge_path, 1 << 20)


def test_random_fault_plans_never_lose_reorder_or_duplicate_an_item(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    _random_plans(make_edge, fabric, edge_path, plan, clock, range(8))


@pytest.mark.stress
@pytest.mark.access("mapped->mapped")  # bounded in time: the 300 plans once; the 8-plan test above covers both pairs
def test_three_hundred_random_fault_plans_never_lose_reorder_or_duplicate_an_item(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    _random_plans(make_edge, fabric, edge_path, plan, clock, range(100, 400))


def test_try_push_raises_queue_full_when_the_ring_is_full_and_accepts_nothing(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan
) -> None:
    tx, rx = make_edge(capacity=4096)
    n = 0
    with pytest.raises(EdgeError) as ei:
        while True:
            tx.try_push(b"x" * 100)
            n += 1
    assert ei.value.kind == EdgeError.QUEUE_FULL
    assert tx.next_seq == n
    sink_seqs = []
    while (it := rx.try_pop()) is not None:
        sink_seqs.append(it.seq)
        it.release()
    assert sink_seqs == list(range(n))
    assert tx.try_push(b"y" * 100) == n


def test_a_full_replay_window_makes_push_wait_and_time_out_without_accepting(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan
) -> None:
    tx, rx = make_edge(capacity=1 << 16, window=1000)
    for _ in range(10):
        tx.push(b"z" * 100)
    with pytest.raises(TimeoutError):
        tx.push(b"z" * 100, timeout=0.05)
    with pytest.raises(EdgeError) as ei:
        tx.try_push(b"z" * 100)
    assert ei.value.kind == EdgeError.QUEUE_FULL
    assert tx.push_batch([b"z" * 100], timeout=0) == 0  # the non-blocking batch call: a count, not an error
    assert tx.next_seq == 10
    got = [rx.pop(timeout=1) for _ in range(10)]
    rx.ack(got[-1].seq)
    for g in got:
        g.release()
    assert tx.push(b"z" * 100, timeout=1) == 10


def test_consumer_restart_seals_the_queue_and_the_producer_replays_from_input_offset(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    first = Sink()
    for i in range(300):
        tx.push(item(i), timeout=0)
    first.drain(rx, ack=False, limit=250)
    rx.ack(99)  # checkpoint said 100; then the consumer "crashes" (its role stays taken)
    gen = int(tx.generation)
    rx2 = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), input_offset=100)
    assert tx.queue.sealed and tx.queue.seal_seq == 100
    tx.push(item(300), timeout=0)  # sees the seal, relocates, replays 100..299 first
    assert int(tx.generation) == gen + 1
    second = Sink()
    second.drain(rx2)
    second.assert_complete(301, start=100)
    assert tx.stats()["reasons"].get("QueueSealed") == 1


def test_a_fresh_consumer_after_a_clean_close_gets_a_replay_not_the_rest_of_a_consumed_queue(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    for i in range(300):
        tx.push(item(i), timeout=0)
    Sink().drain(rx, ack=False, limit=120)  # took 0..119, released them, never acked
    rx.close()  # a clean close gives the consumer role back: the ring's head is at 120
    rx2 = RelocatableQueueEdge.consumer(fabric, open_block(edge_path))  # no checkpoint: a fresh start
    tx.push(item(300), timeout=0)
    second = Sink()
    for _ in range(200):  # the fresh consumer seals the half-read queue; the producer replays from its ack
        second.drain(rx2, limit=301)
        if len(second.seqs) >= 301:
            break
        tx.poll()
    second.assert_complete(301)


def test_consumer_restart_from_a_checkpoint_below_its_ack_fails_loudly_with_a_sequence_gap(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    for i in range(50):
        tx.push(item(i), timeout=0)
    Sink().drain(rx)  # acks 49
    tx.poll()  # window trimmed to 50
    rx2 = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), input_offset=10)  # misuse: below its ack
    tx.push(item(50), timeout=0)  # replays from 50, the start of its window
    with pytest.raises(EdgeError) as ei:
        rx2.pop(timeout=1)
    assert ei.value.kind == SEQUENCE_GAP


def test_producer_restart_fences_the_zombie_and_reproduces_from_output_commit(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    sink = Sink()
    for i in range(200):
        tx.push(item(i, tag=1), timeout=0)
    sink.drain(rx, limit=120)  # delivered and acked up to 119
    tx.poll()
    commit = tx.acked
    assert commit == 120
    old_gen = int(tx.generation)
    # the successor restores output_commit and takes the edge over; the old producer lives on
    tx2 = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, output_commit=commit)
    assert int(tx2.generation) == old_gen + 1 and tx2.next_seq == commit
    with pytest.raises(E.StaleEpoch):
        tx.push(item(200, tag=1), timeout=0)
    with pytest.raises(E.StaleEpoch):  # and stays fenced
        tx.push(item(201, tag=1), timeout=0)
    for i in range(commit, 400):
        tx2.push(item(i, tag=2), timeout=0)
        if i % 5 == 0:
            sink.drain(rx)
    sink.drain(rx)
    sink.assert_complete(400)
    # 120..199 came from the old queue (drained), the rest from the successor; none from the zombie after the takeover
    assert all(t == 2 for s, t in zip(sink.seqs, sink.tags, strict=True) if s >= 200)
    assert rx.stats()["dropped_duplicates"] == 80


def test_a_producer_that_dies_between_publish_and_seal_leaves_nothing_lost(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    sink = Sink()
    for i in range(100):
        tx.push(item(i), timeout=0)
    sink.drain(rx, limit=50)  # acks 49

    class Died(BaseException):
        pass

    def die(*_a: Any, **_k: Any) -> None:
        raise Died  # the process is gone after the handoff landed, before the old queue was sealed

    tx._retire = die  # type: ignore[method-assign]
    with pytest.raises(Died):
        tx.relocate(timeout=0)
    assert not tx.queue.sealed  # the old queue is still open, generation 2 is an orphan
    sink.drain(rx)  # drains 50..99 from the old queue, sees generation 2, seals the old one, moves on
    assert int(rx.generation) == 2
    tx2 = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, output_commit=50)
    assert tx2.next_seq == 100  # the orphan queue shows the consumer acked everything
    for i in range(tx2.next_seq, 200):
        tx2.push(item(i), timeout=0)
    sink.drain(rx)
    sink.assert_complete(200)
    assert int(rx.generation) == int(tx2.generation) == 3


def test_stale_producer_that_keeps_pushing_never_gets_an_item_into_the_new_queue(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock, edge_ns: str
) -> None:
    tx, rx = make_edge()
    for i in range(10):
        tx.push(item(i, tag=1), timeout=0)
    stale_gen = int(tx.generation)
    tx2 = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, output_commit=0)
    new_q = tx2.queue
    assert new_q is not None
    for i in range(50):
        with pytest.raises(E.StaleEpoch):
            tx.push(item(10 + i, tag=1), timeout=0)
        with pytest.raises(E.StaleEpoch):
            tx.relocate()
    # even with the new queue's locator in hand, a writer stamped with the old epoch is refused at the target
    rec = gf.FabricQueue.attach(fabric, new_q.locator(), epoch=stale_gen)
    with pytest.raises((E.StaleEpoch, E.RoleTaken)):
        rec.push(item(999, tag=1))
    for i in range(30):
        tx2.push(item(i, tag=2), timeout=0)
    sink = Sink()
    sink.drain(rx)
    sink.assert_complete(30)
    new_seqs = [s for s, t in zip(sink.seqs, sink.tags, strict=True) if t == 1]
    assert new_seqs == list(range(10))  # only what the stale producer pushed before the takeover (old queue)
    assert new_q.stats()["next_seq"] == 30
    assert tx2.stats()["relocations"] == 1


def test_an_oversize_item_is_refused_without_poisoning_the_window(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan
) -> None:
    tx, rx = make_edge(capacity=4096)
    tx.push(item(0), timeout=0)
    with pytest.raises(E.ItemTooLarge):
        tx.push(b"x" * 8192, timeout=0)
    with pytest.raises(E.ItemTooLarge):
        tx.push_batch([item(1), b"x" * 8192], timeout=0)
    assert tx.next_seq == 1 and tx.window_items == 1
    tx.push(item(1), timeout=0)
    sink = Sink()
    sink.drain(rx)
    sink.assert_complete(2)


def test_an_idle_producer_in_flush_notices_a_consumer_restart_and_replays_from_its_offset(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan
) -> None:
    import threading

    tx, rx = make_edge()
    for i in range(100):
        tx.push(item(i), timeout=0)
    first = Sink()
    first.drain(rx, ack=False, limit=70)
    rx.ack(39)  # checkpoint at 40, then the consumer dies
    got = Sink()
    errors: list[BaseException] = []

    def restarted_consumer() -> None:
        try:
            rx2 = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), input_offset=40)
            while rx2.position is None or rx2.position < 100:
                got.take(rx2.pop(timeout=5))
                rx2.ack(got.seqs[-1])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=restarted_consumer)
    t.start()
    tx.flush(timeout=10)  # sees the seal, relocates, replays 40..99, waits for the acks
    t.join(10)
    assert not errors, errors
    got.assert_complete(100, start=40)
    assert tx.stats()["reasons"].get("QueueSealed") == 1


def test_a_producer_waiting_on_a_slow_consumer_for_several_ttls_keeps_its_lease(
    edge_ns: str, edge_path: str, clock: gf.ManualClock
) -> None:
    """Three TTLs pass on the lease's clock while the producer waits for space in a full ring. The
    clock is the test's: it steps past each renewal and waits (in real time, generously) for the
    waiting producer to renew before it steps on, so a stalled machine slows the test but cannot
    expire the lease (in real time, a 0.5 s TTL renewed at half a TTL left 250 ms of margin). That
    the renewal is not late in real time is test_a_wait_for_space_ends_when_the_renewal_is_due."""
    import threading

    fabric = gf.open_fabric(f"shm://{edge_ns}", clock=clock)
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=4096, ttl=0.5)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path))
    n = 0
    while True:  # fill the ring
        try:
            tx.try_push(item(n))
        except EdgeError:
            break
        n += 1
    lease = tx.queue.lease
    pushed: list[int] = []
    waiter = threading.Thread(target=lambda: pushed.append(tx.push(item(n), timeout=120)))
    waiter.start()
    renewals = 0
    for _ in range(30):  # 30 steps of 50 ms: 1.5 s of the lease's clock, three TTLs
        before = lease.deadline_ns
        clock.advance(0.05)  # never past the deadline: the renewal is due half a TTL before it
        assert clock.now_ns() < before
        if clock.now_ns() < tx._renew_at:
            continue
        end = time.monotonic() + 60
        # the producer renews when its wait slice ends, then sets when the next renewal is due (both,
        # before the next step reads that)
        while lease.deadline_ns == before or tx._renew_at <= clock.now_ns():
            assert time.monotonic() < end, "the producer waiting for space did not renew its lease"
            time.sleep(0.001)
        renewals += 1
    assert renewals >= 5 and waiter.is_alive() and not pushed  # still waiting: nobody has popped
    sink = Sink()
    sink.drain(rx)
    waiter.join(60)
    assert pushed == [n]
    sink.drain(rx)
    sink.assert_complete(n + 1)
    assert tx.stats()["relocations"] == 1  # never lost the lease while it waited


def test_write_behind_asked_of_an_edge_whose_queues_lack_it_runs_without(edge_ns: str, edge_path: str) -> None:
    """``write_behind=True`` on a fabric whose queue handles cannot post a publication (shm):
    the edge runs as without it, says so in ``stats()``, and delivers everything."""
    fabric = gf.open_fabric(f"shm://{edge_ns}")
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=4096, ttl=30.0, write_behind=True)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path))
    assert tx.write_behind and tx.stats()["write_behind"] is False
    sink = Sink()
    for n in range(20):
        tx.push(item(n))
    tx.poll()
    sink.drain(rx)
    sink.assert_complete(20)
    tx.close()
    rx.close()


def test_a_wait_for_space_ends_when_the_renewal_is_due(edge_ns: str, edge_path: str, clock: gf.ManualClock) -> None:
    """The producer waits for space in slices that end when its renewal is due, not a quarter
    TTL after the check that found it not yet due (which left a quarter TTL of margin)."""
    fabric = gf.open_fabric(f"shm://{edge_ns}", clock=clock)
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=4096, ttl=1.0)
    tx.push(item(0))  # bound: renewed now, due in half a TTL
    assert tx._renew_slice() == pytest.approx(0.25)  # a quarter TTL while the renewal is far
    clock.advance(0.4)
    assert tx._renew_slice() == pytest.approx(0.1)  # cut to end when the renewal is due
    clock.advance(0.2)
    assert tx._renew_slice() == 0.001  # overdue: the next check renews
    tx._maybe_renew()
    assert tx._renew_slice() == pytest.approx(0.25)
    tx.close()


def test_a_batch_larger_than_the_window_goes_in_pieces_while_the_consumer_acks(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan
) -> None:
    import threading

    tx, rx = make_edge(capacity=1 << 16, window=4096)
    sink = Sink()

    def consumer() -> None:
        while len(sink.seqs) < 1000:
            it = rx.pop(timeout=5)
            sink.take(it)
            rx.ack(sink.seqs[-1])

    t = threading.Thread(target=consumer)
    t.start()
    assert tx.push_batch([item(i) for i in range(1000)], timeout=10) == 1000  # 16 KB through a 4 KB window
    t.join(10)
    sink.assert_complete(1000)
    assert tx.window_bytes <= 4096


def _zombie_main(ns: str, edge_path: str, marker: str) -> None:
    """A producer that pushes tag-1 items until it is fenced, then keeps trying."""
    tx = RelocatableQueueEdge.producer(gf.open_fabric(f"shm://{ns}"), open_block(edge_path), capacity=1 << 16)
    seq = 0
    fenced = 0
    deadline = time.monotonic() + 30
    while fenced < 200 and time.monotonic() < deadline:
        try:
            seq = tx.push(item(seq, tag=1), timeout=1) + 1
        except E.StaleEpoch:
            fenced += 1
        except TimeoutError:
            pass
    Path(marker).write_text(str(fenced))


def test_a_stale_producer_in_another_process_never_gets_an_item_into_the_new_queue(
    tmp_path: Path, edge_ns: str, edge_path: str
) -> None:
    fabric = gf.open_fabric(f"shm://{edge_ns}")
    marker = str(tmp_path / "zombie.txt")
    zombie = fork(_zombie_main, edge_ns, edge_path, marker)
    try:
        rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path))
        got: list[tuple[int, int, int]] = []  # (seq, tag, generation it came from)

        def drain() -> None:
            while (it := rx.try_pop()) is not None:
                seq, tag = struct.unpack("<QQ", it.tobytes())
                assert seq == it.seq
                got.append((it.seq, tag, int(rx.generation)))
                it.release()
            if got:
                rx.ack(got[-1][0])

        while len(got) < 2000:
            drain()
        successor = RelocatableQueueEdge.producer(
            fabric, open_block(edge_path), capacity=1 << 16, output_commit=rx.acked
        )
        new_gen = int(successor.generation)
        for i in range(successor.next_seq, successor.next_seq + 5000):
            successor.push(item(i, tag=2), timeout=5)
            if i % 50 == 0:
                drain()
        deadline = time.monotonic() + 10
        while not os.path.exists(marker) and time.monotonic() < deadline:
            drain()
            time.sleep(0.001)
        drain()
        assert wait_pid(zombie, 30) == 0
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(zombie, signal.SIGKILL)
        raise
    assert int(Path(marker).read_text()) >= 1  # the zombie was fenced (and kept trying)
    seqs = [s for s, _, _ in got]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 7000
    stale_in_new = [(s, g) for s, t, g in got if t == 1 and g >= new_gen]
    assert stale_in_new == [], stale_in_new[:5]
    assert all(t == 2 for _, t, g in got if g >= new_gen)


def test_consumer_without_a_record_waits_and_times_out(fabric: Any, edge_path: str) -> None:
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path))
    assert rx.generation is None and rx.try_pop() is None
    with pytest.raises(TimeoutError):
        rx.pop(timeout=0.02)


def test_consumer_that_sees_a_gap_raises_sequence_gap(fabric: Any, edge_path: str, plan: FaultPlan) -> None:
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), input_offset=5)
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, output_commit=10)
    tx.push(item(10), timeout=0)
    with pytest.raises(EdgeError) as ei:
        rx.pop(timeout=0.5)
    assert ei.value.kind == SEQUENCE_GAP


def test_batches_come_out_in_order_across_relocations_with_zero_copy_rows(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge(capacity=1 << 18)
    got: list[int] = []
    seq = 0
    for rnd in range(40):
        s = np.arange(seq, seq + 100, dtype=np.int64)
        assert tx.push_batch(np.stack([s, s * 3], axis=1), timeout=0) == 100
        seq += 100
        if rnd % 3 == 1:
            tx.relocate(timeout=0)
        if rnd % 7 == 3:
            clock.advance(TTL * 2)
        while True:
            b = rx.pop_batch(64, timeout=0)
            if not len(b):
                break
            a = b.array().view(np.int64)
            assert np.array_equal(a[:, 0], b.seqs.astype(np.int64)) and np.array_equal(a[:, 1], a[:, 0] * 3)
            got.extend(int(x) for x in b.seqs)
            b.release()
        if got:
            rx.ack(got[-1])
    assert got == list(range(seq))


def test_explicit_consumer_relocate_switches_without_draining_and_loses_nothing(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    sink = Sink()
    for i in range(40):
        tx.push(item(i), timeout=0)
    sink.drain(rx, limit=10)
    assert rx.relocate() is False  # nothing newer yet
    # a newer generation appears; the consumer switches at once and gets 10.. from the replay
    tx2 = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, output_commit=10)
    for i in range(10, 40):
        tx2.push(item(i), timeout=0)
    assert rx.relocate() is True
    sink.drain(rx)
    sink.assert_complete(40)


def test_stats_report_relocations_replays_duplicates_and_rebind_times(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    plan.at(10, "relocate").at(20, "revoke").at(30, "expire")
    run_stream(tx, rx, 50, plan, clock).assert_complete(50)
    st, sr = tx.stats(), rx.stats()
    for key in ("relocations", "replayed", "rebind_p50_ms", "rebind_p99_ms", "generation", "acked"):
        assert key in st
    for key in ("rebinds", "dropped_duplicates", "delivered", "rebind_p50_ms", "rebind_p99_ms"):
        assert key in sr
    assert st["relocations"] == 4 and sr["rebinds"] == 3 and sr["delivered"] == 50
    assert st["generation"] == sr["generation"] == 4
    assert 0 < st["rebind_p50_ms"] <= st["rebind_p99_ms"]
    assert [e["generation"] for e in tx.events()] == [1, 2, 3, 4]
    assert [e["reason"] for e in tx.events()] == ["start", "explicit", "Revoked", "LeaseExpired"]
    assert [e["generation"] for e in rx.events()] == [2, 3, 4]
    assert tx.lease is tx.queue.lease


def test_producer_renews_its_queue_lease_while_it_pushes(
    make_edge: Any, fabric: Any, edge_path: str, plan: FaultPlan, clock: gf.ManualClock
) -> None:
    tx, rx = make_edge()
    sink = Sink()
    for i in range(100):
        clock.advance(TTL * 0.3)  # 30 TTLs in all, never a whole TTL without a push
        tx.push(item(i), timeout=0)
        sink.drain(rx)
    sink.assert_complete(100)
    assert tx.stats()["relocations"] == 1


# -- cross-process -----------------------------------------------------------------------------------
def fork(fn: Callable[..., None], *args: Any, **kwargs: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn(*args, **kwargs)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _paths(tmp_path: Path, tag: str) -> dict[str, str]:
    out = {}
    for name in ("edge", "pck", "cck"):
        p = str(tmp_path / f"{tag}-{name}.blk")
        open_block(p, create_size=1 << 20).close()
        out[name] = p
    out["sink"] = str(tmp_path / f"{tag}-sink.bin")
    return out


def _forced_relocations(
    tmp_path: Path, ns: str, n: int, relocations: int, timeout: float, *, mapped: bool = True
) -> None:
    p = _paths(tmp_path, "forced")
    every = max(1, n // (relocations + 1))
    stats = str(tmp_path / "pstats.txt")
    prod = fork(producer_main, ns, p["edge"], p["pck"], n, batch=256, relocate_every=every, stats_path=stats)
    cons = fork(consumer_main, ns, p["edge"], p["cck"], p["sink"], n, mapped=mapped)
    assert wait_pid(cons, timeout) == 0
    assert wait_pid(prod, timeout) == 0
    raw = np.fromfile(p["sink"], dtype=np.int64)
    assert np.array_equal(raw, np.arange(n)), "one consumer lifetime: every sequence once, in order"
    st = eval(Path(stats).read_text())  # our own repr of a dict of numbers and strings
    assert st["relocations"] >= relocations


def test_forced_relocations_across_two_processes_deliver_every_sequence_once_in_order(
    tmp_path: Path, edge_ns: str
) -> None:
    _forced_relocations(tmp_path, edge_ns, 100_000, 100, timeout=60)


def test_forced_relocations_with_a_one_sided_consumer_in_another_process_lose_nothing(
    tmp_path: Path, edge_ns: str
) -> None:
    _forced_relocations(tmp_path, edge_ns, 50_000, 50, timeout=60, mapped=False)


@pytest.mark.stress
def test_a_thousand_forced_relocations_over_a_million_items_deliver_every_sequence_once_in_order(
    tmp_path: Path, edge_ns: str
) -> None:
    _forced_relocations(tmp_path, edge_ns, 1_000_000, 1000, timeout=240)


def _kill_trials(
    tmp_path: Path, ns: str, victim: str, trials: int, n: int, seed: int, relocate_every: int = 0
) -> None:
    """Each trial: a producer and a consumer process; the victim is killed with SIGKILL 1-3 times
    at random moments and restarted from its checkpoint. The sink (deduped by sequence) must hold
    every sequence once, in order."""
    rng = random.Random(seed)
    hits = 0
    for trial in range(trials):
        p = _paths(tmp_path, f"{victim}{trial}")

        def start_producer(p: dict[str, str] = p) -> int:
            return fork(
                producer_main, ns, p["edge"], p["pck"], n,
                batch=128, checkpoint_every=8192, relocate_every=relocate_every,
            )

        def start_consumer(p: dict[str, str] = p) -> int:
            return fork(consumer_main, ns, p["edge"], p["cck"], p["sink"], n, checkpoint_every=8192)

        prod, cons = start_producer(), start_consumer()
        finished: dict[int, int] = {}
        for _ in range(rng.randint(1, 3)):
            time.sleep(rng.uniform(0.005, 0.15))
            who = victim if victim != "both" else rng.choice(["producer", "consumer"])
            pid = prod if who == "producer" else cons
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished[pid] = os.waitstatus_to_exitcode(status)
                break
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hits += 1
            if who == "producer":
                prod = start_producer()
            else:
                cons = start_consumer()
        try:
            rc = finished[cons] if cons in finished else wait_pid(cons, 60)
            assert rc == 0, f"trial {trial}: consumer failed"
            rc = finished[prod] if prod in finished else wait_pid(prod, 60)
            assert rc == 0, f"trial {trial}: producer failed"
        except BaseException:
            for pid in (prod, cons):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
        kept, _dups = dedup_sink(p["sink"])
        assert np.array_equal(kept, np.arange(n)), f"trial {trial}: {_first_difference(kept.tolist(), list(range(n)))}"
    assert hits >= max(1, trials // 3), f"only {hits} kills landed on a running {victim}: the trials are too short"


def test_producer_kill_9_at_random_points_loses_nothing(tmp_path: Path, edge_ns: str) -> None:
    _kill_trials(tmp_path, edge_ns, "producer", trials=4, n=KILL_ITEMS, seed=1)


def test_consumer_kill_9_at_random_points_loses_nothing(tmp_path: Path, edge_ns: str) -> None:
    _kill_trials(tmp_path, edge_ns, "consumer", trials=4, n=KILL_ITEMS, seed=2)


def test_kill_9_of_either_side_amid_standby_relocations_loses_nothing(tmp_path: Path, edge_ns: str) -> None:
    """The producer relocates every 4096 items (about every 2 ms), each time into its standby
    and making the next one: kills land mid-relocation, mid-activation and mid-announcement.
    The restarted producer seals its predecessor's standby; nothing is lost."""
    _kill_trials(tmp_path, edge_ns, "both", trials=6, n=KILL_ITEMS // 2, seed=21, relocate_every=4096)


@pytest.mark.stress
def test_fifty_producer_kill_9_trials_lose_nothing(tmp_path: Path, edge_ns: str) -> None:
    _kill_trials(tmp_path, edge_ns, "producer", trials=50, n=KILL_ITEMS, seed=11)


@pytest.mark.stress
def test_fifty_consumer_kill_9_trials_lose_nothing(tmp_path: Path, edge_ns: str) -> None:
    _kill_trials(tmp_path, edge_ns, "consumer", trials=50, n=KILL_ITEMS, seed=12)


@pytest.mark.stress
def test_fifty_trials_killing_either_side_at_random_lose_nothing(tmp_path: Path, edge_ns: str) -> None:
    _kill_trials(tmp_path, edge_ns, "both", trials=50, n=KILL_ITEMS, seed=13)
