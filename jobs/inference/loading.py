"""Load any kind of SALGL checkpoint for inference: a model in eval mode, its config, its labels.

Three sources, told apart by :func:`checkpoint_kind`:

- ``folder``: a training checkpoint of ours (``state.pt`` + ``config.json``, see
  ``jobs.training.checkpoints``), or a run folder (its best checkpoint by EMA mAP is taken); a
  path, or a URI in an object store (``s3://``, ``gs://``, ``abfs://``; see ``jobs.storage``). The EMA
  weights (``module.``-prefixed ModelEmaV3 state) are used unless ``which="live"``.
- ``mlflow``: an MLflow model URI (``runs:/<id>/model``, ``models:/<name>/<version>``) or a
  downloaded MLflow model folder, as ``jobs.inference.pyfunc`` logs it: the network is rebuilt from
  its weights (safetensors), config and vocabulary (``jobs.inference.model_files``). Older models
  of a pickled PyTorch module are refused unless ``SALGL_ALLOW_PICKLED_MODELS=1``.
- ``released``: a ``.pth`` of the authors' code (SPEC section 2 layout), built with the
  ``official`` preset; sizes come from the tensors, switches from :class:`ReleasedFlags`, label
  names from the caller (the file has none).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from jobs.inference.model_files import config_from_flat, read_model_files
from jobs.storage import Folder, is_object_store, local_copy
from jobs.training.checkpoints import STATE_FILE, best_checkpoint_in, load_model_from_checkpoint
from salgl.errors import BadValue, NotFound, UsageError
from salgl.config import Config, from_flat, preset, to_flat
from salgl.model import SALGL, build_model
from salgl.official import ReleasedFlags, head_config_from_released, load_released_checkpoint, load_released_file, strip_module_prefix

Kind = Literal["folder", "mlflow", "released"]
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
# "1" loads MLflow models that hold a pickled torch module (salgl's format before the pyfunc):
# unpickling runs whatever code the file names, so only for models from a source one trusts.
ALLOW_PICKLED_ENV = "SALGL_ALLOW_PICKLED_MODELS"
# Blocks per stage of the torchvision / timm ResNets, and whether they are bottlenecks.
_RESNETS: dict[tuple[tuple[int, ...], bool], str] = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


class Loaded(NamedTuple):
    model: SALGL  # eval mode, on CPU
    cfg: Config
    vocabulary: list[str]


# ---------------------------------------------------------------------------------------------
# What a source is


def checkpoint_kind(source: str) -> Kind:
    """``folder``, ``mlflow`` or ``released``; raises when ``source`` is none of them."""
    if source.startswith(MLFLOW_SCHEMES):
        return "mlflow"
    if is_object_store(source):
        return "folder"
    path = Path(source)
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return "mlflow"
        return "folder"
    if path.is_file():
        return "folder" if path.name == STATE_FILE else "released"
    raise NotFound(f"checkpoint {source!r}: no such file or folder, and not an MLflow model URI")


def resolve_checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder, its ``state.pt``, or a run folder (-> its best checkpoint by EMA mAP)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if (path / STATE_FILE).is_file():
        return path
    best = best_checkpoint_in(path, "ema_mAP")
    if best is None:
        raise NotFound(f"{path} holds no {STATE_FILE}, and no checkpoint folders with an ema_mAP either")
    return Path(best)


def read_vocabulary(path: str | Path) -> list[str]:
    """Label names from a text file (one per line), a JSON list, or a dataset's manifest (a folder,
    or a dataset in an object store: ``s3://bucket/data/NAME``)."""
    if is_object_store(str(path)) or Path(path).is_dir():
        from pipeline.shards import read_manifest

        return list(read_manifest(str(path))["vocabulary"])
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"vocabulary {path}: no such file or dataset folder")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return [str(x) for x in json.loads(text)]
        except json.JSONDecodeError as err:
            raise BadValue(f"vocabulary {path}: not a JSON list ({err})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Our checkpoints


def load_folder_checkpoint(path: str | Path, which: str = "ema") -> Loaded:
    """A checkpoint folder of ours (or a run folder), local or in an object store (downloaded for
    the load); the EMA weights unless ``which="live"``."""
    if not is_object_store(str(path)):
        return Loaded(*load_model_from_checkpoint(resolve_checkpoint_folder(path), which=which))
    folder = Folder(str(path))
    if not folder.is_file(STATE_FILE):
        best = best_checkpoint_in(folder, "ema_mAP")
        if best is None:
            raise NotFound(f"{path} holds no {STATE_FILE}, and no checkpoint folders with an ema_mAP either")
        folder = Folder(best)
    with local_copy(folder) as local:
        return Loaded(*load_model_from_checkpoint(local, which=which))


# ---------------------------------------------------------------------------------------------
# MLflow models


def load_mlflow_model(uri: str, tracking_uri: str = "") -> Loaded:
    """An MLflow model as ``jobs.inference.pyfunc`` logs it: weights and config read as data, the
    network rebuilt by this checkout's code (not the code shipped with the model)."""
    import mlflow
    from mlflow.models import Model

    from jobs.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    with tempfile.TemporaryDirectory() as tmp:
        folder = uri if Path(uri).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        flavors = Model.load(folder).flavors
        artifacts = flavors.get("python_function", {}).get("artifacts") or {}
        if {"weights", "config"} <= set(artifacts):
            return Loaded(*read_model_files(*(Path(folder) / artifacts[k]["path"] for k in ("weights", "config"))))
    if "pytorch" in flavors:
        return load_pickled_mlflow_model(uri)
    raise BadValue(f"MLflow model {uri} is not a salgl model (flavours {sorted(flavors)}, no weights and config artifacts)")


def load_pickled_mlflow_model(uri: str) -> Loaded:
    """An MLflow PyTorch model of a pickled SALGL module (as salgl logged them before the pyfunc),
    loaded only when ``SALGL_ALLOW_PICKLED_MODELS=1``; MLflow's tracking URI is already set."""
    import mlflow
    import mlflow.pytorch

    if os.environ.get(ALLOW_PICKLED_ENV) != "1":
        raise UsageError(f"MLflow model {uri} is a pickled PyTorch module (salgl's older model format): unpickling it "
                         f"runs code the file names, so it is refused. If you trust where it came from, set "
                         f"{ALLOW_PICKLED_ENV}=1 to load it anyway, or log its checkpoint again "
                         "(jobs.inference.pyfunc.log_checkpoint_model) to get the weights-only format")
    warnings.warn(f"{ALLOW_PICKLED_ENV}=1: unpickling MLflow model {uri}, which can run any code it names", stacklevel=2)
    info = mlflow.models.get_model_info(uri)
    vocabulary = (info.metadata or {}).get("vocabulary")
    if not vocabulary:
        raise BadValue(f"MLflow model {uri} has no `vocabulary` in its metadata (log it with metadata={{'vocabulary': [...]}})")
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    if not isinstance(model, SALGL):
        raise BadValue(f"MLflow model {uri} is a {type(model).__name__}, not a SALGL model")
    return Loaded(model.eval(), _mlflow_config(info.run_id, model), list(vocabulary))


def _mlflow_config(run_id: str | None, model: SALGL) -> Config:
    """The training run's config (its params), else one read off the model with default data settings."""
    from mlflow.tracking import MlflowClient

    params = MlflowClient().get_run(run_id).data.params if run_id else {}
    if "model.head.num_scenes" in params:
        return config_from_flat(params, params.get("schema_version"))
    warnings.warn("the MLflow model's run has no salgl params: image size and normalisation are the defaults", stacklevel=2)
    base = {"model.backbone.name": model.backbone.name, "model.backbone.weights": "none"}
    return from_flat({**base, **to_flat(model.head.cfg, "model.head.")})


# ---------------------------------------------------------------------------------------------
# Released checkpoints


def guess_released_backbone(state: Mapping[str, torch.Tensor]) -> str | None:
    """The timm name of a released ResNet backbone, from its block counts (None if not a known ResNet)."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[2]) for k in state if k.startswith(f"backbone.layer{stage}.")}
        blocks.append(max(ids) + 1 if ids else 0)
    bottleneck = any(k.startswith("backbone.layer1.0.conv3.") for k in state)
    return _RESNETS.get((tuple(blocks), bottleneck))


def load_released(
    path: str | Path,
    vocabulary: Sequence[str] | None,
    *,
    flags: ReleasedFlags | None = None,
    backbone: str | None = None,
) -> Loaded:
    """A released ``.pth``: ``official`` preset, sizes from the tensors, switches from ``flags``."""
    flags = flags or ReleasedFlags()
    state = strip_module_prefix(load_released_file(str(path)))
    num_labels, label_dim = state["embeddings"].shape
    if vocabulary is None:
        raise BadValue(f"{path} is a released checkpoint and holds no label names: give its {num_labels} labels (--vocabulary FILE or a dataset folder)")
    if len(vocabulary) != num_labels:
        raise BadValue(f"{path} has {num_labels} labels, the vocabulary given has {len(vocabulary)}")
    backbone = backbone or guess_released_backbone(state)
    if backbone is None:
        raise BadValue(f"cannot tell the backbone of {path} from its keys: name it (--backbone, a timm model name)")
    head = to_flat(head_config_from_released(state, flags), "model.head.")
    cfg = preset("official", {"model.backbone.name": backbone, "model.backbone.weights": "none", **head})
    model = build_model(cfg.model, num_labels=num_labels, label_dim=label_dim)
    try:
        load_released_checkpoint(model, state)
    except RuntimeError as err:  # size mismatches: the switches do not describe this checkpoint
        raise BadValue(f"{path} does not fit {flags} (check the --released-* options): {str(err)[:500]}") from None
    return Loaded(model.eval(), cfg, list(vocabulary))


# ---------------------------------------------------------------------------------------------
# One entry point


def load_for_inference(
    source: str,
    *,
    which: str = "ema",
    vocabulary: Sequence[str] | None = None,
    flags: ReleasedFlags | None = None,
    backbone: str | None = None,
    tracking_uri: str = "",
) -> Loaded:
    """``(model, cfg, vocabulary)`` from a checkpoint folder, an MLflow model URI or a released ``.pth``.

    ``which`` ("ema" or "live") applies to our checkpoints; ``vocabulary``, ``flags`` and
    ``backbone`` to released ones (a given ``vocabulary`` must match the others' own, if any).
    """
    if which not in ("ema", "live"):
        raise BadValue(f"which must be 'ema' or 'live', got {which!r}")
    kind = checkpoint_kind(source)
    if kind == "released":
        return load_released(source, vocabulary, flags=flags, backbone=backbone)
    loaded = load_folder_checkpoint(source, which) if kind == "folder" else load_mlflow_model(source, tracking_uri)
    if vocabulary is not None and list(vocabulary) != loaded.vocabulary:
        raise BadValue(f"{source} was trained on other labels than the ones given ({loaded.vocabulary[:5]}...)")
    return loaded


# ---------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_images(model: SALGL, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """images (B, 3, S, S) -> label probabilities (B, n) and scene probabilities (B, K), numpy float32."""
    device = next(model.parameters()).device
    out = model(images.to(device))
    return torch.sigmoid(out.logits.float()).cpu().numpy(), out.scene_probs.float().cpu().numpy()
