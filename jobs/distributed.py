"""Distributed helpers in one place; each degrades to world size 1 without a process group.

The co-occurrence counts are global training state (SPEC section 3): every step each worker's
batch payload is summed across workers in one collective and applied on every replica, and a
cheap checksum checks now and then that no replica diverged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from salgl.graph import CountSync, PendingDelta, count_delta


class CountDivergenceError(RuntimeError):
    """The count matrices differ across workers: training must stop, the graphs are inconsistent."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def make_count_sync(max_batch: int) -> CountSync:
    """The ``CountSync`` for the current process group: one collective per step, started
    asynchronously (the head waits for it only where the counts are next read).

    Gathering the (scene weights, labels) payload moves world * max_batch * (K + n) values, the
    all-reduce of the delta K * n * n; pick whichever is smaller (SPEC section 3). Gathers need
    equal shapes, so short batches are padded with zero-weight rows, which count nothing.
    """
    if world().size == 1:
        return count_delta

    def sync(weights: Tensor, targets: Tensor) -> PendingDelta:
        size = world().size
        num_scenes, num_labels = weights.shape[1], targets.shape[1]
        if size * max_batch * (num_scenes + num_labels) < num_scenes * num_labels * num_labels:
            payload = torch.zeros(max_batch, num_scenes + num_labels, dtype=torch.float64, device=weights.device)
            payload[: weights.shape[0], :num_scenes] = weights
            payload[: targets.shape[0], num_scenes:] = targets
            gathered = torch.empty(size * payload.numel(), dtype=payload.dtype, device=payload.device)
            work = dist.all_gather_single(gathered, payload.reshape(-1), async_op=True)

            def summed_from_payloads() -> Tensor:
                work.wait()
                rows = gathered.reshape(size * max_batch, num_scenes + num_labels)
                return count_delta(rows[:, :num_scenes], rows[:, num_scenes:])

            return summed_from_payloads
        delta = count_delta(weights, targets)
        work = dist.all_reduce(delta, async_op=True)

        def summed_delta() -> Tensor:
            work.wait()
            return delta

        return summed_delta

    return sync


def _all_gather_flat(tensor: Tensor) -> Tensor:
    """Concatenate every rank's tensor (same shape everywhere) into one flat tensor, rank order."""
    out = torch.empty(world().size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_single(out, tensor.contiguous().reshape(-1))
    return out


def counts_fingerprint(counts: Tensor) -> Tensor:
    """Two numbers that change with any entry: the plain sum and a position-weighted sum."""
    flat = counts.detach().reshape(-1).to(torch.float64)
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), (flat * positions.remainder(9973).add(1)).sum()])


@torch.no_grad()
def check_counts_consistent(counts: Tensor, *, step: int) -> None:
    """All-gather a fingerprint of the counts; raise on any difference across ranks."""
    w = world()
    if w.size == 1:
        return
    mine = counts_fingerprint(counts)
    everyone = _all_gather_flat(mine).reshape(w.size, 2)
    if not torch.all(everyone == everyone[0]):
        raise CountDivergenceError(
            f"co-occurrence counts diverged across workers at step {step}: fingerprints "
            f"{everyone.tolist()}. Check that DDP runs with broadcast_buffers=False and that every "
            "worker applies the same summed delta."
        )


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (evaluation scores, ids); [obj] at world size 1."""
    w = world()
    if w.size == 1:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: float) -> float:
    w = world()
    if w.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / w.size


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def on_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` on rank 0 only (returns None elsewhere): the one place rank is checked for I/O."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if world().is_main else None

    return wrapped
