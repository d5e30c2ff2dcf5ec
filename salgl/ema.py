"""EMA of the whole model state, as released: weights, BatchNorm statistics and the counts."""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from salgl.config import EmaConfig


class ModelEma(ModelEmaV3):
    """timm's state-dict EMA with SALGL's two count policies.

    ``counts="ema"`` averages the (K, n, n) counts like every other floating buffer (released
    default); ``counts="live"`` keeps the EMA model's counts equal to the live model's, which is
    what the released ``--no-comat-ema`` flag does by sharing the tensor.
    """

    def __init__(self, model: nn.Module, cfg: EmaConfig) -> None:
        super().__init__(model, decay=cfg.decay, foreach=True)
        self.counts_policy = cfg.counts

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        super().update(model, step)
        if self.counts_policy == "live":
            self.copy_counts(model)

    @torch.no_grad()
    def copy_counts(self, model: nn.Module) -> None:
        for (name, ema_buf), (_, live_buf) in zip(self.module.named_buffers(), model.named_buffers()):
            if name.endswith("counts"):
                ema_buf.copy_(live_buf)
