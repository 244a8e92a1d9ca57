"""The standby queue (grafos_fabric.pipeline.standby): made, announced, attached, used, freed.

The producer keeps its next queue made ahead of time (dormant: epoch = the current
generation), announces it in the handoff record, and activates it at the next relocation
(``FabricQueue.rebase``); the consumer attaches it when it reads the announcement and binds
it at the critical moment without an attach or a handoff read. These tests check each step,
the fallbacks (a sealed, forged or missing standby), the cleanup (close, a dead producer) and
that nothing is lost, reordered or delivered twice.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.block import open_block
from grafos_fabric.handoff import HandoffReader, HandoffWriter
from grafos_fabric.locator import QueueLocator
from grafos_fabric.pipeline import RelocatableQueueEdge
from grafos_fabric.pipeline.standby import announced_standby
from grafos_fabric.queue import OneSidedQueue

TTL = 30.0


@pytest.fixture
def fabric(edge_ns: str) -> Any:
    return gf.open_fabric(f"shm://{edge_ns}")


@pytest.fixture
def edge_path(tmp_path: Path) -> str:
    path = str(tmp_path / "edge.blk")
    open_block(path, create_size=1 << 20).close()
    return path


def _item(seq: int) -> bytes:
    return struct.pack("<Q", seq)


def _take(rx: Any, n: int, got: list[int]) -> None:
    for _ in range(n):
        it = rx.pop(timeout=10)
        assert struct.unpack("<Q", it.tobytes())[0] == it.seq
        got.append(it.seq)
        it.release()


def _standby_locator(edge_path: str) -> QueueLocator:
    loc = announced_standby(HandoffReader(open_block(edge_path, direct=False)).current())
    assert loc is not None, "no standby announced"
    return loc


def _poll_soon(rx: Any) -> None:
    """The consumer's next pop reads the handoff record (busy, it does so now and then)."""
    rx._sb_next_poll = 0.0
    rx._sb_tick = 1


def _learn(rx: Any) -> None:
    """Let an idle consumer read the handoff record (it attaches the standby it announces)."""
    rx._sb_next_poll = 0.0
    rx._next_poll = 0.0
    assert rx.try_pop() is None


# -- FabricQueue.rebase: the activation step ------------------------------------------------------------------
@pytest.mark.parametrize("one_sided", [False, True], ids=["mapped", "onesided"])
def test_a_fresh_queue_is_rebased_to_a_new_first_seq_and_epoch(fabric: Any, one_sided: bool) -> None:
    make = OneSidedQueue.create if one_sided else gf.FabricQueue.create
    q = make(fabric, 1 << 16, TTL, epoch=3, first_seq=7)
    reader = gf.FabricQueue.attach(fabric, q.locator(), mapped=not one_sided)  # attached while dormant
    assert reader.first_seq == 7 and reader.epoch == 3
    q.rebase(100, 4)
    assert reader.epoch == 4 and reader.reread_first_seq() == 100
    loc = q.locator()
    assert (loc.first_seq, loc.epoch) == (100, 4)
    assert q.push(b"abc") == 100 and q.push(b"def") == 101
    assert [reader.pop(timeout=5).seq for _ in range(2)] == [100, 101]
    q.free()


@pytest.mark.parametrize("one_sided", [False, True], ids=["mapped", "onesided"])
def test_rebase_is_refused_once_used_sealed_by_another_handle_or_not_forward(fabric: Any, one_sided: bool) -> None:
    make = OneSidedQueue.create if one_sided else gf.FabricQueue.create
    q = make(fabric, 1 << 16, TTL, epoch=3)
    other = gf.FabricQueue.attach(fabric, q.locator(), mapped=not one_sided)
    with pytest.raises(E.FabricValueError):
        other.rebase(5, 4)  # not the creating handle
    with pytest.raises(E.StaleEpoch):
        q.rebase(5, 3)  # the epoch must move forward
    q.push(b"x")
    with pytest.raises(E.FabricValueError):
        q.rebase(5, 4)  # a producer pushed: no longer fresh
    q.free()
    s = make(fabric, 1 << 16, TTL, epoch=3)
    gf.FabricQueue.attach(fabric, s.locator()).seal(0)  # fenced by someone else
    with pytest.raises(E.QueueSealed):
        s.rebase(5, 4)
    s.free()


# -- made, announced, attached, used -------------------------------------------------------------------------
def test_the_producer_announces_a_dormant_standby_after_it_binds(fabric: Any, edge_path: str) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    tx.push(_item(0))  # the first call after the relocation makes the standby
    rec = HandoffReader(open_block(edge_path, direct=False)).current()
    loc = announced_standby(rec)
    assert loc is not None and int(rec.generation) == int(tx.generation or 0)
    assert QueueLocator.from_bytes(rec.payload).region == tx.queue.region.ref()  # the payload is untouched
    sb = gf.FabricQueue.attach(fabric, loc)
    assert sb.epoch == int(rec.generation) and not sb.sealed  # dormant: the current generation's epoch
    assert sb.region.ref() != tx.queue.region.ref()
    assert tx.stats()["standby_made"] == 1
    sb.close()
    tx.free()


def test_the_consumer_binds_the_standby_without_an_attach_or_a_handoff_read(
    fabric: Any, edge_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grafos_fabric.pipeline.consumer as consumer_mod

    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.001)
    got: list[int] = []
    for s in range(5):
        tx.push(_item(s))
    _take(rx, 5, got)
    _learn(rx)  # reads the announcement and attaches the standby
    sb_loc = _standby_locator(edge_path)
    assert rx._sb is not None and rx._sb[1].region == sb_loc.region
    polls: list[float] = []
    attaches: list[float] = []
    real_poll = rx._reader.poll
    real_attach = consumer_mod.FabricQueue.attach

    def counting_poll(*a: Any, **k: Any) -> Any:
        polls.append(time.monotonic())
        return real_poll(*a, **k)

    def counting_attach(*a: Any, **k: Any) -> Any:
        attaches.append(time.monotonic())
        return real_attach(*a, **k)

    monkeypatch.setattr(rx._reader, "poll", counting_poll)
    monkeypatch.setattr(consumer_mod.FabricQueue, "attach", counting_attach)
    rx._sb_next_poll = time.monotonic() + 3600  # no busy poll before the switch
    gen = tx.generation
    tx.relocate()  # activates the standby, publishes it, seals the old queue
    assert tx.queue is not None and tx.queue.region.ref() == sb_loc.region
    assert tx.events()[-1]["standby"] is True
    for s in range(5, 10):
        tx.push(_item(s))
    _take(rx, 5, got)
    assert got == list(range(10))
    ev = rx.events()[-1]
    assert ev["standby"] is True and rx.generation == tx.generation and int(rx.generation) == int(gen) + 1
    assert rx.queue.region.ref() == sb_loc.region
    assert not [t for t in attaches if t <= ev["t_bound"]]  # nothing attached (mapped) at the switch
    assert not [t for t in polls if t <= ev["t_bound"]]  # no handoff read at the switch
    assert rx.stats()["standby_binds"] == 1
    # afterwards, off the critical path, the consumer reads the record: it names the queue bound
    _learn(rx)
    assert polls and rx._unconfirmed is None and rx.queue.region.ref() == sb_loc.region
    tx.free()
    rx.close()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "onesided"])
def test_many_relocations_through_standbys_keep_every_item_once_in_order(
    fabric: Any, edge_path: str, mapped: bool
) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.001, mapped=mapped)
    got: list[int] = []
    seq = 0
    for _round in range(30):
        for _ in range(7):
            tx.push(_item(seq))
            seq += 1
        if rx._sb is None:  # no standby known yet for the next generation: the next pop reads the record
            _poll_soon(rx)
        _take(rx, 4, got)
        rx.ack(got[-1])
        tx.relocate()
        _take(rx, 3, got)
    assert got == list(range(seq))
    st = tx.stats()
    assert st["relocations"] == 31 and st["standby_used"] == 30
    # the last switch comes with the next pop (the old queue still held the last three)
    assert rx.stats()["rebinds"] == 29 and rx.stats()["dropped_duplicates"] > 0  # replays came, were dropped
    # every switch was prepared before the old queue ran out: bound to the standby attached ahead, or
    # to it as named by the newer record read while busy (the slow busy poll): never attached then
    ev = rx.events()
    assert all(e["t_seen"] is not None and e["t_seen"] < e["t_lost"] for e in ev), ev
    assert sum(1 for e in ev if e["standby"]) >= 1
    tx.free()
    rx.close()


def test_standby_false_announces_nothing(fabric: Any, edge_path: str) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, standby=False)
    tx.push(_item(0))
    tx.relocate()
    tx.push(_item(1))
    assert HandoffReader(open_block(edge_path, direct=False)).current().standby == b""
    assert tx.stats()["standby_made"] == 0 and len(fabric.segments()) == 2  # the queue, the one retired
    tx.free()


# -- freed, reaped -----------------------------------------------------------------------------------------------
def test_close_seals_and_frees_the_standby(fabric: Any, edge_path: str) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    tx.push(_item(0))
    loc = _standby_locator(edge_path)
    held = gf.FabricQueue.attach(fabric, loc)  # a consumer that attached it ahead
    assert len(fabric.segments()) == 2
    tx.close()
    assert held.sealed  # a consumer never binds it now
    assert len(fabric.segments()) == 1  # the standby is gone; the current queue stays for the consumer
    with pytest.raises((E.LeaseExpired, E.Revoked, E.FabricError)):
        gf.FabricQueue.attach(fabric, loc)
    held.close()
    tx.free()
    assert fabric.segments() == []


def test_a_dead_producers_standby_is_reaped_with_its_lease(edge_ns: str, edge_path: str) -> None:
    ttl = 0.5
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fab = gf.open_fabric(f"shm://{edge_ns}")
            tx = RelocatableQueueEdge.producer(fab, open_block(edge_path), capacity=1 << 16, ttl=ttl)
            tx.push(_item(0))
            tx.relocate()
            tx.push(_item(1))  # a standby again, after the one the relocation used
            assert tx.stats()["standby_made"] == 2
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    fabric = gf.open_fabric(f"shm://{edge_ns}")
    assert _standby_locator(edge_path) is not None
    assert len(fabric.segments()) >= 2  # the current queue and the standby, at least
    end = time.monotonic() + 60  # the leases end half a second after the child's last renewal
    while fabric.segments():
        assert time.monotonic() < end, f"not reaped: {fabric.segments()}"
        fabric.reap()
        time.sleep(0.02)


# -- forged, fenced, missing -----------------------------------------------------------------------------------
def test_a_record_announcing_a_damaged_or_live_standby_is_refused_with_corrupted(fabric: Any, edge_path: str) -> None:
    q = gf.FabricQueue.create(fabric, 1 << 16, TTL, epoch=1)
    w = HandoffWriter(open_block(edge_path))
    w.publish(bytes(q.locator()), standby=b"GFQL not a locator")
    with pytest.raises(E.Corrupted):
        RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False))
    live = gf.FabricQueue.create(fabric, 1 << 16, TTL, epoch=5)  # at an epoch past the next generation
    w.publish(bytes(q.locator()), standby=bytes(live.locator()))
    with pytest.raises(E.Corrupted, match="dormant"):
        RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False))
    q.free()
    live.free()


def test_a_forged_activation_is_followed_only_as_far_as_the_record_allows(fabric: Any, edge_path: str) -> None:
    """A co-tenant seals the current queue and advances the standby's epoch (what the producer's
    activation does). The consumer binds the standby, which is empty; the producer cannot activate it
    (its epoch moved) and allocates instead; the consumer reads the record naming the new queue at
    that generation and moves there. Every item once, in order."""
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.001)
    got: list[int] = []
    for s in range(6):
        tx.push(_item(s))
    _take(rx, 6, got)
    _learn(rx)
    gen = int(tx.generation or 0)
    forger_sb = gf.FabricQueue.attach(fabric, _standby_locator(edge_path))
    forger_cur = gf.FabricQueue.attach(fabric, tx.queue.locator())
    forger_sb.advance_epoch(gen + 1)
    forger_cur.seal(6)
    with pytest.raises(TimeoutError):
        rx.pop(timeout=0.05)  # the forged switch: bound to the (empty) standby
    assert rx.stats()["standby_binds"] == 1 and rx._unconfirmed is not None
    for s in range(6, 12):
        tx.push(_item(s))  # sealed queue: the producer relocates, the standby is refused (epoch moved)
    assert tx.stats()["standby_missed"] >= 1 and tx.queue.region.ref() != forger_sb.region.ref()
    assert forger_sb.sealed  # the producer sealed and freed it
    _take(rx, 6, got)
    assert got == list(range(12))
    assert rx.queue.region.ref() == tx.queue.region.ref()
    forger_sb.close()
    forger_cur.close()
    tx.free()
    rx.close()


def test_a_takeover_seals_the_predecessors_standby(fabric: Any, edge_path: str) -> None:
    old = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.001)
    got: list[int] = []
    for s in range(4):
        old.push(_item(s))
    _take(rx, 4, got)
    rx.ack(3)
    _learn(rx)
    sb = gf.FabricQueue.attach(fabric, _standby_locator(edge_path))
    new = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, output_commit=4)
    assert sb.sealed  # the predecessor's standby: never bound by the consumer now
    with pytest.raises(E.StaleEpoch):
        old.push(_item(99))
    for s in range(4, 8):
        new.push(_item(s))
    _take(rx, 4, got)
    assert got == list(range(8)) and rx.stats()["standby_binds"] == 0
    sb.close()
    old.close()
    new.free()
    rx.close()


def test_a_producer_without_a_usable_standby_allocates(fabric: Any, edge_path: str) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.001)
    tx.push(_item(0))
    got: list[int] = []
    _take(rx, 1, got)
    _learn(rx)
    gf.FabricQueue.attach(fabric, _standby_locator(edge_path)).seal(0)  # someone fenced it
    tx.relocate()
    tx.push(_item(1))
    _take(rx, 1, got)
    assert got == [0, 1]
    assert tx.stats()["standby_missed"] >= 1 and rx.stats()["standby_binds"] == 0
    assert rx.stats()["standby_refused"] + rx.stats()["rebinds"] >= 1
    tx.free()
    rx.close()


def test_a_damaged_announcement_met_while_busy_raises_once_and_loses_no_item(fabric: Any, edge_path: str) -> None:
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL, standby=False)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.001)
    for s in range(4):
        tx.push(_item(s))
    got: list[int] = []
    _take(rx, 1, got)
    tx._writer.announce(b"GFQL forged")  # the record re-written with a standby that does not decode
    _poll_soon(rx)
    with pytest.raises(E.Corrupted):
        rx.pop(timeout=5)
    _take(rx, 3, got)  # the record is not read again; nothing was taken by the failed call
    assert got == [0, 1, 2, 3]
    _poll_soon(rx)
    assert len(rx.pop_batch(8, timeout=0)) == 0  # once: the same record is not raised about again
    tx._writer.announce(b"GFQL forged again")
    tx.push(_item(4))
    _poll_soon(rx)
    with pytest.raises(E.Corrupted):
        rx.pop_batch(8, timeout=5)
    assert [int(s) for s in rx.pop_batch(8, timeout=5).seqs] == [4]
    tx.free()
    rx.close()


class _PlacingFabric:
    """A one-node fabric that offers ``allocating_away_from`` (as tools/ucx_pipeline.py's
    FailoverFabric does): every standby lands on the current queue's node all the same."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.away: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def allocating_away_from(self, ref: Any) -> Any:
        import contextlib

        self.away.append(ref)
        return contextlib.nullcontext()


def test_a_standby_on_the_current_queues_node_is_made_again_later_and_kept_if_no_other_node_takes_it(
    fabric: Any, edge_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grafos_fabric.pipeline.standby as standby_mod

    monkeypatch.setattr(standby_mod, "_REPLACE_S", 0.001)
    placing = _PlacingFabric(fabric)
    tx = RelocatableQueueEdge.producer(placing, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    tx.push(_item(0))
    assert placing.away == [tx.queue.region.ref()]  # asked for another node than the current queue's
    sb = tx._sb
    first = sb.q
    assert sb.colocated and first is not None
    sb._replace_at = 0.0
    tx.poll()  # time to try again: made elsewhere? no (one node): the new one is freed
    assert len(placing.away) == 2 and sb.q is first and sb.made == 1
    assert sb._replace_every >= 0.004 and len(fabric.segments()) == 2  # backs off; no third ring left behind
    assert _standby_locator(edge_path).region == first.region.ref()  # the announced one stays
    tx.free()
    assert fabric.segments() == []


def test_a_standby_whose_node_fails_while_the_consumer_learns_a_new_one_is_no_loss_of_the_current_queue(
    fabric: Any, edge_path: str
) -> None:
    """What the standby's node raises (here: closing the replaced standby's handle) is not a failure
    of the queue in use: the consumer keeps reading it (it used to drop it and wait for a newer
    generation that never came)."""
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.001)
    tx.push(_item(0))
    got: list[int] = []
    _take(rx, 1, got)
    _learn(rx)
    assert rx._sb is not None
    held = rx._sb[2]

    def dead_close() -> None:
        raise E.Disconnected("injected: the standby's node does not answer")

    held.close = dead_close  # type: ignore[method-assign]
    current = rx.queue
    tx._sb.discard()  # the producer replaces its standby (as when it moves it to another node)
    tx._sb.due = True
    tx.poll()
    assert announced_standby(HandoffReader(open_block(edge_path, direct=False)).current()) is not None
    for s in range(1, 5):
        tx.push(_item(s))
    _poll_soon(rx)
    _take(rx, 4, got)
    assert got == [0, 1, 2, 3, 4] and rx.queue is current and rx.generation == tx.generation
    assert rx._sb is not None and rx._sb[2] is not held  # the new standby is attached
    tx.free()
    rx.close()


def test_a_busy_consumer_learns_each_next_standby_by_itself(fabric: Any, edge_path: str) -> None:
    """No forced polls: after each switch the consumer looks for the next announcement within a
    poll interval or so (its slow cadence while a standby is known must not carry over)."""
    tx = RelocatableQueueEdge.producer(fabric, open_block(edge_path), capacity=1 << 16, ttl=TTL)
    rx = RelocatableQueueEdge.consumer(fabric, open_block(edge_path, direct=False), poll_interval=0.002)
    got: list[int] = []
    seq = 0
    for _round in range(8):
        deadline = time.monotonic() + 0.06
        pops = 0
        # A busy stream for several poll intervals (60 ms: under the 128 ms cadence that must not carry
        # over). The consumer looks at the clock every 64 pops: a round also has 2 x 64 pops at least (a
        # loaded machine's slow pops must not leave it without a look), and it ends halfway between two
        # looks. A look on the first pop after the relocation (a round of a multiple of 64 pops) may
        # read the new record before the queue is found done: the durable path, not the standby.
        while time.monotonic() < deadline or pops < 2 * 64 or rx._sb_tick != 32:
            tx.push(_item(seq))
            seq += 1
            _take(rx, 1, got)
            pops += 1
            rx.ack(got[-1])  # the replay window stays small
            time.sleep(0.0002)
        tx.relocate()
    tx.push(_item(seq))
    seq += 1
    _take(rx, 1, got)
    assert got == list(range(seq))
    ev = rx.events()
    assert len(ev) == 8 and all(e["t_seen"] < e["t_lost"] for e in ev), ev
    assert sum(1 for e in ev if e["standby"]) >= 6, ev
    tx.free()
    rx.close()
