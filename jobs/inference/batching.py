"""Greedy batching for a server's model: whatever is queued when the model is free, in one call.

Ray Serve's ``@serve.batch`` forms a batch on a timer (``batch_wait_timeout_s`` after its first
item) and starts forming the next while the previous one still computes, so under load batches of
1 - 3 images queue up behind the running one: on 2 cores with 16 clients it formed batches of 1 - 5
and served 32 - 50 images/s where one batch of 16 scores 130 (docs/benchmarks.md#serving). Here
the model's thread takes the next batch only once it is free: at low load a lone image is scored at
once, under load every queued image (up to ``max_batch_size``) goes in the next call, so batches
grow with the load by themselves. Two waits refine it: a batch may wait up to ``wait_s`` to fill
(off by default), and up to ``regroup_s`` to reach the size of the batch before it. Clients
answered together come back together, a few milliseconds apart, and without the second wait the
first of them goes alone and holds up the rest for a whole forward pass (batches alternating 1 and
15 at 16 clients); after a batch of 1 nothing waits.

Plain asyncio: the calls run on an executor (one thread), so the event loop keeps taking requests;
an item whose caller has gone (a cancelled future: client disconnected, request timed out) is
dropped before it costs a forward pass.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import Executor
from typing import Any, Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GreedyBatcher(Generic[Item, Result]):
    """``await batcher.submit(item)`` returns ``score(batch)[i]`` for the item's place ``i`` in its batch."""

    def __init__(self, score: Callable[[list[Item]], Sequence[Result]], executor: Executor, *,
                 max_batch_size: int, wait_s: float = 0.0, regroup_s: float = 0.0) -> None:
        if max_batch_size < 1 or wait_s < 0 or regroup_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and the waits >= 0, got {max_batch_size}, {wait_s} and {regroup_s}")
        self._score, self._executor = score, executor
        self.max_batch_size, self.wait_s, self.regroup_s = max_batch_size, wait_s, regroup_s
        self.batch_sizes: Counter[int] = Counter()  # calls per batch size: at most max_batch_size keys
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] | None = None
        self._last_size = 1
        self.waiting = False  # a batch is waiting for more items
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Items waiting for a free model (not those being scored)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: Item) -> Result:
        if self._queue is None:  # created on the serving loop, on first use
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(self._queue))
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run(self, queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(queue)
            if not batch:
                continue
            self.batch_sizes[len(batch)] += 1
            self._last_size = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self._score, [item for item, _ in batch])
            except Exception as err:  # the whole call failed: every caller gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def _next_batch(self, queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]]) -> list[tuple[Item, Any]]:
        """The first queued item, everything queued by then, and what arrives while the batch waits (up
        to ``max_batch_size``); items nobody waits for are left out."""
        batch = [await queue.get()]
        start = asyncio.get_running_loop().time()
        while len(batch) < self.max_batch_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            wait = max(self.wait_s, self.regroup_s if len(batch) < self._last_size else 0.0)
            remaining = start + wait - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self.waiting = True
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
            finally:
                self.waiting = False
        return [(item, future) for item, future in batch if not future.done()]
