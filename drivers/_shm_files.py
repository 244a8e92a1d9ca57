"""The shm driver's segment files in /dev/shm: names, safe opening, OFD locks, inspection.

/dev/shm is shared with every user of the host, so nothing found there is
trusted (see :mod:`grafos_fabric.drivers.shm`): the open flags that never
follow a link nor block on a FIFO (``_O_SAFE``), the checks that a file is a
regular file of this user (``_not_ours``), the OFD read lock every holder of
a private-clock region keeps on its ``clock_domain`` word (``_ofd_hold`` /
``_ofd_held``), and :func:`segment_info`, which reads a segment's header for
``grafos-fabric inspect`` without trusting it. Logs go to the driver's logger
(``grafos_fabric.drivers.shm``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
from typing import Any

from grafos_fabric._ffi import ffi, lib
from grafos_fabric.lease import (
    HOST_CLOCK_DOMAIN,
    NS,
    Clock,
    LeaseState,
    MonotonicClock,
    clock_domain,
)

__all__ = ["HEADER", "SHM_DIR", "segment_info"]

# one logger for the whole shm driver (its modules are one driver)
log = logging.getLogger("grafos_fabric.drivers.shm")

SHM_DIR = "/dev/shm"
HEADER = int(lib.GF_SEG_HEADER_SIZE)
_STATE_OFF = int(ffi.offsetof("gf_segment_header", "lease_state"))
_DEADLINE_OFF = int(ffi.offsetof("gf_segment_header", "deadline_ns"))
_DOMAIN_OFF = int(ffi.offsetof("gf_segment_header", "clock_domain"))

# Everything in /dev/shm may be planted by another user: never follow a link,
# never block in open() (a FIFO), never leak the fd into a child.
_O_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# OFD locks (Linux >= 3.15): owned by the open file description, so they are
# released exactly when the last fd of it closes, whichever process holds it.
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid
_DOMAIN_LOCK = (_DOMAIN_OFF, 8)  # held (read) by every holder of a private-clock region


def _ofd_hold(fd: int) -> bool:
    """Take a shared OFD lock on the clock_domain word; False if that is impossible here."""
    start, length = _DOMAIN_LOCK
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, start, length, 0))
        return True
    except OSError as exc:
        log.warning("cannot hold an OFD lock on a private-clock segment (%s): reapers will leave it alone", exc)
        return False


def _ofd_held(fd: int) -> bool:
    """Does any open file description hold a lock on the clock_domain word? (True when unknown.)"""
    start, length = _DOMAIN_LOCK
    try:
        res = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    except OSError:
        return True  # cannot tell: assume a holder (never reap what may be live)
    return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)


def _not_ours(st: os.stat_result) -> str | None:
    """Why a file found in /dev/shm is not one this user could have made (None: it could be)."""
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a file"
        return f"{kind}, not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
    return None


def _open_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link (never followed)"
    return exc.strerror or str(exc)


def _segment_path(namespace: str, name: str) -> str:
    return os.path.join(SHM_DIR, f"grafos.{namespace}.{name}")


def _gen_path(namespace: str) -> str:
    return os.path.join(SHM_DIR, f"grafos-gen.{namespace}")


_STATE_NAMES = {
    LeaseState.BUILDING: "building",
    LeaseState.ACTIVE: "active",
    LeaseState.REVOKED: "revoked",
    LeaseState.FREED: "freed",
}


def _inspect(fd: int, st: os.stat_result, path: str, clock: Clock) -> dict[str, Any]:
    """Judge the segment open on ``fd`` (a regular file of ours, ``st`` its fstat).

    ``status``: ok, not-ready (being built, or left half-built), version-mismatch,
    corrupted. For ``ok``, ``state``: active, expired, orphaned (a private-clock
    lease nobody holds any more), revoked, freed, or unknown(N); ``clock``:
    host or private; ``remaining`` where this process can read the clock.
    """
    size = st.st_size
    info: dict[str, Any] = {"path": path, "size": size}
    if size < HEADER:
        info["status"] = "not-ready" if size == 0 else "corrupted"
        return info
    with mmap.mmap(fd, HEADER, prot=mmap.PROT_READ) as mm:
        raw = bytes(mm[:HEADER])
        # the lease line moves (renew, revoke): read it once more with acquire loads
        live = ffi.from_buffer(mm)
        state = int(lib.gf_load_acquire_at(live, _STATE_OFF))
        deadline = int(lib.gf_load_acquire_at(live, _DEADLINE_OFF))
        del live
    buf = ffi.from_buffer(raw)
    hdr = ffi.cast("gf_segment_header *", buf)
    rc = lib.gf_segment_check(buf, size)
    info["status"] = {
        lib.GF_OK: "ok",
        lib.GF_E_NOT_READY: "not-ready",
        lib.GF_E_VERSION: "version-mismatch",
    }.get(rc, "corrupted")
    if rc != lib.GF_OK:
        return info
    domain = int(hdr.clock_domain)
    info.update(
        lease_id=bytes(ffi.buffer(hdr.lease_id, 16)).hex(),
        generation=int(hdr.generation),
        ttl=int(hdr.ttl_ns) / NS,
        owner_pid=int(hdr.owner_pid),
        payload=int(hdr.payload_size),
        state=_STATE_NAMES.get(state, f"unknown({state})"),
        clock="host" if domain == HOST_CLOCK_DOMAIN else "private",
    )
    if state != LeaseState.ACTIVE:
        return info
    if domain == HOST_CLOCK_DOMAIN:
        now: int | None = clock.now_ns() if clock_domain(clock) == HOST_CLOCK_DOMAIN else time.monotonic_ns()
    elif domain == clock_domain(clock):
        now = clock.now_ns()
    else:
        now = None  # another process's private clock: its deadline means nothing here
        if not _ofd_held(fd):
            info["state"] = "orphaned"
    if now is not None:
        info["remaining"] = (deadline - now) / NS
        if deadline <= now:
            info["state"] = "expired"
    return info


def segment_info(path: str, clock: Clock | None = None) -> dict[str, Any]:
    """Read a segment's header for inspection (``grafos-fabric ls``/``inspect``).

    Never follows a link or blocks on a FIFO; a file that is not a regular
    file of this user gets ``status: "not-ours"`` and a ``reason``. A
    host-clock lease is judged by ``CLOCK_MONOTONIC`` whatever ``clock`` is; a
    private-clock lease only by that same clock (else no ``remaining``).
    """
    clock = clock or MonotonicClock()
    try:
        fd = os.open(path, os.O_RDONLY | _O_SAFE)
    except FileNotFoundError:
        raise
    except OSError as exc:
        return {"path": path, "size": 0, "status": "not-ours", "reason": _open_error(exc)}
    try:
        st = os.fstat(fd)
        why = _not_ours(st)
        if why:
            return {"path": path, "size": st.st_size, "status": "not-ours", "reason": why}
        return _inspect(fd, st, path, clock)
    finally:
        os.close(fd)
