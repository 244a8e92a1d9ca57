"""The ring core (native/gf_ring_core.h): the protocol's decisions in one place.

Both access paths call the same pure functions: the mapped path from C
(gf_native.c), the one-sided path through cffi (``lib.gf_ring_*``). These
tests drive the core directly on local images, with no region at all, and
check that the decisions stay in one place (no copy of them in Python, one
prototype header for C and cffi, no import cycle between the queue modules).
"""

from __future__ import annotations

import ast
import pathlib
import re

import numpy as np
import pytest

from grafos_fabric._ffi import ffi, lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
PKG = ROOT / "grafos_fabric"
CAP = 4096
MAX_ITEM = 1024
NO_PAD = (1 << 64) - 1


def _producer(epoch: int = 0, tail: int = 0, head: int = 0, next_seq: int = 0) -> object:
    p = ffi.new("gf_producer *")
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, epoch, lib.gf_ring_tag(epoch) | tail, head, next_seq) == lib.GF_OK
    return p


def _frame(p: object, image: np.ndarray, payloads: list[bytes]) -> tuple[int, int, int]:
    """Frame payloads into ``image``; (rc, how many, padding index or NO_PAD)."""
    blob = b"".join(payloads)
    lens = np.array([len(b) for b in payloads], dtype=np.uint64)
    io = ffi.new("uint64_t[3]", [0, 0, NO_PAD])
    rc = lib.gf_ring_frame(
        p, ffi.from_buffer("uint8_t[]", image), blob, ffi.from_buffer("uint64_t[]", lens), len(payloads), 0, 0, io
    )
    return rc, int(io[0]), int(io[2])


def _take(c: object, image: np.ndarray, avail: int, max_items: int = 64) -> tuple[int, list[tuple[int, int, int]], int]:
    """Parse from ``image``: (rc, [(payload index, length, seq)], needed position on GF_READ)."""
    offs, lens, seqs = (np.zeros(max_items, dtype=np.uint64) for _ in range(3))
    io = ffi.new("uint64_t[2]")
    need = ffi.new("uint64_t *")
    rc = lib.gf_ring_take(
        c,
        ffi.from_buffer("uint8_t[]", image),
        avail,
        max_items,
        *(ffi.from_buffer("uint64_t[]", a) for a in (offs, lens, seqs)),
        io,
        io + 1,
        need,
    )
    n = int(io[0])
    return rc, [(int(offs[i]), int(lens[i]), int(seqs[i])) for i in range(n)], int(need[0])


_KEEP: list[object] = []  # the consumers' token arrays, alive as long as the tests run


def _consumer(head: int, tail_word: int, pend_cap: int = 8) -> tuple[int, object]:
    c = ffi.new("gf_consumer *")
    ends, done = ffi.new("uint64_t[]", pend_cap), ffi.new("uint8_t[]", pend_cap)
    _KEEP.extend((ends, done))
    return lib.gf_ring_cons_start(c, CAP, MAX_ITEM, head, tail_word, ends, done, pend_cap), c


def _published_consumer(p: object, head: int = 0) -> object:
    """A consumer whose tail cache is what ``p`` would publish."""
    assert lib.gf_ring_published(p, lib.gf_ring_publish_expected(p)) == lib.GF_OK
    rc, c = _consumer(head, lib.gf_ring_tag(0) | head)
    assert rc == lib.GF_OK
    assert lib.gf_ring_set_tail(c, lib.gf_ring_publish_expected(p)) == lib.GF_OK
    return c


# -- decisions, driven directly ---------------------------------------------------------------


def test_a_producer_start_refuses_a_sealed_fenced_or_impossible_ring():
    p = ffi.new("gf_producer *")
    tag = lib.gf_ring_tag(3)
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 3, tag | lib.GF_TAIL_SEALED, 0, 0) == lib.GF_E_SEALED
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 3, lib.gf_ring_tag(4), 0, 0) == lib.GF_E_FENCED
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 3, tag | 8, 0, 0) == lib.GF_E_CORRUPT  # misaligned tail
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 3, tag | 64, 128, 0) == lib.GF_E_CORRUPT  # head past tail
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 3, tag | 2 * CAP, 0, 0) == lib.GF_E_CORRUPT  # over a ring
    assert lib.gf_ring_prod_start(p, 3000, MAX_ITEM, 3, tag, 0, 0) == lib.GF_E_CORRUPT  # not a power of two
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 3, tag | 64, 32, 7) == lib.GF_OK
    assert (p.tail, p.claim, p.head_cache, p.next_seq, p.tag) == (64, 64, 32, 7, tag)


def test_the_core_says_why_a_tail_word_is_not_the_producers():
    p = _producer(epoch=2, tail=64)
    assert lib.gf_ring_owns(p, lib.gf_ring_tag(2) | 64) == lib.GF_OK
    moved = lib.gf_ring_tag(2) | 128
    assert lib.gf_ring_owns(p, moved) == lib.GF_LOST
    assert lib.gf_ring_lost_tail(p, moved | lib.GF_TAIL_SEALED, 2) == lib.GF_E_SEALED
    assert lib.gf_ring_lost_tail(p, lib.gf_ring_tag(3) | 64, 3) == lib.GF_E_FENCED
    assert lib.gf_ring_lost_tail(p, lib.gf_ring_tag(2) | 64, 3) == lib.GF_E_FENCED  # the epoch word moved on
    assert lib.gf_ring_lost_tail(p, moved, 2) == lib.GF_E_CORRUPT  # our epoch, not our position


def test_a_head_that_moves_backwards_or_past_the_tail_is_refused():
    p = _producer(tail=256, head=64)
    for bad in (32, 72, 512):  # backwards, misaligned, past the tail
        assert lib.gf_ring_set_head(p, bad) == lib.GF_E_CORRUPT
        assert p.head_cache == 64
    assert lib.gf_ring_set_head(p, 128) == lib.GF_OK and p.head_cache == 128


def test_framed_records_parse_back_with_their_sequence_numbers():
    image = np.zeros(CAP, dtype=np.uint8)
    p = _producer(next_seq=10)
    payloads = [bytes([i]) * (1 + 7 * i) for i in range(20)]
    assert _frame(p, image, payloads) == (lib.GF_OK, 20, NO_PAD)
    c = _published_consumer(p)
    rc, got, _ = _take(c, image, avail=p.tail)
    assert rc == lib.GF_TAIL  # everything published was taken: load the tail next
    assert [(n, s) for _, n, s in got] == [(len(b), 10 + i) for i, b in enumerate(payloads)]
    assert [image[o : o + n].tobytes() for o, n, _ in got] == payloads
    assert c.rpos == p.tail and c.last_seq == 29


def test_a_record_that_would_straddle_the_wrap_gets_a_padding_record_and_a_batch_stops_there():
    image = np.zeros(CAP, dtype=np.uint8)
    p = _producer(tail=3840, head=3840)  # 256 bytes before the end of the ring
    rc, n, pad = _frame(p, image, [b"a" * 200, b"b" * 100])  # 224 bytes, then 128 do not fit before the end
    assert (rc, n, pad) == (lib.GF_OK, 2, 3840 + 224)
    assert p.claim == CAP + 128  # the padding took the 32 bytes up to the end
    c = _published_consumer(p, head=3840)
    rc, got, _ = _take(c, image, avail=p.tail)
    assert rc == lib.GF_PADDING and [n for _, n, _ in got] == [200]
    rc, got, _ = _take(c, image, avail=p.tail)
    assert [(o, n) for o, n, _ in got] == [(16, 100)]  # the next batch starts at index 0


def test_the_frame_stops_where_the_head_cache_says_the_ring_is_full():
    image = np.zeros(CAP, dtype=np.uint8)
    p = _producer()
    rc, n, _ = _frame(p, image, [b"x" * 1000] * 5)  # 1024-byte records: four fit
    assert (rc, n) == (lib.GF_FULL, 4)
    assert lib.gf_ring_room(p, lib.gf_ring_need(p, 1000)) == 0


def test_the_parser_asks_for_the_bytes_it_lacks_instead_of_reading_past_them():
    image = np.zeros(CAP, dtype=np.uint8)
    p = _producer()
    _frame(p, image, [b"y" * 100, b"z" * 100])
    c = _published_consumer(p)
    assert _take(c, image, avail=0)[0::2] == (lib.GF_READ, 16)  # the first header
    assert _take(c, image, avail=16)[0::2] == (lib.GF_READ, 128)  # the first record, whole
    rc, got, need = _take(c, image, avail=128)
    assert (rc, len(got), need) == (lib.GF_READ, 1, 144)


@pytest.mark.parametrize(
    ("field", "value"),
    [("length", 0), ("length", MAX_ITEM + 1), ("type", 7), ("length", 3000)],
)
def test_a_bad_record_header_is_corrupt_for_the_core(field, value):
    image = np.zeros(CAP, dtype=np.uint8)
    p = _producer()
    _frame(p, image, [b"q" * 64])
    off = int(ffi.offsetof("gf_record_header", field))
    image[off : off + 4].view(np.uint32)[0] = value
    c = _published_consumer(p)
    assert _take(c, image, avail=p.tail)[0] == lib.GF_E_CORRUPT


def test_a_tail_behind_the_reader_or_over_a_ring_ahead_is_corrupt():
    rc, c = _consumer(256, 256)
    assert rc == lib.GF_OK
    assert lib.gf_ring_set_tail(c, 128) == lib.GF_E_CORRUPT
    assert lib.gf_ring_set_tail(c, 256 + 2 * CAP) == lib.GF_E_CORRUPT
    assert lib.gf_ring_set_tail(c, 264) == lib.GF_E_CORRUPT
    assert lib.gf_ring_set_tail(c, 256) == lib.GF_EMPTY
    assert lib.gf_ring_set_tail(c, 256 | lib.GF_TAIL_SEALED) == lib.GF_END


def test_head_moves_past_a_release_token_only_once_every_older_one_is_released():
    rc, c = _consumer(0, 0, pend_cap=4)
    assert rc == lib.GF_OK
    token = ffi.new("uint64_t *")
    tokens = []
    for end in (64, 128, 192, 256):
        assert lib.gf_ring_pend_push(c, end, token) == lib.GF_OK
        tokens.append(int(token[0]))
    assert lib.gf_ring_pend_push(c, 320, token) == lib.GF_E_HELD  # every token is out
    assert lib.gf_ring_release(c, tokens[1]) == 0 and c.head == 0  # an older one is still out
    assert lib.gf_ring_release(c, tokens[0]) == 1 and c.head == 128  # both free their space
    assert lib.gf_ring_release(c, tokens[0]) == lib.GF_E_ARG  # not outstanding any more
    assert lib.gf_ring_release(c, 99) == lib.GF_E_ARG
    assert lib.gf_ring_release(c, tokens[3]) == 0 and lib.gf_ring_release(c, tokens[2]) == 1
    assert c.head == 256 and c.pend_first == c.pend_next == 4


def test_reserve_and_commit_in_an_image_rewrite_the_length_and_keep_the_sequence():
    image = np.zeros(CAP, dtype=np.uint8)
    p = _producer(next_seq=5)
    io = ffi.new("uint64_t[3]", [0, 0, NO_PAD])
    img = ffi.from_buffer("uint8_t[]", image)
    assert lib.gf_ring_reserve_in(p, img, 500, io, io + 2) == lib.GF_OK
    assert int(io[0]) == 16 and p.reserved
    assert lib.gf_ring_frame(p, img, b"x", ffi.NULL, 1, 1, 1, io) == lib.GF_E_ARG  # not while reserved
    seq = ffi.new("uint64_t *")
    assert lib.gf_ring_commit_in(p, img, 501, seq) == lib.GF_E_ARG  # more than was reserved
    assert lib.gf_ring_commit_in(p, img, 40, seq) == lib.GF_OK
    assert seq[0] == 5 and p.claim == lib.gf_record_size(40) and not p.reserved
    assert image[:4].view(np.uint32)[0] == 40


# -- one place ------------------------------------------------------------------------------


def test_the_cffi_declarations_take_every_prototype_from_the_header_the_c_code_includes():
    api = (NATIVE / "gf_native_api.h").read_text()
    assert not [line for line in api.splitlines() if line.lstrip().startswith("#")]  # cdef takes it as it is
    assert '#include "gf_native_api.h"' in (NATIVE / "gf_native.h").read_text()
    cdef = re.sub(r"/\*.*?\*/", "", (NATIVE / "gf_cdef.h").read_text(), flags=re.S)
    assert not re.findall(r"\bgf_(?!msgpack)\w+\s*\(", cdef)  # no second copy of a prototype
    names = re.findall(r"\b(gf_\w+)\s*\(", re.sub(r"/\*.*?\*/", "", api, flags=re.S))
    assert len(names) > 40
    assert [n for n in names if not hasattr(lib, n)] == []


def _names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
    }


ONE_SIDED = sorted((PKG / "queue").glob("_onesided*.py"))
MAPPED = sorted(set((PKG / "queue").glob("*.py")) - set(ONE_SIDED))


def test_the_one_sided_module_leaves_record_framing_and_parsing_to_the_core():
    assert len(ONE_SIDED) >= 3
    used = set().union(*(_names(path) for path in ONE_SIDED))
    # the record types, the tag layout and the alignment arithmetic are the core's business
    assert used.isdisjoint({"GF_RECORD_PADDING", "GF_RECORD_DATA", "GF_TAIL_TAG_SHIFT", "_MISALIGNED"})
    assert {"gf_ring_frame", "gf_ring_take", "gf_ring_owns", "gf_ring_published"} <= used


def test_queue_never_imports_the_one_sided_module_back():
    imported = set()
    for node in (n for path in MAPPED if path.name != "__init__.py" for n in ast.walk(ast.parse(path.read_text()))):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [m for m in imported if "onesided" in m]
    import grafos_fabric as gf
    from grafos_fabric import queue
    from grafos_fabric.queue import OneSidedQueue
    from grafos_fabric.queue._handle import _one_sided

    assert _one_sided() is OneSidedQueue and gf.FabricQueue is queue.FabricQueue


# -- roles, seal, epoch, acked: the CAS loops' decisions ----------------------------------------

LOCKED = lib.GF_ROLE_LOCKED
HOLDER = 0x1234_0000_0001


@pytest.mark.parametrize(
    ("epoch", "now", "holder", "lock", "verdict"),
    [
        (1, 2, 0, lib.GF_LOCK_NONE, lib.GF_E_FENCED),  # older than the queue
        (1, 2, 0, lib.GF_LOCK_HELD, lib.GF_E_FENCED),
        (2, 2, 0, lib.GF_LOCK_NONE, lib.GF_CLAIM_CAS),  # same epoch: CAS the id in
        (2, 2, HOLDER, lib.GF_LOCK_NONE, lib.GF_CLAIM_CAS),  # (the CAS finds the holder: gf_ring_claimed)
        (2, 2, HOLDER, lib.GF_LOCK_BUSY, lib.GF_E_ROLE),  # a live holder has the lock
        (3, 2, 0, lib.GF_LOCK_NONE, lib.GF_CLAIM_TAKEOVER),  # newer, nobody holds it
        (3, 2, 0, lib.GF_LOCK_BUSY, lib.GF_E_ROLE),
        (3, 2, HOLDER, lib.GF_LOCK_NONE, lib.GF_CLAIM_SEAL),  # newer, a holder whose death can't be proven
        (3, 2, HOLDER | LOCKED, lib.GF_LOCK_BUSY, lib.GF_CLAIM_SEAL),  # ... alive: it has its lock
        (3, 2, HOLDER, lib.GF_LOCK_HELD, lib.GF_CLAIM_SEAL),  # a one-sided holder (no marker) can't be judged
        (3, 2, HOLDER | LOCKED, lib.GF_LOCK_HELD, lib.GF_CLAIM_TAKEOVER),  # its lock is ours: it is gone
    ],
)
def test_the_claim_verdict_fences_seals_refuses_or_says_how_to_take_the_role(epoch, now, holder, lock, verdict):
    assert lib.gf_ring_claim_verdict(epoch, now, holder, lock) == verdict


def test_a_claiming_cas_is_ours_only_when_it_found_the_word_free_or_our_own_id():
    assert lib.gf_ring_claimed(0, HOLDER) == lib.GF_OK
    assert lib.gf_ring_claimed(HOLDER, HOLDER) == lib.GF_OK
    assert lib.gf_ring_claimed(HOLDER + 2, HOLDER) == lib.GF_E_ROLE
    assert lib.gf_ring_reclaimable(HOLDER | LOCKED)
    assert not lib.gf_ring_reclaimable(HOLDER)
    assert not lib.gf_ring_reclaimable(0)


def test_the_seal_step_sets_the_sealed_bit_and_stops_at_a_sealed_word():
    desired = ffi.new("uint64_t *")
    word = int(lib.gf_ring_tag(5)) | 4096
    assert lib.gf_ring_seal_step(word, desired) == lib.GF_OK
    assert desired[0] == word | lib.GF_TAIL_SEALED
    desired[0] = 7
    assert lib.gf_ring_seal_step(word | lib.GF_TAIL_SEALED, desired) == lib.GF_DONE
    assert desired[0] == 7  # nothing to store
    assert lib.gf_ring_seal_step(word, ffi.NULL) == lib.GF_E_ARG


def test_the_epoch_steps_only_move_forward_and_retag_keeps_position_and_seal():
    assert lib.gf_ring_epoch_step(4, 5) == lib.GF_OK
    assert lib.gf_ring_epoch_step(5, 5) == lib.GF_E_FENCED
    assert lib.gf_ring_epoch_step(6, 5) == lib.GF_E_FENCED
    word = int(lib.gf_ring_tag(3)) | lib.GF_TAIL_SEALED | 8192
    new = lib.gf_ring_retag(word, 9)
    assert new & lib.GF_TAIL_TAG_MASK == lib.gf_ring_tag(9)
    assert new & ~lib.GF_TAIL_TAG_MASK & ((1 << 64) - 1) == lib.GF_TAIL_SEALED | 8192


def test_acked_only_grows():
    assert lib.gf_ring_acked_step(10, 11) == lib.GF_OK
    assert lib.gf_ring_acked_step(10, 10) == lib.GF_DONE
    assert lib.gf_ring_acked_step(10, 3) == lib.GF_DONE


def test_a_producer_refuses_to_start_within_2_to_the_40_of_a_wrapping_sequence_number():
    p = ffi.new("gf_producer *")
    tag = int(lib.gf_ring_tag(0))
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 0, tag, 0, lib.GF_SEQ_LIMIT) == lib.GF_OK
    assert lib.gf_ring_prod_start(p, CAP, MAX_ITEM, 0, tag, 0, lib.GF_SEQ_LIMIT + 1) == lib.GF_E_CORRUPT
    assert lib.GF_SEQ_LIMIT == (1 << 64) - 1 - (1 << 40)


def test_the_role_and_cas_loop_decisions_are_the_cores_on_both_paths():
    one_sided = set().union(*(_names(path) for path in ONE_SIDED))
    mapped = set().union(*(_names(path) for path in MAPPED))
    # no Python copy of the decisions: the lock marker, the sequence limit, the tag arithmetic
    assert one_sided.isdisjoint({"_LOCKED_ROLE", "_SEQ_LIMIT", "_TAG_MASK", "GF_TAIL_TAG_MASK"})
    assert {
        "_admit_producer",  # the shared handle's call of gf_ring_claim_verdict
        "gf_ring_claimed",
        "gf_ring_seal_step",
        "gf_ring_epoch_step",
        "gf_ring_retag",
        "gf_ring_acked_step",
    } <= one_sided
    assert {"_admit_producer", "gf_ring_claim_verdict", "gf_ring_reclaimable", "gf_ring_set_acked"} <= mapped
    native = (NATIVE / "gf_native.c").read_text()
    for step in ("gf_rc_claim_verdict", "gf_rc_claimed", "gf_rc_seal_step", "gf_rc_epoch_step", "gf_rc_retag"):
        assert step + "(" in native, step
