"""``grafos-fabric node``: operate a memory node with its admin secret.

::

    grafos-fabric node ls      --node HOST:PORT [--token-file PATH] [--json]   tenants, leases, usage
    grafos-fabric node revoke  LEASE --node HOST:PORT [--token-file PATH]     revoke any lease now
    grafos-fabric node metrics --node HOST:PORT [--token-file PATH]           Prometheus text (serve --metrics)

The admin authenticates as ``@admin`` with the node's own token file (the
``serve --token-file``; default ``$GRAFOS_TOKEN_FILE``); the secret never
goes on the wire or the command line.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

__all__ = ["add_node_parser", "run_node"]


def _node_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        value = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {port!r}") from None
    if not 0 < value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return host.strip("[]"), value


def add_node_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``node ls|revoke|metrics`` to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "node",
        help="list a memory node's tenants and leases, revoke a lease",
        description="Operate a memory node (grafos-fabric serve) with its admin secret: the node's own "
        "token file. Every subcommand talks to the node's control address over TCP.",
    )
    node_sub = parser.add_subparsers(dest="node_command", required=True, help="what to do")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node", type=_node_address, required=True, help="the node's control address HOST:PORT")
        p.add_argument("--token-file", default=os.environ.get("GRAFOS_TOKEN_FILE"),
                       help="the node's token file (default $GRAFOS_TOKEN_FILE)")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node")

    p = node_sub.add_parser("ls", help="tenants, leases and usage",
                            description="List the node's tenants, their leases and their usage.")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = node_sub.add_parser("revoke", help="revoke a lease now (its holders fail closed)",
                            description="Revoke one lease now: its holders' next operations fail closed.")
    common(p)
    p.add_argument("lease", help="the lease id (32 hex digits, from node ls)")
    p = node_sub.add_parser("metrics", help="the node's metrics, Prometheus text format",
                            description="Print the node's metrics in the Prometheus text format.")
    common(p)
    parser.set_defaults(func=run_node)
    return parser


def _admin(args: argparse.Namespace) -> Any:
    from grafos_fabric.drivers.node.auth import ADMIN, tenant_key
    from grafos_fabric.drivers.node.client import ControlClient, resolve_secret

    host, port = args.node
    secret = resolve_secret(args.token_file)
    return ControlClient(host, port, tenant=ADMIN, key=tenant_key(secret, ADMIN), timeout=args.timeout,
                         client="grafos-fabric node")


def run_node(args: argparse.Namespace) -> int:
    """Run ``node ls|revoke|metrics``; typed errors go up to the CLI (exit status 2)."""
    import msgspec
    from rich.console import Console
    from rich.table import Table

    from grafos_fabric.drivers.node import wire as W
    from grafos_fabric.errors import FabricValueError

    console = Console()
    c = _admin(args)
    try:
        if args.node_command == "revoke":
            lease = args.lease.strip().lower()
            if len(lease) != 32 or any(ch not in "0123456789abcdef" for ch in lease):
                raise FabricValueError(f"not a lease id: {args.lease!r} (32 hex digits)")
            c.call(W.AdminRevoke(lease_id=lease), W.Done)
            console.print(f"revoked lease {lease}")
            return 0
        if args.node_command == "metrics":
            m: W.Metrics = c.call(W.AdminMetrics(), W.Metrics)
            console.out(m.text or "# the node records no metrics (start it with serve --metrics)", end="")
            return 0
        listing: W.Listing = c.call(W.AdminList(), W.Listing)
    finally:
        c.close()
    if args.json:
        console.out(json.dumps(msgspec.to_builtins(listing), indent=2, sort_keys=True))
        return 0
    console.print(f"node {listing.node} ({listing.driver}): pool {listing.pool_bytes} bytes, "
                  f"{listing.free_bytes} free, {listing.quarantined_bytes} quarantined, "
                  f"{listing.connections} connection(s)")
    tenants = Table("tenant", "leases", "bytes", "quota bytes", "max leases", "connections")
    for t in listing.tenants:
        tenants.add_row(t.tenant, str(t.leases), str(t.bytes), str(t.quota_bytes), str(t.max_leases),
                        str(t.connections))
    console.print(tenants)
    leases = Table("lease", "tenant", "generation", "bytes", "offset", "remaining s", "holders")
    for row in listing.leases:
        leases.add_row(row.lease_id, row.tenant, str(row.generation), str(row.nbytes), str(row.offset),
                       f"{row.remaining:.1f}", str(row.holders))
    console.print(leases)
    return 0
