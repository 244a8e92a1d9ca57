"""Work requests: small pure functions over pyverbs ``SendWR`` (checked field by field in the tests).

Opcodes are named (``IBV_WR_*`` from the installed pyverbs' enums), never
bare numbers; :class:`WrCache` keys its WRs by :class:`Opcode` too.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from typing import Any

from grafos_fabric.errors import FabricValueError

from .._verbs_compat import E

__all__ = [
    "U64",
    "Opcode",
    "WrCache",
    "build_cas_wr",
    "build_faa_wr",
    "build_rdma_read_wr",
    "build_rdma_write_wr",
    "check_atomic_addr",
]

U64 = (1 << 64) - 1


class Opcode(enum.IntEnum):
    """The ``enum ibv_wr_opcode`` values this driver posts (fixed by the verbs ABI)."""

    IBV_WR_RDMA_WRITE = 0
    IBV_WR_RDMA_READ = 4
    IBV_WR_ATOMIC_CMP_AND_SWP = 5
    IBV_WR_ATOMIC_FETCH_AND_ADD = 6

    def pyverbs(self) -> Any:
        """The same opcode as the installed pyverbs spells it."""
        return getattr(E.OP, self.name)


def _send_flags(signaled: bool) -> int:
    return int(E.SF.IBV_SEND_SIGNALED) if signaled else 0


def _make_wr(wr_id: int, opcode: Opcode, local_addr: int, length: int, lkey: int, signaled: bool) -> Any:
    """A one-SGE ``SendWR``. The SGE is copied into the WR, then closed (pyverbs leaks it otherwise)."""
    from pyverbs.wr import SGE, SendWR

    if length <= 0 or length > 0xFFFFFFFF:
        raise FabricValueError(f"a work request moves 1..2**32-1 bytes, got {length}")
    sge = SGE(local_addr, length, lkey)
    try:
        return SendWR(wr_id=wr_id, opcode=opcode.pyverbs(), num_sge=1, sg=[sge], send_flags=_send_flags(signaled))
    finally:
        sge.close()


def build_rdma_write_wr(
    wr_id: int, local_addr: int, length: int, lkey: int, remote_addr: int, rkey: int, *, signaled: bool = True
) -> Any:
    """RDMA WRITE of ``length`` bytes from ``local_addr`` (``lkey``) to ``remote_addr`` (``rkey``)."""
    wr = _make_wr(wr_id, Opcode.IBV_WR_RDMA_WRITE, local_addr, length, lkey, signaled)
    wr.set_wr_rdma(rkey=rkey, addr=remote_addr)
    return wr


def build_rdma_read_wr(
    wr_id: int, local_addr: int, length: int, lkey: int, remote_addr: int, rkey: int, *, signaled: bool = True
) -> Any:
    """RDMA READ of ``length`` bytes at ``remote_addr`` (``rkey``) into ``local_addr`` (``lkey``)."""
    wr = _make_wr(wr_id, Opcode.IBV_WR_RDMA_READ, local_addr, length, lkey, signaled)
    wr.set_wr_rdma(rkey=rkey, addr=remote_addr)
    return wr


def check_atomic_addr(remote_addr: int) -> None:
    if remote_addr % 8:
        raise FabricValueError(f"atomic target {remote_addr:#x} is not 8-byte aligned")


def build_cas_wr(
    wr_id: int,
    local_addr: int,
    lkey: int,
    remote_addr: int,
    rkey: int,
    expected: int,
    desired: int,
    *,
    signaled: bool = True,
) -> Any:
    """ATOMIC_CMP_AND_SWP: ``compare_add`` = expected, ``swap`` = desired; old value -> 8 bytes at ``local_addr``."""
    check_atomic_addr(remote_addr)
    wr = _make_wr(wr_id, Opcode.IBV_WR_ATOMIC_CMP_AND_SWP, local_addr, 8, lkey, signaled)
    wr.set_wr_atomic(rkey=rkey, addr=remote_addr, compare_add=expected & U64, swap=desired & U64)
    return wr


def build_faa_wr(
    wr_id: int, local_addr: int, lkey: int, remote_addr: int, rkey: int, add: int, *, signaled: bool = True
) -> Any:
    """ATOMIC_FETCH_AND_ADD: the add value goes in ``compare_add`` (``swap`` is ignored and left 0).

    A negative ``add`` wraps modulo 2**64 (two's complement), like the C op.
    """
    check_atomic_addr(remote_addr)
    wr = _make_wr(wr_id, Opcode.IBV_WR_ATOMIC_FETCH_AND_ADD, local_addr, 8, lkey, signaled)
    wr.set_wr_atomic(rkey=rkey, addr=remote_addr, compare_add=add & U64, swap=0)
    return wr


WrKey = tuple[Opcode, int, int, int]  # (opcode, local address, length, lkey): what the SGE holds


class WrCache:
    """Reuse of ``SendWR`` objects, keyed by ``(opcode, local address, length, lkey)`` (they leak unless closed).

    The SGE is fixed when a WR is built; the remote side (``set_wr_rdma`` /
    ``set_wr_atomic``) and ``wr_id`` are set per operation. At most
    ``capacity`` WRs are kept: the least recently used one is closed when a new
    one would exceed it, and :meth:`close` closes them all.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._wrs: collections.OrderedDict[WrKey, Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._wrs)

    def keys(self) -> list[WrKey]:
        return list(self._wrs)

    def get(self, key: WrKey, build: Callable[[], Any]) -> Any:
        wr = self._wrs.get(key)
        if wr is not None:
            self._wrs.move_to_end(key)
            return wr
        wr = build()
        self._wrs[key] = wr
        while len(self._wrs) > self.capacity:
            _, old = self._wrs.popitem(last=False)
            old.close()
        return wr

    def close(self) -> None:
        while self._wrs:
            _, wr = self._wrs.popitem()
            wr.close()
