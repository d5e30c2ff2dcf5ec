"""Scene co-occurrence counts and the label graphs built from them (SALGL eq. 7-8, 12).

Notation: B batch, n labels, K scenes. Counts are float64 state (exact integers up to 2^53 and
EMA-able), updated under no_grad and never part of the autograd graph.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

# A collective in flight: called, it waits for it and returns the summed (K, n, n) delta.
PendingDelta = Callable[[], Tensor]
# Sums a batch's count delta over all workers. Takes the batch payload -- scene weights (B, K) and
# multi-hot targets (B, n), both float64 -- and returns the (K, n, n) delta summed over workers, or
# a ``PendingDelta`` for a collective it has only started: the head starts the sync as soon as the
# scene probabilities exist and waits only where the counts are next read, so the collective runs
# behind the attention (and, counting after use, the propagation and classifier). Passing the
# payload rather than the delta lets a distributed implementation choose the cheaper collective
# (gather the payload, or all-reduce the K n n delta; SPEC section 3).
CountSync = Callable[[Tensor, Tensor], Union[Tensor, PendingDelta]]

DIAG_EPS = 1e-8  # released: P = C / (diag + 1e-8), so an unseen label's row is all zeros


def count_delta(scene_weights: Tensor, targets: Tensor) -> Tensor:
    """Eq. 7: sum over the batch of w_bk * y_b y_b^T, one matrix per scene, vectorised.

    scene_weights is one-hot of the argmax scene for hard counting or pi for soft counting.
    In float64, which autocast never lowers (it casts float32 only): the counts come out the
    same under any ``optim.precision``.
    """
    w = scene_weights.to(torch.float64)  # (B, K)
    y = targets.to(torch.float64)  # (B, n)
    return torch.einsum("bk,bi,bj->kij", w, y, y)  # (K, n, n)


def local_count_delta(scene_weights: Tensor, targets: Tensor) -> Tensor:
    """The single-process ``CountSync``: nothing to sum across, the delta is the batch's own."""
    return count_delta(scene_weights, targets)


def resolve_delta(delta: Tensor | PendingDelta) -> Tensor:
    """What a ``CountSync`` returned -> the summed delta (waiting for a pending collective)."""
    return delta if isinstance(delta, Tensor) else delta()


def scene_weights_for_counting(scene_probs: Tensor, mode: str) -> Tensor:
    """Hard counting credits the argmax scene only; soft counting credits every scene by pi_k."""
    if mode == "hard":
        num_scenes = scene_probs.shape[-1]
        return torch.nn.functional.one_hot(scene_probs.argmax(-1), num_scenes).to(torch.float64)
    return scene_probs.detach().to(torch.float64)


def conditional_probabilities(
    counts: Tensor, *, self_loops: bool, row_normalize: bool, eps: float = DIAG_EPS
) -> Tensor:
    """Eq. 8: P^k_ij = C^k_ji / C^k_ii (probability of label j given label i within scene k).

    Released options: zero the diagonal (``self_loops=False``; eq. 13 sums over j != i) and divide
    each row by its sum (``row_normalize``). Computed in float64; shape (K, n, n).
    """
    # Counting y y^T keeps C symmetric, so C_ji = C_ij; reading C^T as released keeps a loaded
    # checkpoint's (possibly asymmetric) counts giving exactly the released graph.
    counts_t = counts.transpose(-2, -1)  # (K, n, n)
    diag = torch.diagonal(counts_t, dim1=-2, dim2=-1).unsqueeze(-1)  # (K, n, 1)
    probs = counts_t / (diag + eps)  # (K, n, n)
    if not self_loops:
        probs = probs * (1.0 - torch.eye(probs.shape[-1], dtype=probs.dtype, device=probs.device))
    if row_normalize:
        probs = probs / (probs.sum(-1, keepdim=True) + eps)
    return probs


def select_graph(probs: Tensor, scene_probs: Tensor, mode: str) -> Tensor:
    """Eq. 12: the image's label graph P^I.

    ``soft``: sum_k pi_k P^k (the paper); ``hard``: P of the argmax scene (released default).
    probs (K, n, n) float64, scene_probs (B, K) -> (B, n, n) in scene_probs' dtype.
    """
    if mode == "hard":
        graph = probs.index_select(0, scene_probs.argmax(-1))  # (B, n, n)
        return graph.to(scene_probs.dtype)
    num_scenes, n, _ = probs.shape
    mixed = scene_probs @ probs.to(scene_probs.dtype).reshape(num_scenes, n * n)  # (B, n*n)
    return mixed.reshape(-1, n, n)
