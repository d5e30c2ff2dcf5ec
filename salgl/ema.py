"""EMA of the whole model state, as released: weights, BatchNorm statistics and the counts."""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from salgl.config import EmaConfig


class ModelEma(ModelEmaV3):
    """timm's state-dict EMA with SALGL's two count policies and timm's optional warm-up.

    With ``warmup`` the decay at update ``step`` (1-based) is timm's
    ``min(decay, 1 - (1 + (step - 1))^-2/3)`` (``warmup_gamma`` 1, ``warmup_power`` 2/3), so the
    EMA follows the model through the first thousands of steps instead of staying near the random
    initialisation for ~1/(1 - decay) steps: a short run or sweep trial then ranks by an EMA that
    has moved. The released code (``official`` preset) uses the fixed decay from the first step.

    ``counts="ema"`` averages the (K, n, n) counts like every other floating buffer (released
    default); ``counts="live"`` keeps the EMA model's counts equal to the live model's, which is
    what the released ``--no-comat-ema`` flag does by sharing the tensor.
    """

    def __init__(self, model: nn.Module, cfg: EmaConfig) -> None:
        super().__init__(model, decay=cfg.decay, use_warmup=cfg.warmup, foreach=True)
        self.counts_policy = cfg.counts

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """``step``: optimiser updates so far, this one included; ignored without warm-up, where
        timm would otherwise copy the model outright on the first update (the release never does)."""
        super().update(model, step if self.use_warmup else None)
        if self.counts_policy == "live":
            self.copy_counts(model)

    @torch.no_grad()
    def copy_counts(self, model: nn.Module) -> None:
        for (name, ema_buf), (_, live_buf) in zip(self.module.named_buffers(), model.named_buffers()):
            if name.endswith("counts"):
                ema_buf.copy_(live_buf)
