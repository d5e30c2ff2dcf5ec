"""A trained network as plain files: tensors in safetensors, the flat config and labels in JSON.

This is what the MLflow model (``jobs.inference.pyfunc``) carries instead of a pickled module:
reading it runs no code from the file (safetensors holds tensors and nothing else), and the
network is rebuilt by the project's own builders (``salgl.config.from_stored``,
``salgl.model.build_model``). No MLflow here: ``salgl predict`` reads the same files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from salgl.config import SCHEMA_VERSION, Config, from_stored, to_flat, version_gap
from salgl.errors import CorruptFile
from salgl.model import SALGL, build_model

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "salgl_model.json"  # {"config": flat config, "vocabulary": [label names], "schema_version": N}


def write_model_files(folder: str | Path, model: SALGL, cfg: Config, vocabulary: Sequence[str]) -> dict[str, str]:
    """The weights and the config + vocabulary in ``folder``; returns ``{"weights": path, "config": path}``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors stores each tensor's own bytes: views (non-contiguous) are copied first.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    record = {"config": to_flat(cfg), "vocabulary": list(vocabulary), "schema_version": SCHEMA_VERSION}
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    return {"weights": str(folder / WEIGHTS_FILE), "config": str(folder / CONFIG_FILE)}


def read_model_files(weights: str | Path, config: str | Path) -> tuple[SALGL, Config, list[str]]:
    """(model in eval mode on CPU, Config, vocabulary) rebuilt from ``write_model_files``' two files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = json.loads(Path(config).read_text(encoding="utf-8"))
        cfg, vocabulary = config_from_flat(data["config"], data.get("schema_version")), [str(x) for x in data["vocabulary"]]
        state = load_file(str(weights), device="cpu")
    except (ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CorruptFile(f"{config} / {weights}: not a salgl model's config and weights ({type(err).__name__}: {err})") from None
    try:
        model = build_model(cfg.model, num_labels=len(vocabulary), label_dim=state["head.label_embeddings"].shape[1])
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as err:  # missing or mis-sized tensors: the two files do not belong together
        gap = version_gap(data["config"], data.get("schema_version"))
        raise CorruptFile(f"{weights} does not fit the model {config} describes{gap}: {str(err)[:300]}") from None
    return model.eval(), cfg, vocabulary


def config_from_flat(flat: Mapping[str, Any], version: int | None = None) -> Config:
    """A stored config (``from_stored``: read as the version that wrote it) that skips keys this
    version does not know, with a warning."""
    known = to_flat(Config())
    unknown = sorted(set(flat) - set(known))
    if unknown:
        warnings.warn(f"ignoring config keys this version does not know: {unknown}", stacklevel=2)
    return from_stored({k: v for k, v in flat.items() if k in known}, version)
