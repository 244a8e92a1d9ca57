"""The UCX driver: leased regions on a memory node, reached with one-sided UCX (libucp) operations.

UCX gives the same one-sided operations as RDMA verbs (put, get, 64-bit
compare-and-swap and fetch-and-add) over InfiniBand/RoCE where present and
over TCP and shared memory everywhere else, so this is the driver that makes
the cross-host path real on machines without an RDMA device. The binding is
:mod:`grafos_fabric._ucx` (``native/gf_ucx.c``): one C call per operation
(post, wait with a deadline and the endpoint's error flag, free), GIL
released; it is built only where UCX's headers were found, and
:func:`available` says why not otherwise.

=============  ===================================================================
``binding``    the loaded binding (:func:`available`, :func:`version`), one owner
               per C object: :class:`UcxContext`, :class:`UcxEndpoint`, :class:`Rkey`
``registrar``  node side: :class:`UcxRegistrar`, :class:`UcxSession`, :class:`UcxSpan`
``client``     client side: :class:`UcxFabric` (``ucx://HOST:PORT``),
               :class:`UcxConnector` (one endpoint per node)
``region``     :class:`UcxRegion`: the driver protocol, one C call per operation;
               :class:`UcxMappedRegion`: a ``local_map`` node's span mapped on its host
=============  ===================================================================

Players (plugged into the memory node's seams, :mod:`grafos_fabric.drivers.node.registrar`):

* node side, :class:`UcxRegistrar`: owns the pool (anonymous memory, mapped
  for the node's whole life), a UCX worker with a **dedicated progress
  thread** (over tcp/sm the node's CPU executes every remote operation inside
  ``ucp_worker_progress``; ``progress="busy"`` polls without pause, lowest
  latency, one core; ``"event"`` sleeps on the worker's fd, no idle CPU) and a
  UCX worker and listener **per control session** (opened by the session's
  ``connect``, which answers the listener's port). Each span is
  ``ucp_mem_map``-ed on its own; its access is ``{"addr", "rkey" (packed,
  hex)}``.
* client side, :class:`UcxConnector` (one per node) and :class:`UcxRegion`:
  one endpoint per node, (re)connected on demand; regions unpack the rkey per
  endpoint.
* local mapping (``UcxRegistrar(local_map=True)``, ``serve --ucx-local-map``;
  clients ``ucx://...?map=local``): each span is an owner-only file under
  /dev/shm mapped over its range of the pool, so a client on the node's host,
  as the node's user, maps it (:class:`UcxMappedRegion`) and runs the native
  ring on it (no UCX operation per item), while remote clients keep reaching
  the same pages one-sided (see :mod:`.registrar`).

Fencing (why the node does it): over tcp and sm, ``ucp_mem_unmap`` does not
stop remote access, and an rkey is an address hint, not a capability: any
connected peer can read or write any address of the node process. So on
revoke, free or expiry the node **destroys the UCX worker of every session
that held the lease** (:meth:`UcxRegistrar.fence`) before the span is
unmapped and reused. Closing only the node's endpoint is not enough: measured
on UCX 1.13 over tcp, the client's operations kept landing after the node
force-closed its endpoint (the tcp transport reconnects underneath); with the
worker gone they fail. The pool itself is never unmapped
while the node runs (a write into unmapped memory would kill the node). Run
UCX memory nodes on a trusted network only; on a real HCA, rkey enforcement by
the hardware is what really fences (to be verified on one).

Liveness: UCX reports neither a stopped node nor a dead link, and with error
mode NONE (the only one whose atomics work on UCX 1.13 and >= 1.16) an
operation in flight to a dead peer never completes. Every operation therefore
has a deadline (``timeout``, default :data:`DEFAULT_OP_TIMEOUT`); a missed
deadline or an endpoint error force-closes the endpoint (cancelling what was
in flight: no caller buffer is touched after the call returns) and maps to
:class:`Disconnected`, unless the node, asked over the control channel, says
the lease is ``revoked`` (:class:`Revoked`) or gone (:class:`LeaseExpired`).
The next operation reconnects.

Ordering: every operation completes (locally) before it returns; a put is
remotely visible only after a flush, so ``store64`` (release) and ``write``
followed by :meth:`UcxRegion.flush` are put + ``ucp_ep_flush_nbx``;
``load64`` (acquire) is a get, which completes only with the data.

Atomicity: UCX atomics are atomic against each other on the same word and,
over tcp/sm (executed by the node's CPU with lock-prefixed instructions),
against the node's own CPU atomics. On an HCA, device atomics need not be
coherent with CPU atomics: set ``UCX_ATOMIC_MODE=cpu`` or never mix.
"""

from __future__ import annotations

from . import binding
from .binding import (
    CONNECT_TIMEOUT,
    DEFAULT_OP_TIMEOUT,
    Rkey,
    UcxContext,
    UcxEndpoint,
    available,
    ffi,
    lib,
    ucx_config,
    version,
)
from .client import UcxConnector, UcxFabric, open_ucx_fabric, parse_ucx_url
from .region import UcxMappedRegion, UcxRegion
from .registrar import UcxRegistrar, UcxSession, UcxSpan

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_OP_TIMEOUT",
    "Rkey",
    "UcxConnector",
    "UcxContext",
    "UcxEndpoint",
    "UcxFabric",
    "UcxMappedRegion",
    "UcxRegion",
    "UcxRegistrar",
    "UcxSession",
    "UcxSpan",
    "available",
    "binding",
    "ffi",
    "lib",
    "open_ucx_fabric",
    "parse_ucx_url",
    "ucx_config",
    "version",
]
