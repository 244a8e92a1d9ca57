"""The UCX driver: one-sided operations against a UCX memory node's data plane,
in one process, across processes on loopback, and across two network namespaces
joined by a veth pair (root; skipped with the reason elsewhere).

The node side runs tests/_ucx_node.py (UcxRegistrar + a session per client);
the client side is UcxConnector/UcxRegion with a NodeLink onto that process
(tests/_ucx_harness.py). Fault tests assert the typed error and print the time
to detect it (``-s`` shows it); they never assert timings tightly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import grafos_fabric as gf
from grafos_fabric.drivers import ucx
from grafos_fabric.errors import (
    CapacityExceeded,
    Disconnected,
    FabricValueError,
    LeaseExpired,
    QueueClosed,
    Revoked,
    Unsupported,
)

sys.path.insert(0, os.path.dirname(__file__))
import _netns
import _ucx_harness as H

HERE = os.path.dirname(os.path.abspath(__file__))

needs_ucx = pytest.mark.skipif(ucx.available() is not None, reason=f"UCX unavailable: {ucx.available()}")
NETNS_WHY = _netns.unavailable()
needs_netns = pytest.mark.skipif(NETNS_WHY is not None, reason=f"no network namespaces: {NETNS_WHY}")
LO = ucx.ucx_config("tcp", "lo")


def test_ucx_url_without_the_binding_raises_unsupported_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ucx.binding, "lib", None)
    monkeypatch.setattr(ucx.binding, "_IMPORT_ERROR", "no module named grafos_fabric._ucx")
    with pytest.raises(Unsupported, match="UCX binding is not built"):
        gf.open_fabric("ucx://127.0.0.1:18600")


def test_ucx_url_is_parsed_and_bad_options_are_refused() -> None:
    assert ucx.parse_ucx_url("ucx://node1:18600?tls=tcp&progress=event") == (
        "node1", 18600, {"tls": "tcp", "progress": "event"})
    with pytest.raises(FabricValueError, match="unknown option"):
        ucx.parse_ucx_url("ucx://node1:18600?colour=red")
    with pytest.raises(FabricValueError):
        ucx.parse_ucx_url("ucx://node1")
    with pytest.raises(FabricValueError):
        ucx.ucx_config("tcp;RNDV_THRESH=1")


@pytest.fixture
def local() -> Any:
    reg = ucx.UcxRegistrar(1 << 20, host="127.0.0.1", tls="tcp", net_devices="lo")
    ctx = ucx.UcxContext(LO)
    region, link, span = H.local_region(reg, ctx, 1 << 16)
    yield region, link, span, reg
    region.close()
    region.connector.close()
    reg.close()
    ctx.close()


@needs_ucx
def test_one_sided_operations_round_trip_in_one_process(local: Any) -> None:
    r, _link, span, _reg = local
    payload = bytes(range(200))
    r.write(64, payload)
    r.flush()
    back = bytearray(200)
    r.read_into(64, back)
    assert bytes(back) == payload
    assert r.faa64(0, 5) == 0
    assert r.faa64(0, -1) == 5  # wraps mod 2**64
    assert r.cas64(0, 4, 40) == 4
    assert r.cas64(0, 4, 99) == 40  # failed compare: returns the current value, changes nothing
    assert r.load64(0) == 40
    r.store64(8, 2**64 - 1)
    assert r.load64(8) == 2**64 - 1
    assert ucx.ffi.cast("uint64_t *", span.addr)[0] == 40  # as the node's CPU sees it


@needs_ucx
def test_words_are_little_endian_in_the_node_and_each_thread_gets_its_own_results(local: Any) -> None:
    """load64/store64 are one C call each (the word in the endpoint's heap slot); cas64/faa64/load64
    return through a per-thread result cell: threads hammering one word must each see their own."""
    import threading

    import numpy as np

    r, _link, span, _reg = local
    node = ucx.ffi.buffer(ucx.ffi.cast("char *", span.addr), 64)
    r.store64(16, 0x0102030405060708)
    assert bytes(node[16:24]) == bytes([8, 7, 6, 5, 4, 3, 2, 1])  # little-endian, as the ring's words
    assert r.load64(16) == 0x0102030405060708
    r.store64(16, -1)  # masked to 64 bits, like the other drivers
    assert r.load64(16) == 2**64 - 1
    # every buffer kind a caller passes: bytes and bytearray as is, numpy and memoryview through byte_view
    r.write(64, b"abcd")
    r.write(68, bytearray(b"efgh"))
    r.write(72, np.frombuffer(b"ijkl", np.uint8))
    r.write(76, memoryview(b"mnop"))
    r.flush()
    back, arr = bytearray(16), np.zeros(16, np.uint8)
    r.read_into(64, back)
    r.read_into(64, arr)
    assert bytes(back) == arr.tobytes() == b"abcdefghijklmnop"
    r.store64(0, 0)
    olds: list[list[int]] = [[] for _ in range(4)]

    def hammer(i: int) -> None:
        for _ in range(300):
            olds[i].append(r.faa64(0, 1))
            assert r.load64(0) >= olds[i][-1] + 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(v for o in olds for v in o) == list(range(1200))  # each old value seen exactly once
    assert r.load64(0) == 1200


@needs_ucx
def test_bad_offsets_and_closed_regions_fail_with_typed_errors(local: Any) -> None:
    r, _link, _span, _reg = local
    with pytest.raises(CapacityExceeded):
        r.write(r.nbytes - 4, b"12345678")
    with pytest.raises(CapacityExceeded):
        r.read_into(-8, bytearray(8))
    with pytest.raises(FabricValueError, match="aligned"):
        r.faa64(4, 1)
    with pytest.raises(FabricValueError):
        r.read_into(0, b"read-only buffer")
    with pytest.raises(Unsupported):
        r.view()
    r.close()
    with pytest.raises(QueueClosed):
        r.load64(0)


@needs_ucx
def test_a_fenced_session_fails_its_next_operation_and_the_lease_state_decides_the_error(local: Any) -> None:
    r, link, span, reg = local
    r.store64(0, 7)
    reg.fence(span, [link.session])
    link.states["L1"] = "revoked"
    with pytest.raises(Revoked):
        r.faa64(0, 1)
    with pytest.raises(Revoked):  # terminal: later operations fail closed without asking again
        r.load64(0)
    assert ucx.ffi.cast("uint64_t *", span.addr)[0] == 7


@needs_ucx
def test_an_endpoint_lost_while_the_lease_is_active_is_disconnected_then_reconnects(local: Any) -> None:
    r, link, span, reg = local
    r.store64(0, 3)
    reg.fence(span, [link.session])  # the session's worker goes away; the lease stays active
    with pytest.raises(Disconnected) as lost:
        r.faa64(0, 1)
    assert lost.value.lease_live  # the node said so: only this connection was lost (a consumer reads on)
    assert r.faa64(0, 1) == 3  # the next operation connected a new endpoint
    assert r.connector.reconnects == 1


@needs_ucx
def test_a_failed_reconnect_fails_the_next_operations_at_once_until_the_hold_ends(local: Any,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that did not answer a reconnect is not reached for again by every operation of every
    handle on it (a dead node's retired queues, closed standbys): within ``DOWN_HOLD_S`` they fail
    with ``Disconnected`` at once. A new control session (the node answered an alloc or a lease
    query) or a probe (``warm``) ends the hold."""
    r, link, span, reg = local
    conn = r.connector
    r.store64(0, 5)
    calls: list[int] = []
    real = link.connect

    def refused(params: Any) -> Any:
        calls.append(1)
        raise Disconnected("memory node 127.0.0.1:1 unreachable: [Errno 111] Connection refused")

    monkeypatch.setattr(link, "connect", refused)
    reg.fence(span, [link.session])  # the endpoint goes; the reconnect is refused
    with pytest.raises(Disconnected):
        r.load64(0)
    with pytest.raises(Disconnected, match="Connection refused"):
        r.load64(0)  # the reconnect: refused
    assert len(calls) == 1
    for _ in range(3):
        with pytest.raises(Disconnected, match="did not answer a reconnect"):
            r.load64(0)
    assert len(calls) == 1 and conn.held == 3  # not reached for again
    with pytest.raises(Disconnected, match="Connection refused"):
        conn.warm()  # a probe tries anyway (twice: once more on a new control channel)
    assert len(calls) == 3
    monkeypatch.setattr(link, "connect", real)
    link._epoch += 1  # the control channel was reopened meanwhile: the node answers again
    assert r.load64(0) == 5
    assert conn.held == 3


@needs_ucx
def test_an_endpoint_made_on_a_reopened_control_session_is_kept(local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``link.connect`` may reopen the control channel (a restarted node): the endpoint belongs to
    the new session, and the next operation uses it instead of connecting yet another one."""
    r, link, span, reg = local
    conn = r.connector
    r.store64(0, 9)
    real = link.connect

    def reopening(params: Any) -> Any:
        link._epoch += 1  # as NodeChannel does when its channel broke and it opened a new one
        return real(params)

    monkeypatch.setattr(link, "connect", reopening)
    reg.fence(span, [link.session])
    with pytest.raises(Disconnected):
        r.load64(0)
    gen = conn.generation
    assert r.load64(0) == 9  # reconnected on a reopened session
    assert r.load64(0) == 9 and r.load64(0) == 9
    assert conn.generation == gen + 1  # one new endpoint, kept


def _frames(tb: Any) -> list[Any]:
    out = []
    while tb is not None:
        out.append(tb.tb_frame)
        tb = tb.tb_next
    return out


def _no_exported_views_left(exc: BaseException, where: str) -> None:
    """The raising frame ``where`` keeps no cffi view of a buffer and no memoryview with exports:
    a memoryview the GC clears while exported (a cycle through the traceback) crashes CPython 3.11."""
    frames = [f for f in _frames(exc.__traceback__) if f.f_code.co_name == where]
    assert frames, [f.f_code.co_name for f in _frames(exc.__traceback__)]
    for f in frames:
        for name, v in f.f_locals.items():
            assert not isinstance(v, ucx.ffi.CData) or name in ("e", "k"), (name, v)  # handles, not buffers
            if isinstance(v, memoryview):
                v.release()  # BufferError while something still exports it


@needs_ucx
def test_a_failed_write_leaves_no_exported_buffer_view_in_its_frame(local: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (in the C call, or before it) raises from a frame that holds no cffi view
    of the caller's buffer: tracebacks keep frames alive, and a memoryview cleared by the GC while a
    cffi view still exported it crashed a pipeline stage (SIGSEGV in memory_dealloc, UCX 1.22)."""
    import numpy as np

    from grafos_fabric.drivers.ucx import region as region_mod

    r, _link, _span, _reg = local
    data = np.arange(64, dtype=np.uint64)[8:40]  # not bytes: the memoryview path
    r.write(0, data)

    class FailingPut:  # the binding, but every put fails as on a dead endpoint
        def __getattr__(self, name: str) -> Any:
            return getattr(ucx.lib, name)

        @staticmethod
        def gfu_put(*_args: Any) -> int:
            return int(ucx.lib.GFU_DISCONNECTED)

    monkeypatch.setattr(region_mod, "lib", FailingPut())
    with pytest.raises(Disconnected) as failed:
        r.write(0, data)
    _no_exported_views_left(failed.value, "write")
    monkeypatch.undo()
    r.close()
    with pytest.raises(QueueClosed) as closed:  # raised in _prep, after the memoryview was made
        r.write(0, data)
    _no_exported_views_left(closed.value, "write")


@pytest.fixture
def node() -> Any:
    if ucx.available() is not None:
        pytest.skip(f"UCX unavailable: {ucx.available()}")
    proc, hello = H.start_node()
    yield proc, hello
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@needs_ucx
def test_revoke_across_processes_fails_the_holder_and_no_write_lands_after_it(node: Any) -> None:
    proc, hello = node
    ctx = ucx.UcxContext(LO)
    try:
        r, link, conn = H.child_region(proc, hello, ctx)
        r.store64(0, 11)
        link.call(cmd="revoke")
        t0 = time.perf_counter()
        with pytest.raises(Revoked):
            r.store64(0, 12)
        detect = time.perf_counter() - t0
        with pytest.raises(Revoked):
            r.write(64, b"late write")
        assert link.call(cmd="peek", index=0)["value"] == 11
        assert link.call(cmd="nonzero_after", offset=64)["nonzero"] == 0
        print(f"\nrevoke -> Revoked on the holder's next operation in {detect * 1e3:.1f} ms")
        conn.close()
    finally:
        ctx.close()


@needs_ucx
def test_kill_9_of_the_node_gives_disconnected(node: Any) -> None:
    proc, hello = node
    ctx = ucx.UcxContext(LO)
    try:
        r, _link, conn = H.child_region(proc, hello, ctx, timeout=5.0)
        assert r.faa64(0, 1) == 0
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.perf_counter()
        with pytest.raises(Disconnected) as gone:
            while True:  # operations may still complete until the kernel has torn the sockets down
                r.faa64(0, 1)
        assert not gone.value.lease_live  # nobody said the lease lives: a consumer gives the queue up
        print(f"\nkill -9 (loopback) -> Disconnected in {(time.perf_counter() - t0) * 1e3:.1f} ms")
        conn.close()
    finally:
        ctx.close()


@needs_ucx
def test_links_of_several_threads_onto_one_node_process_each_get_their_own_reply(node: Any) -> None:
    """The harness itself: links onto one node process share its stdin/stdout, so they must
    share one lock (a lock per link let two clients' connects interleave: one thread read the
    other's reply and the other timed out, a CI failure of the two-client test below)."""
    proc, hello = node
    errors: list[BaseException] = []
    done: list[int] = []

    def worker(sid: int) -> None:
        link = H.ChildLink(proc, hello["info"], "127.0.0.1", sid)
        try:
            for _ in range(200):
                assert link.call(cmd="peek", index=0)["value"] == 0
            done.append(sid)
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not errors, errors
    assert sorted(done) == [0, 1, 2, 3]


@needs_ucx
def test_two_clients_fetch_and_add_and_cas_counts_are_exact(node: Any) -> None:
    proc, hello = node
    n = 2000
    errors: list[BaseException] = []

    def client(sid: int, use_cas: bool) -> None:
        ctx = ucx.UcxContext(LO)
        try:
            r, _link, conn = H.child_region(proc, hello, ctx, sid=sid)
            for _ in range(n):
                if use_cas:
                    cur = r.load64(0)
                    while (old := r.cas64(0, cur, cur + 1)) != cur:
                        cur = old
                else:
                    r.faa64(0, 1)
            r.close()
            conn.close()
        except BaseException as ex:
            errors.append(ex)
        finally:
            ctx.close()

    threads = [threading.Thread(target=client, args=(1, False)), threading.Thread(target=client, args=(2, True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert H.ChildLink(proc, hello["info"], "127.0.0.1").call(cmd="peek", index=0)["value"] == 2 * n


# ---------------------------------------------------------------------------
# Across two network namespaces (node in A, client in B, joined by a veth pair)
# ---------------------------------------------------------------------------


@pytest.fixture
def netns_node() -> Any:
    if ucx.available() is not None:
        pytest.skip(f"UCX unavailable: {ucx.available()}")
    if NETNS_WHY is not None:
        pytest.skip(f"no network namespaces: {NETNS_WHY}")
    with _netns.veth_pair() as pair:
        proc, hello = H.start_node(netns=pair.ns_a, host=pair.ip_a, net_devices=pair.dev_a)
        clients: list[Any] = []

        def client(timeout: float) -> tuple[Any, dict[str, Any]]:
            c = subprocess.Popen(
                ["ip", "netns", "exec", pair.ns_b, sys.executable, os.path.join(HERE, "_ucx_client.py"), pair.ip_a,
                 str(hello["ctl_port"]), pair.dev_b, str(timeout), json.dumps(hello)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            clients.append(c)
            assert c.stdout is not None
            ready = H.json_line(c.stdout)
            assert ready.get("ready"), "the client in the other namespace did not start"
            return c, ready

        try:
            yield pair, proc, client
        finally:
            for p in (proc, *clients):
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                p.wait()


def _fault(client: Any) -> dict[str, Any]:
    client.stdin.write("go\n")
    client.stdin.flush()
    return H.json_line(client.stdout)


@needs_netns
@needs_ucx
def test_operations_and_atomics_across_two_namespaces(netns_node: Any) -> None:
    _pair, proc, client = netns_node
    _c, ready = client(5.0)
    assert ready["roundtrip"] is True
    assert ready["faas"] == list(range(100))
    assert H.ChildLink(proc, {}, "").call(cmd="peek", index=0)["value"] == 100


@needs_netns
@needs_ucx
def test_kill_9_of_the_node_across_namespaces_gives_disconnected(netns_node: Any) -> None:
    _pair, proc, client = netns_node
    c, _ = client(5.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = _fault(c)
    assert out["kind"] == "Disconnected", out
    print(f"\nkill -9 (netns, tcp) -> Disconnected in {out['took'] * 1e3:.1f} ms: {out['msg']}")


@needs_netns
@needs_ucx
def test_a_stopped_node_is_detected_by_the_deadline(netns_node: Any) -> None:
    _pair, proc, client = netns_node
    c, _ = client(0.5)
    proc.send_signal(signal.SIGSTOP)
    try:
        out = _fault(c)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert out["kind"] == "Disconnected", out
    print(f"\nSIGSTOP (netns) -> Disconnected after {out['took'] * 1e3:.1f} ms (deadline 500 ms): {out['msg']}")


@needs_netns
@needs_ucx
def test_link_down_is_detected_by_the_deadline(netns_node: Any) -> None:
    pair, _proc, client = netns_node
    c, _ = client(0.5)
    pair.link(False)
    try:
        out = _fault(c)
    finally:
        pair.link(True)
    assert out["kind"] == "Disconnected", out
    print(f"\nveth down (netns) -> Disconnected after {out['took'] * 1e3:.1f} ms (deadline 500 ms): {out['msg']}")


def test_lease_errors_are_typed_and_distinct() -> None:
    assert not issubclass(Revoked, LeaseExpired) and not issubclass(LeaseExpired, Revoked)


# ---------------------------------------------------------------------------
# The real memory node (grafos-fabric serve --driver ucx) in one namespace,
# a producer and a consumer (two clients) in the other
# ---------------------------------------------------------------------------


@needs_netns
@needs_ucx
def test_serve_driver_ucx_carries_a_queue_across_namespaces_and_dies_typed(tmp_path: Any) -> None:
    token = tmp_path / "node.token"
    with _netns.veth_pair() as pair:
        node = subprocess.Popen(
            ["ip", "netns", "exec", pair.ns_a, sys.executable, "-m", "grafos_fabric.tools.serve", "--driver", "ucx",
             "--host", pair.ip_a, "--allow-remote", "--port", "0", "--token-file", str(token), "--pool", "32M",
             "--ucx-net-devices", pair.dev_a, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, text=True)
        client = None
        try:
            assert node.stdout is not None
            line = node.stdout.readline()
            while line and not line.startswith("serving "):
                line = node.stdout.readline()
            assert line.startswith("serving ucx://"), line
            url = line.split()[1] + f"?tls=tcp&net_devices={pair.dev_b}&op_timeout=2"
            client = subprocess.Popen(
                ["ip", "netns", "exec", pair.ns_b, sys.executable, os.path.join(HERE, "_ucx_queue_client.py"), url,
                 str(token), "500"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert client.stdout is not None and client.stdin is not None
            ready = H.json_line(client.stdout)
            assert ready == {"ready": True, "in_order": True, "count": 2000}, ready
            node.send_signal(signal.SIGKILL)
            node.wait()
            client.stdin.write("go\n")
            client.stdin.flush()
            out = H.json_line(client.stdout)
            assert out["kind"] == "Disconnected", out
            print(f"\nkill -9 of `serve --driver ucx` (netns) -> {out['kind']} in {out['took'] * 1e3:.1f} ms")
        finally:
            for p in (node, client):
                if p is not None and p.poll() is None:
                    p.kill()
                if p is not None:
                    p.wait()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


@needs_ucx
def test_a_supervised_ucx_node_that_dies_is_restarted_and_serves_again(tmp_path: Any, node_port: int) -> None:
    port = node_port  # held for the whole test: the restarted node binds it again
    token = tmp_path / "node.token"
    sup = subprocess.Popen(
        [sys.executable, "-m", "grafos_fabric.tools.serve", "--driver", "ucx", "--supervise", "--port", str(port),
         "--token-file", str(token), "--pool", "8M", "--ucx-net-devices", "lo", "--ucx-progress", "event",
         "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    try:
        assert sup.stdout is not None
        assert sup.stdout.readline().startswith(f"serving ucx://127.0.0.1:{port}")
        (child,) = _children(sup.pid)
        os.kill(child, signal.SIGKILL)  # stands for UCX aborting inside its atomic handler
        assert sup.stdout.readline().startswith(f"serving ucx://127.0.0.1:{port}")  # restarted
        (again,) = _children(sup.pid)
        assert again != child
        f = gf.open_fabric(f"ucx://127.0.0.1:{port}?tls=tcp&net_devices=lo", token_file=str(token))
        try:
            r = f.alloc(4096, 30.0)
            assert r.faa64(0, 5) == 0 and r.load64(0) == 5
        finally:
            f.close()
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0
        assert not _children(sup.pid)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


@needs_ucx
def test_grafos_bench_ucx_case_reports_queue_rates_beside_shm_and_ops_beside_perftest() -> None:
    from grafos_fabric.tools.bench_ucx import run_ucx_bench

    out = run_ucx_bench(sizes=(64,), seconds=0.1, iters=300)
    ns = f"bench-ucx-{os.getpid()}"  # the shm rows' private namespace: nothing of it stays behind
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"grafos.{ns}.") or n == f"grafos-gen.{ns}"]
    transports = {r["transport"] for r in out["ucx"]}
    assert {"shm mapped", "shm one-sided", "ucx tcp (one-sided)", "ucx sm,tcp (one-sided)"} <= transports
    assert all(r["items_per_s"] > 0 for r in out["ucx"])
    ops = {(r["tls"], r["op"]) for r in out["ucx ops"]}
    assert {("tcp", "cas"), ("tcp", "faa"), ("tcp", "put_flush"), ("tcp", "get")} <= ops
    assert all(r["py_p50"] > 0 for r in out["ucx ops"])
    if shutil.which("ucx_perftest"):
        assert any(r.get("perftest") for r in out["ucx ops"]), "ucx_perftest ran but reported nothing"


@needs_ucx
def test_a_peer_reached_by_worker_address_over_shared_memory_alone() -> None:
    """The binding's other way in: connect by worker address (how ``sm`` alone reaches a peer)."""
    ffi, lib = ucx.ffi, ucx.lib
    node = ucx.UcxContext(ucx.ucx_config("sm"))
    client = ucx.UcxContext(ucx.ucx_config("sm"))
    node.start_progress("busy")
    buf = ffi.new("uint64_t[8]")
    mem = ffi.new("gfu_mem **")
    err = ffi.new("char[]", 256)
    try:
        assert lib.gfu_mem_map(node.ptr, buf, 64, mem, err, 256) == lib.GFU_OK, ffi.string(err)
        packed = ffi.new("uint8_t[]", 4096)
        n = ffi.new("size_t *")
        assert lib.gfu_rkey_pack(mem[0], packed, 4096, n) == lib.GFU_OK
        ep = ucx.UcxEndpoint.connect_worker(client, node.worker_address())
        rk = ucx.Rkey(ep, bytes(ffi.buffer(packed, n[0])))
        old = ffi.new("uint64_t *")
        addr = int(ffi.cast("uintptr_t", buf))
        assert lib.gfu_faa64(ep.ptr, rk.ptr, addr + 8, 41, old, 5.0) == lib.GFU_OK and old[0] == 0
        assert lib.gfu_cas64(ep.ptr, rk.ptr, addr + 8, 41, 42, old, 5.0) == lib.GFU_OK and old[0] == 41
        assert buf[1] == 42
        with pytest.raises(FabricValueError):
            ucx.UcxEndpoint.connect_worker(client, b"")
        rk.close()
        ep.close()
        assert lib.gfu_mem_unmap(mem[0]) == lib.GFU_OK
    finally:
        node.close()
        client.close()


@needs_ucx
def test_a_region_of_a_node_that_restarted_on_the_same_address_fails_closed(node_port: int) -> None:
    """A restarted node never held the old lease; over tcp it would serve the old address
    blindly (a SIGSEGV in the node when that address is not mapped there). The region sees
    the node's new identity on its next operation and raises LeaseExpired instead."""

    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer

    secret = b"ucx-restart-same-address-secret!"
    port = node_port  # held for the whole test: the restarted node binds it again

    def start() -> Any:
        reg = ucx.UcxRegistrar(1 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event")
        return NodeServer(reg, load_policy(secret), port=port).start()

    node = start()
    f = ucx.UcxFabric("127.0.0.1", port, secret=secret, tls="tcp", net_devices="lo", op_timeout=2.0)
    try:
        old = f.alloc(4096, 600.0)
        assert old.faa64(0, 7) == 0 and old.load64(0) == 7
        first = node.node_tag
        node.close()
        node = start()
        assert node.node_tag != first
        with pytest.raises(Disconnected):
            f.alloc(4096, 600.0)  # the old control channel died with the node (an alloc is not retried) ...
        new = f.alloc(4096, 600.0)  # ... the next call reopens it: the client learns the new identity
        assert new.faa64(0, 1) == 0
        with pytest.raises(LeaseExpired, match="restarted"):
            old.load64(0)
        with pytest.raises(LeaseExpired):
            old.write(0, b"x" * 8)  # and stays failed
        assert not old.lease.live
        assert new.load64(0) == 1  # the new node is fine
    finally:
        f.close()
        node.close()


@needs_ucx
def test_the_binding_declarations_come_from_the_one_header_the_c_code_includes() -> None:
    """gf_ucx_api.h (status codes, handle types, prototypes) is what gf_ucx.c includes and what
    build_ucx.py gives ffi.cdef, unchanged: nothing of the API is typed twice."""
    import importlib.util
    import pathlib
    import re

    native = pathlib.Path(HERE).parent / "native"
    api = (native / "gf_ucx_api.h").read_text()
    assert not [line for line in api.splitlines() if line.lstrip().startswith("#")]  # cdef takes it as it is
    assert '#include "gf_ucx_api.h"' in (native / "gf_ucx.h").read_text()
    assert not (native / "gf_ucx_cdef.h").exists()
    spec = importlib.util.spec_from_file_location("_build_ucx_under_test", native / "build_ucx.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.cdef_text() == api
    c_src = (native / "gf_ucx.c").read_text() + (native / "gf_ucx.h").read_text()
    # the codes are the header's enum; the C file defines only its own tunables
    assert not re.findall(r"#define\s+GFU_(?!CLOSE_GRACE|SETTLE_IDLE|GROUP_MAX|BACKLOG|SLOT_WORDS)\w+", c_src)
    assert not re.findall(r"typedef struct gfu_\w+ gfu_\w+;", c_src)
    names = re.findall(r"\b(gfu_\w+)\s*\(", re.sub(r"/\*.*?\*/", "", api, flags=re.S))
    assert len(names) > 30
    assert [n for n in names if not hasattr(ucx.lib, n)] == []


@needs_ucx
@pytest.mark.parametrize("prefault", [False, True])
def test_a_registered_span_is_zeroed_even_where_a_freed_one_left_bytes(prefault: bool) -> None:
    """register() zeroes the span in place (the pool prefaulted or not): bytes a freed
    span left in the pool never reach the next lease of that memory."""
    import ctypes

    reg = ucx.UcxRegistrar(1 << 20, host="127.0.0.1", tls="tcp", net_devices="lo", progress="event",
                           prefault=prefault)
    try:
        n = 3 * 4096
        span = reg.register(4096, n)
        ctypes.memset(reg.pool_addr + 4096, 0xAB, n)  # what a tenant wrote there
        reg.deregister(span)
        again = reg.register(0, 2 * n)  # overlaps the old span and the pages around it
        got = ctypes.string_at(reg.pool_addr, 2 * n)
        assert got == bytes(2 * n)
        reg.deregister(again)
        with pytest.raises(FabricValueError):
            reg.register(reg.pool_size - 4096, 8192)  # past the pool: refused before any write
    finally:
        reg.close()
