"""The memory node in a subprocess on 127.0.0.1, attacked as a stranger on the network would.

The node runs ``grafos-fabric serve --driver nodeshm`` (no device needed) with
two tenants and short timeouts. Each attack ends in a typed error for the
offender (or the node hanging up on it) and a node that still serves the
others; every test checks the second half with a well-behaved client.
"""

from __future__ import annotations

import os
import resource
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grafos_fabric.drivers.node import auth
from grafos_fabric.drivers.node import wire as W
from grafos_fabric.drivers.node.client import ControlClient, read_frame
from grafos_fabric.drivers.node.shmfile import NodeShmFabric
from grafos_fabric.errors import (
    AuthFailed,
    CapabilityDenied,
    Disconnected,
    LeaseExpired,
    LimitExceeded,
    QuotaExceeded,
    Revoked,
)

TENANTS = """
[limits]
max_ttl = 3600.0
max_connections = {max_connections}
idle_timeout = 4.0
auth_timeout = 2.0
frame_timeout = 2.0
max_request = 4096
accept_backoff = 0.2

[tenants.alice]
secret_file = "alice.token"
quota_bytes = "64K"
max_leases = 8
max_connections = 6
max_ttl = 30.0

[tenants.bob]
secret_file = "bob.token"
"""


def write_token(path: Path) -> bytes:
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secret.hex().encode())
    os.close(fd)
    return secret


@dataclass
class NodeProc:
    proc: subprocess.Popen[str]
    port: int
    dir: Path
    secrets: dict[str, bytes]

    def fabric(self, tenant: str, secret: bytes | None = None) -> NodeShmFabric:
        return NodeShmFabric("127.0.0.1", self.port, tenant=tenant, secret=secret or self.secrets[tenant],
                             timeout=20.0)

    def control(self, tenant: str, secret: bytes | None = None) -> ControlClient:
        key = auth.tenant_key(secret or self.secrets[tenant], tenant)
        return ControlClient("127.0.0.1", self.port, tenant=tenant, key=key, timeout=20.0)

    def admin(self) -> ControlClient:
        return self.control(auth.ADMIN, self.secrets["node"])

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=20.0)

    def assert_serves(self) -> None:
        """A well-behaved client of each tenant can still authenticate and use a lease."""
        for tenant in ("alice", "bob"):
            with self.fabric(tenant) as f:
                region = f.alloc(64, ttl=10.0)
                region.store64(0, 42)
                assert region.load64(0) == 42
                f.free(region.lease)

    def kill_if_running(self) -> None:
        """Finalizer: a test that failed before its stop() leaves no node process behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_node(tmp: Path, *, nofile: int | None = None, max_connections: int = 256) -> NodeProc:
    tmp.mkdir(parents=True, exist_ok=True)
    found = {"alice": write_token(tmp / "alice.token"), "bob": write_token(tmp / "bob.token")}
    (tmp / "tenants.toml").write_text(TENANTS.format(max_connections=max_connections))
    token = tmp / "node.token"  # created by serve

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = [sys.executable, "-m", "grafos_fabric.tools.serve", "--driver", "nodeshm", "--host", "127.0.0.1",
           "--port", "0", "--pool", "8M", "--token-file", str(token), "--tenants", str(tmp / "tenants.toml"),
           "--metrics", "--log-level", "ERROR"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit_fds)
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60.0)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("serving nodeshm://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"serve did not start: {line!r} {proc.stderr.read()}")
    port = int(line.split()[1].rsplit(":", 1)[1])
    assert token.stat().st_mode & 0o777 == 0o600, "serve creates its token file 0600"
    found["node"] = auth.read_secret(token)
    return NodeProc(proc, port, tmp, found)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = start_node(tmp_path_factory.mktemp("node"))
    yield n
    assert n.stop() == 0


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with no leases on the shared node (fabric.close() detaches, it does not free)."""
    yield
    if "node" in request.fixturenames:
        n: NodeProc = request.getfixturevalue("node")
        with n.admin() as admin:
            for row in admin.call(W.AdminList(), W.Listing).leases:
                admin.call(W.AdminRevoke(lease_id=row.lease_id), W.Done)


def error_of(sock: socket.socket) -> W.ErrorReply:
    reply = W.decode_reply(read_frame(sock))
    assert isinstance(reply, W.ErrorReply), reply
    return reply


def hung_up(sock: socket.socket, timeout: float = 20.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


def test_a_wrong_secret_is_auth_failed_before_any_lease(node):
    with pytest.raises(AuthFailed, match="could not prove") as info:
        node.fabric("alice", secrets.token_bytes(32))
    assert isinstance(info.value, PermissionError)
    with node.admin() as admin:
        assert admin.call(W.AdminList(), W.Listing).leases == []
    node.assert_serves()


def test_an_unknown_tenant_looks_exactly_like_a_wrong_secret(node):
    with pytest.raises(AuthFailed, match="could not prove"):
        node.fabric("mallory", secrets.token_bytes(32))
    with pytest.raises(AuthFailed, match="could not prove"):
        node.fabric("alice", node.secrets["bob"])  # bob's secret is not alice's
    node.assert_serves()


def test_a_client_that_skips_the_proof_of_the_node_still_cannot_authenticate(node):
    """A client that ignores the node's proof and answers with a wrong one gets AuthFailed from the node."""
    s = node.raw()
    nonce = os.urandom(32)
    s.sendall(W.encode_frame(W.Hello(version=W.PROTOCOL_VERSION, tenant="alice", nonce=nonce)))
    ch = W.decode_reply(read_frame(s))
    assert isinstance(ch, W.Challenge)
    s.sendall(W.encode_frame(W.Auth(proof=os.urandom(32))))
    with pytest.raises(AuthFailed, match="authentication failed"):
        W.raise_for_reply(error_of(s))
    assert hung_up(s)
    s.close()
    node.assert_serves()


def test_a_replayed_auth_fails_on_a_new_connection(node):
    key = auth.tenant_key(node.secrets["alice"], "alice")
    nonce = os.urandom(32)
    hello = W.encode_frame(W.Hello(version=W.PROTOCOL_VERSION, tenant="alice", nonce=nonce))
    first = node.raw()
    first.sendall(hello)
    ch = W.decode_reply(read_frame(first))
    assert isinstance(ch, W.Challenge)
    recorded = W.encode_frame(W.Auth(proof=auth.proof(key, b"client", "alice", ch.nonce, nonce)))
    first.sendall(recorded)
    assert isinstance(W.decode_reply(read_frame(first)), W.Welcome)  # the genuine exchange works
    first.close()
    # An eavesdropper replays the same Hello and Auth: the node's nonce is new, the old proof is worthless.
    second = node.raw()
    second.sendall(hello)
    ch2 = W.decode_reply(read_frame(second))
    assert isinstance(ch2, W.Challenge) and ch2.nonce != ch.nonce
    second.sendall(recorded)
    with pytest.raises(AuthFailed):
        W.raise_for_reply(error_of(second))
    second.close()
    node.assert_serves()


def test_the_node_proof_cannot_be_reflected_as_a_client_proof(node):
    """The node's proof over (nonce_c, nonce_n) never serves as a client proof: the labels differ."""
    key = auth.tenant_key(node.secrets["alice"], "alice")
    a, b = os.urandom(32), os.urandom(32)
    assert auth.proof(key, b"node", "alice", a, b) != auth.proof(key, b"client", "alice", a, b)
    s = node.raw()
    s.sendall(W.encode_frame(W.Hello(version=W.PROTOCOL_VERSION, tenant="alice", nonce=a)))
    ch = W.decode_reply(read_frame(s))
    assert isinstance(ch, W.Challenge)
    s.sendall(W.encode_frame(W.Auth(proof=ch.proof)))  # hand the node its own proof back
    with pytest.raises(AuthFailed):
        W.raise_for_reply(error_of(s))
    s.close()


def test_a_token_file_others_can_read_is_refused_on_the_client(node, tmp_path):
    loose = tmp_path / "loose.token"
    loose.write_text(node.secrets["alice"].hex())
    loose.chmod(0o644)
    with pytest.raises(AuthFailed, match="chmod 600"):
        NodeShmFabric("127.0.0.1", node.port, tenant="alice", token_file=str(loose))
    with pytest.raises(AuthFailed, match="GRAFOS_TOKEN_FILE"):
        os.environ.pop("GRAFOS_TOKEN_FILE", None)
        NodeShmFabric("127.0.0.1", node.port, tenant="alice")


def test_open_fabric_takes_the_token_file_from_the_argument_or_the_environment(node, monkeypatch):
    from grafos_fabric.drivers import open_fabric

    path = node.dir / "alice.token"
    with open_fabric(f"nodeshm://127.0.0.1:{node.port}?tenant=alice", token_file=str(path)) as f:
        assert f.alloc(64, ttl=5.0).nbytes == 64
    monkeypatch.setenv("GRAFOS_TOKEN_FILE", str(path))
    with open_fabric(f"nodeshm://127.0.0.1:{node.port}?tenant=alice") as f:
        assert f.alloc(64, ttl=5.0).nbytes == 64


# ---------------------------------------------------------------------------
# Capabilities
# ---------------------------------------------------------------------------


def test_a_forged_capability_is_denied(node):
    with node.fabric("alice") as f, node.control("alice") as c:
        region = f.alloc(64, ttl=10.0)
        cap = f.cell(region.lease.id).cap
        for forged in (
            W.Cap(cap.generation, cap.rights, cap.expiry_ns, bytes([cap.mac[0] ^ 1]) + cap.mac[1:]),
            W.Cap(cap.generation, cap.rights, cap.expiry_ns + 10**12, cap.mac),  # a longer life
            W.Cap(cap.generation + 1, cap.rights, cap.expiry_ns, cap.mac),
        ):
            with pytest.raises(CapabilityDenied):
                c.call(W.Attach(lease_id=region.lease.id, cap=forged), W.Granted)
            with pytest.raises(CapabilityDenied):
                c.call(W.Revoke(lease_id=region.lease.id, cap=forged), W.Done)
        region.store64(0, 7)
        assert region.load64(0) == 7  # nothing changed for the owner
    node.assert_serves()


def test_an_expired_capability_is_denied_after_a_renewal_replaced_it(node):
    with node.fabric("alice") as f, node.control("alice") as c:
        for ttl in (1.0, 4.0, 16.0):  # short, so the old capability expires soon ...
            region = f.alloc(64, ttl=ttl)
            old = f.cell(region.lease.id).cap
            try:
                region.lease.renew(25.0)
                break
            except LeaseExpired:  # ... but a machine stalled for ttl seconds lets the lease expire first:
                f.free(region.lease)  # again, with a longer one (the renewal is not what is tested here)
        else:
            pytest.fail("every lease expired before its renewal, the longest after 16 s")
        assert f.cell(region.lease.id).cap != old
        deadline = time.monotonic() + ttl + 30
        while True:  # the old capability expires at the old deadline (ttl seconds after the grant)
            try:
                c.call(W.Attach(lease_id=region.lease.id, cap=old), W.Granted)
            except CapabilityDenied:
                break
            assert time.monotonic() < deadline, "the old capability never expired"
            time.sleep(0.2)
        fresh = f.cell(region.lease.id).cap
        assert c.call(W.Attach(lease_id=region.lease.id, cap=fresh), W.Granted).lease_id == region.lease.id


def test_another_tenants_capability_gets_nothing(node):
    with node.fabric("alice") as alice, node.fabric("bob") as bob:
        region = alice.alloc(4096, ttl=10.0)
        region.write(0, b"alice's secret bytes")
        ref = region.ref()
        with pytest.raises(CapabilityDenied):
            bob.attach(ref)
        owner = alice.share(region, "attach,write,renew,revoke,share")
        with pytest.raises(CapabilityDenied):
            bob.attach(owner)
        with node.control("bob") as c:
            cap = auth.cap_from_token(owner.name)
            for req in (W.Status(lease_id=ref.lease_id, cap=cap), W.Revoke(lease_id=ref.lease_id, cap=cap),
                        W.Renew(lease_id=ref.lease_id, ttl=60.0, cap=cap)):
                with pytest.raises(CapabilityDenied):
                    c.call(req, W.Done)
        out = bytearray(20)
        region.read_into(0, out)
        assert bytes(out) == b"alice's secret bytes"


def test_guessed_lease_ids_get_the_same_answer_as_forged_capabilities(node):
    with node.fabric("alice") as f, node.control("alice") as c:
        real = f.alloc(64, ttl=10.0)
        cap = f.cell(real.lease.id).cap
        wrong = W.Cap(cap.generation, cap.rights, cap.expiry_ns, os.urandom(32))
        answers = set()
        for lease_id in [secrets.token_hex(16) for _ in range(50)] + [real.lease.id]:
            with pytest.raises(CapabilityDenied) as info:
                c.call(W.Status(lease_id=lease_id, cap=wrong), W.LeaseStatus)
            answers.add(str(info.value).replace(lease_id[:8], "<id>"))
        assert len(answers) == 1, answers  # the node does not say which ids exist


def test_a_read_only_consumer_cannot_write_renew_or_revoke(node):
    with node.fabric("alice") as owner, node.fabric("alice") as consumer:
        region = owner.alloc(64, ttl=10.0)
        region.store64(0, 5)
        ro = consumer.attach(owner.share(region, "attach"))
        assert ro.load64(0) == 5
        with pytest.raises(CapabilityDenied):
            ro.store64(0, 6)
        with pytest.raises(CapabilityDenied):
            ro.faa64(0, 1)
        with pytest.raises(CapabilityDenied):
            ro.lease.renew()
        with pytest.raises(CapabilityDenied):
            ro.lease.revoke()
        consumer.free(ro.lease)  # a consumer only lets go
        assert region.load64(0) == 5
        region.lease.revoke()
        with pytest.raises(Revoked):
            region.load64(0)


# ---------------------------------------------------------------------------
# Quotas and limits
# ---------------------------------------------------------------------------


def test_a_tenant_over_its_byte_quota_gets_quota_exceeded_and_others_are_unaffected(node):
    with node.fabric("alice") as alice:
        held = [alice.alloc(16 << 10, ttl=10.0) for _ in range(4)]  # 64K: the whole quota
        with pytest.raises(QuotaExceeded, match="quota"):
            alice.alloc(1, ttl=10.0)
        with node.fabric("bob") as bob:
            big = bob.alloc(1 << 20, ttl=10.0)
            bob.free(big.lease)
        alice.free(held[0].lease)
        alice.alloc(16 << 10, ttl=10.0)


def test_a_tenant_over_its_lease_count_gets_quota_exceeded(node):
    with node.fabric("alice") as alice:
        held = [alice.alloc(1, ttl=10.0) for _ in range(8)]
        with pytest.raises(QuotaExceeded, match="limit is 8"):
            alice.alloc(1, ttl=10.0)
        for r in held:
            alice.free(r.lease)
    node.assert_serves()


def test_no_lease_runs_past_the_tenants_max_ttl(node):
    with node.fabric("alice") as alice:
        region = alice.alloc(64, ttl=10 * 365 * 24 * 3600.0)
        assert region.lease.remaining() <= 30.0
        region.lease.renew(10 * 365 * 24 * 3600.0)
        assert region.lease.remaining() <= 30.0
        with node.admin() as admin:
            rows = [r for r in admin.call(W.AdminList(), W.Listing).leases if r.lease_id == region.lease.id]
        assert len(rows) == 1 and rows[0].remaining <= 30.0


def test_a_tenant_over_its_connection_limit_gets_limit_exceeded(node):
    held = [node.control("alice") for _ in range(6)]
    try:
        with pytest.raises(LimitExceeded, match="alice"):
            node.control("alice")
        with node.control("bob") as c:  # other tenants still connect
            assert c.welcome.max_request == 4096
    finally:
        for c in held:
            c.close()
    deadline = time.monotonic() + 30
    while True:  # the node counts them down as it sees the connections close
        try:
            node.control("alice").close()
            break
        except LimitExceeded:
            assert time.monotonic() < deadline
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# Bad bytes, slow clients, idle clients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("junk", "kind"),
    [
        (struct.pack(">I", 0xFFFFFFFF), "LimitExceeded"),
        (struct.pack(">I", 5000) + b"x" * 5000, "LimitExceeded"),
        (struct.pack(">I", 0), "Corrupted"),
        (struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1", "Corrupted"),
        (b"GET / HTTP/1.1\r\nHost: node\r\n\r\n", "LimitExceeded"),
        (W.encode_frame(W.Alloc(nbytes=1, ttl=1.0)), "AuthFailed"),
    ],
    ids=["huge-length", "oversized", "zero-length", "garbage-body", "http", "request-before-hello"],
)
def test_garbage_and_oversized_frames_get_a_typed_error_and_a_hangup(node, junk, kind):
    s = node.raw()
    s.sendall(junk)
    assert error_of(s).kind == kind
    assert hung_up(s)
    s.close()
    node.assert_serves()


def test_garbage_after_the_handshake_gets_corrupted_and_a_hangup(node):
    c = node.control("bob")
    c.sock.sendall(struct.pack(">I", 6) + os.urandom(6))
    reply = W.decode_reply(read_frame(c.sock))
    assert isinstance(reply, W.ErrorReply) and reply.kind in ("Corrupted", "")
    assert hung_up(c.sock)
    c.close()
    node.assert_serves()


def test_a_slow_loris_is_cut_off_while_the_others_are_served(node):
    loris = node.raw()
    hello = W.encode_frame(W.Hello(version=W.PROTOCOL_VERSION, tenant="alice", nonce=os.urandom(32)))
    loris.sendall(hello[:3])  # not even a whole length
    node.assert_serves()  # meanwhile, everyone else is served
    t_sent = 3
    loris.settimeout(0.3)
    cut = False
    deadline = time.monotonic() + 60
    while not cut and time.monotonic() < deadline:
        try:
            if t_sent < len(hello):
                loris.sendall(hello[t_sent : t_sent + 1])  # one byte now and then
                t_sent += 1
            data = loris.recv(65536)
            cut = data == b"" or data[:4] != b""  # an error frame or EOF: the node acted
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            cut = True
    assert cut, "the node never cut the slow client off"
    loris.close()
    node.assert_serves()


def test_an_idle_connection_is_hung_up_and_the_channel_reopens_by_itself(node):
    c = node.control("bob")
    c.sock.settimeout(30)
    reply = W.decode_reply(read_frame(c.sock))  # sent by the node after idle_timeout (4 s)
    assert isinstance(reply, W.ErrorReply) and "idle" in reply.message
    with pytest.raises(Disconnected):
        W.raise_for_reply(reply)
    assert hung_up(c.sock)
    c.close()
    with node.fabric("bob") as f:
        region = f.alloc(64, ttl=30.0)
        ch = f.channel()
        ch.control.last_used -= 60  # as if idle past the node's timeout
        region.lease.renew()  # reopens first, then renews
        assert ch.session_epoch == 1


# ---------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------


def test_node_ls_and_revoke_with_the_admin_secret(node, capsys):
    from grafos_fabric.tools.cli import main

    token = str(node.dir / "node.token")
    with node.fabric("alice") as alice:
        region = alice.alloc(4096, ttl=20.0)
        assert main(["node", "ls", "--node", f"127.0.0.1:{node.port}", "--token-file", token, "--json"]) == 0
        out = capsys.readouterr().out
        assert region.lease.id in out and '"tenant": "alice"' in out
        # a tenant's secret is not the admin's
        assert main(["node", "ls", "--node", f"127.0.0.1:{node.port}", "--token-file",
                     str(node.dir / "alice.token")]) == 2
        assert "AuthFailed" in capsys.readouterr().err  # errors go to stderr
        assert main(["node", "revoke", region.lease.id, "--node", f"127.0.0.1:{node.port}",
                     "--token-file", token]) == 0
        with pytest.raises(Revoked):
            region.load64(0)
        assert main(["node", "metrics", "--node", f"127.0.0.1:{node.port}", "--token-file", token]) == 0
        metrics = capsys.readouterr().out
        assert 'grafos_node_denials_total{reason="auth"}' in metrics
        assert "grafos_node_connections " in metrics


# ---------------------------------------------------------------------------
# 1,000 connections against a node with 64 file descriptors
# ---------------------------------------------------------------------------


@pytest.mark.stress
def test_a_thousand_connections_on_a_node_with_64_fds_leave_it_serving(tmp_path, request):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"this process may open only {hard} files; the test needs {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    n = start_node(tmp_path / "fds", nofile=64, max_connections=2000)
    request.addfinalizer(n.kill_if_running)
    socks: list[socket.socket] = []
    held = n.fabric("alice")  # authenticated before the flood: it is never shed
    region = held.alloc(64, ttl=60.0)
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", n.port))  # in progress, or waiting in the backlog
            socks.append(s)
        time.sleep(1.0)  # let the node run out of descriptors and back off
        with n.admin() as admin:  # one more connection may wait a while, but it is served
            text = admin.call(W.AdminMetrics(), W.Metrics).text
        assert 'grafos_node_accept_pauses_total{reason="EMFILE"}' in text
        # the idle connects were shed (oldest unauthenticated first), not waited out one auth_timeout each
        assert 'grafos_node_denials_total{reason="shed"}' in text
        # the connection that authenticated first still works: a control round trip, then data
        assert held.lease_status(region.lease) == "active"
        region.store64(0, 7)
        assert region.load64(0) == 7
    finally:
        held.close()
        for s in socks:
            s.close()
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    n.assert_serves()
    assert n.stop() == 0
