"""The three-stage pipeline over ``ucx://`` across network namespaces with its memory
node killed (``kill -9``) and restarted mid-stream (tools/ucx_pipeline.py).

Memory nodes (two ``serve --driver ucx``) in one namespace, source, transform
and sink in another, joined by a veth pair; where namespaces are impossible
(not root) the same run happens on 127.0.0.1 and the test says so. The test
asserts what must hold, never a time: the sink's file holds exactly the set
the source sent (each sequence once, in order, the right value), every kill
moved each edge it hit to the other node with a higher generation, and the
stages really replayed and deduplicated. ``-s`` prints the figures; the
latency target is measured by ``python -m grafos_fabric.tools.ucx_pipeline``.
"""

from __future__ import annotations

import pytest

from grafos_fabric.drivers import ucx

pytestmark = [
    pytest.mark.stress,
    pytest.mark.skipif(ucx.available() is not None, reason=f"UCX unavailable: {ucx.available()}"),
]


@pytest.mark.parametrize("write_behind", [False, True], ids=["sync", "write-behind"])
def test_three_stages_lose_nothing_when_the_memory_node_is_killed_and_restarted_mid_stream(
    write_behind: bool,
) -> None:
    """kill -9 of the node holding the edges, three times; with ``write_behind`` the source's
    and the transform's publications may be in flight when it dies (their items replayed)."""
    from grafos_fabric.tools.ucx_pipeline import _print, run_demo

    res = run_demo(kills=3, interval=0.7, rate=20000.0, limit=240.0, write_behind=write_behind)
    _print(res)
    assert res.write_behind is write_behind
    assert res.sent > 0
    assert res.missing == 0 and res.extra == 0, res.summary()
    assert res.duplicates == 0 and res.in_order, res.summary()  # the idempotent sink wrote each sequence once
    assert res.wrong == 0 and res.distinct == res.sent
    assert res.ok
    assert len(res.kills) == 3
    for kill in res.kills:
        hit = [e for e, c in kill["before"].items() if c is not None and c[1] == kill["port"]]
        assert "edge1" in hit  # the victim is the node that held edge 1
        for edge in hit:
            gen_before, _ = kill["before"][edge]
            gen_after, port_after = kill["after"][edge]
            assert gen_after > gen_before, kill  # relocated: the generation went up ...
            assert port_after != kill["port"] and port_after in res.node_ports, kill  # ... onto the other node
    assert res.counters["edge1 relocations"] >= 1 + 3  # the first queue, then one per kill at least
    for edge in ("edge1", "edge2"):  # the consumers popped from each new generation after a kill
        assert len(res.relocation_ms[edge]) >= 1
    # the breakdown: the producer's steps of each relocation, in the order they happen, after the kill
    steps = res.breakdown["edge1"]
    tx = [steps[k] for k in ("producer notices", "new lease granted", "handoff published", "producer bound")]
    assert len(tx[0]) >= 1 and all(len(x) == len(tx[0]) for x in tx), steps
    for kill in zip(*tx, strict=True):
        assert 0 <= kill[0] <= kill[1] <= kill[2] <= kill[3], steps
    assert steps["first item"] and min(steps["first item"]) >= 0
    assert steps["first new item pushed"] and min(steps["first new item pushed"]) >= 0
    assert len(steps["node process gone"]) == len(tx[0]) and min(steps["node process gone"]) >= 0
    assert res.source_batch == 100 and res.source_period_ms == 5.0  # 20,000 items/s: 100 per 5 ms push
    if "namespaces" not in res.where:
        print(f"\nnote: ran on {res.where}")


def test_the_breakdown_takes_the_first_new_push_of_the_generation_after_each_kill() -> None:
    """``_breakdown``'s "first new item pushed": the producer's first push into the kill's new
    generation (or a later one) after the kill; pushes before the kill, or into the old
    generation, do not count; a kill that did not hit the edge gives no row."""
    from grafos_fabric.tools.ucx_pipeline import _breakdown

    kills = [{"t": 10.0, "t_dead": 10.004, "port": 1, "before": {"e": (3, 1)}},
             {"t": 20.0, "port": 2, "before": {"e": (4, 1)}}]
    tx = [{"generation": 4, "t_lost": 10.01, "t_alloc": 10.02, "t_published": 10.03, "t_bound": 10.04}]
    rx = [{"generation": 4, "t_lost": 10.015, "t_seen": 10.035, "t_bound": 10.05}]
    firsts = [(3, 9.0), (4, 10.07)]
    pushed = [(3, 9.5), (4, 9.99), (5, 10.2)]  # gen 4's first push began before the kill: not it
    out = _breakdown(kills, "e", tx, rx, firsts, pushed)
    assert out["node process gone"] == [4.0]  # the kill's own record: when the supervisor reaped the node
    assert out["producer notices"] == [10.0]
    assert out["consumer attached"] == [50.0]
    assert out["first new item pushed"] == [200.0]
    assert out["first item"] == [70.0]
    assert _breakdown(kills, "e", tx, rx, firsts)["first new item pushed"] == []  # no pushes recorded


def test_the_source_pushes_rate_times_period_items_at_least_one() -> None:
    """The demo source's cadence: ``rate * period`` items per push (at least one), so at
    10,000 items/s the default 5 ms period is 50-item pushes and 25.6 ms the old 256-item bursts."""
    from grafos_fabric.tools.ucx_pipeline import SOURCE_PERIOD_MS, main, source_batch

    assert SOURCE_PERIOD_MS == 5.0
    assert source_batch(10000, SOURCE_PERIOD_MS) == 50
    assert source_batch(10000, 1.0) == 10
    assert source_batch(10000, 25.6) == 256
    assert source_batch(20000, 2.0) == 40
    assert source_batch(100, 1.0) == 1  # a slow source still pushes one item per period
    assert source_batch(0.1, 1.0) == 1
    for bad in ("fast", "0", "-1"):
        with pytest.raises(SystemExit):
            main(["--source-period", bad])  # argparse refuses it: a positive number of ms


def test_failover_alloc_tries_a_node_found_down_last() -> None:
    """FailoverFabric.alloc: the preferred node first, unless its last warm-up or alloc failed;
    a down node is still tried when no other answers, and one that answers again is preferred."""
    from typing import Any

    from grafos_fabric.errors import Disconnected
    from grafos_fabric.tools.ucx_pipeline import FailoverFabric

    tried: list[int] = []
    up = {1: True, 2: True}

    class Fake:
        def __init__(self, port: int) -> None:
            self.port = port

        def warm(self, host: str, port: int) -> None:
            if not up[self.port]:
                raise Disconnected(f"node {self.port} down")

        def alloc(self, nbytes: int, ttl: float) -> Any:
            tried.append(self.port)
            if not up[self.port]:
                raise Disconnected(f"node {self.port} down")
            return object()

    class F(FailoverFabric):
        def _fabric(self, node: tuple[str, int]) -> Any:
            return self._fabrics.setdefault(node, Fake(node[1]))

    ff = F([("h", 1), ("h", 2)], token_file="unused")
    ff.alloc(1, 1.0)
    assert tried == [1] and ff.allocs == [1]
    up[1] = False
    ff._next_warm = 0.0
    ff.keep_warm()  # node 1 found down by the warm-up: the next alloc goes to node 2 at once
    tried.clear()
    ff.alloc(1, 1.0)
    assert tried == [2] and ff.allocs == [1, 2]
    up[2] = False  # both down: both are tried, then Disconnected
    tried.clear()
    with pytest.raises(Disconnected):
        ff.alloc(1, 1.0)
    assert sorted(tried) == [1, 2]
    up[1] = True
    ff._next_warm = 0.0
    ff.keep_warm()  # node 1 is back, node 2 is down: node 1 first although node 2 served last
    tried.clear()
    ff.alloc(1, 1.0)
    assert tried == [1] and ff.allocs == [1, 2, 1]
