"""``grafos-bench``: grafos-fabric's FabricQueue against the peers a user would pick instead.

Two processes (producer and consumer, SPSC) move items of 64 B, 4 KiB and
1 MiB; the consumer reads every byte of every payload. Cases for the
FabricQueue: single calls (push/pop), batched calls (push_batch/pop_batch)
and reserve/commit (zero-copy production). In the same run, and with the same
payloads, consumer work and buffering, it measures:

* ``np.copyto`` of one item, in one process: the memcpy ceiling;
* ``shm_pipe``: a bare two-process pipeline (numpy slots in shared memory,
  no framing, spinning counters), the cost of moving bytes between cores;
* ``multiprocessing.Queue`` (put/get; batched: a list per put);
* ``faster-fifo`` (put/get; put_many/get_many), when installed;
* ``pyzmq`` PUSH/PULL over ``ipc://`` (send/recv; send_multipart), when installed,
  and ``zmq_packed``: a batch of fixed-size items packed into one frame;
* ``checkpoint``: checkpoints/s against the best raw durable write, when
  ``grafos_fabric.tools.bench_checkpoint`` is present;
* ``relocation``: when ``grafos_fabric.tools.bench_relocation`` is present.

It prints items/s, MB/s (10**6 bytes) and the ratio of each fabric case to
each peer, to the best peer and to ``np.copyto``, in rich tables, with a
progress display while it runs. ``--json PATH|-`` writes the same figures as
JSON, ``--plot PATH.png`` a bar chart of the ratios. Only ratios within one run
mean anything on a small, noisy machine.

How the comparison is kept fair (see :data:`METHOD`, also in the JSON):

* every transport gets the same payload bytes, the same buffering (the ring's
  capacity in bytes; the peers' queue size / high-water mark sized to match)
  and the same consumer work: ``zlib.adler32`` over each payload up to 512 B,
  a numpy uint64 reduction above; a batch is touched with one reduction
  (fabric: over ``Batch.array()``; peers: over ``b"".join(items)``);
* each peer runs in its fastest ordinary configuration: faster-fifo without
  pickling, pyzmq zero-copy from 64 KiB, distinct objects in batched lists
  (pickle would otherwise send one payload and back-references);
* the consumer times the stream (first item after a short warm-up to the
  last item); start-up and teardown are never counted;
* every case runs once per round (``--rounds``, default 5), round-robin over
  all cases, so slow drifts of a noisy machine hit every transport alike; each
  case reports the **median** of its rounds, with the rounds' min and max.

Progress: on a terminal a bar with the time left; otherwise (logs, CI) one
flushed line per finished case. The tables fit 80 columns.

Needs the ``[bench]`` extra (rich; matplotlib for ``--plot``): it says so and
exits with status 3 when something is missing, before running anything.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from grafos_fabric.tools import bench_report
from grafos_fabric.tools._units import parse_size
from grafos_fabric.tools.bench_report import fmt_rate
from grafos_fabric.tools.bench_runner import COPYTO_DESCRIPTION, CaseResult, get_context, run_copyto, run_pair
from grafos_fabric.tools.bench_transports import (
    CEILINGS,
    PEERS,
    TRANSPORTS,
    CaseSpec,
    FabricTransport,
    Transport,
    fmt_size,
)

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("grafos_fabric.tools.bench")

DEFAULT_SIZES = (64, 4096, 1 << 20)
QUEUE_CASES = ("single", "single_array", "batch", "reserve", "produce", "reserve_batch", "produce_batch")
EXTRA_CASES = ("checkpoint", "relocation", "ucx")
ALL_CASES = QUEUE_CASES + EXTRA_CASES
BASELINES = (*PEERS, *CEILINGS)
DRIVERS = ("shm", "ucx")  # ucx: the ucx case alone (its own memory nodes, shm and ucx_perftest beside it)
DEFAULT_ROUNDS = 5
DEFAULT_DURATION = 0.2  # x 5 rounds x 36 cases: about a minute and a half on 2 cores
EXIT_MISSING_EXTRA = 3
METHOD = (
    "SPSC, producer and consumer in two processes; the consumer reads every payload byte "
    "(zlib.adler32 up to 512 B, numpy uint64 sum above; one reduction per batch: Batch.array() for fabric, "
    "b''.join(items) for peers); same buffering in bytes for every transport; consumer-side timing from the "
    "first item after warm-up to the last; median of --rounds round-robin rounds (min and max kept)"
)

def _csv(choices: Sequence[str], allow_none: bool = False) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip().replace("-", "_") for x in text.split(",") if x.strip()]
        if allow_none and items == ["none"]:
            return []
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items

    return parse


def _sizes(text: str) -> list[int]:
    return [parse_size(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grafos-bench",
        description="Measure grafos-fabric's FabricQueue against np.copyto and the peers a user would pick "
        "instead, all in one run, and print the ratios.",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"seconds per case and round (default {DEFAULT_DURATION:g})",
    )
    p.add_argument(
        "--sizes", type=_sizes, default=list(DEFAULT_SIZES), metavar="LIST", help="item sizes (default 64,4K,1M)"
    )
    p.add_argument(
        "--cases",
        type=_csv(ALL_CASES),
        default=list(ALL_CASES),
        metavar="LIST",
        help=f"fabric cases to run: {', '.join(ALL_CASES)} (default: all that are available)",
    )
    p.add_argument(
        "--peers",
        type=_csv(BASELINES, allow_none=True),
        default=list(BASELINES),
        metavar="LIST",
        help=f"what to compare against: {', '.join(BASELINES)}, or none (default: all that are installed)",
    )
    p.add_argument(
        "--rounds",
        "--repeat",
        dest="rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        metavar="N",
        help=f"rounds over all cases; each case reports the median of its rounds, with min and max "
        f"(default {DEFAULT_ROUNDS}; --repeat is the old name)",
    )
    p.add_argument("--driver", choices=DRIVERS, default="shm", help="fabric driver (default shm)")
    p.add_argument(
        "--access",
        choices=("mapped", "one-sided"),
        default="mapped",
        help="how the workers reach the ring: mapped (default), or the one-sided protocol RDMA clients use",
    )
    p.add_argument("--json", metavar="PATH|-", help="write the results as JSON to PATH, or stdout with -")
    p.add_argument(
        "--plot",
        metavar="PATH.png",
        help="write a bar chart of the ratios, with checkpoint and relocation panels (needs matplotlib)",
    )
    p.add_argument("--batch", type=int, metavar="N", help="items per batch call (default: by size, 4..1024)")
    p.add_argument("--capacity", type=parse_size, metavar="BYTES", help="ring bytes per queue (default: by size)")
    p.add_argument(
        "--start-method",
        choices=("forkserver", "spawn", "fork"),
        help="how worker processes start (default forkserver: fork-fast, thread-safe)",
    )
    p.add_argument("--pin", action="store_true", help="pin producer and consumer to one CPU each")
    p.add_argument(
        "--checkpoint-path",
        metavar="PATH",
        help="file or directory for the checkpoint case (default: a fresh directory under ~/.cache, removed after)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (worker tracebacks)")
    return p


def auto_batch(size: int) -> int:
    """Items per batch call: about 256 KiB per batch, 4 to 1024 items."""
    return max(4, min(1024, (256 << 10) // size))


def auto_chunk(size: int) -> int:
    """Single calls between clock reads: about 1 MiB of payload, 1 to 256 items."""
    return max(1, min(256, (1 << 20) // size))


def auto_capacity(size: int, batch: int) -> int:
    """Ring bytes: room for about eight batches (framing included), 1 MiB to 16 MiB, a power of two."""
    need = 8 * batch * (size + 64)
    cap = 1 << max(20, (need - 1).bit_length())
    return max(min(cap, 1 << 24), 1 << (4 * (size + 64) - 1).bit_length())


def make_spec(args: argparse.Namespace, transport: str, mode: str, size: int) -> CaseSpec:
    batch = args.batch or auto_batch(size)
    return CaseSpec(
        transport=transport,
        mode=mode,
        size=size,
        duration=args.duration,
        batch=batch,
        chunk=auto_chunk(size),
        capacity=args.capacity or auto_capacity(size, batch),
        warmup=min(0.25, 0.1 * args.duration),
    )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "grafos_fabric", "faster_fifo", "zmq", "rich"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        v = getattr(m, "__version__", None)
        if v is None:
            try:
                from importlib.metadata import version

                v = version({"zmq": "pyzmq", "faster_fifo": "faster-fifo", "grafos_fabric": "grafos-fabric"}[mod])
            except Exception:
                v = "?"
        out[mod] = str(v)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _call_hook(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it accepts (the hooks' signatures may grow)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _load_hook(module: str, func: str) -> tuple[Callable[..., Any] | None, str]:
    try:
        mod = importlib.import_module(f"grafos_fabric.tools.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(module):
            return None, f"grafos_fabric.tools.{module} is not in this build"
        return None, f"{module} does not import: {exc}"
    except Exception as exc:
        return None, f"{module} does not import: {type(exc).__name__}: {exc}"
    fn = getattr(mod, func, None)
    if fn is None:
        return None, f"{module} has no {func}()"
    return fn, ""


def _rows(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    return [dict(r) for r in value]


class Bench:
    """One run of the benchmark: plan the cases, run them with a progress display, report."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.ctx = get_context(args.start_method)
        self.skipped: dict[str, str] = {}
        self.results: list[CaseResult] = []
        self.extra: dict[str, list[dict[str, Any]]] = {}
        self.peers = [p for p in args.peers if p in PEERS and self._usable(p)]
        self.copyto = "copyto" in args.peers
        self.pipe = "shm_pipe" in args.peers and self._usable("shm_pipe")
        self.fabric_modes = [m for m in QUEUE_CASES if m in args.cases]
        if self.fabric_modes and not self._usable("fabric"):
            self.fabric_modes = []

    def _usable(self, name: str) -> bool:
        why = TRANSPORTS[name].available()
        if why:
            self.skipped[name] = why
        return why is None

    def plan(self) -> list[CaseSpec | str]:
        """The queue cases in order (per size: ceilings, fabric, peers), then the extra case names."""
        plan: list[CaseSpec | str] = []
        for size in self.args.sizes:
            if self.copyto:
                plan.append(make_spec(self.args, "copyto", "copy", size))
            if self.pipe:
                plan.append(make_spec(self.args, "shm_pipe", "pipe", size))
            plan += [make_spec(self.args, "fabric", m, size) for m in self.fabric_modes]
            for peer in self.peers:
                plan += [make_spec(self.args, peer, m, size) for m in TRANSPORTS[peer].modes]
        plan += [c for c in EXTRA_CASES if c in self.args.cases]
        return plan

    def meta(self) -> dict[str, Any]:
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["grafos-bench", *sys.argv[1:]]),
            "driver": self.args.driver,
            "access": self.args.access,
            "duration": self.args.duration,
            "rounds": self.args.rounds,
            "sizes": list(self.args.sizes),
            "cases": list(self.args.cases),
            "peers": list(self.peers),
            "ceilings": self.ceilings(),
            "method": METHOD,
            "start_method": self.ctx.get_start_method(),
            "pinned": bool(self.args.pin),
            "cpus": len(affinity) or os.cpu_count(),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "versions": _versions(),
            "batch_items": {str(s): self.args.batch or auto_batch(s) for s in self.args.sizes},
            "capacity_bytes": {
                str(s): self.args.capacity or auto_capacity(s, self.args.batch or auto_batch(s))
                for s in self.args.sizes
            },
        }

    def baselines(self) -> dict[str, str]:
        names = (["fabric"] if self.fabric_modes else []) + self.peers
        out = {name: TRANSPORTS[name].description for name in names}
        if self.copyto:
            out["copyto"] = COPYTO_DESCRIPTION
        if self.pipe:
            out["shm_pipe"] = TRANSPORTS["shm_pipe"].description
        return out

    def ceilings(self) -> list[str]:
        return (["copyto"] if self.copyto else []) + (["shm_pipe"] if self.pipe else [])

    def run(self) -> int:
        args = self.args
        plan = self.plan()
        fabric = FabricTransport(f"shm://bench-{os.getpid()}", mapped=args.access == "mapped")
        transports: dict[str, Transport] = {"fabric": fabric}
        transports.update({p: TRANSPORTS[p]() for p in [*self.peers, "shm_pipe"]})
        queue_cases = [c for c in plan if isinstance(c, CaseSpec)]
        extras = [c for c in plan if isinstance(c, str)]
        results: dict[str, CaseResult] = {}
        progress = _progress(self.console, len(queue_cases) * args.rounds + len(extras))
        try:
            with progress:
                # Round-robin: every case once per round, so slow drifts of a noisy
                # machine hit every transport alike; each case reports its median round.
                for rnd in range(args.rounds):
                    for spec in queue_cases:
                        tag = f"round {rnd + 1}/{args.rounds}"
                        progress.start(f"{spec.name} ({tag})")
                        if spec.transport == "copyto":
                            res = run_copyto(spec)
                        else:
                            res = run_pair(self.ctx, transports[spec.transport], spec, pin=args.pin)
                        if res.error:
                            log.warning("%s failed: %s", spec.name, res.error)
                        if spec.name in results:
                            results[spec.name].merge(res)
                        else:
                            results[spec.name] = res
                        done = "failed" if res.error else f"{fmt_rate(res.rate())} items/s"
                        progress.done(f"{tag}  {fmt_size(spec.size):>6} {spec.transport} {spec.mode}: {done}")
                self.results = [results[spec.name] for spec in queue_cases]
                for case in extras:
                    progress.start(f"{case} case")
                    last: list[str] = []

                    def on_line(line: str, case: str = case, last: list[str] = last) -> None:
                        log.info("%s", line)
                        last.append(line)
                        progress.note(line)

                    self._run_extra(case, on_line)
                    progress.done(f"{case}: done" if not last else f"{case}: {len(last)} row(s)")
        finally:
            fabric.close()
        return self.report()

    def _run_extra(self, case: str, progress: Callable[[str], None]) -> None:
        """Run the checkpoint or relocation case through its module's hook, when the module exists."""
        args = self.args
        if case == "checkpoint":
            fn, why = _load_hook("bench_checkpoint", "run_checkpoint_bench")
            if fn is None:
                self.skipped[case] = why
                return
            tmp = None
            path = args.checkpoint_path
            if path is None:
                base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grafos-bench")
                os.makedirs(base, exist_ok=True)
                tmp = path = tempfile.mkdtemp(prefix="checkpoint-", dir=base)
            sizes = tuple(s for s in args.sizes if s >= 4096) or (4096, 1 << 20)
            try:
                rows = _call_hook(fn, path_or_dir=path, sizes=sizes, seconds=max(0.2, args.duration), progress=progress)
                self.extra[case] = _rows(rows)
            except Exception as exc:
                log.warning("checkpoint case failed: %s", exc)
                self.extra[case] = [{"case": case, "error": f"{type(exc).__name__}: {exc}"}]
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
        elif case == "ucx":
            fn, why = _load_hook("bench_ucx", "run_ucx_bench")
            if fn is None:
                self.skipped[case] = why
                return
            try:
                out = _call_hook(fn, sizes=tuple(args.sizes), seconds=max(0.2, args.duration), progress=progress,
                                 netns=args.driver == "ucx")
                self.extra.update({name: _rows(rows) for name, rows in out.items()})
            except Exception as exc:
                log.warning("ucx case failed: %s", exc)
                self.extra[case] = [{"case": case, "error": f"{type(exc).__name__}: {exc}"}]
        elif case == "relocation":
            fn, why = _load_hook("bench_relocation", "run_relocation_bench")
            if fn is None:
                self.skipped[case] = why
                return
            try:
                # No url: on shm the hook makes a namespace of its own and removes it after.
                rows = _call_hook(
                    fn,
                    seconds=max(0.2, args.duration),
                    duration=max(0.2, args.duration),
                    progress=progress,
                )
                self.extra[case] = _rows(rows)
            except Exception as exc:
                log.warning("relocation case failed: %s", exc)
                self.extra[case] = [{"case": case, "error": f"{type(exc).__name__}: {exc}"}]

    def report(self) -> int:
        args = self.args
        peers = self.peers
        ratios = bench_report.compute_ratios(self.results, peers)
        meta = self.meta()
        bench_report.render(self.console, self.results, ratios, peers, meta, self.baselines(), self.extra, self.skipped)
        if args.json:
            doc = bench_report.to_json(self.results, ratios, meta, self.baselines(), self.extra, self.skipped)
            bench_report.write_json(doc, args.json, sys.stdout)
        if args.plot:
            if ratios or self.extra:
                title = (
                    f"grafos-fabric ÷ peers and ceilings ({meta['cpus']} CPUs, {args.duration:g} s/case, "
                    f"median of {args.rounds})"
                )
                bench_report.plot(ratios, [*peers], args.plot, title, extra=self.extra)
                self.console.print(f"plot written to {args.plot}")
            else:
                self.console.print("[yellow]no results: no plot written[/yellow]")
        failed = [r for r in self.results if r.error] + [r for v in self.extra.values() for r in v if r.get("error")]
        return 1 if failed else 0


class _Progress:
    """Progress of the run: a rich bar with the time left on a terminal, else one flushed line per case."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.n = 0
        self.t0 = time.monotonic()
        self._bar: Any = None
        self._task: Any = None
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", style="bold"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=what[:48])

    def note(self, line: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=line[:48])
        else:
            self._line(f"        {line}")

    def done(self, line: str) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.advance(self._task)
            return
        elapsed = time.monotonic() - self.t0
        left = elapsed / self.n * (self.total - self.n)
        width = len(str(self.total))
        self._line(f"[{self.n:>{width}}/{self.total}] {elapsed:5.0f}s, ~{left:.0f}s left  {line}")

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()


def _progress(console: Console, total: int) -> _Progress:
    return _Progress(console, total)


def _missing_extra(plot: bool) -> str | None:
    """What the [bench] extra should have brought and did not (checked before the run)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return "grafos-bench needs rich: pip install 'grafos-fabric[bench]'"
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib: pip install 'grafos-fabric[bench]' (or run without --plot)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``grafos-bench``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.capacity and args.capacity & (args.capacity - 1):
        parser.error("--capacity must be a power of two")
    if args.driver == "ucx":
        # the ucx case brings its own memory nodes and its baselines (shm, ucx_perftest), in the same run;
        # with root it also runs across two network namespaces
        args.cases, args.peers = ["ucx"], []
    missing = _missing_extra(bool(args.plot))
    if missing:
        print(f"grafos-bench: {missing}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    from rich.console import Console
    from rich.logging import RichHandler

    # With --json -, stdout carries only the JSON; tables and progress go to stderr.
    console = Console(stderr=args.json == "-")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    sizes = ", ".join(fmt_size(s) for s in args.sizes)
    log.debug("sizes %s, cases %s, peers %s", sizes, args.cases, args.peers)
    try:
        return Bench(args, console).run()
    except KeyboardInterrupt:  # workers and queues are torn down by the finally blocks on the way out
        console.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
