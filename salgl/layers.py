"""The building blocks of the SALGL head, each a pure module.

Notation: B batch, m regions (tokens), n labels, K scenes, d = d_I token dim, d_L label dim,
d1 / d2 attention dims. Equation numbers are those of the SALGL paper (ICCV 2023).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class SemanticAttention(nn.Module):
    """Low-rank bilinear attention of every label over the regions (eq. 1-3).

    x_ij = P^T tanh((U^T v_j) * (V^T t_i)) + b,  alpha_ij = softmax_j Phi_a(x_ij),  f_i = sum_j alpha_ij v_j.

    Phi_a is linear and follows P with no nonlinearity between (as released), so the two compose
    into one d1-vector p = P w_a: the score is p . tanh(...) + const. That avoids applying the
    d1 x d2 matrix P to every (label, region) pair, which is most of the released module's cost.
    The (B, n, m, d1) tanh intermediate is computed in label chunks of bounded size and recomputed
    in backward (activation checkpointing), so memory stays bounded at any n and m.
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
        scores = self._chunked_scores(regions, labels, direction) + offset  # (B, n, m)
        alpha = scores.softmax(dim=-1)  # (B, n, m)
        return alpha @ tokens, alpha  # (B, n, d), (B, n, m)

    def _chunked_scores(self, regions: Tensor, labels: Tensor, direction: Tensor) -> Tensor:
        batch, num_regions, attn_dim = regions.shape
        per_label = batch * num_regions * attn_dim * regions.element_size()
        step = max(1, min(labels.shape[0], self.chunk_bytes // max(per_label, 1)))
        chunks = []
        for start in range(0, labels.shape[0], step):
            part = labels[start : start + step]
            if torch.is_grad_enabled() and (regions.requires_grad or part.requires_grad or direction.requires_grad):
                chunks.append(checkpoint(_bilinear_scores, regions, part, direction, use_reentrant=False))
            else:
                chunks.append(_bilinear_scores(regions, part, direction))
        return torch.cat(chunks, dim=1)


def _bilinear_scores(regions: Tensor, labels: Tensor, direction: Tensor) -> Tensor:
    """p . tanh(u_j * v_i) for every (label i, region j): regions (B, m, d1), labels (c, d1) -> (B, c, m)."""
    hidden = torch.tanh(regions.unsqueeze(1) * labels[None, :, None, :])  # (B, c, m, d1)
    return hidden @ direction  # (B, c, m)


class SceneClassifier(nn.Module):
    """Scene detection (eq. 4-6): pi = softmax(W mean_j v_j); each row of W is a scene prototype."""

    def __init__(self, token_dim: int, num_scenes: int) -> None:
        super().__init__()
        self.prototypes = nn.Linear(token_dim, num_scenes, bias=False)  # W: (K, d)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.prototypes(tokens.mean(dim=1)).softmax(dim=-1)  # (B, K)


class GatedPropagation(nn.Module):
    """Gated graph propagation (eq. 13-14), weights shared across the T steps.

    Messages: ``in`` m_i = sum_j P_ij h_j (released default), ``out`` m_i = sum_j P_ji h_j (eq. 13),
    ``both`` concatenates [in, out] (GRU input 2d). Gated update as released:
    z = sigma(W1 x + U1 h), r = sigma(W2 x + U2 h), c = tanh(W3 x + U3 (r * h)), h' = (1 - z) h + z c.
    W1..W3 run as one (in, 3d) matmul and U1, U2 as one (d, 2d) matmul: same maths, fewer passes.
    """

    def __init__(self, dim: int, *, steps: int, message: str) -> None:
        super().__init__()
        self.steps = steps
        self.message = message
        in_dim = 2 * dim if message == "both" else dim
        self.input_proj = nn.Linear(in_dim, 3 * dim)  # [W1; W2; W3]
        self.hidden_gates = nn.Linear(dim, 2 * dim)  # [U1; U2]
        self.hidden_candidate = nn.Linear(dim, dim)  # U3

    def forward(self, h: Tensor, graph: Tensor) -> Tensor:
        """h (B, n, d), graph (B, n, n) -> h^T (B, n, d)."""
        for _ in range(self.steps):
            h = self.update(self.gather(h, graph), h)
        return h

    def gather(self, h: Tensor, graph: Tensor) -> Tensor:
        if self.message == "in":
            return graph @ h  # (B, n, d)
        if self.message == "out":
            return graph.transpose(1, 2) @ h  # (B, n, d)
        return torch.cat([graph @ h, graph.transpose(1, 2) @ h], dim=-1)  # (B, n, 2d)

    def update(self, x: Tensor, h: Tensor) -> Tensor:
        wz, wr, wc = self.input_proj(x).chunk(3, dim=-1)  # 3 x (B, n, d)
        uz, ur = self.hidden_gates(h).chunk(2, dim=-1)  # 2 x (B, n, d)
        z = torch.sigmoid(wz + uz)
        r = torch.sigmoid(wr + ur)
        c = torch.tanh(wc + self.hidden_candidate(r * h))
        return torch.lerp(h, c, z)  # (1 - z) h + z c


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


def build_token_encoder(dim: int, *, heads: int, ffn: int, dropout: float) -> nn.TransformerEncoder:
    """The released code's single post-norm transformer layer over the backbone tokens."""
    if dim % heads:
        raise ValueError(f"model.head.encoder_heads: token dim {dim} is not divisible by {heads} heads")
    layer = nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=ffn, dropout=dropout, activation="relu", batch_first=True, norm_first=False
    )
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
