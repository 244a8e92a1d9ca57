"""The verbs driver on a real RDMA device: a memory node and clients as loopback players.

As in rdma-core's own suite, both players run on one device: the node in
this process (or, in the last test, in a child process started through
``grafos-fabric serve``) and the clients connecting to it over 127.0.0.1.
Where there is no device these tests skip with the probe's reason; they
never pass vacuously. Environment knobs for a real machine:

* ``GRAFOS_RDMA_DEVICE`` (default: the first device),
* ``GRAFOS_RDMA_IB_PORT`` (default 1),
* ``GRAFOS_RDMA_GID_INDEX`` (default 0; RoCE v2 usually needs 1 or 3;
  ``show_gids`` lists them).

Atomics that the device does not offer become a skip with the reason, like
rdma-core's EOPNOTSUPP skips.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from grafos_fabric.drivers import verbs
from grafos_fabric.drivers._verbs_compat import probe
from grafos_fabric.errors import (
    CapacityExceeded,
    Disconnected,
    FabricValueError,
    LeaseExpired,
    QueueClosed,
    Revoked,
    Unsupported,
)

SECRET = os.urandom(32)  # the node's secret for these tests (a token file in the two-process test)
DEVICE = os.environ.get("GRAFOS_RDMA_DEVICE") or None
IB_PORT = int(os.environ.get("GRAFOS_RDMA_IB_PORT", "1"))
GID_INDEX = int(os.environ.get("GRAFOS_RDMA_GID_INDEX", "0"))
REASON = probe(DEVICE)

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(REASON is not None, reason=f"no RDMA device: {REASON}"),
]


class JumpClock:
    """Real monotonic time that a test can move forward in one jump (to expire a lease on the node)."""

    native = False

    def __init__(self) -> None:
        self.offset = 0

    def now_ns(self) -> int:
        return time.monotonic_ns() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += int(seconds * 1e9)


@pytest.fixture
def node_clock() -> JumpClock:
    return JumpClock()


@pytest.fixture
def node(node_clock: JumpClock) -> Iterator[verbs.MemoryNode]:
    mn = verbs.MemoryNode.open(
        DEVICE,
        pool_size=64 << 20,
        host="127.0.0.1",
        port=0,
        ib_port=IB_PORT,
        gid_index=GID_INDEX,
        clock=node_clock,
        reap_interval=0.01,
        secret=SECRET,
    )
    yield mn
    mn.close()


def client(node: verbs.MemoryNode, **kw: Any) -> verbs.VerbsFabric:
    return verbs.VerbsFabric(
        "127.0.0.1", node.port, device=DEVICE, ib_port=IB_PORT, gid_index=GID_INDEX, timeout=10.0, secret=SECRET,
        **kw
    )


@pytest.fixture
def fabric(node: verbs.MemoryNode) -> Iterator[verbs.VerbsFabric]:
    f = client(node)
    yield f
    f.close()


def need_atomics(fabric: verbs.VerbsFabric) -> None:
    why = fabric.atomics_unavailable()
    if why is not None:
        pytest.skip(f"atomics not supported here: {why}")


def wait_for(pred, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------------------
# Data path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 8, 4095, 4097, 3 * (1 << 20) + 5])
def test_write_then_read_returns_the_same_bytes(fabric, size):
    region = fabric.alloc(size + 64, ttl=30.0)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    region.write(64, data)
    out = np.zeros(size, dtype=np.uint8)
    region.read_into(64, out)
    assert np.array_equal(out, data)


def test_a_new_lease_reads_as_zeros(fabric):
    first = fabric.alloc(4096, ttl=30.0)
    first.write(0, b"\xff" * 4096)
    fabric.free(first.lease)
    second = fabric.alloc(4096, ttl=30.0)
    out = bytearray(4096)
    second.read_into(0, out)
    assert out == bytearray(4096)


def test_transfers_larger_than_the_staging_buffer_go_in_chunks(node):
    f = client(node, staging_bytes=4096)
    try:
        region = f.alloc(3 * 4096 + 100, ttl=30.0)
        data = os.urandom(3 * 4096 + 100)
        region.write(0, data)
        out = bytearray(len(data))
        region.read_into(0, out)
        assert bytes(out) == data
    finally:
        f.close()


def test_read_into_a_registered_buffer_is_zero_copy(fabric):
    region = fabric.alloc(8192, ttl=30.0)
    payload = np.arange(1024, dtype=np.uint64)
    region.write(0, payload)
    local = fabric.register(8192)
    region.read_into(0, local.view()[:8192])
    assert np.array_equal(local.array(np.uint64)[:1024], payload)
    conn = region.conn
    assert any(key[1] == local.addr for key in conn.wrs.keys()), "the READ did not target the registered buffer"


def test_store64_and_load64_use_little_endian_words(fabric):
    region = fabric.alloc(64, ttl=30.0)
    region.store64(8, 0x0102030405060708)
    raw = bytearray(8)
    region.read_into(8, raw)
    assert bytes(raw) == bytes.fromhex("0807060504030201")
    assert region.load64(8) == 0x0102030405060708


def test_cas64_swaps_only_when_the_expected_value_matches(fabric):
    need_atomics(fabric)
    region = fabric.alloc(64, ttl=30.0)
    region.store64(0, 0x1111_2222_3333_4444)
    assert region.cas64(0, 5, 6) == 0x1111_2222_3333_4444
    assert region.load64(0) == 0x1111_2222_3333_4444
    assert region.cas64(0, 0x1111_2222_3333_4444, 0xAAAA_BBBB_CCCC_DDDD) == 0x1111_2222_3333_4444
    assert region.load64(0) == 0xAAAA_BBBB_CCCC_DDDD


def test_faa64_adds_and_returns_the_old_value_in_host_order(fabric):
    need_atomics(fabric)
    region = fabric.alloc(64, ttl=30.0)
    region.store64(16, 0x0102030405060708)
    assert region.faa64(16, 0x10) == 0x0102030405060708
    assert region.load64(16) == 0x0102030405060718
    assert region.faa64(16, -0x18) == 0x0102030405060718
    assert region.load64(16) == 0x0102030405060700


def test_atomics_from_two_clients_on_one_word_do_not_lose_updates(node, fabric):
    need_atomics(fabric)
    region = fabric.alloc(64, ttl=30.0)
    other = client(node)
    try:
        theirs = other.attach(region.ref())
        for _ in range(200):
            region.faa64(0, 1)
            theirs.faa64(0, 1)
        assert region.load64(0) == 400
    finally:
        other.close()


def test_a_second_client_attaches_by_ref_and_sees_the_bytes(node, fabric):
    region = fabric.alloc(4096, ttl=30.0)
    region.write(100, b"hello over rdma")
    other = client(node)
    try:
        theirs = other.attach(region.ref())
        assert theirs.mapped is False
        assert (theirs.remote_addr, theirs.rkey, theirs.nbytes) == (region.remote_addr, region.rkey, 4096)
        out = bytearray(15)
        theirs.read_into(100, out)
        assert bytes(out) == b"hello over rdma"
    finally:
        other.close()


def test_out_of_bounds_and_misaligned_operations_are_refused_before_posting(fabric):
    region = fabric.alloc(64, ttl=30.0)
    with pytest.raises(CapacityExceeded):
        region.write(60, b"12345")
    with pytest.raises(CapacityExceeded):
        region.read_into(-1, bytearray(1))
    with pytest.raises(CapacityExceeded):
        region.cas64(64, 0, 1)
    with pytest.raises(FabricValueError, match="aligned"):
        region.load64(4)
    with pytest.raises(FabricValueError, match="writable"):
        region.read_into(0, b"read-only")


def test_a_verbs_region_is_never_mapped(fabric):
    region = fabric.alloc(64, ttl=30.0)
    assert region.mapped is False
    with pytest.raises(Unsupported):
        region.view()
    with pytest.raises(Unsupported):
        region.address()


def test_the_one_sided_queue_carries_items_in_order_over_rdma(fabric):
    from grafos_fabric.queue import FabricQueue, OneSidedQueue

    producer = OneSidedQueue.create(fabric, capacity=1 << 16, ttl=30.0)
    consumer = FabricQueue.attach(fabric, producer.locator())
    try:
        sent = [np.full(100 + i, i % 251, dtype=np.uint8) for i in range(300)]
        got: list[np.ndarray] = []
        for item in sent:
            producer.push(item, timeout=10.0)
            while (popped := consumer.try_pop()) is not None:
                got.append(np.array(popped))
                popped.release()
        while len(got) < len(sent):
            popped = consumer.pop(timeout=10.0)
            got.append(np.array(popped))
            popped.release()
        assert all(np.array_equal(a, b) for a, b in zip(got, sent, strict=True))
    finally:
        consumer.close()
        producer.close()


# ---------------------------------------------------------------------------
# Leases, enforced by the node
# ---------------------------------------------------------------------------


def test_a_lease_the_node_expired_fails_remote_access_as_lease_expired(node, node_clock, fabric):
    doomed = fabric.alloc(4096, ttl=30.0)
    survivor = fabric.alloc(4096, ttl=3600.0)
    doomed.write(0, b"x" * 64)
    node_clock.jump(31.0)  # only the node's clock: the client still believes the lease is live
    wait_for(lambda: node.table.status(doomed.lease.id)[0] == "expired", "the node to reap the lease")
    assert doomed.lease.live
    with pytest.raises(LeaseExpired, match=r"IBV_WC_REM_ACCESS_ERR.*the lease is expired"):
        doomed.write(0, b"y" * 64)
    with pytest.raises(LeaseExpired):
        doomed.read_into(0, bytearray(8))  # now failing closed locally
    survivor.write(0, b"still here")  # the QP was rebuilt after the error
    out = bytearray(10)
    survivor.read_into(0, out)
    assert bytes(out) == b"still here"


def test_a_lease_revoked_by_another_client_fails_as_revoked(node, fabric):
    region = fabric.alloc(4096, ttl=30.0)
    region.store64(0, 1)
    other = client(node)
    try:
        other.attach(fabric.share(region, "attach,write,revoke")).lease.revoke()
    finally:
        other.close()
    assert node.table.status(region.lease.id)[0] == "revoked"
    with pytest.raises(Revoked):
        region.load64(0)
    with pytest.raises(Revoked):
        region.store64(0, 2)


def test_a_freed_lease_fails_closed_and_the_node_reports_it_freed(node, fabric):
    region = fabric.alloc(4096, ttl=30.0)
    fabric.free(region.lease)
    fabric.free(region.lease)  # idempotent
    assert node.table.status(region.lease.id)[0] == "freed"
    with pytest.raises(LeaseExpired):
        region.write(0, b"late")


def test_renew_moves_the_deadline_on_the_node(node, fabric):
    region = fabric.alloc(64, ttl=5.0)
    region.lease.renew(120.0)
    state, _, remaining = node.table.status(region.lease.id)
    assert state == "active"
    assert 119.0 < remaining <= 120.0
    assert 119.0 < region.lease.remaining() <= 120.0


def test_reap_forgets_the_regions_whose_leases_ended(fabric):
    keep = fabric.alloc(64, ttl=30.0)
    gone = fabric.alloc(64, ttl=30.0)
    gone.lease.revoke()
    assert fabric.reap() == 1
    assert fabric.reap() == 0
    keep.store64(0, 7)
    assert keep.load64(0) == 7
    with pytest.raises(Revoked):
        gone.load64(0)


def test_close_releases_everything_and_is_idempotent(node):
    f = client(node)
    region = f.alloc(64, ttl=30.0)
    f.register(4096)
    f.close()
    f.close()
    with pytest.raises(QueueClosed):
        region.write(0, b"x")


def test_after_a_node_restart_old_leases_end_as_lease_expired_and_new_ones_work(node_clock):
    def open_node(port: int) -> verbs.MemoryNode:
        return verbs.MemoryNode.open(DEVICE, pool_size=1 << 20, host="127.0.0.1", port=port, ib_port=IB_PORT,
                                     gid_index=GID_INDEX, clock=node_clock, secret=SECRET)

    first = open_node(0)
    f = client(first)
    try:
        old = f.alloc(64, ttl=30.0)
        old.store64(0, 1)
        first.close()
        second = open_node(first.port)
        try:
            # The old QP's peer is gone (Disconnected) until the client has
            # reconnected; then the new node answers that it never issued the lease.
            seen: list[Exception] = []
            for _ in range(3):
                try:
                    old.load64(0)
                except (Disconnected, LeaseExpired) as ex:
                    seen.append(ex)
                    if isinstance(ex, LeaseExpired):
                        break
            assert seen and isinstance(seen[-1], LeaseExpired), seen
            assert "unknown" in str(seen[-1])
            new = f.alloc(64, ttl=30.0)
            new.store64(0, 2)
            assert new.load64(0) == 2
        finally:
            second.close()
    finally:
        f.close()


# ---------------------------------------------------------------------------
# Two processes: the node started through `grafos-fabric serve`
# ---------------------------------------------------------------------------


def test_a_node_in_another_process_serves_and_its_death_is_disconnected(tmp_path):
    token = str(tmp_path / "node.token")
    cmd = [sys.executable, "-m", "grafos_fabric.tools.serve", "--host", "127.0.0.1", "--port", "0",
           "--pool", "16M", "--ib-port", str(IB_PORT), "--gid-index", str(GID_INDEX), "--log-level", "WARNING",
           "--token-file", token]
    if DEVICE:
        cmd += ["--device", DEVICE]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        assert ready, "grafos-fabric serve did not say it was serving"
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving rdma://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[1]
        query = f"?gid_index={GID_INDEX}&ib_port={IB_PORT}&timeout=10" + (f"&device={DEVICE}" if DEVICE else "")
        f = verbs.VerbsFabric.from_url(url + query, token_file=token)
        try:
            region = f.alloc(4096, ttl=30.0)
            region.write(0, b"across processes")
            out = bytearray(16)
            region.read_into(0, out)
            assert bytes(out) == b"across processes"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            with pytest.raises(Disconnected):
                region.read_into(0, out)
        finally:
            f.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
