"""The full SALGL network: a timm backbone giving region tokens, then the SALGL head.

Construction (``build_model``) is pure and cheap; ``create_model`` also runs the explicit loaders
for label embeddings and backbone weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from salgl.config import ModelConfig
from salgl.graph import CountSync, local_count_delta
from salgl.head import HeadOutput, SALGLHead


class SALGL(nn.Module):
    """Backbone + head with timm's uniform ``forward_features`` / ``forward_head`` split."""

    def __init__(self, backbone: nn.Module, head: SALGLHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> region tokens (B, m, d)."""
        return self.backbone(images)

    def forward_head(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        *,
        sync: CountSync = local_count_delta,
        defer_count_update: bool = False,
    ) -> HeadOutput:
        """See ``SALGLHead.forward``."""
        return self.head(tokens, targets, sync=sync, defer_count_update=defer_count_update)

    def forward(
        self,
        images: Tensor,
        targets: Tensor | None = None,
        *,
        sync: CountSync = local_count_delta,
        defer_count_update: bool = False,
    ) -> HeadOutput:
        return self.forward_head(self.forward_features(images), targets, sync=sync, defer_count_update=defer_count_update)


def build_model(cfg: ModelConfig, *, num_labels: int, label_dim: int) -> SALGL:
    """Construct the network with random weights and empty buffers (no file or network access)."""
    from salgl.backbone import Backbone

    backbone = Backbone(cfg.backbone)
    head = SALGLHead(cfg.head, num_labels=num_labels, token_dim=backbone.token_dim, label_dim=label_dim)
    return SALGL(backbone, head)


@torch.no_grad()
def load_label_embeddings(model: SALGL, embeddings: Tensor) -> None:
    """Copy frozen label embeddings (n, d_L) into the head's buffer."""
    buffer = model.head.label_embeddings
    if tuple(embeddings.shape) != tuple(buffer.shape):
        raise ValueError(f"label embeddings have shape {tuple(embeddings.shape)}, the head expects {tuple(buffer.shape)}")
    buffer.copy_(embeddings.to(buffer.dtype))


def create_model(cfg: ModelConfig, vocabulary: Sequence[str]) -> SALGL:
    """Build the network for a vocabulary and load its label embeddings and backbone weights."""
    from salgl.backbone import load_backbone_weights
    from salgl.label_embeddings import label_embeddings

    embeddings = label_embeddings(list(vocabulary), cfg.labels)  # (n, d_L)
    model = build_model(cfg, num_labels=len(vocabulary), label_dim=embeddings.shape[1])
    load_label_embeddings(model, embeddings)
    load_backbone_weights(model.backbone, cfg.backbone.weights)
    return model
