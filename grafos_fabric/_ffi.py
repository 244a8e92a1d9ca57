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

EXPECTED_ABI = 11
if lib.gf_native_abi() != EXPECTED_ABI:  # pragma: no cover - only on a stale build
    raise ImportError(
        f"stale grafos_fabric native build (ABI {lib.gf_native_abi()}, this code needs {EXPECTED_ABI}): "
        "rebuild it with `pip install -e .`"
    )

__all__ = ["ffi", "lib", "raise_status"]


# native status -> (exception, message); StaleEpoch and QueueSealed get their extra fields below
_STATUS: dict[int, tuple[type[Exception], str]] = {
    lib.GF_E_EXPIRED: (E.LeaseExpired, "lease expired"),
    lib.GF_E_REVOKED: (E.Revoked, "lease revoked"),
    lib.GF_E_FENCED: (E.StaleEpoch, "fenced: the queue's epoch moved past this producer's"),
    lib.GF_E_SEALED: (E.QueueSealed, "queue is sealed"),
    lib.GF_E_ROLE: (E.RoleTaken, "another process holds this role on the queue"),
    lib.GF_E_TOO_LARGE: (E.ItemTooLarge, "item larger than the queue's maximum item size"),
    lib.GF_E_CORRUPT: (E.Corrupted, "corrupted shared memory"),
    lib.GF_E_NOT_READY: (E.NotReady, "segment is still being built"),
    lib.GF_E_VERSION: (E.VersionMismatch, "segment has another layout version"),
    lib.GF_E_HELD: (E.HeldItemsStall, "too many unreleased items"),
    lib.GF_E_CLAIMED: (E.FabricValueError, "a reservation is outstanding: commit or abort it first"),
    lib.GF_E_CAPACITY: (E.CapacityExceeded, "capacity exceeded"),
    lib.GF_E_DISCONNECTED: (E.Disconnected, "disconnected"),
    lib.GF_E_ARG: (E.FabricValueError, "invalid argument"),
}


def raise_status(rc: int, what: str = "", *, seal_seq: int = 0, epoch: int | None = None) -> NoReturn:
    """Turn a negative native status into the matching typed exception."""
    ctx = f": {what}" if what else ""
    kind = _STATUS.get(rc)
    if kind is None:
        raise E.FabricError(f"native status {rc}{ctx}", code=rc)
    cls, message = kind
    if cls is E.StaleEpoch:
        raise E.StaleEpoch(message + ctx, epoch=epoch)
    if cls is E.QueueSealed:
        raise E.QueueSealed(message + ctx, seal_seq=seal_seq)
    raise cls(message + ctx)
