"""``salgl inspect``: per-scene co-occurrence heatmaps and label rankings of a checkpoint (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from jobs.inference.loading import load_for_inference
from tests._tiny_checkpoint import write_tiny_checkpoint

VOCABULARY = ["person", "dog", "sofa", "car", "bicycle", "bus"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", VOCABULARY))


def _valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()  # checks the whole file's structure and CRCs
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


@pytest.mark.parametrize("which", ["ema", "live"])
def test_inspect_writes_heatmaps_and_rankings(checkpoint: str, tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scenes"
    assert main(["inspect", checkpoint, "--out", str(out), "--labels", "dog,sofa,person", "--top-k", "4", "--which", which]) == 0
    model, cfg, _ = load_for_inference(checkpoint, which=which)
    scenes = cfg.model.head.num_scenes
    expected = {f"scene_{k}_{kind}.png" for k in range(scenes) for kind in ("cooccurrence", "top_labels")}
    assert {p.name for p in out.iterdir()} == expected | {"top_labels_per_scene.json"}
    for name in expected:
        width, height = _valid_png(out / name)
        assert width > 100 and height > 100

    diagonal = torch.diagonal(model.head.counts, dim1=-2, dim2=-1).numpy()  # (K, n)
    rankings = json.loads((out / "top_labels_per_scene.json").read_text())
    for k in range(scenes):
        ranked = rankings[f"scene_{k}"]
        assert len(ranked) <= 4 and [c for _, c in ranked] == sorted((c for _, c in ranked), reverse=True)
        if diagonal[k].max() > 0:
            assert ranked[0][0] == VOCABULARY[int(np.argmax(diagonal[k]))]
    assert "scene 0:" in capsys.readouterr().out


def test_inspect_rejects_unknown_labels(checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", checkpoint, "--out", str(tmp_path), "--labels", "dog,unicorn"]) == 2  # a usage error
    assert "unicorn" in capsys.readouterr().err
