"""The memory node: one authenticated, bounded control plane for every remote driver.

A memory node (``grafos-fabric serve``) owns a pool of memory and grants
leases on spans of it over a TCP control channel; clients then reach their
spans one-sided through a driver's data plane (RDMA verbs, UCX, or shared
memory on the same host). This package is everything that is the same for
every such driver; a driver only adds a *registrar* on the node and a
*connector* on the client. The seams are specified in
:mod:`grafos_fabric.drivers.node.registrar` (read that first when adding a
driver).

=============  ====================================================================
``registrar``  the seams: Registrar / RegistrarSession / RegisteredSpan (node),
               Connector / NodeLink / Grant (client)
``wire``       the control protocol: msgspec messages, framing, errors on the wire
``auth``       token files, tenants (TOML), handshake proofs, capabilities
``table``      pool allocator and lease table (quotas, fence-then-deregister, quarantine)
``server``     :class:`NodeServer`: one asyncio loop, deadlines and limits everywhere
``client``     :class:`ControlClient`, :class:`NodeChannel`, :class:`RemoteLeaseCell`,
               :class:`RemoteFabric` (what a driver's client fabric subclasses)
``shmfile``    the ``nodeshm`` driver: a device-free registrar and client (same host)
=============  ====================================================================
"""

from __future__ import annotations

from .auth import NodeLimits, NodePolicy, TenantPolicy, load_or_create_secret, load_policy
from .client import ControlClient, NodeChannel, RemoteFabric, RemoteLeaseCell
from .registrar import (
    MAX_ACCESS_ITEMS,
    Access,
    Connector,
    Grant,
    NodeLink,
    RegisteredSpan,
    Registrar,
    RegistrarSession,
)
from .server import NodeServer
from .wire import DEFAULT_PORT, PROTOCOL_VERSION

__all__ = [
    "DEFAULT_PORT",
    "MAX_ACCESS_ITEMS",
    "PROTOCOL_VERSION",
    "Access",
    "Connector",
    "ControlClient",
    "Grant",
    "NodeChannel",
    "NodeLimits",
    "NodeLink",
    "NodePolicy",
    "NodeServer",
    "RegisteredSpan",
    "Registrar",
    "RegistrarSession",
    "RemoteFabric",
    "RemoteLeaseCell",
    "TenantPolicy",
    "load_or_create_secret",
    "load_policy",
]
