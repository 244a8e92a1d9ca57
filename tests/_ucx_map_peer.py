"""The one-sided side of a mixed pair over ``ucx://`` (see tests/test_ucx_local_map.py).

argv: ROLE URL TOKEN_FILE LOCATOR_FILE N. Attaches one-sided (``mapped=False``) to the queue
whose locator is in LOCATOR_FILE. ``producer``: pushes N items (item i: ``i`` as 8 bytes,
repeated ``1 + i % 97`` times), then prints ``{"pushed": N}``. ``consumer``: pops N items and
prints ``{"ok": bool, "first_bad": i or -1}`` (every item must be item i, in order).
"""

from __future__ import annotations

import json
import sys

import grafos_fabric as gf


def item(i: int) -> bytes:
    return i.to_bytes(8, "little") * (1 + i % 97)


def main() -> None:
    role, url, token, loc, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    fabric = gf.open_fabric(url, token_file=token)
    with open(loc, "rb") as fh:
        q = gf.FabricQueue.attach(fabric, fh.read(), mapped=False)
    assert not q.region.mapped
    if role == "producer":
        for i in range(n):
            q.push(item(i), timeout=60)
        print(json.dumps({"pushed": n}), flush=True)
    else:
        bad = -1
        for i in range(n):
            with q.pop(timeout=60) as it:
                if bad < 0 and (it.tobytes() != item(i) or it.seq != i):
                    bad = i
        print(json.dumps({"ok": bad < 0, "first_bad": bad}), flush=True)
    q.close()
    fabric.close()


if __name__ == "__main__":
    main()
