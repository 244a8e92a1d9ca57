"""Completions: polling with a timeout, and the mapping of error statuses to typed failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from grafos_fabric.errors import Disconnected, FabricError, LeaseExpired, Revoked, Unsupported

from .._verbs_compat import WC
from ..node.wire import EXPIRED, FREED, REVOKED, UNKNOWN

__all__ = ["ATOMIC_OPS", "map_completion_error", "poll_completion"]

_REMOTE_ACCESS = (WC.REM_ACCESS_ERR, WC.REM_INV_REQ_ERR, WC.REM_INV_RD_REQ_ERR)
ATOMIC_OPS = ("cas64", "faa64")


def map_completion_error(
    status: int, op: str, lease_state: Callable[[], str], *, lease_id: str = "", vendor_err: int = 0
) -> FabricError:
    """The typed failure for a completion with error ``status`` (never raises).

    * remote access / invalid request: ask the node for the lease's state
      (``lease_state()``, over the control channel): ``revoked`` ->
      :class:`Revoked`; ``expired``, ``freed`` or ``unknown`` ->
      :class:`LeaseExpired`; still ``active`` -> :class:`Disconnected` (the
      connection is rebuilt and a retry may succeed). If the node cannot be
      asked, :class:`Disconnected`.
    * ``REM_OP_ERR`` on an atomic -> :class:`Unsupported` (the responder cannot
      perform it).
    * everything else (retry exceeded, RNR retry exceeded, flush, response
      timeout, fatal, local errors) -> :class:`Disconnected`.
    """
    name = WC.NAMES.get(status, f"status {status}")
    what = f"{op} on lease {lease_id or '?'} failed: {name} (vendor error {vendor_err:#x})"
    if status in _REMOTE_ACCESS:
        try:
            state = lease_state()
        except FabricError as ex:
            return Disconnected(f"{what}; the node could not be asked for the lease state: {ex}")
        if state == REVOKED:
            return Revoked(f"{what}: the lease was revoked")
        if state in (EXPIRED, FREED, UNKNOWN):
            return LeaseExpired(f"{what}: the lease is {state}")
        return Disconnected(f"{what}, although the node reports the lease {state}")
    if status == WC.REM_OP_ERR and op in ATOMIC_OPS:
        return Unsupported(f"{what}: the responder cannot perform this atomic")
    return Disconnected(what)


def poll_completion(cq: Any, wr_id: int, timeout: float, *, spin: int = 1000) -> Any:
    """Wait for the completion of ``wr_id`` on ``cq``; returns the work completion.

    Busy-polls ``spin`` times, then yields the CPU between polls. Raises
    :class:`Disconnected` when nothing completes within ``timeout`` seconds or a
    completion for another work request turns up (every operation is waited
    for, so that means the queue pair's state is unknown). Does not look at
    the status: that is :func:`map_completion_error`'s job.
    """
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        n, wcs = cq.poll()
        if n:
            wc = wcs[0]
            if wc.wr_id != wr_id:
                raise Disconnected(f"completion for work request {wc.wr_id} while waiting for {wr_id}")
            return wc
        polls += 1
        if polls > spin:
            if time.monotonic() >= deadline:
                raise Disconnected(f"no completion for work request {wr_id} within {timeout:.3f}s")
            time.sleep(0 if polls < spin * 4 else 0.0001)
