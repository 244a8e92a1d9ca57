"""The memory node: one authenticated, bounded control plane for every remote driver.

A memory node (``grafos-fabric serve``) owns a pool of memory and grants
leases on spans of it over a TCP control channel; clients then reach their
spans one-sided through a driver's data plane (RDMA verbs, UCX, or shared
memory on the same host). This package is everything that is the same for
every such driver; a driver only adds a *registrar* on the node and a
*connector* on the client. The seams are specified in
:mod:`grafos_fabric.drivers.node.registrar` (read that first when adding a
driver).
"""

from __future__ import annotations

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
