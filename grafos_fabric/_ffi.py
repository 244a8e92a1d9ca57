"""The raw native layer (``ffi``/``lib``) and its status codes as exceptions.

Only the wrapper classes (drivers/shm.py, the queue/ package) call ``lib``. The compiled
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

EXPECTED_ABI = 14
if lib.gf_native_abi() != EXPECTED_ABI:  # pragma: no cover - only on a stale build
    raise ImportError(
        f"stale grafos_fabric native build (ABI {lib.gf_native_abi()}, this code needs {EXPECTED_ABI}): "
        "rebuild it with `pip install -e .`"
    )

__all__ = ["ffi", "lib", "raise_status"]


_HEADER_DISAGREES = {
    name: (getattr(lib, name), code) for name, code in E.NATIVE_STATUS_NAMES.items() if getattr(lib, name) != code
}
if _HEADER_DISAGREES:  # pragma: no cover - only when gf_native.h changes without errors.py
    raise ImportError(f"native status codes differ from grafos_fabric.errors' table: {_HEADER_DISAGREES}")


def raise_status(rc: int, what: str = "", *, seal_seq: int = 0, epoch: int | None = None) -> NoReturn:
    """Turn a negative native status into the matching typed exception (errors.from_status's table)."""
    if rc == lib.GF_E_FENCED:  # the ring's fence is always an epoch check at the target
        raise E.StaleEpoch("fenced: the queue's epoch moved past this producer's" + (f": {what}" if what else ""),
                           epoch=epoch)
    raise E.from_status(rc, context=what, seal_seq=seal_seq)
