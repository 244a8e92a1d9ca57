"""The Python protocols of a queue: iteration, len/qsize/empty/full, asyncio.

Every test runs on both consumer modes (mapped, one-sided) through ``make_pair``."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

import grafos_fabric as gf
from grafos_fabric import errors as E


def test_for_loop_yields_every_item_until_sealed_and_drained(make_pair: Any) -> None:
    tx, rx = make_pair()
    for i in range(10):
        tx.push(bytes([i]) * 8)
    tx.seal()
    got = [item.tobytes() for item in rx]
    assert got == [bytes([i]) * 8 for i in range(10)]


def test_for_loop_waits_for_items_pushed_later(make_pair: Any) -> None:
    tx, rx = make_pair()

    def produce() -> None:
        for i in range(50):
            tx.push(i.to_bytes(4, "little"))
            time.sleep(0.001)
        tx.seal()

    t = threading.Thread(target=produce)
    t.start()
    seen = [int.from_bytes(item.tobytes(), "little") for item in rx]
    t.join()
    assert seen == list(range(50))


def test_iteration_propagates_errors_other_than_seal(make_pair: Any) -> None:
    tx, rx = make_pair()
    tx.push(b"x")
    tx.lease.revoke()
    with pytest.raises(E.Revoked):
        list(rx)


def test_len_qsize_empty_full_follow_the_header(make_pair: Any) -> None:
    tx, rx = make_pair(capacity=4096)
    assert len(tx) == 0 and rx.qsize() == 0
    assert tx.empty() and rx.empty() and not tx.full()
    assert bool(tx) is True  # a queue object is true even when empty
    for _ in range(5):
        tx.push(bytes(16))
    assert len(tx) == 5 and len(rx) == 5
    assert not rx.empty()
    item = rx.pop(timeout=5)
    item.release()
    assert rx.qsize() == 4 and tx.qsize() == 4
    while tx.try_push(bytes(16)):
        pass
    assert tx.full() and rx.full()
    assert len(rx) == 4096 // 32  # every 32-byte record of the ring is in use


def test_qsize_counts_across_a_padding_record(make_pair: Any) -> None:
    tx, rx = make_pair(capacity=4096)
    # move the positions close to the wrap, then straddle it with a padding record
    for _ in range(4):
        for _ in range(20):
            tx.push(bytes(40))
        with rx.pop_batch(100, timeout=5):
            pass
    while True:
        if not tx.try_push(bytes(200)):
            break
        if tx.stats()["tail"] // 4096 > tx.stats()["head"] // 4096:
            break
    n = tx.qsize()
    assert n >= 1
    count = 0
    while rx.try_pop() is not None:
        count += 1
    assert count == n


def test_len_is_an_estimate_that_never_exceeds_what_fits(make_pair: Any) -> None:
    tx, _rx = make_pair(capacity=4096)
    tx.push(bytes(100))
    # a forged next_seq far ahead: the estimate stays bounded by the bytes in use
    tx.region.store64(264, 1 << 40)
    assert 0 <= len(tx) <= 4096 // 32


def test_apop_returns_items_pushed_from_another_thread(make_pair: Any) -> None:
    tx, rx = make_pair()

    async def main() -> list[bytes]:
        def produce() -> None:
            for i in range(20):
                time.sleep(0.002)
                tx.push(bytes([i]))

        t = threading.Thread(target=produce)
        t.start()
        out = []
        for _ in range(20):
            item = await rx.apop(timeout=10)
            out.append(item.tobytes())
            item.release()
        t.join()
        return out

    assert asyncio.run(main()) == [bytes([i]) for i in range(20)]


def test_apop_does_not_block_the_event_loop(make_pair: Any) -> None:
    tx, rx = make_pair()

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1
                if ticks == 10:  # pushed by the loop itself: an apop that held the loop never gets it
                    tx.push(b"late")

        task = asyncio.create_task(ticker())
        item = await rx.apop(timeout=60)
        assert item.tobytes() == b"late"
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 10  # the loop kept running while apop waited (counted, not timed)


def test_apop_timeout_raises_timeout_error(make_pair: Any) -> None:
    _tx, rx = make_pair()
    with pytest.raises(TimeoutError):
        asyncio.run(rx.apop(timeout=0.1))


def test_cancelled_apop_loses_no_item(make_pair: Any) -> None:
    tx, rx = make_pair()

    async def main() -> bytes:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rx.apop(), 0.05)
        tx.push(b"kept")
        item = await rx.apop(timeout=10)
        return item.tobytes()

    assert asyncio.run(main()) == b"kept"


def test_async_for_ends_when_sealed_and_drained(make_pair: Any) -> None:
    tx, rx = make_pair()

    async def main() -> list[int]:
        async def produce() -> None:
            for i in range(30):
                await tx.apush(i.to_bytes(2, "little"), timeout=10)
                await asyncio.sleep(0)
            tx.seal()

        task = asyncio.create_task(produce())
        seen = [int.from_bytes(item.tobytes(), "little") async for item in rx]
        await task
        return seen

    assert asyncio.run(main()) == list(range(30))


def test_apush_waits_for_space_without_blocking_the_loop(make_pair: Any) -> None:
    tx, rx = make_pair(capacity=4096)
    while tx.try_push(bytes(100)):
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def drain() -> None:
            with rx.pop_batch(1000, timeout=5):
                pass

        loop.call_later(0.1, drain)
        await tx.apush(bytes(100), timeout=10)

    asyncio.run(main())
    assert rx.pop(timeout=5).tobytes() == bytes(100)


def test_apush_timeout_and_closed_queue(make_pair: Any) -> None:
    tx, _rx = make_pair(capacity=4096)
    while tx.try_push(bytes(100)):
        pass
    with pytest.raises(TimeoutError):
        asyncio.run(tx.apush(bytes(100), timeout=0.05))
    tx.close()
    with pytest.raises(E.QueueClosed):
        asyncio.run(tx.apush(bytes(100), timeout=0.05))


def test_apop_bad_timeout_is_a_value_error(make_pair: Any) -> None:
    _tx, rx = make_pair()
    with pytest.raises(E.FabricValueError):
        asyncio.run(rx.apop(timeout=-1))


def test_asyncio_with_a_dtype_queue(fabric: Any) -> None:
    q = gf.FabricQueue.create(fabric, capacity=1 << 14, ttl=30.0, dtype=np.float64)

    async def main() -> float:
        await q.apush(np.arange(4, dtype=np.float64))
        item = await q.apop(timeout=5)
        return float(np.asarray(item).sum())

    assert asyncio.run(main()) == 6.0
    q.free()


def test_apush_of_a_str_is_a_typed_error_that_says_encode(make_pair: Any) -> None:
    tx, _rx = make_pair()
    with pytest.raises(E.FabricTypeError, match="encode"):
        asyncio.run(tx.apush("text"))  # type: ignore[arg-type]
