"""Observability: counters, latency histograms and a lossy event ring, off by default.

grafOS observes fabrics in three layers (metrics, events, an audit chain);
this module gives the first two, keyed on lease and edge lifecycle events:

* **metrics** — monotonic counters and log2-bucket latency histograms, with
  labels (``lease_allocs{driver="shm"}``), cheap and aggregate-only;
* **events** — a bounded, *lossy* ring of :class:`FabricEvent` (the oldest is
  dropped when full, and the drop is counted): "what happened around the
  spike?".

Nothing is recorded until :func:`enable` is called, and nothing on the push/pop
hot path ever records: the call sites are lease allocation, renewal,
revocation and release; queue errors; edge relocations and rebinds;
checkpoint flushes. A disabled observer costs one global load per such call.

Exporters: :func:`prometheus_text` (the text exposition format, with ``# HELP``
and ``# TYPE`` lines), :func:`register_prometheus` (a collector for
``prometheus_client``'s registry, when that package is installed) and
:class:`JsonEventSink` (one JSON object per line, encoded with msgspec).
A ``status`` label given as a native status code is recorded by its name
(``status="revoked"``, not ``status="-6"``).

>>> obs = enable()
>>> ...                                  # run the pipeline
>>> print(prometheus_text(obs))          # or: obs.events(), obs.snapshot()
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec

__all__ = [
    "FabricEvent",
    "Histogram",
    "JsonEventSink",
    "Observer",
    "PrometheusCollector",
    "count",
    "current",
    "disable",
    "emit",
    "enable",
    "gauge",
    "latency",
    "percentile",
    "prometheus_text",
    "register_prometheus",
    "status_name",
]

LabelKey = tuple[tuple[str, str], ...]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FabricEvent:
    """One lifecycle event: when (``time.time()``), what kind, and its fields."""

    ts: float
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


class Histogram:
    """Latencies in log2 buckets from 1 µs to ~17 min (upper bounds, seconds)."""

    BOUNDS = tuple(2.0**k * 1e-6 for k in range(31))

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        if not seconds >= 0.0:  # NaN or negative: a broken clock, not a latency
            return
        i = 0 if seconds <= self.BOUNDS[0] else min(len(self.BOUNDS), math.ceil(math.log2(seconds / 1e-6)))
        self.counts[i] += 1
        self.total += seconds
        self.n += 1

    def quantile(self, q: float) -> float:
        """An upper bound of the ``q`` quantile (the bucket's bound); 0.0 when empty."""
        if self.n == 0:
            return 0.0
        rank = q * self.n
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return self.BOUNDS[i] if i < len(self.BOUNDS) else math.inf
        return math.inf


class Observer:
    """Holds the metrics and the event ring of one process (see :func:`enable`)."""

    def __init__(self, max_events: int = 4096) -> None:
        if not isinstance(max_events, int) or max_events <= 0:
            raise ValueError(f"max_events must be a positive int, got {max_events!r}")
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, LabelKey], int] = collections.defaultdict(int)
        self.histograms: dict[tuple[str, LabelKey], Histogram] = {}
        self.gauges: dict[tuple[str, LabelKey], float] = {}
        self._events: collections.deque[FabricEvent] = collections.deque(maxlen=max_events)
        self.dropped_events = 0
        self._sinks: list[JsonEventSink] = []

    def count(self, name: str, n: int = 1, **labels: Any) -> None:
        if "status" in labels:
            labels["status"] = status_name(labels["status"])
        key = (name, _labels(labels))
        with self._lock:
            self.counters[key] += n

    def gauge(self, name: str, value: float, **labels: Any) -> None:
        """Set a gauge (a value that goes up and down: live leases, open connections)."""
        key = (name, _labels(labels))
        with self._lock:
            self.gauges[key] = value

    def latency(self, name: str, seconds: float, **labels: Any) -> None:
        key = (name, _labels(labels))
        with self._lock:
            h = self.histograms.get(key)
            if h is None:
                h = self.histograms[key] = Histogram()
            h.observe(seconds)

    def emit(self, kind: str, **fields: Any) -> None:
        ev = FabricEvent(time.time(), kind, fields)
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.dropped_events += 1
            self._events.append(ev)
            sinks = list(self._sinks)
        for sink in sinks:
            sink.write(ev)

    def events(self, kind: str | None = None) -> list[FabricEvent]:
        """The events still in the ring (oldest first), optionally of one kind."""
        with self._lock:
            evs = list(self._events)
        return evs if kind is None else [e for e in evs if e.kind == kind]

    def counter(self, name: str, **labels: Any) -> int:
        with self._lock:
            return self.counters.get((name, _labels(labels)), 0)

    def add_sink(self, sink: JsonEventSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def snapshot(self) -> dict[str, Any]:
        """Everything as plain data (for JSON or a test)."""
        with self._lock:
            return {
                "counters": {_name(n, lk): v for (n, lk), v in self.counters.items()},
                "gauges": {_name(n, lk): v for (n, lk), v in self.gauges.items()},
                "latency": {
                    _name(n, lk): {"n": h.n, "sum_s": h.total, "p50_s": h.quantile(0.5), "p99_s": h.quantile(0.99)}
                    for (n, lk), h in self.histograms.items()
                },
                "events": len(self._events),
                "dropped_events": self.dropped_events,
            }


_STATUS_NAMES: dict[int, str] = {}


def status_name(status: Any) -> str:
    """A native status code's name (``-6`` -> ``"revoked"``); other values as their text."""
    if isinstance(status, bool) or not isinstance(status, int):
        return str(status)
    if not _STATUS_NAMES:
        from ._ffi import lib  # late: observe is imported by the modules _ffi's users import

        for attr in dir(lib):
            if attr.startswith("GF_E_"):
                _STATUS_NAMES.setdefault(int(getattr(lib, attr)), attr[5:].lower().replace("_", "-"))
        _STATUS_NAMES.setdefault(0, "ok")
    return _STATUS_NAMES.get(status, f"unknown({status})")


def percentile(samples: Sequence[float], q: float, *, empty: float = 0.0) -> float:
    """The nearest-rank ``q`` quantile (0 <= q <= 1) of ``samples``; ``empty`` when there are none.

    Exact, for the short sample lists the pipeline's stats and the benchmarks keep
    (the histograms' :meth:`Histogram.quantile` is the bounded-memory, bucketed one).
    """
    if not samples:
        return empty
    s = sorted(samples)
    return float(s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))])


def _labels(labels: dict[str, Any]) -> LabelKey:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def _escape(value: str) -> str:
    """A label value as the exposition format wants it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _name(name: str, labels: LabelKey) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


_current: Observer | None = None


def enable(max_events: int = 4096) -> Observer:
    """Start recording in this process (idempotent: returns the running observer)."""
    global _current
    if _current is None:
        _current = Observer(max_events)
    return _current


def disable() -> None:
    """Stop recording; what was recorded is dropped with the observer."""
    global _current
    _current = None


def current() -> Observer | None:
    return _current


def count(name: str, n: int = 1, **labels: Any) -> None:
    """Add to a counter if observing (a no-op otherwise)."""
    obs = _current
    if obs is not None:
        obs.count(name, n, **labels)


def gauge(name: str, value: float, **labels: Any) -> None:
    """Set a gauge if observing."""
    obs = _current
    if obs is not None:
        obs.gauge(name, value, **labels)


def latency(name: str, seconds: float, **labels: Any) -> None:
    """Record a latency if observing."""
    obs = _current
    if obs is not None:
        obs.latency(name, seconds, **labels)


def emit(kind: str, **fields: Any) -> None:
    """Record an event if observing."""
    obs = _current
    if obs is not None:
        obs.emit(kind, **fields)


#: ``# HELP`` text of each metric this package records (a name not listed gets a generic line).
HELP: dict[str, str] = {
    "lease_allocs": "Leases allocated (regions created), by driver.",
    "lease_renewals": "Lease renewals.",
    "lease_renewal_failures": "Lease renewals that failed (the renewer retries with backoff).",
    "lease_revokes": "Leases revoked.",
    "lease_frees": "Leases freed by their holder.",
    "lease_reaped": "Regions reclaimed by a reaper (lease expired, revoked, freed or never built).",
    "queue_errors": "Queue calls that failed, by status name and operation.",
    "edge_relocations": "Pipeline edge relocations (a new queue with a higher epoch), by stage and reason.",
    "edge_rebinds": "Pipeline edge consumers that rebound to a relocated queue, by stage.",
    "checkpoint_flushes": "Checkpoints written durably, by stage.",
    "checkpoint_failures": "Checkpoints that failed to write, by stage.",
    "edge_relocate": "Time a producer spent relocating its edge.",
    "edge_rebind": "Time a consumer spent rebinding to a relocated edge.",
    "checkpoint_flush": "Time to write one checkpoint durably.",
    "events_dropped": "Lifecycle events dropped because the event ring was full.",
}


def _help(name: str, kind: str) -> str:
    return HELP.get(name, f"grafos-fabric {kind} {name}.")


_Counters = list[tuple[tuple[str, LabelKey], int]]
_Histograms = list[tuple[tuple[str, LabelKey], Histogram]]
_Gauges = list[tuple[tuple[str, LabelKey], float]]


def _collect(obs: Observer) -> tuple[_Counters, _Histograms, _Gauges, int]:
    """A consistent copy of the observer's metrics (histograms copied under the lock)."""
    with obs._lock:
        counters = sorted(obs.counters.items())
        gauges = sorted(obs.gauges.items())
        hists: _Histograms = []
        for key, h in sorted(obs.histograms.items(), key=lambda kv: kv[0]):
            c = Histogram()
            c.counts, c.total, c.n = list(h.counts), h.total, h.n
            hists.append((key, c))
        dropped = obs.dropped_events
    return counters, hists, gauges, dropped


def _help_line(metric: str, text: str) -> str:
    return f"# HELP {metric} " + text.replace("\\", "\\\\").replace("\n", "\\n")


def prometheus_text(obs: Observer | None = None, prefix: str = "grafos_") -> str:
    """The metrics in the Prometheus text exposition format (version 0.0.4).

    Every metric family starts with its ``# HELP`` and ``# TYPE`` lines;
    counters end in ``_total``, latencies are histograms in seconds with
    cumulative ``le`` buckets. Empty string when nothing is being observed.
    """
    obs = obs or _current
    if obs is None:
        return ""
    counters, hists, gauges, dropped = _collect(obs)
    lines: list[str] = []
    seen: set[str] = set()
    for (name, lk), value in counters:
        metric = f"{prefix}{name}_total"
        if metric not in seen:
            lines += [_help_line(metric, _help(name, "counter")), f"# TYPE {metric} counter"]
            seen.add(metric)
        lines.append(f"{_name(metric, lk)} {value}")
    for (name, lk), gvalue in gauges:
        metric = f"{prefix}{name}"
        if metric not in seen:
            lines += [_help_line(metric, _help(name, "gauge")), f"# TYPE {metric} gauge"]
            seen.add(metric)
        lines.append(f"{_name(metric, lk)} {gvalue:.9g}")
    for (name, lk), h in hists:
        metric = f"{prefix}{name}_seconds"
        if metric not in seen:
            lines += [_help_line(metric, _help(name, "latency")), f"# TYPE {metric} histogram"]
            seen.add(metric)
        cumulative = 0
        for bound, c in zip((*Histogram.BOUNDS, math.inf), h.counts, strict=True):
            cumulative += c
            le = "+Inf" if bound == math.inf else f"{bound:.9g}"
            lines.append(f"{_name(metric + '_bucket', (*lk, ('le', le)))} {cumulative}")
        lines.append(f"{_name(metric + '_sum', lk)} {h.total:.9g}")
        lines.append(f"{_name(metric + '_count', lk)} {h.n}")
    metric = f"{prefix}events_dropped_total"
    lines += [_help_line(metric, HELP["events_dropped"]), f"# TYPE {metric} counter", f"{metric} {dropped}"]
    return "\n".join(lines) + "\n"


class PrometheusCollector:
    """A ``prometheus_client`` collector over an :class:`Observer` (see :func:`register_prometheus`).

    It reads the observer at scrape time; ``observer=None`` follows whatever
    observer is current then (nothing is exported while observing is off).
    """

    def __init__(self, observer: Observer | None = None, prefix: str = "grafos_") -> None:
        self._observer = observer
        self.prefix = prefix

    def describe(self) -> list[Any]:
        return []  # families depend on what was recorded: the registry must not pre-check names

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        obs = self._observer or _current
        if obs is None:
            return
        counters, hists, gauges, dropped = _collect(obs)
        families: dict[str, Any] = {}
        for (name, lk), value in counters:
            fam = families.get(name)
            if fam is None:
                # prometheus_client appends "_total" to a counter family's samples itself
                fam = families[name] = CounterMetricFamily(
                    self.prefix + name, _help(name, "counter"), labels=[k for k, _ in lk]
                )
            fam.add_metric([v for _, v in lk], value)
        yield from families.values()
        gfams: dict[str, Any] = {}
        for (name, lk), gvalue in gauges:
            fam = gfams.get(name)
            if fam is None:
                labels = [k for k, _ in lk]
                fam = gfams[name] = GaugeMetricFamily(self.prefix + name, _help(name, "gauge"), labels=labels)
            fam.add_metric([v for _, v in lk], gvalue)
        yield from gfams.values()
        hfams: dict[str, Any] = {}
        for (name, lk), h in hists:
            fam = hfams.get(name)
            if fam is None:
                fam = hfams[name] = HistogramMetricFamily(
                    f"{self.prefix}{name}_seconds", _help(name, "latency"), labels=[k for k, _ in lk]
                )
            buckets = []
            cumulative = 0
            for bound, c in zip((*Histogram.BOUNDS, math.inf), h.counts, strict=True):
                cumulative += c
                buckets.append(("+Inf" if bound == math.inf else f"{bound:.9g}", cumulative))
            fam.add_metric([v for _, v in lk], buckets, h.total)
        yield from hfams.values()
        drop = CounterMetricFamily(self.prefix + "events_dropped", HELP["events_dropped"])
        drop.add_metric([], dropped)
        yield drop


def register_prometheus(observer: Observer | None = None, registry: Any = None, prefix: str = "grafos_") -> Any:
    """Export the metrics through ``prometheus_client`` (``pip install prometheus-client``).

    Registers a :class:`PrometheusCollector` with ``registry`` (default:
    ``prometheus_client.REGISTRY``) and returns it, so a program that already
    serves ``/metrics`` with ``prometheus_client`` gets grafos-fabric's metrics
    too. Raises :class:`ImportError`, naming the package, when it is not installed.
    """
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "register_prometheus needs the prometheus_client package: pip install prometheus-client "
            "(or use observe.prometheus_text(), which needs nothing)"
        ) from exc
    collector = PrometheusCollector(observer, prefix)
    (registry if registry is not None else prometheus_client.REGISTRY).register(collector)
    return collector


class JsonEventSink:
    """Appends every event as one JSON line (msgspec) to a file or stream."""

    def __init__(self, target: str | os.PathLike[str] | IO[bytes]) -> None:
        if isinstance(target, (str, os.PathLike)):
            self._fh: IO[bytes] = open(target, "ab")
            self._own = True
        else:
            self._fh = target
            self._own = False
        self._lock = threading.Lock()
        self._enc = msgspec.json.Encoder(enc_hook=str)  # epochs, paths...: their text

    def write(self, ev: FabricEvent) -> None:
        """Write one event; a failing sink is logged, never raised into the caller."""
        try:
            line = self._enc.encode({"ts": ev.ts, "kind": ev.kind, **ev.fields}) + b"\n"
            with self._lock:
                self._fh.write(line)
                self._fh.flush()
        except Exception:
            log.warning("event sink failed; event %s not written", ev.kind, exc_info=True)

    def close(self) -> None:
        if self._own:
            self._fh.close()
