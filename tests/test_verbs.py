"""The verbs driver without a device: probe, no-device message, WR construction, error mapping.

Work requests are built with the real pyverbs objects (skipped, with the
reason, where pyverbs does not import) and read back from the native
``struct ibv_send_wr`` that ``ibv_post_send`` would be handed, field by field.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from grafos_fabric.drivers import _verbs_compat as compat
from grafos_fabric.drivers import verbs
from grafos_fabric.drivers._verbs_compat import WC
from grafos_fabric.errors import (
    Disconnected,
    FabricValueError,
    LeaseExpired,
    Revoked,
    Unsupported,
)

PYVERBS_MISSING = compat.pyverbs_import_error()
needs_pyverbs = pytest.mark.skipif(PYVERBS_MISSING is not None, reason=str(PYVERBS_MISSING))


# ---------------------------------------------------------------------------
# Reading the native struct ibv_send_wr behind a pyverbs SendWR (x86_64 / LP64 layout, verbs.h)
# ---------------------------------------------------------------------------


class _Sge(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("length", ctypes.c_uint32), ("lkey", ctypes.c_uint32)]


class _Rdma(ctypes.Structure):
    _fields_ = [("remote_addr", ctypes.c_uint64), ("rkey", ctypes.c_uint32)]


class _Atomic(ctypes.Structure):
    _fields_ = [
        ("remote_addr", ctypes.c_uint64),
        ("compare_add", ctypes.c_uint64),
        ("swap", ctypes.c_uint64),
        ("rkey", ctypes.c_uint32),
    ]


class _WrUnion(ctypes.Union):
    _fields_ = [("rdma", _Rdma), ("atomic", _Atomic)]


class _SendWr(ctypes.Structure):
    _fields_ = [
        ("wr_id", ctypes.c_uint64),
        ("next", ctypes.c_void_p),
        ("sg_list", ctypes.POINTER(_Sge)),
        ("num_sge", ctypes.c_int),
        ("opcode", ctypes.c_int),
        ("send_flags", ctypes.c_uint),
        ("imm_data", ctypes.c_uint32),
        ("wr", _WrUnion),
    ]


def native_send_wr(wr: Any, wr_id: int) -> _SendWr:
    """The ``ibv_send_wr`` embedded in a pyverbs ``SendWR`` (found by its unique ``wr_id``)."""
    size = type(wr).__basicsize__
    raw = ctypes.string_at(id(wr), size)
    needle = wr_id.to_bytes(8, "little")
    hits = [i for i in range(0, size - 8, 8) if raw[i : i + 8] == needle]
    assert len(hits) == 1, f"wr_id {wr_id:#x} found at {hits} in the SendWR object"
    native = _SendWr.from_address(id(wr) + hits[0])
    assert native.wr_id == wr.wr_id == wr_id
    return native


# ---------------------------------------------------------------------------
# compat: enums and probe
# ---------------------------------------------------------------------------


@needs_pyverbs
def test_completion_status_constants_match_the_pyverbs_enum():
    statuses = compat.E.WCS
    for name, value in vars(WC).items():
        if name.isupper() and isinstance(value, int):
            assert int(getattr(statuses, f"IBV_WC_{name}")) == value, name


@needs_pyverbs
def test_enum_shim_gives_the_abi_values_of_access_flags_and_opcodes():
    acc, op = compat.E.ACC, compat.E.OP
    assert (int(acc.IBV_ACCESS_LOCAL_WRITE), int(acc.IBV_ACCESS_REMOTE_WRITE)) == (1, 2)
    assert (int(acc.IBV_ACCESS_REMOTE_READ), int(acc.IBV_ACCESS_REMOTE_ATOMIC)) == (4, 8)
    assert int(op.IBV_WR_RDMA_WRITE) == 0
    assert int(op.IBV_WR_RDMA_READ) == 4
    assert int(op.IBV_WR_ATOMIC_CMP_AND_SWP) == 5
    assert int(op.IBV_WR_ATOMIC_FETCH_AND_ADD) == 6


@needs_pyverbs
def test_the_driver_names_every_opcode_it_posts_and_pyverbs_agrees_on_each_value():
    for opcode in verbs.Opcode:
        assert opcode.name.startswith("IBV_WR_")
        assert int(opcode.pyverbs()) == int(opcode)


def test_no_bare_opcode_numbers_are_left_in_the_driver():
    import inspect
    import re

    from grafos_fabric.drivers.verbs import client, wr

    for mod in (client, wr):
        src = inspect.getsource(mod)
        assert not re.search(r"opcode\s*=\s*\d", src), f"{mod.__name__} posts a bare opcode number"
        assert not re.search(r"\(\s*[0-9]\s+if\s+(cas|write)", src), f"{mod.__name__} keys WRs by bare numbers"


def test_enum_shim_raises_attribute_error_for_names_it_does_not_know():
    with pytest.raises(AttributeError):
        _ = compat.E.NOT_AN_ENUM


def test_probe_reports_why_pyverbs_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyverbs.device", None)  # import pyverbs.device -> ImportError
    reason = compat.probe()
    assert reason is not None
    assert reason.startswith("pyverbs not importable")
    assert "install_pyverbs.sh" in reason


@needs_pyverbs
def test_probe_reports_an_empty_device_list(monkeypatch):
    monkeypatch.setattr(compat, "device_names", lambda: [])
    assert compat.probe() == "libibverbs found no RDMA devices"


@needs_pyverbs
def test_probe_accepts_a_present_device_and_names_a_missing_one(monkeypatch):
    monkeypatch.setattr(compat, "device_names", lambda: ["mlx5_0", "mlx5_1"])
    assert compat.probe() is None
    assert compat.probe("mlx5_1") is None
    reason = compat.probe("rxe9")
    assert reason is not None and "'rxe9' not found" in reason and "mlx5_0, mlx5_1" in reason


@needs_pyverbs
def test_probe_turns_an_unexpected_enumeration_failure_into_a_reason(monkeypatch):
    def boom() -> list[str]:
        raise RuntimeError("kaput")

    monkeypatch.setattr(compat, "device_names", boom)
    assert compat.probe() == "device enumeration failed: RuntimeError: kaput"


@needs_pyverbs
def test_probe_explains_failed_device_list_with_the_errno_pyverbs_drops():
    reason = compat.probe()
    if reason is None:
        pytest.skip("an RDMA device exists here: the no-device reason cannot be observed")
    # With no kernel RDMA support (this project's CI), libibverbs says ENOSYS.
    if "Failed to get devices list" in reason:
        assert "ibv_get_device_list errno" in reason
        assert "errno 0:" not in reason
    else:
        assert reason in ("libibverbs found no RDMA devices",) or "not found" in reason


# ---------------------------------------------------------------------------
# open_fabric("rdma://...") without a device; URL parsing
# ---------------------------------------------------------------------------


def test_from_url_without_a_device_raises_unsupported_with_the_probe_reason():
    reason = compat.probe()
    if reason is None:
        pytest.skip("an RDMA device exists here")
    with pytest.raises(Unsupported) as info:
        verbs.VerbsFabric.from_url("rdma://127.0.0.1:18515")
    assert str(info.value) == f"no RDMA device: {reason}"
    assert info.value.code == -5


def test_open_fabric_with_an_rdma_url_and_no_device_raises_unsupported():
    from grafos_fabric.drivers import open_fabric

    reason = compat.probe()
    if reason is None:
        pytest.skip("an RDMA device exists here")
    with pytest.raises(Unsupported, match=r"^no RDMA device: "):
        open_fabric("rdma://127.0.0.1:18515")


def test_from_url_passes_the_device_option_to_the_probe(monkeypatch):
    seen: list[str | None] = []

    def fake_probe(device: str | None = None) -> str | None:
        seen.append(device)
        return "nothing here"

    monkeypatch.setattr(verbs.client, "probe", fake_probe)
    with pytest.raises(Unsupported, match=r"^no RDMA device: nothing here$"):
        verbs.VerbsFabric.from_url("rdma://node7:9000?device=mlx5_3&gid_index=3", clock=None)
    assert seen == ["mlx5_3"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rdma://node7:9000", ("node7", 9000, {})),
        ("rdma://10.0.0.5", ("10.0.0.5", verbs.DEFAULT_PORT, {})),
        ("verbs://node7:9000?timeout=2.5", ("node7", 9000, {"timeout": "2.5"})),
        ("rdma://[fe80::1]:7000?device=mlx5_0&ib_port=2", ("fe80::1", 7000, {"device": "mlx5_0", "ib_port": "2"})),
    ],
)
def test_rdma_url_parses_host_port_and_options(url, expected):
    assert verbs.parse_rdma_url(url) == expected


@pytest.mark.parametrize(
    "url", ["shm://default", "rdma://", "rdma://host:notaport", "rdma://host:1?colour=blue", "rdma://host:99999"]
)
def test_rdma_url_rejects_what_it_cannot_use(url):
    with pytest.raises(FabricValueError):
        verbs.parse_rdma_url(url)


# ---------------------------------------------------------------------------
# Work requests, field by field, with real pyverbs objects
# ---------------------------------------------------------------------------

SIGNALED = 2  # IBV_SEND_SIGNALED


@needs_pyverbs
@pytest.mark.parametrize(("build", "opcode"), [(verbs.build_rdma_write_wr, 0), (verbs.build_rdma_read_wr, 4)])
def test_rdma_write_and_read_wrs_carry_every_field(build, opcode):
    wr_id = 0x5A5A_0001_0000_0001 + opcode
    wr = build(wr_id, 0x7F00_0000_1000, 4096, 0x1234, 0x5500_0000_2000, 0xBEEF)
    try:
        n = native_send_wr(wr, wr_id)
        assert n.opcode == opcode
        assert n.num_sge == 1
        assert n.send_flags == SIGNALED
        assert (n.sg_list[0].addr, n.sg_list[0].length, n.sg_list[0].lkey) == (0x7F00_0000_1000, 4096, 0x1234)
        assert n.wr.rdma.remote_addr == 0x5500_0000_2000
        assert n.wr.rdma.rkey == 0xBEEF
        assert not n.next
        # set_wr_rdma on reuse changes only the remote side
        wr.set_wr_rdma(rkey=0xCAFE, addr=0x5500_0000_3000)
        assert (n.wr.rdma.remote_addr, n.wr.rdma.rkey) == (0x5500_0000_3000, 0xCAFE)
        assert (n.sg_list[0].addr, n.sg_list[0].length) == (0x7F00_0000_1000, 4096)
    finally:
        wr.close()


@needs_pyverbs
def test_cas_wr_puts_expected_in_compare_add_and_desired_in_swap():
    wr_id = 0x5A5A_0002_0000_0005
    wr = verbs.build_cas_wr(wr_id, 0x7F00_0000_0040, 0x77, 0x5500_0000_0008, 0xABCD, 0x1111_2222_3333_4444, 0x5555)
    try:
        n = native_send_wr(wr, wr_id)
        assert n.opcode == 5
        assert n.num_sge == 1
        assert n.send_flags == SIGNALED
        assert (n.sg_list[0].addr, n.sg_list[0].length, n.sg_list[0].lkey) == (0x7F00_0000_0040, 8, 0x77)
        assert n.wr.atomic.remote_addr == 0x5500_0000_0008
        assert n.wr.atomic.rkey == 0xABCD
        assert n.wr.atomic.compare_add == 0x1111_2222_3333_4444
        assert n.wr.atomic.swap == 0x5555
    finally:
        wr.close()


@needs_pyverbs
def test_faa_wr_puts_the_add_value_in_compare_add_and_leaves_swap_zero():
    wr_id = 0x5A5A_0003_0000_0006
    wr = verbs.build_faa_wr(wr_id, 0x7F00_0000_0080, 0x78, 0x5500_0000_0010, 0xABCE, 42)
    try:
        n = native_send_wr(wr, wr_id)
        assert n.opcode == 6
        assert (n.sg_list[0].addr, n.sg_list[0].length, n.sg_list[0].lkey) == (0x7F00_0000_0080, 8, 0x78)
        assert n.wr.atomic.remote_addr == 0x5500_0000_0010
        assert n.wr.atomic.rkey == 0xABCE
        assert n.wr.atomic.compare_add == 42
        assert n.wr.atomic.swap == 0
    finally:
        wr.close()


@needs_pyverbs
def test_negative_operands_wrap_to_two_complement_u64():
    wr_id = 0x5A5A_0004_0000_0006
    faa = verbs.build_faa_wr(wr_id, 0x1000, 1, 0x2000, 2, -1)
    cas = verbs.build_cas_wr(wr_id + 1, 0x1000, 1, 0x2000, 2, -2, -3)
    try:
        assert native_send_wr(faa, wr_id).wr.atomic.compare_add == 2**64 - 1
        n = native_send_wr(cas, wr_id + 1)
        assert (n.wr.atomic.compare_add, n.wr.atomic.swap) == (2**64 - 2, 2**64 - 3)
    finally:
        faa.close()
        cas.close()


@needs_pyverbs
def test_unsignaled_wr_has_no_send_flags():
    wr_id = 0x5A5A_0005_0000_0000
    wr = verbs.build_rdma_write_wr(wr_id, 0x1000, 8, 1, 0x2000, 2, signaled=False)
    try:
        assert native_send_wr(wr, wr_id).send_flags == 0
    finally:
        wr.close()


@needs_pyverbs
@pytest.mark.parametrize("build", [verbs.build_cas_wr, verbs.build_faa_wr])
def test_atomic_wr_rejects_a_misaligned_remote_address(build):
    args = (1, 0x1000, 1, 0x2004, 2, *((1, 2) if build is verbs.build_cas_wr else (1,)))
    with pytest.raises(FabricValueError, match="not 8-byte aligned"):
        build(*args)


@needs_pyverbs
@pytest.mark.parametrize("length", [0, -1, 2**32])
def test_rdma_wr_rejects_lengths_an_sge_cannot_carry(length):
    with pytest.raises(FabricValueError):
        verbs.build_rdma_write_wr(1, 0x1000, length, 1, 0x2000, 2)


@needs_pyverbs
def test_wr_builders_close_the_sge_they_copy_from(monkeypatch):
    import pyverbs.wr as pwr

    closed: list[int] = []

    class RecordingSGE(pwr.SGE):
        def close(self) -> None:
            closed.append(self.lkey)
            super().close()

    monkeypatch.setattr(pwr, "SGE", RecordingSGE)
    wrs = [
        verbs.build_rdma_write_wr(1, 0x1000, 8, 11, 0x2000, 2),
        verbs.build_rdma_read_wr(2, 0x1000, 8, 12, 0x2000, 2),
        verbs.build_cas_wr(3, 0x1000, 13, 0x2000, 2, 0, 1),
        verbs.build_faa_wr(4, 0x1000, 14, 0x2000, 2, 1),
    ]
    for wr in wrs:
        wr.close()
    assert closed == [11, 12, 13, 14]


# ---------------------------------------------------------------------------
# WR reuse
# ---------------------------------------------------------------------------


class FakeWr:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_wr_cache_reuses_a_wr_for_the_same_sge():
    cache = verbs.WrCache(capacity=4)
    built: list[FakeWr] = []

    def build() -> FakeWr:
        built.append(FakeWr("a"))
        return built[-1]

    first = cache.get((0, 0x1000, 8, 1), build)
    assert cache.get((0, 0x1000, 8, 1), build) is first
    assert len(built) == 1


def test_wr_cache_closes_the_least_recently_used_wr_when_full_and_all_on_close():
    cache = verbs.WrCache(capacity=2)
    a = cache.get((0, 1, 8, 1), lambda: FakeWr("a"))
    b = cache.get((0, 2, 8, 1), lambda: FakeWr("b"))
    cache.get((0, 1, 8, 1), lambda: FakeWr("a2"))  # touch a: b is now the oldest
    c = cache.get((0, 3, 8, 1), lambda: FakeWr("c"))
    assert (a.closed, b.closed, c.closed) == (0, 1, 0)
    cache.close()
    assert (a.closed, b.closed, c.closed) == (1, 1, 1)
    assert len(cache) == 0


# ---------------------------------------------------------------------------
# Completion errors -> typed failures
# ---------------------------------------------------------------------------


def state(value: str):
    return lambda: value


@pytest.mark.parametrize("status", [WC.REM_ACCESS_ERR, WC.REM_INV_REQ_ERR, WC.REM_INV_RD_REQ_ERR])
def test_remote_access_error_on_a_revoked_lease_is_revoked(status):
    err = verbs.map_completion_error(status, "write", state("revoked"), lease_id="n-1")
    assert type(err) is Revoked
    assert err.code == -6
    assert "n-1" in str(err) and WC.NAMES[status] in str(err)


@pytest.mark.parametrize("lease_state", ["expired", "freed", "unknown"])
def test_remote_access_error_on_a_lease_that_is_gone_is_lease_expired(lease_state):
    err = verbs.map_completion_error(WC.REM_ACCESS_ERR, "read_into", state(lease_state))
    assert type(err) is LeaseExpired
    assert err.code == -2
    assert lease_state in str(err)


def test_remote_access_error_on_a_live_lease_is_disconnected():
    err = verbs.map_completion_error(WC.REM_ACCESS_ERR, "write", state("active"))
    assert type(err) is Disconnected
    assert "reports the lease active" in str(err)


def test_remote_access_error_when_the_node_cannot_be_asked_is_disconnected():
    def unreachable() -> str:
        raise Disconnected("control channel closed by the peer")

    err = verbs.map_completion_error(WC.REM_ACCESS_ERR, "write", unreachable)
    assert type(err) is Disconnected
    assert "control channel closed" in str(err)


@pytest.mark.parametrize(
    "status",
    [WC.RETRY_EXC_ERR, WC.RNR_RETRY_EXC_ERR, WC.WR_FLUSH_ERR, WC.RESP_TIMEOUT_ERR, WC.FATAL_ERR, WC.LOC_PROT_ERR],
)
def test_transport_and_local_errors_are_disconnected_without_asking_the_node(status):
    asked: list[int] = []

    def lease_state() -> str:
        asked.append(1)
        return "revoked"

    err = verbs.map_completion_error(status, "cas64", lease_state, vendor_err=0x81)
    assert type(err) is Disconnected
    assert err.code == -1
    assert WC.NAMES[status] in str(err) and "0x81" in str(err)
    assert asked == []


def test_remote_operation_error_on_an_atomic_is_unsupported_and_on_a_write_is_disconnected():
    assert type(verbs.map_completion_error(WC.REM_OP_ERR, "faa64", state("active"))) is Unsupported
    assert type(verbs.map_completion_error(WC.REM_OP_ERR, "write", state("active"))) is Disconnected


def test_unknown_status_still_maps_to_a_typed_failure():
    err = verbs.map_completion_error(99, "write", state("active"))
    assert type(err) is Disconnected and "status 99" in str(err)


# ---------------------------------------------------------------------------
# Completion polling
# ---------------------------------------------------------------------------


@dataclass
class FakeWc:
    wr_id: int
    status: int = 0
    vendor_err: int = 0


class FakeCq:
    def __init__(self, after: int, wc: FakeWc | None) -> None:
        self.after = after
        self.wc = wc
        self.polls = 0

    def poll(self, num_entries: int = 1) -> tuple[int, list[FakeWc]]:
        self.polls += 1
        if self.wc is not None and self.polls > self.after:
            return 1, [self.wc]
        return 0, []


def test_poll_completion_returns_the_completion_of_the_posted_request():
    cq = FakeCq(after=5000, wc=FakeWc(wr_id=7))
    assert verbs.poll_completion(cq, 7, timeout=5.0, spin=10).wr_id == 7
    assert cq.polls == 5001


def test_poll_completion_times_out_as_disconnected():
    cq = FakeCq(after=0, wc=None)
    with pytest.raises(Disconnected, match=r"no completion for work request 3 within 0\.050s"):
        verbs.poll_completion(cq, 3, timeout=0.05, spin=10)


def test_poll_completion_refuses_a_completion_for_another_request():
    with pytest.raises(Disconnected, match="completion for work request 8 while waiting for 9"):
        verbs.poll_completion(FakeCq(after=0, wc=FakeWc(wr_id=8)), 9, timeout=1.0)


# ---------------------------------------------------------------------------
# Buffer handling
# ---------------------------------------------------------------------------


def test_byte_view_flattens_typed_buffers_and_refuses_what_rdma_cannot_take():
    import numpy as np

    arr = np.arange(4, dtype=np.uint32)
    mv = verbs.byte_view(arr, writable=True)
    assert (mv.format, mv.nbytes) == ("B", 16)
    assert verbs.buffer_address(mv) == arr.ctypes.data
    with pytest.raises(FabricValueError, match="writable"):
        verbs.byte_view(b"abc", writable=True)
    with pytest.raises(FabricValueError, match="contiguous"):
        verbs.byte_view(np.arange(8)[::2], writable=False)
    with pytest.raises(FabricValueError, match="contiguous"):
        verbs.byte_view(np.asfortranarray(np.zeros((3, 4))), writable=False)
    with pytest.raises(FabricValueError, match="bytes-like"):
        verbs.byte_view(12, writable=False)


# ---------------------------------------------------------------------------
# Queue-pair attributes, with real pyverbs objects (no device needed to build them)
# ---------------------------------------------------------------------------


@needs_pyverbs
def test_rc_qp_attr_for_init_allows_remote_read_write_and_atomics():
    attr = verbs.build_rc_qp_attr(ib_port=2)
    assert attr.port_num == 2
    assert attr.qp_access_flags == 1 | 2 | 4 | 8


@needs_pyverbs
def test_rc_init_attr_is_rc_with_selective_signalling_and_one_sge():
    init = verbs.build_rc_init_attr(None, max_send_wr=64)
    assert int(init.qp_type) == 2  # IBV_QPT_RC
    assert init.sq_sig_all == 0
    cap = init.cap
    assert (cap.max_send_wr, cap.max_recv_wr, cap.max_send_sge, cap.max_recv_sge) == (64, 1, 1, 1)


REMOTE_GID = "fe80:0000:0000:0000:0a0b:0c0d:0e0f:1011"


@needs_pyverbs
def test_rc_connect_attr_carries_the_peer_psns_mtu_and_a_grh_to_its_gid():
    attr = verbs.build_rc_qp_attr(1)
    remote = verbs.Endpoint(qpn=0xABCDE, psn=0x123456, lid=7, gid=REMOTE_GID, mtu=5)
    verbs.configure_rc_connect(attr, local_psn=0x654321, local_mtu=3, remote=remote, ib_port=1, gid_index=3,
                               is_roce=True)
    assert attr.dest_qp_num == 0xABCDE
    assert (attr.rq_psn, attr.sq_psn) == (0x123456, 0x654321)
    assert attr.path_mtu == 3  # the smaller of the two
    assert (attr.max_rd_atomic, attr.max_dest_rd_atomic) == (1, 1)
    assert (attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry) == (12, 14, 7, 7)
    ah = attr.ah_attr
    assert (ah.is_global, ah.port_num, ah.dlid, ah.sgid_index) == (1, 1, 7, 3)
    assert str(ah.dgid) == REMOTE_GID


@needs_pyverbs
def test_rc_connect_attr_without_a_peer_gid_uses_the_lid_on_ib_and_refuses_roce():
    remote = verbs.Endpoint(qpn=1, psn=2, lid=9, gid="0000:0000:0000:0000:0000:0000:0000:0000", mtu=3)
    attr = verbs.build_rc_qp_attr(1)
    verbs.configure_rc_connect(attr, local_psn=0, local_mtu=3, remote=remote, ib_port=1, gid_index=0, is_roce=False)
    assert (attr.ah_attr.is_global, attr.ah_attr.dlid) == (0, 9)
    with pytest.raises(Unsupported, match="RoCE needs a GID"):
        verbs.configure_rc_connect(verbs.build_rc_qp_attr(1), local_psn=0, local_mtu=3, remote=remote, ib_port=1,
                                   gid_index=0, is_roce=True)
