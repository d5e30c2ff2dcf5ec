"""Scene co-occurrence counts and the label graphs built from them (SALGL eq. 7-8, 12).

Notation: B batch, n labels, K scenes, k neighbours kept per label in a sparse graph. Counts are
float64 state by default (exact integers up to 2^53 and EMA-able; ``model.head.count_dtype``
float32 halves them), updated under no_grad and never part of the autograd graph. A batch's delta
is built dense while that is small and as blocks over the labels that occur beyond
(``batch_count_delta``), so counting costs O(B m^2) for m labels per image, not O(B K n^2).
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

# Eq. 7's summed delta: the dense (K, n, n) tensor, or ``BlockDelta`` (only the labels that occur).
Delta = Union[Tensor, "BlockDelta"]
# A collective in flight: called, it waits for it and returns the summed delta.
PendingDelta = Callable[[], Delta]
# Sums a batch's count delta over all workers. Takes the batch payload -- scene weights (B, K) and
# multi-hot targets (B, n), both float64 -- and returns the delta summed over workers (a (K, n, n)
# tensor or a ``BlockDelta``), or a ``PendingDelta`` for a collective it has only started: the head
# starts the sync as soon as the scene probabilities exist and waits only where the counts are next
# read, so the collective runs behind the attention (and, counting after use, the propagation and
# classifier). Passing the payload rather than the delta lets a distributed implementation choose
# the cheaper collective (gather the payload, or all-reduce the K n n delta; SPEC section 3).
CountSync = Callable[[Tensor, Tensor], Union[Delta, PendingDelta]]

DIAG_EPS = 1e-8  # released: P = C / (diag + 1e-8), so an unseen label's row is all zeros
# Above this size of the dense (K, n, n) float64 delta, a batch's delta is built as ``BlockDelta``.
DENSE_DELTA_BYTES = 16 * 2**20


def count_delta(scene_weights: Tensor, targets: Tensor) -> Tensor:
    """Eq. 7: sum over the batch of w_bk * y_b y_b^T, one matrix per scene, vectorised.

    scene_weights is one-hot of the argmax scene for hard counting or pi for soft counting.
    In float64, which autocast never lowers (it casts float32 only): the counts come out the
    same under any ``optim.precision``.
    """
    w = scene_weights.to(torch.float64)  # (B, K)
    y = targets.to(torch.float64)  # (B, n)
    return torch.einsum("bk,bi,bj->kij", w, y, y)  # (K, n, n)


class CountBlock(NamedTuple):
    """Part of eq. 7's delta: ``values[a, i, j]`` adds to C^{scenes[a]}[labels[i], labels[j]]."""

    scenes: Tensor  # (s,) int64
    labels: Tensor  # (l,) int64, distinct
    values: Tensor  # (s, l, l) float64


class BlockDelta(NamedTuple):
    """Eq. 7's delta held as dense blocks over the labels that occur, so that its size follows the
    batch (O(B m^2) for m labels per image when counting hard), not the vocabulary (K n^2).

    Hard counting (0 / 1 scene weights) gives one block per scene that has images: the product of
    that scene's label rows, with no factor K from a one-hot. Soft counting gives one block for every
    weighted scene over the union of the batch's labels. Every index of a block is distinct, so
    adding it to the counts is a plain gather and put: the same on every replica and every device.
    """

    blocks: tuple[CountBlock, ...]

    def add_to(self, counts: Tensor) -> None:
        """counts (K, n, n) += this delta, in place."""
        for block in self.blocks:
            scenes, labels = block.scenes.to(counts.device), block.labels.to(counts.device)
            index = (scenes[:, None, None], labels[None, :, None], labels[None, None, :])
            counts.index_put_(index, counts[index] + block.values.to(counts))

    def dense(self, num_scenes: int, num_labels: int) -> Tensor:
        """The (K, n, n) float64 tensor ``count_delta`` gives for the same batch."""
        out = torch.zeros(num_scenes, num_labels, num_labels, dtype=torch.float64)
        self.add_to(out)
        return out


def count_delta_blocks(scene_weights: Tensor, targets: Tensor) -> BlockDelta:
    """Eq. 7 as ``BlockDelta``; equals ``count_delta`` (exactly for 0 / 1 weights and labels)."""
    w = scene_weights.to(torch.float64)  # (B, K)
    y = targets.to(torch.float64)  # (B, n)
    if bool(((w == 0) | (w == 1)).all()):  # hard: each scene counts its own images' label rows
        blocks = []
        for scene in w.any(0).nonzero().flatten():
            rows = y[w[:, scene] == 1]  # (b_k, n)
            labels = rows.any(0).nonzero().flatten()  # (l_k,)
            block = rows[:, labels]  # (b_k, l_k)
            blocks.append(CountBlock(scene.reshape(1), labels, (block.T @ block).unsqueeze(0)))
        return BlockDelta(tuple(blocks))
    scenes = w.any(0).nonzero().flatten()  # (s,)
    labels = (y * w.any(1, keepdim=True)).any(0).nonzero().flatten()  # (l,)
    block = y[:, labels]  # (B, l)
    values = count_delta(w[:, scenes], block)  # (s, l, l): eq. 7 on the weighted scenes and occurring labels
    return BlockDelta((CountBlock(scenes, labels, values),))


def batch_count_delta(scene_weights: Tensor, targets: Tensor) -> Delta:
    """Eq. 7's delta in the cheaper form for its size: the dense (K, n, n) tensor while it is
    small (``DENSE_DELTA_BYTES``; bit for bit what earlier versions counted), else ``BlockDelta``."""
    num_scenes, num_labels = scene_weights.shape[-1], targets.shape[-1]
    if 8 * num_scenes * num_labels * num_labels <= DENSE_DELTA_BYTES:
        return count_delta(scene_weights, targets)
    return count_delta_blocks(scene_weights, targets)


def local_count_delta(scene_weights: Tensor, targets: Tensor) -> Delta:
    """The single-process ``CountSync``: nothing to sum across, the delta is the batch's own."""
    return batch_count_delta(scene_weights, targets)


def resolve_delta(delta: Delta | PendingDelta) -> Delta:
    """What a ``CountSync`` returned -> the summed delta (waiting for a pending collective)."""
    return delta if isinstance(delta, (Tensor, BlockDelta)) else delta()


FLOAT32_EXACT = 2**24  # float32 holds every integer up to here; past it, adding 1 may change nothing


def warn_if_counts_inexact(counts: Tensor) -> bool:
    """Warn (and return True) when float32 counts reach 2^24, past which counting stops being exact.

    Reads the diagonal only (O(K n)): for y y^T counting C^k_ii is the largest entry of its row.
    """
    largest = float(torch.diagonal(counts, dim1=-2, dim2=-1).max()) if counts.numel() else 0.0
    if largest < FLOAT32_EXACT:
        return False
    warnings.warn(
        f"a float32 co-occurrence count reached {largest:.0f} >= 2^24: further counts may be rounded off; "
        "set model.head.count_dtype=float64 for exact counts", RuntimeWarning, stacklevel=3,
    )
    return True


def add_delta(counts: Tensor, delta: Delta) -> None:
    """counts (K, n, n) += a summed delta in either form, in place."""
    if isinstance(delta, BlockDelta):
        delta.add_to(counts)
    else:
        counts.add_(delta.to(counts.device))


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
    counts_t = counts.transpose(-2, -1).to(torch.float64)  # (K, n, n); no copy when already float64
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
