"""The queue conformance suite over ``ucx://``: a memory node (NodeServer with a
UcxRegistrar, tcp on loopback) in this process, clients through UcxFabric, the
queue speaking the one-sided ring protocol. The tests are test_queue.py's; only
the ``fabric`` and ``queue_mode`` fixtures differ (shm-only tests are left out).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import test_queue as _conformance  # tests/ is on sys.path (pytest's rootdir conftest)
from grafos_fabric.drivers import ucx

if ucx.available() is not None:
    pytest.skip(f"UCX unavailable: {ucx.available()}", allow_module_level=True)

SECRET = b"ucx-queue-conformance-secret-32b"
_SHM_ONLY = {  # these open shm:// fabrics themselves, or offer a foreign (non-shm) locator to the shm driver
    "test_expired_lease_fails_closed_at_the_exact_step",
    "test_renewal_extends_the_deadline_for_every_attached_handle",
    "test_attach_with_corrupt_truncated_or_foreign_locators_raises_typed_errors",
}

for _name in dir(_conformance):
    if _name.startswith("test_") and _name not in _SHM_ONLY:
        globals()[_name] = getattr(_conformance, _name)


@pytest.fixture(scope="module", params=["tcp", "sm,tcp"])
def ucx_node(request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer

    tls = str(request.param)
    # event progress: no core burnt by the node on a shared 2-core machine (busy mode runs in test_ucx.py)
    registrar = ucx.UcxRegistrar(64 << 20, host="127.0.0.1", tls=tls, net_devices="lo", progress="event")
    node = NodeServer(registrar, load_policy(SECRET), port=0).start()
    yield node, tls
    node.close()


@pytest.fixture
def fabric(ucx_node: tuple[Any, str]) -> Iterator[Any]:
    node, tls = ucx_node
    f = ucx.UcxFabric("127.0.0.1", node.port, secret=SECRET, tls=tls, net_devices="lo")
    yield f
    f.close()


@pytest.fixture
def queue_mode() -> str:
    return "onesided"


@pytest.fixture
def make_pair(fabric: Any, ucx_node: tuple[Any, str]) -> Iterator[Any]:
    """Producer and consumer are two clients (two UcxFabrics: two sessions, two endpoints) of one node."""
    import grafos_fabric as gf

    node, tls = ucx_node
    other = ucx.UcxFabric("127.0.0.1", node.port, secret=SECRET, tls=tls, net_devices="lo")

    def make(**kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("capacity", 1 << 16)
        kwargs.setdefault("ttl", 600.0)  # a loaded 2-core machine can take a minute over the wrap tests
        tx = gf.FabricQueue.create(fabric, **kwargs)
        rx = gf.FabricQueue.attach(other, bytes(tx.locator()), mapped=False)
        return tx, rx

    yield make
    other.close()


def test_edges_relocate_to_the_restarted_node_and_lose_nothing(tmp_path: Any) -> None:
    """A pipeline edge over ucx:// whose memory node goes away mid-stream (its leases
    fenced, its sessions' workers destroyed) and comes back empty on the same port:
    the producer relocates, the consumer rebinds, every item arrives once, in order."""
    import socket
    import struct

    from grafos_fabric.drivers.block import open_block
    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer

    from grafos_fabric.pipeline import RelocatableQueueEdge

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start() -> Any:
        reg = ucx.UcxRegistrar(16 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event")
        return NodeServer(reg, load_policy(SECRET), port=port).start()

    node = start()
    edge = str(tmp_path / "edge.blk")
    open_block(edge, create_size=1 << 20).close()
    fa = ucx.UcxFabric("127.0.0.1", port, secret=SECRET, tls="tcp", net_devices="lo", op_timeout=2.0)
    fb = ucx.UcxFabric("127.0.0.1", port, secret=SECRET, tls="tcp", net_devices="lo", op_timeout=2.0)
    try:
        tx = RelocatableQueueEdge.producer(fa, open_block(edge), capacity=1 << 16, ttl=600.0)
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
        for _ in range(2000):
            if len(got) >= n:
                break
            drain()
            tx.poll()
        assert got == list(range(n))
        stats = tx.stats()
        assert stats["relocations"] >= 1
        print(f"\nnode restart over ucx: {stats['relocations']} relocation(s), "
              f"consumer rebind p50/p99 {rx.stats().get('rebind_p50_ms', 0):.1f}/"
              f"{rx.stats().get('rebind_p99_ms', 0):.1f} ms")
        tx.close()
        rx.close()
    finally:
        fa.close()
        fb.close()
        node.close()
