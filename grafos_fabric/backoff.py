"""One backoff for every poll-and-sleep loop of the library.

A :class:`Backoff` waits for something another party does (space in a ring,
an ack, a new handoff generation, a retry after a failed allocation): it lets
the caller re-check ``spin`` times at once, then sleeps, doubling the sleep
from ``first`` up to ``cap`` seconds, and never sleeps past its deadline
(``None``: no deadline). Users:

* the one-sided ring (:mod:`grafos_fabric.queue._onesided`) polls for space and data
  (no futex over RDMA): 16 immediate re-checks, then 20 us doubling to 1 ms;
* the pipeline edge (:mod:`grafos_fabric.pipeline`) waits for acks, for a new
  generation and between relocation attempts;
* :meth:`grafos_fabric.handoff.HandoffReader.wait` polls for a newer record.

Only waiting paths use it: a call that finds what it wants never builds one.
Deadlines are ``time.monotonic()`` values.
"""

from __future__ import annotations

import time

from .errors import FabricValueError

__all__ = ["Backoff"]


class Backoff:
    """Polling with exponential backoff against a deadline (``None``: wait forever).

    ``pause(what)`` is the whole loop step: ``TimeoutError("timed out waiting
    for <what>")`` once the deadline has passed, else an immediate return (the
    first ``spin`` times) or a sleep. Callers that word their own timeout
    error use :meth:`expired` and :meth:`sleep` instead.
    """

    __slots__ = ("cap", "deadline", "delay", "polls", "spin")

    def __init__(
        self, deadline: float | None = None, *, first: float = 20e-6, cap: float = 1e-3, spin: int = 0
    ) -> None:
        if not 0 < first <= cap:
            raise FabricValueError(f"backoff needs 0 < first <= cap, got first={first!r}, cap={cap!r}")
        if spin < 0:
            raise FabricValueError(f"spin must be >= 0, got {spin!r}")
        self.deadline = deadline
        self.delay = first
        self.cap = cap
        self.spin = spin
        self.polls = 0

    def remaining(self) -> float | None:
        """Seconds left before the deadline (0.0 once it has passed; ``None``: no deadline)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        """The deadline has passed (never, without one)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def sleep(self) -> None:
        """One backoff step: return at once for the first ``spin`` calls, then sleep the
        current delay (cut to the time left) and double it, up to ``cap``."""
        self.polls += 1
        if self.polls <= self.spin:
            return
        delay = self.delay
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.deadline - time.monotonic()))
        time.sleep(delay)
        self.delay = min(self.delay * 2, self.cap)

    def pause(self, what: str) -> None:
        """Sleep a little before the next poll; ``TimeoutError`` once the deadline has passed."""
        if self.expired():
            raise TimeoutError(f"timed out waiting for {what}")
        self.sleep()
