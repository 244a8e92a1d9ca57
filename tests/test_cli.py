"""grafos-fabric CLI: ls/inspect/free/reap on a test namespace, dead owners, help texts."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.shm import SHM_DIR
from grafos_fabric.tools import cli


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _ls(capsys: pytest.CaptureFixture[str], namespace: str) -> list[dict[str, Any]]:
    rc, out, _ = _run(capsys, "ls", "--fabric", f"shm://{namespace}", "--json")
    assert rc == 0
    return list(json.loads(out))


def _orphan(namespace: str, *, push: bool = True) -> str:
    """A queue made by a child process that dies without closing or freeing it; returns its name."""
    code = (
        "import os, grafos_fabric as gf\n"
        f"q = gf.FabricQueue.create(gf.open_fabric('shm://{namespace}'), capacity=4096, ttl=600)\n"
        + ("q.push(b'left behind')\n" if push else "")
        + "print(q.lease.resource.rsplit('/', 1)[1], flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def test_ls_json_shows_a_live_owner_and_its_queue(capsys, fabric, namespace):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=60)
    q.push(b"one")
    (row,) = _ls(capsys, namespace)
    assert row["name"] == q.lease.resource.rsplit("/", 1)[1]
    assert row["owner_pid"] == os.getpid() and row["owner"] == "alive" and row["dead_owner"] is False
    assert row["state"] == "active" and row["queue"]["next_seq"] == 1
    assert row["queue"]["producer_pid"] == os.getpid() and row["queue"]["consumer_pid"] is None


def test_a_region_left_by_a_dead_process_is_flagged_and_only_reap_dead_owners_takes_it(capsys, fabric, namespace):
    orphan = _orphan(namespace)
    live = gf.FabricQueue.create(fabric, capacity=4096, ttl=60)
    rows = {r["name"]: r for r in _ls(capsys, namespace)}
    assert rows[orphan]["owner"] == "dead" and rows[orphan]["dead_owner"] is True
    assert rows[orphan]["state"] == "active"  # the lease alone would keep it for 600 s
    rc, out, _ = _run(capsys, "ls", "--fabric", f"shm://{namespace}")
    assert rc == 0 and "(dead)" in out and "1 active region(s) left by dead processes" in out

    rc, out, _ = _run(capsys, "reap", "--fabric", f"shm://{namespace}")
    assert rc == 0 and "reclaimed 0 region(s)" in out
    assert orphan in {r["name"] for r in _ls(capsys, namespace)}

    rc, out, _ = _run(capsys, "reap", "--fabric", f"shm://{namespace}", "--dead-owners")
    assert rc == 0 and "reclaimed 1 region(s) (1 left by dead processes)" in out
    names = {r["name"] for r in _ls(capsys, namespace)}
    assert orphan not in names and live.lease.resource.rsplit("/", 1)[1] in names
    live.lease.check()  # the live owner's region is untouched


def test_reap_dead_owners_keeps_a_region_whose_consumer_is_alive(capsys, fabric, namespace):
    code = (
        "import os, grafos_fabric as gf\n"
        f"q = gf.FabricQueue.create(gf.open_fabric('shm://{namespace}'), capacity=4096, ttl=600)\n"
        "q.push(b'for the consumer')\n"
        "print(bytes(q.locator()).hex(), flush=True)\n"
        "os._exit(0)\n"
    )
    loc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    rx = gf.FabricQueue.attach(fabric, gf.QueueLocator.from_bytes(bytes.fromhex(loc.stdout.strip())))
    assert rx.pop(timeout=5).tobytes() == b"for the consumer"  # this process now holds the consumer role
    (row,) = _ls(capsys, namespace)
    assert row["owner"] == "dead" and row["queue"]["consumer_pid"] == os.getpid()
    assert row["dead_owner"] is False
    rc, out, _ = _run(capsys, "reap", "--fabric", f"shm://{namespace}", "--dead-owners")
    assert rc == 0 and "reclaimed 0 region(s)" in out
    rx.lease.check()


def test_owner_status_proves_death_by_missing_pid_or_a_later_start():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    assert cli.owner_status(child.pid, time.time()) == "dead"  # reaped: no process has that pid now
    me = os.getpid()
    assert cli.owner_status(me, time.time()) == "alive"
    started = cli._process_start(me)
    assert started is not None and started <= time.time() + 1
    # a segment last changed well before this process started: its pid was someone else's
    assert cli.owner_status(me, started - 60) == "dead"
    assert cli.owner_status(me, None) == "alive"  # nothing to compare with: not provable
    assert cli.owner_status(0, None) == "unknown" and cli.owner_status(None, None) == "unknown"
    assert cli.owner_status(1 << 40, None) == "unknown"


def test_ls_never_cuts_names_at_80_columns(namespace):
    fabric = gf.open_fabric(f"shm://{namespace}")
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=60)
    q.push(b"x")
    env = dict(os.environ, COLUMNS="80", TERM="dumb")
    out = subprocess.run(
        [sys.executable, "-m", "grafos_fabric.tools.cli", "ls", "--fabric", f"shm://{namespace}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    ).stdout
    assert q.lease.resource.rsplit("/", 1)[1] in out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_inspect_takes_a_unique_prefix_and_lists_candidates_when_ambiguous(capsys, fabric, namespace):
    # 17 regions with 16-hex-digit names: two share a first digit (pigeonhole)
    queues = [gf.FabricQueue.create(fabric, capacity=4096, ttl=60) for _ in range(17)]
    names = [q.lease.resource.rsplit("/", 1)[1] for q in queues]
    target = names[0]
    rc, out, _ = _run(capsys, "inspect", "--fabric", f"shm://{namespace}", target[:12], "--json")
    assert rc == 0 and json.loads(out)["name"] == target
    rc, out, _ = _run(capsys, "inspect", "--fabric", f"shm://{namespace}", f"{namespace}/{target[:12]}", "--json")
    assert rc == 0 and json.loads(out)["name"] == target
    rc, out, _ = _run(capsys, "inspect", "--fabric", f"shm://{namespace}", target)
    assert rc == 0 and target in out and "queue.capacity" in out

    first = {}
    for n in names:
        first.setdefault(n[0], []).append(n)
    shared = next(v for v in first.values() if len(v) > 1)
    rc, out, err = _run(capsys, "inspect", "--fabric", f"shm://{namespace}", shared[0][0])
    assert rc == cli.EXIT_NOT_FOUND and out == ""
    assert "matches" in err and all(f"{namespace}/{n}" in err for n in shared)

    rc, _, err = _run(capsys, "inspect", "--fabric", f"shm://{namespace}", "zz-no-such")
    assert rc == cli.EXIT_NOT_FOUND and "no region named 'zz-no-such'" in err


def test_free_removes_one_region_and_its_users_fail_closed(capsys, fabric, namespace):
    q = gf.FabricQueue.create(fabric, capacity=4096, ttl=60)
    other = gf.FabricQueue.create(fabric, capacity=4096, ttl=60)
    q.push(b"x")
    name = q.lease.resource.rsplit("/", 1)[1]
    rc, out, _ = _run(capsys, "free", "--fabric", f"shm://{namespace}", name[:10])
    assert rc == 0 and f"freed {namespace}/{name}" in out
    assert not os.path.exists(os.path.join(SHM_DIR, f"grafos.{namespace}.{name}"))
    with pytest.raises(E.FabricError):
        q.push(b"after free")
    other.lease.check()
    assert [r["name"] for r in _ls(capsys, namespace)] == [other.lease.resource.rsplit("/", 1)[1]]
    rc, _, err = _run(capsys, "free", "--fabric", f"shm://{namespace}", name)
    assert rc == cli.EXIT_NOT_FOUND and "no region named" in err


def test_every_subcommand_and_argument_has_plain_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"ls", "inspect", "free", "reap", "serve"} <= set(sub.choices)
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, p in sub.choices.items():
        assert helps.get(name), f"{name} has no help line"
        assert p.description, f"{name} has no description"
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = p.format_help()
        assert "``" not in text and ":func:" not in text, text
    assert "``" not in parser.format_help()


def test_ls_without_rich_names_the_extra_and_json_still_works(capsys, monkeypatch, fabric, namespace):
    gf.FabricQueue.create(fabric, capacity=4096, ttl=60)
    monkeypatch.setitem(sys.modules, "rich", None)
    rc, _, err = _run(capsys, "ls", "--fabric", f"shm://{namespace}")
    assert rc == cli.EXIT_MISSING_EXTRA and "pip install 'grafos-fabric[cli]'" in err
    assert len(_ls(capsys, namespace)) == 1


def test_a_non_shm_fabric_is_refused_with_a_message(capsys):
    rc, _, err = _run(capsys, "ls", "--fabric", "nosuch://x", "--json")
    assert rc == cli.EXIT_FABRIC and "grafos-fabric ls:" in err
