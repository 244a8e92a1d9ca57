"""``grafos-fabric serve``: run an RDMA memory node.

::

    grafos-fabric serve --device mlx5_0 --port 18515 --pool 4G

registers a pool of ``--pool`` bytes on ``--device`` (default: the first RDMA
device), hands out leases on it over the TCP control channel on ``--port``
and enforces their deadlines by deregistering expired regions (see
:mod:`grafos_fabric.drivers.verbs`). It runs until SIGINT or SIGTERM.

The CLI registers it with :func:`add_serve_parser` (which sets
``func=run_serve``); :func:`serve_main` runs it on its own
(``python -m grafos_fabric.tools.serve``).

Registering memory pins it: the node needs a locked-memory limit at least
as large as the pool (``ulimit -l``; root is normally unlimited). A warning
is logged when the limit is lower.

Exit status: 0 after a signal, 2 for bad arguments, 69 (``EX_UNAVAILABLE``)
when there is no usable RDMA device, 1 when the node cannot start otherwise
(port taken, pool too large to pin...).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from typing import Any

__all__ = ["EX_UNAVAILABLE", "add_serve_parser", "parse_size", "run_serve", "serve_main"]

log = logging.getLogger("grafos_fabric.tools.serve")

EX_UNAVAILABLE = 69
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"4096"``, ``"512K"``, ``"256M"``, ``"4G"``, ``"1GiB"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 512M, 4G)")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from grafos_fabric.drivers.verbs import DEFAULT_PORT

    parser.add_argument("--device", default=None, help="RDMA device name (default: the first one)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"TCP port of the control channel (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--pool", type=parse_size, default=parse_size("256M"),
                        help="bytes of memory to serve, e.g. 512M or 4G (default 256M)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--ib-port", type=int, default=1, help="port number on the device (default 1)")
    parser.add_argument("--gid-index", type=int, default=0,
                        help="GID table index for RoCE (default 0; RoCE v2 is often 1 or 3)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much the node logs (default INFO)")
    parser.set_defaults(func=run_serve)
    return parser


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "serve",
        help="run an RDMA memory node (leases over TCP, one-sided access over verbs)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    return _configure(parser)


def _warn_memlock(pool: int) -> None:
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < pool:
        log.warning("the locked-memory limit (%d bytes, ulimit -l) is below the pool (%d bytes): "
                    "registering leases may fail", soft, pool)


def run_serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Run the memory node described by ``args`` until SIGINT/SIGTERM (or ``stop`` is set).

    Returns the exit status. Signal handlers are installed only when called
    from the main thread (and restored on the way out).
    """
    from grafos_fabric.drivers._verbs_compat import probe
    from grafos_fabric.drivers.verbs import MemoryNode

    from grafos_fabric.errors import FabricError, FabricValueError

    logging.basicConfig(level=getattr(logging, args.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reason = probe(args.device)
    if reason is not None:
        sys.stderr.write(f"grafos-fabric serve: no RDMA device: {reason}\n")
        return EX_UNAVAILABLE
    _warn_memlock(args.pool)
    try:
        node = MemoryNode.open(
            args.device,
            pool_size=args.pool,
            host=args.host,
            port=args.port,
            ib_port=args.ib_port,
            gid_index=args.gid_index,
        )
    except (FabricError, FabricValueError, OSError) as ex:
        sys.stderr.write(f"grafos-fabric serve: cannot start the memory node: {type(ex).__name__}: {ex}\n")
        return 1
    stop = stop or threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        # One line on stdout that scripts (and the device tests) can wait for.
        sys.stdout.write(f"serving rdma://{node.host}:{node.port} pool={args.pool} node={node.table.node_tag}\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        node.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """``grafos-fabric serve ...`` on its own: parse ``argv`` and run."""
    parser = _configure(argparse.ArgumentParser(prog="grafos-fabric serve", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(serve_main())
