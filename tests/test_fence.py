"""Fence epochs, fenced values and the guard that rejects stale epochs at the write target."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as hst

from grafos_fabric import errors
from grafos_fabric.fence import EdgeGeneration, Fenced, FenceEpoch, FenceGuard

U64 = hst.integers(0, (1 << 64) - 1)


def test_zero_is_the_first_epoch_and_bump_adds_one() -> None:
    e = FenceEpoch.zero()
    assert int(e) == 0
    assert int(e.bump()) == 1
    assert e.bump().bump() == FenceEpoch(2)
    assert int(e) == 0  # epochs are immutable


def test_epochs_are_ordered_and_hashable() -> None:
    a, b = FenceEpoch(3), FenceEpoch(4)
    assert a < b and b > a and a <= a and b >= a and a != b
    assert max([b, a, FenceEpoch(1)]) == b
    assert {FenceEpoch(3), FenceEpoch(3), b} == {a, b}
    assert {a: "x"}[FenceEpoch(3)] == "x"


def test_an_epoch_is_not_equal_to_a_plain_int_but_converts_to_one() -> None:
    assert FenceEpoch(5) != 5
    assert int(FenceEpoch(5)) == 5
    assert [10, 11, 12][FenceEpoch(1)] == 11  # __index__
    with pytest.raises(TypeError):
        _ = FenceEpoch(1) < 2


def test_epochs_round_trip_through_eight_little_endian_bytes() -> None:
    e = FenceEpoch(0x0102030405060708)
    assert e.to_bytes() == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert FenceEpoch.from_bytes(e.to_bytes()) == e
    assert FenceEpoch.from_bytes(bytearray(8)) == FenceEpoch.zero()


@pytest.mark.parametrize("raw", [b"", b"\x00" * 7, b"\x00" * 9])
def test_epoch_bytes_of_the_wrong_length_raise_corrupted(raw: bytes) -> None:
    with pytest.raises(errors.Corrupted):
        FenceEpoch.from_bytes(raw)


@pytest.mark.parametrize("bad", [-1, 1 << 64, 1.0, "1", True, None])
def test_epochs_outside_u64_or_not_ints_are_refused(bad: Any) -> None:
    with pytest.raises(errors.FabricValueError):
        FenceEpoch(bad)


def test_bumping_the_largest_epoch_is_refused() -> None:
    with pytest.raises(errors.FabricValueError):
        FenceEpoch((1 << 64) - 1).bump()


def test_an_epoch_survives_pickling_for_multiprocessing() -> None:
    assert pickle.loads(pickle.dumps(FenceEpoch(9))) == FenceEpoch(9)


def test_edge_generation_is_fence_epoch() -> None:
    assert EdgeGeneration is FenceEpoch


@given(U64, U64)
def test_epoch_order_is_the_order_of_their_values(x: int, y: int) -> None:
    assert (FenceEpoch(x) < FenceEpoch(y)) == (x < y)
    assert (FenceEpoch(x) == FenceEpoch(y)) == (x == y)
    assert (hash(FenceEpoch(x)) == hash(FenceEpoch(y))) or x != y
    assert FenceEpoch.from_bytes(FenceEpoch(x).to_bytes()) == FenceEpoch(x)


# -- Fenced values -------------------------------------------------------------------


def test_a_fenced_value_carries_its_epoch() -> None:
    f = Fenced(FenceEpoch(2), "payload")
    assert f.epoch == FenceEpoch(2) and f.value == "payload"
    assert Fenced(2, "payload") == f
    assert Fenced.at_zero([1]).epoch == FenceEpoch.zero()
    assert Fenced(3, "payload") != f


def test_fenced_values_are_not_hashable_because_the_value_may_change() -> None:
    with pytest.raises(TypeError):
        hash(Fenced(1, []))


# -- FenceGuard --------------------------------------------------------------------


def test_the_grafos_doc_example_guard_rejects_the_old_epoch_after_advance() -> None:
    guard = FenceGuard(FenceEpoch.zero())
    guard.check(FenceEpoch.zero())
    new = guard.advance()
    assert new == FenceEpoch(1) and guard.current == new
    with pytest.raises(errors.StaleEpoch) as info:
        guard.check(FenceEpoch.zero())
    assert (info.value.epoch, info.value.current) == (0, 1)
    assert isinstance(info.value, errors.Fenced) and info.value.code == -3
    guard.check(new)


def test_check_accepts_a_newer_epoch_without_adopting_it() -> None:
    guard = FenceGuard(3)
    guard.check(7)
    assert guard.current == FenceEpoch(3)
    guard.check(3)


def test_advance_to_moves_forward_only() -> None:
    guard = FenceGuard(5)
    assert guard.advance_to(9) == FenceEpoch(9)
    assert guard.advance_to(2) == FenceEpoch(9)
    with pytest.raises(errors.StaleEpoch):
        guard.check(8)


def test_admit_checks_a_fenced_value_and_unwraps_it() -> None:
    guard = FenceGuard(1)
    assert guard.admit(Fenced(1, "ok")) == "ok"
    guard.advance()
    with pytest.raises(errors.StaleEpoch):
        guard.admit(Fenced(1, "late"))
    with pytest.raises(errors.StaleEpoch):
        guard.check(Fenced(0, "older"))


def test_a_guard_starts_at_zero_by_default() -> None:
    assert FenceGuard().current == FenceEpoch.zero()


def test_concurrent_advances_each_get_a_distinct_epoch() -> None:
    guard = FenceGuard()
    got: list[FenceEpoch] = []
    lock = threading.Lock()

    def run() -> None:
        mine = [guard.advance() for _ in range(500)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(e) for e in got) == list(range(1, 2001))
    assert guard.current == FenceEpoch(2000)


class _Target:
    """A write target that runs the fence check itself, as the docs ask."""

    def __init__(self) -> None:
        self.guard = FenceGuard()
        self.items: list[str] = []

    def write(self, epoch: FenceEpoch, item: str) -> None:
        self.guard.check(epoch)
        self.items.append(item)


def test_a_stale_writer_that_still_believes_it_leads_is_rejected_at_the_target() -> None:
    target = _Target()
    old_leader = FenceEpoch.zero()
    target.write(old_leader, "a")
    new_leader = target.guard.advance()
    target.write(new_leader, "b")
    with pytest.raises(errors.StaleEpoch):
        target.write(old_leader, "zombie")  # the old leader never learned it was replaced
    assert target.items == ["a", "b"]


@given(hst.lists(hst.integers(0, 50), min_size=1, max_size=30))
def test_a_guard_rejects_exactly_the_epochs_below_its_highest_advance(steps: list[int]) -> None:
    guard = FenceGuard()
    high = 0
    for s in steps:
        guard.advance_to(s)
        high = max(high, s)
        for probe in (s, high, max(0, high - 1)):
            if probe < high:
                with pytest.raises(errors.StaleEpoch):
                    guard.check(probe)
            else:
                guard.check(probe)
