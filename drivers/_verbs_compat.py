"""pyverbs compatibility: one enum shim and an honest device probe.

rdma-core moved the verbs enums: ``pyverbs.enums`` (rdma-core < 50, Debian
12's 44.0) became ``pyverbs.libibverbs_enums`` (rdma-core >= 50; both exist
in 50..58). The *class* spelling (``ibv_access_flags.IBV_ACCESS_LOCAL_WRITE``)
works in both, so this module exposes only the classes, under short names.

:func:`probe` answers "is there a usable RDMA device here?" without raising.
With no kernel RDMA support, ``pyverbs.device.get_device_list()`` *raises*
``PyverbsRDMAError('Failed to get devices list')`` (libibverbs errno 38,
ENOSYS) rather than returning ``[]``; pyverbs drops the errno, so the probe
asks libibverbs directly (through ctypes) to put it in the reason.

Nothing here imports pyverbs at module import time: the verbs extra is
optional, and importing this module must work without it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from types import ModuleType
from typing import Any

__all__ = [
    "WC",
    "E",
    "device_names",
    "enums",
    "probe",
    "pyverbs_import_error",
]

log = logging.getLogger(__name__)


class WC:
    """``enum ibv_wc_status`` values (fixed by libibverbs's ABI, ``verbs.h``).

    Kept as plain ints so that the error mapping works and is testable without
    pyverbs; ``tests/test_verbs.py`` checks them against pyverbs's enum.
    """

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21

    NAMES: dict[int, str] = {}


WC.NAMES = {v: f"IBV_WC_{k}" for k, v in vars(WC).items() if k.isupper() and isinstance(v, int)}


@functools.lru_cache(maxsize=1)
def enums() -> ModuleType:
    """The pyverbs enum module of this rdma-core (raises ``ImportError`` without pyverbs)."""
    try:
        from pyverbs import libibverbs_enums as mod  # rdma-core >= 50
    except ImportError:
        from pyverbs import enums as mod  # rdma-core < 50 (Debian 12: 44.0)
    return mod


class _EnumNamespace:
    """Short names for the enum classes: ``E.ACC``, ``E.OP``, ``E.SF``...

    Attribute access imports pyverbs on first use, so ``E`` can be imported
    everywhere and only fails (``ImportError``) where it is actually used
    without pyverbs.
    """

    _MAP = {
        "ACC": "ibv_access_flags",
        "OP": "ibv_wr_opcode",
        "SF": "ibv_send_flags",
        "QPS": "ibv_qp_state",
        "QPT": "ibv_qp_type",
        "WCS": "ibv_wc_status",
        "MTU": "ibv_mtu",
        "ATOMIC": "ibv_atomic_cap",
        "LINK": None,  # flat constants, see below
    }

    def __getattr__(self, name: str) -> Any:
        if name not in self._MAP:
            raise AttributeError(name)
        mod = enums()
        if name == "LINK":
            # IBV_LINK_LAYER_* are flat ints in every version.
            return _LinkLayer(mod)
        attr = self._MAP[name]
        assert attr is not None
        return getattr(mod, attr)


class _LinkLayer:
    def __init__(self, mod: ModuleType) -> None:
        self.ETHERNET = int(getattr(mod, "IBV_LINK_LAYER_ETHERNET", 2))
        self.INFINIBAND = int(getattr(mod, "IBV_LINK_LAYER_INFINIBAND", 1))


E = _EnumNamespace()


def pyverbs_import_error() -> str | None:
    """Why pyverbs's native modules do not import here, or ``None`` when they do."""
    try:
        import pyverbs.device
        import pyverbs.pyverbs_error  # noqa: F401

        enums()
    except ImportError as ex:
        return f"pyverbs not importable ({ex}); run tools/install_pyverbs.sh VENV"
    return None


def _ibv_errno() -> str:
    """Call ``ibv_get_device_list`` through ctypes to learn the errno pyverbs drops."""
    try:
        lib = ctypes.CDLL("libibverbs.so.1", use_errno=True)
    except OSError as ex:
        return f"libibverbs not loadable: {ex}"
    lib.ibv_get_device_list.restype = ctypes.c_void_p
    lib.ibv_get_device_list.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.ibv_free_device_list.argtypes = [ctypes.c_void_p]
    num = ctypes.c_int(0)
    ctypes.set_errno(0)
    ptr = lib.ibv_get_device_list(ctypes.byref(num))
    err = ctypes.get_errno()
    if ptr:
        lib.ibv_free_device_list(ctypes.c_void_p(ptr))
        return f"ibv_get_device_list found {num.value} device(s) on a second try"
    return f"ibv_get_device_list errno {err}: {os.strerror(err)}"


def device_names() -> list[str]:
    """Names of the RDMA devices libibverbs sees (raises like pyverbs does)."""
    import pyverbs.device as d

    return [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in d.get_device_list()]


def probe(device: str | None = None) -> str | None:
    """``None`` when a usable RDMA device exists, else the reason why not. Never raises.

    ``device`` narrows the question to one device name. The reasons are:
    pyverbs not importable; "Failed to get devices list" with libibverbs's
    errno (ENOSYS: this kernel has no RDMA support); an empty device list;
    the named device missing.
    """
    reason = pyverbs_import_error()
    if reason is not None:
        return reason
    from pyverbs.pyverbs_error import PyverbsError

    try:
        names = device_names()
    except PyverbsError as ex:
        return f"{ex} ({_ibv_errno()})"
    except Exception as ex:  # a probe must never raise
        return f"device enumeration failed: {type(ex).__name__}: {ex}"
    if not names:
        return "libibverbs found no RDMA devices"
    if device is not None and device not in names:
        return f"device {device!r} not found (devices: {', '.join(names)})"
    log.debug("RDMA devices: %s", names)
    return None
