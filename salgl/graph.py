"""Scene co-occurrence counts and the label graphs built from them (SALGL eq. 7-8, 12).

Notation: B batch, n labels, K scenes, k neighbours kept per label in a sparse graph. Counts are
float64 state (exact integers up to 2^53 and EMA-able), updated under no_grad and never part of
the autograd graph.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

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


# ---------------------------------------------------------------------------------------------
# Sparse graphs: each row of P^k keeps its top-k entries (``model.head.graph_top_k``)

# Bound on the (K, rows, n) float64 block of P^k that a sparse graph is built from, one at a time.
GRAPH_BLOCK_BYTES = 64 * 2**20


class SparseGraph(NamedTuple):
    """P^I in sparse form: row i of image b holds weight[b, i, e] at column index[b, i, e].

    A column may repeat within a row (a soft mix lists each scene's neighbours); repeats add up.
    ``index`` may be an expanded view shared by the batch.
    """

    index: Tensor  # (B, n, k) int64
    weight: Tensor  # (B, n, k)


def sparse_conditional_probabilities(
    counts: Tensor, top_k: int, *, self_loops: bool, row_normalize: bool, eps: float = DIAG_EPS,
    block_bytes: int = GRAPH_BLOCK_BYTES,
) -> tuple[Tensor, Tensor]:
    """Eq. 8 keeping each row's ``top_k`` largest P^k_ij: (index (K, n, k) int64, values (K, n, k) float64).

    Equals ``conditional_probabilities`` with all but each row's top-k entries zeroed before the
    released row normalisation (which then divides by the kept entries' sum, so messages keep the
    dense graph's scale). Built row block by row block, so no (K, n, n) float temporary exists.
    """
    num_scenes, n, _ = counts.shape
    rows = max(1, block_bytes // (8 * num_scenes * n))
    blocks = [_top_k_rows(counts, r0, min(n, r0 + rows), top_k, self_loops, eps) for r0 in range(0, n, rows)]
    index = torch.cat([b[0] for b in blocks], dim=1)  # (K, n, k)
    values = torch.cat([b[1] for b in blocks], dim=1)  # (K, n, k)
    if row_normalize:
        values = values / (values.sum(-1, keepdim=True) + eps)
    return index, values


def _top_k_rows(counts: Tensor, r0: int, r1: int, top_k: int, self_loops: bool, eps: float) -> tuple[Tensor, Tensor]:
    """Rows r0..r1 of eq. 8 (as ``conditional_probabilities`` computes them) -> their top-k (index, value)."""
    counts_t = counts[:, :, r0:r1].transpose(-2, -1).to(torch.float64)  # (K, c, n): C^T's rows, as released
    diag = torch.diagonal(counts, dim1=-2, dim2=-1)[:, r0:r1].unsqueeze(-1).to(torch.float64)  # (K, c, 1)
    probs = counts_t / (diag + eps)  # (K, c, n)
    if not self_loops:
        rows = torch.arange(r0, r1, device=counts.device)
        probs[:, rows - r0, rows] = 0.0
    values, index = probs.topk(top_k, dim=-1, sorted=False)  # (K, c, k)
    return index, values


def select_sparse_graph(index: Tensor, values: Tensor, scene_probs: Tensor, mode: str) -> SparseGraph:
    """Eq. 12 on sparse P^k: index, values (K, n, k), scene_probs (B, K) -> P^I as a ``SparseGraph``.

    ``hard``: the argmax scene's rows (B, n, k). ``soft``: sum_k pi_k P^k lists every scene's
    neighbours, (B, n, K k) with the index shared by the batch, weights pi_k P^k_ij (with pi's
    gradient).
    """
    if mode == "hard":
        scene = scene_probs.argmax(-1)  # (B,)
        return SparseGraph(index.index_select(0, scene), values.index_select(0, scene).to(scene_probs.dtype))
    num_scenes, n, k = index.shape
    shared = index.transpose(0, 1).reshape(n, num_scenes * k)  # (n, K k)
    weight = torch.einsum("bs,sne->bnse", scene_probs, values.to(scene_probs.dtype))  # (B, n, K, k)
    return SparseGraph(shared.expand(scene_probs.shape[0], n, num_scenes * k), weight.reshape(-1, n, num_scenes * k))
