"""Observability: off by default, counters/latencies/events at the lifecycle call sites, exporters."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from grafos_fabric.drivers.block import open_block

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric import observe
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
