"""The building blocks of the SALGL head, each a pure module.

Notation: B batch, m regions (tokens), n labels, K scenes, d = d_I token dim, d_L label dim,
d1 / d2 attention dims, k neighbours per label in a sparse graph. Equation numbers are those of
the SALGL paper (ICCV 2023).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from salgl import native
from salgl.graph import SparseGraph


class SemanticAttention(nn.Module):
    """Low-rank bilinear attention of every label over the regions (eq. 1-3).

    x_ij = P^T tanh((U^T v_j) * (V^T t_i)) + b,  alpha_ij = softmax_j Phi_a(x_ij),  f_i = sum_j alpha_ij v_j.

    Phi_a is linear and follows P with no nonlinearity between (as released), so the two compose
    into one d1-vector p = P w_a: the score is p . tanh(...) + const. That avoids applying the
    d1 x d2 matrix P to every (label, region) pair, which is most of the released module's cost.
    What is left is elementwise work on a (B, n, m, d1) intermediate (2 GB at COCO size), done by
    ``bilinear_tanh_scores`` in one fused pass on CPU, or tile by tile in one buffer of at most
    ``chunk_mb``, and recomputed in its analytic backward, so memory stays bounded at any n and m.
    """

    def __init__(self, token_dim: int, label_dim: int, *, attn_dim: int, hidden_dim: int, chunk_mb: int = 64) -> None:
        super().__init__()
        self.region_proj = nn.Linear(token_dim, attn_dim, bias=False)  # U^T
        self.label_proj = nn.Linear(label_dim, attn_dim, bias=False)  # V^T
        self.hidden = nn.Linear(attn_dim, hidden_dim)  # P, b
        self.score = nn.Linear(hidden_dim, 1)  # Phi_a
        self.chunk_bytes = chunk_mb * 2**20

    def forward(self, tokens: Tensor, label_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, m, d), label_embeddings (n, d_L) -> label features (B, n, d), alpha (B, n, m)."""
        regions = self.region_proj(tokens)  # (B, m, d1)
        labels = self.label_proj(label_embeddings)  # (n, d1)
        direction = (self.score.weight @ self.hidden.weight).squeeze(0)  # (d1,) = P w_a
        # Constant over regions, so it leaves alpha unchanged; kept so x_ij's value is the released one.
        offset = self.score.weight @ self.hidden.bias + self.score.bias  # (1,)
        # Cache-sized tiles pay off on CPU; on an accelerator, fewer and larger launches do.
        tile_bytes = min(self.chunk_bytes, TILE_BYTES) if regions.device.type == "cpu" else self.chunk_bytes
        scores = bilinear_tanh_scores(regions, labels, direction, tile_bytes=tile_bytes) + offset  # (B, n, m)
        alpha = scores.softmax(dim=-1)  # (B, n, m)
        return alpha @ tokens, alpha  # (B, n, d), (B, n, m)


# Tiles of the (B, n, m, d1) intermediate are kept near this size (COCO: 5 labels of one image):
# small enough to stay in cache across the several passes made over each tile, large enough that
# the number of ops, each with a fixed dispatch and thread-barrier cost, stays small. Measured on
# 2 cores with tests/bench/head_step.py: 1 MB tiles were slower than 4 MB, 8 MB no faster.
TILE_BYTES = 4 * 2**20


def bilinear_tanh_scores(regions: Tensor, labels: Tensor, direction: Tensor, *, tile_bytes: int = TILE_BYTES) -> Tensor:
    """s[b, i, j] = p . tanh(u_bj * v_i): regions u (B, m, d1), labels v (n, d1), direction p (d1,) -> (B, n, m).

    Differentiable in all three inputs; the (B, n, m, d1) intermediate never exists whole, only
    one tile of at most ``tile_bytes`` (and at least one (m, d1) slice) at a time.
    """
    return _BilinearTanhScores.apply(regions, labels, direction, tile_bytes)


def _tiles(regions: Tensor, num_labels: int, tile_bytes: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, label slice) pairs covering (B, n) in tiles (bb, c, m, d1) of about ``tile_bytes``.

    Label blocks of one batch row when an (m, d1) slice is large (COCO: 0.8 MB), blocks of batch
    rows with all labels when it is small; either way a tile's scores are one contiguous block of
    the (B, n, m) output.
    """
    batch, num_regions, attn_dim = regions.shape
    pairs = max(1, tile_bytes // max(1, num_regions * attn_dim * regions.element_size()))  # (row, label) pairs
    labels_per_tile = min(num_labels, pairs)
    rows_per_tile = pairs // num_labels if labels_per_tile == num_labels else 1
    for b0 in range(0, batch, rows_per_tile):
        for i0 in range(0, num_labels, labels_per_tile):
            yield slice(b0, b0 + rows_per_tile), slice(i0, i0 + labels_per_tile)


class _BilinearTanhScores(torch.autograd.Function):
    """Forward and analytic backward of ``bilinear_tanh_scores``: on CPU in float32 by the fused C
    kernel of ``salgl.native`` (one pass each way, never storing the intermediate), otherwise
    (an accelerator, float64, no C compiler) with PyTorch ops tile by tile in one buffer.

    Why not autograd on the plain expression: autograd would save each tile's tanh (2 GB in all)
    or, under activation checkpointing, rerun the forward and then make a separate pass with a
    fresh temporary in main memory for every elementwise op of the backward. Here one cache-sized
    buffer is reused in place, and the backward recomputes each tile instead of storing it.

    tanh goes through the logistic function, s = sigmoid(2x): tanh(x) = 2s - 1 and
    1 - tanh(x)^2 = 4 s (1 - s). PyTorch's CPU sigmoid is about three times faster than its tanh,
    and with s the affine parts fold into the reductions. Per tile, with x = u_j * v_i, g = dL/d score:

        forward   score = p . t = 2 p.s - sum(p)
        backward  dp = sum g t = 2 sum g s - sum g
                  w = g s (1 - s)                         (g (1 - t^2) / 4)
                  du_j = 4 p * sum_i w v_i,    dv_i = 4 p * sum_bj w u_j

    p, the factor 4 and the constants are applied once at the end, on the small results: per tile
    that is 3 passes forward and 7 + c backward. Rounding: these sums carry errors of order
    eps * sum |p| (or sum |g|) rather than eps * sum |p t|, the same order for t of order one.
    """

    @staticmethod
    def forward(ctx: Any, regions: Tensor, labels: Tensor, direction: Tensor, tile_bytes: int) -> Tensor:
        ctx.save_for_backward(regions, labels, direction)
        ctx.tile_bytes = tile_bytes
        if native.usable(regions, labels, direction):
            weighted = native.logistic_dot(regions, labels, direction)
        else:
            weighted = _tiled_logistic_dot(regions, labels, direction, tile_bytes)
        return weighted.mul_(2).sub_(direction.sum())  # p . (2s - 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        regions, labels, direction = ctx.saved_tensors
        if native.usable(regions, labels, grad):
            sums = native.logistic_grad_sums(regions, labels, grad)
        else:
            sums = _tiled_logistic_grad_sums(regions, labels, grad, ctx.tile_bytes)
        d_regions, d_labels, d_direction = sums  # sum_i w v_i, sum_bj w u_j, sum g s
        scale = 4 * direction  # (d1,)
        return d_regions.mul_(scale), d_labels.mul_(scale), d_direction.mul_(2).sub_(grad.sum()), None


def _tiled_logistic_dot(regions: Tensor, labels: Tensor, direction: Tensor, tile_bytes: int) -> Tensor:
    """p . s over d1 for every (b, i, j), s = sigmoid(2 u_bj * v_i), tile by tile -> (B, n, m)."""
    (batch, num_regions, attn_dim), num_labels = regions.shape, labels.shape[0]
    doubled = 2 * labels  # (n, d1): the 2 of sigmoid(2x), folded into the product
    out = regions.new_empty(batch, num_labels, num_regions)  # (B, n, m)
    buffer = regions.new_empty(0)
    for rows, cols in _tiles(regions, num_labels, tile_bytes):
        s = _logistic_tile(regions[rows], doubled[cols], buffer)  # (bb, c, m, d1)
        torch.mv(s.view(-1, attn_dim), direction, out=out[rows, cols].view(-1))  # a contiguous block
    return out


def _tiled_logistic_grad_sums(regions: Tensor, labels: Tensor, grad: Tensor, tile_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sum_i w v_i (B, m, d1), sum_bj w u_j (n, d1), sum g s (d1,)) with w = g s (1 - s), tile by tile."""
    grad = grad.contiguous()  # (B, n, m): a tile's block is viewed flat
    doubled = 2 * labels  # (n, d1)
    d_regions = torch.zeros_like(regions)  # (B, m, d1)
    d_labels = torch.zeros_like(labels)  # (n, d1)
    d_direction = regions.new_zeros(regions.shape[-1])  # (d1,)
    buffer = regions.new_empty(0)
    for rows, cols in _tiles(regions, labels.shape[0], tile_bytes):
        g = grad[rows, cols]  # (bb, c, m)
        s = _logistic_tile(regions[rows], doubled[cols], buffer)  # (bb, c, m, d1)
        d_direction.addmv_(s.view(-1, s.shape[-1]).t(), g.view(-1))
        w = torch.addcmul(s, s, s, value=-1, out=s).mul_(g.unsqueeze(-1))  # s (1 - s) g, in place
        d_rows = d_regions[rows]  # (bb, m, d1)
        for k, label in enumerate(labels[cols]):  # one fused pass per label: du += w_i v_i
            d_rows.addcmul_(w[:, k], label)
        d_labels[cols].add_(w.mul_(regions[rows].unsqueeze(1)).sum(dim=(0, 2)))  # (c, d1)
    return d_regions, d_labels, d_direction


def _logistic_tile(regions: Tensor, doubled: Tensor, buffer: Tensor) -> Tensor:
    """sigmoid(2 u_j * v_i) for a tile: regions u (bb, m, d1), doubled 2v (c, d1) -> (bb, c, m, d1).

    Written into ``buffer``, resized in place, so one allocation serves every tile.
    """
    bb, num_regions, attn_dim = regions.shape
    tile = buffer.resize_(bb, doubled.shape[0], num_regions, attn_dim)
    torch.mul(regions.unsqueeze(1), doubled[:, None, :], out=tile)  # (bb, c, m, d1)
    return tile.sigmoid_()


class SceneClassifier(nn.Module):
    """Scene detection (eq. 4-6): pi = softmax(W mean_j v_j); each row of W is a scene prototype."""

    def __init__(self, token_dim: int, num_scenes: int) -> None:
        super().__init__()
        self.prototypes = nn.Linear(token_dim, num_scenes, bias=False)  # W: (K, d)

    def forward(self, tokens: Tensor) -> Tensor:
        # In the weights' precision even under autocast: pi picks the count matrix each image adds
        # to (eq. 7), and a bfloat16 rounding could flip a near-tie, so the counts would depend on
        # the precision. (B, d) x (d, K) is too small for the lower precision to save anything.
        with torch.autocast(tokens.device.type, enabled=False):
            pooled = tokens.mean(dim=1, dtype=self.prototypes.weight.dtype)  # (B, d)
            return self.prototypes(pooled).softmax(dim=-1)  # (B, K)


class GatedPropagation(nn.Module):
    """Gated graph propagation (eq. 13-14), weights shared across the T steps.

    Messages: ``in`` m_i = sum_j P_ij h_j (released default), ``out`` m_i = sum_j P_ji h_j (eq. 13),
    ``both`` concatenates [in, out] (GRU input 2d). Gated update as released:
    z = sigma(W1 x + U1 h), r = sigma(W2 x + U2 h), c = tanh(W3 x + U3 (r * h)), h' = (1 - z) h + z c.
    W1..W3 run as one (in, 3d) matmul and U1, U2 as one (d, 2d) matmul: same maths, fewer passes.
    """

    def __init__(self, dim: int, *, steps: int, message: str, recompute: bool = False) -> None:
        super().__init__()
        self.steps = steps
        self.message = message
        # Activation checkpointing per step: the backward keeps each h^t and recomputes that step's
        # messages and gates, instead of keeping all T steps' (about ten (B, n, d) tensors each).
        self.recompute = recompute
        in_dim = 2 * dim if message == "both" else dim
        self.input_proj = nn.Linear(in_dim, 3 * dim)  # [W1; W2; W3]
        self.hidden_gates = nn.Linear(dim, 2 * dim)  # [U1; U2]
        self.hidden_candidate = nn.Linear(dim, dim)  # U3

    def forward(self, h: Tensor, graph: Tensor | SparseGraph) -> Tensor:
        """h (B, n, d), graph (B, n, n) or its sparse form (``SparseGraph``) -> h^T (B, n, d)."""
        recompute = self.recompute and torch.is_grad_enabled()
        for _ in range(self.steps):
            if recompute:
                h = torch.utils.checkpoint.checkpoint(self.step, h, graph, use_reentrant=False)
            else:
                h = self.step(h, graph)
        return h

    def step(self, h: Tensor, graph: Tensor | SparseGraph) -> Tensor:
        """One step of eq. 13-14: h^{t-1} (B, n, d) -> h^t (B, n, d)."""
        return self.update(self.gather(h, graph), h)

    def gather(self, h: Tensor, graph: Tensor | SparseGraph) -> Tensor:
        if isinstance(graph, SparseGraph):
            return self.gather_sparse(h, graph)
        if self.message == "in":
            return graph @ h  # (B, n, d)
        if self.message == "out":
            return graph.transpose(1, 2) @ h  # (B, n, d)
        return torch.cat([graph @ h, graph.transpose(1, 2) @ h], dim=-1)  # (B, n, 2d)

    def gather_sparse(self, h: Tensor, graph: SparseGraph) -> Tensor:
        """``gather`` over a sparse P^I's kept entries: O(B n k d) instead of O(B n^2 d)."""
        if self.message == "in":
            return sparse_messages(h, graph, transpose=False)  # (B, n, d)
        if self.message == "out":
            return sparse_messages(h, graph, transpose=True)  # (B, n, d)
        return torch.cat([sparse_messages(h, graph, transpose=False), sparse_messages(h, graph, transpose=True)], dim=-1)

    def update(self, x: Tensor, h: Tensor) -> Tensor:
        """x the message (B, n, in), h (B, n, d) -> h' (B, n, d)."""
        params = (self.input_proj.weight, self.input_proj.bias, self.hidden_gates.weight, self.hidden_gates.bias,
                  self.hidden_candidate.weight, self.hidden_candidate.bias)
        if native.usable(x, h, *params) and not torch.is_autocast_enabled("cpu"):
            return _FusedGatedUpdate.apply(x, h, *params)
        return self.update_with_torch_ops(x, h)

    def update_with_torch_ops(self, x: Tensor, h: Tensor) -> Tensor:
        """``update`` as plain PyTorch ops (any device and dtype; the reference for the fused one)."""
        wz, wr, wc = self.input_proj(x).chunk(3, dim=-1)  # 3 x (B, n, d)
        uz, ur = self.hidden_gates(h).chunk(2, dim=-1)  # 2 x (B, n, d)
        z = torch.sigmoid(wz + uz)
        r = torch.sigmoid(wr + ur)
        c = torch.tanh(wc + self.hidden_candidate(r * h))
        # Under autocast c and z come out of lower-precision matmuls; lerp wants one dtype.
        return torch.lerp(h, c.to(h.dtype), z.to(h.dtype))  # (1 - z) h + z c


class _FusedGatedUpdate(torch.autograd.Function):
    """``GatedPropagation.update`` on CPU in float32: the five matmuls with PyTorch, the
    elementwise work between them in the fused kernels of ``salgl.native`` (two passes forward and
    two backward, where autograd on the plain ops makes about twenty over (B n, d) tensors and
    re-lays out the chunked gate activations). Formulas: salgl/kernels/gated_update.c.

    Inputs: x (B, n, in), h (B, n, d), then W_in (3d, in), b_in, W_gates (2d, d), b_gates,
    W_cand (d, d), b_cand as ``GatedPropagation`` holds them.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, h: Tensor, w_in: Tensor, b_in: Tensor, w_gates: Tensor, b_gates: Tensor,
                w_cand: Tensor, b_cand: Tensor) -> Tensor:
        shape, dim = h.shape, h.shape[-1]
        x2, h2 = x.reshape(-1, x.shape[-1]).contiguous(), h.reshape(-1, dim).contiguous()  # (N, in), (N, d)
        # The biases go into the kernels, summed per gate: addmm would first copy them into every row.
        gi = x2 @ w_in.t()  # (N, 3d): [W1 x; W2 x; W3 x]
        gh = h2 @ w_gates.t()  # (N, 2d): [U1 h; U2 h]
        z, r, rh = native.gated_gates(gi, gh, (b_in[: 2 * dim] + b_gates).contiguous(), h2)  # 3 x (N, d)
        del gh
        uc = rh @ w_cand.t()  # (N, d): U3 (r h)
        c, h_new = native.gated_output(gi, uc, (b_in[2 * dim:] + b_cand).contiguous(), h2, z)  # (N, d), (N, d)
        ctx.save_for_backward(x2, h2, z, r, rh, c, w_in, w_gates, w_cand)
        ctx.x_shape = x.shape
        return h_new.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, h2, z, r, rh, c, w_in, w_gates, w_cand = ctx.saved_tensors
        dim = h2.shape[1]
        dgi, dh = native.gated_output_backward(grad.reshape(-1, dim).contiguous(), z, c, h2)  # (N, 3d), (N, d)
        d_cand = dgi[:, 2 * dim:]  # (N, d): dL/d(W3 x + U3 (r h) + b)
        drh = d_cand @ w_cand  # (N, d)
        native.gated_gates_backward(drh, r, h2, dgi, dh)  # dgi complete; dh += drh r
        d_gates = dgi[:, : 2 * dim]  # (N, 2d): the gates' pre-activations take the same gradient from gi and gh
        dh.addmm_(d_gates, w_gates)
        needs = ctx.needs_input_grad
        d_bias = dgi.sum(0) if any(needs[3::2]) else None  # (3d,): each bias's gradient is a part of it
        return (
            (dgi @ w_in).view(ctx.x_shape) if needs[0] else None,
            dh.view(grad.shape),
            dgi.t() @ x2 if needs[2] else None,
            d_bias if needs[3] else None,
            d_gates.t() @ h2 if needs[4] else None,
            d_bias[: 2 * dim].clone() if needs[5] else None,
            d_cand.t() @ rh if needs[6] else None,
            d_bias[2 * dim:].clone() if needs[7] else None,
        )


def sparse_messages(h: Tensor, graph: SparseGraph, *, transpose: bool) -> Tensor:
    """Eq. 13 on a sparse P^I: m_i = sum_j P_ij h_j, or sum_j P_ji h_j with ``transpose``, over the
    kept entries only. h (B, n, d) -> (B, n, d); differentiable in h and in the graph's weights.

    Equals ``graph_dense @ h`` (``transpose``: ``graph_dense^T @ h``) for the dense matrix holding
    the kept entries. Each row's message is a weighted bag of rows of h, which is what
    ``embedding_bag`` computes without gathering the (B, n, k, d) neighbour states, forward or
    backward: memory O(B n k + B n d), time O(B n k d).
    """
    batch, n, dim = h.shape
    k = graph.index.shape[-1]
    rows = h.reshape(batch * n, dim)  # (B n, d): image b's label j is row b n + j
    weight = graph.weight.reshape(-1).to(h.dtype)  # (B n k,)
    if not transpose:  # row i's bag: its k neighbours
        flat = (graph.index + torch.arange(batch, device=h.device).view(batch, 1, 1) * n).reshape(-1)  # (B n k,)
        out = nn.functional.embedding_bag(flat.view(batch * n, k), rows, mode="sum", per_sample_weights=weight.view(batch * n, k))
        return out.view(batch, n, dim)
    # Transposed, row j's bag holds the entries pointing at j: the entries sorted by column (CSR of P^T).
    order, sizes = _column_order(graph.index, batch, n)  # (B n k,), (B n,) entries per column
    offsets = sizes.cumsum(0) - sizes
    out = nn.functional.embedding_bag(order // k, rows, offsets, mode="sum", per_sample_weights=weight[order])
    return out.view(batch, n, dim)


def _column_order(index: Tensor, batch: int, n: int) -> tuple[Tensor, Tensor]:
    """The entries of a (B, n, k) sparse index sorted by (image, column), stably, and the number of
    entries per (image, column): the CSR of P^T that ``sparse_messages`` sends messages along.

    An index shared by the batch (an expanded view, as soft selection gives) is sorted once, not B
    times: image b's entries sort as image 0's, offset by b n k.
    """
    k = index.shape[-1]
    if batch > 1 and index.stride(0) == 0:
        shared = index[0].reshape(-1)  # (n k,)
        order = shared.argsort(stable=True)  # (n k,)
        steps = torch.arange(batch, device=index.device).view(batch, 1)
        sizes = torch.bincount(shared, minlength=n)  # (n,)
        return (order.unsqueeze(0) + steps * (n * k)).reshape(-1), sizes.repeat(batch)
    flat = (index + torch.arange(batch, device=index.device).view(batch, 1, 1) * n).reshape(-1)  # (B n k,)
    return flat.argsort(stable=True), torch.bincount(flat, minlength=batch * n)


class PerLabelClassifier(nn.Module):
    """Eq. 16: logit_i = w_i . o_i (+ b_i as released), one weight vector per label.

    Initialised U(-1/sqrt(d), 1/sqrt(d)) as released.
    """

    def __init__(self, num_labels: int, dim: int, *, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_labels, dim))  # (n, d)
        self.bias = nn.Parameter(torch.empty(num_labels)) if bias else None  # (n,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: Tensor) -> Tensor:
        logits = (features * self.weight).sum(-1)  # (B, n)
        return logits if self.bias is None else logits + self.bias


def build_phi_c(in_dim: int, dim: int, kind: str) -> nn.Sequential:
    """Eq. 15's Phi_c: ``linear_tanh`` is the released Linear + Tanh; ``mlp`` a two-layer MLP."""
    if kind == "linear_tanh":
        return nn.Sequential(nn.Linear(in_dim, dim), nn.Tanh())
    return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def build_token_encoder(dim: int, *, heads: int, ffn: int, dropout: float) -> TokenEncoder:
    """The released code's single post-norm transformer layer over the backbone tokens."""
    if dim % heads:
        raise ValueError(f"model.head.encoder_heads: token dim {dim} is not divisible by {heads} heads")
    return TokenEncoder(dim, heads=heads, ffn=ffn, dropout=dropout)


class TokenEncoder(nn.Module):
    """``nn.TransformerEncoder`` of one post-norm ``nn.TransformerEncoderLayer`` (ReLU, batch first),
    as released: the same parameters under the same names (``layers.0.self_attn.in_proj_weight``, ...),
    initialised alike, computing the same function.

    Why not the torch modules themselves: in training, ``nn.MultiheadAttention`` works in a
    sequence-first layout, so the batch-first tokens are transposed on the way in and out, and the
    packed q/k/v projection is re-laid out (forward, and zero-filled and added back in backward),
    all full copies of (B, m, 3d) tensors. Here q, k and v are views of the one projection's
    output, handed to ``scaled_dot_product_attention`` as they are. COCO size on 2 cores: forward +
    backward 3.5 s against 3.9 s.
    """

    def __init__(self, dim: int, *, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_PostNormEncoderLayer(dim, heads=heads, ffn=ffn, dropout=dropout)])

    def forward(self, tokens: Tensor) -> Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens  # (B, m, d)


class _PostNormEncoderLayer(nn.Module):
    """x = norm1(x + drop(SA(x))); x = norm2(x + drop(W2 drop(relu(W1 x)))), submodules named and
    created in ``nn.TransformerEncoderLayer``'s order (so a seed gives the same initial weights)."""

    def __init__(self, dim: int, *, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self._self_attention(x)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(torch.relu(self.linear1(x))))))  # (B, m, d)

    def _self_attention(self, x: Tensor) -> Tensor:
        attn = self.self_attn
        batch, num_tokens, dim = x.shape
        heads = attn.num_heads
        qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, m, 3d)
        q, k, v = qkv.view(batch, num_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, m, d/h)
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))  # (B, m, d)
