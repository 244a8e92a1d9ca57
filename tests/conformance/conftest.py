"""The conformance matrix: one place that says which queue access pairs and which
drivers a conformance test runs on.

Two axes, both fixtures with readable ids (``test_x[shm-onesided->mapped]``):

* ``driver``: the memory the queue lives in.

  ===========  ==========================================================  ============================
  id           what                                                        skips with
  ===========  ==========================================================  ============================
  shm          POSIX shared memory in a fresh namespace (maps, one-sided)  never
  nodeshm      a memory node in this process (ShmFileRegistrar), two       never
               clients over 127.0.0.1; one-sided
  ucx-tcp      a UCX memory node (tcp on loopback), two clients; one-sided  "UCX unavailable: ..."
  ucx-sm       the same with ``sm,tcp``                                     "UCX unavailable: ..."
  ucx-map      a UCX node with ``local_map`` (tcp): the mapped side maps    "UCX unavailable: ..."
               the span (``map=local``), the one-sided side is a client
               over tcp (the mixed pairs; onesided->onesided is ucx-tcp's)
  softverbs    the verbs driver against the software responder of          "needs pyverbs's WR objects"
               tests/test_verbs_softrdma.py (NOT RDMA); one-sided
  verbs        the verbs driver on a real RDMA device; one-sided            "no RDMA device: ..."
  ===========  ==========================================================  ============================

* ``access``: ``PRODUCER->CONSUMER``, each ``mapped`` (the native ring on a
  mapping) or ``onesided`` (the RDMA ring protocol over the region's one-sided
  operations). Only shm and ucx-map map, so the other remote drivers run
  ``onesided->onesided`` only, and ucx-map the pairs with a mapped side (pairs
  that cannot exist are not generated; drivers that are absent skip).

What a test gets is decided by the fixtures it asks for:

* ``make_pair`` (``make_pair(**create_kwargs) -> (producer, consumer)``): every
  (driver, access) case of its module's ``drivers`` marker x ``access`` marker;
* ``queue_mode`` without ``make_pair``: ``mapped`` and ``onesided`` (the attach
  mode a test applies itself; shm only); with ``make_pair``: the consumer's side;
* ``fabric`` without either: once per driver of the ``drivers`` marker;
* ``access`` without a driver (a suite with its own fabric, like the edge
  suite's ``make_edge``): once per pair of the ``access`` marker.

Markers (module ``pytestmark`` or per test; the closest wins):
``@pytest.mark.drivers("shm", ...)`` (default: shm only) and
``@pytest.mark.access("mapped->onesided", ...)`` (default: all four), each
with the reason in a comment where it narrows the matrix.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import grafos_fabric as gf

ACCESS = ["mapped->mapped", "mapped->onesided", "onesided->mapped", "onesided->onesided"]
DRIVERS = ["shm", "nodeshm", "ucx-tcp", "ucx-sm", "ucx-map", "softverbs", "verbs"]
REMOTE = ["nodeshm", "ucx-tcp", "ucx-sm", "softverbs", "verbs"]  # regions reached one-sided only
SECRET = secrets.token_bytes(32)


# GRAFOS_CONFORMANCE_DRIVERS=shm,ucx-tcp narrows every test to those drivers (the sanitizer
# run keeps to shm; CI's second-UCX run to the ucx drivers). Unset: all of them.
_ONLY = [d for d in os.environ.get("GRAFOS_CONFORMANCE_DRIVERS", "").split(",") if d]
assert set(_ONLY) <= set(DRIVERS), f"GRAFOS_CONFORMANCE_DRIVERS: unknown {sorted(set(_ONLY) - set(DRIVERS))}"


def _marker_args(metafunc: pytest.Metafunc, name: str, default: list[str]) -> list[str]:
    marker = metafunc.definition.get_closest_marker(name)
    args = default if marker is None else list(marker.args)
    unknown = set(args) - set(DRIVERS if name == "drivers" else ACCESS)
    assert not unknown, f"{metafunc.definition.nodeid}: unknown {name} {sorted(unknown)}"
    if name == "drivers" and _ONLY:
        args = [d for d in args if d in _ONLY]
    return args


def _driver_param(name: str) -> Any:
    marks = [pytest.mark.device] if name == "verbs" else []
    return pytest.param(name, marks=marks, id=name)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    drivers = _marker_args(metafunc, "drivers", ["shm"])
    access = _marker_args(metafunc, "access", ACCESS)
    if "access" in names and "driver" in names:  # make_pair
        cases = [(d, a) for d in drivers for a in access
                 if d == "shm" or (a == "onesided->onesided") != (d == "ucx-map")]
        metafunc.parametrize(
            ("driver", "access"),
            [pytest.param(d, a, marks=[pytest.mark.device] if d == "verbs" else [], id=f"{d}-{a}") for d, a in cases],
            indirect=True,
        )
    elif "access" in names:  # a suite with its own fabric (the edge suite)
        metafunc.parametrize("access", access, indirect=True)
    elif "queue_mode" in names:
        metafunc.parametrize("queue_mode", ["mapped", "onesided"], indirect=True)
    elif "driver" in names and (drivers != ["shm"] or _ONLY):  # fabric
        metafunc.parametrize("driver", [_driver_param(d) for d in drivers], indirect=True)


@dataclass
class Driver:
    """One driver's two clients: ``fabric`` makes the queue, ``consumer_fabric`` attaches to it
    (the same object for shm, a second client with its own session for the remote drivers)."""

    name: str
    fabric: Any
    consumer_fabric: Any
    ttl: float = 60.0  # a remote driver on a loaded 2-core machine can take a minute over the wrap tests
    closers: list[Callable[[], None]] = field(default_factory=list)
    onesided_fabric: Any = None  # ucx-map: a client that reaches the node over tcp only (a one-sided producer)

    @property
    def maps(self) -> bool:
        return self.name in ("shm", "ucx-map")


class _UcxNodes:
    """UCX memory nodes, one per transport set, started on first use and kept for the session
    (starting one costs more than most tests)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}

    def get(self, tls: str, local_map: bool = False) -> Any:
        key = f"{tls}{'+map' if local_map else ''}"
        if key not in self.nodes:
            from grafos_fabric.drivers import ucx
            from grafos_fabric.drivers.node.auth import load_policy
            from grafos_fabric.drivers.node.server import NodeServer

            # event progress: no core burnt by the node on a shared 2-core machine (busy mode: test_ucx.py)
            registrar = ucx.UcxRegistrar(64 << 20, host="127.0.0.1", tls=tls, net_devices="lo", progress="event",
                                         local_map=local_map)
            self.nodes[key] = NodeServer(registrar, load_policy(SECRET), port=0).start()
        return self.nodes[key]

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


@pytest.fixture(scope="session")
def _ucx_nodes() -> Iterator[_UcxNodes]:
    nodes = _UcxNodes()
    yield nodes
    nodes.close()


def _shm(request: pytest.FixtureRequest) -> Driver:
    f = gf.open_fabric(f"shm://{request.getfixturevalue('namespace')}")
    return Driver("shm", f, f)


def _nodeshm(request: pytest.FixtureRequest) -> Driver:
    from grafos_fabric.drivers.node.auth import load_policy
    from grafos_fabric.drivers.node.server import NodeServer
    from grafos_fabric.drivers.node.shmfile import NodeShmFabric, ShmFileRegistrar

    node = NodeServer(ShmFileRegistrar(16 << 20), load_policy(SECRET), port=0, reap_interval=0.05).start()
    tx = NodeShmFabric("127.0.0.1", node.port, secret=SECRET)
    rx = NodeShmFabric("127.0.0.1", node.port, secret=SECRET)
    return Driver("nodeshm", tx, rx, ttl=600.0, closers=[rx.close, tx.close, node.close])


def _ucx(request: pytest.FixtureRequest, tls: str) -> Driver:
    from grafos_fabric.drivers import ucx

    why = ucx.available()
    if why is not None:
        pytest.skip(f"UCX unavailable: {why}")
    node = request.getfixturevalue("_ucx_nodes").get(tls)
    tx = ucx.UcxFabric("127.0.0.1", node.port, secret=SECRET, tls=tls, net_devices="lo")
    rx = ucx.UcxFabric("127.0.0.1", node.port, secret=SECRET, tls=tls, net_devices="lo")
    return Driver(f"ucx-{tls.split(',')[0]}", tx, rx, ttl=600.0, closers=[rx.close, tx.close])


def _ucx_map(request: pytest.FixtureRequest) -> Driver:
    """Two clients that map spans (``map=local``) and one that reaches the node over tcp only."""
    from grafos_fabric.drivers import ucx

    why = ucx.available()
    if why is not None:
        pytest.skip(f"UCX unavailable: {why}")
    node = request.getfixturevalue("_ucx_nodes").get("tcp", local_map=True)
    tx, rx, one = (ucx.UcxFabric("127.0.0.1", node.port, secret=SECRET, tls="tcp", net_devices="lo",
                                 local_map=m) for m in (True, True, False))
    assert tx.mapped_regions and rx.mapped_regions and not one.mapped_regions
    return Driver("ucx-map", tx, rx, ttl=600.0, closers=[one.close, rx.close, tx.close], onesided_fabric=one)


def _tests_on_path() -> None:
    """tests/ on sys.path (under any import mode), for the verbs drivers' shared test helpers."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in sys.path:
        sys.path.insert(0, here)


def _softverbs(request: pytest.FixtureRequest) -> Driver:
    from grafos_fabric.drivers import _verbs_compat as compat

    why = compat.pyverbs_import_error()
    if why is not None:
        pytest.skip(f"the software verbs stand-in needs pyverbs's WR objects: {why}")
    from grafos_fabric.drivers import verbs

    _tests_on_path()
    import test_verbs_device as dev
    import test_verbs_softrdma as soft

    soft.install_soft_hca(request.getfixturevalue("monkeypatch"))
    node = verbs.MemoryNode.open(None, pool_size=16 << 20, host="127.0.0.1", port=0, reap_interval=0.05,
                                 secret=dev.SECRET)
    tx, rx = dev.client(node), dev.client(node)
    return Driver("softverbs", tx, rx, ttl=600.0, closers=[rx.close, tx.close, node.close])


def _verbs(request: pytest.FixtureRequest) -> Driver:
    from grafos_fabric.drivers import verbs
    from grafos_fabric.drivers._verbs_compat import probe

    device = os.environ.get("GRAFOS_RDMA_DEVICE") or None
    why = probe(device)
    if why is not None:
        pytest.skip(f"no RDMA device: {why}")
    _tests_on_path()
    import test_verbs_device as dev

    node = verbs.MemoryNode.open(device, pool_size=64 << 20, host="127.0.0.1", port=0, ib_port=dev.IB_PORT,
                                 gid_index=dev.GID_INDEX, reap_interval=0.05, secret=dev.SECRET)
    tx, rx = dev.client(node), dev.client(node)
    return Driver("verbs", tx, rx, ttl=600.0, closers=[rx.close, tx.close, node.close])


_MAKERS: dict[str, Callable[[pytest.FixtureRequest], Driver]] = {
    "shm": _shm,
    "nodeshm": _nodeshm,
    "ucx-tcp": lambda request: _ucx(request, "tcp"),
    "ucx-sm": lambda request: _ucx(request, "sm,tcp"),
    "ucx-map": _ucx_map,
    "softverbs": _softverbs,
    "verbs": _verbs,
}


@pytest.fixture
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    """The driver of this case (shm where the test is not parametrized over drivers)."""
    d = _MAKERS[str(getattr(request, "param", "shm"))](request)
    yield d
    for close in d.closers:
        close()


@pytest.fixture
def access(request: pytest.FixtureRequest) -> str:
    """``PRODUCER->CONSUMER`` of this case (``mapped->mapped`` where not parametrized)."""
    return str(getattr(request, "param", "mapped->mapped"))


@pytest.fixture
def fabric(driver: Driver) -> Any:
    """The producer's fabric of this case's driver."""
    return driver.fabric


@pytest.fixture
def queue_mode(request: pytest.FixtureRequest) -> str:
    """How the consumer reaches the ring: ``mapped`` or ``onesided``."""
    if hasattr(request, "param"):
        return str(request.param)
    return request.getfixturevalue("access").split("->")[1]


QueuePair = Callable[..., "tuple[Any, Any]"]


@pytest.fixture
def make_pair(driver: Driver, access: str) -> QueuePair:
    """``make_pair(**create_kwargs) -> (producer, consumer)``: two handles on one queue, made
    and attached as this case's access pair says, on this case's driver."""
    from grafos_fabric.queue import OneSidedQueue

    producer, consumer = access.split("->")

    def make(**kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("capacity", 1 << 16)
        kwargs.setdefault("ttl", driver.ttl)
        if producer == "onesided" and driver.onesided_fabric is not None:  # ucx-map: a producer over tcp
            tx = gf.FabricQueue.create(driver.onesided_fabric, **kwargs)
        else:
            create = OneSidedQueue.create if producer == "onesided" and driver.maps else gf.FabricQueue.create
            tx = create(driver.fabric, **kwargs)
        rx = gf.FabricQueue.attach(driver.consumer_fabric, bytes(tx.locator()), mapped=consumer == "mapped")
        return tx, rx

    return make
