"""Helpers for tests that must not bet on the machine's timing or on a port staying free.

* :class:`SteppedTime` stands in for the ``time`` module of one library module (a test
  ``monkeypatch.setattr(module, "time", SteppedTime())``): ``monotonic()`` only moves when the
  code under test sleeps, by exactly what it asked for. A timeout is then checked to the
  microsecond, and a stalled machine cannot move it.
* :class:`StalledTime` stands in for the ``time`` module the same way, for code that busy-waits
  on ``perf_counter()``: the real clock, but every reading after the first one ``stall`` seconds
  later, as if the process had been stopped (a stalled VM) right after it started.
* :func:`reserved_port` keeps a port of 127.0.0.1 for a test that starts (and restarts) a
  memory node on it: a bound socket that never listens, with ``SO_REUSEADDR``, so the node
  (``socket.create_server`` sets ``SO_REUSEADDR`` too) binds the same port, while the kernel
  hands the port to no one else (an ephemeral bind or an outgoing connection) until the test
  lets go. Picking a port by binding 0 and closing before the node binds it raced with every
  other process on the machine.
* :func:`refused_port` is a port of 127.0.0.1 where nobody listens, and nobody can, for as
  long as it is held: connecting is refused.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any


class SteppedTime:
    """``monotonic()`` and ``sleep()`` of a clock that moves only when slept on."""

    def __init__(self, start: float = 1000.0, *, limit: float = 3600.0) -> None:
        self.now = start
        self.limit = limit
        self.end = start + limit  # a wait that ignores its timeout fails here, not at pytest's timeout
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now

    def monotonic_ns(self) -> int:
        return int(self.now * 1e9)

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, f"slept a negative time: {seconds!r}"
        self.sleeps += 1
        self.now += seconds
        assert self.now <= self.end, f"slept past the clock's limit of {self.limit}s: a wait that ignores its timeout?"


class StalledTime:
    """The ``time`` module, but ``perf_counter()`` readings after the first are ``stall`` s later."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.readings = 0

    def perf_counter(self) -> float:
        self.readings += 1
        return time.perf_counter() + (self.stall if self.readings > 1 else 0.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port of 127.0.0.1 that a node in this test may bind (and bind again after it closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 bound (without ``SO_REUSEADDR``) and never listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
