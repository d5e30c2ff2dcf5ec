"""The SALGL head: from region tokens to label logits, usable on tokens alone.

Notation: B batch, m regions, n labels, K scenes, d = d_I token dim, d_L label-embedding dim.

    tokens (B, m, d) -> [token encoder] -> scene probs pi (B, K)                       eq. 4-6
                                        -> label features f (B, n, d)                 eq. 1-3
    counts C (K, n, n) -> P^k -> P^I (B, n, n), or its top-k rows (B, n, k)           eq. 7-8, 12
    f, P^I -> gated propagation h^T (B, n, d) -> Phi_c([f, h^T]) -> logits (B, n)     eq. 13-16
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from salgl.config import HeadConfig
from salgl.graph import (
    CountSync,
    Delta,
    PendingDelta,
    add_delta,
    warn_if_counts_inexact,
    SparseGraph,
    conditional_probabilities,
    local_count_delta,
    resolve_delta,
    scene_weights_for_counting,
    select_graph,
    select_sparse_graph,
    sparse_conditional_probabilities,
)
from salgl.layers import (
    GatedPropagation,
    PerLabelClassifier,
    SceneClassifier,
    SemanticAttention,
    build_phi_c,
    build_token_encoder,
)
from salgl.scenes import LabelMixture


class HeadOutput(NamedTuple):
    logits: Tensor  # (B, n)
    scene_probs: Tensor  # (B, K), pi
    attention: Tensor  # (B, n, m), alpha
    graph: Tensor | SparseGraph  # P^I used for this batch: (B, n, n), or sparse with graph_top_k


def _settle_before_saving(head: "SALGLHead", prefix: str, keep_vars: bool) -> None:
    """state_dict pre-hook (a module-level function, so the module still pickles)."""
    head.settle_counts()


class SALGLHead(nn.Module):
    """Semantic attention, scene detection, per-scene counts, gated propagation, classifier.

    The label embeddings (n, d_L) and the counts (K, n, n; float64, or float32 with
    ``count_dtype``) are persistent buffers: both
    are saved in checkpoints, neither takes gradients. Fill the embeddings with
    ``salgl.model.load_label_embeddings`` (never done here, so construction stays cheap and pure).
    """

    def __init__(self, cfg: HeadConfig, *, num_labels: int, token_dim: int, label_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("label_embeddings", torch.zeros(num_labels, label_dim))  # (n, d_L)
        self.register_buffer(
            "counts", torch.zeros(cfg.num_scenes, num_labels, num_labels, dtype=getattr(torch, cfg.count_dtype))
        )  # (K, n, n)
        # A count update left pending by ``forward(..., defer_count_update=True)``; every reader of
        # the counts here settles it first (``settle_counts``), and so does ``state_dict``.
        self._pending_update: Delta | PendingDelta | None = None
        self._warned_inexact = False  # count_dtype float32 past 2^24: warned once
        # Neighbours kept per row of P^k (eq. 8); 0 = the dense graph (also for graph_top_k >= n).
        self.graph_top_k = cfg.graph_top_k if cfg.graph_top_k < num_labels else 0
        self.register_state_dict_pre_hook(_settle_before_saving)
        self.token_encoder = (
            build_token_encoder(token_dim, heads=cfg.encoder_heads, ffn=cfg.encoder_ffn, dropout=cfg.encoder_dropout)
            if cfg.token_encoder
            else None
        )
        self.scenes = SceneClassifier(token_dim, cfg.num_scenes)
        # The scene classifier's training targets (salgl/scenes.py); one scene needs none.
        self.label_mixture = (
            LabelMixture(cfg.num_scenes, num_labels) if cfg.scene_targets == "labels" and cfg.num_scenes > 1 else None
        )
        self.attention = SemanticAttention(
            token_dim, label_dim, attn_dim=cfg.attn_dim, hidden_dim=cfg.attn_hidden, chunk_mb=cfg.attn_chunk_mb
        )
        # T = 0 builds no propagation: weights that take no part in the loss would stop DDP.
        self.propagation = (
            GatedPropagation(token_dim, steps=cfg.steps, message=cfg.message, recompute=cfg.recompute_propagation)
            if cfg.steps > 0
            else None
        )
        # With T = 0 there is no h^T to concatenate (released: Phi_c then takes f alone).
        self.phi_c = build_phi_c(2 * token_dim if cfg.steps > 0 else token_dim, token_dim, cfg.phi_c)
        self.classifier = PerLabelClassifier(num_labels, token_dim, bias=cfg.classifier_bias)

    @property
    def num_labels(self) -> int:
        return self.counts.shape[-1]

    def scene_targets(self, targets: Tensor, ignore: Tensor | None = None) -> Tensor | None:
        """q(k | y) (B, K) for the scene-target loss, or None where the head trains without targets."""
        return self.label_mixture(targets, ignore) if self.label_mixture is not None else None

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        *,
        sync: CountSync = local_count_delta,
        defer_count_update: bool = False,
    ) -> HeadOutput:
        """tokens (B, m, d); targets (B, n) multi-hot, counted only in training mode.

        ``sync`` sums the batch's count delta over workers (the default is the single-process one),
        so every replica applies the same update and the counts never diverge.

        ``defer_count_update`` (counting after use only): leave this batch's update pending when the
        forward returns, so a distributed sync's collective runs behind the backward as well; the
        caller applies it with ``settle_counts()`` before reading the counts. The next forward and
        ``state_dict`` settle it too, so the counts any step uses are eq. 7's either way.
        """
        self.settle_counts()
        if self.token_encoder is not None:
            tokens = self.token_encoder(tokens)  # (B, m, d)
        scene_probs, pending = self._detect_scenes(tokens, targets, sync)  # (B, K)
        features, alpha = self.attention(tokens, self.label_embeddings.to(tokens.dtype))  # (B, n, d), (B, n, m)

        if pending is not None and self.cfg.count_before_use:
            self.apply_count_update(pending)
            pending = None
        # Eq. 12 with pi's gradient: the classification loss trains the scene classifier through P^I.
        graph = self.label_graph(scene_probs if self.cfg.graph_trains_scenes else scene_probs.detach())  # (B, n, n) or sparse

        if self.propagation is not None:
            h = self.propagation(features, graph)  # (B, n, d)
            fused = torch.cat([features, h], dim=-1)  # (B, n, 2d)
        else:
            fused = features  # (B, n, d)
        logits = self.classifier(self.phi_c(fused))  # (B, n)
        if pending is not None:
            if defer_count_update:
                self._pending_update = pending
            else:
                self.apply_count_update(pending)
        return HeadOutput(logits, scene_probs, alpha, graph)

    def _detect_scenes(self, tokens: Tensor, targets: Tensor | None, sync: CountSync) -> tuple[Tensor, Delta | PendingDelta | None]:
        """pi (B, K) (eq. 4-6) and the batch's count sync (eq. 7), started.

        The sync is waited for where the counts are next read: a distributed sync's collective runs
        behind the attention and, counting after use, behind the propagation and classifier too.
        Isolated scenes read detached tokens, so no loss reaching pi reshapes the label features.
        """
        scene_probs = self.scenes(tokens.detach() if self.cfg.isolate_scenes else tokens)  # (B, K)
        counting = self.training and targets is not None
        return scene_probs, self.start_count_update(scene_probs, targets, sync) if counting else None

    def label_graph(self, scene_probs: Tensor) -> Tensor | SparseGraph:
        """P^I for each image (eq. 8, 12) from the current counts: dense, or each row's top k."""
        if self.graph_top_k:
            index, values = sparse_conditional_probabilities(
                self.counts, self.graph_top_k, self_loops=self.cfg.self_loops, row_normalize=self.cfg.row_normalize
            )  # (K, n, k) each
            return select_sparse_graph(index, values, scene_probs, self.cfg.selection)
        probs = conditional_probabilities(
            self.counts, self_loops=self.cfg.self_loops, row_normalize=self.cfg.row_normalize
        )  # (K, n, n) float64
        return select_graph(probs, scene_probs, self.cfg.selection)

    @torch.no_grad()
    def update_counts(self, scene_probs: Tensor, targets: Tensor, sync: CountSync = local_count_delta) -> None:
        """Eq. 7: C^s += y y^T (hard) or C^k += pi_k y y^T (soft), summed over workers by ``sync``."""
        self.apply_count_update(self.start_count_update(scene_probs, targets, sync))

    @torch.no_grad()
    def start_count_update(self, scene_probs: Tensor, targets: Tensor, sync: CountSync = local_count_delta) -> Delta | PendingDelta:
        """Eq. 7's batch payload -> ``sync`` (which may only start its collective)."""
        weights = scene_weights_for_counting(scene_probs, self.cfg.counting)  # (B, K) float64
        return sync(weights, targets.detach().to(torch.float64))

    @torch.no_grad()
    def settle_counts(self) -> None:
        """Apply the update a deferred forward left pending (waiting for its collective), if any."""
        pending, self._pending_update = self._pending_update, None
        if pending is not None:
            self.apply_count_update(pending)

    @torch.no_grad()
    def apply_count_update(self, delta: Delta | PendingDelta) -> None:
        """C += the summed delta (dense, or blocks over the labels that occur), waiting for its
        collective if it is still in flight."""
        add_delta(self.counts, resolve_delta(delta))
        if self.counts.dtype == torch.float32 and not self._warned_inexact:
            self._warned_inexact = warn_if_counts_inexact(self.counts)
