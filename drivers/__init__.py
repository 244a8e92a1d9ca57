"""Drivers (imported as ``grafos_fabric.drivers``) and the one place that
names the default: ``open_fabric()`` picks ``$GRAFOS_FABRIC``, else
``shm://default``.

URLs: ``shm://NAMESPACE`` (POSIX shared memory, any Linux machine),
``rdma://HOST:PORT`` (a memory node reached with one-sided RDMA verbs),
``ucx://HOST:PORT`` (a memory node reached with one-sided UCX operations:
tcp, sm, or IB/RoCE) and
``nodeshm://HOST:PORT`` (a memory node on this host, reached through shared
memory: the device-free driver of the node package). Memory nodes need a
secret: ``open_fabric(url, token_file=PATH)`` or ``$GRAFOS_TOKEN_FILE``; the
tenant goes in the URL (``?tenant=NAME``, default ``default``).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from grafos_fabric import errors as E
from grafos_fabric.lease import Clock

from .base import Fabric, Region, RegionRef

__all__ = ["DEFAULT_URL", "Fabric", "Region", "RegionRef", "open_fabric"]

DEFAULT_URL = "shm://default"


def open_fabric(
    url: str | None = None, *, clock: Clock | None = None, token_file: str | os.PathLike[str] | None = None
) -> Fabric:
    """Open a fabric by URL (default: ``$GRAFOS_FABRIC`` or ``shm://default``).

    ``token_file`` is the memory node secret (default ``$GRAFOS_TOKEN_FILE``);
    a wrong or missing one raises :class:`~grafos_fabric.errors.AuthFailed`
    (a ``PermissionError``) here, before any lease."""
    url = url or os.environ.get("GRAFOS_FABRIC") or DEFAULT_URL
    if not isinstance(url, str):
        raise E.FabricValueError(f"fabric URL must be a string, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "shm":
        from .shm import ShmFabric

        namespace = (parts.netloc + parts.path).strip("/") or "default"
        return ShmFabric(namespace, clock=clock)
    if scheme in ("rdma", "verbs"):
        try:
            from .verbs import VerbsFabric
        except ImportError as exc:
            raise E.Unsupported(f"the verbs driver is not available: {exc}") from exc
        return VerbsFabric.from_url(url, clock=clock, token_file=token_file)
    if scheme == "ucx":
        from .ucx import open_ucx_fabric

        return open_ucx_fabric(url, clock=clock, token_file=token_file)
    if scheme == "nodeshm":
        from .node.shmfile import NodeShmFabric

        return NodeShmFabric.from_url(url, clock=clock, token_file=token_file)
    raise E.FabricValueError(
        f"unknown fabric URL {url!r}: use shm://NAMESPACE, rdma://HOST:PORT, ucx://HOST:PORT or nodeshm://HOST:PORT"
    )
