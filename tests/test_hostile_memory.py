"""The hostile-memory fuzzer: a co-tenant writes junk into a live segment.

A producer process and a consumer process (tests/_hostile_workers.py) run on
one queue, both mapped, both one-sided, or a mapped producer with a one-sided
consumer, while this process, with a mapping of its own
of the whole segment file, writes random bytes, bit flips and extreme or
misaligned values into the ring header (positions, geometry, epoch, roles,
waiter words, dtype), the record headers, the segment's lease words, and
random spans. Every so often it "repairs" the queue (geometry, lease, and a
consistent pair of positions: also hostile writes, ones that let the workers
make progress again), and every round starts on a fresh queue.

What must hold, whatever is written (the threat model in README/DESIGN): no
worker dies of a signal, no worker hangs (each round is answered within a
generous deadline), every exception a worker sees is typed (from
``grafos_fabric.errors``, or ``TimeoutError``), and every item delivered lies
inside the ring (or the one-sided local buffer) with a length in
[1, max_item] that agrees with its view. It does not truncate the segment
(a shrunk segment raises SIGBUS in mappers; that is handled elsewhere).

``GRAFOS_FUZZ_CORRUPTIONS`` sets the corruptions per access mode (default
4000, so a CI run makes at least 12,000 over the three modes); the counts are
printed to the terminal so the CI log shows them.
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi, lib
from grafos_fabric.drivers.shm import _segment_path

pytestmark = pytest.mark.stress

WORKER = Path(__file__).with_name("_hostile_workers.py")
CORRUPTIONS = int(os.environ.get("GRAFOS_FUZZ_CORRUPTIONS", "4000"))
ROUNDS = int(os.environ.get("GRAFOS_FUZZ_ROUNDS", "16"))
ROUND_SECONDS = 0.5
ANSWER_DEADLINE = 90.0  # seconds past a round's end: far beyond any wait a worker may do
CAPACITY = 8192
MAX_ITEM = 1024
U64 = (1 << 64) - 1

SEG = int(lib.GF_SEG_HEADER_SIZE)  # the ring starts here in the segment file
DATA = SEG + int(lib.GF_RING_HEADER_SIZE)
ALIGN = int(lib.GF_RECORD_ALIGN)
POS_MASK = int(lib.GF_TAIL_POS_MASK)
TAG_MASK = int(lib.GF_TAIL_TAG_MASK)
SEALED = int(lib.GF_TAIL_SEALED)


def _ring(name: str) -> int:
    return SEG + int(ffi.offsetof("gf_ring_header", name))


def _seg(name: str) -> int:
    return int(ffi.offsetof("gf_segment_header", name))


TAIL, HEAD = _ring("tail"), _ring("head")
R_LEN = int(ffi.offsetof("gf_record_header", "length"))
R_TYPE = int(ffi.offsetof("gf_record_header", "type"))
R_SEQ = int(ffi.offsetof("gf_record_header", "seq"))
CONTROL64 = [
    _ring(n)
    for n in (
        "epoch", "seal_seq", "producer_id", "consumer_id", "onesided_peers", "next_seq", "acked",
        "data_waiters", "space_waiters", "space_want",
    )
]
CONTROL32 = [_ring("data_futex"), _ring("space_futex")]
GEOMETRY64 = [_ring(n) for n in ("capacity", "max_item", "first_seq", "created_epoch")]
LEASE_STATE, LEASE_DEADLINE = _seg("lease_state"), _seg("deadline_ns")


class Corrupter:
    """Writes junk into one segment through its own mapping, and counts what it wrote."""

    def __init__(self, path: str, rng: np.random.Generator) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.b = np.frombuffer(self.mm, dtype=np.uint8)
        self.rng = rng
        self.kinds: collections.Counter[str] = collections.Counter()
        self.saved = {off: self.r64(off) for off in [*GEOMETRY64, _ring("magic"), _ring("flags"), LEASE_DEADLINE]}
        self.saved_dtype = bytes(self.b[_ring("dtype") : _ring("dtype") + int(lib.GF_DTYPE_MAX)])

    def close(self) -> None:
        del self.b
        self.mm.close()

    # -- words -------------------------------------------------------------------------
    def r64(self, off: int) -> int:
        return int(self.b[off : off + 8].view(np.uint64)[0])

    def w64(self, off: int, v: int) -> None:
        self.b[off : off + 8].view(np.uint64)[0] = v & U64

    def r32(self, off: int) -> int:
        return int(self.b[off : off + 4].view(np.uint32)[0])

    def w32(self, off: int, v: int) -> None:
        self.b[off : off + 4].view(np.uint32)[0] = v & 0xFFFFFFFF

    def _bits(self, n: int) -> int:
        return int(self.rng.integers(0, 1 << n, dtype=np.uint64)) if n == 64 else int(self.rng.integers(0, 1 << n))

    def value64(self, cur: int) -> int:
        """An extreme, random, flipped, or near-miss value for a 64-bit word now holding ``cur``."""
        pick = int(self.rng.integers(0, 10))
        if pick == 0:
            return self._bits(64)
        if pick == 1:
            return int(self.rng.choice([0, U64, 1 << 63, POS_MASK, (1 << 40) - 4, CAPACITY - 4]))
        if pick in (2, 3):
            return cur ^ (1 << int(self.rng.integers(0, 64)))
        if pick in (4, 5):
            return cur + int(self.rng.integers(-15, 16))  # misaligned (mostly) and near
        if pick == 6:
            return cur + int(self.rng.choice([-1, 1])) * CAPACITY * int(self.rng.integers(1, 4))
        return cur + ALIGN * int(self.rng.integers(-2 * CAPACITY // ALIGN, 2 * CAPACITY // ALIGN))  # aligned

    def value32(self, cur: int) -> int:
        pick = int(self.rng.integers(0, 6))
        if pick == 0:
            return self._bits(32)
        if pick == 1:
            return int(self.rng.choice([0, 0xFFFFFFFF, 1 << 31, MAX_ITEM + 1, CAPACITY, CAPACITY - 16, 1, 2]))
        if pick in (2, 3):
            return cur ^ (1 << int(self.rng.integers(0, 32)))
        return cur + int(self.rng.integers(-40, 41))

    # -- one corruption ---------------------------------------------------------------
    def corrupt(self) -> None:
        kind = str(
            self.rng.choice(
                ["position", "misaligned_pair", "record", "control", "geometry", "dtype", "lease", "version",
                 "random_span"],
                p=[0.2, 0.08, 0.24, 0.12, 0.07, 0.05, 0.07, 0.03, 0.14],
            )
        )
        self.kinds[kind] += 1
        getattr(self, "_" + kind)()

    def _position(self) -> None:
        off = TAIL if self.rng.random() < 0.5 else HEAD
        cur = self.r64(off)
        new = self.value64(cur & POS_MASK)
        if off == TAIL and self.rng.random() < 0.6:
            new = (cur & ~POS_MASK & U64) | (new & POS_MASK)  # keep the epoch tag (and seal bit)
        if off == TAIL and self.rng.random() < 0.1:
            new = cur ^ SEALED if self.rng.random() < 0.5 else cur ^ (1 << int(self.rng.integers(56, 63)))
        self.w64(off, new)

    def _misaligned_pair(self) -> None:
        """head and tail together at a position that is not a record boundary, near the
        wrap (e.g. both at capacity - 4: a padding header there would end 12 bytes past
        the ring), with the epoch tag kept so a producer starting now accepts the word;
        sometimes with a little published data for a consumer to read."""
        lap = int(self.rng.integers(0, 1 << 20)) * CAPACITY
        pos = lap + CAPACITY - int(self.rng.integers(1, ALIGN))
        cur = self.r64(TAIL)
        tail = pos + (ALIGN * int(self.rng.integers(1, 8)) if self.rng.random() < 0.4 else 0)
        self.w64(HEAD, pos)
        self.w64(TAIL, (cur & TAG_MASK) | tail)

    def _record(self) -> None:
        tail = self.r64(TAIL) & POS_MASK
        # a record near the tail (the ones being read), or anywhere; mostly aligned
        if self.rng.random() < 0.6:
            idx = (tail - ALIGN * int(self.rng.integers(0, 40))) % CAPACITY
        else:
            idx = int(self.rng.integers(0, CAPACITY // ALIGN)) * ALIGN
        if self.rng.random() < 0.1:
            idx = (idx + int(self.rng.integers(1, ALIGN))) % (CAPACITY - 32)
        idx = min(idx, CAPACITY - 16)  # (the tail read above may be junk too)
        at = DATA + idx
        field = int(self.rng.integers(0, 4))
        if field == 0:
            self.w32(at + R_LEN, self.value32(self.r32(at + R_LEN)))
        elif field == 1:
            t = self.rng.choice([int(lib.GF_RECORD_DATA), int(lib.GF_RECORD_PADDING), 0, 3, self._bits(32)])
            self.w32(at + R_TYPE, int(t))
            if t == lib.GF_RECORD_PADDING and self.rng.random() < 0.5:  # a padding that claims to reach the end
                self.w32(at + R_LEN, CAPACITY - idx - 16)
        elif field == 2:
            self.w64(at + R_SEQ, self.value64(self.r64(at + R_SEQ)))
        else:
            self.b[at : at + 16] = self.rng.integers(0, 256, 16, dtype=np.uint8)

    def _control(self) -> None:
        if self.rng.random() < 0.15:
            off = int(self.rng.choice(CONTROL32))
            self.w32(off, self.value32(self.r32(off)))
        else:
            off = int(self.rng.choice(CONTROL64))
            self.w64(off, self.value64(self.r64(off)))

    def _geometry(self) -> None:
        off = int(self.rng.choice(GEOMETRY64))
        self.w64(off, self.value64(self.r64(off)))

    def _dtype(self) -> None:
        dl, dt = _ring("dtype_len"), _ring("dtype")
        pick = int(self.rng.integers(0, 3))
        if pick == 0:
            self.w32(dl, int(self.rng.choice([0, 3, 79, 80, 81, 0xFFFFFFFF, self._bits(32)])))
        elif pick == 1:
            n = int(self.rng.integers(1, 9))
            at = dt + int(self.rng.integers(0, int(lib.GF_DTYPE_MAX) - n))
            self.b[at : at + n] = self.rng.integers(0, 256, n, dtype=np.uint8)
        else:
            at = dt + int(self.rng.integers(0, 4))
            self.b[at] ^= np.uint8(1 << int(self.rng.integers(0, 8)))

    def _lease(self) -> None:
        if self.rng.random() < 0.5:
            self.w64(LEASE_STATE, int(self.rng.choice([0, 1, 2, 3, 4, self._bits(64)])))
        else:
            self.w64(LEASE_DEADLINE, int(self.rng.choice([0, 1, U64, self._bits(64)])))

    def _version(self) -> None:
        off = _ring("version") if self.rng.random() < 0.7 else _ring("magic")
        self.w32(off, int(self.rng.choice([0, 1, 3, self.r32(off) ^ (1 << int(self.rng.integers(0, 32)))])))

    def _random_span(self) -> None:
        n = int(self.rng.integers(1, 65))
        if self.rng.random() < 0.5:
            at = SEG + int(self.rng.integers(0, 1024 - n))  # the live part of the ring header
        else:
            at = DATA + int(self.rng.integers(0, CAPACITY - n))
        self.b[at : at + n] = self.rng.integers(0, 256, n, dtype=np.uint8)

    # -- repair (also a hostile write: one that happens to be consistent) ---------------
    def repair(self) -> None:
        for off, v in self.saved.items():
            self.w64(off, v)
        self.b[_ring("dtype") : _ring("dtype") + len(self.saved_dtype)] = np.frombuffer(self.saved_dtype, np.uint8)
        dlen = self.saved_dtype.find(b"\0")
        self.w32(_ring("dtype_len"), len(self.saved_dtype) if dlen < 0 else dlen)
        self.w32(_ring("version"), int(lib.GF_RING_LAYOUT_VERSION))
        self.w64(LEASE_STATE, int(lib.GF_LEASE_ACTIVE))
        epoch = self.r64(_ring("epoch"))
        pos = (self.r64(TAIL) & POS_MASK) & ~(ALIGN - 1)
        if pos > 1 << 40:
            pos = 0
        self.w64(HEAD, pos)
        self.w64(TAIL, ((epoch << int(lib.GF_TAIL_TAG_SHIFT)) & TAG_MASK) | pos)
        for off in (_ring("data_waiters"), _ring("space_waiters")):
            self.w64(off, 0)
        if self.rng.random() < 0.5:
            self.w64(_ring("producer_id"), 0)
            self.w64(_ring("consumer_id"), 0)


class Worker:
    def __init__(self, role: str, access: str, namespace: str) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), role, access, namespace],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self, deadline: float) -> dict[str, Any]:
        """The worker's JSON line for a round; fails on a hang or a death."""
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            self.kill()
            pytest.fail(f"{self.role} hung: no answer for a round within {ANSWER_DEADLINE} s of its end")
        line = out.readline()
        if not line:
            rc = self.proc.wait(timeout=30)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
            pytest.fail(f"{self.role} died ({how}) during a round:\n{err[-3000:]}")
        return dict(json.loads(line))

    def finish(self) -> int:
        self.send("quit")
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _merge(total: dict[str, collections.Counter[str]], part: dict[str, Any]) -> None:
    for key in ("counts", "errors"):
        total[key].update(part[key])


ACCESS = {  # mode -> (producer's access, consumer's access)
    "mapped": ("mapped", "mapped"),
    "onesided": ("onesided", "onesided"),
    "mixed": ("mapped", "onesided"),
}


@pytest.mark.parametrize("access", list(ACCESS))
def test_a_co_tenant_writing_junk_into_a_live_ring_gets_typed_errors_never_a_crash(
    namespace: str, access: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fabric = gf.open_fabric(f"shm://{namespace}")
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    seed_note = f"(mode {access})"
    workers = [Worker("producer", ACCESS[access][0], namespace), Worker("consumer", ACCESS[access][1], namespace)]
    totals: dict[str, collections.Counter[str]] = {"counts": collections.Counter(), "errors": collections.Counter()}
    kinds: collections.Counter[str] = collections.Counter()
    repairs = 0
    foreign: list[str] = []
    outside: list[str] = []
    per_round = -(-CORRUPTIONS // ROUNDS)
    started = time.monotonic()
    try:
        for rnd in range(ROUNDS):
            q = gf.FabricQueue.create(
                fabric, capacity=CAPACITY, max_item=MAX_ITEM, ttl=600, dtype="u1" if rnd % 2 else None
            )
            corrupter = Corrupter(_segment_path(namespace, q.region.ref().name), rng)
            try:
                loc = bytes(q.locator()).hex()
                for w in workers:
                    w.send(f"round {loc} {ROUND_SECONDS}")
                t0 = time.monotonic()
                quiet = 0.1 * ROUND_SECONDS  # let the workers get going first
                spacing = (ROUND_SECONDS - quiet) / per_round
                done = 0
                while done < per_round:
                    due = t0 + quiet + done * spacing
                    now = time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    corrupter.corrupt()
                    done += 1
                    if rng.random() < 0.04:
                        corrupter.repair()
                        repairs += 1
                end = max(time.monotonic(), t0 + ROUND_SECONDS)
                for w in workers:
                    part = w.answer(end + ANSWER_DEADLINE)
                    _merge(totals, part)
                    foreign += part["foreign"]
                    outside += part["outside"]
                    if part["n_foreign"] or part["n_outside"]:
                        break
            finally:
                kinds.update(corrupter.kinds)
                corrupter.repair()
                corrupter.close()
                try:
                    q.free()
                except (E.FabricError, E.FabricValueError):
                    pass
            if foreign or outside:
                break
        rcs = {w.role: w.finish() for w in workers}
    finally:
        for w in workers:
            w.kill()
    elapsed = time.monotonic() - started
    counts, errors = totals["counts"], totals["errors"]
    with capsys.disabled():
        print(
            f"\nhostile-memory fuzzer {seed_note}: {sum(kinds.values())} corruptions in {elapsed:.1f} s "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}; {repairs} repairs)\n"
            f"  workers: {dict(sorted(counts.items()))}\n"
            f"  typed errors: {dict(sorted(errors.items()))}\n"
            f"  untyped exceptions: {len(foreign)}, items outside the ring: {len(outside)}, exit: {rcs}"
        )
    assert not foreign, "untyped exceptions reached a worker:\n" + "\n".join(foreign)
    assert not outside, "items outside the ring or with a bad length:\n" + "\n".join(outside)
    assert rcs == {"producer": 0, "consumer": 0}, f"workers exited with {rcs} (negative: killed by that signal)"
    assert sum(kinds.values()) >= CORRUPTIONS
    # the fuzzer attacked a queue that was working, not one dead from the start
    assert counts["pushed"] > 0 and counts["delivered"] > 0, counts
