"""Ratios and output (rich tables, JSON, matplotlib plot) for ``grafos-bench``.

Ratios are reported against the peers and the ceilings only; goals belong in
the README. Every table fits 80 columns (nothing is cut to an ellipsis).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from grafos_fabric.tools.bench_runner import CaseResult
from grafos_fabric.tools.bench_transports import fmt_size

if TYPE_CHECKING:
    from rich.console import Console

#: The peer mode a fabric mode is compared with (reserve/commit is single-item production).
PEER_MODE = {
    "single": "single",
    "single_array": "single",
    "batch": "batch",
    "reserve": "single",
    "produce": "single",
    "reserve_batch": "batch",
    "produce_batch": "batch",
}

#: Fabric cases divided by fabric cases of the same run: (case, over, what it says).
SELF_RATIOS = (
    ("reserve", "produce", "reserve/commit, produced in place, vs produce then push"),
    ("reserve", "single", "reserve/commit, produced in place, vs push of a ready item"),
    ("reserve_batch", "produce_batch", "reserve_batch in place vs produce rows then push_batch"),
    ("reserve_batch", "batch", "reserve_batch in place vs push_batch of ready rows"),
    ("reserve_batch", "single", "reserve_batch in place vs push of a ready item"),
    ("single_array", "single", "pop_array (the item as a ready array) vs pop + np.asarray + release"),
)


def compute_self_ratios(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Fabric against fabric, same run and size: median over median, and the
    spread (min over max, max over min) of the rounds."""
    by = _lookup(results)
    out = []
    for size in dict.fromkeys(r.size for r in results):
        for case, over, what in SELF_RATIOS:
            a, b = by.get(("fabric", case, size)), by.get(("fabric", over, size))
            if a is None or b is None:
                continue
            out.append({
                "size": size,
                "case": case,
                "over": over,
                "ratio": a.items_per_s / b.items_per_s,
                "low": min(a.samples) / max(b.samples),
                "high": max(a.samples) / min(b.samples),
                "what": what,
            })
    return out


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


#: Short names for the rows of the ratio tables (what each fabric case is divided by).
AGAINST_LABELS = {"copyto": "np.copyto (ceiling)", "shm_pipe": "shm_pipe (ceiling)"}


def render(
    console: Console,
    results: Sequence[CaseResult],
    ratios: Sequence[Ratio],
    peers: Sequence[str],
    meta: dict[str, Any],
    baselines: dict[str, str],
    extra: dict[str, list[dict[str, Any]]],
    skipped: dict[str, str],
) -> None:
    """Print the run's tables, each readable at 80 columns: every case, fabric ÷ each other, extras."""
    from rich import box
    from rich.table import Table

    rounds = meta["rounds"]
    console.print(
        f"grafos-bench: driver {meta['driver']} ({meta['access']}), {meta['cpus']} CPUs, "
        f"{meta['start_method']}{', pinned' if meta['pinned'] else ''}"
    )
    console.print(f"{meta['duration']:g} s per case and round, median of {rounds} round{'s' if rounds != 1 else ''}")
    t = Table(
        title="Every case (items/s: median of the rounds; min-max: the rounds' spread)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("size", "transport", "mode", "items/s", "MB/s", "x copyto", "min-max"):
        t.add_column(col, justify="left" if col in ("size", "transport", "mode") else "right", overflow="fold")
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
                _spread(r),
            )
        else:
            t.add_row(fmt_size(r.size), name, r.mode, "[red]error[/red]", "-", "-", "-")
    if results:
        console.print(t)
    for r in results:
        if r.error:
            console.print(f"[red]{r.transport}/{r.mode}/{fmt_size(r.size)} failed:[/red] {r.error}")
    if results and baselines:
        console.print("Compared against, measured in this run:")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="bold")
        grid.add_column(overflow="fold")
        for name, what in baselines.items():
            grid.add_row(f"  {name}", what)
        console.print(grid)

    sizes = list(dict.fromkeys(x.size for x in ratios))
    for size in sizes:
        group = [x for x in ratios if x.size == size]
        rt = Table(
            title=f"{fmt_size(size)}: grafos-fabric items/s ÷ other's, same run (>1: fabric faster)",
            min_width=72,
            caption="* against the peers' single calls (reserve/commit produces one item at a time)"
            if any(x.mode == "reserve" for x in group)
            else None,
            title_justify="left",
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        rt.add_column("against", overflow="fold")
        for x in group:
            rt.add_column(x.mode + ("*" if PEER_MODE.get(x.mode, x.mode) != x.mode else ""), justify="right")
        rt.add_row("fabric items/s", *[fmt_rate(x.items_per_s) for x in group])
        rt.add_section()
        against: list[tuple[str, Any]] = [("copyto", lambda x: x.vs_copyto), ("shm_pipe", lambda x: x.vs_pipe)]
        against += [(p, lambda x, p=p: x.vs.get(p)) for p in peers]
        for name, get in against:
            vals = [get(x) for x in group]
            if all(v is None for v in vals):
                continue
            style = name not in AGAINST_LABELS
            rt.add_row(
                AGAINST_LABELS.get(name, name),
                *[_styled_ratio(v) if style else fmt_ratio(v) for v in vals],
            )
        if any(x.best_peer for x in group):
            rt.add_section()
            rt.add_row("best peer", *[_styled_ratio(x.vs_best_peer) for x in group])
            rt.add_row("  which", *[x.best_peer or "-" for x in group])
        console.print(rt)

    self_ratios = compute_self_ratios(results)
    if self_ratios:
        st = Table(
            title="grafos-fabric against itself, same run (median ÷ median; low-high: worst/best rounds)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        st.add_column("size", justify="right")
        st.add_column("case ÷ over", overflow="fold")
        st.add_column("ratio", justify="right")
        st.add_column("low-high", justify="right")
        for sr in self_ratios:
            st.add_row(
                fmt_size(sr["size"]), f"{sr['case']} ÷ {sr['over']}", _styled_ratio(sr["ratio"]),
                f"{fmt_ratio(sr['low'])}-{fmt_ratio(sr['high'])}",
            )
        console.print(st)

    for name, rows in extra.items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for row in rows for k in row))
        shown = EXTRA_COLUMNS.get(name)
        if shown is not None:
            keys = [k for k in (*shown, "error") if k in keys]
        head = EXTRA_HEAD.get(name, "case")
        # One column per result row, one line per field: readable at 80 columns.
        et = Table(
            title=f"{name} (same run; every field in the JSON)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        et.add_column(COLUMN_LABELS.get(head, head), overflow="fold")
        for rec in rows:
            et.add_column(str(rec.get(head, "-")).removeprefix(f"{name} "), justify="right", overflow="fold")
        for k in keys:
            if k == head:
                continue
            label = COLUMN_LABELS.get(k, k.replace("_per_s", "/s").replace("_", " "))
            et.add_row(label, *[_cell(k, row.get(k)) for row in rows])
        console.print(et)

    for what, why in skipped.items():
        console.print(f"[yellow]skipped[/yellow] {what}: {why}")


def _spread(r: CaseResult) -> str:
    """The rounds' range: ``min-max`` items/s (one round: ``-``)."""
    if r.rounds < 2:
        return "-"
    return f"{fmt_rate(r.min_per_s)}-{fmt_rate(r.max_per_s)}".replace(" ", "")


#: The field that names an extra case's row (its column header in the console table).
EXTRA_HEAD = {"checkpoint": "case", "relocation": "handoff"}


#: The columns the console shows for an extra case (all of them when not listed here).
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {
    # the rows' target/met fields stay in the JSON: goals are the README's business, not the console's
    "checkpoint": (
        "case",
        "size",
        "ops_per_s",
        "baseline_ops_per_s",
        "ratio",
        "ratio_min",
        "ratio_max",
        "ratio_vs_pwrite_fdatasync",
        "rounds",
    ),
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
    if key.startswith("ratio") and isinstance(v, (int, float)):
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
    meta: dict[str, Any],
    baselines: dict[str, str],
    extra: dict[str, list[dict[str, Any]]],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """The machine-readable report (schema version 2: medians of rounds, no targets)."""
    return {
        "tool": "grafos-bench",
        "schema": 2,
        "meta": meta,
        "baselines": baselines,
        "results": [r.to_dict() for r in results],
        "ratios": [x.to_dict() for x in ratios],
        "self_ratios": compute_self_ratios(results),
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


def plot(
    ratios: Sequence[Ratio],
    peers: Sequence[str],
    path: str,
    title: str,
    extra: dict[str, list[dict[str, Any]]] | None = None,
) -> None:
    """Write a PNG: fabric ÷ each peer and ceiling (log scale, values on the bars), and panels
    for the checkpoint (ratio to the best raw write) and relocation (rebind times) cases when run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = extra or {}
    ck = [r for r in extra.get("checkpoint", []) if isinstance(r.get("ratio"), (int, float))]
    rl = [r for r in extra.get("relocation", []) if isinstance(r.get("rebind_p50_ms"), (int, float))]
    panels = [p for p, rows in (("checkpoint", ck), ("relocation", rl)) if rows]
    top = 1 if ratios else 0
    if not top and not panels:
        raise ValueError("nothing to plot")
    width_in = max(8.0, 1.25 * len(ratios) + 2.5)
    fig = plt.figure(figsize=(width_in, 5.2 * top + 3.6 * bool(panels)))
    grid = fig.add_gridspec(top + bool(panels), max(1, len(panels)), height_ratios=[1.5] * top + [1] * bool(panels))
    if ratios:
        ax = fig.add_subplot(grid[0, :])
        _plot_ratios(ax, ratios, peers)
        ax.set_title(title)
    for i, name in enumerate(panels):
        pax = fig.add_subplot(grid[top, i])
        if name == "checkpoint":
            _plot_checkpoint(pax, ck)
        else:
            _plot_relocation(pax, rl)
        if not ratios:
            fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ratios(ax: Any, ratios: Sequence[Ratio], peers: Sequence[str]) -> None:
    against = [p for p in peers if any(p in x.vs for x in ratios)]
    against += ["copyto"] + (["shm_pipe"] if any(x.vs_pipe is not None for x in ratios) else [])
    ceiling = {"copyto": lambda x: x.vs_copyto, "shm_pipe": lambda x: x.vs_pipe}
    labels = [f"{fmt_size(x.size)}\n{x.mode}" for x in ratios]
    width = 0.84 / max(1, len(against))
    for i, name in enumerate(against):
        get = ceiling.get(name, lambda x, name=name: x.vs.get(name))
        vals = [get(x) for x in ratios]
        xs = [j + (i - (len(against) - 1) / 2) * width for j in range(len(ratios))]
        bars = ax.bar(
            xs,
            [v if v and v > 0 else float("nan") for v in vals],
            width,
            label=f"÷ {name}" + (" (ceiling)" if name in ceiling else ""),
            hatch="//" if name in ceiling else None,
            edgecolor="white" if name in ceiling else None,
        )
        ax.bar_label(
            bars,
            labels=[_bar_text(v) for v in vals],
            fontsize=6.5,
            rotation=90,
            padding=2,
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 4)  # room for the labels above the tallest bar
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("fabric items/s ÷ other's (same run)")
    ax.legend(fontsize="small", ncol=min(4, len(against)), loc="upper left")


def _bar_text(v: float | None) -> str:
    if not v or v <= 0:
        return ""
    return f"{v:.2g}" if v < 10 else f"{v:.0f}"


def _plot_checkpoint(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    names = ["\n".join(str(r.get("case", "?")).replace("checkpoint ", "").rsplit(" ", 1)) for r in rows]
    vals = [float(r["ratio"]) for r in rows]
    spread = None
    if all(isinstance(r.get("ratio_min"), (int, float)) and isinstance(r.get("ratio_max"), (int, float)) for r in rows):
        spread = [
            [max(0.0, v - float(r["ratio_min"])) for v, r in zip(vals, rows, strict=True)],
            [max(0.0, float(r["ratio_max"]) - v) for v, r in zip(vals, rows, strict=True)],
        ]
    ax.bar(range(len(rows)), vals, color="tab:purple", yerr=spread, capsize=3 if spread else 0)
    for k, v in enumerate(vals):  # above the bar, or above its spread when there is one
        y = v + (spread[1][k] if spread else 0.0)
        ax.annotate(f"{v:.2f}", (k, y), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, fontsize=7)
    top = max(float(r.get("ratio_max", r["ratio"])) for r in rows)
    ax.set_ylim(0, max(1.2, top * 1.25))
    ax.set_ylabel("checkpoints/s ÷ best raw write/s", fontsize=8)
    ax.set_title("checkpoint", fontsize=9)


def _plot_relocation(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    width = 0.38
    xs = list(range(len(rows)))
    for k, (key, label) in enumerate((("rebind_p50_ms", "rebind p50"), ("rebind_p99_ms", "rebind p99"))):
        vals = [float(r.get(key) or 0.0) for r in rows]
        bars = ax.bar([x + (k - 0.5) * width for x in xs], vals, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=7, padding=2)
    names = []
    for r in rows:
        ratio = r.get("ratio")
        tail = f"\nthroughput {float(ratio):.2f}x steady" if isinstance(ratio, (int, float)) else ""
        names.append(f"handoff on {r.get('handoff', '?')}{tail}")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=7)
    top = max(float(r.get("rebind_p99_ms") or 0.0) for r in rows)
    ax.set_ylim(0, max(top * 1.3, 0.01))
    ax.set_ylabel("ms", fontsize=8)
    ax.set_title("relocation: consumer rebind time", fontsize=9)
    ax.legend(fontsize="small")
