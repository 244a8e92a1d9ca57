"""checkpoint() in C (native/gf_ckpt.c, grafos_fabric._item.checkpoint): the method's fast path, the
lane's one native call, taken from C with the state's PLock held. These tests attack what the C
code reads from Python objects: a malformed fast tuple, slot pointer, sequence number, deadline or
lane reference takes the Python path or raises a typed error, never crashes, never loses the
previous checkpoint, and the lock is always given back."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from grafos_fabric import _item
from grafos_fabric._ffi import ffi
from grafos_fabric.checkpoint import CheckpointedStageState, EdgeCheckpoint
from grafos_fabric.drivers.block import open_block

SIZE = 4 << 20
STAGE = "native"


def state_of(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def laned(path: Path, n: int = 4096) -> tuple[Any, CheckpointedStageState[Any]]:
    """A region and a state whose lane is made (the third checkpoint on takes the fast path)."""
    r = open_block(path, create_size=SIZE)
    st = CheckpointedStageState(state_of(n, 1), r, codec="raw", stage=STAGE, durability="single-sync")
    for _ in range(3):
        st.checkpoint()
    assert st._fast is not None and len(st._fast) == 7 and isinstance(st._fast[6], _item.LaneRef)
    return r, st


def restored(r: Any) -> CheckpointedStageState[Any]:
    return CheckpointedStageState.restore(r)


@pytest.mark.parametrize("n", [1, 4096, 300_000])
def test_the_native_path_writes_what_restore_reads(tmp_path: Path, n: int) -> None:
    """New states of the lane's length, new edges: every checkpoint goes through the lane (the lane
    object stays), its sequence numbers count up, and restore reads the last one whole."""
    r, st = laned(tmp_path / "r.img", n)
    with r:
        lane = st._lane
        for i in range(20):
            st.state = state_of(n, 100 + i)
            seq = st.checkpoint(EdgeCheckpoint(input_offset=i, output_commit=2 * i))
            assert seq == 4 + i and st.last_seq == seq
            assert st.edge == EdgeCheckpoint(input_offset=i, output_commit=2 * i)
        assert st._lane is lane  # no ordinary write in between: the lane took every one
        got = restored(r)
        assert got.state == state_of(n, 119) and got.last_seq == 23
        assert got.edge == EdgeCheckpoint(input_offset=19, output_commit=38)


def test_a_lock_that_is_not_a_plock_is_a_type_error_and_nothing_is_written(tmp_path: Path) -> None:
    r, st = laned(tmp_path / "r.img")
    with r:
        st._lock = threading.RLock()  # type: ignore[assignment]
        st.state = state_of(4096, 9)
        with pytest.raises(TypeError, match="PLock"):
            st.checkpoint()
        assert restored(r).state == state_of(4096, 1)


@pytest.mark.parametrize(
    "breakage",
    [
        "fast_not_tuple",
        "fast_short",
        "newest_slot_out_of_range",
        "newest_not_ints",
        "newest_seq_huge",
        "newest_seq_negative",
        "deadline_not_int",
        "deadline_huge",
        "edge_subclass",
        "edge_field_huge",
    ],
)
def test_malformed_values_take_the_python_path_and_still_checkpoint(tmp_path: Path, breakage: str) -> None:
    """Whatever the C code cannot take as it is goes to the Python method (which writes the
    ordinary way, or says what is wrong); no crash, the lock is free afterwards."""
    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        store, cell = st._fast[3], st._fast[2]
        edge: Any = None
        if breakage == "fast_not_tuple":
            st._fast = list(st._fast)  # type: ignore[assignment]
        elif breakage == "fast_short":
            st._fast = st._fast[:6]  # type: ignore[assignment]
        elif breakage == "newest_slot_out_of_range":
            store._newest = (7, store._newest[1])
        elif breakage == "newest_not_ints":
            store._newest = ("0", "3")
        elif breakage == "newest_seq_huge":
            store._newest = (0, 1 << 70)
        elif breakage == "newest_seq_negative":
            store._newest = (0, -5)
        elif breakage == "deadline_not_int":
            cell._deadline = 1.5e30
        elif breakage == "deadline_huge":
            cell._deadline = 1 << 80
        elif breakage == "edge_subclass":

            class Edge(EdgeCheckpoint):
                pass

            edge = Edge(input_offset=5, output_commit=6)
        elif breakage == "edge_field_huge":
            edge = EdgeCheckpoint(input_offset=5)
            object.__setattr__(edge, "output_commit", 1 << 64)  # past its check: a forged edge
        st.state = state_of(4096, 7)
        try:
            st.checkpoint(edge)
        except Exception as exc:  # the Python path may refuse a forged private value with an error
            assert not isinstance(exc, SystemError), exc  # (not C code that mishandled one)
        assert st._lock._count == 0  # given back
        # the store's own view is re-read from disk: the next checkpoint lands and restores
        store._newest = None
        st._fast = None
        cell._deadline = 1 << 62
        st.state = state_of(4096, 8)
        st.checkpoint(EdgeCheckpoint(input_offset=1))
        got = restored(r)
        assert got.state == state_of(4096, 8) and got.edge == EdgeCheckpoint(input_offset=1)


def test_a_lane_reference_that_is_not_a_laneref_is_a_type_error_and_the_last_checkpoint_stays(tmp_path: Path) -> None:
    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        st._fast = (*st._fast[:6], bytearray(1024))  # type: ignore[assignment]
        st.state = state_of(4096, 3)
        with pytest.raises(TypeError, match="LaneRef"):
            st.checkpoint()
        assert st._lock._count == 0
        assert restored(r).state == state_of(4096, 1)


def test_laneref_takes_only_a_writable_buffer_of_one_lane() -> None:
    size = ffi.sizeof("gf_lane")
    with pytest.raises(ValueError, match="gf_lane"):
        _item.LaneRef(bytearray(size - 8))
    with pytest.raises(ValueError, match="gf_lane"):
        _item.LaneRef(bytearray(size + 8))
    with pytest.raises((TypeError, BufferError)):
        _item.LaneRef(bytes(size))  # read-only
    with pytest.raises(TypeError):
        _item.LaneRef()  # type: ignore[call-arg]
    lane = ffi.new("gf_lane *")
    ref = _item.LaneRef(ffi.buffer(lane))
    del lane  # the reference holds the buffer, which holds the lane's memory
    assert isinstance(ref, _item.LaneRef)


def test_bad_calls_raise_typed_errors() -> None:
    with pytest.raises(TypeError):
        _item.checkpoint()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _item.checkpoint(1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        _item.checkpoint(object())
    with pytest.raises(TypeError):
        _item.checkpoint_setup(1, 2, 3, 4)  # type: ignore[arg-type]


def test_an_error_from_the_write_propagates_and_gives_the_lock_back(tmp_path: Path) -> None:
    """A Python callable in the write's place (as a test hook) that raises: the error reaches the
    caller, the lock is free, the store re-scans, and the next checkpoint lands."""
    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None

        def boom(*args: Any) -> int:
            raise OSError(5, "injected")

        st._fast = (boom, *st._fast[1:])
        with pytest.raises(OSError, match="injected"):
            st.checkpoint()
        assert st._lock._count == 0
        st._fast = None
        st.state = state_of(4096, 4)
        st.checkpoint()
        assert restored(r).state == state_of(4096, 4)


def test_the_callable_write_gets_the_native_arguments(tmp_path: Path) -> None:
    """A Python callable in the write's place sees what gf_lane_write would: the lane, the next
    sequence number, the other slot, the edge's two fields and the lease's deadline."""
    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None and st._fast[3]._newest is not None
        real, c, cell, store = st._fast[:4]
        slot0, seq0 = store._newest
        seen: list[tuple[Any, ...]] = []

        def spy(*args: Any) -> int:
            seen.append(args)
            return int(real(*args))

        st._fast = (spy, *st._fast[1:])
        seq = st.checkpoint(EdgeCheckpoint(input_offset=11, output_commit=22))
        assert seq == seq0 + 1 and store._newest == (1 - slot0, seq)
        assert seen == [(c, seq0 + 1, 1 - slot0, 11, 22, cell._deadline)]
        assert restored(r).edge == EdgeCheckpoint(input_offset=11, output_commit=22)


def test_the_lock_is_held_across_the_python_path(tmp_path: Path) -> None:
    """_checkpoint_lane (the Python path) runs with the state's lock held by this thread."""
    r, st = laned(tmp_path / "r.img")
    with r:
        held: list[bool] = []
        real = st._checkpoint_lane

        def watch(edge: Any) -> int:
            held.append(st._lock._is_owned() and st._lock._count == 1)
            return real(edge)

        st._checkpoint_lane = watch  # type: ignore[method-assign]
        st._fast = None  # no lane: the Python path
        st.checkpoint()
        assert held == [True] and st._lock._count == 0


def test_a_forked_child_checkpoints_while_the_parent_held_the_lock(tmp_path: Path) -> None:
    """fork() while another thread of the parent holds the state's lock: the child's copy of the
    lock is free (PLock after fork), so its checkpoint does not hang."""
    r, st = laned(tmp_path / "r.img")
    with r:
        go, done = threading.Event(), threading.Event()

        def hold() -> None:
            st._lock.acquire()
            go.set()
            done.wait(30)
            st._lock.release()

        t = threading.Thread(target=hold)
        t.start()
        assert go.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: one checkpoint, then out without Python's cleanup
            code = 1
            signal.alarm(30)  # a hang ends the child (the parent then sees a signal, not exit 0)
            try:
                st.state = state_of(4096, 5)
                st.checkpoint()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        done.set()
        t.join(30)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        st._fast = None
        assert restored(r).state == state_of(4096, 5)


def test_a_subclass_that_makes_state_a_property_is_read_by_name(tmp_path: Path) -> None:
    """On a subclass's object checkpoint() in C reads the attributes by name (a subclass may make
    any of them a property), not from CheckpointBase's struct: the property's value is what is
    written."""

    class Derived(CheckpointedStageState[bytes]):
        @property  # type: ignore[override]
        def state(self) -> bytes:
            return self._held

        @state.setter
        def state(self, value: bytes) -> None:
            self._held = value

    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = Derived(state_of(4096, 1), r, codec="raw", stage=STAGE, durability="single-sync")
        for i in range(5):
            st.state = state_of(4096, 10 + i)
            st.checkpoint(EdgeCheckpoint(input_offset=i))
        assert st._fast is not None  # the lane was made, and taken
        got = restored(r)
        assert got.state == state_of(4096, 14) and got.edge == EdgeCheckpoint(input_offset=4)


def test_an_attribute_deleted_from_the_struct_is_an_attribute_error_and_the_lock_goes_back(tmp_path: Path) -> None:
    r, st = laned(tmp_path / "r.img")
    with r:
        del st.edge
        with pytest.raises(AttributeError):
            st.edge  # noqa: B018
        with pytest.raises(AttributeError):
            st.checkpoint()  # the edge to write is st.edge
        assert st._lock._count == 0
        st.checkpoint(EdgeCheckpoint(input_offset=3))  # given one, it writes and keeps it
        assert st.edge == EdgeCheckpoint(input_offset=3) and restored(r).edge == st.edge


def test_a_state_in_a_reference_cycle_through_its_struct_is_collected(tmp_path: Path) -> None:
    """CheckpointBase's members are traversed by the garbage collector: a state that refers to
    itself through one of them (here its observer) is freed once unreachable."""
    import gc
    import weakref

    with open_block(tmp_path / "r.img", create_size=SIZE) as r:
        st = CheckpointedStageState(state_of(64, 1), r, codec="raw", stage=STAGE)
        st.observer = st  # type: ignore[assignment]  # a cycle through the struct
        ref = weakref.ref(st)
        del st
        gc.collect()
        assert ref() is None


# ---- SlotStore's _newest in SlotStoreBase's struct ----


def test_slot_store_newest_reads_back_what_was_set() -> None:
    """_newest keeps None, a (slot, seq) tuple (the very object set), or any other object as it is
    (checkpoint() leaves those to the Python path); it cannot be deleted."""
    b = _item.SlotStoreBase()
    assert b._newest is None
    for value in [(0, 0), (1, (1 << 64) - 1), (1, 5)]:
        b._newest = value
        assert b._newest is value
    forged: list[Any] = [(2, 5), (0, -1), (0, 1 << 64), (True, 5), (0, 5.0), ("0", "3"), [0, 5], (0,), (0, 1, 2), 7]
    for value in forged:
        b._newest = value
        assert b._newest is value
    b._newest = None
    assert b._newest is None
    with pytest.raises(AttributeError):
        del b._newest
    assert b._newest is None


def test_a_native_checkpoint_keeps_newest_in_the_struct(tmp_path: Path) -> None:
    """After a checkpoint through the lane the store's _newest reads as (slot, seq), the same tuple
    on every read until the next checkpoint; a tuple Python sets is what the next one goes on from."""
    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        store = st._fast[3]
        seq = st.checkpoint()
        got = store._newest
        assert isinstance(got, tuple) and got[0] in (0, 1) and got[1] == seq and got is store._newest
        slot0 = got[0]
        seq2 = st.checkpoint()
        assert seq2 == seq + 1 and store._newest == (1 - slot0, seq2) and store._newest is not got
        store._newest = (1 - slot0, seq2)  # set from Python, equal: the lane goes on from it
        lane = st._lane
        seq3 = st.checkpoint()
        assert seq3 == seq2 + 1 and store._newest == (slot0, seq3) and st._lane is lane
        assert restored(r).last_seq == seq3


def test_a_failed_native_write_hands_the_previous_newest_to_failed(tmp_path: Path) -> None:
    """A write that fails (EIO from the write's place) raises, and _failed sees the newest the
    store had before: the previous checkpoint stays, and the next one lands after it."""
    import errno

    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        store = st._fast[3]
        before = store._newest
        seen: list[tuple[Any, ...]] = []
        real_failed = st._failed

        def failed(*args: Any) -> int:
            seen.append(args)
            return real_failed(*args)

        st._failed = failed  # type: ignore[method-assign]
        fast = st._fast
        st._fast = (lambda *a: -errno.EIO, *fast[1:])
        with pytest.raises(OSError):
            st.checkpoint()
        assert len(seen) == 1 and seen[0][0] == -errno.EIO and seen[0][1] == before
        assert seen[0][2:4] == (1 - before[0], before[1] + 1)
        assert st._lock._count == 0
        st._fast = fast
        st.state = state_of(4096, 9)
        seq = st.checkpoint()
        assert seq > before[1] and restored(r).state == state_of(4096, 9)


def test_a_store_subclass_that_makes_newest_a_property_is_read_by_name(tmp_path: Path) -> None:
    """On a SlotStore subclass's object checkpoint() in C reads and sets _newest by name (the
    subclass may make it a property), not in SlotStoreBase's struct."""
    from grafos_fabric.slots import SlotStore

    calls: list[str] = []

    class Derived(SlotStore):
        @property  # type: ignore[override]
        def _newest(self) -> Any:
            calls.append("get")
            return self.__dict__.get("held")

        @_newest.setter
        def _newest(self, value: Any) -> None:
            calls.append("set")
            self.__dict__["held"] = value

    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        real = st._fast[3]
        d = Derived.__new__(Derived)
        d._newest = real._newest
        slot0, seq0 = real._newest
        fast = st._fast
        st._fast = (*fast[:3], d, *fast[4:])
        calls.clear()
        seq = st.checkpoint()
        assert seq == seq0 + 1 and d.__dict__["held"] == (1 - slot0, seq)
        assert calls[0] == "get" and calls.count("set") == 2  # None while the write runs, then the new one
        assert real._newest == (slot0, seq0)  # the real store's struct was not touched
        real._newest = d.__dict__["held"]
        st._fast = fast
        assert st.checkpoint() == seq + 1 and restored(r).last_seq == seq + 1


def test_a_store_in_a_reference_cycle_through_newest_is_collected() -> None:
    """SlotStoreBase's object is traversed by the garbage collector: a store whose _newest (set to
    something checkpoint() does not take) refers back to it is freed once unreachable."""
    import gc
    import weakref

    class S(_item.SlotStoreBase):
        pass

    s = S()
    s._newest = [s]
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None


# ---- LocalLeaseCell's _state and _deadline in LeaseCellBase's struct ----


def test_a_lease_cell_keeps_its_state_and_deadline_in_the_struct() -> None:
    from grafos_fabric.lease import LeaseState, LocalLeaseCell

    cell = LocalLeaseCell(123, LeaseState.REVOKED)
    assert cell.load_state() == LeaseState.REVOKED and cell.load_deadline_ns() == 123
    cell.store_state(LeaseState.ACTIVE)
    cell.store_deadline_ns(1 << 70)  # any int the Python side puts there reads back
    assert cell._state == LeaseState.ACTIVE and cell._deadline == 1 << 70
    assert "_state" not in vars(cell) and "_deadline" not in vars(cell)
    bare = _item.LeaseCellBase()
    with pytest.raises(AttributeError):
        bare._state  # noqa: B018


def test_a_lease_cell_whose_deadline_is_not_a_small_int_takes_the_python_path(tmp_path: Path) -> None:
    """A deadline the C method cannot take as an int64 (here past 2**63) goes the Python path, which
    checks the lease its own way and writes the record."""
    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        cell = st._fast[2]
        was = cell._deadline
        cell._deadline = 1 << 70
        st.state = state_of(4096, 21)
        seq = st.checkpoint()
        assert restored(r).state == state_of(4096, 21) and restored(r).last_seq == seq
        cell._deadline = was


def test_a_deleted_lease_cell_member_is_an_attribute_error_and_the_lock_goes_back(tmp_path: Path) -> None:
    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        cell = st._fast[2]
        was = cell._state
        del cell._state
        with pytest.raises(AttributeError):
            st.checkpoint()
        assert st._lock._count == 0
        cell._state = was
        st.state = state_of(4096, 22)
        st.checkpoint()
        assert restored(r).state == state_of(4096, 22)


def test_a_lease_cell_subclass_that_makes_state_a_property_is_read_by_name(tmp_path: Path) -> None:
    """On a LocalLeaseCell subclass's object checkpoint() in C reads _state and _deadline by name:
    a property that says the lease is revoked sends the checkpoint the Python path, which raises."""
    from grafos_fabric.errors import Revoked
    from grafos_fabric.lease import LeaseState, LocalLeaseCell

    reads: list[str] = []

    class Watched(LocalLeaseCell):
        @property  # type: ignore[override]
        def _state(self) -> int:
            reads.append("state")
            return int(self.__dict__["s"])

        @_state.setter
        def _state(self, value: int) -> None:
            self.__dict__["s"] = value

    r, st = laned(tmp_path / "r.img")
    with r:
        assert st._fast is not None
        real = st._fast[2]
        w = Watched(real._deadline)
        fast = st._fast
        st._fast = (*fast[:2], w, *fast[3:])
        seq = st.checkpoint()  # ACTIVE through the property: the lane writes
        assert reads == ["state"] and restored(r).last_seq == seq
        w._state = LeaseState.REVOKED
        reads.clear()
        st._fast = (*fast[:2], w, *fast[3:])
        first = st.checkpoint()  # not active: the Python path, whose lease (the real cell) is live
        assert reads == ["state"] and restored(r).last_seq == first
        real.store_state(LeaseState.REVOKED)
        st._fast = fast
        with pytest.raises(Revoked):
            st.checkpoint()
        assert st._lock._count == 0
        real.store_state(LeaseState.ACTIVE)


def test_a_lease_cell_in_a_reference_cycle_through_its_struct_is_collected() -> None:
    import gc
    import weakref

    from grafos_fabric.lease import LocalLeaseCell

    cell = LocalLeaseCell(1)
    cell._deadline = [cell]  # type: ignore[assignment]
    ref = weakref.ref(cell)
    del cell
    gc.collect()
    assert ref() is None
