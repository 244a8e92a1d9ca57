"""The memory node's server: one event loop, every connection bounded in time and number.

:class:`NodeServer` runs an :mod:`asyncio` loop on one thread of its own
(:meth:`NodeServer.start`; :meth:`NodeServer.close` stops it). There is no
thread per connection: a connection is a task, and every wait it makes has
a deadline:

* the handshake (:mod:`.wire`) must finish within ``auth_timeout``;
* between requests a connection may stay silent for ``idle_timeout``;
* once a frame's length has arrived, its body must follow within
  ``frame_timeout`` (a slow-loris client is cut off, others never wait on it);
* a reply the client does not read must drain within ``frame_timeout``.

Limits: at most ``max_connections`` connections in total (authenticated or
not: over it, the newcomer gets ``LimitExceeded`` and is closed) and
``max_connections`` per tenant; requests of at most ``max_request`` bytes
(``LimitExceeded``, then closed); a malformed frame gets ``Corrupted`` and the
connection is closed (its byte stream is out of step). Everything else a
client gets wrong is a typed error on that connection, which stays open.

Accepting never stops for good. When ``accept`` fails for lack of file
descriptors or memory (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``,
``MemoryError``), the node first sheds the oldest quarter of the connections
that have not finished the handshake (counted as the denial reason ``shed``):
silent ones older than 0.1 s first, then ones that sent a Hello more than 1 s
ago. A flood of idle connects then drains in tenths of a second per batch
instead of one ``auth_timeout``, and a client that authenticates is never shed. A
connection that finished the handshake keeps its descriptor. Only when there
is nothing to shed is the listener taken off the loop for ``accept_backoff``
seconds (pending connections wait in the kernel's backlog) and put back.

The lease table's reaper runs on the same loop (``reap_interval``), so the
registrar is only ever called from this one thread.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from grafos_fabric import observe
from grafos_fabric.errors import (
    AccessDenied,
    AuthFailed,
    CapabilityDenied,
    Corrupted,
    Disconnected,
    FabricError,
    FabricValueError,
    LimitExceeded,
    VersionMismatch,
)
from grafos_fabric.lease import Clock

from . import wire as W
from .auth import ATTACH, OWNER, RENEW, REVOKE, SHARE, WRITE, CapMinter, NodePolicy, TenantPolicy, proof
from .registrar import Registrar, RegistrarSession
from .table import LeaseTable, ServerLease

__all__ = ["NodeServer", "is_loopback"]

log = logging.getLogger(__name__)

_ACCEPT_PRESSURE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def is_loopback(host: str) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(eq=False)
class _Conn:
    peer: str
    tenant: TenantPolicy | None = None
    session: RegistrarSession | None = None
    writer: asyncio.StreamWriter | None = None
    since: float = 0.0  # loop time at accept: the oldest unauthenticated are shed first
    hello: bool = False  # a well-formed Hello came: shed only after the silent ones
    task: asyncio.Task[None] | None = None


class NodeServer:
    """A memory node: a registrar's pool, leases over an authenticated TCP control channel.

    ``NodeServer(registrar, policy, host=..., port=...)`` binds at once (``port=0`` picks
    a free port, see :attr:`port`); :meth:`start` runs the loop; :meth:`close` stops
    serving, drops every connection, retires every lease (fence + deregister), closes
    the sessions and then the registrar. Binding anywhere but loopback needs
    ``allow_remote=True``: the node is meant for a trusted network (see the README).
    """

    def __init__(
        self,
        registrar: Registrar,
        policy: NodePolicy,
        *,
        host: str = "127.0.0.1",
        port: int = W.DEFAULT_PORT,
        clock: Clock | None = None,
        reap_interval: float = 0.05,
        allow_remote: bool = False,
        node_tag: str | None = None,
        backlog: int = 512,
    ) -> None:
        if not is_loopback(host) and not allow_remote:
            raise FabricValueError(f"binding the memory node to {host!r} exposes it beyond this host: "
                                   "pass allow_remote=True (--allow-remote) on a trusted network only")
        self.registrar = registrar
        self.policy = policy
        self.limits = policy.limits
        self.table = LeaseTable(registrar.pool_size, registrar, clock, node_tag=node_tag)
        self.clock = self.table.clock
        self.node_tag = self.table.node_tag
        self.driver = registrar.name
        self.caps = CapMinter()
        self._reap_interval = reap_interval
        self._listener = socket.create_server((host, port), backlog=backlog)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._conns: set[_Conn] = set()
        self._per_tenant: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._closed = False
        self.accept_pauses = 0  # how many times accepting was paused for lack of fds/memory

    # -- running --------------------------------------------------------------
    def start(self) -> NodeServer:
        """Run the loop on a thread of its own; returns once it accepts."""
        self._thread = threading.Thread(target=self._run, name=f"grafos-node-{self.node_tag}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        log.info("memory node %s (%s) serving on %s:%d", self.node_tag, self.driver, self.host, self.port)
        return self

    def serve_forever(self) -> None:
        """Block until :meth:`close` is called (from a signal handler or another thread)."""
        if self._thread is not None:
            self._thread.join()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_reader(self._listener.fileno(), self._on_accept)
        reaper = loop.call_later(self._reap_interval, self._reap)
        self._reaper = reaper
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            self._reaper.cancel()
            try:
                loop.remove_reader(self._listener.fileno())
            except (ValueError, OSError):
                pass
            self._listener.close()
            for conn in list(self._conns):  # hang up first: pending reads end at once
                if conn.writer is not None:
                    conn.writer.transport.abort()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=10)
            try:
                self.table.close()
            finally:
                self.registrar.close()

    def _reap(self) -> None:
        try:
            if self.table.reap():
                self._gauges()
        except Exception:
            log.exception("reaper failed")
        assert self._loop is not None
        self._reaper = self._loop.call_later(self._reap_interval, self._reap)

    def close(self) -> None:
        """Stop serving; retire every lease; close sessions and the registrar. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            self._thread.join(timeout=30)
        else:  # never started
            self._listener.close()
            try:
                self.table.close()
            finally:
                self.registrar.close()

    def __enter__(self) -> NodeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accepting --------------------------------------------------------------
    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except MemoryError:
                self._pause_accept("ENOMEM")
                return
            except OSError as ex:
                if ex.errno in _ACCEPT_PRESSURE:
                    self._pause_accept(errno.errorcode.get(ex.errno or 0, str(ex.errno)))
                else:  # ECONNABORTED and friends: that one connection is gone, not the listener
                    log.debug("accept: %s", ex)
                return
            peer = f"{addr[0]}:{addr[1]}"
            observe.count("node_connections_accepted")
            if len(self._conns) >= self.limits.max_connections:
                observe.count("node_denials", reason="max_connections")
                self._refuse(sock, LimitExceeded(f"the node serves at most {self.limits.max_connections} "
                                                 "connections: try again later"))
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop = asyncio.get_running_loop()
            conn = _Conn(peer, since=loop.time())
            self._conns.add(conn)
            task = loop.create_task(self._serve(sock, conn))
            conn.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        observe.gauge("node_connections", len(self._conns))

    # A silent connection older than this may be shed under fd pressure; one that sent
    # its Hello gets _SHED_AFTER_HELLO to finish the handshake.
    _SHED_SILENT = 0.1
    _SHED_AFTER_HELLO = 1.0

    def _shed_unauthenticated(self, now: float) -> tuple[int, float | None]:
        """Hang up on the oldest quarter (at least one) of the connections still in the
        handshake that are old enough to shed: silent ones first, then those that sent a
        Hello. Returns (how many, seconds until the next one becomes old enough or None)."""
        silent: list[_Conn] = []
        talking: list[_Conn] = []
        for c in self._conns:
            if c.tenant is None and c.task is not None:
                (talking if c.hello else silent).append(c)
        candidates: list[_Conn] = []
        wait: float | None = None
        for group, grace in ((silent, self._SHED_SILENT), (talking, self._SHED_AFTER_HELLO)):
            for c in sorted(group, key=lambda c: c.since):
                ripe = c.since + grace - now
                if ripe <= 0:
                    candidates.append(c)
                elif wait is None or ripe < wait:
                    wait = ripe
        victims = candidates[:max(1, len(candidates) // 4)] if candidates else []
        for conn in victims:
            observe.count("node_denials", reason="shed")
            assert conn.task is not None
            conn.task.cancel()  # _serve's finally closes the socket and drops the connection
        return len(victims), wait

    def _pause_accept(self, reason: str) -> None:
        """Out of fds or memory: shed unauthenticated connections, else stop accepting for a while."""
        self.accept_pauses += 1
        observe.count("node_accept_pauses", reason=reason)
        loop = asyncio.get_running_loop()
        fd = self._listener.fileno()
        loop.remove_reader(fd)
        shed, wait = self._shed_unauthenticated(loop.time())
        if shed:
            log.info("accept failed (%s): shed %d unauthenticated connections", reason, shed)
            delay = 0.001  # the cancelled tasks close their sockets on the next turns of the loop
        elif wait is not None:
            delay = min(wait + 0.001, self.limits.accept_backoff)
        else:
            log.warning("accept failed (%s): not accepting for %.2fs", reason, self.limits.accept_backoff)
            delay = self.limits.accept_backoff

        def resume() -> None:
            if self._stop is not None and not self._stop.is_set():
                loop.add_reader(fd, self._on_accept)

        loop.call_later(delay, resume)

    @staticmethod
    def _refuse(sock: socket.socket, ex: Exception) -> None:
        try:
            sock.setblocking(False)
            sock.send(W.encode_frame(W.error_reply(ex)))
        except OSError:
            pass
        finally:
            sock.close()

    # -- one connection -----------------------------------------------------------
    async def _serve(self, sock: socket.socket, conn: _Conn) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=self.limits.max_request + 8)
            conn.writer = writer
            deadline = asyncio.get_running_loop().time() + self.limits.auth_timeout
            try:
                await self._handshake(reader, writer, conn, deadline)
            except _Idle:
                observe.count("node_denials", reason="auth_timeout")
                log.info("%s: handshake not finished within %.1fs", conn.peer, self.limits.auth_timeout)
                raise _Hangup(W.error_reply(AuthFailed(
                    f"handshake not finished within {self.limits.auth_timeout:.1f}s"))) from None
            if conn.tenant is None:
                return
            while True:
                try:
                    body = await self._read_frame(reader, self.limits.idle_timeout)
                except _Idle:
                    observe.count("node_idle_closed")
                    raise _Hangup(W.error_reply(Disconnected(
                        f"no request for {self.limits.idle_timeout:.1f}s: the node hung up (idle timeout)"))) from None
                try:
                    req = W.decode_request(body)
                except Corrupted as ex:
                    observe.count("node_denials", reason="garbage")
                    await self._send(writer, W.error_reply(ex))
                    return
                reply = self._handle_safely(conn, req)
                await self._send(writer, reply)
        except _Hangup as ex:
            if ex.reply is not None and writer is not None:
                try:
                    await self._send(writer, ex.reply)
                except (_Hangup, OSError, asyncio.TimeoutError):
                    pass
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must not take the node down: log it, drop this connection
            log.exception("connection from %s failed", conn.peer)
        finally:
            self._drop(conn)
            if writer is not None:
                writer.close()
            else:
                sock.close()

    def _drop(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn.tenant is not None:
            name = conn.tenant.name
            self._per_tenant[name] = max(0, self._per_tenant.get(name, 1) - 1)
            conn.tenant = None
        if conn.session is not None:
            self.table.drop_holder(conn.session)
            session, conn.session = conn.session, None
            try:
                session.close()
            except Exception:
                log.exception("closing the registrar session of %s failed", conn.peer)
        observe.count("node_connections_closed")
        observe.gauge("node_connections", len(self._conns))

    async def _read_frame(self, reader: asyncio.StreamReader, first_byte_timeout: float,
                          deadline: float | None = None) -> bytes:
        """One frame; ``_Idle`` when its length does not come within ``first_byte_timeout``
        (or the whole frame not by the loop-time ``deadline``), ``_Hangup`` when it is bad or slow."""
        try:
            head = await asyncio.wait_for(reader.readexactly(W.LEN.size), first_byte_timeout)
        except asyncio.TimeoutError:
            raise _Idle from None
        (n,) = W.LEN.unpack(head)
        if n == 0:
            observe.count("node_denials", reason="garbage")
            raise _Hangup(W.error_reply(Corrupted("control frame of length 0")))
        if n > self.limits.max_request:
            observe.count("node_denials", reason="oversized")
            raise _Hangup(W.error_reply(LimitExceeded(
                f"request frame of {n} bytes: this node takes at most {self.limits.max_request}")))
        body_timeout = self.limits.frame_timeout
        if deadline is not None:
            body_timeout = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(reader.readexactly(n), body_timeout)
        except asyncio.TimeoutError:
            if deadline is not None:
                raise _Idle from None
            observe.count("node_denials", reason="slow_frame")
            raise _Hangup(W.error_reply(Disconnected(
                f"a {n}-byte frame did not arrive within {self.limits.frame_timeout:.1f}s"))) from None

    async def _send(self, writer: asyncio.StreamWriter, msg: Any) -> None:
        writer.write(W.encode_frame(msg))
        await asyncio.wait_for(writer.drain(), self.limits.frame_timeout)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn,
                         deadline: float) -> None:
        loop = asyncio.get_running_loop()
        hello = self._decode_handshake(await self._read_frame(reader, deadline - loop.time(), deadline), W.Hello)
        conn.hello = True
        if hello.version != W.PROTOCOL_VERSION:
            raise _Hangup(W.error_reply(VersionMismatch(
                f"control protocol {hello.version}; this node speaks {W.PROTOCOL_VERSION}")))
        tenant = self.policy.tenant(hello.tenant)
        # An unknown tenant gets a challenge like any other (keyed at random), so the
        # answer does not say which tenants exist; its proof can never match.
        key = tenant.key if tenant is not None else secrets.token_bytes(32)
        nonce = secrets.token_bytes(W.NONCE)
        await self._send(writer, W.Challenge(
            version=W.PROTOCOL_VERSION, node=self.node_tag, driver=self.driver, nonce=nonce,
            proof=proof(key, b"node", hello.tenant, hello.nonce, nonce)))
        auth = self._decode_handshake(await self._read_frame(reader, deadline - loop.time(), deadline), W.Auth)
        expected = proof(key, b"client", hello.tenant, nonce, hello.nonce)
        if tenant is None or not hmac.compare_digest(auth.proof, expected):
            observe.count("node_denials", reason="auth")
            log.info("%s: authentication failed (tenant %r)", conn.peer, hello.tenant[:64])
            raise _Hangup(W.error_reply(AuthFailed("authentication failed: wrong secret or unknown tenant")))
        if self._per_tenant.get(tenant.name, 0) >= tenant.max_connections:
            observe.count("node_denials", reason="tenant_connections")
            raise _Hangup(W.error_reply(LimitExceeded(
                f"tenant {tenant.name} already has {tenant.max_connections} connections (its limit)")))
        self._per_tenant[tenant.name] = self._per_tenant.get(tenant.name, 0) + 1
        conn.tenant = tenant
        if not tenant.admin:
            conn.session = self.registrar.open_session(conn.peer)
        await self._send(writer, W.Welcome(
            node=self.node_tag, driver=self.driver, info=self.registrar.node_info(),
            max_request=self.limits.max_request, idle_timeout=self.limits.idle_timeout,
            max_ttl=self.policy.max_ttl(tenant)))
        observe.count("node_auth_ok", tenant=tenant.name)

    @staticmethod
    def _decode_handshake(body: bytes, expect: type[Any]) -> Any:
        try:
            msg = W.decode_request(body)
        except Corrupted as ex:
            observe.count("node_denials", reason="garbage")
            raise _Hangup(W.error_reply(ex)) from None
        if not isinstance(msg, expect):
            observe.count("node_denials", reason="auth")
            raise _Hangup(W.error_reply(AuthFailed(
                f"expected {expect.__name__.lower()} during the handshake, got {type(msg).__name__.lower()}")))
        return msg

    # -- requests -------------------------------------------------------------------
    def _handle_safely(self, conn: _Conn, req: Any) -> Any:
        t0 = time.perf_counter()
        try:
            reply = self._handle(conn, req)
        except (FabricError, FabricValueError) as ex:
            if isinstance(ex, AccessDenied):
                observe.count("node_denials", reason=type(ex).__name__)
            reply = W.error_reply(ex)
        except Exception as ex:  # a bug must not kill the node: report it, keep serving
            log.exception("request %s from %s failed", type(req).__name__, conn.peer)
            reply = W.error_reply(ex)
        observe.latency("node_request", time.perf_counter() - t0, op=type(req).__name__.lower())
        return reply

    def _handle(self, conn: _Conn, req: Any) -> Any:
        tenant = conn.tenant
        assert tenant is not None
        if isinstance(req, (W.Hello, W.Auth)):
            raise AuthFailed("already authenticated")
        if isinstance(req, (W.AdminList, W.AdminRevoke, W.AdminMetrics)):
            if not tenant.admin:
                raise AccessDenied("admin requests need the node's admin secret")
            return self._admin(req)
        if tenant.admin:
            raise AccessDenied("the admin holds no leases: connect as a tenant")
        if isinstance(req, W.Connect):
            assert conn.session is not None
            return W.Connected(params=conn.session.connect(dict(req.params)))
        if isinstance(req, W.Alloc):
            ttl = min(req.ttl, self.policy.max_ttl(tenant))
            lease = self.table.alloc(req.nbytes, ttl, tenant=tenant.name, quota_bytes=tenant.quota_bytes,
                                     max_leases=tenant.max_leases)
            observe.count("node_bytes_granted", lease.nbytes, tenant=tenant.name)
            self._gauges()
            cap = self._mint(tenant, lease, OWNER)
            return self._granted(conn, lease, cap)
        if isinstance(req, W.Attach):
            lease = self._lease(tenant, req.lease_id, req.cap, ATTACH)
            return self._granted(conn, lease, req.cap)
        if isinstance(req, W.Renew):
            lease = self._lease(tenant, req.lease_id, req.cap, RENEW)
            remaining = self.table.renew(lease.lease_id, min(req.ttl, self.policy.max_ttl(tenant)))
            return W.Renewed(lease_id=lease.lease_id, remaining=remaining,
                             cap=self._mint(tenant, lease, req.cap.rights))
        if isinstance(req, W.Free):
            self._check(tenant, req.lease_id, req.cap, REVOKE, allow_expired=True)
            self.table.free(req.lease_id)
            self._gauges()
            return W.Done(lease_id=req.lease_id)
        if isinstance(req, W.Revoke):
            self._check(tenant, req.lease_id, req.cap, REVOKE)
            self.table.revoke(req.lease_id)
            self._gauges()
            return W.Done(lease_id=req.lease_id)
        if isinstance(req, W.Status):
            self._check(tenant, req.lease_id, req.cap, 0, allow_expired=True)
            state, gen, remaining = self.table.status(req.lease_id)
            return W.LeaseStatus(lease_id=req.lease_id, state=state, generation=gen, remaining=remaining)
        if isinstance(req, W.Share):
            lease = self._lease(tenant, req.lease_id, req.cap, SHARE)
            if req.rights & ~req.cap.rights:
                raise CapabilityDenied("a shared capability cannot hold rights its source lacks")
            # A shared capability goes into refs and locators that others read later: it lasts the
            # tenant's max TTL from now (not the lease's current deadline, which the owner's renewals move),
            # and is good only while the lease lives, like every capability.
            expiry = self.clock.now_ns() + int(self.policy.max_ttl(tenant) * 1e9)
            return W.Shared(lease_id=lease.lease_id, cap=self._mint(tenant, lease, req.rights, expiry))
        raise Corrupted(f"unexpected request {type(req).__name__}")  # pragma: no cover (union is closed)

    def _check(self, tenant: TenantPolicy, lease_id: str, cap: W.Cap, need: int, *,
               allow_expired: bool = False) -> None:
        self.caps.check(tenant.name, lease_id, cap, need, self.clock.now_ns(), allow_expired=allow_expired)

    def _lease(self, tenant: TenantPolicy, lease_id: str, cap: W.Cap, need: int) -> ServerLease:
        """The live lease ``lease_id`` for a caller holding ``cap`` with rights ``need``."""
        self._check(tenant, lease_id, cap, need)
        lease = self.table.attach(lease_id, cap.generation)  # Revoked / LeaseExpired once it is gone
        if lease.tenant != tenant.name:  # cannot happen with a good MAC
            raise CapabilityDenied(f"no valid capability for lease {lease_id[:8]}... and this operation")
        return lease

    def _mint(self, tenant: TenantPolicy, lease: ServerLease, rights: int, expiry_ns: int | None = None) -> W.Cap:
        expiry = lease.deadline_ns if expiry_ns is None else expiry_ns
        return self.caps.mint(tenant.name, lease.lease_id, lease.generation, rights, expiry)

    def _granted(self, conn: _Conn, lease: ServerLease, cap: W.Cap) -> W.Granted:
        assert lease.span is not None and conn.session is not None
        writable = bool(cap.rights & WRITE)
        if conn.session not in lease.holders:
            lease.holders.append(conn.session)
        return W.Granted(
            lease_id=lease.lease_id, generation=lease.generation, nbytes=lease.nbytes, ttl=lease.ttl,
            remaining=self.table.remaining(lease), writable=writable, access=dict(lease.span.access(writable)),
            cap=cap)

    def _admin(self, req: Any) -> Any:
        if isinstance(req, W.AdminRevoke):
            self.table.revoke(req.lease_id)
            self._gauges()
            log.info("admin revoked lease %s", req.lease_id)
            return W.Done(lease_id=req.lease_id)
        if isinstance(req, W.AdminMetrics):
            obs = observe.current()
            return W.Metrics(text=observe.prometheus_text(obs) if obs is not None else "")
        leases = self.table.leases()
        tenants = []
        for name, t in sorted(self.policy.tenants.items()):
            if t.admin:
                continue
            use = self.table.usage(name)
            tenants.append(W.TenantRow(tenant=name, leases=use.leases, bytes=use.bytes,
                                       connections=self._per_tenant.get(name, 0),
                                       quota_bytes=t.quota_bytes or self.table.allocator.size,
                                       max_leases=t.max_leases))
        rows = [W.LeaseRow(lease_id=lease.lease_id, tenant=lease.tenant, generation=lease.generation,
                           nbytes=lease.nbytes, offset=lease.offset, remaining=self.table.remaining(lease),
                           holders=len(lease.holders)) for lease in leases]
        return W.Listing(node=self.node_tag, driver=self.driver, pool_bytes=self.table.allocator.size,
                         free_bytes=self.table.allocator.free_bytes,
                         quarantined_bytes=self.table.quarantined_bytes, connections=len(self._conns),
                         tenants=tenants, leases=rows)

    def _gauges(self) -> None:
        if observe.current() is None:
            return
        for name in self.policy.tenants:
            use = self.table.usage(name)
            observe.gauge("node_leases", use.leases, tenant=name)
            observe.gauge("node_lease_bytes", use.bytes, tenant=name)
        observe.gauge("node_pool_free_bytes", self.table.allocator.free_bytes)


class _Idle(Exception):
    """No frame started within the allowed time."""


class _Hangup(Exception):
    """End this connection, after sending ``reply`` (best effort) if there is one."""

    def __init__(self, reply: Any = None) -> None:
        super().__init__()
        self.reply = reply


