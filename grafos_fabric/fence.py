"""Fence epochs: a number that only grows, and a guard that rejects anything older.

Mirrors grafOS ``grafos_fence``: :class:`FenceEpoch` is a monotonic u64 counter
(``zero()``, ``bump()``), :class:`Fenced` tags a value with the epoch it was
produced in, and :class:`FenceGuard` is the stateful check that runs **at the
write target**: ``check(e)`` raises :class:`~grafos_fabric.errors.StaleEpoch`
when ``e`` is older than the guard's current epoch, ``advance()`` moves the
guard to the next epoch. A stale writer may still believe it owns the target;
the guard only compares numbers. ``EdgeGeneration`` (the generation an edge's
handoff record carries) is the same type.

``check`` accepts an epoch equal to or newer than the current one and does not
adopt it (grafOS leaves this open; adopting is a separate, explicit step:
``advance_to``). Serialized form: 8 bytes, little-endian u64.

Naming: :class:`Fenced` here is a *value* type, as in grafOS; the *exception*
for a fenced-out caller is :class:`grafos_fabric.errors.Fenced`.
"""

from __future__ import annotations

import functools
import struct
import threading
from typing import Any, Generic, TypeVar

from . import errors

__all__ = ["EdgeGeneration", "FenceEpoch", "FenceGuard", "Fenced"]

T = TypeVar("T")
_U64_MAX = (1 << 64) - 1
_PACK = struct.Struct("<Q")


@functools.total_ordering
class FenceEpoch:
    """A monotonic epoch counter (u64). Immutable, ordered, hashable; ``int(e)`` gives its value.

    Equality and ordering are defined between epochs only (``FenceEpoch(1) == 1``
    is false; compare ``int(e)`` for that). Bad values raise
    :class:`~grafos_fabric.errors.FabricValueError`.
    """

    __slots__ = ("_value",)
    _value: int
    SIZE = _PACK.size

    def __init__(self, value: FenceEpoch | int = 0) -> None:
        if isinstance(value, FenceEpoch):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise errors.FabricValueError(f"a fence epoch is an int, got {type(value).__name__}")
        if not 0 <= value <= _U64_MAX:
            raise errors.FabricValueError(f"a fence epoch is a u64, got {value}")
        self._value = value

    @classmethod
    def zero(cls) -> FenceEpoch:
        """The first epoch."""
        return cls(0)

    def bump(self) -> FenceEpoch:
        """The next epoch (``self + 1``); ``FabricValueError`` past the u64 range."""
        if self._value == _U64_MAX:
            raise errors.FabricValueError("fence epoch overflow")
        return FenceEpoch(self._value + 1)

    @property
    def value(self) -> int:
        return self._value

    def to_bytes(self) -> bytes:
        """8 bytes, little-endian."""
        return _PACK.pack(self._value)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> FenceEpoch:
        """Parse :meth:`to_bytes` output; ``Corrupted`` unless exactly 8 bytes."""
        if len(data) != cls.SIZE:
            raise errors.Corrupted(f"a fence epoch is {cls.SIZE} bytes, got {len(data)}")
        return cls(_PACK.unpack(bytes(data))[0])

    def __int__(self) -> int:
        return self._value

    def __index__(self) -> int:
        return self._value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FenceEpoch):
            return self._value == other._value
        return NotImplemented

    def __lt__(self, other: object) -> bool:
        if isinstance(other, FenceEpoch):
            return self._value < other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash((FenceEpoch, self._value))

    def __repr__(self) -> str:
        return f"FenceEpoch({self._value})"


EdgeGeneration = FenceEpoch
"""The generation of a pipeline edge (its handoff record): an alias of :class:`FenceEpoch`."""


def _epoch(e: FenceEpoch | Fenced[Any] | int) -> FenceEpoch:
    if isinstance(e, Fenced):
        return e.epoch
    if isinstance(e, FenceEpoch):
        return e
    return FenceEpoch(e)


class Fenced(Generic[T]):
    """A value tagged with the epoch it was produced in."""

    __slots__ = ("epoch", "value")

    def __init__(self, epoch: FenceEpoch | int, value: T) -> None:
        self.epoch = _epoch(epoch)
        self.value = value

    @classmethod
    def at_zero(cls, value: T) -> Fenced[T]:
        return cls(FenceEpoch.zero(), value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Fenced):
            return self.epoch == other.epoch and bool(self.value == other.value)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # the value may be mutable

    def __repr__(self) -> str:
        return f"Fenced({self.epoch!r}, {self.value!r})"


class FenceGuard:
    """The check at the write target: rejects epochs older than the current one. Thread-safe."""

    def __init__(self, epoch: FenceEpoch | int | None = None) -> None:
        self._current = FenceEpoch.zero() if epoch is None else _epoch(epoch)
        self._lock = threading.Lock()

    @property
    def current(self) -> FenceEpoch:
        return self._current

    def check(self, epoch: FenceEpoch | Fenced[Any] | int) -> None:
        """Accept ``epoch`` when it is not behind the current one; else raise ``StaleEpoch``."""
        e = _epoch(epoch)
        current = self._current
        if e < current:
            raise errors.StaleEpoch(epoch=int(e), current=int(current))

    def admit(self, value: Fenced[T]) -> T:
        """``check(value.epoch)`` and return the value."""
        self.check(value.epoch)
        return value.value

    def advance(self) -> FenceEpoch:
        """Move to the next epoch and return it: everything older is now stale."""
        with self._lock:
            self._current = self._current.bump()
            return self._current

    def advance_to(self, epoch: FenceEpoch | int) -> FenceEpoch:
        """Move to ``epoch`` if it is newer (never back); returns the current epoch."""
        e = _epoch(epoch)
        with self._lock:
            if e > self._current:
                self._current = e
            return self._current

    def __repr__(self) -> str:
        return f"FenceGuard(current={int(self._current)})"
