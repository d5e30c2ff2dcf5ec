"""Load the authors' released SALGL checkpoints (SPEC section 2 layout).

A released state dict names modules ``tb``, ``scene_linear``, ``ggnn``, ``attention``, ``fc``,
``classifier`` and buffers ``embeddings`` / ``comatrix`` (float32); an EMA checkpoint prefixes
every key with ``module.``. Ours fuses the gated update's three input maps (and two of the hidden
maps) into single matrices and keeps the counts in float64; the mapping below is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from salgl.config import HeadConfig
from salgl.head import SALGLHead
from salgl.model import SALGL

Tensors = Mapping[str, Tensor]


@dataclass(frozen=True)
class ReleasedFlags:
    """The released code's command-line switches that change what the head computes."""

    num_steps: int = 3  # --num-steps (T)
    outmess: bool = True  # --outmess: messages [P h, P^T h]
    soft: bool = False  # --soft: soft selection AND soft counting
    normalize: bool = True  # --normalize: row-normalised P
    ignore_self: bool = False  # --ignore-self: zero diagonal
    encoder_heads: int = 8  # fixed in the released code
    encoder_dropout: float = 0.1


# Our head key -> released key, for the tensors that map one to one.
_DIRECT: dict[str, str] = {
    "label_embeddings": "embeddings",
    "counts": "comatrix",
    "scenes.prototypes.weight": "scene_linear.weight",
    "attention.region_proj.weight": "attention.linear1.weight",
    "attention.label_proj.weight": "attention.linear2.weight",
    "attention.hidden.weight": "attention.hidden_linear.weight",
    "attention.hidden.bias": "attention.hidden_linear.bias",
    "attention.score.weight": "attention.target_linear.weight",
    "attention.score.bias": "attention.target_linear.bias",
    "propagation.hidden_candidate.weight": "ggnn.fc3_u.weight",
    "propagation.hidden_candidate.bias": "ggnn.fc3_u.bias",
    "phi_c.0.weight": "fc.0.weight",
    "phi_c.0.bias": "fc.0.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
# Our fused key -> the released keys concatenated along the output axis, in gate order z, r, c.
_FUSED: dict[str, tuple[str, ...]] = {
    "propagation.input_proj.{}": ("ggnn.fc1_w.{}", "ggnn.fc2_w.{}", "ggnn.fc3_w.{}"),
    "propagation.hidden_gates.{}": ("ggnn.fc1_u.{}", "ggnn.fc2_u.{}"),
}
_PROPAGATION = "propagation."
_ENCODER_PREFIX = ("tb.layers.0.", "token_encoder.layers.0.")


def strip_module_prefix(state: Tensors) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix of EMA / DataParallel checkpoints, if every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def convert_released_head(state: Tensors) -> dict[str, Tensor]:
    """Released head tensors -> our ``SALGLHead`` state dict (backbone keys are ignored here)."""
    state = strip_module_prefix(state)
    out: dict[str, Tensor] = {}
    for ours, theirs in _DIRECT.items():
        if theirs in state:
            out[ours] = state[theirs]
    if "counts" in out:
        out["counts"] = out["counts"].to(torch.float64)
    for ours, parts in _FUSED.items():
        for kind in ("weight", "bias"):
            names = [p.format(kind) for p in parts]
            if all(n in state for n in names):
                out[ours.format(kind)] = torch.cat([state[n] for n in names], dim=0)
    released_prefix, our_prefix = _ENCODER_PREFIX
    for key, value in state.items():
        if key.startswith(released_prefix):
            out[our_prefix + key[len(released_prefix) :]] = value
    return out


def convert_released_state_dict(state: Tensors) -> dict[str, Tensor]:
    """A whole released model (backbone + head) -> our ``SALGL`` state dict.

    Released ResNet backbones use torchvision key names, which timm's ResNet shares; ViT backbones
    use timm's names already. Both land under our ``backbone.model.`` prefix.
    """
    state = strip_module_prefix(state)
    out = {f"head.{k}": v for k, v in convert_released_head(state).items()}
    for key, value in state.items():
        if key.startswith("backbone."):
            out["backbone.model." + key[len("backbone.") :]] = value
    return out


def head_config_from_released(state: Tensors, flags: ReleasedFlags) -> HeadConfig:
    """Our ``HeadConfig`` equivalent to a released head: sizes read off its tensors, switches from flags."""
    state = strip_module_prefix(state)
    return HeadConfig(
        num_scenes=state["comatrix"].shape[0],
        steps=flags.num_steps,
        token_encoder="tb.layers.0.linear1.weight" in state,
        encoder_heads=flags.encoder_heads,
        encoder_ffn=state["tb.layers.0.linear1.weight"].shape[0] if "tb.layers.0.linear1.weight" in state else 2048,
        encoder_dropout=flags.encoder_dropout,
        attn_dim=state["attention.linear1.weight"].shape[0],
        attn_hidden=state["attention.hidden_linear.weight"].shape[0],
        selection="soft" if flags.soft else "hard",
        counting="soft" if flags.soft else "hard",
        count_before_use=True,
        message="both" if flags.outmess else "in",
        self_loops=not flags.ignore_self,
        row_normalize=flags.normalize,
        phi_c="linear_tanh",
        classifier_bias="classifier.bias" in state,
        scene_targets="none",
        isolate_scenes=False,
        graph_trains_scenes=True,
    )


def head_from_official_state_dict(state: Tensors, flags: ReleasedFlags = ReleasedFlags()) -> SALGLHead:
    """A ``SALGLHead`` that computes what the released module computes on the same tokens.

    Dimensions come from the tensors: n and d_L from ``embeddings``, d from ``scene_linear``.
    """
    state = strip_module_prefix(state)
    cfg = head_config_from_released(state, flags)
    num_labels, label_dim = state["embeddings"].shape
    head = SALGLHead(cfg, num_labels=num_labels, token_dim=state["scene_linear.weight"].shape[1], label_dim=label_dim)
    converted = convert_released_head(state)
    if head.propagation is None:  # T = 0: the released GGNN weights take no part
        converted = {k: v for k, v in converted.items() if not k.startswith(_PROPAGATION)}
    head.load_state_dict(converted, strict=True)
    return head


@dataclass(frozen=True)
class LoadReport:
    missing: list[str]
    unexpected: list[str]


def load_released_checkpoint(model: SALGL, state: Tensors, *, allow_backbone_classifier: bool = True) -> LoadReport:
    """Load a released state dict into a model built with the ``official`` preset.

    Fails on any missing or unexpected key except a backbone classifier (``fc`` / ``head``), which
    the released feature extractor drops and a timm model may or may not have.
    """
    converted = convert_released_state_dict(state)
    result = model.load_state_dict(converted, strict=False)
    classifier = ("backbone.model.fc.", "backbone.model.head.", "backbone.model.classifier.")

    def tolerated(key: str) -> bool:
        if model.head.propagation is None and key.startswith("head." + _PROPAGATION):
            return True  # T = 0: the released GGNN weights take no part
        return allow_backbone_classifier and key.startswith(classifier)

    missing = [k for k in result.missing_keys if not tolerated(k)]
    unexpected = [k for k in result.unexpected_keys if not tolerated(k)]
    if missing or unexpected:
        raise KeyError(
            "released checkpoint does not match the official model: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
        )
    return LoadReport(list(result.missing_keys), list(result.unexpected_keys))


def load_released_file(path: str) -> dict[str, Tensor]:
    """Read a released ``.pth``: either a bare state dict or one under ``model`` / ``state_dict``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "ema", "model_ema"):
        if isinstance(blob, dict) and key in blob and isinstance(blob[key], dict):
            return dict(blob[key])
    return dict(blob)


__all__ = [
    "LoadReport",
    "ReleasedFlags",
    "convert_released_head",
    "convert_released_state_dict",
    "head_config_from_released",
    "head_from_official_state_dict",
    "load_released_checkpoint",
    "load_released_file",
    "strip_module_prefix",
]
