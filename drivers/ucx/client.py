"""The client's UCX data plane towards one node (:class:`UcxConnector`) and the ucx:// fabric.

:class:`UcxFabric` is a :class:`RemoteFabric` (leases, capabilities and auth
are the node package's) whose data plane is one UCX context per fabric and one
:class:`UcxConnector` (endpoint) per node; :func:`parse_ucx_url` and
:func:`open_ucx_fabric` are what ``open_fabric("ucx://...")`` uses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, cast, overload
from urllib.parse import parse_qs, urlsplit

from grafos_fabric.errors import Corrupted, Disconnected, FabricValueError, QueueClosed, Unsupported
from grafos_fabric.lease import Lease

from ..base import Fabric
from ..node.client import RemoteFabric
from ..node.registrar import Grant, NodeLink
from ..node.shmfile import open_span_file, span_file_name_ok
from .binding import CONNECT_TIMEOUT, DEFAULT_OP_TIMEOUT, UcxContext, UcxEndpoint, require, ucx_config
from .region import UcxMappedRegion, UcxRegion

__all__ = ["UcxConnector", "UcxFabric", "open_ucx_fabric", "parse_ucx_url"]

log = logging.getLogger(__name__)

#: After a reconnect to a node failed, the connector's next operations fail at once with
#: ``Disconnected`` for this long, without reaching for the node again, unless the control
#: channel was reopened meanwhile (an alloc, a lease query or :meth:`UcxConnector.warm` found
#: the node back: ``link.session_epoch`` moved) or the caller probes (``warm``). Every handle on
#: a node that died (a retired queue given back, a standby closed) otherwise pays a connect
#: attempt per operation: refused at best, the control timeout on a host that is gone.
DOWN_HOLD_S = 0.25


class UcxConnector:
    """This client's UCX data plane towards one node: one endpoint, (re)connected on demand.

    ``ctx`` is the client fabric's context (shared by its connectors). The
    control session's ``link.connect({})`` opens a UCX listener for this client
    on the node and answers its port; the endpoint connects there
    (``info["ucx_host"]``, or the node's control host). After an
    endpoint error, a deadline, a fence, or a new control session
    (``link.session_epoch``) the next operation connects a new one.
    """

    def __init__(self, ctx: UcxContext, link: NodeLink, *, timeout: float = DEFAULT_OP_TIMEOUT,
                 fabric: Any = None) -> None:
        self.ctx = ctx
        self.link = link
        self.fabric = fabric  # the RemoteFabric (refs with capabilities, lease cells); None in bare use
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._ep: UcxEndpoint | None = None
        self._epoch = -1
        self.generation = 0  # grows with each new endpoint: regions re-unpack their rkeys
        self.reconnects = 0
        self._retired: list[UcxEndpoint] = []  # shut down, freed at close (regions may still hold them)
        self._closed = False
        self._down_at = 0.0  # monotonic time of the last failed reconnect ...
        self._down_epoch = -1  # ... and the control session epoch it failed on (-1: none failed)
        self.held = 0  # operations failed at once during a hold (DOWN_HOLD_S)

    def endpoint(self, *, probe: bool = False) -> tuple[UcxEndpoint, int]:
        """The working endpoint, (re)connected if needed. Within :data:`DOWN_HOLD_S` of a failed
        reconnect on the same control session, :class:`Disconnected` at once (``probe``: try anyway)."""
        with self._lock:
            if self._closed:
                raise QueueClosed("the UCX connector is closed")
            ep = self._ep
            if ep is not None and not ep.failed and self._epoch == self.link.session_epoch:
                return ep, self.generation
            if ep is not None:
                self._retire(ep)
            epoch = self.link.session_epoch
            if not probe and self._down_epoch == epoch:
                ago = time.monotonic() - self._down_at
                if ago < DOWN_HOLD_S:
                    self.held += 1
                    raise Disconnected(f"memory node {self.link.host}:{self.link.port} did not answer a reconnect "
                                       f"{ago * 1e3:.1f} ms ago (not tried again for {DOWN_HOLD_S * 1e3:.0f} ms)")
            try:
                reply = self.link.connect({})
                port = reply.get("ucx_port")
                if not isinstance(port, int) or not 0 < port < 65536:
                    raise Unsupported(f"node {self.link.host}:{self.link.port} sent no UCX port (is it a UCX node?)")
                host = str(self.link.info.get("ucx_host") or self.link.host)
                new = UcxEndpoint.connect(self.ctx, host, port, min(self.timeout, CONNECT_TIMEOUT))
            except Disconnected:
                self._down_at, self._down_epoch = time.monotonic(), self.link.session_epoch
                raise
            self._down_epoch = -1
            # the session the listener (and so the endpoint) belongs to: link.connect may have reopened
            # the control channel (a node that restarted), and an endpoint stored with the epoch from
            # before would be replaced again by the next operation
            self._ep, self._epoch = new, self.link.session_epoch
            self.generation += 1
            return new, self.generation

    def warm(self) -> None:
        """Have a working endpoint now (a standby node: a later alloc or attach pays no connect).

        One pass of the worker first, so a node that died since (its endpoint's
        error callback) is noticed; its control channel is then found broken
        once and reopened at once. Raises :class:`Disconnected` while the node
        is down."""
        with self._lock:
            self.ctx.progress()
            try:
                self.endpoint(probe=True)
            except Disconnected:
                self.endpoint(probe=True)  # the old control channel broke with the node: once more, on a new one

    def _retire(self, ep: UcxEndpoint) -> None:
        ep.shutdown()
        self._retired.append(ep)
        self._ep = None
        self.reconnects += 1

    def invalidate(self, ep: UcxEndpoint) -> None:
        """The endpoint failed (the C side already force-closed its UCX half): the next operation reconnects."""
        with self._lock:
            if self._ep is ep:
                self._retire(ep)

    @overload
    def region(self, lease: Lease, grant: Grant) -> UcxRegion: ...
    @overload
    def region(self, lease: Lease, grant: Grant, *, mapped: bool) -> UcxRegion | UcxMappedRegion: ...

    def region(self, lease: Lease, grant: Grant, *, mapped: bool = False) -> UcxRegion | UcxMappedRegion:
        """The region of a grant: mapped here when asked for (``mapped``) and possible (a ``local_map``
        node on this host, this user, a writable grant), else one-sided (the reason logged at debug).
        A grant whose span file is not shaped like one of the node's raises :class:`Corrupted`."""
        if mapped:
            m = self._mapped(lease, grant)
            if m is not None:
                return m
        return UcxRegion(self, lease, grant)

    def _mapped(self, lease: Lease, grant: Grant) -> UcxMappedRegion | None:
        path = grant.access.get("path")
        node_dir = self.link.info.get("shm_dir")
        where = f"lease {lease.id} on {self.link.host}:{self.link.port}"
        if path is None or node_dir is None:
            log.debug("%s: one-sided (the node does not map spans locally: no --ucx-local-map)", where)
            return None
        if not span_file_name_ok(path, node_dir):
            raise Corrupted(f"the grant of {where} names no span file of this node: {path!r} (node dir {node_dir!r})")
        assert isinstance(path, str) and isinstance(node_dir, str)
        if not grant.writable:
            log.debug("%s: one-sided (a read-only grant is never mapped: the native ring writes to it)", where)
            return None
        fabric = self.fabric
        cell = fabric.cell(lease.id) if fabric is not None and hasattr(fabric, "cell") else None
        if cell is None or not hasattr(cell, "bind_shared"):
            log.debug("%s: one-sided (no lease cell that can share its words)", where)
            return None
        try:
            fd = open_span_file(path, node_dir, writable=True)
        except Unsupported as ex:
            log.debug("%s: one-sided (%s)", where, ex)
            return None
        return UcxMappedRegion(self, lease, grant, fd, cell)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ep, self._ep = self._ep, None
            retired, self._retired = self._retired, []
        if ep is not None:
            ep.close(force=False)
        for old in retired:
            old.close()


def parse_ucx_url(url: str) -> tuple[str, int, dict[str, str]]:
    """``ucx://HOST:PORT[?tls=tcp&net_devices=lo&timeout=5&progress=busy|event&tenant=...&map=local]``.

    Returns ``(host, port, options)``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "ucx":
        raise FabricValueError(f"not a ucx:// URL: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise FabricValueError(f"bad port in {url!r}") from None
    host = parts.hostname or ""
    if not host or not port:
        raise FabricValueError(f"ucx:// URLs name the node's control channel: ucx://HOST:PORT, got {url!r}")
    known = {"tls", "net_devices", "timeout", "progress", "tenant", "map"}
    opts: dict[str, str] = {}
    for key, values in parse_qs(parts.query).items():
        if key not in known:
            raise FabricValueError(f"unknown option {key!r} in {url!r} (known: {', '.join(sorted(known))})")
        opts[key] = values[-1]
    return host, port, opts


class UcxFabric(RemoteFabric):
    """A client of UCX memory nodes: ``ucx://HOST:PORT[?tenant=&tls=tcp&net_devices=eth0&op_timeout=5&map=local]``.

    Leases, capabilities and auth are the node package's (:class:`RemoteFabric`);
    the data plane is one UCX context per fabric and one :class:`UcxConnector`
    (endpoint) per node. ``tls``/``net_devices`` restrict UCX's transports and
    interfaces for this client (``UCX_TLS``/``UCX_NET_DEVICES`` in the
    environment apply too); ``op_timeout`` is every operation's deadline.

    ``map=local`` (``local_map=True``): where the URL's node maps its spans
    locally (``serve --ucx-local-map``) and runs on this host as this user,
    ``alloc`` and ``attach(ref, mapped=True)`` give regions mapped into this
    process (:class:`~.region.UcxMappedRegion`: ``mapped_regions`` is then
    true, and ``FabricQueue`` runs its native ring on them); anywhere else the
    regions are one-sided as without it (the reason logged at debug).
    ``attach(ref, mapped=False)`` is always one-sided.
    """

    driver = "ucx"
    schemes = ("ucx",)
    url_options = frozenset({"tls", "net_devices", "op_timeout", "map"})

    def __init__(self, host: str, port: int, *, tls: str | None = None, net_devices: str | None = None,
                 op_timeout: float = DEFAULT_OP_TIMEOUT, local_map: bool = False, **kwargs: Any) -> None:
        require()
        if not op_timeout > 0:
            raise FabricValueError(f"op_timeout must be positive, got {op_timeout}")
        self.ucx = UcxContext(ucx_config(tls, net_devices))
        self.op_timeout = float(op_timeout)
        self.local_map = bool(local_map)
        self.mapped_regions = False
        try:
            super().__init__(host, port, **kwargs)
            ch = self.channel()  # authenticate now: a wrong secret fails before any lease
        except BaseException:
            self.ucx.close()
            raise
        if self.local_map:
            self.mapped_regions = _can_map(ch.info.get("shm_dir"), f"{host}:{port}")

    @classmethod
    def url_kwargs(cls, opts: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {"tls": opts.get("tls"), "net_devices": opts.get("net_devices")}
        if "op_timeout" in opts:
            out["op_timeout"] = float(opts["op_timeout"])
        if "map" in opts:
            if opts["map"] not in ("local", "none"):
                raise FabricValueError(f"map={opts['map']!r}: the choices are map=local and map=none")
            out["local_map"] = opts["map"] == "local"
        return out

    def connector(self, link: Any) -> UcxConnector:
        return UcxConnector(self.ucx, link, timeout=self.op_timeout, fabric=self)

    def warm(self, host: str | None = None, port: int | None = None) -> None:
        """Connect to a node (default: the URL's) now, control channel and UCX endpoint, and
        reconnect it if it restarted: a failover to a standby node then pays no connect.
        Cheap when nothing changed (one worker pass); :class:`Disconnected` while the node is down."""
        conn = self._node(host or self.host, port or self.port)[1]
        assert isinstance(conn, UcxConnector)
        conn.warm()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.ucx.close()


def _can_map(node_dir: object, where: str) -> bool:
    """Whether this process can map the spans of a node whose span directory is ``node_dir``:
    it exists here (same host), is a real directory of this user, mode 0700."""
    if not isinstance(node_dir, str) or not node_dir:
        log.debug("ucx node %s does not map spans locally (no --ucx-local-map): regions are one-sided", where)
        return False
    try:
        st = os.lstat(node_dir)
    except OSError as ex:
        log.debug("ucx node %s: its span directory %s is not here (%s): regions are one-sided", where, node_dir,
                  ex.strerror)
        return False
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o777 != 0o700:
        log.debug("ucx node %s: its span directory %s is not a 0700 directory of this user: regions are one-sided",
                  where, node_dir)
        return False
    return True


def open_ucx_fabric(url: str, *, clock: Any = None, token_file: Any = None) -> Fabric:
    """``open_fabric("ucx://HOST:PORT?...")``: :class:`Unsupported` with the reason where UCX is absent."""
    require()
    return cast("Fabric", UcxFabric.from_url(url, clock=clock, token_file=token_file))
