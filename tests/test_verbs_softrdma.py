"""The verbs driver's plumbing against a software responder (NOT RDMA; the device tests are the proof).

Where there is no RDMA device, the client and memory-node code paths above
pyverbs (QP setup and exchange, staging, WR reuse, completion handling, QP
rebuild after errors, lease enforcement by deregistration, close order)
would otherwise never run. This module replaces the device-bound pyverbs
modules (``device``, ``pd``, ``mr``, ``cq``, ``qp``, ``addr``) with a small
software "HCA" that follows the verbs semantics the driver relies on:

* MRs by lkey/rkey with their access flags (REMOTE_WRITE/ATOMIC need
  LOCAL_WRITE, as libibverbs demands); a deregistered rkey is a remote access
  error; a QP's ``qp_access_flags`` gate remote access too;
* RC QPs: post on a QP that is not RTS fails; a peer QP that is gone gives
  ``RETRY_EXC_ERR``; any error completion moves the QP to ERR and later WRs
  flush (``WR_FLUSH_ERR``);
* completions only for signalled WRs (or all, with ``sq_sig_all``).

The work requests themselves are the **real** ``pyverbs.wr.SendWR`` objects:
the responder executes the native ``struct ibv_send_wr`` they hold (read with
ctypes, as in ``test_verbs.py``), so the opcodes, addresses, keys and operands
it acts on are the ones a device would see. What this cannot show: anything
about real HCAs, wire ordering, address handles, MTU, RoCE GIDs, timing.

The scenarios are the device tests' own functions, run here on the software
responder; the two-process test is left out (the child would load the real
pyverbs).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from grafos_fabric.drivers import _verbs_compat as compat
from grafos_fabric.drivers import verbs
from grafos_fabric.errors import Disconnected, FabricValueError, LeaseExpired

sys.path.insert(0, os.path.dirname(__file__))  # the sibling test modules, under any import mode
import test_verbs_device as dev
from _realtime import SteppedTime
from test_verbs import native_send_wr

if compat.pyverbs_import_error() is not None:
    pytest.skip(f"needs pyverbs's WR objects: {compat.pyverbs_import_error()}", allow_module_level=True)

from pyverbs.pyverbs_error import PyverbsRDMAError

ACC_LOCAL_WRITE, ACC_REMOTE_WRITE, ACC_REMOTE_READ, ACC_REMOTE_ATOMIC = 1, 2, 4, 8
OP_WRITE, OP_READ, OP_CAS, OP_FAA = 0, 4, 5, 6
SEND_SIGNALED = 2
QPS_RESET, QPS_INIT, QPS_RTS, QPS_ERR = 0, 1, 3, 6
MAGIC = 0x0D1C_E5EE_D5EE_D001


# ---------------------------------------------------------------------------
# The software HCA
# ---------------------------------------------------------------------------


@dataclass
class SoftMrEntry:
    addr: int
    length: int
    access: int
    pd: Any


@dataclass
class SoftWc:
    wr_id: int
    status: int
    opcode: int = 0
    vendor_err: int = 0
    byte_len: int = 0


class SoftHca:
    def __init__(self, reply_big_endian: bool = False) -> None:
        self.lock = threading.RLock()
        self.keys = itertools.count(0x100)
        self.qpns = itertools.count(0x40)
        self.mrs: dict[int, SoftMrEntry] = {}
        self.qps: dict[int, QP] = {}
        self.reply_big_endian = reply_big_endian
        self.posted: list[tuple[int, int]] = []  # (opcode, length) of every executed WR
        self.open_objects: set[int] = set()

    def track(self, obj: Any) -> None:
        self.open_objects.add(id(obj))

    def untrack(self, obj: Any) -> None:
        self.open_objects.discard(id(obj))


HCA = SoftHca()


class _Closable:
    closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            HCA.untrack(self)


class Device:
    def __init__(self, name: bytes) -> None:
        self.name = name


def get_device_list() -> list[Device]:
    return [Device(b"soft0")]


@dataclass
class PortAttr:
    link_layer: int = 1  # InfiniBand
    lid: int = 1
    active_mtu: int = 3


@dataclass
class DeviceAttr:
    atomic_caps: int = 1  # IBV_ATOMIC_HCA


class Context(_Closable):
    def __init__(self, name: str | None = None) -> None:
        if name != "soft0":
            raise PyverbsRDMAError(f"Failed to find device {name}")
        HCA.track(self)

    def query_port(self, port: int) -> PortAttr:
        assert port == 1
        return PortAttr()

    def query_gid(self, port: int, index: int) -> str:
        return "fe80:0000:0000:0000:0000:0000:0000:0001"

    def query_device(self) -> DeviceAttr:
        return DeviceAttr()


class PD(_Closable):
    def __init__(self, ctx: Context) -> None:
        assert not ctx.closed
        self.ctx = ctx
        HCA.track(self)

    def close(self) -> None:
        if not self.closed:
            leaked = [k for k, e in HCA.mrs.items() if e.pd is self]
            assert not leaked, f"PD closed before its MRs {leaked} (children first)"
        super().close()


class MR(_Closable):
    def __init__(self, pd: PD, length: int, access: int, address: int | None = None) -> None:
        assert not pd.closed
        if access & (ACC_REMOTE_WRITE | ACC_REMOTE_ATOMIC) and not access & ACC_LOCAL_WRITE:
            raise PyverbsRDMAError("Failed to register a MR", 22)
        if address is None:
            self._mem = ctypes.create_string_buffer(length)
            address = ctypes.addressof(self._mem)
        self.buf = address
        self.length = length
        self.lkey = self.rkey = next(HCA.keys)
        with HCA.lock:
            HCA.mrs[self.rkey] = SoftMrEntry(address, length, access, pd)
        HCA.track(self)

    def close(self) -> None:
        with HCA.lock:
            HCA.mrs.pop(self.rkey, None)
        super().close()


class CQ(_Closable):
    def __init__(self, ctx: Context, cqe: int, cq_context: Any = None, channel: Any = None, vector: int = 0) -> None:
        self.wcs: deque[SoftWc] = deque()
        self.cqe = cqe
        HCA.track(self)

    def poll(self, num_entries: int = 1) -> tuple[int, list[SoftWc]]:
        with HCA.lock:
            if self.wcs:
                return 1, [self.wcs.popleft()]
        return 0, []


class QPCap:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class QPInitAttr:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class QPAttr:
    def __init__(self, port_num: int = 1, **kw: Any) -> None:
        self.port_num = port_num
        self.qp_access_flags = 0
        self.__dict__.update(kw)


class GID:
    def __init__(self, val: str | None = None) -> None:
        self.gid = val


class AHAttr:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class GlobalRoute:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class QP(_Closable):
    def __init__(self, pd: PD, init: QPInitAttr, attr: QPAttr | None = None) -> None:
        assert init.qp_type == 2, "the driver uses RC QPs"  # IBV_QPT_RC
        self.pd = pd
        self.cq: CQ = init.scq
        self.sig_all = bool(init.sq_sig_all)
        self.qp_num = next(HCA.qpns)
        self.state = QPS_RESET
        self.access = 0
        self.dest: int | None = None
        if attr is not None:
            self.access = attr.qp_access_flags
            self.state = QPS_INIT
        with HCA.lock:
            HCA.qps[self.qp_num] = self
        HCA.track(self)

    def to_rts(self, attr: QPAttr) -> None:
        assert self.state == QPS_INIT, f"to_rts from state {self.state}"
        assert attr.max_rd_atomic >= 1 and attr.max_dest_rd_atomic >= 1
        self.dest = attr.dest_qp_num
        self.state = QPS_RTS

    def close(self) -> None:
        with HCA.lock:
            HCA.qps.pop(self.qp_num, None)
        super().close()

    # -- the responder -----------------------------------------------------
    def post_send(self, wr: Any) -> None:
        if self.closed or self.state not in (QPS_RTS, QPS_ERR):
            raise PyverbsRDMAError("Failed to post send", 22)
        wr_id = wr.wr_id
        wr.wr_id = MAGIC
        try:
            n = native_send_wr(wr, MAGIC)
            opcode, flags, num_sge = n.opcode, n.send_flags, n.num_sge
            sge = n.sg_list[0]
            laddr, llen, lkey = sge.addr, sge.length, sge.lkey
            if opcode in (OP_WRITE, OP_READ):
                raddr, rkey, cmp_add, swap = n.wr.rdma.remote_addr, n.wr.rdma.rkey, 0, 0
            else:
                a = n.wr.atomic
                raddr, rkey, cmp_add, swap = a.remote_addr, a.rkey, a.compare_add, a.swap
        finally:
            wr.wr_id = wr_id
        assert num_sge == 1
        with HCA.lock:
            status = self._execute(opcode, laddr, llen, lkey, raddr, rkey, cmp_add, swap)
            if status:
                self.state = QPS_ERR
            if status or flags & SEND_SIGNALED or self.sig_all:
                self.cq.wcs.append(SoftWc(wr_id=wr_id, status=status, opcode=opcode))

    def _execute(self, opcode: int, laddr: int, llen: int, lkey: int, raddr: int, rkey: int,
                 cmp_add: int, swap: int) -> int:
        WC = compat.WC
        if self.state == QPS_ERR:
            return WC.WR_FLUSH_ERR
        peer = HCA.qps.get(self.dest or -1)
        if peer is None or peer.state != QPS_RTS or peer.dest != self.qp_num:
            return WC.RETRY_EXC_ERR
        local = HCA.mrs.get(lkey)
        if local is None or local.pd is not self.pd or not (
            local.addr <= laddr and laddr + llen <= local.addr + local.length
        ):
            return WC.LOC_PROT_ERR
        need = {OP_WRITE: ACC_REMOTE_WRITE, OP_READ: ACC_REMOTE_READ}.get(opcode, ACC_REMOTE_ATOMIC)
        remote = HCA.mrs.get(rkey)
        length = llen if opcode in (OP_WRITE, OP_READ) else 8
        if (
            remote is None
            or remote.pd is not peer.pd
            or not remote.access & need
            or not peer.access & need
            or not (remote.addr <= raddr and raddr + length <= remote.addr + remote.length)
        ):
            return WC.REM_ACCESS_ERR
        if opcode != OP_WRITE and not local.access & ACC_LOCAL_WRITE:
            return WC.LOC_PROT_ERR
        HCA.posted.append((opcode, length))
        if opcode == OP_WRITE:
            ctypes.memmove(raddr, laddr, llen)
        elif opcode == OP_READ:
            ctypes.memmove(laddr, raddr, llen)
        elif opcode in (OP_CAS, OP_FAA):
            if raddr % 8 or llen != 8:
                return WC.REM_INV_REQ_ERR
            word = ctypes.c_uint64.from_address(raddr)
            old = word.value
            if opcode == OP_CAS:
                if old == cmp_add:
                    word.value = swap
            else:
                word.value = (old + cmp_add) & (2**64 - 1)
            reply = old.to_bytes(8, "big" if HCA.reply_big_endian else "little")
            ctypes.memmove(laddr, reply, 8)
        else:
            return WC.REM_INV_REQ_ERR
        return WC.SUCCESS


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


@pytest.fixture(autouse=True)
def soft_pyverbs(monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHca]:
    """Install the software HCA in place of pyverbs's device-bound modules (real ``pyverbs.wr``)."""
    yield install_soft_hca(monkeypatch)


def install_soft_hca(monkeypatch: pytest.MonkeyPatch) -> SoftHca:
    """A fresh software HCA in place of pyverbs's device modules until ``monkeypatch`` undoes it
    (also the conformance suite's ``softverbs`` driver, tests/conformance/conftest.py)."""
    global HCA
    HCA = SoftHca()
    fakes = {
        "pyverbs.device": _module("pyverbs.device", get_device_list=get_device_list, Context=Context),
        "pyverbs.pd": _module("pyverbs.pd", PD=PD),
        "pyverbs.mr": _module("pyverbs.mr", MR=MR),
        "pyverbs.cq": _module("pyverbs.cq", CQ=CQ),
        "pyverbs.qp": _module("pyverbs.qp", QP=QP, QPCap=QPCap, QPInitAttr=QPInitAttr, QPAttr=QPAttr),
        "pyverbs.addr": _module("pyverbs.addr", GID=GID, AHAttr=AHAttr, GlobalRoute=GlobalRoute),
    }
    import pyverbs

    for name, mod in fakes.items():
        monkeypatch.setitem(sys.modules, name, mod)
        # `import pyverbs.device as d` binds the package attribute, not sys.modules
        monkeypatch.setattr(pyverbs, name.split(".")[1], mod, raising=False)
    monkeypatch.setattr(dev, "DEVICE", None)
    monkeypatch.setattr(dev, "IB_PORT", 1)
    monkeypatch.setattr(dev, "GID_INDEX", 0)
    return HCA


# The device tests' fixtures, on the software HCA.


@pytest.fixture
def node_clock() -> dev.JumpClock:
    return dev.JumpClock()


@pytest.fixture
def node(node_clock: dev.JumpClock) -> Iterator[verbs.MemoryNode]:
    mn = verbs.MemoryNode.open(
        None, pool_size=16 << 20, host="127.0.0.1", port=0, clock=node_clock, reap_interval=0.01, secret=dev.SECRET
    )
    yield mn
    mn.close()


@pytest.fixture
def fabric(node: verbs.MemoryNode) -> Iterator[verbs.VerbsFabric]:
    f = dev.client(node)
    yield f
    f.close()


# ---------------------------------------------------------------------------
# The device scenarios, re-run here
# ---------------------------------------------------------------------------

test_write_then_read_returns_the_same_bytes = dev.test_write_then_read_returns_the_same_bytes
test_a_new_lease_reads_as_zeros = dev.test_a_new_lease_reads_as_zeros
test_transfers_larger_than_the_staging_buffer_go_in_chunks = (
    dev.test_transfers_larger_than_the_staging_buffer_go_in_chunks
)
test_read_into_a_registered_buffer_is_zero_copy = dev.test_read_into_a_registered_buffer_is_zero_copy
test_store64_and_load64_use_little_endian_words = dev.test_store64_and_load64_use_little_endian_words
test_cas64_swaps_only_when_the_expected_value_matches = dev.test_cas64_swaps_only_when_the_expected_value_matches
test_faa64_adds_and_returns_the_old_value_in_host_order = dev.test_faa64_adds_and_returns_the_old_value_in_host_order
test_atomics_from_two_clients_on_one_word_do_not_lose_updates = (
    dev.test_atomics_from_two_clients_on_one_word_do_not_lose_updates
)
test_a_second_client_attaches_by_ref_and_sees_the_bytes = dev.test_a_second_client_attaches_by_ref_and_sees_the_bytes
test_out_of_bounds_and_misaligned_operations_are_refused_before_posting = (
    dev.test_out_of_bounds_and_misaligned_operations_are_refused_before_posting
)
test_a_verbs_region_is_never_mapped = dev.test_a_verbs_region_is_never_mapped
test_the_one_sided_queue_carries_items_in_order_over_rdma = (
    dev.test_the_one_sided_queue_carries_items_in_order_over_rdma
)
test_a_lease_the_node_expired_fails_remote_access_as_lease_expired = (
    dev.test_a_lease_the_node_expired_fails_remote_access_as_lease_expired
)
test_a_lease_revoked_by_another_client_fails_as_revoked = dev.test_a_lease_revoked_by_another_client_fails_as_revoked
test_a_freed_lease_fails_closed_and_the_node_reports_it_freed = (
    dev.test_a_freed_lease_fails_closed_and_the_node_reports_it_freed
)
test_renew_moves_the_deadline_on_the_node = dev.test_renew_moves_the_deadline_on_the_node
test_after_a_node_restart_old_leases_end_as_lease_expired_and_new_ones_work = (
    dev.test_after_a_node_restart_old_leases_end_as_lease_expired_and_new_ones_work
)
test_reap_forgets_the_regions_whose_leases_ended = dev.test_reap_forgets_the_regions_whose_leases_ended
test_close_releases_everything_and_is_idempotent = dev.test_close_releases_everything_and_is_idempotent


# ---------------------------------------------------------------------------
# Plumbing only the software responder can show
# ---------------------------------------------------------------------------


def test_every_operation_posts_the_opcode_it_stands_for(fabric, soft_pyverbs):
    region = fabric.alloc(64, ttl=30.0)
    soft_pyverbs.posted.clear()
    region.write(0, b"abc")
    region.read_into(0, bytearray(3))
    region.cas64(8, 0, 1)
    region.faa64(8, 1)
    region.store64(16, 5)
    region.load64(16)
    assert soft_pyverbs.posted == [(OP_WRITE, 3), (OP_READ, 3), (OP_CAS, 8), (OP_FAA, 8), (OP_WRITE, 8), (OP_READ, 8)]


def test_a_big_endian_atomic_reply_is_calibrated_away(node):
    HCA.reply_big_endian = True
    f = dev.client(node)
    try:
        conn = f.node()
        assert conn.atomic_reply_swapped is True
        region = f.alloc(64, ttl=30.0)
        region.store64(0, 0x0102030405060708)
        assert region.faa64(0, 1) == 0x0102030405060708
        assert region.cas64(0, 0x0102030405060709, 7) == 0x0102030405060709
        assert region.load64(0) == 7
    finally:
        f.close()


def test_wrs_are_reused_and_all_closed_with_the_fabric(node):
    f = dev.client(node)
    region = f.alloc(64, ttl=30.0)
    conn = region.conn
    for i in range(10):
        region.store64(0, i)
        assert region.cas64(8, i, i + 1) == i
        assert region.faa64(16, 2) == 2 * i
    assert len(conn.wrs) == 3  # one WRITE, one CAS, one FAA: reused with new operands
    f.close()
    assert len(conn.wrs) == 0


def test_closing_the_fabric_and_the_node_leaves_no_verbs_object_open(node):
    f = dev.client(node)
    f.alloc(64, ttl=30.0).store64(0, 1)
    f.register(4096)
    f.close()
    node.close()
    assert HCA.open_objects == set()
    assert HCA.mrs == {} and HCA.qps == {}


def test_a_node_that_went_away_is_disconnected_and_the_next_call_too(node):
    f = dev.client(node)
    try:
        region = f.alloc(64, ttl=30.0)
        node.close()
        with pytest.raises(Disconnected):
            region.load64(0)
        with pytest.raises(Disconnected):  # the rebuild needs the control channel, which is gone
            region.load64(0)
    finally:
        f.close()


def test_after_a_node_restart_old_leases_fail_as_lease_expired_and_new_ones_work(node_clock):
    first = verbs.MemoryNode.open(None, pool_size=1 << 20, host="127.0.0.1", port=0, clock=node_clock,
                                  secret=dev.SECRET)
    port = first.port
    f = verbs.VerbsFabric("127.0.0.1", port, timeout=5.0, secret=dev.SECRET)
    try:
        old = f.alloc(64, ttl=30.0)
        old.store64(0, 1)
        first.close()
        second = verbs.MemoryNode.open(None, pool_size=1 << 20, host="127.0.0.1", port=port, clock=node_clock,
                                       secret=dev.SECRET)
        try:
            with pytest.raises(Disconnected):
                old.load64(0)  # the node's end of the QP is gone
            with pytest.raises(LeaseExpired, match="unknown"):
                old.load64(0)  # reconnected; the new node never heard of this lease
            new = f.alloc(64, ttl=30.0)
            new.store64(0, 2)
            assert new.load64(0) == 2
        finally:
            second.close()
    finally:
        f.close()


def test_a_lost_completion_times_out_as_disconnected_and_the_qp_is_rebuilt(node, monkeypatch):
    from grafos_fabric.drivers.verbs import completion

    f = verbs.VerbsFabric("127.0.0.1", node.port, timeout=0.05, secret=dev.SECRET)
    try:
        region = f.alloc(64, ttl=30.0)
        conn = region.conn
        old_qp = conn.qp
        original = QP.post_send
        monkeypatch.setattr(QP, "post_send", lambda self, wr: None)  # the completion never comes
        # the completion wait's clock moves only while it sleeps: it gives up after the fabric's
        # 0.05 s, however long a loaded machine keeps it off the CPU (a real-time bound could not)
        clock = SteppedTime(limit=1.0)
        monkeypatch.setattr(completion, "time", clock)
        t0 = clock.now
        with pytest.raises(Disconnected, match="no completion"):
            region.store64(0, 1)
        assert 0.05 <= clock.now - t0 < 0.06
        monkeypatch.setattr(completion, "time", time)
        monkeypatch.setattr(QP, "post_send", original)
        region.store64(0, 2)
        assert region.load64(0) == 2
        assert conn.qp is not old_qp
    finally:
        f.close()


def test_the_memory_node_answers_connect_with_its_own_qp(node):
    from grafos_fabric.drivers.node import auth, wire
    from grafos_fabric.drivers.node.client import ControlClient

    c = ControlClient("127.0.0.1", node.port, tenant="default", key=auth.tenant_key(dev.SECRET, "default"))
    try:
        before = set(HCA.qps)
        ep = {"qpn": 0x99, "psn": 1, "lid": 1, "gid": "", "mtu": 3}
        reply = c.call(wire.Connect(params=ep), wire.Connected).params
        assert reply["qpn"] in HCA.qps and reply["qpn"] not in before
        assert HCA.qps[reply["qpn"]].dest == 0x99
        again = c.call(wire.Connect(params={**ep, "qpn": 0x9A}), wire.Connected).params
        assert reply["qpn"] not in HCA.qps, "a reconnect must close the session's old QP"
        assert HCA.qps[again["qpn"]].dest == 0x9A
        with pytest.raises(FabricValueError, match="qpn"):  # an endpoint from the wire is validated
            c.call(wire.Connect(params={**ep, "qpn": 1 << 24}), wire.Connected)
    finally:
        c.close()


def test_serve_runs_a_node_that_a_client_can_use_until_stopped(capsys, tmp_path):
    import argparse

    from grafos_fabric.tools import serve

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serve.add_serve_parser(sub)
    token = str(tmp_path / "node.token")
    args = parser.parse_args(["serve", "--host", "127.0.0.1", "--port", "0", "--pool", "2M", "--log-level", "ERROR",
                              "--token-file", token])
    stop = threading.Event()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(args.func(args, stop)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        out = ""
        while "serving rdma://" not in out:
            assert time.monotonic() < deadline and t.is_alive(), "serve did not start"
            time.sleep(0.01)
            out += capsys.readouterr().out
        url = out.split()[1]
        assert url.startswith("rdma://127.0.0.1:") and "pool=2097152" in out
        f = verbs.VerbsFabric.from_url(url, token_file=token)
        try:
            region = f.alloc(64, ttl=5.0)
            region.store64(0, 42)
            assert region.load64(0) == 42
        finally:
            f.close()
    finally:
        stop.set()
        t.join(timeout=10)
    assert result == [0]
    assert HCA.mrs == {}, "serve must deregister everything on the way out"
