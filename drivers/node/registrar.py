"""The two seams a remote driver plugs into the memory node: a *registrar* on
the node, a *connector* on the client.

Everything else (wire format, tenants and HMAC auth, capabilities, lease
table, allocator, quotas, reaper, the event-driven server, the control
client, lease cells, ``RemoteFabric``) lives in :mod:`grafos_fabric.drivers.node`
and is the same for every driver. A driver supplies exactly these objects::

    node side                                  client side
    ---------                                  -----------
    Registrar (one per node)                   RemoteFabric subclass (one per process/URL)
      .name                 "verbs"/"ucx"/..     .driver = Registrar.name
      .node_info() -> Access                     .connector(link) -> Connector   (one per node)
      .register(off, n) -> RegisteredSpan        Connector
      .fence(span, holders)                        .region(lease, grant) -> Region
      .deregister(span)                            .close()
      .open_session(peer) -> RegistrarSession
      .close()                                 NodeLink (given to the connector by the node package)
    RegisteredSpan                               .call(request, expect) / .connect(params) -> Access
      .offset, .nbytes                           .info: Access  (Registrar.node_info, after auth)
      .access(writable) -> Access                .host, .port
    RegistrarSession (one per control connection)
      .connect(params: Access) -> Access
      .close()

``Access`` is a small dict that msgspec encodes (keys matching
``[a-z0-9_]{1,32}``; ``int``, ``bool`` or ``str`` values, strings at most
8192 characters, so binary values such as a packed UCX rkey or a worker
address travel as hex; at most :data:`MAX_ACCESS_ITEMS` entries): what a
client needs to reach a span (verbs: ``addr``, ``rkey``; UCX: ``addr``, the
packed ``rkey`` as hex) or to set up its data plane
(verbs: QP number, PSN, LID, GID, MTU; UCX: the worker address). The node
never interprets it; it only carries it, inside an authenticated session,
to the tenant that holds the lease's capability.

Life of a lease, as the node drives the registrar (calls are serialized:
they come from the node's event-loop thread, or under the lease table's lock
when another thread asks the table for a status, so a registrar needs no
locking of its own unless it starts threads):

1. ``alloc``: the allocator picks a page-aligned ``offset``;
   ``register(offset, nbytes)`` makes ``[offset, offset + nbytes)`` of the
   pool reachable and returns a span. The span's bytes must read as zeros
   (no bytes leak between tenants). An exception -> the offset goes back to
   the pool and the client gets the (typed) error.
2. ``alloc``/``attach``: the client receives ``span.access(writable)``,
   where ``writable`` is false for a read-only capability (a registrar that
   cannot restrict access in the transport returns the same dict; the
   client library then refuses writes itself: say so in your docstring).
   The node records the :class:`RegistrarSession` of every connection that
   received the access ("holders").
3. ``revoke``/``free``/expiry: ``fence(span, holders)`` first: make every
   later remote access by a holder fail (verbs: nothing to do, deregistering
   the MR kills the rkey; UCX over tcp/sm: close the holders' endpoints),
   then ``deregister(span)``. If either raises, the span is *quarantined*:
   its bytes are never handed out again (a stale rkey must never reach a new
   tenant's data).
4. Node shutdown: every live lease is retired as in 3, then every session is
   closed, then ``Registrar.close()``.

Per connection: ``open_session(peer)`` when a client has authenticated;
``session.connect(params)`` for each ``connect`` request (verbs: QP
exchange; a reconnect after an error replaces the previous data-plane
state); ``session.close()`` when the connection ends (idle timeout, error,
client close, node shutdown). A session must not keep the registrar alive
beyond ``Registrar.close()`` (parents hold children, not the reverse).

Client side: the node package authenticates, keeps one :class:`NodeLink`
per node and calls ``fabric.connector(link)`` once per node (after auth).
For each grant it calls ``connector.region(lease, grant)``, where ``lease``
is a :class:`~grafos_fabric.lease.Lease` already wired to the node (renew,
revoke, free, status) and ``grant`` a :class:`Grant` (lease id, generation,
size, whether writes are allowed, and the ``access`` dict). The region
implements the one-sided half of :class:`grafos_fabric.drivers.base.Region`
and checks ``lease.check()`` before every operation (fail closed); on a
transport error that may mean "the lease is gone" it asks
``link.lease_state(lease_id)`` (``active``/``expired``/``revoked``/``freed``
/``unknown``) to pick ``Revoked``/``LeaseExpired``/``Disconnected``.

The client fabric of a driver is a subclass of
:class:`grafos_fabric.drivers.node.client.RemoteFabric`, which does the URL,
the secret (``token_file=`` or ``$GRAFOS_TOKEN_FILE``), the tenant, auth,
leases, capabilities and the driver protocol's ``alloc``/``attach``/``free``
/``reap``/``close``::

    class UcxFabric(RemoteFabric):
        driver = "ucx"                   # must equal the node's Registrar.name
        schemes = ("ucx",)               # URL schemes it answers: ucx://HOST:PORT?tenant=...
        def connector(self, link: NodeLink) -> Connector: ...
        def close(self) -> None: ...     # close own resources, then super().close()

    RemoteFabric(host, port, *, tenant="default", token_file=None, clock=None,
                 timeout=10.0)           # or RemoteFabric.from_url(url, token_file=..., clock=...)

A region's :meth:`ref` is built by the base (``fabric.region_ref(lease,
rights)``): ``RegionRef(driver, name=<capability token>, lease_id,
generation, namespace=<tenant>, host, port, nbytes)``; the access dict never
goes into a ref or a locator (a consumer attaches with the capability and
gets its own grant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from grafos_fabric.lease import Lease

from ..base import Region

__all__ = [
    "MAX_ACCESS_ITEMS",
    "Access",
    "Connector",
    "Grant",
    "NodeLink",
    "RegisteredSpan",
    "Registrar",
    "RegistrarSession",
]

MAX_ACCESS_ITEMS = 32
Access = dict[str, Any]  # values: int (|v| < 2**63, or 0 <= v < 2**64), bool, str (binary as hex); see wire.AccessMap


# ---------------------------------------------------------------------------
# Node side
# ---------------------------------------------------------------------------


@runtime_checkable
class RegisteredSpan(Protocol):
    """A span of the pool made reachable by a registrar."""

    offset: int
    nbytes: int

    def access(self, writable: bool) -> Access:
        """What a client needs to reach the span (e.g. ``{"addr": ..., "rkey": ...}``)."""
        ...


@runtime_checkable
class RegistrarSession(Protocol):
    """Per-connection data-plane state on the node (verbs: the session's QP)."""

    def connect(self, params: Access) -> Access:
        """Set up (or replace) this connection's data plane; returns the node's half."""
        ...

    def close(self) -> None:
        """Release the session's resources. Idempotent."""
        ...


@runtime_checkable
class Registrar(Protocol):
    """Makes spans of the node's pool remotely reachable, and takes that away."""

    name: str  # the driver: "verbs", "ucx", "nodeshm"; clients check it against theirs
    pool_size: int  # bytes the allocator may hand out: spans are [offset, offset+nbytes) in [0, pool_size)

    def node_info(self) -> Access:
        """Node-wide data for every authenticated client (verbs: the atomic probe word's addr/rkey)."""
        ...

    def register(self, offset: int, nbytes: int) -> RegisteredSpan:
        """Make ``[offset, offset + nbytes)`` reachable; its bytes read as zeros."""
        ...

    def fence(self, span: RegisteredSpan, holders: list[RegistrarSession]) -> None:
        """Make every later remote access to ``span`` by ``holders`` fail (before ``deregister``)."""
        ...

    def deregister(self, span: RegisteredSpan) -> None:
        """Take remote access to ``span`` away for good. Raising quarantines the span."""
        ...

    def open_session(self, peer: str) -> RegistrarSession:
        """Per-connection state for an authenticated client at ``peer`` ("host:port")."""
        ...

    def close(self) -> None:
        """Release everything (after every span was deregistered and every session closed)."""
        ...


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """What the node granted this client for one lease (alloc or attach)."""

    lease_id: str
    generation: int
    nbytes: int
    ttl: float
    writable: bool
    access: Access


@runtime_checkable
class NodeLink(Protocol):
    """This client's authenticated control channel to one node (reconnects when broken)."""

    host: str
    port: int
    tenant: str
    info: Access  # Registrar.node_info() as the node sent it

    def connect(self, params: Access) -> Access:
        """``RegistrarSession.connect`` on the node, for this client's current session."""
        ...

    def lease_state(self, lease_id: str) -> str:
        """The node's view of a lease this client holds: active/expired/revoked/freed/unknown."""
        ...

    @property
    def session_epoch(self) -> int:
        """Grows by one each time the control channel was re-established (a new node-side session:
        data-plane state set up with :meth:`connect` must be set up again)."""
        ...


@runtime_checkable
class Connector(Protocol):
    """A driver's client half towards one node: turns grants into regions."""

    def region(self, lease: Lease, grant: Grant) -> Region:
        """A region for ``grant`` (one-sided: ``mapped = False``) that checks ``lease`` first.

        A connector whose fabric sets ``mapped_regions`` (the ucx driver with ``map=local``) also
        takes ``mapped=True`` and may then return a region mapped into this process."""
        ...

    def close(self) -> None:
        """Close this node's data plane (its regions fail closed afterwards). Idempotent."""
        ...
