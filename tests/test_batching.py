"""``jobs.inference.batching.GreedyBatcher``: batches that grow with the load, without Ray.

The scoring function blocks on events the test sets, so what is queued while the model is busy is
known exactly: a lone item is scored at once, everything queued during a call goes in the next one
(up to the batch size), a caller that has gone costs no forward pass, and a failed call fails its
callers only.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from jobs.inference.batching import GreedyBatcher


class GatedScore:
    """Doubles its items; each call waits for the test to open the gate, and records its batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.release()
        self.gate.acquire(timeout=30)
        if -1 in items:
            raise RuntimeError("the model failed")
        return [2 * i for i in items]


async def wait_started(score: GatedScore) -> None:
    assert await asyncio.to_thread(score.started.acquire, True, 30), "the model was never called"


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def test_a_lone_item_is_scored_at_once_and_the_queue_goes_in_the_next_call() -> None:
    async def scenario() -> None:
        score = GatedScore()
        with ThreadPoolExecutor(1) as pool:
            batcher = GreedyBatcher(score, pool, max_batch_size=4)
            first = asyncio.create_task(batcher.submit(1))
            await wait_started(score)  # scoring [1]; the next six arrive while it runs
            rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 8)]
            while batcher.queued < 6:
                await asyncio.sleep(0)  # let the submits enqueue (event-loop turns, not time)
            for _ in range(3):
                score.gate.release()
            assert await first == 2
            assert await asyncio.gather(*rest) == [4, 6, 8, 10, 12, 14]
        assert score.batches == [[1], [2, 3, 4, 5], [6, 7]]
        assert batcher.batch_sizes == {1: 1, 4: 1, 2: 1}

    run(scenario())


def test_items_whose_callers_have_gone_are_not_scored() -> None:
    async def scenario() -> None:
        score = GatedScore()
        with ThreadPoolExecutor(1) as pool:
            batcher = GreedyBatcher(score, pool, max_batch_size=8)
            first = asyncio.create_task(batcher.submit(1))
            await wait_started(score)
            gone = asyncio.create_task(batcher.submit(2))
            kept = asyncio.create_task(batcher.submit(3))
            while batcher.queued < 2:
                await asyncio.sleep(0)
            gone.cancel()  # a client that disconnected, or a request that timed out
            score.gate.release()
            score.gate.release()
            assert (await first, await kept) == (2, 6)
        assert score.batches == [[1], [3]]

    run(scenario())


def test_a_failed_call_fails_its_callers_and_the_next_call_runs() -> None:
    async def scenario() -> None:
        score = GatedScore()
        with ThreadPoolExecutor(1) as pool:
            batcher = GreedyBatcher(score, pool, max_batch_size=8)
            score.gate.release()
            with pytest.raises(RuntimeError, match="the model failed"):
                await batcher.submit(-1)
            score.gate.release()
            assert await batcher.submit(5) == 10

    run(scenario())


def test_a_wait_lets_a_batch_fill_before_the_first_call() -> None:
    async def scenario() -> None:
        score = GatedScore()
        score.gate.release()
        with ThreadPoolExecutor(1) as pool:
            batcher = GreedyBatcher(score, pool, max_batch_size=3, wait_s=30.0)  # full long before 30 s
            assert await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3))) == [2, 4, 6]
        assert score.batches == [[1, 2, 3]]

    run(scenario())


def test_a_lone_first_item_goes_at_once_and_after_a_batch_of_three_the_next_regroups_to_three() -> None:
    async def scenario() -> None:
        score = GatedScore()
        with ThreadPoolExecutor(1) as pool:
            batcher = GreedyBatcher(score, pool, max_batch_size=8, regroup_s=1000.0)  # a wrong wait would time out
            first = asyncio.create_task(batcher.submit(0))
            await wait_started(score)  # alone, at once: no batch before it
            three = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
            while batcher.queued < 3:
                await asyncio.sleep(0)
            score.gate.release()
            await wait_started(score)
            score.gate.release()
            await asyncio.gather(first, *three)
            regrouped = [asyncio.create_task(batcher.submit(4))]
            while not batcher.waiting:
                await asyncio.sleep(0)  # 4 waits for company
            regrouped += [asyncio.create_task(batcher.submit(i)) for i in (5, 6)]
            await wait_started(score)
            score.gate.release()
            assert await asyncio.gather(*regrouped) == [8, 10, 12]
        assert score.batches == [[0], [1, 2, 3], [4, 5, 6]]

    run(scenario())


@pytest.mark.parametrize("size, wait", [(0, 0.0), (4, -1.0)])
def test_bad_settings_are_refused(size: int, wait: float) -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        GreedyBatcher(lambda items: items, ThreadPoolExecutor(1), max_batch_size=size, wait_s=wait)
