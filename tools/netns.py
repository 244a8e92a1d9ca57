"""Two network namespaces joined by a veth pair, standing for two hosts (tests and demos).

:func:`veth_pair` makes ``gfA-<id>``/``gfB-<id>`` with veth ends
``va<id>``/``vb<id>`` at 10.213.<n>.1/24 and .2/24 (addresses that exist only
inside these namespaces), and removes both namespaces afterwards, also on
failure. :func:`unavailable` says why it cannot run here (not root, no ``ip``,
``ip netns add`` refused). :class:`NetnsThread` runs functions on a thread that
entered a namespace (``setns`` is per thread): sockets it creates live there.
Used by the UCX tests and by ``grafos_fabric.tools.ucx_pipeline``; needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Pair:
    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    ip_a: str
    ip_b: str

    def link(self, up: bool) -> None:
        """Bring node A's end up or down."""
        _ip("netns", "exec", self.ns_a, "ip", "link", "set", self.dev_a, "up" if up else "down")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed"
    name = f"gfprobe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as ex:
        err = getattr(ex, "stderr", b"") or b""
        return f"ip netns add failed here: {err.decode(errors='replace').strip() or ex}"
    with contextlib.suppress(Exception):
        _ip("netns", "del", name)
    return None


def _wait_carrier(pair: Pair, timeout: float = 10.0) -> None:
    """UCX ignores an interface without carrier, which a fresh veth lacks for a moment."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/operstate"],
                                 capture_output=True, text=True).stdout.strip()
                  for ns, dev in ((pair.ns_a, pair.dev_a), (pair.ns_b, pair.dev_b))]
        if states == ["up", "up"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the veth pair has no carrier after {timeout}s")


@contextlib.contextmanager
def veth_pair() -> Iterator[Pair]:
    """Make the pair (names and subnet from this process's pid), remove it afterwards."""
    tag = f"{os.getpid() % 100000}"
    n = os.getpid() % 250 + 1
    pair = Pair(f"gfA-{tag}", f"gfB-{tag}", f"va{tag}", f"vb{tag}", f"10.213.{n}.1", f"10.213.{n}.2")
    try:
        _ip("netns", "add", pair.ns_a)
        _ip("netns", "add", pair.ns_b)
        _ip("link", "add", pair.dev_a, "netns", pair.ns_a, "type", "veth", "peer", "name", pair.dev_b,
            "netns", pair.ns_b)
        for ns, dev, addr in ((pair.ns_a, pair.dev_a, pair.ip_a), (pair.ns_b, pair.dev_b, pair.ip_b)):
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            _ip("netns", "exec", ns, "ip", "link", "set", dev, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _wait_carrier(pair)
        yield pair
    finally:
        for ns in (pair.ns_a, pair.ns_b):  # deleting a namespace deletes its veth end (and the peer)
            with contextlib.suppress(Exception):
                _ip("netns", "del", ns)


class NetnsThread:
    """A thread living in network namespace ``ns``: ``run(fn)`` executes ``fn()`` there and returns its result."""

    def __init__(self, ns: str) -> None:
        self._jobs: list[tuple[Callable[[], Any], list[Any], threading.Event]] = []
        self._cv = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ns, ready), daemon=True)
        self._thread.start()
        ready.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self, ns: str, ready: threading.Event) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns})")
            finally:
                os.close(fd)
        except BaseException as ex:
            self._error = ex
            ready.set()
            return
        ready.set()
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                fn, out, done = self._jobs.pop(0)
            try:
                out.append((True, fn()))
            except BaseException as ex:
                out.append((False, ex))
            done.set()

    def run(self, fn: Callable[[], T], timeout: float = 120.0) -> T:
        out: list[Any] = []
        done = threading.Event()
        with self._cv:
            self._jobs.append((fn, out, done))
            self._cv.notify()
        if not done.wait(timeout):
            raise TimeoutError("the namespace thread did not finish in time")
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(10)
