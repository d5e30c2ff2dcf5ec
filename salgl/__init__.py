"""SALGL: Scene-Aware Label Graph Learning for multi-label image classification (ICCV 2023).

Pure PyTorch (plus timm, transformers, numpy): no Ray, MLflow or pyarrow here.

The names below load on first use (PEP 562), so that ``import salgl.config`` -- all that the data
pipeline's processes need -- does not import torch and timm (several seconds per process on a
small machine, paid by every Ray Data task worker and split coordinator of every run).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Config": "salgl.config",
    "ConfigError": "salgl.config",
    "HeadConfig": "salgl.config",
    "ModelConfig": "salgl.config",
    "preset": "salgl.config",
    "CountSync": "salgl.graph",
    "count_delta": "salgl.graph",
    "local_count_delta": "salgl.graph",
    "HeadOutput": "salgl.head",
    "SALGLHead": "salgl.head",
    "LossTerms": "salgl.losses",
    "asymmetric_loss": "salgl.losses",
    "salgl_loss": "salgl.losses",
    "SALGL": "salgl.model",
    "build_model": "salgl.model",
    "create_model": "salgl.model",
    "load_label_embeddings": "salgl.model",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from salgl.config import Config, ConfigError, HeadConfig, ModelConfig, preset
    from salgl.graph import CountSync, count_delta, local_count_delta
    from salgl.head import HeadOutput, SALGLHead
    from salgl.losses import LossTerms, asymmetric_loss, salgl_loss
    from salgl.model import SALGL, build_model, create_model, load_label_embeddings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'salgl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
