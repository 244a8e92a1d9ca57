"""White-box ring tests: positions poked into the header to reach the wrap
cases directly, layout versions, and the native build's ABI check."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi, lib

TAIL = int(ffi.offsetof("gf_ring_header", "tail"))
HEAD = int(ffi.offsetof("gf_ring_header", "head"))
VERSION = int(ffi.offsetof("gf_ring_header", "version"))
DATA = int(lib.GF_RING_HEADER_SIZE)


def _queue_at(fabric, position: int, capacity: int = 4096):
    """A fresh queue whose head and tail both sit at ``position`` (never-used ring)."""
    q = gf.FabricQueue.create(fabric, capacity=capacity, ttl=30)
    view = q.region.view()
    view[TAIL : TAIL + 8] = position.to_bytes(8, "little")  # epoch tag 0, not sealed
    view[HEAD : HEAD + 8] = position.to_bytes(8, "little")
    loc = q.locator()
    return gf.FabricQueue.attach(fabric, loc), gf.FabricQueue.attach(fabric, loc), view


@pytest.mark.parametrize("gap", [16, 32, 48, 64, 4096 - 16])
def test_a_record_that_would_straddle_the_wrap_gets_a_padding_record(fabric, gap):
    position = 10 * 4096 + (4096 - gap)  # `gap` bytes before the end of the ring
    tx, rx, view = _queue_at(fabric, position)
    payload = bytes(range(100))  # a 128-byte record: straddles unless the gap is large
    assert tx.push(payload) == 0
    if gap < 128:
        rec = view[DATA + 4096 - gap : DATA + 4096 - gap + 8]
        assert int.from_bytes(rec[4:8], "little") == lib.GF_RECORD_PADDING
        assert int.from_bytes(rec[0:4], "little") == gap - 16
        assert bytes(view[DATA + 16 : DATA + 116]) == payload  # the record starts at index 0
    item = rx.pop(timeout=1)
    assert item.tobytes() == payload
    assert np.asarray(item).ctypes.data == rx.region.address() + DATA + (16 if gap < 128 else 4096 - gap + 16)


def test_many_laps_past_a_high_starting_position_stay_consistent(fabric):
    start = (1 << 40) - 4096 + 8 * 16  # positions are 64-bit counters that only grow
    tx, rx, _ = _queue_at(fabric, start)
    rng = np.random.default_rng(7)
    sent = []
    for _ in range(2000):
        n = int(rng.integers(1, 600))
        payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        while not tx.try_push(payload):
            with rx.pop(timeout=1) as item:
                assert item.tobytes() == sent.pop(0)
        sent.append(payload)
    while sent:
        with rx.pop(timeout=1) as item:
            assert item.tobytes() == sent.pop(0)
    assert tx.stats()["tail"] > start + 2000 * 16


def test_batches_starting_just_before_the_wrap_are_contiguous(fabric):
    tx, rx, _ = _queue_at(fabric, 7 * 4096 + 4096 - 3 * 80)  # room for three 80-byte records
    rows = np.arange(6 * 64, dtype=np.uint8).reshape(6, 64)
    assert tx.push_batch(rows) == 6
    first = rx.pop_batch(10, timeout=1)
    second = rx.pop_batch(10, timeout=1)
    assert len(first) == 3 and len(second) == 3
    np.testing.assert_array_equal(first.array(), rows[:3])
    np.testing.assert_array_equal(second.array(), rows[3:])


def test_a_ring_of_another_layout_version_is_refused(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    q.region.view()[VERSION : VERSION + 4] = (7).to_bytes(4, "little")
    with pytest.raises(E.VersionMismatch):
        gf.FabricQueue.attach(fabric, q.locator())
    q.region.view()[VERSION : VERSION + 4] = (0).to_bytes(4, "little")
    with pytest.raises(E.NotReady):
        gf.FabricQueue.attach(fabric, q.locator())


def test_a_stale_native_build_is_refused_at_import_with_a_clear_message():
    code = textwrap.dedent(
        """
        import sys, types
        import grafos_fabric._native as real
        class Lib:
            def __getattr__(self, name):
                return getattr(real.lib, name)
            def gf_native_abi(self):
                return 999
        fake = types.ModuleType("grafos_fabric._native")
        fake.ffi = real.ffi
        fake.lib = Lib()
        for mod in [m for m in sys.modules if m.startswith("grafos_fabric")]:
            del sys.modules[mod]
        sys.modules["grafos_fabric._native"] = fake
        try:
            import grafos_fabric._ffi
        except ImportError as exc:
            print("refused:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "refused: stale grafos_fabric native build (ABI 999" in out.stdout, out.stdout + out.stderr
    assert "pip install -e ." in out.stdout


def test_a_one_sided_peer_is_counted_so_mapped_waiters_poll_in_short_slices(fabric):
    from grafos_fabric.queue import _POLL_SLICE_NS, _WAIT_SLICE_NS

    peers = int(ffi.offsetof("gf_ring_header", "onesided_peers"))
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    assert q._slice(None) == _WAIT_SLICE_NS
    peer = gf.FabricQueue.attach(fabric, q.locator(), mapped=False)
    assert peer.try_pop() is None  # claims the consumer role one-sided
    assert q.region.load64(peers) == 1
    assert q._slice(None) == _POLL_SLICE_NS
    q.push(b"x")
    assert peer.pop(timeout=1).tobytes() == b"x"
    peer.close()
    peer.close()
    assert q.region.load64(peers) == 0
    assert q._slice(None) == _WAIT_SLICE_NS
