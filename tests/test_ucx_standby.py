"""The pipeline's standby queue on two UCX memory nodes (tools/ucx_pipeline.py's
``FailoverFabric``), and a consumer whose UCX session is fenced by another lease's end.

* The standby lands on the other node than the current queue
  (``FailoverFabric.allocating_away_from``), so losing the current queue's node
  leaves a usable standby: the producer activates it (no allocation) and the
  consumer binds it; nothing is lost or repeated.
* ``allocating_away_from`` never allocates on the ref's node, and raises
  ``Disconnected`` at once when no other node is up.
* A UCX node fences a client's whole session when a lease the session held ends
  (a standby replaced, a retired queue freed): the queues the client still holds
  there stay live, and the consumer reads its queue again instead of waiting for
  a generation its producer never publishes (the demo hung so before).

The nodes run in this process on 127.0.0.1 (``NodeServer`` over a
``UcxRegistrar``), like tests/test_ucx_queue.py.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from typing import Any

import pytest

from grafos_fabric.drivers import ucx

if ucx.available() is not None:
    pytest.skip(f"UCX unavailable: {ucx.available()}", allow_module_level=True)

from grafos_fabric.drivers.block import open_block
from grafos_fabric.drivers.node.auth import load_policy
from grafos_fabric.drivers.node.server import NodeServer
from grafos_fabric.errors import Disconnected
from grafos_fabric.handoff import HandoffReader
from grafos_fabric.locator import QueueLocator
from grafos_fabric.pipeline import RelocatableQueueEdge
from grafos_fabric.pipeline.standby import announced_standby
from grafos_fabric.tools.ucx_pipeline import FailoverFabric

try:
    from _realtime import reserved_port
except ImportError:  # tests/ imported as a package
    from tests._realtime import reserved_port

SECRET = b"ucx-standby-placement-secret-32b"
WAIT_S = 60.0  # generous: the machine may be loaded; nothing here asserts a time


class _Node:
    """A UCX memory node on 127.0.0.1:port in this process; ``kill`` ends it with every lease
    (fenced, freed), ``start`` brings it back empty on the same port (a port the test holds with
    :func:`reserved_port` for as long as the node may come back: no other process takes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: Any = None
        self.start()

    def start(self) -> None:
        reg = ucx.UcxRegistrar(16 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event")
        self.server = NodeServer(reg, load_policy(SECRET), port=self.port).start()

    def kill(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest.fixture
def nodes(tmp_path: Any) -> Any:
    token = tmp_path / "node.token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, SECRET.hex().encode())
    os.close(fd)
    started: list[_Node] = []
    with contextlib.ExitStack() as ports:
        try:
            started += [_Node(ports.enter_context(reserved_port())) for _ in range(2)]
            yield started, str(token)
        finally:
            for n in started:
                n.kill()


def _fabric(nodes: list[_Node], token: str) -> FailoverFabric:
    return FailoverFabric([("127.0.0.1", n.port) for n in nodes], token_file=token, net_devices="lo")


def _record(edge: str) -> tuple[int, QueueLocator, QueueLocator | None]:
    """(generation, current queue, announced standby) of the edge's handoff record."""
    rec = HandoffReader(open_block(edge, direct=False)).current()
    return int(rec.generation), QueueLocator.from_bytes(rec.payload), announced_standby(rec)


def _item(seq: int) -> bytes:
    return struct.pack("<QQ", seq, seq * 3)


def _drain(rx: Any, got: list[int]) -> None:
    while (it := rx.try_pop()) is not None:
        seq, val = struct.unpack("<QQ", it.tobytes())
        assert seq == it.seq and val == seq * 3
        got.append(seq)
        it.release()
    if got:
        rx.ack(got[-1])


def _until(cond: Any, step: Any, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        step()
        time.sleep(0.005)


def test_the_standby_lands_on_the_other_node_and_a_killed_current_node_costs_no_allocation(
        nodes: Any, tmp_path: Any) -> None:
    ns, token = nodes
    by_port = {n.port: n for n in ns}
    edge = str(tmp_path / "edge.blk")
    open_block(edge, create_size=1 << 20).close()
    fa, fb = _fabric(ns, token), _fabric(ns, token)
    try:
        tx = RelocatableQueueEdge.producer(fa, open_block(edge), capacity=1 << 16, ttl=600.0)
        rx = RelocatableQueueEdge.consumer(fb, open_block(edge), mapped=False)
        attaches: list[Any] = []
        attach = fb.attach

        def counted(ref: Any, **kw: Any) -> Any:
            attaches.append(ref)
            return attach(ref, **kw)

        fb.attach = counted  # type: ignore[method-assign]
        got: list[int] = []
        seq = 0
        for _round in range(2):  # kill the current node twice: the second time, the restarted one's standby
            def announced() -> bool:
                g, cur, sb = _record(edge)
                return sb is not None and sb.epoch == g and sb.region.port != cur.region.port

            def work() -> None:
                fa.keep_warm()
                fb.keep_warm()
                tx.poll()
                _drain(rx, got)

            for _ in range(20):
                tx.push(_item(seq), timeout=30)
                seq += 1
            _until(announced, work, "a standby announced on the other node")
            gen, cur, sb = _record(edge)
            assert sb is not None and sb.region.port != cur.region.port  # placed away from the current queue
            rx._sb_next_poll = 0.0  # the consumer reads the announcement on its next pop (white box)
            _until(lambda g=gen: rx._sb is not None and rx._sb[0] == g + 1, work, "the consumer to attach the standby")
            allocs, used, attached = len(fa.allocs), tx.stats()["standby_used"], len(attaches)
            victim = by_port[cur.region.port]
            victim.kill()  # the current queue's node goes away with every lease it held
            for _ in range(20):  # the first push finds the queue lost: the standby is activated
                tx.push(_item(seq), timeout=30)
                seq += 1
            ev = tx.events()[-1]
            assert ev["standby"] is True and ev["generation"] == gen + 1, ev
            assert tx.stats()["standby_used"] == used + 1
            assert fa.allocs[allocs:] == [], "the relocation allocated instead of activating the standby"
            gen2, cur2, _ = _record(edge)
            assert gen2 == gen + 1 and cur2.region == sb.region  # the record names the standby, on the other node
            _until(lambda n=seq: len(got) == n, work, "every item")
            assert rx.stats()["generation"] == gen + 1
            assert attaches[attached:] == [], "the consumer attached instead of binding the standby it held"
            victim.start()  # back, empty, on its port: the next standby goes there
        assert got == list(range(seq))  # every item once, in order
        tx.close()
        rx.close()
    finally:
        fa.close()
        fb.close()


def test_allocating_away_from_never_uses_the_refs_node_and_raises_when_no_other_is_up(nodes: Any) -> None:
    ns, token = nodes
    f = _fabric(ns, token)
    try:
        first = f.alloc(1 << 16, 600.0)
        here = first.ref()
        for _ in range(3):
            with f.allocating_away_from(here):
                other = f.alloc(1 << 16, 600.0)
            assert other.ref().port != here.port
            other.lease.free()
        assert f.alloc(1 << 16, 600.0).ref().port == here.port  # outside: the preferred node, as before
        ns[1 if here.port == ns[0].port else 0].kill()
        f._next_warm = 0.0  # the next keep_warm looks now (white box: it runs at most every 50 ms)
        f.keep_warm()
        allocs = len(f.allocs)
        with pytest.raises(Disconnected, match="no memory node other than"), f.allocating_away_from(here):
            f.alloc(1 << 16, 600.0)
        assert len(f.allocs) == allocs  # nothing allocated, not even on the ref's node
    finally:
        f.close()


def test_a_consumer_whose_session_is_fenced_by_another_leases_end_reads_its_queue_again(
        nodes: Any, tmp_path: Any) -> None:
    """The consumer's session also holds a lease that a third client frees: the node fences
    the session (its worker destroyed), the consumer's next read of its live queue fails with
    ``Disconnected`` whose ``lease_live`` is true, and it reads the same queue again (the
    same generation: no relocation was needed, none happens)."""
    ns, token = nodes
    node = ns[0]
    edge = str(tmp_path / "edge.blk")
    open_block(edge, create_size=1 << 20).close()

    def client() -> Any:
        return ucx.UcxFabric("127.0.0.1", node.port, token_file=token, tls="tcp", net_devices="lo", op_timeout=5.0)

    fa, fb, fc = client(), client(), client()
    try:
        tx = RelocatableQueueEdge.producer(fa, open_block(edge), capacity=1 << 16, ttl=600.0, standby=False)
        rx = RelocatableQueueEdge.consumer(fb, open_block(edge), mapped=False)
        got: list[int] = []
        for s in range(10):
            tx.push(_item(s), timeout=30)
        _until(lambda: len(got) == 10, lambda: _drain(rx, got), "the first items")
        other = fc.alloc(4096, 600.0)  # a lease of a third client, which the consumer's session attaches
        seen = fb.attach(other.ref(), mapped=False)
        seen.store64(0, 1)
        other.lease.free()  # the node fences every session that held it: the consumer's too
        for s in range(10, 20):
            tx.push(_item(s), timeout=30)
        _until(lambda: len(got) == 20, lambda: _drain(rx, got), "the items after the fence")
        assert got == list(range(20))
        st = rx.stats()
        assert st["reconnects"] >= 1, st  # the read failed once and was tried again on the same queue
        assert st["relocations"] == 0 and st["generation"] == 1, st  # the queue was never given up
        assert tx.stats()["relocations"] == 1  # the first queue only
        tx.close()
        rx.close()
    finally:
        fa.close()
        fb.close()
        fc.close()
