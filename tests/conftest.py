"""Shared fixtures: a fresh shm namespace per test, cleaned up afterwards, and an shm
fabric in it. The conformance matrix (queue pairs over access modes and drivers)
is tests/conformance/conftest.py."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

import grafos_fabric as gf
from grafos_fabric.drivers.shm import SHM_DIR

try:
    from _realtime import reserved_port
except ImportError:  # tests/ imported as a package
    from tests._realtime import reserved_port


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
def edge_ns() -> Iterator[str]:
    """A fresh shm namespace for a pipeline edge's queues (the edge tests build their own
    fabric in it, with a manual clock and a fault plan), cleaned up afterwards."""
    ns = "pe" + secrets.token_hex(5)
    yield ns
    _cleanup(ns)


@pytest.fixture
def node_port() -> Iterator[int]:
    """A port of 127.0.0.1 for this test's memory node to bind, and to bind again when it
    restarts, that no other process can take meanwhile (tests/_realtime.py)."""
    with reserved_port() as port:
        yield port


@pytest.fixture
def fabric(namespace: str) -> Any:
    return gf.open_fabric(f"shm://{namespace}")
