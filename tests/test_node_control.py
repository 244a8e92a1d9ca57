"""The memory node's control channel over real TCP, with a fake registrar (no device needed).

The wire codec, the handshake, capabilities and the node's lease service
(alloc, attach, renew, free, revoke, status, share, reap) are exercised end
to end in this process; only span registration is replaced by a registrar
that records what would be registered. The node in a subprocess, attacked,
is ``test_node_attacks.py``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grafos_fabric.drivers.node import auth
from grafos_fabric.drivers.node import client as C
from grafos_fabric.drivers.node import wire as verbs
from grafos_fabric.drivers.node.registrar import RegisteredSpan, RegistrarSession
from grafos_fabric.drivers.node.server import NodeServer
from grafos_fabric.errors import (
    AccessDenied,
    AuthFailed,
    CapabilityDenied,
    CapacityExceeded,
    Corrupted,
    Disconnected,
    FabricValueError,
    Fenced,
    LeaseExpired,
    LimitExceeded,
    QuotaExceeded,
    Revoked,
    Unsupported,
    VersionMismatch,
)
from grafos_fabric.lease import Lease, ManualClock

try:
    from _realtime import refused_port
except ImportError:  # tests/ imported as a package
    from tests._realtime import refused_port

SECRET = bytes(range(32))
LID = "0123456789abcdef0123456789abcdef"
CAP = verbs.Cap(generation=1, rights=31, expiry_ns=2**63, mac=b"m" * 32)

# ---------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------

REQUESTS = [
    verbs.Hello(version=2, tenant="default", nonce=b"n" * 32, client="c"),
    verbs.Auth(proof=b"p" * 32),
    verbs.Connect(params={"qpn": 0xABCDEF, "psn": 7, "lid": 3, "gid": "fe80::1", "mtu": 3}),
    verbs.Alloc(nbytes=4096, ttl=2.5),
    verbs.Attach(lease_id=LID, cap=CAP),
    verbs.Renew(lease_id=LID, ttl=30.0, cap=CAP),
    verbs.Free(lease_id=LID, cap=CAP),
    verbs.Revoke(lease_id=LID, cap=CAP),
    verbs.Status(lease_id=LID, cap=CAP),
    verbs.Share(lease_id=LID, cap=CAP, rights=3),
    verbs.AdminList(),
    verbs.AdminRevoke(lease_id=LID),
    verbs.AdminMetrics(),
]
REPLIES = [
    verbs.Challenge(version=2, node="n", driver="verbs", nonce=b"n" * 32, proof=b"p" * 32),
    verbs.Welcome(node="n", driver="verbs", info={"probe_addr": 0x7F00_0000_0000, "probe_rkey": 0xFFFFFFFF},
                  max_request=65536, idle_timeout=300.0, max_ttl=3600.0),
    verbs.Connected(params={"qpn": 1, "psn": 2, "lid": 3, "gid": "", "mtu": 5}),
    verbs.Granted(lease_id=LID, generation=1, nbytes=100, ttl=1.0, remaining=0.5, writable=True,
                  access={"addr": 2**64 - 8, "rkey": 9}, cap=CAP),
    verbs.Renewed(lease_id=LID, remaining=1.0, cap=CAP),
    verbs.Done(lease_id=LID),
    verbs.Shared(lease_id=LID, cap=CAP),
    verbs.LeaseStatus(lease_id=LID, state="revoked", generation=4, remaining=0.0),
    verbs.Listing(node="n", driver="d", pool_bytes=1, free_bytes=1, quarantined_bytes=0, connections=1,
                  tenants=[verbs.TenantRow(tenant="t", leases=1, bytes=2, connections=3, quota_bytes=4,
                                           max_leases=5)],
                  leases=[verbs.LeaseRow(lease_id=LID, tenant="t", generation=1, nbytes=1, offset=0,
                                         remaining=1.0, holders=1)]),
    verbs.Metrics(text="# nothing"),
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
        (raw({"t": "renew", "lease_id": "x" * 65, "ttl": 1.0, "cap": [1, 1, 1, b"m" * 32]}), "lease id too long"),
        (raw({"t": "free", "lease_id": "", "cap": [1, 1, 1, b"m" * 32]}), "empty lease id"),
        (raw({"t": "free", "lease_id": LID.upper(), "cap": [1, 1, 1, b"m" * 32]}), "lease id not lower hex"),
        (raw({"t": "free", "lease_id": LID, "cap": [1, 1, 1, b"m" * 31]}), "capability MAC too short"),
        (raw({"t": "free", "lease_id": LID}), "no capability"),
        (raw({"t": "attach", "lease_id": LID, "cap": [1, 256, 1, b"m" * 32]}), "rights over 8 bits"),
        (raw({"t": "hello", "version": 2, "tenant": "t", "nonce": b"n" * 31}), "short nonce"),
        (raw({"t": "hello", "version": 2, "tenant": "a b", "nonce": b"n" * 32}), "tenant with a space"),
        (raw({"t": "auth", "proof": "p" * 32}), "proof as text"),
        (raw({"t": "connect", "params": {"Bad-Key": 1}}), "connect key outside [a-z0-9_]"),
        (raw({"t": "connect", "params": {f"k{i}": i for i in range(33)}}), "too many connect params"),
        (raw({"t": "connect", "params": {"k": [1]}}), "connect value of another type"),
    ],
)
def test_malformed_requests_raise_corrupted(body, why):
    with pytest.raises(Corrupted):
        verbs.decode_request(body)


def test_a_lease_status_with_an_unknown_state_is_corrupted():
    body = raw({"t": "lease_status", "lease_id": LID, "state": "zombie", "generation": 1, "remaining": 0.0})
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
    st.sampled_from(["hello", "auth", "connect", "alloc", "attach", "renew", "free", "revoke", "status", "share",
                     "admin_list", "admin_revoke", "granted", "x"]),
    st.dictionaries(
        st.sampled_from(["version", "nbytes", "ttl", "lease_id", "generation", "tenant", "nonce", "proof", "cap",
                         "params", "rights"]),
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
        verbs.encode_frame(verbs.Metrics(text="x" * 100), limit=64)


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


@pytest.mark.parametrize(
    "exc",
    [Corrupted("x"), VersionMismatch("y"), FabricValueError("z"), AuthFailed("a"), CapabilityDenied("c"),
     AccessDenied("d"), QuotaExceeded("q"), LimitExceeded("l")],
)
def test_value_errors_cross_the_wire_as_their_own_type(exc):
    with pytest.raises(type(exc)) as info:
        verbs.raise_for_reply(verbs.error_reply(exc))
    assert type(info.value) is type(exc)


def test_an_unexpected_server_exception_becomes_a_typed_failure():
    reply = verbs.error_reply(KeyError("secret detail"))
    assert "internal error (KeyError)" in reply.message and "secret detail" not in reply.message
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


@pytest.mark.parametrize("length", [0, verbs.MAX_REPLY + 1, 0xFFFFFFFF])
def test_a_frame_length_out_of_range_is_corrupted(pair, length):
    a, b = pair
    a.sendall(struct.pack(">I", length))
    with pytest.raises(Corrupted, match="out of range"):
        C.read_frame(b)


def test_a_peer_closing_mid_frame_is_disconnected(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 10) + b"abc")
    a.close()
    with pytest.raises(Disconnected, match="mid-frame"):
        C.read_frame(b)


def test_a_silent_peer_is_disconnected_after_the_timeout(pair):
    _, b = pair
    b.settimeout(0.05)
    with pytest.raises(Disconnected, match="timed out"):
        C.read_frame(b)


# ---------------------------------------------------------------------------
# The node's lease service over TCP (in this process, fake registrar)
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class FakeSpan:
    offset: int
    nbytes: int
    addr: int
    rkey: int

    def access(self, writable: bool) -> dict[str, int | bool]:
        return {"addr": self.addr, "rkey": self.rkey, "writable": writable}


@dataclass(eq=False)
class FakeSession:
    peer: str
    connects: list[dict[str, object]] = field(default_factory=list)
    closed: bool = False

    def connect(self, params: dict[str, object]) -> dict[str, object]:
        if "qpn" not in params:
            raise Unsupported("this fake data plane wants a qpn")
        self.connects.append(params)
        return {"qpn": 0x77}

    def close(self) -> None:
        self.closed = True


class FakeRegistrar:
    """Records registrations; hands out addr = base + offset and a fresh rkey each time."""

    name = "fake"
    pool_size = 1 << 20

    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []
        self.deregistered: list[FakeSpan] = []
        self.fenced: list[tuple[int, int]] = []  # (rkey, number of holders)
        self.live: dict[int, FakeSpan] = {}
        self.sessions: list[FakeSession] = []
        self.closed = False
        self._rkey = 100

    def node_info(self) -> dict[str, object]:
        return {"probe_addr": 0, "probe_rkey": 0}

    def register(self, offset: int, nbytes: int) -> FakeSpan:
        self._rkey += 1
        span = FakeSpan(offset, nbytes, addr=0x7F00_0000_0000 + offset, rkey=self._rkey)
        self.registered.append((offset, nbytes))
        self.live[span.rkey] = span
        return span

    def fence(self, span: RegisteredSpan, holders: list[RegistrarSession]) -> None:
        assert isinstance(span, FakeSpan) and span.rkey in self.live
        self.fenced.append((span.rkey, len(holders)))

    def deregister(self, span: RegisteredSpan) -> None:
        assert isinstance(span, FakeSpan)
        assert self.live.pop(span.rkey) is span, "deregistered twice"
        self.deregistered.append(span)

    def open_session(self, peer: str) -> FakeSession:
        s = FakeSession(peer)
        self.sessions.append(s)
        return s

    def close(self) -> None:
        assert not self.live, "the table retires every lease before the registrar closes"
        self.closed = True


@dataclass
class Node:
    node: NodeServer
    clock: ManualClock
    registrar: FakeRegistrar

    def client(self, tenant: str = "default", secret: bytes = SECRET) -> C.ControlClient:
        return C.ControlClient("127.0.0.1", self.node.port, tenant=tenant, key=auth.tenant_key(secret, tenant),
                               timeout=5.0)

    def wait_reaped(self, rkey: int) -> None:
        deadline = time.monotonic() + 10.0
        while rkey in self.registrar.live:
            assert time.monotonic() < deadline, "the reaper did not deregister the expired lease"
            time.sleep(0.005)


@pytest.fixture
def node() -> Iterator[Node]:
    clock = ManualClock()
    registrar = FakeRegistrar()
    limits = auth.NodeLimits(max_ttl=600.0)
    mn = NodeServer(registrar, auth.load_policy(SECRET, None, limits), port=0, clock=clock,
                    reap_interval=0.01).start()
    yield Node(mn, clock, registrar)
    mn.close()
    assert registrar.closed


def alloc(c: C.ControlClient, nbytes: int = 64, ttl: float = 60.0) -> verbs.Granted:
    g: verbs.Granted = c.call(verbs.Alloc(nbytes=nbytes, ttl=ttl), verbs.Granted)
    return g


def status(c: C.ControlClient, g: verbs.Granted) -> verbs.LeaseStatus:
    s: verbs.LeaseStatus = c.call(verbs.Status(lease_id=g.lease_id, cap=g.cap), verbs.LeaseStatus)
    return s


def test_alloc_returns_the_registered_access_and_an_owner_capability(node):
    c = node.client()
    g = alloc(c, 100, 5.0)
    assert node.registrar.registered == [(0, 4096)]
    span = node.registrar.live[g.access["rkey"]]
    assert (g.access["addr"], g.nbytes, g.ttl, g.remaining, g.writable) == (span.addr, 100, 5.0, 5.0, True)
    assert g.cap.rights == auth.OWNER and g.cap.generation == g.generation
    assert status(c, g) == verbs.LeaseStatus(lease_id=g.lease_id, state="active", generation=1, remaining=5.0)
    c.close()


def test_welcome_carries_the_registrar_info_and_the_limits(node):
    c = node.client()
    assert c.node == node.node.node_tag and c.driver == "fake"
    assert c.welcome.info == {"probe_addr": 0, "probe_rkey": 0}
    assert (c.welcome.max_ttl, c.welcome.max_request) == (600.0, 1 << 16)
    c.close()


def test_a_lease_past_its_deadline_is_fenced_deregistered_by_the_reaper_and_reported_expired(node):
    c = node.client()
    g = alloc(c, 8192, 2.0)
    rkey = g.access["rkey"]
    node.clock.advance(1.999)
    time.sleep(0.05)
    assert rkey in node.registrar.live
    node.clock.advance(0.001)
    node.wait_reaped(rkey)
    assert [s.rkey for s in node.registrar.deregistered] == [rkey]
    assert node.registrar.fenced == [(rkey, 1)]  # the allocating session was a holder
    assert status(c, g).state == "expired"
    with pytest.raises((LeaseExpired, CapabilityDenied)):
        c.call(verbs.Renew(lease_id=g.lease_id, ttl=5.0, cap=g.cap), verbs.Renewed)
    with pytest.raises((LeaseExpired, CapabilityDenied)):
        c.call(verbs.Attach(lease_id=g.lease_id, cap=g.cap), verbs.Granted)
    c.close()


def test_renew_moves_the_node_deadline_and_returns_a_fresh_capability(node):
    c = node.client()
    g = alloc(c, 1, 2.0)
    node.clock.advance(1.5)
    r = c.call(verbs.Renew(lease_id=g.lease_id, ttl=10.0, cap=g.cap), verbs.Renewed)
    assert r.remaining == 10.0 and r.cap != g.cap and r.cap.rights == g.cap.rights
    node.clock.advance(9.0)
    time.sleep(0.05)
    assert status(c, g).state == "active"
    with pytest.raises(CapabilityDenied):  # the old capability expired with the old deadline
        c.call(verbs.Renew(lease_id=g.lease_id, ttl=10.0, cap=g.cap), verbs.Renewed)
    c.call(verbs.Renew(lease_id=g.lease_id, ttl=10.0, cap=r.cap), verbs.Renewed)
    c.close()


def test_no_lease_or_renewal_runs_past_the_node_max_ttl(node):
    c = node.client()
    g = alloc(c, 1, 10 * 365 * 24 * 3600.0)
    assert g.remaining == 600.0
    r = c.call(verbs.Renew(lease_id=g.lease_id, ttl=10 * 365 * 24 * 3600.0, cap=g.cap), verbs.Renewed)
    assert r.remaining == 600.0
    c.close()


def test_revoke_stops_access_now_and_later_calls_say_revoked(node):
    c = node.client()
    g = alloc(c)
    other = node.client()
    other.call(verbs.Revoke(lease_id=g.lease_id, cap=g.cap), verbs.Done)  # same tenant, holds the capability
    assert g.access["rkey"] not in node.registrar.live
    assert status(c, g).state == "revoked"
    with pytest.raises(Revoked):
        c.call(verbs.Renew(lease_id=g.lease_id, ttl=5.0, cap=g.cap), verbs.Renewed)
    with pytest.raises(Revoked):
        c.call(verbs.Attach(lease_id=g.lease_id, cap=g.cap), verbs.Granted)
    other.call(verbs.Revoke(lease_id=g.lease_id, cap=g.cap), verbs.Done)  # idempotent
    c.close()
    other.close()


def test_free_is_idempotent_and_returns_the_memory(node):
    c = node.client()
    g = alloc(c, 1 << 20)
    with pytest.raises(CapacityExceeded):
        alloc(c, 1)
    c.call(verbs.Free(lease_id=g.lease_id, cap=g.cap), verbs.Done)
    c.call(verbs.Free(lease_id=g.lease_id, cap=g.cap), verbs.Done)
    assert status(c, g).state == "freed"
    assert len(node.registrar.deregistered) == 1
    alloc(c, 1)
    c.close()


def test_attach_with_the_capability_gets_the_same_span_and_becomes_a_holder(node):
    c = node.client()
    g = alloc(c)
    other = node.client()
    a = other.call(verbs.Attach(lease_id=g.lease_id, cap=g.cap), verbs.Granted)
    assert (a.access, a.nbytes, a.generation) == (g.access, g.nbytes, g.generation)
    c.call(verbs.Revoke(lease_id=g.lease_id, cap=g.cap), verbs.Done)
    assert node.registrar.fenced == [(g.access["rkey"], 2)]
    c.close()
    other.close()


def test_a_shared_capability_has_only_the_rights_asked_for(node):
    c = node.client()
    g = alloc(c)
    ro = c.call(verbs.Share(lease_id=g.lease_id, cap=g.cap, rights=auth.READ_ONLY), verbs.Shared).cap
    consumer = node.client()
    a = consumer.call(verbs.Attach(lease_id=g.lease_id, cap=ro), verbs.Granted)
    assert a.writable is False and a.access["writable"] is False
    for req in (verbs.Renew(lease_id=g.lease_id, ttl=5.0, cap=ro), verbs.Revoke(lease_id=g.lease_id, cap=ro),
                verbs.Free(lease_id=g.lease_id, cap=ro),
                verbs.Share(lease_id=g.lease_id, cap=ro, rights=auth.READ_ONLY)):
        with pytest.raises(CapabilityDenied):
            consumer.call(req, verbs.Done)
    escalate = verbs.Cap(ro.generation, auth.OWNER, ro.expiry_ns, ro.mac)
    with pytest.raises(CapabilityDenied):
        consumer.call(verbs.Revoke(lease_id=g.lease_id, cap=escalate), verbs.Done)
    assert status(consumer, g).state == "active"
    c.close()
    consumer.close()


def test_connect_goes_to_the_session_of_this_connection(node):
    c = node.client()
    assert c.call(verbs.Connect(params={"qpn": 5}), verbs.Connected).params == {"qpn": 0x77}
    with pytest.raises(Unsupported, match="wants a qpn"):
        c.call(verbs.Connect(params={}), verbs.Connected)
    session = node.registrar.sessions[-1]
    assert session.connects == [{"qpn": 5}]
    c.close()
    deadline = time.monotonic() + 10
    while not session.closed:
        assert time.monotonic() < deadline, "the session was not closed with its connection"
        time.sleep(0.01)


def raw_conn(node: Node) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.node.port), timeout=5.0)


def reply_of(s: socket.socket) -> verbs.Reply:
    return verbs.decode_reply(C.read_frame(s))


def test_a_request_before_the_handshake_is_refused_as_auth_failed_and_the_node_hangs_up(node):
    s = raw_conn(node)
    s.sendall(verbs.encode_frame(verbs.Status(lease_id=LID, cap=CAP)))
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply) and r.kind == "AuthFailed" and "hello" in r.message
    assert s.recv(1) == b""
    s.close()


def test_a_hello_with_another_protocol_version_is_a_version_mismatch(node):
    s = raw_conn(node)
    s.sendall(verbs.encode_frame(verbs.Hello(version=verbs.PROTOCOL_VERSION + 1, tenant="default",
                                             nonce=b"n" * 32)))
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply)
    with pytest.raises(VersionMismatch):
        verbs.raise_for_reply(r)
    s.close()


def handshake(s: socket.socket, tenant: str = "default", secret: bytes = SECRET) -> verbs.Welcome:
    nonce = os.urandom(32)
    s.sendall(verbs.encode_frame(verbs.Hello(version=verbs.PROTOCOL_VERSION, tenant=tenant, nonce=nonce)))
    ch = reply_of(s)
    assert isinstance(ch, verbs.Challenge)
    key = auth.tenant_key(secret, tenant)
    s.sendall(verbs.encode_frame(verbs.Auth(proof=auth.proof(key, b"client", tenant, ch.nonce, nonce))))
    w = reply_of(s)
    assert isinstance(w, verbs.Welcome), w
    return w


def test_a_malformed_body_after_the_handshake_gets_corrupted_and_the_node_hangs_up(node):
    s = raw_conn(node)
    handshake(s)
    s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply) and r.kind == "Corrupted"
    assert s.recv(1) == b""
    s.close()
    c = node.client()  # the node serves the others
    assert status(c, alloc(c)).state == "active"
    c.close()


def test_an_oversized_frame_gets_limit_exceeded_then_the_node_hangs_up(node):
    s = raw_conn(node)
    s.sendall(struct.pack(">I", 0xFFFFFFFF))
    r = reply_of(s)
    assert isinstance(r, verbs.ErrorReply) and r.kind == "LimitExceeded"
    with pytest.raises(LimitExceeded, match="at most 65536"):
        verbs.raise_for_reply(r)
    assert s.recv(1) == b""
    s.close()


def test_the_node_survives_a_client_that_vanishes_mid_frame(node):
    s = raw_conn(node)
    s.sendall(struct.pack(">I", 100) + b"partial")
    s.close()
    c = node.client()
    assert status(c, alloc(c)).state == "active"
    c.close()


def test_the_control_client_refuses_a_reply_of_the_wrong_type(node):
    c = node.client()
    g = alloc(c)
    with pytest.raises(Corrupted, match="expected Granted"):
        c.call(verbs.Status(lease_id=g.lease_id, cap=g.cap), verbs.Granted)
    c.close()


def test_an_unreachable_node_is_disconnected():
    with refused_port() as port:  # held: no other process can start listening there meanwhile
        with pytest.raises(Disconnected, match="unreachable"):
            C.ControlClient("127.0.0.1", port, tenant="default", key=auth.tenant_key(SECRET, "default"), timeout=1.0)


def test_a_node_bound_beyond_loopback_needs_allow_remote():
    with pytest.raises(FabricValueError, match="allow_remote"):
        NodeServer(FakeRegistrar(), auth.load_policy(SECRET), host="0.0.0.0", port=0)


def test_admin_requests_need_the_admin_key_and_the_admin_holds_no_leases(node):
    c = node.client()
    g = alloc(c)
    with pytest.raises(AccessDenied, match="admin"):
        c.call(verbs.AdminList(), verbs.Listing)
    admin = node.client(auth.ADMIN)
    listing = admin.call(verbs.AdminList(), verbs.Listing)
    assert [row.lease_id for row in listing.leases] == [g.lease_id]
    assert [(t.tenant, t.leases, t.bytes) for t in listing.tenants] == [("default", 1, 4096)]
    with pytest.raises(AccessDenied, match="no leases"):
        admin.call(verbs.Alloc(nbytes=1, ttl=1.0), verbs.Granted)
    admin.call(verbs.AdminRevoke(lease_id=g.lease_id), verbs.Done)
    assert status(c, g).state == "revoked"
    c.close()
    admin.close()


# ---------------------------------------------------------------------------
# A client Lease whose state lives on the node (RemoteLeaseCell)
# ---------------------------------------------------------------------------


def remote_lease(node: Node, ttl: float = 10.0) -> tuple[Lease, C.RemoteLeaseCell, C.NodeChannel]:
    ch = C.NodeChannel("127.0.0.1", node.node.port, tenant="default", key=auth.tenant_key(SECRET, "default"),
                       timeout=5.0)
    client_clock = ManualClock(start=50.0)
    sent = client_clock.now_ns()
    g = ch.call(verbs.Alloc(nbytes=64, ttl=ttl), verbs.Granted)
    cell = C.RemoteLeaseCell(ch, g.lease_id, g.cap, sent + int(g.remaining * 1e9), client_clock)
    lease = Lease(g.lease_id, ttl=g.ttl, generation=g.generation, cell=cell, clock=client_clock)
    return lease, cell, ch


def test_lease_renew_renews_on_the_node(node):
    lease, cell, ch = remote_lease(node, ttl=2.0)
    node.clock.advance(1.0)
    lease.renew(20.0)
    assert ch.call(verbs.Status(lease_id=lease.id, cap=cell.cap), verbs.LeaseStatus).remaining == pytest.approx(20.0)
    assert lease.remaining() == pytest.approx(20.0)
    ch.close()


def test_lease_revoke_revokes_on_the_node_and_fails_closed_locally(node):
    lease, _cell, ch = remote_lease(node)
    lease.revoke()
    assert ch.lease_state(lease.id) == "revoked"
    with pytest.raises(Revoked):
        lease.check()
    ch.close()


def test_renewing_a_lease_the_node_expired_fails_and_marks_it_expired_locally(node):
    lease, _cell, ch = remote_lease(node, ttl=1.0)
    node.clock.advance(2.0)
    assert lease.live  # the client clock has not moved: only the node knows
    with pytest.raises((LeaseExpired, CapabilityDenied)):
        lease.renew()
    ch.close()


@pytest.mark.parametrize(("node_state", "exc"), [("revoked", Revoked), ("freed", LeaseExpired)])
def test_refresh_brings_the_node_state_into_the_local_lease(node, node_state, exc):
    lease, cell, ch = remote_lease(node)
    other = node.client()
    req = (verbs.Revoke(lease_id=lease.id, cap=cell.cap) if node_state == "revoked"
           else verbs.Free(lease_id=lease.id, cap=cell.cap))
    other.call(req, verbs.Done)
    lease.check()  # still live in the cache
    assert cell.refresh() == node_state
    with pytest.raises(exc):
        lease.check()
    ch.close()
    other.close()


def test_a_channel_idle_past_the_node_timeout_reopens_by_itself(node):
    lease, _cell, ch = remote_lease(node)
    epoch = ch.session_epoch
    ch.control.last_used -= 10 * ch.control.welcome.idle_timeout  # as if it sat idle that long
    assert ch.lease_state(lease.id) == "active"
    assert ch.session_epoch == epoch + 1
    ch.close()

