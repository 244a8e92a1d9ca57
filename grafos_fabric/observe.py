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

Exporters: :func:`prometheus_text` (the text exposition format) and
:class:`JsonEventSink` (one JSON object per line, encoded with msgspec).

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
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec

__all__ = [
    "FabricEvent",
    "Histogram",
    "JsonEventSink",
    "Observer",
    "count",
    "current",
    "disable",
    "emit",
    "enable",
    "gauge",
    "latency",
    "prometheus_text",
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


def _labels(labels: dict[str, Any]) -> LabelKey:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def _name(name: str, labels: LabelKey) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


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


def prometheus_text(obs: Observer | None = None, prefix: str = "grafos_") -> str:
    """The metrics in the Prometheus text exposition format."""
    obs = obs or _current
    if obs is None:
        return ""
    lines: list[str] = []
    with obs._lock:
        counters = sorted(obs.counters.items())
        hists = sorted(obs.histograms.items(), key=lambda kv: kv[0])
        gauges = sorted(obs.gauges.items())
        dropped = obs.dropped_events
    seen: set[str] = set()
    for (name, lk), value in counters:
        metric = f"{prefix}{name}_total"
        if metric not in seen:
            lines.append(f"# TYPE {metric} counter")
            seen.add(metric)
        lines.append(f"{_name(metric, lk)} {value}")
    for (name, lk), gvalue in gauges:
        metric = f"{prefix}{name}"
        if metric not in seen:
            lines.append(f"# TYPE {metric} gauge")
            seen.add(metric)
        lines.append(f"{_name(metric, lk)} {gvalue:.9g}")
    for (name, lk), h in hists:
        metric = f"{prefix}{name}_seconds"
        if metric not in seen:
            lines.append(f"# TYPE {metric} histogram")
            seen.add(metric)
        cumulative = 0
        for bound, c in zip((*Histogram.BOUNDS, math.inf), h.counts, strict=True):
            cumulative += c
            le = "+Inf" if bound == math.inf else f"{bound:.9g}"
            lines.append(f"{_name(metric + '_bucket', (*lk, ('le', le)))} {cumulative}")
        lines.append(f"{_name(metric + '_sum', lk)} {h.total:.9g}")
        lines.append(f"{_name(metric + '_count', lk)} {h.n}")
    lines.append(f"# TYPE {prefix}events_dropped_total counter")
    lines.append(f"{prefix}events_dropped_total {dropped}")
    return "\n".join(lines) + "\n"


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
