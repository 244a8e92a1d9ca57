"""A queue producer + consumer over ``ucx://`` in its own network namespace (see test_ucx.py).

argv: URL TOKEN_FILE N. Two fabrics (two clients of the node): one creates a
queue and pushes N items, the other attaches one-sided and pops them; then both
add 1000 to one word with FAA. Prints one JSON line with what it saw, then
waits for "go" on stdin and pushes until an operation fails, printing the
error's class and the time it took to see it.
"""

from __future__ import annotations

import json
import sys
import time

import grafos_fabric as gf


def main() -> None:
    url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prod = gf.open_fabric(url, token_file=token)
    cons = gf.open_fabric(url, token_file=token)
    tx = gf.FabricQueue.create(prod, capacity=1 << 16, ttl=600.0)
    rx = gf.FabricQueue.attach(cons, bytes(tx.locator()), mapped=False)
    got = []
    for i in range(n):
        tx.push(i.to_bytes(8, "little") * (1 + i % 64), timeout=30)
        with rx.pop(timeout=30) as item:
            data = item.tobytes()
            got.append(int.from_bytes(data[:8], "little") if data == data[:8] * (len(data) // 8) else -1)
    counter = prod.alloc(4096, 600.0)
    other = cons.attach(counter.ref())
    for _ in range(1000):
        counter.faa64(0, 1)
        other.faa64(0, 1)
    print(json.dumps({"ready": True, "in_order": got == list(range(n)), "count": counter.load64(0)}), flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    try:
        while True:
            counter.faa64(0, 1)
    except Exception as ex:
        print(json.dumps({"kind": type(ex).__name__, "took": time.perf_counter() - t0, "msg": str(ex)[:300]}),
              flush=True)


if __name__ == "__main__":
    main()
