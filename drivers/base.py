"""The driver protocol: one small surface every driver gives.

A *region* is a leased span of bytes. It either **maps** into this process
(:attr:`Region.mapped` is true and :meth:`Region.address` / :meth:`Region.view`
work) or is reached only with **one-sided operations**: ``read_into``,
``write``, ``cas64``, ``faa64``, ``load64`` (acquire), ``store64`` (release)
and ``flush``. Mapped regions offer the one-sided operations too, so code
written against the one-sided surface runs on every driver.

Offsets are bytes from the start of the region's *payload*: whatever header a
driver keeps for itself (the shm driver's lease page) is never visible here.
Every operation checks the lease first and fails closed
(``LeaseExpired``/``Revoked``); a driver never returns stale bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from grafos_fabric.errors import FabricValueError
from grafos_fabric.lease import Clock, Lease

__all__ = ["Buffer", "Fabric", "MappedRegion", "Region", "RegionRef", "byte_view"]

Buffer = Any  # anything exporting the buffer protocol (bytes, bytearray, memoryview, numpy)



def byte_view(buf: Buffer, *, writable: bool) -> memoryview:
    """A flat byte view of ``buf`` for a one-sided operation (``read_into`` needs
    ``writable``); ``FabricValueError`` for what a transport cannot take: no
    buffer, not C-contiguous, read-only where it must write."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise FabricValueError(f"expected a bytes-like buffer, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise FabricValueError("the buffer must be C-contiguous")
    if writable and mv.readonly:
        raise FabricValueError("read_into needs a writable buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv

@dataclass(frozen=True)
class RegionRef:
    """Where a region lives: enough for another process to attach to it.

    ``driver`` is ``"shm"`` or a memory-node driver (``"verbs"``, ``"ucx"``,
    ``"nodeshm"``). For shm, ``name`` is the segment name in ``namespace``.
    For a memory node, ``host``/``port`` locate the node, ``namespace`` is the
    tenant and ``name`` is a *capability token* for the lease (see
    :mod:`grafos_fabric.drivers.node.auth`): whoever holds the ref may attach
    with the rights the token carries, so hand refs (and queue locators) only
    to processes of the same tenant that should have them. The span's address
    and key never go into a ref: an attacher gets its own grant from the node
    (``addr``/``rkey`` stay 0).
    """

    driver: str
    name: str
    nbytes: int
    lease_id: str
    generation: int
    namespace: str = "default"
    host: str = ""
    port: int = 0
    addr: int = 0
    rkey: int = 0
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Region(Protocol):
    lease: Lease
    nbytes: int
    mapped: bool

    def ref(self) -> RegionRef: ...
    def address(self) -> int: ...
    def view(self) -> memoryview: ...
    def read_into(self, offset: int, buf: Buffer) -> None: ...
    def write(self, offset: int, buf: Buffer) -> None: ...
    def cas64(self, offset: int, expected: int, desired: int) -> int: ...
    def faa64(self, offset: int, add: int) -> int: ...
    def load64(self, offset: int) -> int: ...
    def store64(self, offset: int, value: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class MappedRegion(Region, Protocol):
    """What a region mapped into this process adds, for the native ring.

    ``payload_pointer()`` is a cffi pointer to the payload; ``lease_pointers()``
    are cffi pointers to the lease's state and deadline words (u64, in the
    region's shared header), so the native push/pop can fail closed on expiry
    or revoke without a call back into Python."""

    def payload_pointer(self) -> Any: ...
    def lease_pointers(self) -> tuple[Any, Any]: ...


@runtime_checkable
class Fabric(Protocol):
    """A namespace of leased regions. ``mapped_regions`` says whether ``alloc``
    returns regions mapped into this process (shm) or reached one-sided (verbs)."""

    url: str
    driver: str
    clock: Clock
    mapped_regions: bool

    def alloc(self, nbytes: int, ttl: float) -> Region: ...
    def attach(self, ref: RegionRef, *, mapped: bool = True) -> Region: ...
    def free(self, lease: Lease) -> None: ...
    def reap(self) -> int: ...
    def close(self) -> None: ...
