"""The MLflow model of a trained SALGL network: encoded images in, ``salgl predict``'s records out.

Every training run logs one (``log_checkpoint_model``; sweeps register theirs). It loads with
``mlflow.pyfunc.load_model`` and serves with ``mlflow models serve`` where salgl is not installed,
and nothing in it is pickled:

- the model object comes from running ``pyfunc_model.py`` (MLflow's "models from code");
- weights and config are the ``model_files`` artifacts (safetensors and JSON), and the network is
  rebuilt by the project's own builders;
- the project's packages travel with it (``code_paths``), and its requirements pin the third-party
  packages that code imports, as installed here.

Input: a DataFrame whose ``image`` column (MLflow type ``binary``) holds encoded images. Over HTTP
MLflow decodes the column's base64 before the model sees it, so a served model never reads a file
a client names; in process a string is also taken, as a file path when one exists, else as base64.
Params: ``threshold``, ``top_k``, ``batch_size``. Output: one ``salgl predict`` record per image,
in order (no ``path`` for bytes; ``error`` for an image that cannot be decoded).
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from jobs.inference.model_files import read_model_files, write_model_files
from jobs.inference.options import DEFAULTS, decode_base64
from jobs.inference.predict import Source, predict_files
from salgl.config import Config
from salgl.errors import BadValue
from salgl.model import SALGL

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
IMAGE_COLUMN = "image"
PARAMS: dict[str, Any] = {"threshold": DEFAULTS.threshold, "top_k": DEFAULTS.top_k, "batch_size": DEFAULTS.batch_size}
SHIPPED_PACKAGES = ("salgl", "pipeline", "jobs")
# Third-party distributions the shipped code and MLflow's loader import to load and predict.
REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "tqdm", "pandas")


class SalglModel(mlflow.pyfunc.PythonModel):
    """The network with ``salgl predict``'s preprocessing and records around it."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model, self.cfg, self.vocabulary = read_model_files(context.artifacts["weights"], context.artifacts["config"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        p = {**PARAMS, **(params or {})}
        records = predict_files(self.model, self.cfg.data, self.vocabulary, image_sources(model_input),
                                batch_size=int(p["batch_size"]), threshold=float(p["threshold"]), top_k=int(p["top_k"]),
                                progress=False)
        return list(records)


# ---------------------------------------------------------------------------------------------
# Input


def image_sources(model_input: pd.DataFrame) -> list[Source]:
    """The ``image`` column as files or encoded bytes, in row order."""
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        raise BadValue(f"the SALGL model takes a DataFrame with an {IMAGE_COLUMN!r} column of encoded images, "
                       f"base64 strings or file paths; got {type(model_input).__name__}")
    return [image_source(value) for value in model_input[IMAGE_COLUMN]]


def image_source(value: Any) -> Source:
    """Bytes as they are; a string as the file it names, else as base64 (else a file that is missing)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    text = str(value)
    if os.path.isfile(text):
        return Path(text)
    try:
        return decode_base64(text)
    except ValueError:
        return Path(text)  # predict reports it as a file that cannot be read


# ---------------------------------------------------------------------------------------------
# Saving and logging


def save_salgl_model(path: str | Path, model: SALGL, cfg: Config, vocabulary: list[str]) -> None:
    """The MLflow model in a local folder (``mlflow.pyfunc.load_model(path)`` loads it)."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(str(path), **model_arguments(Path(tmp), model, cfg, vocabulary))


def log_checkpoint_model(checkpoint: str, tracking_uri: str, run_id: str, *, artifact_name: str = "model") -> str:
    """A checkpoint's EMA network (live if none) as the MLflow model of ``run_id``; returns its model URI."""
    from jobs.training.checkpoints import load_model_from_checkpoint

    model, cfg, vocabulary = load_model_from_checkpoint(checkpoint)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name=artifact_name, **model_arguments(Path(tmp), model, cfg, vocabulary))
    return info.model_uri


def model_arguments(folder: Path, model: SALGL, cfg: Config, vocabulary: list[str]) -> dict[str, Any]:
    """What ``save_model`` and ``log_model`` both take; the files they copy are written under ``folder``."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": write_model_files(folder / "files", model, cfg, vocabulary),
        "code_paths": shipped_code(folder / "code"),
        "pip_requirements": pip_requirements(),
        "signature": model_signature(),
        "input_example": pd.DataFrame({IMAGE_COLUMN: [_example_png()]}),
        "metadata": {"vocabulary": list(vocabulary)},
    }


def shipped_code(folder: Path) -> list[str]:
    """Copies of the project's packages, as imported here, without caches or compiled kernels."""
    paths = []
    for name in SHIPPED_PACKAGES:
        source = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        paths.append(str(folder / name))
    return paths


def pip_requirements() -> list[str]:
    """``REQUIREMENTS`` pinned to the versions installed here (MLflow adds itself)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def model_signature() -> mlflow.models.ModelSignature:
    """One binary ``image`` column in; the predict options as params with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([ParamSpec("threshold", "double", PARAMS["threshold"]), ParamSpec("top_k", "long", PARAMS["top_k"]),
                          ParamSpec("batch_size", "long", PARAMS["batch_size"])])
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), params=params)


def _example_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 96, 64)).save(buffer, format="PNG")
    return buffer.getvalue()
