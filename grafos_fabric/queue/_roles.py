"""Producer and consumer ids in the ring header, and taking back a dead holder's role.

An id carries the holder's pid (for people reading ``inspect``; never for
liveness) and, for holders that keep the region's role lock while they hold
the role, the ``_LOCKED_ROLE`` marker; only such a holder can be proven gone
(its lock is free), and only then is its role reclaimed."""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from .._ffi import ffi, lib

log = logging.getLogger(__name__)

_PRODUCER_ID_OFF = int(ffi.offsetof("gf_ring_header", "producer_id"))
_CONSUMER_ID_OFF = int(ffi.offsetof("gf_ring_header", "consumer_id"))

_LOCKED_ROLE = int(lib.GF_ROLE_LOCKED)  # marks an id whose holder keeps the region's role lock while it holds the role
_ROLE_PRODUCER = 0  # the role-lock bytes (drivers.shm.ROLE_PRODUCER / ROLE_CONSUMER)
_ROLE_CONSUMER = 1


def _role_id(*, locked: bool) -> int:
    """A producer/consumer id: the lock marker, the holder's pid in bits 62..32
    (for people reading ``inspect``: pids are not unique across pid
    namespaces, so liveness never rests on them), random low bits."""
    return (_LOCKED_ROLE if locked else 0) | ((os.getpid() & 0x7FFFFFFF) << 32) | secrets.randbits(32) | 1


def _reclaim_role(ring: Any, offset: int) -> bool:
    """Free a role whose holder is gone (crashed, or dropped its handle, without ``close``).

    Called only while this handle holds the role's lock: a holder id that says
    it keeps that lock (``_LOCKED_ROLE``) then belongs to a holder the kernel
    has already let go of. Ids without the marker (one-sided peers) can't be
    judged and keep their role (``RoleTaken`` stands)."""
    holder = int(lib.gf_load_acquire_at(ring, offset))
    if not lib.gf_ring_reclaimable(holder):
        return False
    if int(lib.gf_cas_at(ring, offset, holder, 0)) != holder:
        return False
    log.warning("took over a queue role whose holder (pid %d, as it saw itself) is gone", (holder >> 32) & 0x7FFFFFFF)
    return True
