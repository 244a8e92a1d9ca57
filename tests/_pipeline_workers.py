"""Processes for the cross-process relocatable-edge tests (run in forked children).

Items are int64 rows ``[seq, seq * 31 + 7]`` so a consumer can check that the
bytes it got belong to the sequence they carry. Producers and consumers
checkpoint to their own block lease (CheckpointedStageState), so a process
killed with SIGKILL restarts where its last checkpoint left it:

* producer: ``output_commit = tx.acked`` (what the consumer durably has);
* consumer: writes every delivered sequence to an append-only sink file, then
  checkpoints ``input_offset`` and acks (ack after the checkpoint).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import grafos_fabric as gf
from grafos_fabric import errors as E
from grafos_fabric.drivers.block import open_block
from grafos_fabric.pipeline import CheckpointedStageState, EdgeCheckpoint, RelocatableQueueEdge, StageId

ITEM_COLS = 2


def rows(start: int, n: int) -> np.ndarray:
    s = np.arange(start, start + n, dtype=np.int64)
    return np.stack([s, s * 31 + 7], axis=1)


def check_rows(arr: np.ndarray, seqs: np.ndarray) -> None:
    a = np.asarray(arr).view(np.int64).reshape(len(seqs), ITEM_COLS)
    s = seqs.astype(np.int64)
    if not (np.array_equal(a[:, 0], s) and np.array_equal(a[:, 1], s * 31 + 7)):
        raise AssertionError(f"payload does not match its sequence near {int(seqs[0])}")


def _restore(path: str, stage: str) -> CheckpointedStageState[Any] | None:
    blk = open_block(path)
    try:
        return CheckpointedStageState.restore(blk, stage=stage)
    except E.NoRecord:
        return None


def producer_main(
    ns: str,
    edge_path: str,
    ckpt_path: str,
    n: int,
    *,
    batch: int = 256,
    relocate_every: int = 0,
    capacity: int = 1 << 20,
    ttl: float = 30.0,
    checkpoint_every: int = 4096,
    stats_path: str | None = None,
) -> None:
    """Produce items ``[output_commit, n)``; relocate every ``relocate_every`` items (0: never)."""
    logging.basicConfig(level=logging.WARNING)
    fabric = gf.open_fabric(f"shm://{ns}")
    prev = _restore(ckpt_path, "src")
    ckpt: CheckpointedStageState[dict[str, Any]] = CheckpointedStageState(
        {}, open_block(ckpt_path), stage="src", edge=prev.edge if prev else None
    )
    tx = RelocatableQueueEdge.producer(
        fabric, open_block(edge_path), capacity=capacity, ttl=ttl, stage=StageId("src"), output_commit=ckpt.edge
    )
    seq = tx.next_seq
    last_ckpt = seq
    next_reloc = seq + relocate_every if relocate_every else n + 1
    while seq < n:
        k = min(batch, n - seq)
        tx.push_batch(rows(seq, k))
        seq += k
        if seq >= next_reloc:
            tx.relocate()
            next_reloc += relocate_every
        if seq - last_ckpt >= checkpoint_every:
            ckpt.checkpoint(EdgeCheckpoint(0, tx.acked))
            last_ckpt = seq
    tx.flush(timeout=120)
    ckpt.checkpoint(EdgeCheckpoint(0, tx.acked))
    if stats_path:
        Path(stats_path).write_text(repr(tx.stats()))
    tx.close()


def consumer_main(
    ns: str,
    edge_path: str,
    ckpt_path: str,
    sink_path: str,
    n: int,
    *,
    checkpoint_every: int = 2048,
    batch: int = 512,
    stats_path: str | None = None,
    mapped: bool = True,
) -> None:
    """Consume until sequence ``n - 1``; the sink file gets every delivered sequence (int64)."""
    logging.basicConfig(level=logging.WARNING)
    fabric = gf.open_fabric(f"shm://{ns}")
    prev = _restore(ckpt_path, "sink")
    ckpt: CheckpointedStageState[dict[str, Any]] = CheckpointedStageState(
        {}, open_block(ckpt_path), stage="sink", edge=prev.edge if prev else None
    )
    start = ckpt.edge.input_offset if prev else None
    rx = RelocatableQueueEdge.consumer(
        fabric, open_block(edge_path), stage=StageId("sink"), input_offset=start, mapped=mapped
    )
    fd = os.open(sink_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    since = 0
    while rx.position is None or rx.position < n:
        b = rx.pop_batch(batch, timeout=60)
        check_rows(b.array(), b.seqs)
        os.write(fd, b.seqs.astype(np.int64).tobytes())
        since += len(b)
        b.release()
        pos = rx.position
        assert pos is not None
        if since >= checkpoint_every or pos >= n:
            ckpt.checkpoint(EdgeCheckpoint(pos, 0))
            rx.ack(pos - 1)
            since = 0
    os.close(fd)
    if stats_path:
        Path(stats_path).write_text(repr(rx.stats()))
    rx.close()


def dedup_sink(sink_path: str) -> tuple[np.ndarray, int]:
    """What a sink that dedups by sequence keeps (drop every seq already seen), and how many it dropped."""
    raw = np.fromfile(sink_path, dtype=np.int64) if os.path.exists(sink_path) else np.zeros(0, np.int64)
    if not len(raw):
        return raw, 0
    high = np.maximum.accumulate(raw)
    keep = np.ones(len(raw), dtype=bool)
    keep[1:] = raw[1:] > high[:-1]
    return raw[keep], int((~keep).sum())


def wait_pid(pid: int, timeout: float) -> int:
    """Wait for a child; returns its wait status as a returncode (negative: signal)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} did not finish within {timeout}s")
        time.sleep(0.005)
