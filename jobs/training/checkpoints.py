"""Training checkpoints: one folder with everything needed to continue exactly.

``state.pt`` holds model, EMA, optimiser, scheduler, the fp16 gradient scaler, epoch and step; the counts (live
and EMA) are in the two model state dicts. ``meta.json`` repeats epoch, step and metrics in plain
text so tools can pick a checkpoint without loading tensors, and the size of every other file, so
that a folder left half-copied by a crash is never taken for a checkpoint (``newest_checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from jobs.storage import Folder
from salgl.errors import BadValue, CorruptFile, NotFound

if TYPE_CHECKING:  # torch loads where a checkpoint is read or written, not where one is only found
    import torch
    from torch import nn

# In the run folder, beside the checkpoints: written by rank 0 when the weights stop being finite
# (jobs.training.recipe), read by the driver to fail the run with the epoch, step and loss terms.
DIVERGED_FILE = "diverged.json"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class TrainingState:
    epoch: int  # epochs completed
    step: int  # optimiser steps completed


def write_checkpoint(
    folder: str | os.PathLike[str],
    *,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainingState,
    config: Mapping[str, Any],
    vocabulary: list[str],
    metrics: Mapping[str, Any],
    grad_scaler: Mapping[str, Any] | None = None,
) -> Path:
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "grad_scaler": dict(grad_scaler) if grad_scaler else None,  # optim.precision=fp16's loss scale
    }
    torch.save(blob, folder / STATE_FILE)
    from salgl.config import SCHEMA_VERSION

    record = {"config": dict(config), "vocabulary": vocabulary, "schema_version": SCHEMA_VERSION}
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    files = {name: file_record(folder / name) for name in (STATE_FILE, CONFIG_FILE)}
    meta = {"epoch": state.epoch, "step": state.step, "metrics": _plain(metrics), "files": files}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    return folder


def file_record(path: Path) -> dict[str, Any]:
    """What meta.json records of a checkpoint file: its size (a half-copied folder is told at a
    glance) and its sha256 (a file altered in place, same size, is told on load)."""
    from pipeline.shards import file_sha256

    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def as_folder(location: str | os.PathLike[str] | Folder) -> Folder:
    return location if isinstance(location, Folder) else Folder(str(location))


def damaged_file(folder: Folder, meta: Mapping[str, Any], *, hashes: bool = True) -> str | None:
    """The first file of a checkpoint that is missing or differs from its meta.json record (size,
    and with ``hashes`` the sha256), as a message; None when all match. Older checkpoints record
    sizes only (``{name: size}``) and are checked by size."""
    for name, record in meta.get("files", {}).items():
        expected = record if isinstance(record, dict) else {"size": record}
        size = folder.size(name)
        if size is None:
            return f"{folder / name} is missing"
        if size != expected.get("size"):
            return f"{folder / name} has {size} bytes, its meta.json says {expected.get('size')}"
        if hashes and "sha256" in expected and folder.sha256(name) != expected["sha256"]:
            return f"{folder / name} differs from the sha256 in its meta.json (altered or damaged)"
    return None


def verify_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Raise ``CorruptFile`` naming the file when a checkpoint folder no longer matches its meta.json."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except FileNotFoundError:
        return  # a bare state.pt (copied without its meta.json): nothing recorded to check against
    except ValueError:
        raise CorruptFile(f"{folder / META_FILE} is not valid JSON") from None
    problem = damaged_file(Folder(str(folder)), meta)
    if problem:
        raise CorruptFile(f"checkpoint refused: {problem}")


def read_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise NotFound(f"{folder} is not a salgl checkpoint (no {STATE_FILE})")
    verify_checkpoint(folder)
    import torch

    # weights_only: a checkpoint holds tensors, numbers and strings; unpickling anything else could
    # run code from a folder someone handed over, so it is refused instead.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CorruptFile(f"{path} holds an object of {found.group(1)}, not only tensors and numbers; refused "
                              "unopened (a salgl checkpoint never does)") from None
        raise CorruptFile(f"{path} cannot be read as a checkpoint (not a torch file, or damaged)") from None
    except (RuntimeError, EOFError) as err:  # truncated
        raise CorruptFile(f"{path} cannot be read as a checkpoint: {str(err)[:200]}") from None


def read_checkpoint_config(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str], int | None]:
    """The flat config and vocabulary a checkpoint was trained with, and the config schema version
    that wrote it (None: written before versions were recorded)."""
    data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    return data["config"], data["vocabulary"], data.get("schema_version")


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = list(value)
    return out


def load_model_from_checkpoint(folder: str | os.PathLike[str], *, which: str = "ema") -> tuple[Any, Any, list[str]]:
    """(model in eval mode, Config, vocabulary) from a checkpoint folder; ``which`` is ``ema``
    (the default, falling back to live weights when the run had no EMA) or ``live``."""
    from salgl.config import from_stored, version_gap
    from salgl.model import build_model
    from salgl.official import strip_module_prefix

    if which not in ("ema", "live"):
        raise BadValue(f"which must be 'ema' or 'live', got {which!r}")
    state = read_checkpoint(folder)
    flat, vocabulary, version = read_checkpoint_config(folder)
    cfg = from_stored(flat, version)
    weights = state["ema"] if which == "ema" and state.get("ema") else state["model"]
    weights = strip_module_prefix(weights)
    model = build_model(cfg.model, num_labels=len(vocabulary), label_dim=weights["head.label_embeddings"].shape[1])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing or mis-sized tensors
        raise CorruptFile(
            f"{folder}: its state.pt does not fit the model its config.json describes{version_gap(flat, version)}: {str(err)[:300]}"
        ) from None
    return model.eval(), cfg, vocabulary


WEIGHTS_FILE = "weights.pt"


def export_weights(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """``out/weights.pt`` (the EMA model's state dict, the live one's without EMA, ``module.``
    prefix dropped) and ``out/config.json``: what inference needs of a checkpoint, without the
    optimiser and scheduler state."""
    import shutil

    import torch

    from salgl.official import strip_module_prefix

    state = read_checkpoint(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(strip_module_prefix(state.get("ema") or state["model"]), out / WEIGHTS_FILE)
    shutil.copyfile(Path(checkpoint) / CONFIG_FILE, out / CONFIG_FILE)
    return out


def _metas(run_dir: str | os.PathLike[str] | Folder) -> list[tuple[Folder, dict[str, Any]]]:
    """Every folder directly under a run folder with a readable meta.json, with it."""
    found = []
    for folder in as_folder(run_dir).subfolders():
        with contextlib.suppress(OSError, ValueError):  # no meta.json (yet), or one cut short
            found.append((folder, json.loads(folder.read_text(META_FILE))))
    return found


def read_meta(folder: str | os.PathLike[str] | Folder) -> dict[str, Any]:
    return json.loads(as_folder(folder).read_text(META_FILE))


def best_checkpoint_in(run_dir: str | os.PathLike[str] | Folder, metric: str) -> str | None:
    """The checkpoint folder (a path or URI) under a run with the highest ``metric`` in its meta.json."""
    best, best_value = None, float("-inf")
    for folder, meta in sorted(_metas(run_dir), key=lambda item: item[0].name):
        value = meta.get("metrics", {}).get(metric)
        if isinstance(value, (int, float)) and value > best_value:
            best, best_value = folder.location, float(value)
    return best


def newest_checkpoint(run_dir: str | os.PathLike[str] | Folder) -> tuple[str, int] | None:
    """(folder, epochs completed) of the newest complete checkpoint under a run folder, or None;
    the folder is a path, or a URI where the run is in an object store (``jobs.storage``).

    The one answer to "where does a (re)started worker group continue from": the data stream's
    first epoch and the workers' restored state both come from it. Ray Train's own "latest
    checkpoint" can lag behind the folder: a report that a worker made just before another worker
    died may never be registered, and restoring that older state with the newer epoch's data seeds
    would silently change the run.
    """
    found = [(int(meta.get("epoch", 0)), int(meta.get("step", 0)), folder.location, meta)
             for folder, meta in _metas(run_dir) if damaged_file(folder, meta, hashes=False) is None]
    # Newest first; only the one taken is hashed, and a damaged one gives way to the next newest.
    for epoch, _, location, meta in sorted(found, key=lambda item: item[:3], reverse=True):
        if damaged_file(Folder(location), meta) is None:
            return location, epoch
    return None


def latest_epoch(run_dir: str | os.PathLike[str]) -> int:
    """Epochs completed by the newest complete checkpoint under a run folder (0 when there is none)."""
    newest = newest_checkpoint(run_dir)
    return newest[1] if newest else 0


DAMAGED_DIR = "damaged"


def set_aside_damaged(run_dir: str | os.PathLike[str] | Folder) -> list[str]:
    """Before a run resumes: move every checkpoint folder that fails its meta.json check into
    ``<run>/damaged/`` and drop it from Ray's record of the run, returning one line per folder.

    A damaged checkpoint left in place would still count among the ``run.keep_checkpoints`` that
    Ray keeps by score, so a good one written after the resume could be deleted in its favour.
    Raises ``CorruptFile`` when no checkpoint is intact, rather than quietly starting over.
    """
    from pipeline.ray_compat import RAY_SNAPSHOT_FILE, forget_checkpoints

    run = as_folder(run_dir)
    damaged, intact = {}, []
    for folder in run.subfolders():
        if not folder.is_file(META_FILE):
            continue
        try:
            meta = read_meta(folder)
            problem = damaged_file(folder, meta)
        except ValueError:
            problem = f"{folder / META_FILE} is not valid JSON"
        if problem:
            damaged[folder.name] = problem
        else:
            intact.append((int(meta.get("epoch", 0)), int(meta.get("step", 0)), folder.name))
    if not damaged:
        return []
    if not intact:
        raise CorruptFile(
            f"every checkpoint of {run} is damaged ({'; '.join(damaged.values())}); nothing to continue "
            f"from. Start a new run, or move {run} aside"
        )
    epoch, _, newest = max(intact)
    if run.is_file(RAY_SNAPSHOT_FILE):
        run.write_text(RAY_SNAPSHOT_FILE, forget_checkpoints(run.read_text(RAY_SNAPSHOT_FILE), set(damaged), latest=newest))
    lines = []
    for name, problem in sorted(damaged.items()):
        (run / name).move_to(run / DAMAGED_DIR / name)
        lines.append(f"checkpoint {name} set aside in {run / DAMAGED_DIR}: {problem}")
    lines.append(f"continuing from {newest} (epoch {epoch})")
    return lines
