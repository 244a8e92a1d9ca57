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
    from grafos_fabric.queue._layout import _POLL_SLICE_NS, _WAIT_SLICE_NS

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


# -- trust: shared positions and header words are untrusted input (issue 9) --------------

MAX_ITEM = int(ffi.offsetof("gf_ring_header", "max_item"))
CAPACITY = int(ffi.offsetof("gf_ring_header", "capacity"))
EPOCH = int(ffi.offsetof("gf_ring_header", "epoch"))

# One child per case: before the fix, a misaligned position made the mapped
# producer write a padding header past the mapping (SIGSEGV), so a failure
# here must show as the child's signal, not take the test run down with it.
_MISALIGNED_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import grafos_fabric as gf
    from grafos_fabric._ffi import ffi
    TAIL = int(ffi.offsetof("gf_ring_header", "tail"))
    HEAD = int(ffi.offsetof("gf_ring_header", "head"))
    ns, access, role, when, ring_offset = sys.argv[1:6]
    fabric = gf.open_fabric("shm://" + ns)
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    try:
        view = q.region.view()
        handle = gf.FabricQueue.attach(fabric, q.locator(), mapped=access == "mapped")
        other = gf.FabricQueue.attach(fabric, q.locator())
        if when == "after_init":  # the role is claimed and has run once before the corruption
            if role == "producer":
                handle.push(b"y")
                other.pop(timeout=5).release()
            else:
                other.push(b"y")
                handle.pop(timeout=5).release()
        pos = 3 * 4096 + int(ring_offset)  # e.g. 4 bytes before the end of the ring
        tail = pos + (64 if role == "consumer" else 0)  # the consumer sees something to read
        view[HEAD:HEAD + 8] = pos.to_bytes(8, "little")
        view[TAIL:TAIL + 8] = tail.to_bytes(8, "little")
        before = bytes(view)
        try:
            if role == "producer":
                for _ in range(300):
                    handle.try_push(b"x" * 200)
            else:
                handle.try_pop()
            print("no error")
        except Exception as exc:
            print("raised", type(exc).__module__, type(exc).__name__, exc)
        print("unchanged" if bytes(view) == before else "written")
    finally:
        q.free()
    """
)


@pytest.mark.parametrize("ring_offset", [4096 - 4, 8, 4096 - 12])
@pytest.mark.parametrize("when", ["at_role_init", "after_init"])
@pytest.mark.parametrize("role", ["producer", "consumer"])
@pytest.mark.parametrize("access", ["mapped", "onesided"])
def test_misaligned_head_and_tail_give_corrupted_and_touch_nothing(namespace, access, role, when, ring_offset):
    out = subprocess.run(
        [sys.executable, "-c", _MISALIGNED_CHILD, namespace, access, role, when, str(ring_offset)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stdout}{out.stderr}"
    lines = out.stdout.splitlines()
    assert lines[0].startswith("raised grafos_fabric.errors Corrupted"), out.stdout + out.stderr
    assert lines[1] == "unchanged", "a push/pop on corrupt positions wrote to the ring"


def test_an_old_layout_version_1_segment_is_refused_with_version_mismatch(fabric):
    assert lib.GF_RING_LAYOUT_VERSION >= 2  # 2 moved the waiter counts to 8-byte aligned u64 words
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    q.region.view()[VERSION : VERSION + 4] = (1).to_bytes(4, "little")
    with pytest.raises(E.VersionMismatch):
        gf.FabricQueue.attach(fabric, q.locator())
    with pytest.raises(E.VersionMismatch):
        gf.FabricQueue.attach(fabric, q.locator(), mapped=False)


def _u64_fields(ctype: str) -> dict[str, int]:
    return {
        name: int(field.offset)
        for name, field in ffi.typeof(ctype).fields
        if field.type is ffi.typeof("uint64_t")
    }


def test_every_64_bit_word_of_the_shared_headers_is_8_byte_aligned():
    ring = _u64_fields("gf_ring_header")
    # the waiter counts are touched with 64-bit atomics (one-sided faa64, the mapped
    # queue's 64-bit load): they must be u64 words of their own
    assert {"tail", "head", "acked", "epoch", "data_waiters", "space_waiters", "space_want"} <= set(ring)
    assert {n: o for n, o in ring.items() if o % 8} == {}
    seg = _u64_fields("gf_segment_header")
    assert {"lease_state", "deadline_ns", "magic"} <= set(seg)
    assert {n: o for n, o in seg.items() if o % 8} == {}
    from grafos_fabric.queue import _layout as queue
    from grafos_fabric.queue import _onesided_handle as onesided

    python_words = [
        queue._SPACE_WAITERS_OFF,
        queue._ACKED_OFF,
        queue._TAIL_OFF,
        queue._EPOCH_OFF,
        queue._SEAL_SEQ_OFF,
        queue._ONESIDED_OFF,
        onesided._SPACE_WAITERS,
        onesided._VERSION_WORD,
        onesided._HEAD,
        onesided._NEXT_SEQ,
    ]
    assert [o for o in python_words if o % 8] == []


@pytest.mark.parametrize("access", ["mapped", "onesided"])
def test_a_sequence_number_that_goes_backwards_is_corrupted_on_either_path(fabric, access):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30, first_seq=100)
    rx = gf.FabricQueue.attach(fabric, q.locator(), mapped=access == "mapped")
    q.push_batch(np.ones((4, 8), dtype=np.uint8))
    rs = int(lib.gf_record_size(8))
    seq_off = int(ffi.offsetof("gf_record_header", "seq"))
    view = q.region.view()
    view[DATA + 2 * rs + seq_off : DATA + 2 * rs + seq_off + 8] = (5).to_bytes(8, "little")
    good = rx.pop_batch(10, timeout=0)  # the good records before it go out...
    assert list(good.seqs) == [100, 101]
    with pytest.raises(E.Corrupted):
        rx.pop_batch(10, timeout=0)  # ...and the next call reports the bad one


@pytest.mark.parametrize("access", ["mapped", "onesided"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("capacity", 1 << 20),  # larger than the region that is mapped
        ("capacity", 4096 + 16),  # not a power of two
        ("max_item", (1 << 64) - 8),  # record size would wrap around to 16
        ("max_item", 4096),  # more than half the ring
        ("max_item", 0),
    ],
)
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_geometry_rewritten_after_attach_is_refused_when_a_role_starts(fabric, access, field, value, role):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    handle = gf.FabricQueue.attach(fabric, q.locator(), mapped=access == "mapped")
    off = CAPACITY if field == "capacity" else MAX_ITEM
    if access == "onesided" and role == "consumer":
        q.push(b"z")  # the mapped producer's role starts before the rewrite
    before = bytes(q.region.view()[DATA:])
    q.region.view()[off : off + 8] = value.to_bytes(8, "little")
    if access == "onesided":
        # the one-sided handle read and validated the geometry once, at attach, into a
        # local copy it keeps using: the rewrite changes nothing it relies on
        if role == "producer":
            handle.push(b"z" * 100)
        else:
            assert handle.pop(timeout=5).tobytes() == b"z"
        return
    with pytest.raises(E.Corrupted):
        if role == "producer":
            handle.push(b"z" * 100, timeout=1)
        else:
            handle.pop(timeout=1)
    assert bytes(q.region.view()[DATA:]) == before


def test_the_same_attach_time_checks_refuse_a_huge_max_item(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    q.region.view()[MAX_ITEM : MAX_ITEM + 8] = ((1 << 64) - 8).to_bytes(8, "little")
    with pytest.raises(E.Corrupted):
        gf.FabricQueue.attach(fabric, q.locator())
    with pytest.raises(E.Corrupted):
        gf.FabricQueue.attach(fabric, q.locator(), mapped=False)


@pytest.mark.parametrize("access", ["mapped", "onesided"])
def test_a_tail_moved_under_a_live_producer_with_its_epoch_in_place_is_corrupted_not_fenced(fabric, access):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    tx = gf.FabricQueue.attach(fabric, q.locator(), mapped=access == "mapped")
    tx.push(b"a")
    view = q.region.view()
    view[TAIL : TAIL + 8] = (1024).to_bytes(8, "little")  # aligned, same epoch tag, not ours
    with pytest.raises(E.Corrupted):
        tx.push(b"b")
    # a real fence (the epoch moved on) is still reported as one
    view[TAIL : TAIL + 8] = (16).to_bytes(8, "little")
    q.advance_epoch(5)
    with pytest.raises(E.StaleEpoch):
        tx.push(b"c")


@pytest.mark.parametrize("access", ["mapped", "onesided"])
def test_a_head_that_moves_backwards_under_the_producer_is_corrupted(fabric, access):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30, max_item=1000)
    tx = gf.FabricQueue.attach(fabric, q.locator(), mapped=access == "mapped")
    rx = gf.FabricQueue.attach(fabric, q.locator())
    for _ in range(3):
        tx.push(b"p" * 1000)
    for _ in range(3):
        rx.pop(timeout=5).release()
    while tx.try_push(b"q" * 1000):  # until full: the producer's head cache is refreshed
        pass
    q.region.view()[HEAD : HEAD + 8] = (0).to_bytes(8, "little")  # before the head it saw: impossible
    with pytest.raises(E.Corrupted):
        tx.try_push(b"q" * 1000)


def test_one_sided_cas_loops_give_up_on_a_word_that_never_stops_changing(fabric, monkeypatch):
    from grafos_fabric.queue import _onesided_handle as onesided

    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    rx = gf.FabricQueue.attach(fabric, q.locator(), mapped=False)
    real = rx.region.cas64

    def hostile_cas64(offset: int, expected: int, desired: int) -> int:
        real(offset, expected, expected + 16)  # someone else always got there first
        return expected + 16

    monkeypatch.setattr(onesided, "_CAS_TRIES", 50)
    monkeypatch.setattr(rx.region, "cas64", hostile_cas64)
    with pytest.raises(E.Corrupted, match="kept changing"):
        rx.seal()
    with pytest.raises(E.Corrupted, match="kept changing"):
        rx.set_acked(1 << 60)


@pytest.mark.parametrize("access", ["mapped", "onesided"])
@pytest.mark.parametrize("next_seq", [(1 << 64) - 1, (1 << 64) - 2])
def test_a_next_sequence_number_at_the_end_of_u64_gives_typed_errors_only(fabric, access, next_seq):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    off = int(ffi.offsetof("gf_ring_header", "next_seq"))
    q.region.view()[off : off + 8] = next_seq.to_bytes(8, "little")
    tx = gf.FabricQueue.attach(fabric, q.locator(), mapped=access == "mapped")
    rx = gf.FabricQueue.attach(fabric, q.locator())
    # both paths: refused when the role starts (the core's GF_SEQ_LIMIT); before, one-sided got
    # OverflowError from a u64 store and mapped wrapped, so the consumer saw the sequence go backwards
    with pytest.raises(E.Corrupted):
        for _ in range(3):
            tx.push(b"abc", timeout=1)
            rx.pop(timeout=1).release()


# -- reserve_batch (gf_reserve_rows / gf_commit_rows) under hostile words ---------------------


def test_reserve_batch_near_the_wrap_pads_and_keeps_its_rows_inside_the_ring(fabric):
    position = 3 * 4096 + 4096 - 48  # 48 bytes before the end: the first row needs a padding record
    tx, rx, view = _queue_at(fabric, position)
    rs = int(lib.gf_record_size(40))
    with tx.reserve_batch(100, 40) as rows:
        assert rows.shape == ((4096 - 48) // rs, 40)  # the padding takes room too
        lo = tx.region.address() + DATA
        assert rows.ctypes.data == lo + 16  # the first row starts the ring, after its header
        assert rows.ctypes.data + (len(rows) - 1) * rs + 40 <= lo + 4096
        rows[:] = np.arange(len(rows), dtype=np.uint8)[:, None]
    rec = view[DATA + 4096 - 48 : DATA + 4096 - 40]
    assert int.from_bytes(rec[4:8], "little") == lib.GF_RECORD_PADDING
    got = rx.pop_batch(1000, timeout=5)
    assert got.array()[:, 0].tolist() == list(range((4096 - 48) // rs))


def test_reserve_batch_with_a_head_moved_backwards_is_corrupted(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30, max_item=1000)
    tx = gf.FabricQueue.attach(fabric, q.locator())
    rx = gf.FabricQueue.attach(fabric, q.locator())
    for _ in range(3):
        tx.push(b"p" * 1000)
    for _ in range(3):
        rx.pop(timeout=5).release()
    while tx.try_push(b"q" * 1000):  # until full: the producer's head cache is refreshed
        pass
    q.region.view()[HEAD : HEAD + 8] = (0).to_bytes(8, "little")  # before the head it saw: impossible
    with pytest.raises(E.Corrupted):
        with tx.reserve_batch(4, 1000, timeout=0.5):
            pass


def test_reserve_batch_of_a_fenced_producer_is_stale_and_a_moved_tail_corrupted(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    tx = gf.FabricQueue.attach(fabric, q.locator())
    tx.push(b"a")
    view = q.region.view()
    view[TAIL : TAIL + 8] = (1024).to_bytes(8, "little")  # aligned, same epoch tag, not ours
    with pytest.raises(E.Corrupted):
        with tx.reserve_batch(2, 8):
            pass
    view[TAIL : TAIL + 8] = (16).to_bytes(8, "little")
    q.advance_epoch(5)
    with pytest.raises(E.StaleEpoch):
        with tx.reserve_batch(2, 8):
            pass


def test_commit_rows_publishes_nothing_if_the_epoch_moved_during_the_block(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    tx = gf.FabricQueue.attach(fabric, q.locator())
    rx = gf.FabricQueue.attach(fabric, q.locator())
    with pytest.raises(E.StaleEpoch):
        with tx.reserve_batch(4, 8) as rows:
            rows[:] = 1
            q.advance_epoch(3)  # fenced while the rows are being written
    assert rx.try_pop() is None


def test_the_native_rows_calls_refuse_misuse_with_status_codes(fabric):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=30)
    q.push(b"x")  # claims the producer role
    p = q._prod
    out = ffi.new("uint64_t[2]")
    assert lib.gf_commit_rows(p, 1, out) == lib.GF_E_ARG  # nothing reserved
    assert lib.gf_reserve_rows(p, 0, 8, 0, out, out + 1) == lib.GF_E_ARG
    assert lib.gf_reserve_rows(p, 4, 0, 0, out, out + 1) == lib.GF_E_ARG
    assert lib.gf_reserve_rows(p, 4, 1 << 40, 0, out, out + 1) == lib.GF_E_TOO_LARGE
    assert lib.gf_reserve_rows(p, 4, 8, 0, out, out + 1) == lib.GF_OK and out[1] == 4
    assert lib.gf_reserve_rows(p, 4, 8, 0, out, out + 1) == lib.GF_E_CLAIMED
    assert lib.gf_commit(p, 8, out) == lib.GF_E_ARG  # rows commit with gf_commit_rows only
    assert lib.gf_commit_rows(p, 5, out) == lib.GF_E_ARG  # more than reserved
    assert lib.gf_commit_rows(p, 0, out) == lib.GF_E_ARG
    assert lib.gf_commit_rows(p, 2, out) == lib.GF_OK and out[0] == 1
    assert q.push(b"y") == 3  # the two dropped rows took no sequence numbers
