"""The client side of the memory node: authenticated control channel, lease cells, ``RemoteFabric``.

:class:`ControlClient` is one TCP connection that has passed the handshake
(:mod:`.wire`). :class:`NodeChannel` is this process's link to one node
(the :class:`~.registrar.NodeLink` a driver's connector sees): it opens a new
``ControlClient`` when the old one broke or sat idle longer than the node
allows, and counts those re-openings (:attr:`NodeChannel.session_epoch`).
:class:`RemoteLeaseCell` keeps a lease's state for
:class:`~grafos_fabric.lease.Lease` and talks to the node on renew, revoke
and free, always with the lease's capability. :class:`RemoteFabric` is the
driver protocol's fabric for every node-backed driver; a driver subclasses
it and supplies :meth:`RemoteFabric.connector`.

The secret: ``token_file=PATH``, else ``$GRAFOS_TOKEN_FILE``; the file must be
mode 0600 (see :func:`.auth.read_secret`). Neither a missing nor a wrong
secret gets past :class:`~grafos_fabric.errors.AuthFailed` before any lease.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, ClassVar, cast
from urllib.parse import parse_qs, urlsplit

from grafos_fabric.errors import (
    AuthFailed,
    CapabilityDenied,
    Corrupted,
    Disconnected,
    FabricError,
    FabricValueError,
    LeaseExpired,
    Revoked,
    VersionMismatch,
)
from grafos_fabric.lease import NS, Clock, Lease, LeaseState, MonotonicClock, check_ttl

from ..._ffi import ffi, lib
from ..base import Region, RegionRef
from . import wire as W
from .auth import (
    CONSUMER,
    DEFAULT_TENANT,
    REVOKE,
    RIGHT_NAMES,
    SHARE,
    cap_from_token,
    cap_to_token,
    proof,
    read_secret,
    tenant_key,
)
from .registrar import Access, Connector, Grant

__all__ = [
    "TOKEN_ENV",
    "ControlClient",
    "NodeChannel",
    "RemoteFabric",
    "RemoteLeaseCell",
    "parse_node_url",
    "parse_rights",
    "resolve_secret",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "GRAFOS_TOKEN_FILE"
_U64 = (1 << 64) - 1


def resolve_secret(token_file: str | os.PathLike[str] | None = None, secret: bytes | None = None) -> bytes:
    """The client's secret: ``secret``, else ``token_file``, else ``$GRAFOS_TOKEN_FILE``."""
    if secret is not None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise AuthFailed("a secret is at least 16 bytes")
        return secret
    path = token_file if token_file is not None else os.environ.get(TOKEN_ENV)
    if not path:
        raise AuthFailed(f"no secret for the memory node: pass token_file= or set ${TOKEN_ENV}")
    return read_secret(path)


def parse_rights(rights: int | str) -> int:
    """``"attach,write"`` or an int -> the rights bits of :mod:`.auth`."""
    if isinstance(rights, int) and not isinstance(rights, bool):
        value = rights
    elif isinstance(rights, str):
        value = 0
        for word in filter(None, (w.strip() for w in rights.split(","))):
            if word not in RIGHT_NAMES:
                raise FabricValueError(f"unknown right {word!r} (known: {', '.join(RIGHT_NAMES)})")
            value |= RIGHT_NAMES[word]
    else:
        raise FabricValueError(f"rights must be an int or a comma-separated string, got {rights!r}")
    if not 0 <= value <= 0xFF:
        raise FabricValueError(f"rights {value} out of range")
    return value


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise Disconnected("control channel timed out") from None
        except OSError as ex:
            raise Disconnected(f"control channel failed: {ex}") from None
        if k == 0:
            raise Disconnected("control channel closed by the node" + (" mid-frame" if got else ""))
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket, limit: int = W.MAX_REPLY) -> bytes:
    """Read one frame body. ``Disconnected`` on EOF/timeout, ``Corrupted`` on a bad length."""
    (n,) = W.LEN.unpack(_recv_exact(sock, W.LEN.size))
    if n == 0 or n > limit:
        raise Corrupted(f"control frame length {n} out of range (1..{limit})")
    return _recv_exact(sock, n)


def send_frame(sock: socket.socket, msg: Any, limit: int = W.MAX_REQUEST) -> None:
    data = W.encode_frame(msg, limit)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise Disconnected("control channel timed out") from None
    except OSError as ex:
        raise Disconnected(f"control channel failed: {ex}") from None


class ControlClient:
    """One authenticated control connection to a node (thread-safe; one request at a time).

    Connecting runs the handshake: the node must prove the tenant's key first
    (else :class:`AuthFailed`, and this client never sends its own proof),
    then the client proves it (else the node answers :class:`AuthFailed`).
    A transport failure or malformed reply leaves the stream out of step: the
    client is then ``broken`` and every later call raises :class:`Disconnected`.
    """

    def __init__(self, host: str, port: int, *, tenant: str, key: bytes, timeout: float = 10.0,
                 client: str = "") -> None:
        self.host, self.port, self.tenant = host, port, tenant
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as ex:
            raise Disconnected(f"memory node {host}:{port} unreachable: {ex}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self.broken = False
        try:
            self.welcome: W.Welcome = self._handshake(key, client[:256])
        except BaseException:
            self.close()
            raise
        self.last_used = time.monotonic()

    def _exchange(self, req: Any) -> Any:
        try:
            send_frame(self.sock, req)
            reply = W.decode_reply(read_frame(self.sock))
        except (Disconnected, Corrupted):
            self.broken = True
            raise
        if isinstance(reply, W.ErrorReply):
            self.broken = True  # the node hangs up after every handshake error
            W.raise_for_reply(reply)
        return reply

    def _handshake(self, key: bytes, client: str) -> W.Welcome:
        nonce = secrets.token_bytes(W.NONCE)
        ch = self._exchange(W.Hello(version=W.PROTOCOL_VERSION, tenant=self.tenant, nonce=nonce, client=client))
        if not isinstance(ch, W.Challenge):
            raise Corrupted(f"expected a challenge, got {type(ch).__name__}")
        if ch.version != W.PROTOCOL_VERSION:
            raise VersionMismatch(f"node speaks control protocol {ch.version}, we speak {W.PROTOCOL_VERSION}")
        if not hmac.compare_digest(ch.proof, proof(key, b"node", self.tenant, nonce, ch.nonce)):
            raise AuthFailed(f"memory node {self.host}:{self.port} could not prove the secret of tenant "
                             f"{self.tenant!r}: wrong secret, unknown tenant, or not the node you meant")
        welcome = self._exchange(W.Auth(proof=proof(key, b"client", self.tenant, ch.nonce, nonce)))
        if not isinstance(welcome, W.Welcome):
            raise Corrupted(f"expected welcome, got {type(welcome).__name__}")
        self.node, self.driver = ch.node, ch.driver
        return welcome

    def call(self, req: Any, expect: type[Any]) -> Any:
        """Send ``req``, return the reply; an :class:`~.wire.ErrorReply` raises its typed error."""
        with self._lock:
            if self.broken:
                raise Disconnected(f"the control channel to {self.host}:{self.port} is broken")
            try:
                send_frame(self.sock, req, self.welcome.max_request)
                reply = W.decode_reply(read_frame(self.sock))
            except (Disconnected, Corrupted):
                self.broken = True
                raise
            self.last_used = time.monotonic()
        if isinstance(reply, W.ErrorReply):
            if reply.code == -1 and not reply.kind:  # the node hung up (idle timeout, slow frame)
                self.broken = True
            W.raise_for_reply(reply)
        if not isinstance(reply, expect):
            self.broken = True
            raise Corrupted(f"expected {expect.__name__} for {type(req).__name__}, got {type(reply).__name__}")
        return reply

    def close(self) -> None:
        self.broken = True
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NodeChannel:
    """This process's authenticated link to one node (a :class:`~.registrar.NodeLink`)."""

    def __init__(self, host: str, port: int, *, tenant: str, key: bytes, timeout: float = 10.0,
                 client: str = "") -> None:
        self.host, self.port, self.tenant = host, port, tenant
        self._key, self._timeout, self._client = key, timeout, client
        self._lock = threading.RLock()
        self._epoch = 0
        self._caps: dict[str, W.Cap] = {}
        self.control = ControlClient(host, port, tenant=tenant, key=key, timeout=timeout, client=client)
        self.node = self.control.node
        self.driver = self.control.driver
        self.info: Access = dict(self.control.welcome.info)

    @property
    def session_epoch(self) -> int:
        return self._epoch

    def _current(self) -> ControlClient:
        with self._lock:
            c = self.control
            idle_limit = 0.8 * c.welcome.idle_timeout
            if c.broken or time.monotonic() - c.last_used > idle_limit:
                c.close()
                self.control = ControlClient(self.host, self.port, tenant=self.tenant, key=self._key,
                                             timeout=self._timeout, client=self._client)
                self._epoch += 1
                if self.control.node != self.node:
                    log.warning("memory node %s:%d restarted (%s -> %s)", self.host, self.port, self.node,
                                self.control.node)
                    self.node = self.control.node
                self.info = dict(self.control.welcome.info)
                log.info("control channel to %s:%d reopened", self.host, self.port)
            return self.control

    def call(self, req: Any, expect: type[Any]) -> Any:
        """A request to this node (reopening the channel first if it broke or idled out)."""
        with self._lock:
            return self._current().call(req, expect)

    def connect(self, params: Access) -> Access:
        reply: W.Connected = self.call(W.Connect(params=params), W.Connected)
        return dict(reply.params)

    def remember(self, lease_id: str, cap: W.Cap) -> None:
        with self._lock:
            self._caps[lease_id] = cap

    def cap(self, lease_id: str) -> W.Cap | None:
        with self._lock:
            return self._caps.get(lease_id)

    def lease_state(self, lease_id: str) -> str:
        cap = self.cap(lease_id)
        if cap is None:
            return W.UNKNOWN
        req = W.Status(lease_id=lease_id, cap=cap)
        try:
            try:
                reply: W.LeaseStatus = self.call(req, W.LeaseStatus)
            except Disconnected:
                if not self.control.broken:
                    raise
                reply = self.call(req, W.LeaseStatus)  # a status query is safe to repeat on a new channel
        except CapabilityDenied:
            return W.UNKNOWN  # a node that does not know our capability (it restarted) does not know the lease
        return reply.state

    def close(self) -> None:
        with self._lock:
            self.control.close()


class RemoteLeaseCell:
    """Lease state for a lease held on a memory node: a local cache, kept honest.

    The deadline is in the *client's* clock, computed from the moment the
    request was sent plus the remaining time the node reported, so it errs on
    the early side (fail closed). ``store_deadline_ns`` (what
    :meth:`Lease.renew` calls) renews on the node, which may grant less than
    asked (its maximum TTL): the cached deadline follows the node's answer.
    ``store_state(REVOKED)`` revokes on the node; ``store_state(FREED)`` frees
    on the node when this holder may (a consumer's capability may not: then
    only this process lets go).
    """

    def __init__(self, channel: NodeChannel, lease_id: str, cap: W.Cap, deadline_ns: int, clock: Clock) -> None:
        self.channel = channel
        self.lease_id = lease_id
        self.clock = clock
        self.cap = cap
        self._shared: Any = None  # [state, deadline] u64 words in shared memory (bind_shared)
        self._keep: Any = None
        self._probed = False
        self._local_only = False  # a store_state that only this process sees (a consumer letting go)
        self._deadline = deadline_ns
        self._state = LeaseState.ACTIVE
        channel.remember(lease_id, cap)

    # With shared lease words bound (a span mapped on the node's host, bind_shared), the cached
    # state and deadline are written through to them, so the native ring fails closed on what
    # any holder on this host knows; the node itself marks the state word when it fences the span.
    @property
    def _state(self) -> int:
        return self.__state

    @_state.setter
    def _state(self, state: int) -> None:
        self.__state = state
        if self._shared is not None and state != LeaseState.ACTIVE and not self._local_only:
            lib.gf_store_release_at(self._shared, 0, int(state))

    @property
    def _deadline(self) -> int:
        return self.__deadline

    @_deadline.setter
    def _deadline(self, deadline_ns: int) -> None:
        self.__deadline = deadline_ns
        if self._shared is not None:
            lib.gf_store_release_at(self._shared, 8, max(0, int(deadline_ns)) & _U64)

    def bind_shared(self, words: Any, keep: Any) -> None:
        """Keep the lease's two shared u64 words ``[state, deadline_ns]`` (``words``: a cffi
        pointer; ``keep``: what keeps its memory mapped) in step with this cell from now on:
        renewals write the deadline (in this cell's clock: ``CLOCK_MONOTONIC`` for the default
        clock, what the native ring compares it with, so expiry fails the native push/pop closed
        with no call into Python), revoke and what the node reports write the state. The node
        writes the state word when it fences the span; this cell then asks the node which state
        it is (:meth:`load_state`). The state word is never set back to active here."""
        self._keep = keep
        self._shared = ffi.cast("uint8_t *", words)
        lib.gf_store_release_at(self._shared, 8, max(0, int(self.__deadline)) & _U64)
        if self.__state != LeaseState.ACTIVE:
            lib.gf_store_release_at(self._shared, 0, int(self.__state))

    def load_state(self) -> int:
        shared = self._shared
        if shared is not None and self.__state == LeaseState.ACTIVE and not self._probed \
                and int(lib.gf_load_acquire_at(shared, 0)) != LeaseState.ACTIVE:
            # the node fenced the span (or a holder on this host revoked it): which state is it in?
            # (asked once: a fenced span never comes back)
            try:
                state = self.channel.lease_state(self.lease_id)
            except FabricError as ex:  # the span is gone whatever the node would say: fail closed
                log.debug("lease %s: fenced on this host, and the node cannot be asked: %s", self.lease_id, ex)
                state = W.FREED
            self._probed = True
            self.mark(state)
            if state == W.ACTIVE:  # never trust a span whose words say it is gone
                self.mark(W.FREED)
        return self.__state

    def load_deadline_ns(self) -> int:
        return self._deadline

    def update(self, cap: W.Cap, deadline_ns: int) -> None:
        """A fresh grant for the same lease (attached again, maybe through a weaker shared ref):
        the capability with more rights stays, so an owner that attaches its own lease keeps its own."""
        if (self.cap.rights | cap.rights) != self.cap.rights:
            self.cap = cap
            self.channel.remember(self.lease_id, cap)
        self._deadline = deadline_ns
        self._state = LeaseState.ACTIVE

    def store_deadline_ns(self, deadline_ns: int) -> None:
        sent = self.clock.now_ns()
        ttl = max(1e-9, (deadline_ns - sent) / NS)
        try:
            reply: W.Renewed = self.channel.call(W.Renew(lease_id=self.lease_id, ttl=ttl, cap=self.cap), W.Renewed)
        except Revoked:
            self._state = LeaseState.REVOKED
            raise
        except LeaseExpired:
            self._deadline = min(self._deadline, sent)
            raise
        self.cap = reply.cap
        self.channel.remember(self.lease_id, reply.cap)
        self._deadline = sent + int(reply.remaining * NS)

    def store_state(self, state: int) -> None:
        if state == LeaseState.REVOKED:
            self.channel.call(W.Revoke(lease_id=self.lease_id, cap=self.cap), W.Done)
        elif state == LeaseState.FREED and self.cap.rights & REVOKE:
            self.channel.call(W.Free(lease_id=self.lease_id, cap=self.cap), W.Done)
        elif state == LeaseState.FREED:
            self._local_only = True  # a consumer lets go: the other holders on this host keep the lease
        self._state = state

    def mark(self, state: str) -> None:
        """Record a state the node reported (``expired``/``freed``/``unknown`` end the lease locally)."""
        if state == W.REVOKED:
            self._state = LeaseState.REVOKED
        elif state in (W.FREED, W.UNKNOWN):
            self._state = LeaseState.FREED
        elif state == W.EXPIRED:
            self._deadline = min(self._deadline, self.clock.now_ns())

    def refresh(self) -> str:
        """Ask the node for the lease state; update the cache; return the state."""
        state = self.channel.lease_state(self.lease_id)
        self.mark(state)
        return state


def parse_node_url(url: str, schemes: tuple[str, ...], known: set[str]) -> tuple[str, int, dict[str, str]]:
    """``SCHEME://HOST[:PORT][?key=value&...]`` -> (host, port, options); unknown keys are refused."""
    if not isinstance(url, str):
        raise FabricValueError(f"a fabric URL is a string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in schemes:
        raise FabricValueError(f"not a {'/'.join(s + '://' for s in schemes)} URL: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise FabricValueError(f"bad port in {url!r}") from None
    host = parts.hostname or ""
    if not host:
        raise FabricValueError(f"no host in {url!r}")
    opts: dict[str, str] = {}
    for key, values in parse_qs(parts.query, keep_blank_values=False, strict_parsing=False).items():
        if key not in known:
            raise FabricValueError(f"unknown option {key!r} in {url!r} (known: {', '.join(sorted(known))})")
        opts[key] = values[-1]
    return host, port or W.DEFAULT_PORT, opts


class RemoteFabric:
    """The driver protocol's fabric for leases on memory nodes; a driver subclasses it.

    One :class:`NodeChannel` and one driver :class:`~.registrar.Connector` per
    node this fabric talks to (opened on first use; the node in the URL at
    once, so a wrong secret fails here, before any lease). Regions come from
    the connector and are one-sided (``mapped_regions = False``).
    """

    driver: str = ""  # the Registrar.name this client speaks to (a plain attribute: the Fabric protocol)
    schemes: ClassVar[tuple[str, ...]] = ()
    url_options: ClassVar[frozenset[str]] = frozenset()  # driver-specific URL query keys
    mapped_regions = False

    def __init__(
        self,
        host: str,
        port: int = W.DEFAULT_PORT,
        *,
        tenant: str = DEFAULT_TENANT,
        token_file: str | os.PathLike[str] | None = None,
        secret: bytes | None = None,
        clock: Clock | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port = host, port
        self.url = f"{self.schemes[0] if self.schemes else self.driver}://{host}:{port}"
        self.tenant = tenant
        self.clock: Clock = clock or MonotonicClock()
        self.timeout = timeout
        self.client_name = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._key = tenant_key(resolve_secret(token_file, secret), tenant)
        self._lock = threading.RLock()
        self._nodes: dict[tuple[str, int], tuple[NodeChannel, Connector]] = {}
        self._regions: list[Region] = []
        self._cells: dict[str, tuple[NodeChannel, RemoteLeaseCell]] = {}
        self._shared: dict[tuple[str, int, bytes], RegionRef] = {}
        self._closed = False

    # -- for subclasses ---------------------------------------------------------------
    def connector(self, link: NodeChannel) -> Connector:
        """The driver's client half towards one node (called once per node, after auth)."""
        raise NotImplementedError

    @classmethod
    def url_kwargs(cls, opts: dict[str, str]) -> dict[str, Any]:
        """Constructor keyword arguments for the driver-specific URL options."""
        return {}

    @classmethod
    def from_url(cls, url: str, *, token_file: str | os.PathLike[str] | None = None, secret: bytes | None = None,
                 clock: Clock | None = None) -> RemoteFabric:
        """Open ``SCHEME://HOST:PORT[?tenant=NAME&timeout=SECONDS&...]``."""
        host, port, opts = parse_node_url(url, cls.schemes, {"tenant", "timeout"} | set(cls.url_options))
        try:
            kwargs = cls.url_kwargs(opts)
            timeout = float(opts.get("timeout", 10.0))
        except ValueError as ex:
            if isinstance(ex, FabricValueError):
                raise
            raise FabricValueError(f"bad option in {url!r}: {ex}") from None
        return cls(host, port, tenant=opts.get("tenant", DEFAULT_TENANT), token_file=token_file, secret=secret,
                   clock=clock, timeout=timeout, **kwargs)

    # -- nodes -----------------------------------------------------------------------
    def channel(self, host: str | None = None, port: int | None = None) -> NodeChannel:
        """The channel to a node (default: the URL's), opened and authenticated on first use."""
        return self._node(host or self.host, port or self.port)[0]

    def _node(self, host: str, port: int) -> tuple[NodeChannel, Connector]:
        with self._lock:
            if self._closed:
                raise Disconnected("the fabric is closed")
            entry = self._nodes.get((host, port))
            if entry is None:
                ch = NodeChannel(host, port, tenant=self.tenant, key=self._key, timeout=self.timeout,
                                 client=self.client_name)
                try:
                    if ch.driver != self.driver:
                        raise FabricValueError(f"memory node {host}:{port} serves the {ch.driver!r} driver, "
                                               f"not {self.driver!r}")
                    entry = (ch, self.connector(ch))
                except BaseException:
                    ch.close()
                    raise
                self._nodes[(host, port)] = entry
            return entry

    def _region(self, ch: NodeChannel, conn: Connector, g: W.Granted, sent_ns: int, mapped: bool = False) -> Region:
        deadline = sent_ns + int(g.remaining * NS)
        with self._lock:
            held = self._cells.get(g.lease_id)
            if held is None:
                cell = RemoteLeaseCell(ch, g.lease_id, g.cap, deadline, self.clock)
                self._cells[g.lease_id] = (ch, cell)
            else:
                cell = held[1]
                cell.update(g.cap, deadline)
        lease = Lease(g.lease_id, ttl=g.ttl, generation=g.generation, cell=cell, clock=self.clock,
                      resource=f"{self.url.split('://')[0]}://{ch.host}:{ch.port}/{g.lease_id}",
                      on_free=self._release)
        grant = Grant(lease_id=g.lease_id, generation=g.generation, nbytes=g.nbytes, ttl=g.ttl,
                      writable=g.writable, access=dict(g.access))
        # mapped: the caller wants the span mapped into this process, where the driver can (ucx with
        # map=local); other connectors are asked the way they always were
        region: Region = (cast(Any, conn).region(lease, grant, mapped=True) if mapped
                          else conn.region(lease, grant))
        with self._lock:
            self._regions.append(region)
        return region

    # -- the driver protocol ------------------------------------------------------------
    def alloc(self, nbytes: int, ttl: float) -> Region:
        """Lease ``nbytes`` on the URL's node for ``ttl`` seconds (the node may grant less time)."""
        ttl = check_ttl(ttl)
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 < nbytes <= W.MAX_REGION:
            raise FabricValueError(f"nbytes must be an int in (0, {W.MAX_REGION}], got {nbytes!r}")
        t0 = time.perf_counter()
        ch, conn = self._node(self.host, self.port)
        t1 = time.perf_counter()
        sent = self.clock.now_ns()
        g: W.Granted = ch.call(W.Alloc(nbytes=nbytes, ttl=ttl), W.Granted)
        t2 = time.perf_counter()
        region = self._region(ch, conn, g, sent, self.mapped_regions)
        log.debug("alloc on %s:%d: channel %.3f ms, grant %.3f ms, region %.3f ms", self.host, self.port,
                  (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)
        return region

    def attach(self, ref: RegionRef, *, mapped: bool = True) -> Region:
        """Attach to a region by its :class:`RegionRef` (its capability is in ``ref.name``).

        ``mapped`` is a preference: node regions are mapped into the client
        only where the driver can (``mapped_regions``: the ucx driver with
        ``map=local`` on the node's host); otherwise the region returned has
        ``mapped = False``.
        """
        if ref.driver != self.driver:
            raise FabricValueError(f"a {ref.driver!r} region cannot be attached by the {self.driver} driver")
        cap = cap_from_token(ref.name)
        ch, conn = self._node(ref.host or self.host, ref.port or self.port)
        sent = self.clock.now_ns()
        g: W.Granted = ch.call(W.Attach(lease_id=ref.lease_id, cap=cap), W.Granted)
        return self._region(ch, conn, g, sent, bool(mapped) and self.mapped_regions)

    def region_ref(self, lease: Lease, nbytes: int, rights: int | str = CONSUMER) -> RegionRef:
        """A ref another process of this tenant can attach with: it carries a capability with
        ``rights`` (default attach + write, never more than this holder has), minted by the node."""
        want = parse_rights(rights)
        with self._lock:
            held = self._cells.get(lease.id)
        if held is None:
            raise FabricValueError(f"lease {lease.id} is not held through this fabric")
        ch, cell = held
        cap = cell.cap
        key = (lease.id, want, cap.mac)
        ref = self._shared.get(key)
        if ref is None:
            if cap.rights & SHARE and want != cap.rights:
                shared: W.Shared = ch.call(W.Share(lease_id=lease.id, cap=cap, rights=want & cap.rights),
                                           W.Shared)
                token = cap_to_token(shared.cap)
            else:
                token = cap_to_token(cap)
            ref = RegionRef(driver=self.driver, name=token, nbytes=nbytes, lease_id=lease.id,
                            generation=lease.generation, namespace=self.tenant, host=ch.host, port=ch.port)
            with self._lock:
                self._shared = {k: v for k, v in self._shared.items() if k[0] != lease.id}
                self._shared[key] = ref
        return ref

    def share(self, region: Region, rights: int | str = CONSUMER) -> RegionRef:
        """``region.ref()`` with chosen rights: ``"attach"`` (read-only), ``"attach,write"`` (the default)..."""
        return self.region_ref(region.lease, region.nbytes, rights)

    def free(self, lease: Lease) -> None:
        """Give the lease back to its node (idempotent; a consumer only lets go)."""
        lease.free()

    def _release(self, lease: Lease) -> None:
        """``Lease.free`` lands here: free on the node; the regions keep failing closed."""
        with self._lock:
            held = self._cells.pop(lease.id, None)
            self._regions = [r for r in self._regions if r.lease.id != lease.id]
        if held is not None and held[1].load_state() == LeaseState.ACTIVE:
            held[1].store_state(LeaseState.FREED)

    def reap(self) -> int:
        """Forget this client's regions whose leases are no longer live; returns how many."""
        with self._lock:
            dead = [r for r in self._regions if not r.lease.live]
            self._regions = [r for r in self._regions if r.lease.live]
        return len(dead)

    def cell(self, lease_id: str) -> RemoteLeaseCell | None:
        """The lease cell of a lease held through this fabric (for connectors: ``mark`` a reported state)."""
        with self._lock:
            held = self._cells.get(lease_id)
        return held[1] if held is not None else None

    def lease_status(self, lease: Lease) -> str:
        """Ask the lease's node for its state (``active``, ``expired``, ``revoked``, ``freed``, ``unknown``)."""
        with self._lock:
            held = self._cells.get(lease.id)
        if held is None:
            raise FabricValueError(f"lease {lease.id} is not held through this fabric")
        return held[1].refresh()

    def close(self) -> None:
        """Close regions, then each node's connector, then its channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            regions, self._regions = self._regions, []
            nodes, self._nodes = list(self._nodes.values()), {}
        for r in regions:
            r.close()
        for ch, conn in nodes:
            try:
                conn.close()
            finally:
                ch.close()

    def __enter__(self) -> RemoteFabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
