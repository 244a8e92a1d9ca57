"""The parts of the relocatable edge, one at a time: the replay window, the
sequence gate, the shared backoff, and the producer's state machine.

The window and the gate are pure data structures: hypothesis drives them with
random operation sequences (a state machine for the window) and checks their
invariants (the docstrings of ``grafos_fabric/pipeline/window.py`` and
``gate.py``) after every step. The end-to-end promise is tested in
``tests/test_pipeline.py``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _pipeline_faults import FaultPlan, FaultyFabric
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import grafos_fabric as gf
from grafos_fabric import backoff as backoff_mod
from grafos_fabric import errors as E
from grafos_fabric.backoff import Backoff
from grafos_fabric.drivers.block import open_block
from grafos_fabric.pipeline import (
    SEQUENCE_GAP,
    EdgeError,
    ProducerState,
    RelocatableQueueEdge,
    ReplayWindow,
    SequenceGate,
    Verdict,
)
from grafos_fabric.pipeline.window import LIST, ROWS, SINGLE

# -- the replay window -------------------------------------------------------------------------------


def _payload(seq: int) -> bytes:
    return struct.pack("<Q", seq)


class ReplayWindowMachine(RuleBasedStateMachine):
    """Drives a ReplayWindow the way EdgeProducer does, with hostile acks and seals,
    and checks the invariants and the contents after every step."""

    LIMIT = 64 * 8

    def __init__(self) -> None:
        super().__init__()
        self.w = ReplayWindow(0, self.LIMIT)
        self.acked_seen = 0
        self.pushed_hi_seen = 0

    # appends, as push (SINGLE) and push_batch (ROWS / LIST) do: only when has_room says so
    @rule(n=st.integers(1, 20), kind=st.sampled_from([SINGLE, ROWS, LIST]))
    def append(self, n: int, kind: int) -> None:
        w = self.w
        if kind == SINGLE:
            n = 1
        nbytes = 8 * n
        if not w.has_room(nbytes):
            return
        first = w.next_seq
        seqs = range(first, first + n)
        if kind == SINGLE:
            data: Any = _payload(first)
        elif kind == ROWS:
            data = np.frombuffer(b"".join(_payload(s) for s in seqs), dtype=np.uint8).reshape(n, 8).copy()
        else:
            data = [_payload(s) for s in seqs]
        assert w.append(n, kind, data, nbytes) == first
        assert w.next_seq == first + n

    @precondition(lambda self: not self.w.backlog and self.w.has_room(8))
    @rule()
    def fast_push(self) -> None:
        seq = self.w.next_seq
        assert self.w.pushed_one(_payload(seq), 8) == seq

    @precondition(lambda self: self.w.backlog)
    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        """Some of the backlog goes into the current queue (never more than one chunk's rest)."""
        w = self.w
        c, k = w.next_part()
        assert c.first + k == w.qnext
        k_max = c.n - k
        done = data.draw(st.integers(1, k_max))
        before = w.qnext
        replayed = w.sent(done)
        assert 0 <= replayed <= done
        assert w.qnext == before + done

    @rule(a=st.integers(0, 400))
    def ack(self, a: int) -> None:
        """An ack read from shared memory: any value, even past what was pushed."""
        grew = self.w.ack(a)
        assert grew == (a > self.acked_seen)
        self.acked_seen = max(self.acked_seen, a)

    @rule(seal=st.one_of(st.none(), st.integers(0, 400)))
    def relocate(self, seal: int | None) -> None:
        w = self.w
        base_before = w.base
        start, below = w.replay_start(seal)
        assert below == (seal is not None and seal < base_before)
        assert base_before <= start <= w.next_seq
        w.trim(min(start, w.qnext))
        w.rebase(start)
        assert w.qnext == start and w.replay_end == w.pushed_hi

    @precondition(lambda self: self.w.next_seq > self.w.pushed_hi)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        """What never reached a queue can be rolled back; what did stays."""
        w = self.w
        seq = data.draw(st.integers(0, w.next_seq))
        before = w.next_seq
        keep = max(seq, w.pushed_hi, w.qnext)
        assert w.rollback(seq) == min(before, keep)

    @invariant()
    def invariants_hold(self) -> None:
        self.w.check()

    @invariant()
    def counters_only_grow(self) -> None:
        assert self.w.acked == self.acked_seen
        assert self.w.pushed_hi >= self.pushed_hi_seen
        self.pushed_hi_seen = self.w.pushed_hi

    @invariant()
    def every_kept_item_is_the_one_with_its_sequence(self) -> None:
        w = self.w
        if not w.backlog:
            return
        c, k = w.next_part()
        part = c.part(k)
        if c.kind == SINGLE:
            assert part == _payload(c.first)
        elif c.kind == ROWS:
            assert [struct.unpack("<Q", bytes(r))[0] for r in part] == list(range(w.qnext, c.end))
        else:
            assert [struct.unpack("<Q", b)[0] for b in part] == list(range(w.qnext, c.end))


ReplayWindowMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_the_replay_window_keeps_its_invariants_under_any_operation_sequence = ReplayWindowMachine.TestCase


def test_the_window_trims_only_below_both_the_ack_and_the_current_queue() -> None:
    w = ReplayWindow(0, 1 << 20)
    for s in range(10):
        w.append(1, SINGLE, _payload(s), 8)
    w.sent(4)
    assert w.ack(8)  # the consumer claims 8, but only 0..3 are in the current queue
    assert w.base == 4 and w.items == 6
    w.sent(6)
    w.ack(9)
    assert w.base == 9 and w.nbytes == 8
    w.check()


def test_an_ack_read_while_items_waited_for_the_queue_frees_them_once_they_are_in() -> None:
    # the pipeline demo's hang under VM freezes: after a relocation the replay waited for the new
    # queue, the consumer acked everything meanwhile (on the old one), and the window kept the
    # replayed items after they went in, waiting for an ack that grows, which no consumer that
    # has every item sends: the producer waited for room for good
    w = ReplayWindow(0, 8 * 10)
    for s in range(10):
        w.append(1, SINGLE, _payload(s), 8)
    w.sent(10)
    w.rebase(4)  # relocation: the new queue gets 4..9 again
    assert w.ack(10)
    assert w.base == 4 and w.items == 6 and not w.has_room(40)  # not in the new queue yet: kept
    w.sent(6)
    assert w.items == 0 and w.nbytes == 0 and w.has_room(40)  # no further ack needed
    w.check()
    # the same through the one-item fast path, and through a restart that reads an ack
    w = ReplayWindow(0, 1 << 20)
    w.ack(1)
    w.pushed_one(_payload(0), 8)
    assert w.items == 0
    w = ReplayWindow(0, 1 << 20)
    w.append(3, LIST, [_payload(s) for s in range(3)], 24)
    w.sent(3)
    assert not w.resume_at(3) and w.items == 0 and w.acked == 3
    w.check()


def test_a_seal_below_the_window_is_reported_and_the_replay_starts_at_the_window() -> None:
    w = ReplayWindow(0, 1 << 20)
    for s in range(10):
        w.append(1, SINGLE, _payload(s), 8)
    w.sent(10)
    w.ack(5)
    assert w.replay_start(2) == (5, True)
    assert w.replay_start(7) == (7, False)
    assert w.replay_start(None) == (5, False)
    assert w.replay_start(1 << 60) == (10, False)  # a forged seal cannot move the start past next_seq


def test_a_rebase_counts_what_reached_a_queue_before_as_replays() -> None:
    w = ReplayWindow(0, 1 << 20)
    w.append(10, LIST, [_payload(s) for s in range(10)], 80)
    w.sent(6)
    w.rebase(2)
    assert w.sent(8) == 4  # 2..5 went in before: replays; 6..9 are new
    assert w.pushed_hi == 10
    w.check()


def test_a_partly_sent_batch_rolls_back_to_what_reached_the_queue() -> None:
    w = ReplayWindow(0, 1 << 20)
    rows = np.arange(80, dtype=np.uint8).reshape(10, 8)
    w.append(10, ROWS, rows, 80)
    w.sent(3)
    assert w.rollback(0) == 3
    assert w.nbytes == 24 and w.items == 3
    w.check()


def test_a_restart_behind_the_consumers_ack_jumps_there_only_while_empty() -> None:
    w = ReplayWindow(10, 1 << 20)
    assert w.resume_at(50) and w.next_seq == w.qnext == w.pushed_hi == 50
    w.append(1, SINGLE, b"x", 1)
    assert not w.resume_at(80) and w.next_seq == 51 and w.acked == 80
    w.check()


def test_check_names_a_broken_invariant() -> None:
    w = ReplayWindow(0, 1 << 20)
    w.append(1, SINGLE, b"x", 1)
    w.nbytes = 5
    with pytest.raises(AssertionError, match=r"^3:"):
        w.check()


# -- the sequence gate ---------------------------------------------------------------------------------


def test_the_gate_delivers_the_expected_drops_below_and_refuses_a_gap() -> None:
    g = SequenceGate(5, "stage t")
    g.bind(3, generation=2)
    assert g.duplicates_ahead == 2
    assert [g.verdict(s) for s in (4, 5, 6)] == [Verdict.DROP, Verdict.DELIVER, Verdict.GAP]
    assert not g.admit(3) and not g.admit(4)
    assert g.admit(5) and g.expected == 6
    with pytest.raises(EdgeError) as ei:
        g.admit(8)
    assert ei.value.kind == SEQUENCE_GAP
    assert (g.delivered, g.dropped) == (1, 2)


def test_a_fresh_gate_starts_at_the_first_item_it_sees() -> None:
    g = SequenceGate(None)
    g.bind(40, generation=1)
    assert g.verdict(41) is Verdict.DELIVER
    assert g.admit(40) and g.expected == 41


def test_a_queue_that_starts_past_the_position_is_a_gap_at_bind() -> None:
    g = SequenceGate(10)
    with pytest.raises(EdgeError) as ei:
        g.bind(11, generation=3)
    assert ei.value.kind == SEQUENCE_GAP
    assert g.qpos == 0  # not bound


def test_a_run_must_be_contiguous_from_the_queue_position() -> None:
    g = SequenceGate(None)
    g.bind(0, generation=1)
    assert g.admit_run(np.arange(0, 4, dtype=np.uint64))
    with pytest.raises(EdgeError):
        g.admit_run(np.array([4, 6], dtype=np.uint64))
    with pytest.raises(EdgeError):
        g.admit_run(np.array([5, 6], dtype=np.uint64))


def test_a_consumer_that_read_past_the_queue_start_was_preceded() -> None:
    g = SequenceGate(None)
    g.bind(100, generation=1)
    assert g.taken_before(130, queue_first=100)
    assert not g.taken_before(100, queue_first=100)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 40), st.booleans()),  # (back off by, items, as a run)
        min_size=1,
        max_size=12,
    )
)
def test_through_any_replaying_queues_the_gate_delivers_each_sequence_once_in_order(
    queues: list[tuple[int, int, bool]],
) -> None:
    """Each queue replays from at most the gate's position (what a producer
    does); whatever the overlap, the gate delivers 0, 1, 2, ... once each."""
    g = SequenceGate(0)
    delivered: list[int] = []
    top = 0  # one past the highest sequence any queue carried
    for back, n, as_run in queues:
        exp = g.expected
        assert exp is not None
        first = max(0, min(exp, top) - back)
        g.bind(first, generation=1)
        seqs = list(range(first, first + n))
        top = max(top, first + n)
        i = 0
        while i < len(seqs):
            dup = g.duplicates_ahead
            if as_run:  # a batch pops at most the duplicates ahead, so a run is all dropped or all delivered
                k = min(dup, len(seqs) - i) if dup else min(7, len(seqs) - i)
                run = np.array(seqs[i : i + k], dtype=np.uint64)
                if g.admit_run(run):
                    delivered.extend(int(s) for s in run)
                i += k
            else:
                if g.admit(seqs[i]):
                    delivered.append(seqs[i])
                i += 1
    assert delivered == list(range(len(delivered)))
    assert g.expected == len(delivered) == top


# -- the shared backoff ----------------------------------------------------------------------------------


def test_backoff_spins_then_doubles_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(backoff_mod.time, "sleep", slept.append)
    b = Backoff(None, first=0.001, cap=0.004, spin=2)
    for _ in range(7):
        b.pause("x")
    assert slept == [0.001, 0.002, 0.004, 0.004, 0.004]


def test_backoff_never_sleeps_past_its_deadline_and_then_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(backoff_mod.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(backoff_mod.time, "sleep", slept.append)
    b = Backoff(100.003, first=0.002, cap=1.0)
    b.pause("space")
    now[0] = 100.002
    b.pause("space")
    assert slept == [0.002, pytest.approx(0.001)]
    assert b.remaining() == pytest.approx(0.001)
    now[0] = 100.003
    assert b.expired() and b.remaining() == 0.0
    with pytest.raises(TimeoutError, match="timed out waiting for space"):
        b.pause("space")


def test_backoff_refuses_nonsense_settings() -> None:
    with pytest.raises(E.FabricValueError):
        Backoff(None, first=0.0)
    with pytest.raises(E.FabricValueError):
        Backoff(None, first=0.01, cap=0.001)
    with pytest.raises(E.FabricValueError):
        Backoff(None, spin=-1)


def test_the_one_sided_ring_polls_with_the_shared_backoff() -> None:
    from grafos_fabric.queue._onesided_handle import _Backoff

    b = _Backoff(None)
    assert isinstance(b, Backoff)
    assert (b.spin, b.delay, b.cap) == (16, 20e-6, 1e-3)


# -- the producer's states -----------------------------------------------------------------------------------
TTL = 5.0


@pytest.fixture
def clock() -> gf.ManualClock:
    return gf.ManualClock()


@pytest.fixture
def plan() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def fabric(edge_ns: str, clock: gf.ManualClock, plan: FaultPlan) -> Any:
    return FaultyFabric(gf.open_fabric(f"shm://{edge_ns}", clock=clock), plan)


@pytest.fixture
def edge_path(tmp_path: Path) -> str:
    path = str(tmp_path / "edge.blk")
    open_block(path, create_size=1 << 20).close()
    return path


def test_a_producer_is_bound_after_start_and_after_each_relocation(fabric: Any, edge_path: str) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    assert tx.state is ProducerState.BOUND and tx.stats()["state"] == "bound"
    tx.push(b"a")
    tx.lease.revoke()
    tx.push(b"b")
    assert tx.state is ProducerState.BOUND and tx.stats()["relocations"] == 2
    tx.close()
    assert tx.state is ProducerState.CLOSED
    tx.close()
    with pytest.raises(E.QueueClosed):
        tx.push(b"c")


def test_a_failed_relocation_leaves_the_producer_bound_to_its_old_queue_and_a_later_call_retries(
    fabric: Any, edge_path: str, plan: FaultPlan
) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, max_attempts=2)
    old = tx.queue
    tx.lease.revoke()
    plan.alloc_failures = 2
    with pytest.raises(EdgeError) as ei:
        tx.push(b"x", timeout=0)
    assert ei.value.kind == EdgeError.RELOCATION_FAILED
    assert tx.state is ProducerState.BOUND and tx.queue is old and tx.next_seq == 0
    assert tx.push(b"x", timeout=0) == 0
    assert tx.queue is not old and tx.state is ProducerState.BOUND


def test_a_superseded_producer_is_fenced_for_good(fabric: Any, edge_path: str) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    tx.push(b"a")
    tx2 = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    with pytest.raises(E.StaleEpoch):
        tx.push(b"b")
    assert tx.state is ProducerState.FENCED
    for call in (lambda: tx.push(b"c"), tx.poll, lambda: tx.flush(timeout=0), lambda: tx.relocate(timeout=0)):
        with pytest.raises(E.StaleEpoch):
            call()
    tx.close()
    assert tx.state is ProducerState.CLOSED
    assert tx2.state is ProducerState.BOUND
    tx2.free()


def test_a_queue_lost_on_every_allocation_ends_in_an_error_not_a_hang(
    fabric: Any, edge_path: str, clock: gf.ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every queue the producer gets is already dead: the guarded call site stops after
    4 * max_attempts relocations without progress, for flush and poll as for push."""
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, max_attempts=1)
    tx.push(b"a", timeout=0)
    real = tx._bind

    def bind_dead(newq: Any, *a: Any) -> None:
        real(newq, *a)
        newq.lease.revoke()

    monkeypatch.setattr(tx, "_bind", bind_dead)
    tx.lease.revoke()
    for call in (tx.poll, lambda: tx.flush(timeout=1.0), lambda: tx.push(b"b", timeout=0)):
        with pytest.raises(EdgeError) as ei:
            call()
        assert ei.value.kind == EdgeError.RELOCATION_FAILED
        assert "without progress" in str(ei.value)
    assert tx.state is ProducerState.BOUND


class _Unreachable:
    """A queue whose memory node stopped answering: every call that would reach the node raises
    ``Disconnected`` and is recorded; ``owner``/``closed`` are local state, ``free`` gives the
    real queue back (as the producer does once the consumer moved on)."""

    def __init__(self, q: Any) -> None:
        self._q = q
        self.reached: list[str] = []
        self.freed = False

    @property
    def owner(self) -> bool:
        return bool(self._q.owner)

    @property
    def closed(self) -> bool:
        return bool(self._q.closed)

    def free(self) -> None:
        self.freed = True
        self._q.free()

    def __getattr__(self, name: str) -> Any:
        self.reached.append(name)
        raise E.Disconnected(f"injected: the node holding the queue does not answer ({name})")


def test_a_producer_whose_node_does_not_answer_moves_on_without_touching_the_old_queue_again(
    fabric: Any, edge_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disconnected (a killed or cut-off node): the producer relocates at once, neither reads the
    old queue's ack nor seals it (each would wait for or reconnect to the dead node), replays from
    the last ack it read, and frees the old queue once the consumer is on the new one and
    ``_UNREACHABLE_FREE_DELAY_S`` has passed (never while the replay is the consumer's critical
    path); then its pushes take the fast path again. The consumer gets every item once, in order."""
    import grafos_fabric.pipeline.producer as P

    monkeypatch.setattr(P, "_UNREACHABLE_FREE_DELAY_S", 3600.0)  # the delay runs out when the test says so
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), poll_interval=0.001)
    for s in range(10):
        tx.push(_payload(s))
    got = []
    for _ in range(4):
        it = rx.pop(timeout=5)
        got.append(it.seq)
        it.release()
    rx.ack(got[-1])
    tx.poll()  # reads the ack: 4
    real_old = tx.queue
    assert real_old is not None
    dead = _Unreachable(real_old)
    tx._q = dead  # type: ignore[assignment]
    gen = tx.generation
    assert tx.push(_payload(10)) == 10
    assert tx.generation is not None and gen is not None and tx.generation > gen
    assert tx.events()[-1]["reason"] == "Disconnected" and tx.events()[-1]["first_seq"] == 4
    # the push that failed moved the edge: after it nothing was asked of the old queue's node
    assert dead.reached[-1] == "push" and "seal" not in dead.reached, dead.reached
    reached = len(dead.reached)
    assert not real_old.sealed  # never sealed: the consumer finds the new generation by itself
    assert not dead.freed  # kept until the consumer is on the new queue
    while len(got) < 11:
        it = rx.pop(timeout=5)
        got.append(it.seq)
        it.release()
    assert got == list(range(11))
    rx.ack(10)
    assert rx.generation == tx.generation
    tx.push(_payload(11))
    assert not dead.freed and tx._retired  # the consumer is there, but the delay has not passed
    tx._free_after = 0.0  # it has now (white box)
    tx.push(_payload(12))
    assert dead.freed and tx._retired == []  # freed: the fast path is open again
    assert len(dead.reached) == reached, dead.reached  # the ack was never read from it again
    fast = tx._fast
    tx.push(_payload(13))
    assert tx._fast == fast + 1
    assert [rx.pop(timeout=5).seq for _ in range(3)] == [11, 12, 13]
    tx.free()
    rx.close()


def test_a_consumer_attaches_a_newer_generation_while_it_drains_the_old_queue(
    fabric: Any, edge_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer moved on without sealing the old queue (its node stopped answering it): the
    consumer, idle on the old queue, finds the newer generation in the handoff record, attaches
    its queue at once, seals and drains the old one, and then switches to the queue it attached
    early (no second attach). Nothing is delivered twice or lost. (Without a standby: with one,
    the queue was attached even earlier, when its announcement was read; see test_pipeline_standby.)"""
    import grafos_fabric.pipeline.consumer as consumer_mod

    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, standby=False)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path), poll_interval=0.001)
    tx.push(_payload(0))
    it = rx.pop(timeout=5)
    assert it.seq == 0
    it.release()
    rx.ack(0)
    tx.poll()
    real_old = tx.queue
    tx._q = _Unreachable(real_old)  # type: ignore[assignment]
    tx.push(_payload(1))  # moves the edge; the old queue stays unsealed
    assert real_old is not None and not real_old.sealed
    attached: list[Any] = []
    real_attach = consumer_mod.FabricQueue.attach

    while_bound: list[bool] = []

    def counting_attach(*a: Any, **k: Any) -> Any:
        while_bound.append(rx.queue is not None)  # still bound to the old queue
        q = real_attach(*a, **k)
        attached.append(q)
        return q

    monkeypatch.setattr(consumer_mod.FabricQueue, "attach", counting_attach)
    it = rx.pop(timeout=5)
    assert it.seq == 1
    it.release()
    assert while_bound == [True]  # one attach, made while the old queue was still the one in use
    assert rx.queue is attached[0]  # and the queue it attached early is the one in use now
    assert real_old.sealed  # the consumer sealed the old queue before draining it
    assert rx.generation == tx.generation and rx._ready is None
    ev = rx.events()[-1]
    assert ev["t_seen"] <= ev["t_lost"] <= ev["t_bound"]  # the record was read before the old queue ran out
    tx.push(_payload(2))
    it = rx.pop(timeout=5)
    assert it.seq == 2
    it.release()
    assert rx.stats()["dropped_duplicates"] == 0
    tx.free()
    rx.close()
