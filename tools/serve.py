"""``grafos-fabric serve``: run a memory node.

::

    grafos-fabric serve --token-file /etc/grafos/node.token --pool 4G --device mlx5_0
    grafos-fabric serve --token-file node.token --driver nodeshm --pool 64M     # no device: same host only

serves a pool of ``--pool`` bytes and hands out leases on it over an
authenticated TCP control channel (see :mod:`grafos_fabric.drivers.node`).
The ``verbs`` driver (default) registers each lease on ``--device`` (default:
the first RDMA device); ``nodeshm`` needs no device and reaches clients on
this host only. It runs until SIGINT or SIGTERM.

Security: ``--token-file`` holds the node's secret (created 0600 with a
random 256-bit secret when missing; never pass a secret on the command line).
Without ``--tenants`` it is also the secret of the one tenant, ``default``;
``--tenants PATH`` (TOML) names tenants, their secret files and quotas. The
node binds to 127.0.0.1 unless ``--host`` names another address *and*
``--allow-remote`` is given: the control channel is authenticated but not
encrypted, so a memory node belongs on a trusted network.

The CLI registers it with :func:`add_serve_parser` (which sets
``func=run_serve``); :func:`serve_main` runs it on its own
(``python -m grafos_fabric.tools.serve``).

Registering memory pins it: a verbs node needs a locked-memory limit at least
as large as the pool (``ulimit -l``). A warning is logged when it is lower.

Exit status: 0 after a signal, 2 for bad arguments, 69 (``EX_UNAVAILABLE``)
when there is no usable RDMA device, 1 when the node cannot start otherwise
(port taken, pool too large to pin, unreadable token or tenants file...).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from grafos_fabric.tools._units import parse_size

__all__ = ["EX_UNAVAILABLE", "add_serve_parser", "parse_size", "run_serve", "serve_main"]

log = logging.getLogger("grafos_fabric.tools.serve")

EX_UNAVAILABLE = 69
_SCHEMES = {"verbs": "rdma", "nodeshm": "nodeshm", "ucx": "ucx"}


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from grafos_fabric.drivers.node.wire import DEFAULT_PORT

    parser.add_argument("--driver", choices=sorted(_SCHEMES), default="verbs",
                        help="verbs (RDMA device), ucx (UCX: IB/RoCE, tcp or sm) or nodeshm (no device, "
                             "clients on this host only)")
    parser.add_argument("--token-file", default=os.environ.get("GRAFOS_TOKEN_FILE"),
                        help="the node's secret (created 0600 if missing; default $GRAFOS_TOKEN_FILE)")
    parser.add_argument("--tenants", default=None, help="tenants, secrets and quotas (TOML); default: one tenant")
    parser.add_argument("--device", default=None, help="RDMA device name (default: the first one)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"TCP port of the control channel (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--pool", type=parse_size, default=parse_size("256M"),
                        help="bytes of memory to serve, e.g. 512M or 4G (default 256M)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow --host beyond loopback (trusted networks only: see the README)")
    parser.add_argument("--max-ttl", type=_positive(float), default=None, help="longest lease/renewal (seconds)")
    parser.add_argument("--max-connections", type=_positive(int), default=None, help="connections in total")
    parser.add_argument("--idle-timeout", type=_positive(float), default=None,
                        help="seconds a connection may stay silent")
    parser.add_argument("--ib-port", type=int, default=1, help="port number on the device (default 1)")
    parser.add_argument("--gid-index", type=int, default=0,
                        help="GID table index for RoCE (default 0; RoCE v2 is often 1 or 3)")
    parser.add_argument("--ucx-tls", default="tcp",
                        help="ucx driver: UCX transports (UCX_TLS), e.g. tcp, sm,tcp, rc (default tcp)")
    parser.add_argument("--ucx-net-devices", default=None,
                        help="ucx driver: interfaces to use (UCX_NET_DEVICES), e.g. eth0 (default: UCX's choice)")
    parser.add_argument("--ucx-progress", choices=["busy", "event"], default="busy",
                        help="ucx driver: busy-polling progress thread (lowest latency, one core) or event")
    parser.add_argument("--ucx-prefault", action="store_true",
                        help="ucx driver: fault the whole pool in at start (MAP_POPULATE; it is resident from "
                             "then on), so a grant zeroes its span without page faults")
    parser.add_argument("--ucx-local-map", action="store_true",
                        help="ucx driver: back each span with its own file in /dev/shm, mapped over the pool, so "
                             "clients on this host (as this user, URL option map=local) map it and reach the "
                             "ring with CPU loads instead of UCX (needs /dev/shm room for the spans)")
    parser.add_argument("--supervise", action="store_true",
                        help="run the node in a child process and restart it when it dies abnormally "
                             "(UCX can abort inside its atomic handler when a client vanishes)")
    parser.add_argument("--metrics", action="store_true",
                        help="record metrics (grafos-fabric node metrics reads them)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much the node logs (default INFO)")
    parser.set_defaults(func=run_serve)
    return parser


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "serve",
        help="run a memory node (authenticated leases over TCP, one-sided access over verbs or shm)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    return _configure(parser)


def _warn_memlock(pool: int) -> None:
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < pool:
        log.warning("the locked-memory limit (%d bytes, ulimit -l) is below the pool (%d bytes): "
                    "registering leases may fail", soft, pool)


def _fail(text: str, status: int = 1) -> int:
    sys.stderr.write(f"grafos-fabric serve: {text}\n")
    return status


def run_serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Run the memory node described by ``args`` until SIGINT/SIGTERM (or ``stop`` is set).

    Returns the exit status. Signal handlers are installed only when called
    from the main thread (and restored on the way out).
    """
    from dataclasses import replace

    from grafos_fabric import observe
    from grafos_fabric.drivers.node.auth import NodeLimits, load_or_create_secret, load_policy
    from grafos_fabric.drivers.node.server import NodeServer
    from grafos_fabric.errors import FabricError, FabricValueError

    logging.basicConfig(level=getattr(logging, args.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "supervise", False):
        return _supervise(args, stop)
    if not args.token_file:
        return _fail("--token-file (or $GRAFOS_TOKEN_FILE) is required: the node's secret", 2)
    if args.driver == "verbs":
        from grafos_fabric.drivers._verbs_compat import probe

        reason = probe(args.device)
        if reason is not None:
            return _fail(f"no RDMA device: {reason}", EX_UNAVAILABLE)
    if args.metrics:
        observe.enable()
    try:
        secret = load_or_create_secret(args.token_file)
        policy = load_policy(secret, args.tenants)
        overrides = {k: v for k, v in (("max_ttl", args.max_ttl), ("max_connections", args.max_connections),
                                       ("idle_timeout", args.idle_timeout)) if v is not None}
        if overrides:
            policy = replace(policy, limits=replace(policy.limits, **overrides))
    except (FabricError, FabricValueError, OSError) as ex:
        return _fail(f"{type(ex).__name__}: {ex}")
    assert isinstance(policy.limits, NodeLimits)
    try:
        if args.driver == "verbs":
            _warn_memlock(args.pool)
            from grafos_fabric.drivers.verbs import PyverbsRegistrar

            registrar: Any = PyverbsRegistrar(args.device, args.pool, args.ib_port, args.gid_index)
        elif args.driver == "ucx":
            from grafos_fabric.drivers.ucx import UcxRegistrar, available

            reason = available()
            if reason is not None:
                return _fail(f"UCX unavailable: {reason}", EX_UNAVAILABLE)
            registrar = UcxRegistrar(args.pool, host=args.host, tls=args.ucx_tls,
                                     net_devices=args.ucx_net_devices, progress=args.ucx_progress,
                                     prefault=args.ucx_prefault, local_map=args.ucx_local_map)
        else:
            from grafos_fabric.drivers.node.shmfile import ShmFileRegistrar

            registrar = ShmFileRegistrar(args.pool)
        try:
            node = NodeServer(registrar, policy, host=args.host, port=args.port, allow_remote=args.allow_remote)
        except BaseException:
            registrar.close()
            raise
        node.start()
    except (FabricError, FabricValueError, OSError) as ex:
        return _fail(f"cannot start the memory node: {type(ex).__name__}: {ex}")
    stop = stop or threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        # One line on stdout that scripts (and the tests) can wait for.
        sys.stdout.write(f"serving {_SCHEMES[args.driver]}://{node.host}:{node.port} pool={args.pool} "
                         f"node={node.node_tag} driver={args.driver}\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        node.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _child_args(args: argparse.Namespace) -> list[str]:
    """The command line of the supervised node: every option as parsed, without ``--supervise``."""
    out: list[str] = []
    for name in ("driver", "token_file", "tenants", "device", "port", "pool", "host", "max_ttl",
                 "max_connections", "idle_timeout", "ib_port", "gid_index", "ucx_tls", "ucx_net_devices",
                 "ucx_progress", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    for flag in ("allow_remote", "metrics", "ucx_prefault", "ucx_local_map"):
        if getattr(args, flag, False):
            out.append("--" + flag.replace("_", "-"))
    return out


def _supervise(args: argparse.Namespace, stop: threading.Event | None) -> int:
    """Run the node in a child process; restart it (with back-off) whenever it dies abnormally.

    A restarted node starts empty: its clients see their leases as unknown
    (``LeaseExpired``) and relocate. SIGINT/SIGTERM stop the child and return."""
    import subprocess
    import time

    argv = [sys.executable, "-m", "grafos_fabric.tools.serve", *_child_args(args)]
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    backoff = 0.1
    restarts = 0
    try:
        while not stop.is_set():
            started = time.monotonic()
            child = subprocess.Popen(argv)
            while child.poll() is None and not stop.wait(0.1):
                pass
            if stop.is_set():
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                return 0
            rc = child.returncode
            if rc in (0, 2, EX_UNAVAILABLE):  # a clean stop or a configuration error: restarting won't help
                return rc
            restarts += 1
            backoff = 0.1 if time.monotonic() - started > 10 else min(backoff * 2, 5.0)
            log.warning("memory node exited with status %d: restart %d in %.1fs", rc, restarts, backoff)
            stop.wait(backoff)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_main(argv: list[str] | None = None) -> int:
    """``grafos-fabric serve ...`` on its own: parse ``argv`` and run."""
    parser = _configure(argparse.ArgumentParser(prog="grafos-fabric serve", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(serve_main())
