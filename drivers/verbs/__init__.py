"""The verbs driver: leased regions on an RDMA memory node, reached with one-sided verbs.

The control plane (auth, capabilities, leases, quotas, the server and the
control client) is the memory node package, :mod:`grafos_fabric.drivers.node`,
shared by every remote driver. This package adds the verbs halves:

=================  ===============================================================
``registrar``      node side: :class:`PyverbsRegistrar` (one MR per lease, so a
                   lease taken away is one ``ibv_dereg_mr``), :class:`VerbsSession`
                   (a client's RC QP on the node), :class:`MemoryNode`
``client``         client side: :class:`VerbsFabric` (``rdma://HOST:PORT``),
                   :class:`VerbsConnector` (QP, staging, WR cache per node),
                   :class:`VerbsRegion` (the one-sided operations)
``wr``             work requests (named ``IBV_WR_*`` opcodes) and :class:`WrCache`
``completion``     polling with a timeout and the error-status mapping
``device``         pinned memory, registered local buffers, RC QP set-up
=================  ===============================================================

Why TCP for the control channel (and not rdma-cm SEND/RECV): it is simple,
it works unchanged over InfiniBand, RoCE and iWARP (the data path is what
needs RDMA; the control path is a handful of messages per lease), it is
testable on every machine, and it carries the QP connection exchange (QP
number, PSN, LID/GID), which rdma-cm would otherwise do.

Ordering and completion: every one-sided operation is posted signalled and
waited for (with a timeout) before the call returns, so program order is
completion order; ``load64`` is therefore an acquire and ``store64`` a
release, and :meth:`VerbsRegion.flush` has nothing left to wait for.

Errors: a failed completion puts the RC QP into the error state, so the
connection is rebuilt (new CQ and QP, exchanged again over the control
channel) before the next operation. The status maps to the typed failures of
:mod:`grafos_fabric.errors` (:func:`map_completion_error`): a remote access
error becomes :class:`Revoked` or :class:`LeaseExpired` according to the lease
state the node reports; retries exceeded, flushes and timeouts become
:class:`Disconnected`.

Atomicity: RDMA atomics are atomic with respect to other RDMA atomics on
the same word (``IBV_ATOMIC_HCA``: through the same HCA; ``IBV_ATOMIC_GLOB``:
also against the node's CPU). ``load64``/``store64`` are aligned 8-byte READ /
WRITE, which HCAs place as single PCIe transactions but the verbs spec does
not call atomic; the ring protocol only mixes them with atomics on words whose
writers agree on one of the two (an assumption to confirm on each HCA).

Buffers: bytes go through a per-node registered staging buffer (copied, in
chunks) unless the caller's buffer lies inside memory registered with
:meth:`VerbsFabric.register`, which READ/WRITE then use directly (zero copy).

Read-only capabilities: each lease is one MR with remote write access, so a
consumer attached read-only is refused writes by this library, not by the HCA.

Node restarts: the control channel notices a broken stream, reopens on the
next request and the QP is rebuilt; leases the new node never issued then
fail as :class:`LeaseExpired` (status ``unknown``).

Byte order: ``load64``/``store64`` use little-endian words (the ring's
format); atomics operate on the responder's native words. Both players must
be little-endian hosts (checked). Some HCAs return the *old value* of an
atomic big-endian; a client calibrates this once per connection with a
fetch-and-add of 0 on a probe word of known value that the node exposes.
"""

from __future__ import annotations

from ..node.wire import DEFAULT_PORT
from .client import (
    DEFAULT_OP_TIMEOUT,
    DEFAULT_STAGING,
    VerbsConnector,
    VerbsFabric,
    VerbsRegion,
    buffer_address,
    byte_view,
    parse_rdma_url,
)
from .completion import ATOMIC_OPS, map_completion_error, poll_completion
from .device import (
    PROBE_WORD,
    Endpoint,
    LocalBuffer,
    PinnedMemory,
    RcQp,
    build_rc_init_attr,
    build_rc_qp_attr,
    configure_rc_connect,
)
from .registrar import MemoryNode, PyverbsRegistrar, VerbsSession, VerbsSpan
from .wr import Opcode, WrCache, build_cas_wr, build_faa_wr, build_rdma_read_wr, build_rdma_write_wr

__all__ = [
    "ATOMIC_OPS",
    "DEFAULT_OP_TIMEOUT",
    "DEFAULT_PORT",
    "DEFAULT_STAGING",
    "PROBE_WORD",
    "Endpoint",
    "LocalBuffer",
    "MemoryNode",
    "Opcode",
    "PinnedMemory",
    "PyverbsRegistrar",
    "RcQp",
    "VerbsConnector",
    "VerbsFabric",
    "VerbsRegion",
    "VerbsSession",
    "VerbsSpan",
    "WrCache",
    "buffer_address",
    "build_cas_wr",
    "build_faa_wr",
    "build_rc_init_attr",
    "build_rc_qp_attr",
    "build_rdma_read_wr",
    "build_rdma_write_wr",
    "byte_view",
    "configure_rc_connect",
    "map_completion_error",
    "parse_rdma_url",
    "poll_completion",
]
