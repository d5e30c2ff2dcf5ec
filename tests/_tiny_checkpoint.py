"""A tiny trained-looking checkpoint and a tiny mosaic dataset, made in seconds without Ray Train.

The checkpoint has non-zero counts (training-mode forward passes with targets) and an EMA whose
weights and counts differ from the live model's (decay 0.5), so tests can tell the two apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from jobs.training.checkpoints import TrainingState, write_checkpoint
from salgl.config import Config, preset, to_flat
from salgl.ema import ModelEma
from salgl.model import SALGL, build_model, load_label_embeddings

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMG_SIZE = 64


def make_mosaic(out: Path) -> str:
    """64 train / 32 test mosaics of 64 px (real Fashion-MNIST when installed, else flat fakes)."""
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    source = None
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        from tests._data_trees import write_fake_fashion_mnist

        source = write_fake_fashion_mnist(out.parent / "fake-fashion-mnist")
    convert_mosaic(out, MosaicConfig(train=64, test=32, canvas=IMG_SIZE), fashion_mnist=source, progress=False)
    return str(out)


def tiny_config(data_dir: str = "", **overrides: Any) -> Config:
    # Frozen BatchNorm (the tiny preset trains it, having no pretrained statistics): an image's
    # scene then does not depend on the mode, so evaluate's train/eval probe must agree exactly.
    return preset("tiny", {"data.path": data_dir, "data.img_size": IMG_SIZE, "data.augment": "none", "ema.decay": 0.5,
                           "model.backbone.batchnorm": "frozen", **overrides})


def tiny_trained_model(cfg: Config, num_labels: int, *, steps: int = 3, seed: int = 0) -> tuple[SALGL, ModelEma]:
    """A tiny model after ``steps`` training-mode passes (counts filled) and one optimiser step per pass."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_labels=num_labels, label_dim=cfg.model.labels.random_dim)
    load_label_embeddings(model, torch.randn(num_labels, cfg.model.labels.random_dim))
    ema = ModelEma(model, cfg.ema)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        images = torch.randn(4, 3, IMG_SIZE, IMG_SIZE)
        targets = (torch.rand(4, num_labels) < 0.4).float()
        out = model(images, targets)
        torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
    return model.eval(), ema


def write_tiny_checkpoint(
    folder: Path, vocabulary: list[str], data_dir: str = "", *, ema_map: float = 50.0, overrides: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint folder in the training format (``jobs.training.checkpoints.write_checkpoint``)."""
    cfg = tiny_config(data_dir, **(overrides or {}))
    model, ema = tiny_trained_model(cfg, len(vocabulary))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return write_checkpoint(
        folder, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
        state=TrainingState(epoch=1, step=3), config=to_flat(cfg),
        vocabulary=vocabulary, metrics={"ema_mAP": ema_map, "epoch": 1},
    )
