"""A UCX memory node that maps its spans locally (``--ucx-local-map``) and clients that map them
(``ucx://...?map=local``): the mixed pairs (a mapped holder on the node's host, the other side
one-sided over tcp in another process), revoke, expiry, forged grants, a full /dev/shm, and a
node killed under a mapped consumer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers import ucx

if ucx.available() is not None:
    pytest.skip(f"UCX unavailable: {ucx.available()}", allow_module_level=True)

from grafos_fabric.drivers.node.auth import load_policy
from grafos_fabric.drivers.node.registrar import Grant
from grafos_fabric.drivers.node.server import NodeServer
from grafos_fabric.drivers.node.shmfile import LOCK_NAME, reap_span_dirs
from grafos_fabric.drivers.ucx import UcxMappedRegion, UcxRegion

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = b"ucx-local-map-test-secret-32byte"
PEER = os.path.join(HERE, "_ucx_map_peer.py")



def _spans(d: str) -> list[str]:
    """The span files in a node's span directory (not its ``.owner`` lock)."""
    return [n for n in os.listdir(d) if n != LOCK_NAME]


def item(i: int) -> bytes:
    return i.to_bytes(8, "little") * (1 + i % 97)  # as tests/_ucx_map_peer.py


# -- a node process (serve --driver ucx --ucx-local-map) --------------------------------------------


class NodeProc:
    def __init__(self, tmp: Any, *, local_map: bool = True) -> None:
        self.token = str(tmp / "node.token")
        cmd = [sys.executable, "-m", "grafos_fabric.tools.serve", "--driver", "ucx", "--port", "0",
               "--token-file", self.token, "--pool", "64M", "--ucx-tls", "tcp", "--ucx-net-devices", "lo",
               "--ucx-progress", "event", "--log-level", "WARNING"]
        if local_map:
            cmd.append("--ucx-local-map")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        while line and not line.startswith("serving "):
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the node did not start (exit {self.proc.wait()})")
        self.url = line.split()[1]  # ucx://127.0.0.1:PORT
        self.port = int(self.url.rsplit(":", 1)[1])

    def fabric(self, *, local_map: bool) -> Any:
        return ucx.UcxFabric("127.0.0.1", self.port, token_file=self.token, tls="tcp", net_devices="lo",
                             local_map=local_map, op_timeout=5.0)

    def peer(self, role: str, loc: str, n: int) -> subprocess.Popen[str]:
        url = f"{self.url}?tls=tcp&net_devices=lo&op_timeout=10"
        return subprocess.Popen([sys.executable, PEER, role, url, self.token, loc, str(n)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def node(tmp_path: Any) -> Iterator[NodeProc]:
    n = NodeProc(tmp_path)
    yield n
    n.stop()


def _peer_result(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = p.communicate(timeout=300)
    got = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and got, f"peer failed (exit {p.returncode}): {err[-3000:]}"
    result: dict[str, Any] = json.loads(got[-1])
    return result


# -- the mixed pairs, across processes ----------------------------------------------------------


def test_a_mapped_consumer_pops_in_order_what_a_one_sided_producer_in_another_process_pushes(
        node: NodeProc, tmp_path: Any) -> None:
    fab = node.fabric(local_map=True)
    try:
        assert fab.mapped_regions
        rx = gf.FabricQueue.create(fab, capacity=1 << 14, ttl=600.0)  # small ring: many wraps
        assert isinstance(rx.region, UcxMappedRegion) and rx.region.mapped
        assert type(rx).__name__ == "FabricQueue"  # the native ring, not the one-sided protocol
        loc = str(tmp_path / "q.loc")
        with open(loc, "wb") as fh:
            fh.write(bytes(rx.locator()))
        n = 3000
        prod = node.peer("producer", loc, n)
        bad = -1
        for i in range(n):
            with rx.pop(timeout=60) as it:
                if bad < 0 and (it.tobytes() != item(i) or it.seq != i):
                    bad = i
        assert bad == -1, f"item {bad} was not the one pushed"
        assert _peer_result(prod) == {"pushed": n}
        rx.close()
        rx.region.lease.free()
    finally:
        fab.close()


def test_a_one_sided_consumer_in_another_process_pops_in_order_what_a_mapped_producer_pushes(
        node: NodeProc, tmp_path: Any) -> None:
    fab = node.fabric(local_map=True)
    try:
        tx = gf.FabricQueue.create(fab, capacity=1 << 14, ttl=600.0)
        assert isinstance(tx.region, UcxMappedRegion)
        loc = str(tmp_path / "q.loc")
        with open(loc, "wb") as fh:
            fh.write(bytes(tx.locator()))
        n = 3000
        cons = node.peer("consumer", loc, n)
        for i in range(n):
            tx.push(item(i), timeout=60)
        assert _peer_result(cons) == {"ok": True, "first_bad": -1}
        tx.close()
        tx.region.lease.free()
    finally:
        fab.close()


def test_atomics_of_a_mapped_holder_and_of_a_one_sided_holder_on_one_word_are_exact(node: NodeProc) -> None:
    """The mapped region's CPU atomics and the node's execution of remote UCX atomics (over tcp:
    lock-prefixed instructions in the node's progress thread) on the same page count exactly."""
    import threading

    fm, fr = node.fabric(local_map=True), node.fabric(local_map=False)
    try:
        m = fm.alloc(4096, 600.0)
        r = fr.attach(m.ref())
        assert isinstance(m, UcxMappedRegion) and isinstance(r, UcxRegion)

        def remote() -> None:
            for _ in range(2000):
                r.faa64(8, 1)

        t = threading.Thread(target=remote)
        t.start()
        for _ in range(2000):
            m.faa64(8, 1)
        t.join()
        assert m.load64(8) == 4000 == r.load64(8)
        odd = fm.alloc(5000, 600.0)  # not whole pages: the node registers 8192, the grant says 5000
        assert isinstance(odd, UcxMappedRegion) and odd.nbytes == 5000 and len(odd.view()) == 5000
        odd.store64(4992, 7)
        with pytest.raises(E.CapacityExceeded):
            odd.store64(5000, 7)
        odd.lease.free()
        m.write(64, b"mapped")
        r.write(128, b"remote")
        r.flush()
        buf = bytearray(6)
        r.read_into(64, buf)
        assert bytes(buf) == b"mapped"
        m.read_into(128, buf)
        assert bytes(buf) == b"remote"
        assert bytes(m.view()[128:134]) == b"remote"
    finally:
        fr.close()
        fm.close()


# -- lease ends -----------------------------------------------------------------------------------


def test_revoke_fails_the_mapped_holders_next_pop_and_no_write_lands_in_the_next_tenants_span(
        node: NodeProc) -> None:
    owner, local, tenant = node.fabric(local_map=False), node.fabric(local_map=True), node.fabric(local_map=False)
    try:
        tx = gf.FabricQueue.create(owner, capacity=1 << 14, ttl=600.0)  # one-sided, the owner (may revoke)
        rx = gf.FabricQueue.attach(local, bytes(tx.locator()))  # mapped on the node's host
        assert isinstance(rx.region, UcxMappedRegion)
        stale = rx.region
        for i in range(10):
            tx.push(item(i), timeout=30)
        rx.pop(timeout=30).release()  # items 1..9 stay published
        old_addr = tx.region.remote_addr
        tx.region.lease.revoke()
        # the node marked the span's lease words when it fenced: the very next pop fails, although
        # nine items published before the revoke are still in the (orphaned) pages
        with pytest.raises(E.Revoked):
            rx.try_pop()
        with pytest.raises(E.Revoked):
            rx.pop(timeout=5)
        with pytest.raises(E.Revoked):
            stale.write(0, b"x" * 64)
        with pytest.raises((E.Revoked, E.Disconnected)):
            tx.push(b"late", timeout=5)
        # a stale holder that ignores every check writes into its own orphaned pages only
        payload = stale.payload_pointer()
        # the range goes to the next tenant: fresh zeroed pages, whatever the stale holders do
        nxt = tenant.alloc(stale.nbytes, 600.0)
        assert isinstance(nxt, UcxRegion) and nxt.remote_addr == old_addr  # the same range of the pool
        from grafos_fabric._ffi import ffi

        ffi.memmove(payload, b"\xee" * 4096, 4096)
        seen = bytearray(stale.nbytes)
        nxt.read_into(0, seen)
        assert seen == bytes(stale.nbytes)
        mapped_next = local.attach(nxt.ref())
        assert isinstance(mapped_next, UcxMappedRegion)
        assert bytes(mapped_next.view()[:4096]) == bytes(4096)
        nxt.lease.free()
        rx.close()
        tx.close()
    finally:
        tenant.close()
        local.close()
        owner.close()


def test_expiry_fails_the_mapped_holder_closed_from_the_deadline_word(node: NodeProc) -> None:
    from grafos_fabric.lease import LeaseState

    fab = node.fabric(local_map=True)
    try:
        # a long TTL while the lease must live (a stalled machine cannot expire it under the test);
        # the last renewal shortens it, and nothing after that needs it alive
        q = gf.FabricQueue.create(fab, capacity=1 << 14, ttl=600.0)
        region = q.region
        assert isinstance(region, UcxMappedRegion)
        state, deadline = region.lease_pointers()
        cell = fab.cell(region.lease.id)
        assert cell is not None
        assert int(state[0]) == LeaseState.ACTIVE and int(deadline[0]) == cell.load_deadline_ns()
        q.push(b"before", timeout=5)
        region.lease.renew()
        assert int(deadline[0]) == cell.load_deadline_ns()  # renewals move the native word
        assert q.pop(timeout=5).tobytes() == b"before"
        q.push(b"after", timeout=5)
        far = int(deadline[0])
        region.lease.renew(0.5)
        until = cell.load_deadline_ns()
        assert int(deadline[0]) == until < far  # ... back, too
        while time.monotonic_ns() < until:
            time.sleep(0.05)
        with pytest.raises(E.LeaseExpired):
            q.try_pop()
        with pytest.raises(E.LeaseExpired):
            q.push(b"late", timeout=1)
    finally:
        fab.close()


def test_a_consumer_that_lets_go_leaves_the_lease_to_the_other_holders_on_the_host(node: NodeProc) -> None:
    """A consumer capability cannot free the lease on the node: its free only lets go here, and
    must not end the lease in the words the other holders on this host share."""
    owner, other = node.fabric(local_map=True), node.fabric(local_map=True)
    try:
        q = gf.FabricQueue.create(owner, capacity=1 << 14, ttl=600.0)
        r = other.attach(q.region.ref())
        assert isinstance(r, UcxMappedRegion)
        r.lease.free()
        q.push(b"still here", timeout=5)
        assert q.pop(timeout=5).tobytes() == b"still here"
    finally:
        other.close()
        owner.close()


# -- grants that must not be mapped ---------------------------------------------------------------


def test_forged_span_paths_in_a_grant_are_refused_with_a_typed_error(node: NodeProc, tmp_path: Any) -> None:
    fab = node.fabric(local_map=True)
    try:
        good = fab.alloc(1 << 16, 600.0)
        assert isinstance(good, UcxMappedRegion)
        conn = fab._node("127.0.0.1", node.port)[1]
        node_dir = conn.link.info["shm_dir"]
        lease, real = good.lease, good.grant

        def grant(path: str) -> Grant:
            return Grant(lease_id=real.lease_id, generation=real.generation, nbytes=real.nbytes, ttl=real.ttl,
                         writable=True, access={**real.access, "path": path})

        ours = tmp_path / "precious"
        ours.write_bytes(b"\0" * (real.nbytes + 4096))
        link = os.path.join(node_dir, "ab" * 16)
        os.symlink(ours, link)
        wrong_size = os.path.join(node_dir, "cd" * 16)
        with open(wrong_size, "wb") as fh:
            fh.write(b"\0" * 4096)
        try:
            for path in (str(ours), "/etc/passwd", os.path.join(node_dir, "..", "x" * 32), node_dir + "/short",
                         os.path.join(node_dir, "AB" * 16), link, wrong_size):
                with pytest.raises(E.Corrupted):
                    conn.region(lease, grant(path), mapped=True)
            with pytest.raises(E.LeaseExpired):  # well formed, but no such span (fenced)
                conn.region(lease, grant(os.path.join(node_dir, "ef" * 16)), mapped=True)
        finally:
            os.unlink(link)
            os.unlink(wrong_size)
        assert ours.read_bytes() == b"\0" * (real.nbytes + 4096)  # nothing of ours was mapped or written
        # a node that names a span directory outside /dev/shm is not believed either
        info = conn.link.info
        conn.link.info = {**info, "shm_dir": str(tmp_path)}
        try:
            with pytest.raises(E.Corrupted):
                conn.region(lease, grant(str(tmp_path / ("ab" * 16))), mapped=True)
        finally:
            conn.link.info = info
        # mapped=False, or a read-only grant: one-sided, as without map=local
        assert isinstance(conn.region(lease, real), UcxRegion)
        ro = Grant(lease_id=real.lease_id, generation=real.generation, nbytes=real.nbytes, ttl=real.ttl,
                   writable=False, access=real.access)
        assert isinstance(conn.region(lease, ro, mapped=True), UcxRegion)
        good.lease.free()
    finally:
        fab.close()


def test_map_local_against_a_node_without_local_map_gives_one_sided_regions(tmp_path: Any) -> None:
    n = NodeProc(tmp_path, local_map=False)
    try:
        fab = gf.open_fabric(f"{n.url}?tls=tcp&net_devices=lo&map=local", token_file=n.token)
        try:
            assert not fab.mapped_regions
            q = gf.FabricQueue.create(fab, capacity=1 << 12, ttl=60.0)
            assert not q.region.mapped
            assert "path" not in q.region.grant.access
            q.push(b"one-sided", timeout=10)
            assert q.pop(timeout=10).tobytes() == b"one-sided"
            q.close()
        finally:
            fab.close()
    finally:
        n.stop()


def test_the_map_option_is_parsed_strictly() -> None:
    assert ucx.UcxFabric.url_kwargs({"map": "local"})["local_map"] is True
    assert ucx.UcxFabric.url_kwargs({"map": "none"})["local_map"] is False
    with pytest.raises(E.FabricValueError):
        ucx.UcxFabric.url_kwargs({"map": "yes"})


# -- the node side ---------------------------------------------------------------------------------


def test_the_registrar_maps_span_files_over_the_pool_and_fences_them_back_to_fresh_memory() -> None:
    import ctypes

    reg = ucx.UcxRegistrar(1 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event",
                           local_map=True)
    try:
        d = reg.shm_dir
        assert os.stat(d).st_mode & 0o777 == 0o700 and reg.node_info()["shm_dir"] == d
        span = reg.register(8192, 65536)
        path = span.access(True)["path"]
        assert os.path.dirname(path) == d and os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(path).st_size == 65536 + ucx.binding.LEASE_TRAILER
        ctypes.memmove(reg.pool_addr + 8192 + 100, b"through the pool", 16)  # what a remote put does
        with open(path, "rb") as fh:
            data = fh.read()
        assert data[100:116] == b"through the pool"
        assert int.from_bytes(data[65536:65544], "little") == 1  # lease state word: active
        keep = open(path, "rb")  # a stale holder keeps the file
        reg.fence(span, [])
        reg.deregister(span)
        assert not os.path.exists(path)
        assert int.from_bytes(os.pread(keep.fileno(), 8, 65536), "little") == 3  # marked gone
        keep.close()
        assert ctypes.string_at(reg.pool_addr + 8192, 65536) == bytes(65536)  # fresh pages in the pool
        again = reg.register(8192, 65536)
        assert again.access(True)["path"] != path
        assert ctypes.string_at(reg.pool_addr + 8192, 65536) == bytes(65536)
        reg.deregister(again)
        assert _spans(d) == []
    finally:
        reg.close()
    assert not os.path.exists(d)
    plain = ucx.UcxRegistrar(1 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event")
    try:
        assert "shm_dir" not in plain.node_info()
        assert "path" not in plain.register(0, 4096).access(True)
    finally:
        plain.close()


def test_a_full_dev_shm_fails_the_grant_with_capacity_exceeded_and_leaks_nothing(tmp_path: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    root = tmp_path / "shm"
    root.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=1777", "tmpfs", str(root)],
                        capture_output=True, text=True)
    if rc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {rc.stderr.strip()}")
    try:
        reg = ucx.UcxRegistrar(8 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event",
                               local_map=True, shm_root=str(root))
        srv = NodeServer(reg, load_policy(SECRET), port=0).start()
        try:
            fab = ucx.UcxFabric("127.0.0.1", srv.port, secret=SECRET, tls="tcp", net_devices="lo")
            try:
                with pytest.raises(E.CapacityExceeded):
                    fab.alloc(1 << 20, 60.0)
                assert _spans(reg.shm_dir) == []  # the half-made file is gone
                small = fab.alloc(64 << 10, 60.0)  # the pool range went back; small spans still fit
                small.write(0, b"fits")
                small.flush()
                buf = bytearray(4)
                small.read_into(0, buf)
                assert bytes(buf) == b"fits"
                assert len(_spans(reg.shm_dir)) == 1
                small.lease.free()
                deadline = time.monotonic() + 10
                while _spans(reg.shm_dir) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert _spans(reg.shm_dir) == []
            finally:
                fab.close()
        finally:
            srv.close()
        assert os.listdir(root) == []
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_node_killed_under_a_mapped_consumer_gives_disconnected_and_the_items_stay_readable(
        node: NodeProc) -> None:
    owner, local = node.fabric(local_map=False), node.fabric(local_map=True)
    node_dir = ""
    try:
        tx = gf.FabricQueue.create(owner, capacity=1 << 14, ttl=600.0)
        rx = gf.FabricQueue.attach(local, bytes(tx.locator()))
        assert isinstance(rx.region, UcxMappedRegion)
        node_dir = str(local.channel().info["shm_dir"])
        for i in range(6):
            tx.push(item(i), timeout=30)
        held = rx.pop(timeout=30)
        node.proc.kill()  # SIGKILL: no fence, no unlink
        node.proc.wait()
        assert held.tobytes() == item(0)  # the mapping stays: the pages are ours
        got = []
        t0 = time.monotonic()
        with pytest.raises((E.Disconnected, E.LeaseExpired)) as failed:  # not TimeoutError: the pop sees
            while True:                                                  # the dead node, not its deadline
                it = rx.pop(timeout=30)
                got.append(it.tobytes())
                it.release()
        took = time.monotonic() - t0
        print(f"\nnode kill -9 under a mapped consumer: {failed.typename} after draining, "
              f"{took * 1e3:.1f} ms after the node was reaped")
        assert got == [item(i) for i in range(1, 6)]  # published before the kill: whole and in order
        assert held.tobytes() == item(0)
        assert os.path.isdir(node_dir)  # a killed node leaves its span directory: the next node reaps it
        assert node_dir in reap_span_dirs(os.path.dirname(node_dir))
        assert not os.path.exists(node_dir)
        assert held.tobytes() == item(0)  # the reaped span's pages stay this holder's
        held.release()
        rx.close()
    finally:
        local.close()
        owner.close()
        if node_dir:
            shutil.rmtree(node_dir, ignore_errors=True)


def test_a_node_shut_down_under_a_mapped_consumer_fails_its_next_pop_closed() -> None:
    """A clean shutdown retires every lease (fence: the shared state word marked gone); the node can
    no longer be asked which state, so the holder fails closed with LeaseExpired, not a hang."""
    reg = ucx.UcxRegistrar(8 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event", local_map=True)
    srv = NodeServer(reg, load_policy(SECRET), port=0).start()
    fab = ucx.UcxFabric("127.0.0.1", srv.port, secret=SECRET, tls="tcp", net_devices="lo", local_map=True)
    try:
        q = gf.FabricQueue.create(fab, capacity=1 << 14, ttl=600.0)
        assert isinstance(q.region, UcxMappedRegion)
        q.push(b"published", timeout=5)
        srv.close()
        with pytest.raises(E.LeaseExpired):
            q.try_pop()
        with pytest.raises(E.LeaseExpired):
            q.push(b"late", timeout=1)
    finally:
        fab.close()
        srv.close()


def test_a_mapped_consumer_edge_relocates_when_its_local_map_node_restarts(tmp_path: Any,
                                                                             node_port: int) -> None:
    """A pipeline edge whose consumer maps the ring (map=local) and whose producer is one-sided:
    the node goes away mid-stream (every lease fenced: the mapped consumer's lease word marked
    gone) and comes back empty on the same port; the consumer rebinds (mapped again), every item
    arrives once, in order."""
    import struct

    from grafos_fabric.drivers.block import open_block
    from grafos_fabric.pipeline import RelocatableQueueEdge

    port = node_port  # held for the whole test: the restarted node binds it again

    def start() -> Any:
        reg = ucx.UcxRegistrar(16 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event",
                               local_map=True)
        return NodeServer(reg, load_policy(SECRET), port=port).start()

    node = start()
    edge = str(tmp_path / "edge.blk")
    open_block(edge, create_size=1 << 20).close()
    fa = ucx.UcxFabric("127.0.0.1", port, secret=SECRET, tls="tcp", net_devices="lo", op_timeout=2.0)
    fb = ucx.UcxFabric("127.0.0.1", port, secret=SECRET, tls="tcp", net_devices="lo", op_timeout=2.0,
                       local_map=True)
    try:
        tx = RelocatableQueueEdge.producer(fa, open_block(edge), capacity=1 << 16, ttl=600.0)
        rx = RelocatableQueueEdge.consumer(fb, open_block(edge), mapped=True)
        got: list[int] = []
        mapped_seen = 0

        def drain() -> None:
            nonlocal mapped_seen
            while (it := rx.try_pop()) is not None:
                seq, _ = struct.unpack("<QQ", it.tobytes())
                assert seq == it.seq
                got.append(it.seq)
                it.release()
            if isinstance(getattr(rx._q, "region", None), UcxMappedRegion):  # white-box: the bound queue
                mapped_seen += 1
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
        assert tx.stats()["relocations"] >= 1
        assert mapped_seen > 0 and isinstance(rx._q.region, UcxMappedRegion)  # mapped after the rebind too
        tx.close()
        rx.close()
    finally:
        fa.close()
        fb.close()
        node.close()
