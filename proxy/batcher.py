"""``MicroBatcher``: items from concurrent requests share one call of a batch function.

The embedder is far cheaper per image in a batch than one at a time, and requests arrive one
at a time. The batcher queues items and lets one consumer task hand whatever is waiting (up to
``max_batch``, after at most ``max_wait`` seconds for stragglers) to the batch function in a
dedicated executor, off the event loop. The queue is bounded: when it is full, ``submit`` raises
``BatcherSaturated`` at once and the caller goes on without the result (the request goes upstream
as a miss) instead of waiting behind a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherSaturated(Exception):
    """The batcher's queue is full; the item was not accepted."""


class MicroBatcher(Generic[T, R]):
    """Runs ``run_batch`` on batches of submitted items in ``executor``."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        executor: Executor,
        *,
        max_batch: int,
        max_wait: float,
        max_queue: int,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue(max_queue)
        self._consumer: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0
        self.rejected = 0

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the consumer task (on the running loop)."""
        self._consumer = asyncio.create_task(self._consume(), name="vlcache-micro-batcher")

    async def close(self) -> None:
        """Stop the consumer; items still queued fail with ``BatcherSaturated``."""
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(BatcherSaturated("batcher closed"))

    async def submit(self, item: T) -> R:
        """The result for ``item``, computed in a batch; ``BatcherSaturated`` when full."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            self.rejected += 1
            raise BatcherSaturated(f"{self._queue.maxsize} items already waiting") from None
        return await future

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait
            while len(batch) < self._max_batch:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
                else:
                    batch.append(self._queue.get_nowait())
            live = [(item, future) for item, future in batch if not future.cancelled()]
            if live:
                await self._run(loop, live)

    async def _run(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[R]]]
    ) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [item for item, _ in batch]
            )
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    future.set_exception(BatcherSaturated("batcher closed"))
            raise
        except Exception as exc:  # the batch function's failure is each caller's failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
