"""Ratios, targets and output (rich tables, JSON, matplotlib plot) for ``grafos-bench``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from grafos_fabric.tools.bench_runner import CaseResult
from grafos_fabric.tools.bench_transports import fmt_size
from rich.console import Console
from rich.table import Table

#: The peer mode a fabric mode is compared with (reserve/commit is single-item production).
PEER_MODE = {"single": "single", "batch": "batch", "reserve": "single"}


@dataclass
class Ratio:
    """One fabric case against everything measured at its size in the same run."""

    size: int
    mode: str
    items_per_s: float
    mb_per_s: float
    vs_copyto: float | None
    vs: dict[str, float] = field(default_factory=dict)  # peer -> fabric items/s / peer items/s
    vs_pipe: float | None = None  # against the bare shared-memory pipeline (shm_pipe)
    best_peer: str | None = None
    vs_best_peer: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mode": self.mode,
            "peer_mode": PEER_MODE.get(self.mode, self.mode),
            "items_per_s": self.items_per_s,
            "mb_per_s": self.mb_per_s,
            "vs_copyto": self.vs_copyto,
            "vs_shm_pipe": self.vs_pipe,
            "vs": dict(self.vs),
            "best_peer": self.best_peer,
            "vs_best_peer": self.vs_best_peer,
        }


@dataclass
class Target:
    """A target from the foundation issue, judged on this run's figures."""

    name: str
    required: float
    measured: float | None
    against: str

    @property
    def met(self) -> bool | None:
        return None if self.measured is None else self.measured >= self.required

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "required": self.required,
            "measured": self.measured,
            "against": self.against,
            "met": self.met,
        }


def _lookup(results: Sequence[CaseResult]) -> dict[tuple[str, str, int], CaseResult]:
    return {(r.transport, r.mode, r.size): r for r in results if r.ok}


def compute_ratios(results: Sequence[CaseResult], peers: Sequence[str]) -> list[Ratio]:
    """For each successful fabric case: the ratio of its items/s to the ceilings and to each peer.

    A peer is compared in the same mode (single with single, batch with
    batch; reserve with single); the best peer is the fastest of those.
    """
    by = _lookup(results)
    out = []
    for r in results:
        if r.transport != "fabric" or not r.ok:
            continue
        ct = by.get(("copyto", "copy", r.size))
        ratio = Ratio(r.size, r.mode, r.items_per_s, r.mb_per_s, r.items_per_s / ct.items_per_s if ct else None)
        pipe = by.get(("shm_pipe", "pipe", r.size))
        ratio.vs_pipe = r.items_per_s / pipe.items_per_s if pipe else None
        best: CaseResult | None = None
        for peer in peers:
            p = by.get((peer, PEER_MODE.get(r.mode, r.mode), r.size))
            if p is None:
                continue
            ratio.vs[peer] = r.items_per_s / p.items_per_s
            if best is None or p.items_per_s > best.items_per_s:
                best = p
        if best is not None:
            ratio.best_peer = best.transport
            ratio.vs_best_peer = r.items_per_s / best.items_per_s
        out.append(ratio)
    return out


#: The batched peers issue 2 names (its "about 20 M items/s" follows from them).
ISSUE_BATCH_PEERS = ("faster_fifo", "zmq")


def compute_targets(ratios: Sequence[Ratio]) -> list[Target]:
    """The targets of issue 2, from this run's ratios (``measured`` is None when not run).

    The 64 B batched target is judged twice: against the best of every
    batching peer measured (mp.Queue lists and zmq packed frames included),
    and against the batched peers the issue names (faster-fifo
    put_many/get_many, zmq send_multipart), so neither reading hides the other.
    """
    by = {(x.size, x.mode): x for x in ratios}
    single, batch = by.get((64, "single")), by.get((64, "batch"))
    named = {p: v for p, v in batch.vs.items() if p in ISSUE_BATCH_PEERS} if batch else {}
    named_best = min(named, key=lambda p: named[p], default=None)
    targets = [
        Target("64 B single push/pop vs best peer", 2.0, single.vs_best_peer if single else None, _best(single)),
        Target("64 B batched vs best peer", 15.0, batch.vs_best_peer if batch else None, _best(batch)),
        Target(
            "64 B batched vs the issue's batched peers",
            15.0,
            named[named_best] if named_best else None,
            f"{named_best} (batch)" if named_best else "-",
        ),
    ]
    big = [x for x in ratios if x.size == 1 << 20 and x.vs_copyto is not None]
    top = max(big, key=lambda x: x.vs_copyto or 0.0, default=None)
    targets.append(
        Target(
            "1 MiB vs np.copyto of 1 MiB" + (f" (best mode: {top.mode})" if top else ""),
            0.9,
            top.vs_copyto if top else None,
            "np.copyto 1 MiB",
        )
    )
    return targets


def _best(r: Ratio | None) -> str:
    return f"{r.best_peer} ({PEER_MODE.get(r.mode, r.mode)})" if r and r.best_peer else "-"


def fmt_rate(x: float) -> str:
    """``12345678`` -> ``"12.35 M"``."""
    if x <= 0 or math.isnan(x):
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def _styled_ratio(x: float | None, good: float = 1.0) -> str:
    s = fmt_ratio(x)
    if x is None:
        return s
    return f"[green]{s}[/green]" if x >= good else f"[red]{s}[/red]"


def render(
    console: Console,
    results: Sequence[CaseResult],
    ratios: Sequence[Ratio],
    targets: Sequence[Target],
    peers: Sequence[str],
    meta: dict[str, Any],
    baselines: dict[str, str],
    extra: dict[str, list[dict[str, Any]]],
    skipped: dict[str, str],
) -> None:
    """Print the run's tables: every case (and what each baseline is), fabric vs each peer, targets, extras."""
    title = (
        f"grafos-bench: driver {meta['driver']} ({meta['access']}), {meta['duration']:g} s per case, "
        f"best of {meta['repeat']}, "
        f"{meta['cpus']} CPUs, {meta['start_method']}{', pinned' if meta['pinned'] else ''}"
    )
    spread = any(len(r.samples) > 1 for r in results)
    caption = "spread: (best - worst) / best over the rounds" if spread else None
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for col in ("size", "transport", "mode", "items/s", "MB/s", "x copyto", *(["spread"] if spread else [])):
        t.add_column(col, justify="left" if col in ("size", "transport", "mode") else "right")
    by = _lookup(results)
    prev = None
    for r in results:
        if prev is not None and r.size != prev:
            t.add_section()
        prev = r.size
        ct = by.get(("copyto", "copy", r.size))
        vs_ct = r.items_per_s / ct.items_per_s if ct and r.ok and r.transport != "copyto" else None
        name = f"[bold]{r.transport}[/bold]" if r.transport == "fabric" else r.transport
        if r.ok:
            t.add_row(
                fmt_size(r.size),
                name,
                r.mode,
                fmt_rate(r.items_per_s),
                f"{r.mb_per_s:,.0f}",
                fmt_ratio(vs_ct),
                *([_spread(r.samples)] if spread else []),
            )
        else:
            t.add_row(fmt_size(r.size), name, r.mode, "[red]error[/red]", "-", "-", *(["-"] if spread else []))
    if results:
        console.print(t)
    for r in results:
        if r.error:
            console.print(f"[red]{r.transport}/{r.mode}/{fmt_size(r.size)} failed:[/red] {r.error}")
    if results and baselines:
        console.print("Compared against, measured in this run:")
        for name, what in baselines.items():
            console.print(f"  [bold]{name}[/bold]: {what}")

    if ratios:
        rt = Table(
            title="grafos-fabric / peer, items/s, same run (>1: fabric faster)",
            caption="* compared with the peers' single calls (reserve/commit produces one item at a time)",
            title_justify="left",
            caption_justify="left",
        )
        pipe = any(x.vs_pipe is not None for x in ratios)
        cols = ("size", "mode", "items/s", "x copyto", *(["x shm_pipe"] if pipe else []), *[f"x {p}" for p in peers])
        for col in (*cols, "x best peer"):
            rt.add_column(col, justify="left" if col in ("size", "mode") else "right")
        for x in ratios:
            rt.add_row(
                fmt_size(x.size),
                x.mode + ("" if PEER_MODE.get(x.mode, x.mode) == x.mode else "*"),
                fmt_rate(x.items_per_s),
                fmt_ratio(x.vs_copyto),
                *([fmt_ratio(x.vs_pipe)] if pipe else []),
                *[_styled_ratio(x.vs.get(p)) for p in peers],
                (_styled_ratio(x.vs_best_peer) + f" {x.best_peer}") if x.best_peer else "-",
            )
        console.print(rt)

    if targets:
        tt = Table(title="Targets (issue 2)", title_justify="left")
        for col in ("target", "required", "measured", "against", "met"):
            tt.add_column(col)
        for g in targets:
            met = "-" if g.met is None else ("[green]yes[/green]" if g.met else "[red]no[/red]")
            tt.add_row(g.name, f">= {g.required:g}x", fmt_ratio(g.measured), g.against, met)
        console.print(tt)

    for name, rows in extra.items():
        if not rows:
            continue
        et = Table(title=f"{name} (same run; every field in the JSON)", title_justify="left")
        keys = list(dict.fromkeys(k for row in rows for k in row))
        shown = EXTRA_COLUMNS.get(name)
        if shown is not None:
            keys = [k for k in (*shown, "error") if k in keys]
        for k in keys:
            label = COLUMN_LABELS.get(k, k.replace("_per_s", "/s").replace("_", " "))
            et.add_column(label, justify="left" if k in ("case", "handoff") else "right")
        for row in rows:
            et.add_row(*[_cell(k, row.get(k)) for k in keys])
        console.print(et)

    for what, why in skipped.items():
        console.print(f"[yellow]skipped[/yellow] {what}: {why}")


def _spread(samples: Sequence[float]) -> str:
    """How far the slowest round fell below the best: ``(max - min) / max``."""
    if len(samples) < 2 or max(samples) <= 0:
        return "-"
    return f"{(max(samples) - min(samples)) / max(samples):.0%}"


#: The columns the console shows for an extra case (all of them when not listed here).
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {
    "relocation": (
        "handoff",
        "relocations_per_s",
        "steady_items_per_s",
        "relocating_items_per_s",
        "ratio",
        "rebind_p50_ms",
        "rebind_p99_ms",
        "relocate_p50_ms",
        "relocate_p99_ms",
        "rebind_ok",
        "ratio_ok",
    ),
}


COLUMN_LABELS = {
    "relocations_per_s": "reloc/s",
    "steady_items_per_s": "steady items/s",
    "relocating_items_per_s": "reloc items/s",
    "rebind_p50_ms": "rebind p50 ms",
    "rebind_p99_ms": "rebind p99 ms",
    "relocate_p50_ms": "relocate p50 ms",
    "relocate_p99_ms": "relocate p99 ms",
}


def _cell(key: str, v: Any) -> str:
    """One value of an extra case's row, formatted by what its key says it is."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "[green]yes[/green]" if v else "[red]no[/red]"
    if key == "ratio" and isinstance(v, (int, float)):
        return fmt_ratio(float(v))
    if key in ("size", "item_size", "capacity") and isinstance(v, int):
        return fmt_size(v)
    if key.endswith("_items_per_s") and isinstance(v, (int, float)):
        return fmt_rate(float(v))
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def to_json(
    results: Sequence[CaseResult],
    ratios: Sequence[Ratio],
    targets: Sequence[Target],
    meta: dict[str, Any],
    baselines: dict[str, str],
    extra: dict[str, list[dict[str, Any]]],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """The machine-readable report (schema version 1)."""
    return {
        "tool": "grafos-bench",
        "schema": 1,
        "meta": meta,
        "baselines": baselines,
        "results": [r.to_dict() for r in results],
        "ratios": [x.to_dict() for x in ratios],
        "targets": [g.to_dict() for g in targets],
        **extra,
        "skipped": skipped,
    }


def write_json(doc: dict[str, Any], path: str, stdout: IO[str]) -> None:
    """Write ``doc`` to ``path`` (``-``: ``stdout``)."""
    text = json.dumps(doc, indent=2, sort_keys=False)
    if path == "-":
        stdout.write(text + "\n")
        stdout.flush()
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def plot(ratios: Sequence[Ratio], peers: Sequence[str], path: str, title: str) -> None:
    """A grouped bar chart (log scale) of fabric/peer and fabric/ceiling ratios, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    against = [*peers, "copyto"] + (["shm_pipe"] if any(x.vs_pipe is not None for x in ratios) else [])
    ceiling = {"copyto": lambda x: x.vs_copyto, "shm_pipe": lambda x: x.vs_pipe}
    labels = [f"{fmt_size(x.size)}\n{x.mode}" for x in ratios]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(ratios) + 2), 4.5))
    width = 0.8 / max(1, len(against))
    for i, name in enumerate(against):
        get = ceiling.get(name, lambda x, name=name: x.vs.get(name))
        vals = [get(x) or 0.0 for x in ratios]
        xs = [j + (i - (len(against) - 1) / 2) * width for j in range(len(ratios))]
        ax.bar(
            xs,
            [v if v > 0 else float("nan") for v in vals],
            width,
            label=f"vs {name}" + (" (ceiling)" if name in ceiling else ""),
            hatch="//" if name in ceiling else None,
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("grafos-fabric items/s ÷ other (same run)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
