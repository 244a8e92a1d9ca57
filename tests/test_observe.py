"""Observability: off by default, counters/latencies/events at the lifecycle call sites, exporters."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric import observe
from grafos_fabric.drivers.block import open_block
from grafos_fabric.pipeline import RelocatableQueueEdge


@pytest.fixture
def obs() -> Iterator[observe.Observer]:
    observe.disable()
    o = observe.enable()
    yield o
    observe.disable()


def test_nothing_is_recorded_until_enabled(fabric):
    observe.disable()
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    q.lease.revoke()
    assert observe.current() is None
    assert observe.prometheus_text() == ""


def test_lease_lifecycle_is_counted_and_recorded_as_events(fabric, obs):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    q.push(b"before")
    q.lease.renew()
    q.lease.revoke()
    with pytest.raises(E.Revoked):
        q.push(b"after revoke")  # refused by the native push: counted as a queue error
    q.free()
    assert obs.counter("lease_allocs", driver="shm") == 1
    assert obs.counter("lease_renewals") == 1
    assert obs.counter("lease_revokes") == 1
    assert obs.counter("lease_frees") == 1
    assert sum(v for (name, _), v in obs.counters.items() if name == "queue_errors") == 1
    kinds = [e.kind for e in obs.events()]
    assert kinds == ["lease.alloc", "lease.revoked", "lease.freed"]
    assert obs.events("lease.alloc")[0].fields["lease"] == q.lease.id


def test_checkpoint_flushes_and_failures_are_counted(tmp_path: Path, obs):
    blk = open_block(str(tmp_path / "ck.blk"), create_size=64 * 1024)
    state = gf.CheckpointedStageState({"n": 1}, blk, stage=gf.StageId("s"))
    state.checkpoint()
    state.checkpoint()
    too_big = gf.CheckpointedStageState(b"x" * 100_000, blk, stage=gf.StageId("s"), codec="raw")
    with pytest.raises(E.CapacityExceeded):
        too_big.checkpoint()
    assert obs.counter("checkpoint_flushes", stage="s") == 2
    assert obs.counter("checkpoint_failures", stage="s") == 1
    assert obs.histograms[("checkpoint_flush", (("stage", "s"),))].n == 2


def test_edge_relocations_and_rebinds_are_recorded(fabric, tmp_path: Path, obs):
    path = str(tmp_path / "edge.blk")
    open_block(path, create_size=1 << 20).close()
    tx = RelocatableQueueEdge.producer(fabric, open_block(path), capacity=1 << 14, ttl=30, stage=gf.StageId("src"))
    rx = RelocatableQueueEdge.consumer(fabric, open_block(path), stage=gf.StageId("sink"))
    tx.push(b"one")
    assert rx.pop(timeout=1).seq == 0
    tx.lease.revoke()
    tx.push(b"two")  # relocates
    assert rx.pop(timeout=2).seq == 1
    assert obs.counter("edge_relocations", stage="src", reason="Revoked") == 1
    first, moved = obs.events("edge.relocated")  # the first queue is recorded too ("start")
    assert first.fields["reason"] == "start"
    assert moved.fields["reason"] == "Revoked" and moved.fields["generation"] == int(tx.generation)
    assert obs.events("edge.rebound")[-1].fields["generation"] == int(tx.generation)
    assert obs.counter("edge_rebinds", stage="sink") >= 1


def test_the_event_ring_is_lossy_and_counts_what_it_dropped():
    o = observe.Observer(max_events=3)
    for i in range(5):
        o.emit("tick", i=i)
    assert [e.fields["i"] for e in o.events()] == [2, 3, 4]
    assert o.dropped_events == 2
    assert o.snapshot()["dropped_events"] == 2


def test_histogram_buckets_and_quantiles():
    h = observe.Histogram()
    for s in (0.5e-6, 3e-6, 3e-6, 1e-3, float("nan"), -1.0):
        h.observe(s)
    assert h.n == 4  # NaN and negative latencies are ignored
    assert h.quantile(0.5) == pytest.approx(4e-6)
    assert h.quantile(1.0) == pytest.approx(1.024e-3)


def test_prometheus_text_has_counters_and_cumulative_histograms(obs):
    obs.count("lease_allocs", driver="shm")
    obs.count("lease_allocs", 2, driver="shm")
    for s in (1e-5, 2e-4, 3e-3):
        obs.latency("edge_rebind", s, stage="sink")
    text = observe.prometheus_text(obs)
    assert "# TYPE grafos_lease_allocs_total counter" in text
    assert 'grafos_lease_allocs_total{driver="shm"} 3' in text
    buckets = [line for line in text.splitlines() if line.startswith("grafos_edge_rebind_seconds_bucket")]
    counts = [int(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts) and counts[-1] == 3
    assert buckets[-1] == 'grafos_edge_rebind_seconds_bucket{stage="sink",le="+Inf"} 3'
    assert 'grafos_edge_rebind_seconds_count{stage="sink"} 3' in text


def test_json_event_sink_writes_one_line_per_event_and_never_raises(obs):
    buf = io.BytesIO()
    obs.add_sink(observe.JsonEventSink(buf))
    obs.emit("edge.relocated", generation=gf.FenceEpoch(3), reason="Revoked", ms=0.5)
    obs.emit("weird", value=object())  # not JSON: written as its text, not an error
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["kind"] == "edge.relocated" and lines[0]["reason"] == "Revoked"
    assert lines[1]["kind"] == "weird" and lines[1]["value"].startswith("<object")
    assert all(math.isfinite(x["ts"]) for x in lines)


def test_prometheus_text_has_help_and_type_before_every_family(obs):
    obs.count("lease_allocs", driver="shm")
    obs.count("something_new")
    obs.latency("checkpoint_flush", 1e-3, stage="s")
    lines = observe.prometheus_text(obs).splitlines()
    families = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert families == [
        "grafos_lease_allocs_total",
        "grafos_something_new_total",
        "grafos_checkpoint_flush_seconds",
        "grafos_events_dropped_total",
    ]
    for fam in families:
        i = lines.index(next(x for x in lines if x.startswith(f"# TYPE {fam} ")))
        assert lines[i - 1].startswith(f"# HELP {fam} ") and len(lines[i - 1]) > len(f"# HELP {fam} ") + 5
        assert lines[i + 1].startswith(fam)  # samples follow their family's header
    assert "# HELP grafos_lease_allocs_total Leases allocated" in "\n".join(lines)


def test_queue_errors_are_labelled_with_status_names_not_numbers(fabric, obs):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    q.push(b"before")  # claims the producer role; the next push is refused by the native call
    q.lease.revoke()
    with pytest.raises(E.Revoked):
        q.push(b"after revoke")
    text = observe.prometheus_text(obs)
    errors = [line for line in text.splitlines() if line.startswith("grafos_queue_errors_total{")]
    assert len(errors) == 1 and 'status="revoked"' in errors[0], errors
    assert observe.status_name(-6) == "revoked" and observe.status_name(12345) == "unknown(12345)"
    assert observe.status_name("sealed") == "sealed"


def test_label_values_are_escaped_in_the_text_format(obs):
    obs.count("odd", stage='a "quoted"\nname\\x')
    text = observe.prometheus_text(obs)
    assert 'grafos_odd_total{stage="a \\"quoted\\"\\nname\\\\x"} 1' in text


def test_prometheus_client_collector_exports_the_same_families(obs):
    prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    from prometheus_client.parser import text_string_to_metric_families

    registry = prometheus_client.CollectorRegistry()
    observe.register_prometheus(obs, registry=registry)
    obs.count("lease_allocs", 2, driver="shm")
    obs.count("queue_errors", status=-6, op="push")
    for s in (1e-5, 2e-4):
        obs.latency("edge_rebind", s, stage="sink")
    text = prometheus_client.generate_latest(registry).decode()
    assert "# HELP grafos_lease_allocs_total Leases allocated" in text
    assert 'grafos_lease_allocs_total{driver="shm"} 2.0' in text
    assert 'grafos_queue_errors_total{op="push",status="revoked"} 1.0' in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    hist = fams["grafos_edge_rebind_seconds"]
    assert hist.type == "histogram"
    count = next(s for s in hist.samples if s.name.endswith("_count"))
    assert count.value == 2 and count.labels == {"stage": "sink"}
    # our own text exporter parses with the reference parser to the same families and values
    ours = {f.name: f for f in text_string_to_metric_families(observe.prometheus_text(obs))}
    assert set(ours) == set(fams)
    assert sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in ours["grafos_lease_allocs"].samples) == [
        ("grafos_lease_allocs_total", (("driver", "shm"),), 2.0)
    ]


def test_register_prometheus_names_the_package_when_missing(monkeypatch, obs):
    import builtins

    real_import = builtins.__import__

    def no_prometheus(name, *args, **kwargs):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            raise ImportError("No module named 'prometheus_client'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(ImportError, match="pip install prometheus-client"):
        observe.register_prometheus(obs)


def test_percentile_is_nearest_rank_and_says_what_empty_gives():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [observe.percentile(samples, q) for q in (0.0, 0.5, 0.99, 1.0)] == [1.0, 3.0, 5.0, 5.0]
    assert observe.percentile([], 0.5) == 0.0
    assert math.isnan(observe.percentile([], 0.5, empty=float("nan")))
