"""SALGL: Scene-Aware Label Graph Learning for multi-label image classification (ICCV 2023).

Pure PyTorch (plus timm, transformers, numpy): no Ray, MLflow or pyarrow here.
"""

from salgl.config import Config, ConfigError, HeadConfig, ModelConfig, preset
from salgl.graph import CountSync, count_delta, local_count_delta
from salgl.head import HeadOutput, SALGLHead
from salgl.losses import LossTerms, asymmetric_loss, salgl_loss
from salgl.model import SALGL, build_model, create_model, load_label_embeddings

__all__ = [
    "Config",
    "ConfigError",
    "CountSync",
    "HeadConfig",
    "HeadOutput",
    "LossTerms",
    "ModelConfig",
    "SALGL",
    "SALGLHead",
    "asymmetric_loss",
    "build_model",
    "count_delta",
    "create_model",
    "load_label_embeddings",
    "local_count_delta",
    "preset",
    "salgl_loss",
]
