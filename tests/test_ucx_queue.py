"""A pipeline edge over ``ucx://`` whose memory node restarts. The queue conformance
suite over UCX (tcp and sm,tcp) is the ``ucx-tcp``/``ucx-sm`` drivers of
tests/conformance/ (``pytest tests/conformance -k ucx``).
"""

from __future__ import annotations

from typing import Any

import pytest

from grafos_fabric.drivers import ucx

if ucx.available() is not None:
    pytest.skip(f"UCX unavailable: {ucx.available()}", allow_module_level=True)

SECRET = b"ucx-queue-conformance-secret-32b"


@pytest.mark.parametrize("write_behind", [False, True], ids=["sync", "write-behind"])
def test_edges_relocate_to_the_restarted_node_and_lose_nothing(tmp_path: Any, write_behind: bool,
                                                                node_port: int) -> None:
    """A pipeline edge over ucx:// whose memory node goes away mid-stream (its leases
    fenced, its sessions' workers destroyed) and comes back empty on the same port:
    the producer relocates, the consumer rebinds, every item arrives once, in order.
    With write-behind, publications in flight when the node goes fail at a later call,
    and the window replays them into the new queue."""
    import struct

    from grafos_fabric.drivers.block import open_block
    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer
    from grafos_fabric.pipeline import RelocatableQueueEdge

    port = node_port  # held for the whole test: the restarted node binds it again

    def start() -> Any:
        reg = ucx.UcxRegistrar(16 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event")
        return NodeServer(reg, load_policy(SECRET), port=port).start()

    node = start()
    edge = str(tmp_path / "edge.blk")
    open_block(edge, create_size=1 << 20).close()
    fa = ucx.UcxFabric("127.0.0.1", port, secret=SECRET, tls="tcp", net_devices="lo", op_timeout=2.0)
    fb = ucx.UcxFabric("127.0.0.1", port, secret=SECRET, tls="tcp", net_devices="lo", op_timeout=2.0)
    try:
        tx = RelocatableQueueEdge.producer(fa, open_block(edge), capacity=1 << 16, ttl=600.0,
                                           write_behind=write_behind)
        assert tx.stats()["write_behind"] is write_behind
        rx = RelocatableQueueEdge.consumer(fb, open_block(edge), mapped=False)
        got: list[int] = []

        def drain() -> None:
            while (it := rx.try_pop()) is not None:
                seq, _ = struct.unpack("<QQ", it.tobytes())
                assert seq == it.seq
                got.append(it.seq)
                it.release()
            if got:
                rx.ack(got[-1])

        n = 300
        for step in range(n):
            if step == 150:
                node.close()  # the node goes away with every lease ...
                node = start()  # ... and comes back empty on the same port
            assert tx.push(struct.pack("<QQ", step, 0), timeout=30) == step
            if step % 3 == 0:
                drain()
        tx.poll()  # an idle producer's poll confirms what write-behind left in flight
        assert not getattr(tx._q, "_inflight", None)
        for _ in range(2000):
            if len(got) >= n:
                break
            drain()
            tx.poll()
        assert got == list(range(n))
        stats = tx.stats()
        assert stats["relocations"] >= 1
        assert stats["write_behind"] is write_behind  # on the queue after the relocation too
        print(f"\nnode restart over ucx: {stats['relocations']} relocation(s), "
              f"consumer rebind p50/p99 {rx.stats().get('rebind_p50_ms', 0):.1f}/"
              f"{rx.stats().get('rebind_p99_ms', 0):.1f} ms")
        tx.close()
        rx.close()
    finally:
        fa.close()
        fb.close()
        node.close()
