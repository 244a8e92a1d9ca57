"""The raw native layer (``ffi``/``lib``) and its status codes as exceptions.

Only the wrapper classes (drivers/shm.py, queue.py) call ``lib``. The compiled
module embeds its ABI number; a stale build is refused here with a message
that says how to rebuild, instead of misbehaving later.
"""

from __future__ import annotations

from typing import NoReturn

from . import errors as E

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "grafos_fabric's native module is missing: reinstall with `pip install -e .` (needs a C compiler)"
    ) from exc

EXPECTED_ABI = 9
if lib.gf_native_abi() != EXPECTED_ABI:  # pragma: no cover - only on a stale build
    raise ImportError(
        f"stale grafos_fabric native build (ABI {lib.gf_native_abi()}, this code needs {EXPECTED_ABI}): "
        "rebuild it with `pip install -e .`"
    )

__all__ = ["ffi", "lib", "raise_status"]


def raise_status(rc: int, what: str = "", *, seal_seq: int = 0, epoch: int | None = None) -> NoReturn:
    """Turn a negative native status into the matching typed exception."""
    ctx = f": {what}" if what else ""
    if rc == lib.GF_E_EXPIRED:
        raise E.LeaseExpired(f"lease expired{ctx}")
    if rc == lib.GF_E_REVOKED:
        raise E.Revoked(f"lease revoked{ctx}")
    if rc == lib.GF_E_FENCED:
        raise E.StaleEpoch(f"fenced: the queue's epoch moved past this producer's{ctx}", epoch=epoch)
    if rc == lib.GF_E_SEALED:
        raise E.QueueSealed(f"queue is sealed{ctx}", seal_seq=seal_seq)
    if rc == lib.GF_E_ROLE:
        raise E.RoleTaken(f"another process holds this role on the queue{ctx}")
    if rc == lib.GF_E_TOO_LARGE:
        raise E.ItemTooLarge(f"item larger than the queue's maximum item size{ctx}")
    if rc == lib.GF_E_CORRUPT:
        raise E.Corrupted(f"corrupted shared memory{ctx}")
    if rc == lib.GF_E_NOT_READY:
        raise E.NotReady(f"segment is still being built{ctx}")
    if rc == lib.GF_E_VERSION:
        raise E.VersionMismatch(f"segment has another layout version{ctx}")
    if rc == lib.GF_E_HELD:
        raise E.HeldItemsStall(f"too many unreleased items{ctx}")
    if rc == lib.GF_E_CLAIMED:
        raise E.FabricValueError(f"a reservation is outstanding: commit or abort it first{ctx}")
    if rc == lib.GF_E_CAPACITY:
        raise E.CapacityExceeded(f"capacity exceeded{ctx}")
    if rc == lib.GF_E_DISCONNECTED:
        raise E.Disconnected(f"disconnected{ctx}")
    if rc == lib.GF_E_ARG:
        raise E.FabricValueError(f"invalid argument{ctx}")
    raise E.FabricError(f"native status {rc}{ctx}", code=rc)
