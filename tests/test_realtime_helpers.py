"""The helpers of tests/_realtime.py do what the tests that use them rely on, on this kernel."""

from __future__ import annotations

import socket

import pytest

try:
    from _realtime import SteppedTime, refused_port, reserved_port
except ImportError:  # tests/ imported as a package
    from tests._realtime import SteppedTime, refused_port, reserved_port


def test_a_reserved_port_is_bound_by_a_server_again_and_again_and_by_no_plain_socket() -> None:
    with reserved_port() as port:
        for _ in range(3):  # a node, killed and restarted on its port (its accepted connection closed first)
            with socket.create_server(("127.0.0.1", port)) as srv:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as cli:
                    conn, _ = srv.accept()
                    conn.close()
                    assert cli.recv(1) == b""
        with socket.socket() as other, pytest.raises(OSError):  # anyone else: address in use
            other.bind(("127.0.0.1", port))
        with pytest.raises(ConnectionRefusedError):  # held, but nobody listens between the node's lives
            socket.create_connection(("127.0.0.1", port), timeout=30)


def test_a_refused_port_refuses_connections_and_listeners() -> None:
    with refused_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=30)
        with pytest.raises(OSError):
            socket.create_server(("127.0.0.1", port))


def test_stepped_time_moves_only_when_slept_on_and_stops_a_runaway_wait() -> None:
    t = SteppedTime(start=5.0, limit=1.0)
    assert t.monotonic() == t.monotonic() == 5.0
    t.sleep(0.25)
    assert t.monotonic() == 5.25 and t.monotonic_ns() == 5_250_000_000 and t.sleeps == 1
    with pytest.raises(AssertionError, match="limit"):
        t.sleep(1.0)
