"""Shared fixtures: a fresh shm namespace per test, cleaned up afterwards, and
queue pairs parametrized over the queue modes (mapped, one-sided)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from grafos_fabric.drivers.shm import SHM_DIR

import grafos_fabric as gf

# Every queue test runs once per mode: "mapped" (native ring on a mapping) and
# "onesided" (the RDMA ring protocol over the shm driver's one-sided ops).
QUEUE_MODES = ["mapped", "onesided"]


def _cleanup(namespace: str) -> None:
    prefix = f"grafos.{namespace}."
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix) or name == f"grafos-gen.{namespace}":
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = "t" + secrets.token_hex(6)
    yield ns
    _cleanup(ns)


@pytest.fixture
def fabric(namespace: str) -> Any:
    return gf.open_fabric(f"shm://{namespace}")


@pytest.fixture(params=QUEUE_MODES)
def queue_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


QueuePair = Callable[..., "tuple[Any, Any]"]


@pytest.fixture
def make_pair(fabric: Any, queue_mode: str) -> QueuePair:
    """``make_pair(**create_kwargs) -> (producer, consumer)``: two handles on one queue.

    The producer handle is the creator (mapped); the consumer attaches through
    the locator bytes, mapped or one-sided according to the mode.
    """

    def make(**kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("capacity", 1 << 16)
        kwargs.setdefault("ttl", 60.0)
        tx = gf.FabricQueue.create(fabric, **kwargs)
        rx = gf.FabricQueue.attach(fabric, bytes(tx.locator()), mapped=(queue_mode == "mapped"))
        return tx, rx

    return make
