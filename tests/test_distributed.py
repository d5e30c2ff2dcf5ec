"""Distributed helpers at world size 1 and 2 (gloo, two local processes, no Ray)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.distributed import CountDivergenceError, check_counts_consistent, gather_objects, make_count_sync, world
from salgl.graph import count_delta, resolve_delta

K, N = 3, 5


def _payload(rank: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    weights = torch.nn.functional.one_hot(torch.randint(0, K, (rows,), generator=gen), K).double()
    targets = (torch.rand(rows, N, generator=gen) < 0.5).double()
    return weights, targets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, max_batch: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sync = make_count_sync(max_batch)
        rows = 4 if rank == 0 else 3  # unequal last batches are padded with zero-weight rows
        delta = resolve_delta(sync(*_payload(rank, rows)))  # started asynchronously, then waited for
        counts = delta.clone()
        check_counts_consistent(counts, step=1)
        gathered = gather_objects({"rank": rank})
        diverged = False
        if rank == 1:
            counts[0, 0, 0] += 1
        try:
            check_counts_consistent(counts, step=2)
        except CountDivergenceError:
            diverged = True
        results[rank] = (delta, gathered, diverged, world().size)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_batch", [4, 64], ids=["gather-payload", "all-reduce-delta"])
def test_two_workers_sum_the_same_delta_and_detect_divergence(max_batch: int) -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), max_batch, results), nprocs=2, join=True)
    expected = count_delta(*_payload(0, 4)) + count_delta(*_payload(1, 3))
    for rank in (0, 1):
        delta, gathered, diverged, size = results[rank]
        torch.testing.assert_close(delta, expected, rtol=0, atol=0)
        assert gathered == [{"rank": 0}, {"rank": 1}] and diverged and size == 2


def test_world_size_one_degrades_to_local() -> None:
    assert world().size == 1 and world().is_main
    weights, targets = _payload(0, 4)
    torch.testing.assert_close(make_count_sync(4)(weights, targets), count_delta(weights, targets))
    check_counts_consistent(torch.zeros(K, N, N), step=0)
    assert gather_objects(7) == [7]
