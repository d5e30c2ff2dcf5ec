"""How a training step uses its device: autocast precision with float16's gradient scaler
(``optim.precision``), channels-last memory order (``run.channels_last``) and a compiled backbone
(``run.compile``).

All three default off: each becomes a default only once a GPU measurement shows it pays
(``python -m tests.bench.gpu_check``, docs/benchmarks.md). Whatever the precision, the
co-occurrence counts stay float64: the head decides scenes and counts with autocast off
(``salgl.layers.SceneClassifier``, ``salgl.graph.count_delta``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from jobs.resources import check_precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepPrecision:
    """Autocast around the forward and, for fp16, a ``torch.amp.GradScaler`` around the backward
    and the optimiser step: float16's narrow range flushes small gradients to zero unless the
    loss is scaled up first (bfloat16 has float32's range and needs no scaler)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        check_precision(precision, use_gpu=device.type == "cuda")
        self.precision = precision
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES.get(precision)  # None: float32, no autocast
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> AbstractContextManager[Any]:
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, parameters: Iterable[Tensor], *, clip_grad_norm: float) -> None:
        """Clip (on the true gradients: unscaled first) and step; with the scaler, a step whose
        gradients are not finite is skipped and the scale lowered."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's scale and growth tracker (checkpointed, so a resumed fp16 run continues
        with the same scale); None without a scaler."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))


def to_channels_last(model: nn.Module) -> None:
    """4-d weights (convolutions) in channels-last order: with channels-last images, GPU
    convolutions run without layout transposes. Other weights are untouched."""
    model.to(memory_format=torch.channels_last)


def channels_last_images(images: Tensor) -> Tensor:
    return images.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W), NHWC strides


def compile_backbone(model: nn.Module, *, backend: str = "inductor") -> None:
    """``torch.compile`` the backbone in place (``nn.Module.compile``), which keeps its state-dict
    keys: ``torch.compile(module)`` would wrap it and prefix every checkpoint key with
    ``_orig_mod.``. The head stays eager: its count update mutates a buffer under no_grad and its
    deferred collective is a Python closure, both graph breaks for little gain."""
    model.backbone.compile(backend=backend)
