"""Errors and states (issue 9): closed and freed handles, every bad input a
typed error from grafos_fabric.errors, dtype texts from shared memory refused
at attach, reserved views that pin the mapping. Mapped and one-sided."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi
from grafos_fabric.queue import OneSidedQueue

BIG = 2**64
HUGE = 10**400


def _open_ops(tx: Any, rx: Any) -> dict[str, Any]:
    """Every data operation of a producer and a consumer handle."""
    rows = np.zeros((2, 8), dtype=np.uint8)

    def reserve(q: Any) -> None:
        with q.reserve(8):
            pass

    return {
        "push": lambda: tx.push(b"x", timeout=0),
        "try_push": lambda: tx.try_push(b"x"),
        "push_batch": lambda: tx.push_batch([b"x", b"y"], timeout=0),
        "push_batch_rows": lambda: tx.push_batch(rows, timeout=0),
        "push_batch_empty": lambda: tx.push_batch([], timeout=0),
        "reserve": lambda: reserve(tx),
        "pop": lambda: rx.pop(timeout=0),
        "pop_blocking": lambda: rx.pop(timeout=1),
        "try_pop": lambda: rx.try_pop(),
        "pop_batch": lambda: rx.pop_batch(4, timeout=0),
        "pop_batch_blocking": lambda: rx.pop_batch(4, timeout=1),
    }


OPS = list(_open_ops(None, None))


@pytest.mark.parametrize("op", OPS)
def test_after_close_every_operation_raises_queue_closed(make_pair, op):
    tx, rx = make_pair()
    tx.push_batch([bytes([i]) * 8 for i in range(10)])
    first = rx.pop(timeout=5)  # also fills the single-pop prefetch with the rest
    assert first.seq == 0
    tx.close()
    rx.close()
    with pytest.raises(E.QueueClosed) as info:
        _open_ops(tx, rx)[op]()
    assert not isinstance(info.value, E.QueueFreed)
    assert "closed" in str(info.value)
    first.release()
    # nothing was lost: a new consumer gets every item the closed one never handed out
    fresh = gf.FabricQueue.attach(tx.fabric, tx.locator())
    assert [fresh.pop(timeout=5).seq for _ in range(9)] == list(range(1, 10))


@pytest.mark.parametrize("op", [*OPS, "epoch", "seal", "advance_epoch", "set_acked", "stats", "locator"])
def test_after_free_every_operation_raises_queue_freed(make_pair, op):
    tx, rx = make_pair()
    tx.push(b"one")
    header_ops = {
        "epoch": lambda q: q.epoch,
        "seal": lambda q: q.seal(),
        "advance_epoch": lambda q: q.advance_epoch(9),
        "set_acked": lambda q: q.set_acked(1),
        "stats": lambda q: q.stats(),
        "locator": lambda q: q.locator(),
    }
    rx.free()
    tx.free()
    for q in (tx, rx):
        call = (lambda q=q: header_ops[op](q)) if op in header_ops else _open_ops(q, q)[op]
        with pytest.raises(E.QueueFreed, match="freed"):
            call()


def test_close_is_idempotent_and_free_after_close_works(make_pair):
    tx, rx = make_pair()
    tx.close()
    tx.close()
    tx.free()
    with pytest.raises(E.QueueFreed):
        tx.push(b"x")
    rx.close()
    with pytest.raises(E.QueueClosed):
        rx.try_pop()


# -- bad input: every case gets a typed error ------------------------------------------------------------


def _bad_create(fabric: Any, mode: str, **kwargs: Any) -> None:
    create = gf.FabricQueue.create if mode == "mapped" else OneSidedQueue.create
    create(fabric, **{"capacity": 4096, "ttl": 5.0, **kwargs})


CREATE_CASES = [
    ({"capacity": HUGE}, E.FabricValueError),
    ({"capacity": BIG}, E.FabricValueError),
    ({"capacity": -1}, E.FabricValueError),
    ({"capacity": "big"}, E.FabricTypeError),
    ({"capacity": 4096.0}, E.FabricTypeError),
    ({"max_item": BIG}, E.FabricValueError),
    ({"max_item": -5}, E.FabricValueError),
    ({"max_item": "8"}, E.FabricTypeError),
    ({"epoch": BIG}, E.FabricValueError),
    ({"epoch": -1}, E.FabricValueError),
    ({"epoch": "1"}, E.FabricTypeError),
    ({"first_seq": HUGE}, E.FabricValueError),
    ({"dtype": "foo"}, E.DtypeMismatch),
    ({"dtype": "V0"}, E.DtypeMismatch),
    ({"dtype": object}, E.DtypeMismatch),
    ({"dtype": [("a", "O")]}, E.DtypeMismatch),
    ({"dtype": 12.5}, E.DtypeMismatch),
    ({"ttl": HUGE}, E.FabricValueError),
    ({"ttl": float("nan")}, E.FabricValueError),
]


@pytest.mark.parametrize("mode", ["mapped", "onesided"])
@pytest.mark.parametrize(("kwargs", "exc"), CREATE_CASES, ids=[repr(c[0])[:40] for c in CREATE_CASES])
def test_bad_create_arguments_get_typed_errors(fabric, mode, kwargs, exc):
    with pytest.raises(exc) as info:
        _bad_create(fabric, mode, **kwargs)
    assert isinstance(info.value, E.FabricValueError)  # every bad input is a ValueError subclass of ours


ATTACH_CASES = [
    ({"epoch": BIG}, E.FabricValueError),
    ({"epoch": -1}, E.FabricValueError),
    ({"epoch": "2"}, E.FabricTypeError),
    ({"epoch": 2.0}, E.FabricTypeError),
]


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize(("kwargs", "exc"), ATTACH_CASES, ids=[repr(c[0]) for c in ATTACH_CASES])
def test_bad_attach_arguments_get_typed_errors(fabric, mapped, kwargs, exc):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=5)
    with pytest.raises(exc):
        gf.FabricQueue.attach(fabric, q.locator(), mapped=mapped, **kwargs)


def _reserve(q: Any, n: Any, *, commit: Any = None) -> None:
    with q.reserve(n) as buf:
        buf[...] = 1
        if commit is not None:
            q.commit_len(commit)


def _index_batch(tx: Any, rx: Any, index: Any) -> None:
    tx.push(b"abc")
    rx.pop_batch(4, timeout=5)[index]


OP_CASES: list[tuple[str, Any, type[BaseException], str]] = [
    ("push str", lambda tx, rx: tx.push("text"), E.FabricTypeError, "encode str first"),
    ("try_push str", lambda tx, rx: tx.try_push("text"), E.FabricTypeError, "encode str first"),
    ("push None", lambda tx, rx: tx.push(None), E.FabricTypeError, "bytes-like"),
    ("push int", lambda tx, rx: tx.push(7), E.FabricTypeError, "bytes-like"),
    ("push_batch int", lambda tx, rx: tx.push_batch(7), E.FabricTypeError, "sequence"),
    ("push_batch str", lambda tx, rx: tx.push_batch("abc"), E.FabricTypeError, "not one item"),
    ("push_batch one str", lambda tx, rx: tx.push_batch([b"a", "b"]), E.FabricTypeError, "encode str first"),
    ("push timeout -1", lambda tx, rx: tx.push(b"x", timeout=-1), E.FabricValueError, "timeout"),
    ("push timeout str", lambda tx, rx: tx.push(b"x", timeout="1"), E.FabricTypeError, "timeout"),
    ("push timeout nan", lambda tx, rx: tx.push(b"x", timeout=float("nan")), E.FabricValueError, "timeout"),
    ("push timeout huge", lambda tx, rx: tx.push(b"x", timeout=HUGE), E.FabricValueError, "timeout"),
    ("push_batch timeout huge", lambda tx, rx: tx.push_batch([b"x"], timeout=HUGE), E.FabricValueError, "timeout"),
    ("pop timeout -1", lambda tx, rx: rx.pop(timeout=-1), E.FabricValueError, "timeout"),
    ("pop timeout huge", lambda tx, rx: rx.pop(timeout=HUGE), E.FabricValueError, "timeout"),
    ("pop timeout list", lambda tx, rx: rx.pop(timeout=[1]), E.FabricTypeError, "timeout"),
    ("pop_batch 0", lambda tx, rx: rx.pop_batch(0), E.FabricValueError, "max_items"),
    ("pop_batch -1", lambda tx, rx: rx.pop_batch(-1), E.FabricValueError, "max_items"),
    ("pop_batch 1.5", lambda tx, rx: rx.pop_batch(1.5), E.FabricTypeError, "max_items"),
    ("pop_batch True", lambda tx, rx: rx.pop_batch(True), E.FabricTypeError, "max_items"),
    ("pop_batch 2**70", lambda tx, rx: rx.pop_batch(2**70, timeout=0), E.FabricValueError, "max_items"),
    ("pop_batch timeout nan", lambda tx, rx: rx.pop_batch(1, timeout=float("nan")), E.FabricValueError, "timeout"),
    ("reserve 0", lambda tx, rx: _reserve(tx, 0), E.FabricValueError, "reserve"),
    ("reserve 2**64", lambda tx, rx: _reserve(tx, BIG), E.FabricValueError, "reserve"),
    ("reserve 2**63", lambda tx, rx: _reserve(tx, 2**63), E.ItemTooLarge, "max_item"),
    ("reserve str", lambda tx, rx: _reserve(tx, "8"), E.FabricTypeError, "reserve"),
    ("commit_len 2**64", lambda tx, rx: _reserve(tx, 8, commit=BIG), E.FabricValueError, "commit"),
    ("commit_len 9 of 8", lambda tx, rx: _reserve(tx, 8, commit=9), E.FabricValueError, "commit"),
    ("commit_len str", lambda tx, rx: _reserve(tx, 8, commit="4"), E.FabricTypeError, "commit"),
    ("commit_len outside", lambda tx, rx: tx.commit_len(4), E.FabricValueError, "reserve"),
    ("seal 2**64", lambda tx, rx: tx.seal(BIG), E.FabricValueError, "seal_seq"),
    ("seal -1", lambda tx, rx: tx.seal(-1), E.FabricValueError, "seal_seq"),
    ("advance_epoch 2**64", lambda tx, rx: tx.advance_epoch(BIG), E.FabricValueError, "epoch"),
    ("advance_epoch str", lambda tx, rx: tx.advance_epoch("9"), E.FabricTypeError, "epoch"),
    ("set_acked -1", lambda tx, rx: tx.set_acked(-1), E.FabricValueError, "acked"),
    ("set_acked 2**64", lambda tx, rx: tx.set_acked(BIG), E.FabricValueError, "acked"),
    ("batch index str", lambda tx, rx: _index_batch(tx, rx, "0"), E.FabricTypeError, "ints"),
]


@pytest.mark.parametrize(("name", "call", "exc", "says"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_bad_operation_arguments_get_typed_errors_that_say_what_to_do(make_pair, name, call, exc, says):
    tx, rx = make_pair()
    with pytest.raises(exc, match=says) as info:
        call(tx, rx)
    assert isinstance(info.value, E.FabricValueError)
    assert "cdata" not in str(info.value) and "ctype" not in str(info.value)  # no cffi internals
    # the handles still work afterwards
    tx.push(b"after", timeout=5)
    got = []
    while not got or got[-1] != b"after":
        got.append(rx.pop(timeout=5).tobytes())


def test_a_type_error_is_also_a_builtin_type_error_and_value_error(make_pair):
    tx, _ = make_pair()
    with pytest.raises(TypeError):
        tx.push("text")
    with pytest.raises(ValueError):
        tx.push("text")


def test_pop_batch_of_an_enormous_count_returns_what_is_there(make_pair):
    tx, rx = make_pair()
    assert len(rx.pop_batch(2**40, timeout=0)) == 0  # no MemoryError
    tx.push_batch([b"a", b"b", b"c"])
    with rx.pop_batch(2**40, timeout=5) as b:
        assert b.tolist() == [b"a", b"b", b"c"]


@pytest.mark.parametrize("n", [3, 12])
def test_commit_len_on_a_dtype_queue_must_be_whole_elements(make_pair, n):
    tx, rx = make_pair(dtype="float64")
    with pytest.raises(E.DtypeMismatch, match="multiple of 8"), tx.reserve(16) as buf:
        buf[:] = 1.5
        tx.commit_len(n)
    with tx.reserve(16) as buf:  # nothing was published; the next reservation works
        buf[:] = 2.5
        tx.commit_len(8)
    got = rx.pop(timeout=5)
    np.testing.assert_array_equal(np.asarray(got), [2.5])
    assert rx.try_pop() is None


# -- dtype text read from shared memory --------------------------------------------------------------------


BAD_DTYPE_TEXTS = [b"|O", b"O", b"V0", b"|V0", b"foo", b"[('a', '|O')]", b"[" * 60, b"\xff\xfe", b"[('a',"]


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize("text", BAD_DTYPE_TEXTS, ids=[t[:12].decode("latin-1") for t in BAD_DTYPE_TEXTS])
def test_a_dtype_rewritten_in_the_ring_header_is_refused_at_attach(fabric, mapped, text):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=5, dtype="float64")
    loc = q.locator()
    hdr = q._hdr  # white box: forge the dtype text, as any writer of the segment can
    ffi.memmove(hdr.dtype, text, len(text))
    hdr.dtype_len = len(text)
    with pytest.raises(E.Corrupted, match="dtype"):
        gf.FabricQueue.attach(fabric, loc, mapped=mapped)


# -- reserved views pin the mapping -------------------------------------------------------------------------


_PIN_SCRIPT = textwrap.dedent(
    """
    import gc, sys
    import numpy as np
    import grafos_fabric as gf
    from grafos_fabric.queue import OneSidedQueue
    fabric = gf.open_fabric(sys.argv[1])
    cls = gf.FabricQueue if sys.argv[2] == "mapped" else OneSidedQueue
    q = cls.create(fabric, capacity=1 << 16, ttl=30)
    with q.reserve(4096) as buf:
        buf[:] = 7
    kept = buf
    other = gf.FabricQueue.attach(fabric, q.locator())
    other.close()
    del q, other, buf
    gc.collect()
    kept[:] = 9  # write and read the kept view after the queue is gone
    assert int(kept.sum()) == 9 * 4096
    print("ok")
    """
)


@pytest.mark.parametrize("mode", ["mapped", "onesided"])
def test_a_reserved_view_kept_after_the_queue_is_gone_stays_usable(fabric, mode):
    proc = subprocess.run(
        [sys.executable, "-c", _PIN_SCRIPT, fabric.url, mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok"


def test_a_reserved_view_pins_the_queue_in_process(fabric):
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=30)
    with q.reserve(64) as buf:
        buf[:] = 3
    import weakref

    alive = weakref.ref(q)
    del q
    gc.collect()
    assert alive() is not None  # the view keeps its queue (and so the mapping)
    assert int(buf.sum()) == 3 * 64
    del buf
    gc.collect()
    assert alive() is None
