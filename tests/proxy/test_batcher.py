"""MicroBatcher under concurrency, saturation and failure (real threads, no model needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from proxy.batcher import BatcherSaturated, MicroBatcher


class SlowDoubler:
    """A batch function that takes a fixed time per call, like a model forward pass."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.gate.wait(5)
        self.threads.add(threading.current_thread().name)
        self.sizes.append(len(items))
        time.sleep(self.seconds)  # runs in the executor thread, never on the loop
        if any(i < 0 for i in items):
            raise ValueError("negative item")
        return [2 * i for i in items]


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1, thread_name_prefix="embed")
    yield pool
    pool.shutdown()


async def test_concurrent_items_share_batches(executor: ThreadPoolExecutor) -> None:
    work = SlowDoubler()
    batcher = MicroBatcher(work, executor, max_batch=8, max_wait=0.005, max_queue=64)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(32)))
    finally:
        await batcher.close()
    assert results == [2 * i for i in range(32)]
    assert sum(work.sizes) == 32 and max(work.sizes) == 8 and len(work.sizes) <= 6
    assert all(name.startswith("embed") for name in work.threads)


async def test_single_item_does_not_wait_for_a_full_batch(executor: ThreadPoolExecutor) -> None:
    work = SlowDoubler(0.0)
    batcher = MicroBatcher(work, executor, max_batch=16, max_wait=0.002, max_queue=8)
    batcher.start()
    try:
        started = time.perf_counter()
        assert await batcher.submit(21) == 42
        assert time.perf_counter() - started < 0.5
    finally:
        await batcher.close()


async def test_full_queue_rejects_at_once(executor: ThreadPoolExecutor) -> None:
    work = SlowDoubler(0.0)
    work.gate.clear()  # the first batch blocks, so the queue fills up behind it
    batcher = MicroBatcher(work, executor, max_batch=1, max_wait=0.0, max_queue=2)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # taken by the consumer, stuck in the executor
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(BatcherSaturated):
            await batcher.submit(4)
        assert batcher.rejected == 1 and batcher.depth == 2
        work.gate.set()
        assert await first == 2 and [await q for q in queued] == [4, 6]
    finally:
        work.gate.set()
        await batcher.close()


async def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on(
    executor: ThreadPoolExecutor,
) -> None:
    work = SlowDoubler(0.01)
    batcher = MicroBatcher(work, executor, max_batch=4, max_wait=0.01, max_queue=16)
    batcher.start()
    try:
        outcomes = await asyncio.gather(
            batcher.submit(1), batcher.submit(-1), return_exceptions=True
        )
        assert all(isinstance(o, ValueError) for o in outcomes)
        assert await batcher.submit(5) == 10
    finally:
        await batcher.close()


async def test_abandoned_items_are_skipped(executor: ThreadPoolExecutor) -> None:
    work = SlowDoubler(0.05)
    batcher = MicroBatcher(work, executor, max_batch=1, max_wait=0.0, max_queue=16)
    batcher.start()
    try:
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit(2), 0.01)  # a request's embed budget ran out
        assert await busy == 2
        assert await batcher.submit(3) == 6
        assert batcher.items == 2  # the abandoned item never reached the batch function
    finally:
        await batcher.close()
