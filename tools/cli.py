"""``grafos-fabric``: inspect and manage leased regions and queues.

    grafos-fabric ls       [--fabric shm://NS] [--all] [--json]   list regions and their leases
    grafos-fabric inspect  NAME [--fabric shm://NS] [--json]      one region: lease, ring header, counters
    grafos-fabric reap     [--fabric shm://NS] [--all]            reclaim expired/revoked/freed regions
    grafos-fabric serve    --token-file F --pool SIZE [--driver verbs|nodeshm]   run a memory node
    grafos-fabric node     ls|revoke LEASE|metrics --node HOST:PORT   operate a memory node (admin secret)

``--all`` covers every shm namespace on this machine. Read-only commands never
change a segment: they copy its header and decode the copy.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

from grafos_fabric.drivers import open_fabric
from grafos_fabric.drivers.shm import HEADER, SHM_DIR, ShmFabric, segment_info
from rich.console import Console
from rich.table import Table

from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi, lib

__all__ = ["main", "ring_info"]


def ring_info(path: str) -> dict[str, Any] | None:
    """Decode the ring header of a queue segment (a copy of it); None if it holds no ring."""
    ring_size = int(lib.GF_RING_HEADER_SIZE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER + ring_size:
            return None
        with mmap.mmap(fd, HEADER + ring_size, prot=mmap.PROT_READ) as mm:
            raw = bytes(mm[HEADER : HEADER + ring_size])
    finally:
        os.close(fd)
    buf = ffi.from_buffer(raw)
    rc = lib.gf_ring_check(buf, size - HEADER)
    if rc == lib.GF_E_NOT_READY:
        return None
    if rc != lib.GF_OK:
        return {"ring": "corrupted" if rc != lib.GF_E_VERSION else "version-mismatch"}
    h = ffi.cast("gf_ring_header *", buf)
    tail = int(h.tail)
    pos = tail & int(lib.GF_TAIL_POS_MASK)
    return {
        "ring": "ok",
        "capacity": int(h.capacity),
        "max_item": int(h.max_item),
        "dtype": ffi.string(h.dtype, int(h.dtype_len)).decode("ascii", "replace") or None,
        "epoch": int(h.epoch),
        "first_seq": int(h.first_seq),
        "next_seq": int(h.next_seq),
        "acked": int(h.acked),
        "tail": pos,
        "head": int(h.head),
        "used": pos - int(h.head),
        "sealed": bool(tail & int(lib.GF_TAIL_SEALED)),
        "seal_seq": int(h.seal_seq),
        "producer": bool(h.producer_id),
        "consumer": bool(h.consumer_id),
    }


def _fabrics(args: argparse.Namespace) -> list[ShmFabric]:
    if args.all:
        spaces = sorted({n.split(".")[1] for n in os.listdir(SHM_DIR) if n.startswith("grafos.") and n.count(".") >= 2})
        return [ShmFabric(ns) for ns in spaces]
    fabric = open_fabric(args.fabric)
    if not isinstance(fabric, ShmFabric):
        raise E.Unsupported("ls/inspect/reap read shm namespaces; a memory node lists its leases in its own log")
    return [fabric]


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for fabric in _fabrics(args):
        for path in fabric.segments():
            try:
                info = segment_info(path, fabric.clock)
            except OSError:
                continue
            info["namespace"] = fabric.namespace
            info["name"] = os.path.basename(path).split(".", 2)[2]
            ring = ring_info(path) if info["status"] == "ok" else None
            if ring:
                info["queue"] = ring
            rows.append(info)
    return rows


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_ls(args: argparse.Namespace, console: Console) -> int:
    rows = _rows(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"grafos-fabric regions ({'all namespaces' if args.all else args.fabric or 'default'})")
    for col in ("namespace", "name", "size", "lease", "remaining", "gen", "pid", "queue"):
        table.add_column(col)
    for r in rows:
        q = r.get("queue")
        qtext = ""
        if q and q.get("ring") == "ok":
            qtext = f"epoch {q['epoch']}, {q['next_seq'] - q['first_seq']} pushed, {_human(q['used'])} used"
            qtext += ", sealed" if q["sealed"] else ""
        elif q:
            qtext = q["ring"]
        table.add_row(
            r["namespace"],
            r["name"],
            _human(r["size"]),
            r.get("state", r["status"]),
            f"{r['remaining']:.1f}s" if "remaining" in r else "-",
            str(r.get("generation", "-")),
            str(r.get("owner_pid", "-")),
            qtext,
        )
    console.print(table)
    if not rows:
        console.print("no regions")
    return 0


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    for r in _rows(args):
        if r["name"] == args.name:
            if args.json:
                print(json.dumps(r, indent=2))
                return 0
            table = Table(title=f"{r['namespace']}/{r['name']}", show_header=False)
            table.add_column("field")
            table.add_column("value")
            for k, v in r.items():
                if k != "queue":
                    table.add_row(k, str(v))
            for k, v in (r.get("queue") or {}).items():
                table.add_row(f"queue.{k}", str(v))
            console.print(table)
            return 0
    console.print(f"[red]no region named {args.name!r}[/red]")
    return 1


def cmd_reap(args: argparse.Namespace, console: Console) -> int:
    total = 0
    for fabric in _fabrics(args):
        total += fabric.reap()
    console.print(f"reclaimed {total} region(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grafos-fabric", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fabric", default=None, help="fabric URL (default: $GRAFOS_FABRIC or shm://default)")
        p.add_argument("--all", action="store_true", help="every shm namespace on this machine")

    p = sub.add_parser("ls", help="list regions, their leases and queues")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("inspect", help="show one region's lease and ring header")
    common(p)
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("reap", help="reclaim regions whose lease expired, was revoked or freed")
    common(p)
    p.set_defaults(func=cmd_reap)
    try:
        from .serve import add_serve_parser
    except ImportError:  # pragma: no cover - serve.py ships with the package
        pass
    else:
        add_serve_parser(sub)
    from .cli_node import add_node_parser

    add_node_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "serve":
            return int(args.func(args))
        return int(args.func(args, console))
    except (E.FabricError, E.FabricValueError) as exc:
        console.print(f"[red]grafos-fabric {args.command}: {type(exc).__name__}: {exc}[/red]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
