"""A producer or a consumer process for the hostile-memory fuzzer (test_hostile_memory.py).

Run as ``python _hostile_workers.py ROLE ACCESS NAMESPACE``. It reads one command
a line from stdin:

* ``round LOCATOR_HEX SECONDS``: attach to that queue (mapped or one-sided, as
  ACCESS says) and produce or consume for SECONDS while another process writes
  junk into the segment; then print one JSON line of counts for the round.
* ``quit``: exit 0.

Every queue operation carries a short timeout, so no call can wait for long.
A typed error (anything from ``grafos_fabric.errors``, or ``TimeoutError``) is
counted by type; the handle is closed and the queue attached again. Any other
exception is a finding: its traceback goes into ``foreign`` for the test to
report. The consumer checks every item it gets: its view must lie inside the
ring's data area (mapped) or the local buffer (one-sided), and its length must
be in [1, max_item] and agree with the view. Items carry their own length in
their first 4 bytes, so an item whose header length was rewritten to another
plausible value (which no reader can tell from a real one) is counted as
``altered``, not as a failure.
"""

from __future__ import annotations

import collections
import json
import struct
import sys
import time
import traceback
from typing import Any

import numpy as np

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric._ffi import ffi

OP_TIMEOUT = 0.02
RETRY_PAUSE = 0.0005


def _payload(length: int, n: int) -> bytes:
    head = struct.pack("<II", length, n & 0xFFFFFFFF)
    return (head + bytes([n & 0xFF]) * length)[:length]


class Round:
    def __init__(self, fabric: Any, role: str, access: str, locator: bytes) -> None:
        self.fabric = fabric
        self.role = role
        self.mapped = access == "mapped"
        self.locator = locator
        self.q: Any = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.foreign: list[str] = []
        self.outside: list[str] = []
        self.n = 0
        self.rng = np.random.default_rng()

    # -- handle ----------------------------------------------------------------------
    def _drop(self) -> None:
        q, self.q = self.q, None
        if q is not None:
            try:
                q.close()
            except Exception as exc:  # close is teardown: it must not raise anything untyped
                self._record(exc)

    def _record(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError) or type(exc).__module__ == E.__name__:
            self.errors[type(exc).__name__] += 1
        else:
            self.foreign.append("".join(traceback.format_exception(exc)))

    # -- producing -------------------------------------------------------------------
    def _item(self) -> bytes:
        max_item = min(self.q.max_item, 900)
        length = int(self.rng.integers(8, max(9, max_item)))
        self.n += 1
        return _payload(length, self.n)

    def produce(self) -> None:
        q = self.q
        op = int(self.rng.integers(0, 5))
        if op == 0:
            q.push(self._item(), timeout=OP_TIMEOUT)
            self.counts["pushed"] += 1
        elif op == 1:
            if q.try_push(self._item()):
                self.counts["pushed"] += 1
        elif op == 2:
            length = int(self.rng.integers(8, min(q.max_item, 200) + 1))
            rows = np.frombuffer(b"".join(_payload(length, self.n + i) for i in range(16)), np.uint8)
            self.n += 16
            self.counts["pushed"] += q.push_batch(rows.reshape(16, length), timeout=0)
        elif op == 3:
            self.counts["pushed"] += q.push_batch([self._item() for _ in range(8)], timeout=0)
        else:
            data = self._item()
            with q.reserve(len(data), timeout=OP_TIMEOUT) as buf:
                np.asarray(buf).view(np.uint8)[: len(data)] = np.frombuffer(data, np.uint8)
            self.counts["pushed"] += 1

    # -- consuming -------------------------------------------------------------------
    def _check(self, item: Any) -> None:
        q = self.q
        lo = int(ffi.cast("uintptr_t", q._data))
        hi = lo + q.capacity
        if isinstance(item, np.ndarray):  # pop_array's: its base is the item (native) or an export of it
            owner = item.base.obj if isinstance(item.base, memoryview) else item.base
            view, seq, length = item.view(np.uint8), owner.seq, len(owner)
        else:
            view, seq, length = np.asarray(item).view(np.uint8), item.seq, len(item)
        ptr = view.ctypes.data
        n = view.nbytes
        if not (lo <= ptr and ptr + n <= hi) or not (1 <= n <= q.max_item) or n != length:
            self.outside.append(f"item seq {seq}: {n} bytes at +{ptr - lo} (ring {q.capacity}, len {length})")
            return
        self.counts["delivered"] += 1
        if n < 4 or int.from_bytes(view[:4].tobytes(), "little") != n:
            self.counts["altered"] += 1

    def consume(self) -> None:
        q = self.q
        op = int(self.rng.integers(0, 4))
        if op == 0:
            with q.pop(timeout=OP_TIMEOUT) as item:
                self._check(item)
        elif op == 3:
            arr = q.pop_array(timeout=OP_TIMEOUT)  # released with the array
            self._check(arr)
            del arr
        elif op == 1:
            item = q.try_pop()
            if item is not None:
                with item:
                    self._check(item)
        else:
            with q.pop_batch(int(self.rng.integers(1, 64)), timeout=OP_TIMEOUT) as batch:
                for item in batch:
                    self._check(item)

    # -- the round -------------------------------------------------------------------
    def run(self, seconds: float) -> dict[str, Any]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                if self.q is None:
                    self.counts["attaches"] += 1
                    self.q = gf.FabricQueue.attach(self.fabric, self.locator, mapped=self.mapped)
                if self.role == "producer":
                    self.produce()
                else:
                    self.consume()
                self.counts["ops"] += 1
            except TimeoutError as exc:
                self._record(exc)
            except Exception as exc:
                self._record(exc)
                self._drop()
                time.sleep(RETRY_PAUSE)
        self._drop()
        return {
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "foreign": self.foreign[:5],
            "n_foreign": len(self.foreign),
            "outside": self.outside[:5],
            "n_outside": len(self.outside),
        }


def main() -> None:
    role, access, namespace = sys.argv[1:4]
    fabric = gf.open_fabric(f"shm://{namespace}")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        result = Round(fabric, role, access, bytes.fromhex(cmd[1])).run(float(cmd[2]))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
