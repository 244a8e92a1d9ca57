"""``grafos-fabric``: inspect and manage leased regions and queues.

    grafos-fabric ls       [--fabric shm://NS | --all] [--json]   list regions, leases, queues, dead owners
    grafos-fabric inspect  NAME [--fabric shm://NS | --all] [--json]   one region (NAME: a unique prefix)
    grafos-fabric free     NAME [--fabric shm://NS | --all]       free one region now
    grafos-fabric reap     [--fabric shm://NS | --all] [--dead-owners]   reclaim dead regions
    grafos-fabric serve    --token-file F --pool SIZE [--driver verbs|nodeshm]   run a memory node
    grafos-fabric node     ls|revoke LEASE|metrics --node HOST:PORT   operate a memory node (admin secret)

``--all`` covers every shm namespace on this machine. Read-only commands never
change a segment: they copy its header and decode the copy. The tables need
``rich`` (``pip install 'grafos-fabric[cli]'``); ``--json`` output does not.

Exit status: 0 done, 1 no such region (or an ambiguous prefix), 2 a fabric
error, 3 the ``[cli]`` extra is missing.

An owner is *dead* when this host proves it: no process has its pid, or the
process that has it started after the segment was last changed (the pid was
reused). The segment's ``created_ns`` is not used for that: it is read from the
creator's clock, which may be a test's manual clock.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import stat
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.drivers import open_fabric
from grafos_fabric.drivers.shm import HEADER, SHM_DIR, ShmFabric, segment_info

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main", "owner_status", "ring_info"]

EXIT_NOT_FOUND = 1
EXIT_FABRIC = 2
EXIT_MISSING_EXTRA = 3

_PID_ROLE = 1 << 63  # role ids carry the holder's pid (grafos_fabric.queue._roles._role_id)
_CLOCK_SLACK_S = 2.0  # /proc/stat's btime has whole seconds; the wall clock may step a little


def ring_info(path: str) -> dict[str, Any] | None:
    """Decode the ring header of a queue segment (a copy of it); None if it holds no ring."""
    ring_size = int(lib.GF_RING_HEADER_SIZE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # /dev/shm is shared
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        size = st.st_size
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
        "producer_pid": _role_pid(int(h.producer_id)),
        "consumer_pid": _role_pid(int(h.consumer_id)),
    }


def _role_pid(role_id: int) -> int | None:
    if not role_id & _PID_ROLE:
        return None
    return ((role_id >> 32) & 0x7FFFFFFF) or None


# -- owner liveness ------------------------------------------------------------------
def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (wall-clock seconds), from /proc; None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after "pid (comm)"
    except (ValueError, IndexError):
        return None
    btime = _boot_time()
    if btime is None:
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def owner_status(pid: int | None, changed_at: float | None) -> str:
    """``"alive"``, ``"dead"`` or ``"unknown"`` for a pid recorded in a segment on this host.

    ``dead`` only when provable: no process has the pid, or the process that
    has it started after ``changed_at`` (the segment file's ctime, wall-clock
    seconds: the creator wrote the segment after it started, so a later start
    means the pid was reused). A pid this process cannot see (another pid
    namespace) is indistinguishable from a dead one; ``reap --dead-owners`` is
    meant for hosts where the fabric's users share one.
    """
    if not pid or pid <= 0 or pid > 0x7FFFFFFF:
        return "unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # it exists; it's just not ours
    except OSError:
        return "unknown"
    start = _process_start(pid)
    if start is not None and changed_at is not None and start > changed_at + _CLOCK_SLACK_S:
        return "dead"
    return "alive"


def _annotate_owners(info: dict[str, Any], path: str) -> None:
    """Add ``owner`` (alive/dead/unknown) and ``dead_owner`` (every known user provably dead)."""
    try:
        changed = os.stat(path).st_ctime
    except OSError:
        changed = None
    owner = owner_status(info.get("owner_pid"), changed)
    info["owner"] = owner
    holders = [p for p in ((info.get("queue") or {}).get(k) for k in ("producer_pid", "consumer_pid")) if p]
    info["dead_owner"] = owner == "dead" and all(owner_status(p, changed) == "dead" for p in holders)


# -- reading the namespace -----------------------------------------------------------
def _fabrics(args: argparse.Namespace) -> list[ShmFabric]:
    if args.all:
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            names = []
        spaces = sorted({n.split(".")[1] for n in names if n.startswith("grafos.") and n.count(".") >= 2})
        out = []
        for ns in spaces:
            try:
                out.append(ShmFabric(ns))
            except E.FabricValueError:
                continue  # not a name this package makes
        return out
    fabric = open_fabric(args.fabric)
    if not isinstance(fabric, ShmFabric):
        raise E.Unsupported("ls/inspect/free/reap read shm namespaces; a memory node lists its leases in its own log")
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
            if info["status"] == "ok":
                _annotate_owners(info, path)
            rows.append(info)
    return rows


class Ambiguous(E.FabricValueError):
    """A region prefix that matches more than one region."""


def _find(args: argparse.Namespace) -> dict[str, Any] | None:
    """The one region ``args.name`` names: a full name, a unique prefix, or ``NAMESPACE/NAME``.

    None when nothing matches; :class:`Ambiguous` (listing the candidates) when several do.
    """
    want = args.name
    ns = None
    if "/" in want:
        ns, want = want.split("/", 1)
    rows = [r for r in _rows(args) if ns is None or r["namespace"] == ns]
    exact = [r for r in rows if r["name"] == want]
    hits = exact or [r for r in rows if want and r["name"].startswith(want)]
    if len(hits) > 1:
        names = ", ".join(f"{r['namespace']}/{r['name']}" for r in hits)
        raise Ambiguous(f"{args.name!r} matches {len(hits)} regions: {names}; give more of the name")
    return hits[0] if hits else None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def _console() -> Console:
    from rich.console import Console

    return Console()


def _queue_text(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    if q.get("ring") != "ok":
        return str(q["ring"])
    text = f"{q['next_seq'] - q['first_seq']} pushed, {_human(q['used'])} used, epoch {q['epoch']}"
    return text + (", sealed" if q["sealed"] else "")


def _pid_text(r: dict[str, Any]) -> str:
    pid = r.get("owner_pid")
    if pid is None:
        return "-"
    if r.get("owner") == "dead":
        return f"{pid} [red](dead)[/red]"
    return str(pid)


# -- commands ------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    rows = _rows(args)
    if args.json:
        _print_json(rows)
        return 0
    console = _console()
    if not rows:
        console.print("no regions")
        return 0
    by_ns: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_ns.setdefault(r["namespace"], []).append(r)
    for ns, ns_rows in by_ns.items():  # one table per namespace: no namespace column to squeeze
        console.print(_ls_table(f"shm://{ns}", ns_rows))
    dead = sum(1 for r in rows if r.get("dead_owner") and r.get("state") == "active")
    if dead:
        console.print(f"{dead} active region(s) left by dead processes: grafos-fabric reap --dead-owners reclaims them")
    return 0


def _ls_table(title: str, rows: list[dict[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table

    # Names are what `inspect` and `free` take: never cut; the other columns wrap.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("lease", no_wrap=True)
    table.add_column("left", justify="right", no_wrap=True)
    table.add_column("gen", justify="right", overflow="fold")
    table.add_column("pid", overflow="fold")
    table.add_column("queue", overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            _human(r["size"]),
            r.get("state", r["status"]),
            f"{r['remaining']:.0f}s" if "remaining" in r else "-",
            str(r.get("generation", "-")),
            _pid_text(r),
            _queue_text(r.get("queue")),
        )
    return table


def cmd_inspect(args: argparse.Namespace) -> int:
    r = _find(args)
    if r is None:
        print(f"grafos-fabric inspect: no region named {args.name!r} (grafos-fabric ls lists them)", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        _print_json(r)
        return 0
    from rich.table import Table

    table = Table(title=f"{r['namespace']}/{r['name']}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for k, v in r.items():
        if k != "queue":
            table.add_row(k, str(v))
    for k, v in (r.get("queue") or {}).items():
        table.add_row(f"queue.{k}", str(v))
    _console().print(table)
    return 0


def _free_path(fabric: ShmFabric, path: str) -> bool:
    """Mark the lease freed (so every mapping fails closed), then unlink. False if it was gone."""
    fabric._mark_freed(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def cmd_free(args: argparse.Namespace) -> int:
    r = _find(args)
    if r is None:
        print(f"grafos-fabric free: no region named {args.name!r} (grafos-fabric ls lists them)", file=sys.stderr)
        return EXIT_NOT_FOUND
    fabric = ShmFabric(r["namespace"])
    if not _free_path(fabric, r["path"]):
        print(f"grafos-fabric free: {r['namespace']}/{r['name']} was already gone", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"freed {r['namespace']}/{r['name']} ({_human(r['size'])}, lease {r.get('state', r['status'])})")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    total = 0
    dead_owned = 0
    for fabric in _fabrics(args):
        total += fabric.reap()
        if args.dead_owners:
            for path in fabric.segments():
                try:
                    info = segment_info(path, fabric.clock)
                except OSError:
                    continue
                if info["status"] != "ok" or info.get("state") != "active":
                    continue
                ring = ring_info(path)
                if ring:
                    info["queue"] = ring
                _annotate_owners(info, path)
                if info["dead_owner"] and _free_path(fabric, path):
                    dead_owned += 1
    total += dead_owned
    what = f" ({dead_owned} left by dead processes)" if args.dead_owners else ""
    print(f"reclaimed {total} region(s){what}")
    return 0


# -- parser --------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--fabric",
        default=None,
        metavar="URL",
        help="the shm namespace to read, as shm://NAME (default: $GRAFOS_FABRIC, else shm://default)",
    )
    where.add_argument("--all", action="store_true", help="every shm namespace on this machine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grafos-fabric",
        description="Inspect and manage grafos-fabric's leased regions and queues, and run a memory node.",
        epilog="Run 'grafos-fabric COMMAND --help' for a command's options. "
        "Exit status: 0 done, 1 no such region, 2 fabric error, 3 missing extra.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "ls",
        help="list regions with their lease, owner pid and queue",
        description="List the regions of a namespace: lease state, seconds left, generation, owner pid "
        "(marked dead when that process is provably gone) and the queue in it. Names are never cut.",
    )
    _common(p)
    p.add_argument("--json", action="store_true", help="print a JSON list (every field) instead of the table")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "inspect",
        help="show one region: lease, owner and ring header",
        description="Show every field of one region's segment header and queue ring header (read from a copy).",
    )
    _common(p)
    p.add_argument("name", metavar="NAME", help="the region's name, a unique prefix of it, or NAMESPACE/NAME")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "free",
        help="free one region now",
        description="Free one region now, whatever its lease says: its lease is marked freed (every process "
        "still mapping it fails closed) and the segment is removed.",
    )
    _common(p)
    p.add_argument("name", metavar="NAME", help="the region's name, a unique prefix of it, or NAMESPACE/NAME")
    p.set_defaults(func=cmd_free)

    p = sub.add_parser(
        "reap",
        help="reclaim expired, revoked, freed and half-built regions",
        description="Reclaim the regions whose lease expired, was revoked or freed, or that were left "
        "half-built. With --dead-owners, also active regions whose owner and queue role holders are "
        "provably dead on this host.",
    )
    _common(p)
    p.add_argument(
        "--dead-owners",
        action="store_true",
        help="also free active regions whose creator and queue users are provably dead on this host "
        "(pid gone, or reused by a process that started later)",
    )
    p.set_defaults(func=cmd_reap)
    try:
        from .serve import add_serve_parser
    except ImportError:  # pragma: no cover - serve.py ships with the package
        pass
    else:
        add_serve_parser(sub)
    from .cli_node import add_node_parser

    add_node_parser(sub)
    for sp in sub.choices.values():  # module docstrings use reST; help is plain text
        if sp.description:
            sp.description = sp.description.replace("``", "")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``grafos-fabric``."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return int(args.func(args))
        if not getattr(args, "json", False) and args.command in ("ls", "inspect", "node"):
            try:
                import rich  # noqa: F401
            except ImportError:
                print(
                    f"grafos-fabric {args.command}: the tables need rich: pip install 'grafos-fabric[cli]' "
                    "(or use --json)",
                    file=sys.stderr,
                )
                return EXIT_MISSING_EXTRA
        return int(args.func(args))
    except (E.FabricError, E.FabricValueError, OSError) as exc:  # OSError: e.g. a segment of another user
        code = EXIT_NOT_FOUND if isinstance(exc, Ambiguous) else EXIT_FABRIC
        print(f"grafos-fabric {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
