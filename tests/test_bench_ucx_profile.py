"""bench_ucx: the per-item operation profile of the queue case (a fake region, no UCX), the ratios, and
the consumer-host round across two namespaces (UCX and root)."""

from __future__ import annotations

from typing import Any

import pytest

from grafos_fabric.tools.bench_ucx import _count_ops, _per_item, _ratios


class _Region:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _op(self, name: str, *args: Any) -> Any:
        self.calls.append((name, args))
        return 7

    def write(self, offset: int, buf: Any) -> None:
        self._op("write", offset, buf)

    def read_into(self, offset: int, buf: Any) -> None:
        self._op("read_into", offset, buf)

    def load64(self, offset: int) -> int:
        return int(self._op("load64", offset))

    def store64(self, offset: int, value: int) -> None:
        self._op("store64", offset, value)

    def cas64(self, offset: int, expected: int, desired: int) -> int:
        return int(self._op("cas64", offset, expected, desired))

    def faa64(self, offset: int, add: int) -> int:
        return int(self._op("faa64", offset, add))

    def flush(self) -> None:
        self._op("flush")


def test_count_ops_counts_calls_and_bytes_and_passes_results_through() -> None:
    r = _Region()
    counts: dict[str, list[float]] = {}
    _count_ops(r, counts)
    r.write(64, bytes(1000))
    r.write(64, bytearray(24))
    r.read_into(0, bytearray(500))
    assert r.load64(8) == 7 and r.cas64(8, 1, 2) == 7
    r.store64(16, 5)
    r.store64(16, 6)
    # the wrapped methods still reach the region with the same arguments
    assert [c[0] for c in r.calls] == ["write", "write", "read_into", "load64", "cas64", "store64", "store64"]
    assert r.calls[4][1] == (8, 1, 2)
    assert counts["write"][0] == 2 and counts["write"][2] == 1024
    assert counts["read_into"][2] == 500
    assert counts["store64"][0] == 2 and counts["store64"][2] == 0  # an int value is not a byte count
    per = _per_item(counts, 2)
    assert per["write"]["per_item"] == 1.0 and per["write"]["MB_per_item"] == pytest.approx(512e-6)
    assert per["store64"]["per_item"] == 1.0 and "MB_per_item" not in per["store64"]
    assert "flush" not in per and "faa64" not in per  # operations that never ran are left out
    assert per["load64"]["mean_us"] >= 0.0


def test_queue_row_reports_the_ratio_in_wire_bytes() -> None:
    row: dict[str, Any] = {"op": "queue 1 MiB items", "MB_per_s": 100.0, "perftest": 400.0}
    _ratios(row)
    assert row["ratio"] == pytest.approx(0.25)
    assert row["ratio_wire"] == pytest.approx(0.5)  # every item byte crosses the wire twice
    put: dict[str, Any] = {"op": "put 1 MiB", "MB_per_s": 100.0, "perftest": 400.0}
    _ratios(put)
    assert "ratio_wire" not in put


def test_the_consumer_host_row_counts_each_item_byte_once() -> None:
    row: dict[str, Any] = {"op": "queue 1 MiB items, node on the consumer's host", "MB_per_s": 300.0,
                           "perftest": 400.0}
    _ratios(row)
    assert row["ratio"] == pytest.approx(0.75)
    assert "ratio_wire" not in row  # the item crosses the veth once: the ratio is the wire ratio


@pytest.mark.parametrize("mode,batch,publish", [("map", 1, "fence"), ("sm", 1, "fence"), ("map", 4, "fence"),
                                                ("map", 1, "behind"), ("map", 1, "behind2"),
                                                ("map", 1, "separate")])
def test_the_consumer_host_round_moves_items_between_two_namespaces(tmp_path: Any, mode: str, batch: int,
                                                                    publish: str) -> None:
    """The row's round for real: node and consumer in namespace A, producer in B, 1 MiB items
    (``map``: the consumer maps the span; ``sm``: it reaches the node over UCX shared memory;
    ``batch``: items per push_batch call of the producer, ``--batch``; ``publish``: one call per
    publication, write-behind, or the separate operations, ``--publish``)."""
    from grafos_fabric.drivers import ucx
    from grafos_fabric.tools import netns
    from grafos_fabric.tools.bench_ucx import _netns_split_round

    if ucx.available() is not None:
        pytest.skip(f"UCX unavailable: {ucx.available()}")
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"no network namespaces: {why}")
    with netns.veth_pair() as pair:
        row = _netns_split_round(pair, str(tmp_path / "split"), 0.3, mode, batch=batch, publish=publish)
    assert row is not None, "the round failed (its stderr is above)"
    assert row["op"].startswith("queue 1 MiB items, node on the consumer's host")
    assert ("maps the span" in row["op"]) == (mode == "map")
    assert row["op"].endswith(f"publish {publish})")
    assert row["items_per_s"] > 0 and row["MB_per_s"] == pytest.approx(row["items_per_s"] * (1 << 20) / 1e6)
    assert (tmp_path / "split" / "queue.locator.done").exists()  # the consumer timed its window to the end
    ops = row["ops"]["producer"]
    op = {"fence": "publish", "behind": "publish_post", "separate": "store64"}[publish.rstrip("24")]
    assert set(ops) & {"publish", "publish_post", "store64"} == {op}  # one way of publishing, the one asked for
    publishes = ops[op]["per_item"]  # once per push_batch call
    if publish.startswith("behind"):
        assert ops["publish_wait"]["per_item"] == pytest.approx(publishes, abs=0.05)  # each confirmed once
        assert "load64" not in ops or ops["load64"]["per_item"] < 0.9  # no owner check per push
    if batch == 1:
        assert publishes == pytest.approx(1.0, abs=0.05)
    else:  # calls of up to 4 items (fewer when the 8 MiB ring has less room): fewer publishes than items
        assert publishes < 0.9
    assert row["max_stall_ms"] >= 0.0


@pytest.mark.parametrize("publish", ["fence", "behind", "separate"])
def test_each_consumer_host_round_runs_once_in_its_own_directory(publish: str, tmp_path: Any) -> None:
    """``--publish behind`` made the always-run write-behind round a second copy of the first, in
    the first's directory: its producer read the first round's locator and ``.done`` and pushed
    nothing (or was refused the freed lease), and the row failed every round. Each (mode, node
    progress, publish) now runs once, and a round refuses a directory that exists."""
    from grafos_fabric.tools.bench_ucx import _netns_split_round, _splits

    rounds = _splits(publish)
    assert len(rounds) == len(set(rounds))
    assert ("map", "busy", publish) in rounds and ("map", "busy", "behind") in rounds
    assert all(pub == publish for mode, prog, pub in rounds if (mode, prog) != ("map", "busy"))
    (tmp_path / "used").mkdir()
    with pytest.raises(FileExistsError):
        _netns_split_round(None, str(tmp_path / "used"), 0.1)
