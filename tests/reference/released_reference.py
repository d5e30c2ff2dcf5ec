"""A straightforward implementation of the released SALGL head's computation, for comparison.

Written from SPEC section 2 (not our optimised code): it applies P to every (label, region) pair,
counts with a per-sample loop, keeps float32 counts, and names its tensors with the released
checkpoint's keys, so ``ReleasedHead(...).state_dict()`` is a released-layout head state dict.
Used by the equivalence tests and by ``tests/bench/head_step.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def released_encoder(dim: int, heads: int, ffn: int, dropout: float = 0.1) -> nn.TransformerEncoder:
    """The released token encoder, torch's own modules: one post-norm layer, ReLU, dropout 0.1."""
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ffn, dropout=dropout, activation="relu",
                                       batch_first=True, norm_first=False)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


class GatedGNN(nn.Module):
    def __init__(self, dim: int, steps: int, outmess: bool) -> None:
        super().__init__()
        in_dim = 2 * dim if outmess else dim
        self.fc1_w, self.fc1_u = nn.Linear(in_dim, dim), nn.Linear(dim, dim)
        self.fc2_w, self.fc2_u = nn.Linear(in_dim, dim), nn.Linear(dim, dim)
        self.fc3_w, self.fc3_u = nn.Linear(in_dim, dim), nn.Linear(dim, dim)
        self.steps, self.outmess = steps, outmess

    def forward(self, h: Tensor, matrix: Tensor) -> Tensor:
        for _ in range(self.steps):
            incoming = torch.bmm(matrix, h)
            outgoing = torch.bmm(matrix.transpose(1, 2), h)
            x = torch.cat([incoming, outgoing], -1) if self.outmess else incoming
            z = torch.sigmoid(self.fc1_w(x) + self.fc1_u(h))
            r = torch.sigmoid(self.fc2_w(x) + self.fc2_u(h))
            c = torch.tanh(self.fc3_w(x) + self.fc3_u(r * h))
            h = (1 - z) * h + z * c
        return h


class BilinearAttention(nn.Module):
    def __init__(self, dim: int, label_dim: int, att_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, att_dim, bias=False)
        self.linear2 = nn.Linear(label_dim, att_dim, bias=False)
        self.hidden_linear = nn.Linear(att_dim, att_dim)
        self.target_linear = nn.Linear(att_dim, 1)

    def forward(self, regions: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        u = self.linear1(regions).unsqueeze(1)  # (B, 1, m, a)
        v = self.linear2(labels).unsqueeze(2)  # (B, n, 1, a)
        x = self.hidden_linear(torch.tanh(u * v))  # (B, n, m, a): P on every pair
        alpha = self.target_linear(x).squeeze(-1).softmax(-1)  # (B, n, m)
        return torch.bmm(alpha, regions), alpha


class ElementWise(nn.Module):
    def __init__(self, num_labels: int, dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_labels, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_labels).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.weight).sum(2) + self.bias


class ReleasedHead(nn.Module):
    """The released module minus its backbone; forward takes tokens (B, m, d)."""

    def __init__(
        self,
        *,
        num_labels: int,
        dim: int,
        label_dim: int,
        num_scenes: int,
        steps: int = 3,
        outmess: bool = True,
        soft: bool = False,
        normalize: bool = True,
        ignore_self: bool = False,
        att_dim: int = 1024,
        heads: int = 8,
        ffn: int = 2048,
    ) -> None:
        super().__init__()
        self.soft, self.normalize, self.ignore_self, self.steps = soft, normalize, ignore_self, steps
        self.tb = released_encoder(dim, heads, ffn)
        self.register_buffer("embeddings", torch.randn(num_labels, label_dim))
        self.scene_linear = nn.Linear(dim, num_scenes, bias=False)
        self.ggnn = GatedGNN(dim, steps, outmess)
        self.register_buffer("comatrix", torch.zeros(num_scenes, num_labels, num_labels))
        self.attention = BilinearAttention(dim, label_dim, att_dim)
        self.fc = nn.Sequential(nn.Linear(2 * dim if steps > 0 else dim, dim), nn.Tanh())
        self.classifier = ElementWise(num_labels, dim)

    def probabilities(self) -> Tensor:
        comat = self.comatrix.transpose(1, 2)
        comat = comat / (torch.diagonal(comat, dim1=1, dim2=2).unsqueeze(-1) + 1e-8)
        if self.ignore_self:
            comat = comat * (1 - torch.eye(comat.shape[-1], device=comat.device)).unsqueeze(0)
        if self.normalize:
            comat = comat / (comat.sum(-1, keepdim=True) + 1e-8)
        return comat

    def forward(self, feats: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        feats = self.tb(feats)
        scene_scores = self.scene_linear(feats.mean(1))
        scene_probs = F.softmax(scene_scores, dim=-1)
        if self.training and y is not None:
            with torch.no_grad():
                for i in range(scene_probs.shape[0]):  # per sample, as released
                    outer = torch.outer(y[i], y[i])
                    if self.soft:
                        self.comatrix += scene_probs[i].detach()[:, None, None] * outer
                    else:
                        self.comatrix[scene_probs[i].argmax()] += outer
        label_feats, alphas = self.attention(feats, self.embeddings.unsqueeze(0).repeat(feats.shape[0], 1, 1))
        probs = self.probabilities()
        if self.soft:
            comats = (scene_probs[:, :, None, None] * probs.unsqueeze(0)).sum(1)
        else:
            comats = probs.index_select(0, scene_probs.argmax(-1))
        out = self.ggnn(label_feats, comats)
        if self.steps > 0:
            out = torch.cat([label_feats, out], -1)
        logits = self.classifier(self.fc(out))
        return {"logits": logits, "scene_probs": scene_probs, "comat": comats}
