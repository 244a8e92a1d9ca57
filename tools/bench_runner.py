"""Run one ``grafos-bench`` case: a producer/consumer process pair, or the np.copyto ceiling."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from grafos_fabric.tools.bench_transports import (
    STALL_S,
    CaseSpec,
    Transport,
    make_payload,
    worker_main,
)

log = logging.getLogger(__name__)

COPYTO_DESCRIPTION = "np.copyto(dst, src) of one item, one process (the memcpy ceiling)"


@dataclass
class CaseResult:
    """What one case measured, over one or more rounds.

    ``items``/``seconds`` are the consumer's timed window of one round;
    ``samples`` holds every successful round's items/s. The figure reported is
    the **median** of the rounds (:attr:`items_per_s`), with :attr:`min_per_s`
    and :attr:`max_per_s` as the spread; :meth:`merge` folds in another round
    (keeping the first error: a case that failed once counts as failed).
    """

    transport: str
    mode: str
    size: int
    items: int = 0
    seconds: float = 0.0
    error: str | None = None
    description: str = ""
    samples: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.samples and self.error is None and self.rate() > 0:
            self.samples.append(self.rate())

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    @property
    def rounds(self) -> int:
        return len(self.samples)

    @property
    def items_per_s(self) -> float:
        """The median of the rounds' items/s (0.0 when the case failed)."""
        return float(statistics.median(self.samples)) if self.ok else 0.0

    @property
    def min_per_s(self) -> float:
        return min(self.samples) if self.ok else 0.0

    @property
    def max_per_s(self) -> float:
        return max(self.samples) if self.ok else 0.0

    @property
    def mb_per_s(self) -> float:
        """Payload megabytes (10**6 bytes) per second, at the median rate."""
        return self.items_per_s * self.size / 1e6

    def merge(self, other: CaseResult) -> None:
        """Fold another round of the same case into this one."""
        if other.rate() > 0 and other.error is None:
            self.items, self.seconds = other.items, other.seconds
        self.samples = self.samples + other.samples
        self.error = self.error or other.error

    def rate(self) -> float:
        """Items/s of the last kept window, whether or not some round failed."""
        return self.items / self.seconds if self.items > 0 and self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            ok=self.ok,
            rounds=self.rounds,
            items_per_s=self.items_per_s,
            min_items_per_s=self.min_per_s,
            max_items_per_s=self.max_per_s,
            mb_per_s=self.mb_per_s,
        )
        return d


def get_context(method: str | None = None) -> Any:
    """The multiprocessing context for the workers.

    Default: ``forkserver`` (as fast to start as fork once its server runs,
    and safe while the parent has threads, e.g. the progress display), with
    numpy, the peers and grafos_fabric preloaded; ``spawn`` elsewhere.
    """
    methods = mp.get_all_start_methods()
    if method is None:
        method = "forkserver" if "forkserver" in methods else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["grafos_fabric", "grafos_fabric.tools.bench_transports"])
    return ctx


def _worker_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def run_pair(ctx: Any, transport: Transport, spec: CaseSpec, *, pin: bool = False) -> CaseResult:
    """Run one case with a producer and a consumer process; return the consumer's timing.

    Failures (a worker's exception, a hang, a lost item) come back as
    ``CaseResult.error``; the run goes on with the next case.
    """
    res = CaseResult(spec.transport, spec.mode, spec.size, description=transport.description)
    try:
        handle = transport.setup(spec, ctx)
    except Exception as exc:
        res.error = f"setup failed: {type(exc).__name__}: {exc}"
        return res
    procs: list[Any] = []
    results: Any = ctx.Queue()
    try:
        cpu_p, cpu_c = _worker_cpus(pin)
        base = {"ready": ctx.Event(), "done": ctx.Event(), "total": ctx.RawValue("q", -1), "results": results}
        for role, cpus in (("consumer", cpu_c), ("producer", cpu_p)):
            ctl = dict(base, cpus=cpus)
            p = ctx.Process(
                target=worker_main, args=(role, spec.transport, handle, spec, ctl), name=f"bench-{role}", daemon=True
            )
            p.start()
            procs.append(p)
        got: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + spec.duration + 2 * STALL_S
        while len(got) < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no result from {sorted({'producer', 'consumer'} - set(got))}")
            try:
                r = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    codes = {p.name: p.exitcode for p in procs}
                    raise RuntimeError(f"worker died: {codes}") from None
                continue
            got[r["role"]] = r
            if "error" in r:
                log.debug("%s %s failed:\n%s", spec.name, r["role"], r.get("traceback", ""))
                raise RuntimeError(f"{r['role']}: {r['error']}")
        cons, prod = got["consumer"], got["producer"]
        if cons["total"] != prod["pushed"]:
            raise RuntimeError(f"consumer took {cons['total']} items, producer pushed {prod['pushed']}")
        res.items, res.seconds = int(cons["items"]), float(cons["seconds"])
        if res.rate() > 0:
            res.samples.append(res.rate())
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    except BaseException:  # KeyboardInterrupt: stop the workers now, not after their run
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                log.warning("%s: %s did not exit; terminating it", spec.name, p.name)
                p.terminate()
                p.join(timeout=5.0)
        results.close()
        try:
            transport.teardown(handle)
        except Exception as exc:
            log.warning("%s: teardown failed: %s", spec.name, exc)
    return res


def run_copyto(spec: CaseSpec) -> CaseResult:
    """``np.copyto`` of one item of ``spec.size`` bytes in a loop, for ``spec.duration`` seconds."""
    src = np.frombuffer(make_payload(spec.size), dtype=np.uint8)
    dst = np.empty_like(src)
    copyto = np.copyto
    chunk = range(spec.chunk)
    warm_end = time.perf_counter() + spec.warmup
    while time.perf_counter() < warm_end:
        for _ in chunk:
            copyto(dst, src)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + spec.duration
    t1 = t0
    while t1 < deadline:
        for _ in chunk:
            copyto(dst, src)
        n += spec.chunk
        t1 = time.perf_counter()
    return CaseResult("copyto", "copy", spec.size, items=n, seconds=t1 - t0, description=COPYTO_DESCRIPTION)
