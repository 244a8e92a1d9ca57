"""The memory node's control channel, over real TCP, with a fake registrar (no device needed).

The node's lease service (alloc, attach, renew, free, revoke, status, reap)
and the msgpack codec are exercised end to end; only the MR registration is
replaced by a registrar that records what would be registered.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
from grafos_fabric.drivers import verbs
from hypothesis import given, settings
from hypothesis import strategies as st

from grafos_fabric.errors import (
    CapacityExceeded,
    Corrupted,
    Disconnected,
    FabricValueError,
    Fenced,
    LeaseExpired,
    Revoked,
    Unsupported,
    VersionMismatch,
)
from grafos_fabric.lease import Lease, ManualClock

# ---------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------

REQUESTS = [
    verbs.Hello(version=1, client="c"),
    verbs.Connect(qpn=0xABCDEF, psn=7, lid=3, gid="fe80:0000:0000:0000:0000:0000:0000:0001", mtu=3),
    verbs.Alloc(nbytes=4096, ttl=2.5),
    verbs.Attach(lease_id="n-1", generation=2**64 - 1),
    verbs.Renew(lease_id="n-1", ttl=30.0),
    verbs.Free(lease_id="n-1"),
    verbs.Revoke(lease_id="n-1"),
    verbs.Status(lease_id="n-1"),
]
REPLIES = [
    verbs.HelloOk(version=1, node="n", probe_addr=0x7F00_0000_0000, probe_rkey=0xFFFFFFFF),
    verbs.Connected(qpn=1, psn=2, lid=3, gid="", mtu=5),
    verbs.Granted(lease_id="n-1", generation=1, addr=2**64 - 8, rkey=9, nbytes=100, ttl=1.0, remaining=0.5),
    verbs.Renewed(lease_id="n-1", remaining=1.0),
    verbs.Done(lease_id="n-1"),
    verbs.LeaseStatus(lease_id="n-1", state="revoked", generation=4, remaining=0.0),
    verbs.ErrorReply(code=-2, message="gone"),
]


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_round_trips_through_a_frame(msg):
    frame = verbs.encode_frame(msg)
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert verbs.decode_request(frame[4:]) == msg


@pytest.mark.parametrize("msg", REPLIES, ids=lambda m: type(m).__name__)
def test_every_reply_round_trips_through_a_frame(msg):
    assert verbs.decode_reply(verbs.encode_frame(msg)[4:]) == msg


def raw(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "empty"),
        (b"\xc1", "never-used msgpack byte"),
        (b"\x92\x01\x02", "an array, not a map"),
        (raw({"t": "granted", "lease_id": "x"}), "a reply tag where a request belongs"),
        (raw({"t": "launch_missiles"}), "unknown tag"),
        (raw({"nbytes": 1, "ttl": 1.0}), "no tag"),
        (raw({"t": "alloc", "nbytes": 1, "ttl": 1.0, "extra": 1}), "unknown field"),
        (raw({"t": "alloc", "nbytes": -1, "ttl": 1.0}), "negative size"),
        (raw({"t": "alloc", "nbytes": 0, "ttl": 1.0}), "zero size"),
        (raw({"t": "alloc", "nbytes": 1, "ttl": 0.0}), "zero ttl"),
        (raw({"t": "alloc", "nbytes": "1", "ttl": 1.0}), "size as text"),
        (raw({"t": "renew", "lease_id": "x" * 65, "ttl": 1.0}), "lease id too long"),
        (raw({"t": "free", "lease_id": ""}), "empty lease id"),
        (raw({"t": "connect", "qpn": 1 << 24, "psn": 0, "lid": 0, "gid": "", "mtu": 3}), "QPN over 24 bits"),
        (raw({"t": "connect", "qpn": 1, "psn": 0, "lid": 0, "gid": "", "mtu": 9}), "no such MTU"),
    ],
)
def test_malformed_requests_raise_corrupted(body, why):
    with pytest.raises(Corrupted):
        verbs.decode_request(body)


def test_a_lease_status_with_an_unknown_state_is_corrupted():
    body = raw({"t": "lease_status", "lease_id": "n-1", "state": "zombie", "generation": 1, "remaining": 0.0})
    with pytest.raises(Corrupted):
        verbs.decode_reply(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_decoding_arbitrary_bytes_gives_a_request_or_corrupted_never_anything_else(body):
    try:
        msg = verbs.decode_request(body)
    except Corrupted:
        return
    assert isinstance(msg, verbs.Request)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["hello", "connect", "alloc", "attach", "renew", "free", "revoke", "status", "granted", "x"]),
    st.dictionaries(
        st.sampled_from(["version", "nbytes", "ttl", "lease_id", "generation", "qpn", "psn", "lid", "gid", "mtu"]),
        st.one_of(
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.floats(),
            st.text(max_size=8),
            st.none(),
            st.binary(max_size=4),
        ),
    ),
)
def test_decoding_arbitrary_tagged_maps_gives_a_request_or_corrupted(tag, fields):
    try:
        msg = verbs.decode_request(raw({"t": tag, **fields}))
    except Corrupted:
        return
    assert isinstance(msg, verbs.Request)


def test_encoding_an_oversized_message_is_refused():
    with pytest.raises(FabricValueError):
        verbs.encode_frame(verbs.Hello(version=1, client="x" * (verbs.MAX_FRAME + 1)))


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (Disconnected("a"), -1),
        (LeaseExpired("b"), -2),
        (Fenced("c"), -3),
        (CapacityExceeded("d"), -4),
        (Unsupported("e"), -5),
        (Revoked("f"), -6),
    ],
)
def test_fabric_errors_cross_the_wire_as_their_own_type(exc, code):
    reply = verbs.error_reply(exc)
    assert reply.code == code
    decoded = verbs.decode_reply(verbs.encode_frame(reply)[4:])
    with pytest.raises(type(exc), match=str(exc)):
        verbs.raise_for_reply(decoded)


@pytest.mark.parametrize("exc", [Corrupted("x"), VersionMismatch("y"), FabricValueError("z")])
def test_value_errors_cross_the_wire_as_their_own_type(exc):
    with pytest.raises(type(exc)) as info:
        verbs.raise_for_reply(verbs.error_reply(exc))
    assert type(info.value) is type(exc)


def test_an_unexpected_server_exception_becomes_a_typed_failure():
    reply = verbs.error_reply(KeyError("bug"))
    assert "internal error: KeyError" in reply.message
    with pytest.raises(Disconnected):
        verbs.raise_for_reply(reply)


# ---------------------------------------------------------------------------
# Framing over sockets
# ---------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("length", [0, verbs.MAX_FRAME + 1, 0xFFFFFFFF])
def test_a_frame_length_out_of_range_is_corrupted(pair, length):
    a, b = pair
    a.sendall(struct.pack(">I", length))
    with pytest.raises(Corrupted, match="out of range"):
        verbs.read_frame(b)


def test_a_peer_closing_mid_frame_is_disconnected(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 10) + b"abc")
    a.close()
    with pytest.raises(Disconnected, match="mid-frame"):
        verbs.read_frame(b)


def test_a_silent_peer_is_disconnected_after_the_timeout(pair):
    _, b = pair
    b.settimeout(0.05)
    with pytest.raises(Disconnected, match="timed out"):
        verbs.read_frame(b)


# ---------------------------------------------------------------------------
# The node's lease service over TCP
# ---------------------------------------------------------------------------


@dataclass
class FakeSpan:
    addr: int
    rkey: int


class FakeRegistrar:
    """Records registrations; hands out addr = base + offset and a fresh rkey each time."""

    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []
        self.deregistered: list[FakeSpan] = []
        self.live: dict[int, FakeSpan] = {}
        self._rkey = 100

    def register(self, offset: int, nbytes: int) -> FakeSpan:
        self._rkey += 1
        span = FakeSpan(addr=0x7F00_0000_0000 + offset, rkey=self._rkey)
        self.registered.append((offset, nbytes))
        self.live[span.rkey] = span
        return span

    def deregister(self, span: verbs.RegisteredSpan) -> None:
        assert isinstance(span, FakeSpan)
        assert self.live.pop(span.rkey) is span, "deregistered twice"
        self.deregistered.append(span)


@dataclass
class Node:
    node: verbs.MemoryNode
    clock: ManualClock
    registrar: FakeRegistrar

    def client(self) -> verbs.ControlClient:
        return verbs.ControlClient("127.0.0.1", self.node.port, timeout=5.0)

    def wait_reaped(self, rkey: int) -> None:
        deadline = time.monotonic() + 5.0
        while rkey in self.registrar.live:
            assert time.monotonic() < deadline, "the reaper did not deregister the expired lease"
            time.sleep(0.005)


@pytest.fixture
def node() -> Iterator[Node]:
    clock = ManualClock()
    registrar = FakeRegistrar()
    table = verbs.LeaseTable(1 << 20, registrar, clock, align=4096)
    mn = verbs.MemoryNode(table, host="127.0.0.1", port=0, reap_interval=0.01).start()
    yield Node(mn, clock, registrar)
    mn.close()


def test_alloc_returns_the_registered_address_and_rkey(node):
    c = node.client()
    g = c.call(verbs.Alloc(nbytes=100, ttl=5.0), verbs.Granted)
    assert node.registrar.registered == [(0, 4096)]
    span = node.registrar.live[g.rkey]
    assert (g.addr, g.nbytes, g.ttl, g.remaining) == (span.addr, 100, 5.0, 5.0)
    assert c.status(g.lease_id) == verbs.LeaseStatus(lease_id=g.lease_id, state="active", generation=1, remaining=5.0)
    c.close()


def test_hello_reports_the_node_and_no_probe_word_without_a_device(node):
    c = node.client()
    assert c.hello.node == node.node.table.node_tag
    assert (c.hello.probe_addr, c.hello.probe_rkey) == (0, 0)
    c.close()


def test_a_lease_past_its_deadline_is_deregistered_by_the_reaper_and_reported_expired(node):
    c = node.client()
    g = c.call(verbs.Alloc(nbytes=8192, ttl=2.0), verbs.Granted)
    node.clock.advance(1.999)
    time.sleep(0.05)
    assert g.rkey in node.registrar.live
    node.clock.advance(0.001)
    node.wait_reaped(g.rkey)
    assert [s.rkey for s in node.registrar.deregistered] == [g.rkey]
    assert c.status(g.lease_id).state == "expired"
    with pytest.raises(LeaseExpired, match="expired"):
        c.call(verbs.Renew(lease_id=g.lease_id, ttl=5.0), verbs.Renewed)
    with pytest.raises(LeaseExpired):
        c.call(verbs.Attach(lease_id=g.lease_id, generation=g.generation), verbs.Granted)
    c.close()


def test_renew_moves_the_node_deadline(node):
    c = node.client()
    g = c.call(verbs.Alloc(nbytes=1, ttl=2.0), verbs.Granted)
    node.clock.advance(1.5)
    assert c.call(verbs.Renew(lease_id=g.lease_id, ttl=10.0), verbs.Renewed).remaining == 10.0
    node.clock.advance(9.0)
    time.sleep(0.05)
    assert c.status(g.lease_id).state == "active"
    c.close()


def test_revoke_stops_access_now_and_later_calls_say_revoked(node):
    c = node.client()
    g = c.call(verbs.Alloc(nbytes=1, ttl=60.0), verbs.Granted)
    other = node.client()
    other.call(verbs.Revoke(lease_id=g.lease_id), verbs.Done)
    assert g.rkey not in node.registrar.live
    assert c.status(g.lease_id).state == "revoked"
    with pytest.raises(Revoked):
        c.call(verbs.Renew(lease_id=g.lease_id, ttl=5.0), verbs.Renewed)
    with pytest.raises(Revoked):
        c.call(verbs.Attach(lease_id=g.lease_id, generation=g.generation), verbs.Granted)
    other.call(verbs.Revoke(lease_id=g.lease_id), verbs.Done)  # idempotent
    c.close()
    other.close()


def test_free_is_idempotent_and_returns_the_memory(node):
    c = node.client()
    g = c.call(verbs.Alloc(nbytes=(1 << 20), ttl=60.0), verbs.Granted)
    with pytest.raises(CapacityExceeded):
        c.call(verbs.Alloc(nbytes=1, ttl=60.0), verbs.Granted)
    c.call(verbs.Free(lease_id=g.lease_id), verbs.Done)
    c.call(verbs.Free(lease_id=g.lease_id), verbs.Done)
    assert c.status(g.lease_id).state == "freed"
    assert len(node.registrar.deregistered) == 1
    c.call(verbs.Alloc(nbytes=1, ttl=60.0), verbs.Granted)
    c.close()


def test_attach_with_the_right_generation_gets_the_same_region(node):
    c = node.client()
    g = c.call(verbs.Alloc(nbytes=64, ttl=60.0), verbs.Granted)
    a = node.client().call(verbs.Attach(lease_id=g.lease_id, generation=g.generation), verbs.Granted)
    assert (a.addr, a.rkey, a.nbytes) == (g.addr, g.rkey, g.nbytes)
    with pytest.raises(LeaseExpired, match="generation"):
        c.call(verbs.Attach(lease_id=g.lease_id, generation=g.generation + 1), verbs.Granted)
    c.close()


def test_revoking_a_lease_the_node_never_saw_is_lease_expired(node):
    c = node.client()
    with pytest.raises(LeaseExpired, match="unknown"):
        c.call(verbs.Revoke(lease_id="nope-1"), verbs.Done)
    assert c.status("nope-1").state == "unknown"
    c.close()


def test_connect_on_a_node_without_a_device_is_unsupported(node):
    c = node.client()
    with pytest.raises(Unsupported, match="no RDMA device"):
        c.call(verbs.Connect(qpn=1, psn=1, lid=1, gid="", mtu=3), verbs.Connected)
    c.close()


def raw_conn(node: Node) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", node.node.port), timeout=5.0)
    return s


def reply_of(s: socket.socket) -> verbs.Reply:
    return verbs.decode_reply(verbs.read_frame(s))


def test_a_request_before_hello_is_refused_as_corrupted(node):
    s = raw_conn(node)
    s.sendall(verbs.encode_frame(verbs.Status(lease_id="n-1")))
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply) and r.kind == "Corrupted" and "hello" in r.message
    s.close()


def test_a_hello_with_another_protocol_version_is_a_version_mismatch(node):
    s = raw_conn(node)
    s.sendall(verbs.encode_frame(verbs.Hello(version=verbs.PROTOCOL_VERSION + 1)))
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply)
    with pytest.raises(VersionMismatch):
        verbs.raise_for_reply(r)
    s.close()


def test_a_malformed_body_gets_an_error_reply_and_the_connection_keeps_serving(node):
    s = raw_conn(node)
    s.sendall(verbs.encode_frame(verbs.Hello(version=verbs.PROTOCOL_VERSION)))
    assert isinstance(reply_of(s), verbs.HelloOk)
    s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply) and r.kind == "Corrupted"
    s.sendall(verbs.encode_frame(verbs.Status(lease_id="n-1")))
    assert isinstance(reply_of(s), verbs.LeaseStatus)
    s.close()


def test_a_bad_frame_length_gets_an_error_reply_then_the_node_hangs_up(node):
    s = raw_conn(node)
    s.sendall(struct.pack(">I", 0xFFFFFFFF))
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply) and "out of range" in r.message
    assert s.recv(1) == b""
    s.close()


def test_the_node_survives_a_client_that_vanishes_mid_frame(node):
    s = raw_conn(node)
    s.sendall(struct.pack(">I", 100) + b"partial")
    s.close()
    c = node.client()
    assert c.status("n-1").state == "unknown"
    c.close()


def test_the_control_client_refuses_a_reply_of_the_wrong_type(node):
    c = node.client()
    with pytest.raises(Corrupted, match="expected Granted"):
        c.call(verbs.Status(lease_id="x-1"), verbs.Granted)
    c.close()


def test_an_unreachable_node_is_disconnected():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(Disconnected, match="unreachable"):
        verbs.ControlClient("127.0.0.1", port, timeout=1.0)


# ---------------------------------------------------------------------------
# A client Lease whose state lives on the node (RemoteLeaseCell)
# ---------------------------------------------------------------------------


def remote_lease(node: Node, ttl: float = 10.0) -> tuple[Lease, verbs.RemoteLeaseCell, verbs.ControlClient]:
    c = node.client()
    client_clock = ManualClock(start=50.0)
    sent = client_clock.now_ns()
    g = c.call(verbs.Alloc(nbytes=64, ttl=ttl), verbs.Granted)
    cell = verbs.RemoteLeaseCell(c, g.lease_id, sent + int(g.remaining * 1e9), client_clock)
    lease = Lease(g.lease_id, ttl=g.ttl, generation=g.generation, cell=cell, clock=client_clock)
    return lease, cell, c


def test_lease_renew_renews_on_the_node(node):
    lease, _cell, c = remote_lease(node, ttl=2.0)
    node.clock.advance(1.0)
    lease.renew(20.0)
    assert c.status(lease.id).remaining == pytest.approx(20.0)
    assert lease.remaining() == pytest.approx(20.0)
    c.close()


def test_lease_revoke_revokes_on_the_node_and_fails_closed_locally(node):
    lease, _cell, c = remote_lease(node)
    lease.revoke()
    assert c.status(lease.id).state == "revoked"
    with pytest.raises(Revoked):
        lease.check()
    c.close()


def test_renewing_a_lease_the_node_expired_fails_and_marks_it_expired_locally(node):
    lease, _cell, c = remote_lease(node, ttl=1.0)
    node.clock.advance(2.0)
    assert lease.live  # the client clock has not moved: only the node knows
    with pytest.raises(LeaseExpired):
        lease.renew()
    assert lease.expired
    with pytest.raises(LeaseExpired):
        lease.check()
    c.close()


@pytest.mark.parametrize(("node_state", "exc"), [("revoked", Revoked), ("freed", LeaseExpired)])
def test_refresh_brings_the_node_state_into_the_local_lease(node, node_state, exc):
    lease, cell, c = remote_lease(node)
    other = node.client()
    other.call(verbs.Revoke(lease_id=lease.id) if node_state == "revoked" else verbs.Free(lease_id=lease.id),
               verbs.Done)
    lease.check()  # still live in the cache
    assert cell.refresh() == node_state
    with pytest.raises(exc):
        lease.check()
    c.close()
    other.close()
