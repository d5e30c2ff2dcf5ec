"""Distributed helpers at world size 1 and 2 (gloo, two local processes, no Ray)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.training.distributed import CountDivergenceError, check_counts_consistent, gather_objects, make_count_sync, world
from salgl.graph import count_delta, resolve_delta
from tests._servers import free_port

K, N = 3, 5


def _payload(rank: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    weights = torch.nn.functional.one_hot(torch.randint(0, K, (rows,), generator=gen), K).double()
    targets = (torch.rand(rows, N, generator=gen) < 0.5).double()
    return weights, targets


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


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_batch", [4, 64], ids=["gather-payload", "all-reduce-delta"])
def test_two_workers_sum_the_same_delta_and_detect_divergence(max_batch: int) -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(free_port(), max_batch, results), nprocs=2, join=True)
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


def _resize_worker(rank: int, port: int, steps: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sync, counts = make_count_sync(8), torch.zeros(K, N, N, dtype=torch.float64)
        for step in range(steps):
            counts += resolve_delta(sync(*_payload(10 * step + rank, 4)))
        results[rank] = counts
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_counts_after_a_resize_equal_the_counts_of_the_same_images_in_one_process() -> None:
    """An elastic run (run.min_workers) that loses a worker: two workers count 3 steps, the
    checkpoint keeps rank 0's counts, one worker continues from them for 2 more steps (world size
    1). The counts are those of every image seen, counted in one process."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_resize_worker, args=(free_port(), 3, results), nprocs=2, join=True)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)  # every rank holds the sum
    sync, counts = make_count_sync(8), results[0].clone()  # restored from the checkpoint, now alone
    for step in range(3, 5):
        counts += resolve_delta(sync(*_payload(10 * step, 4)))
    seen = [_payload(10 * step + rank, 4) for step in range(3) for rank in (0, 1)]
    seen += [_payload(10 * step, 4) for step in range(3, 5)]
    expected = count_delta(torch.cat([w for w, _ in seen]), torch.cat([t for _, t in seen]))
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)


def _ddp_worker(rank: int, port: int, results: dict) -> None:
    """Two DDP copies of one head: counts riding the gradient all-reduce against the standalone
    collective, over synced steps and a ``no_sync`` (gradient accumulation) step."""
    from torch.nn.parallel import DistributedDataParallel

    from jobs.training.distributed import count_sync_for
    from salgl.config import HeadConfig
    from salgl.head import SALGLHead

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        head = SALGLHead(HeadConfig(num_scenes=K, steps=2, attn_dim=8, attn_hidden=8, selection="soft", counting="soft"),
                         num_labels=N, token_dim=16, label_dim=8)
        head.label_embeddings.normal_()
        clone = SALGLHead(head.cfg, num_labels=N, token_dim=16, label_dim=8)
        clone.load_state_dict(head.state_dict())
        riding = DistributedDataParallel(head.train(), broadcast_buffers=False)
        separate = DistributedDataParallel(clone.train(), broadcast_buffers=False)
        ride_sync, separate_sync = count_sync_for(riding, 4, count_before_use=False), make_count_sync(4)
        piggyback, fallbacks = ride_sync.__self__, []  # which steps fell back to a separate collective
        # Counting before use needs the sum inside the forward: the separate collective, no hook.
        assert not hasattr(count_sync_for(separate, 4, count_before_use=True), "__self__")
        standalone = piggyback.standalone
        piggyback.standalone = lambda weights, targets: fallbacks.append(step) or standalone(weights, targets)
        gen = torch.Generator().manual_seed(rank)
        same_grads = []
        for step in range(4):
            tokens, y = torch.randn(4 - rank, 5, 16, generator=gen), (torch.rand(4 - rank, N, generator=gen) < 0.5).float()
            grads = []
            for model, sync in ((riding, ride_sync), (separate, separate_sync)):
                context = model.no_sync() if step == 2 else torch.enable_grad()
                with context:
                    out = model(tokens, y, sync=sync, defer_count_update=True)
                    (out.logits.sigmoid().mean() + out.scene_probs.square().mean()).backward()
                model.module.settle_counts()
                grads.append([p.grad.clone() for p in model.parameters()])
                model.zero_grad(set_to_none=True)
            same_grads.append(all(torch.equal(a, b) for a, b in zip(*grads)))
        results[rank] = (head.counts.clone(), clone.counts.clone(), same_grads, fallbacks)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_counts_riding_the_gradient_all_reduce_equal_the_separate_collective() -> None:
    """Soft counting (pi is not an integer) and unequal batches: the ride must be exact, the
    gradients those of DDP's own all-reduce, and a no_sync step must still count."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(free_port(), results), nprocs=2, join=True)
    riding, separate, same_grads, fallbacks = results[0]
    assert fallbacks == [2] and results[1][3] == [2]  # only the no_sync step, where no bucket is reduced
    assert riding.sum() > 0
    torch.testing.assert_close(riding, separate, rtol=0, atol=0)
    torch.testing.assert_close(results[1][0], riding, rtol=0, atol=0)
    assert same_grads == [True] * 4 and results[1][2] == [True] * 4


def _ablation_worker(rank: int, port: int, overrides: dict, results: dict) -> None:
    """Two DDP replicas of a head in an ablation setting, trained a few steps on the full loss."""
    from torch.nn.parallel import DistributedDataParallel

    from salgl.config import HeadConfig, LossConfig
    from salgl.losses import salgl_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from salgl.head import SALGLHead

        torch.manual_seed(0)
        cfg = HeadConfig(**{"num_scenes": K, "steps": 2, "attn_dim": 8, "attn_hidden": 8, **overrides})
        head = SALGLHead(cfg, num_labels=N, token_dim=16, label_dim=8)
        model = DistributedDataParallel(head.train(), broadcast_buffers=False)
        sync = make_count_sync(4)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):  # DDP reports parameters without gradients at the step after they went missing
            tokens, y = torch.randn(4, 5, 16, generator=gen), (torch.rand(4, N, generator=gen) < 0.5).float()
            out = model(tokens, y, sync=sync)
            loss = salgl_loss(out.logits, out.scene_probs, y, LossConfig(), scene_targets=head.scene_targets(y)).total
            loss.backward()
            model.zero_grad(set_to_none=True)
        results[rank] = head.counts.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides", [{"steps": 0}, {"num_scenes": 1}], ids=["T0", "K1"])
def test_ablation_heads_train_under_ddp_with_two_workers(overrides: dict) -> None:
    """T = 0 (no propagation) and K = 1 (no scene targets) train under DDP without unused parameters."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ablation_worker, args=(free_port(), overrides, results), nprocs=2, join=True)
    assert results[0].sum() > 0
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
