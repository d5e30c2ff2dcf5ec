"""Distributed helpers in one place; each degrades to world size 1 without a process group.

The co-occurrence counts are global training state (SPEC section 3): every step each worker's
batch payload is summed across workers in one collective and applied on every replica, and a
cheap checksum checks now and then that no replica diverged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from salgl.graph import CountSync, Delta, PendingDelta, batch_count_delta, count_delta, local_count_delta, resolve_delta


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


def padded_payload(weights: Tensor, targets: Tensor, max_batch: int) -> Tensor:
    """A batch's (scene weights, labels) rows, (max_batch, K + n) float64; short batches are
    padded with zero-weight rows, which count nothing (collectives need equal shapes)."""
    num_scenes = weights.shape[1]
    payload = torch.zeros(max_batch, num_scenes + targets.shape[1], dtype=torch.float64, device=weights.device)
    payload[: weights.shape[0], :num_scenes] = weights
    payload[: targets.shape[0], num_scenes:] = targets
    return payload


def delta_from_payloads(flat: Tensor, num_scenes: int, num_labels: int) -> Delta:
    """Eq. 7's delta from every rank's ``padded_payload``, concatenated and flattened: dense while
    small, else blocks over the labels that occur (``salgl.graph.batch_count_delta``)."""
    rows = flat.to(torch.float64).reshape(-1, num_scenes + num_labels)
    return batch_count_delta(rows[:, :num_scenes], rows[:, num_scenes:])


def make_count_sync(max_batch: int) -> CountSync:
    """The ``CountSync`` for the current process group: one collective per step, started
    asynchronously (the head waits for it only where the counts are next read).

    Gathering the (scene weights, labels) payload moves world * max_batch * (K + n) values, the
    all-reduce of the delta K * n * n; pick whichever is smaller (SPEC section 3). Gathers need
    equal shapes, so short batches are padded with zero-weight rows, which count nothing.
    """
    if world().size == 1:
        return local_count_delta

    def sync(weights: Tensor, targets: Tensor) -> PendingDelta:
        size = world().size
        num_scenes, num_labels = weights.shape[1], targets.shape[1]
        if size * max_batch * (num_scenes + num_labels) < num_scenes * num_labels * num_labels:
            payload = padded_payload(weights, targets, max_batch)
            gathered = torch.empty(size * payload.numel(), dtype=payload.dtype, device=payload.device)
            work = dist.all_gather_single(gathered, payload.reshape(-1), async_op=True)

            def summed_from_payloads() -> Delta:
                work.wait()
                return delta_from_payloads(gathered, num_scenes, num_labels)

            return summed_from_payloads
        delta = count_delta(weights, targets)
        work = dist.all_reduce(delta, async_op=True)

        def summed_delta() -> Tensor:
            work.wait()
            return delta

        return summed_delta

    return sync


class CountPiggyback:
    """Carries a step's count payload in DDP's last gradient bucket, so a step that all-reduces its
    gradients runs one collective instead of two. On 2 CPU cores the separate gloo all-reduce cost
    about 0.7 ms of a 48 ms step, overlapped or not: its thread competes with the step for a core.

    ``sync`` (a ``CountSync``) only stages the payload; ``hook`` (registered with
    ``DistributedDataParallel.register_comm_hook``) appends it to the last bucket's all-reduce; the
    returned ``PendingDelta`` reads the sum after the backward (the head's deferred update). Each
    rank writes its (scene weights, labels) rows into its own slot of a zero (world, max_batch,
    K + n) block, so the sum is the gather (SPEC section 3's payload, whatever its size next to the
    K n n delta: inside the gradients' all-reduce its bytes are marginal, and it travels exactly).
    The weights are one-hot or pi, computed in the model's dtype, and the labels 0 / 1, so the
    gradient bucket (the model's dtype) carries them exactly and every rank computes the float64
    delta from the same rows, as the standalone gather does. Gradients are averaged as DDP's own
    all-reduce hook averages them.

    A ``no_sync`` micro-step of gradient accumulation reduces no bucket, so its payload goes by
    ``standalone`` (started at once, as without DDP); so does a step whose backward did not carry it.
    Every rank is in the same case, so every rank runs the same collectives.
    """

    def __init__(self, model: torch.nn.parallel.DistributedDataParallel, max_batch: int, standalone: CountSync) -> None:
        self.model = model
        self.max_batch = max_batch
        self.standalone = standalone
        self._outgoing: Tensor | None = None  # this rank's slot of the block, flat
        self._summed: Tensor | None = None  # the block summed over ranks, after the backward

    def sync(self, weights: Tensor, targets: Tensor) -> Delta | PendingDelta:
        if not self.model.require_backward_grad_sync:  # inside DDP's no_sync()
            return self.standalone(weights, targets)
        w = world()
        num_scenes, num_labels = weights.shape[1], targets.shape[1]
        payload = padded_payload(weights, targets, self.max_batch)
        block = torch.zeros((w.size, *payload.shape), dtype=payload.dtype, device=payload.device)
        block[w.rank] = payload
        self._outgoing, self._summed = block.reshape(-1), None

        def summed_from_bucket() -> Delta:
            summed, self._outgoing, self._summed = self._summed, None, None
            if summed is None:  # no bucket was reduced this step
                return resolve_delta(self.standalone(weights, targets))
            return delta_from_payloads(summed, num_scenes, num_labels)

        return summed_from_bucket

    def hook(self, state, bucket):  # type: ignore[no-untyped-def]
        # (state: None, bucket: dist.GradBucket) -> Future[Tensor]. Unannotated: DDP checks the
        # annotations against the classes, and this module's annotations are strings.
        grads = bucket.buffer()
        outgoing = self._outgoing if bucket.is_last() else None
        if outgoing is None:
            return default_hooks.allreduce_hook(None, bucket)
        self._outgoing = None
        flat = torch.cat([grads.div_(world().size), outgoing.to(grads.dtype)])

        def split(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
            summed = fut.value()[0]
            self._summed = summed[grads.numel():]
            return summed[: grads.numel()]

        return dist.all_reduce(flat, async_op=True).get_future().then(split)


def count_sync_for(model: torch.nn.Module, max_batch: int, *, count_before_use: bool) -> CountSync:
    """The step's ``CountSync``: riding DDP's gradient all-reduce (``CountPiggyback``, its hook
    registered here) when ``model`` is wrapped in DDP and counts after use, so the head can leave
    the update pending until after the backward; else ``make_count_sync``, whose collective runs
    behind the attention (counting before use needs the sum before P is built)."""
    standalone = make_count_sync(max_batch)
    if count_before_use or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return standalone
    piggyback = CountPiggyback(model, max_batch, standalone)
    model.register_comm_hook(None, piggyback.hook)
    return piggyback.sync


def _all_gather_flat(tensor: Tensor) -> Tensor:
    """Concatenate every rank's tensor (same shape everywhere) into one flat tensor, rank order."""
    out = torch.empty(world().size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_single(out, tensor.contiguous().reshape(-1))
    return out


# Entries of the counts read per block by ``counts_fingerprint`` (a view for float64 counts; 128 MiB
# of float64 for float32 counts). Blocks of ~200 rows at n = 10,000 ran 3x slower on 2 CPU cores.
FINGERPRINT_BLOCK = 2**24


def counts_fingerprint(counts: Tensor, block: int = FINGERPRINT_BLOCK) -> Tensor:
    """Two numbers that change with any entry: the plain sum and a position-weighted sum, the
    weight of entry (r, c) of the (K n, n) rows being (r mod 9973 + 1)(c mod 9973 + 1).

    One pass of matrix-vector products over blocks of rows, so the check reads the counts once and
    needs O(block) memory besides them, not copies of all K n^2 (gigabytes at n = 10,000). Every rank
    reads the same blocks in the same order, so equal counts give bit-equal fingerprints.
    """
    rows = counts.detach().reshape(-1, counts.shape[-1])  # (K n, n)
    num_rows, n = rows.shape
    col_weight = torch.arange(n, dtype=torch.float64, device=rows.device).remainder(9973).add(1)  # (n,)
    step = max(1, block // max(1, n))
    total = torch.zeros(2, dtype=torch.float64, device=rows.device)
    for r0 in range(0, num_rows, step):
        part = rows[r0 : r0 + step].to(torch.float64)  # (r, n)
        row_weight = torch.arange(r0, r0 + part.shape[0], dtype=torch.float64, device=rows.device).remainder(9973).add(1)
        total += torch.stack([part.sum(), (part @ col_weight) @ row_weight])
    return total


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

