"""EMA warm-up benchmark: does the EMA model's mAP move from the first epoch of a short run?

    .venv/bin/python -m tests.bench.ema_warmup [--epochs 6] [--train 256] [--test 64]

No Ray: one tiny SALGL (the ``tiny`` preset) trained on a mosaic at 64 px, batch 8, with two EMAs
of the same live model, ``ema.decay`` 0.9997 with and without the warm-up (``salgl.ema``). The EMA
does not feed back into training, so the two EMA columns differ only by the warm-up. Printed per
epoch: the live model's test mAP, each EMA's, and the warm-up decay reached. About a minute on
2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.mosaic import MosaicConfig, convert_mosaic
from pipeline.shards import read_manifest, shard_paths
from pipeline.transforms import decode_image, mean_std, resize
from salgl.config import EmaConfig, preset
from salgl.ema import ModelEma
from salgl.label_embeddings import label_embeddings
from salgl.losses import salgl_loss
from salgl.metrics import multilabel_metrics
from salgl.model import build_model, load_label_embeddings

IMG = 64
BATCH = 8


def load_split(root: Path, split: str, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images (N, 3, IMG, IMG), ImageNet-normalised, and multi-hot targets (N, n)."""
    table = pq.read_table(shard_paths(root, split)).to_pydict()
    mean, std = mean_std("imagenet")
    images = np.stack([np.asarray(resize(decode_image(b).convert("RGB"), IMG), np.float32) / 255 for b in table["image"]])
    targets = np.zeros((len(images), num_labels), np.float32)
    for i, labels in enumerate(table["labels"]):
        targets[i, labels] = 1
    return torch.tensor((images - mean) / std).permute(0, 3, 1, 2).float(), torch.tensor(targets)  # (N, 3, H, W)


def eval_map(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(images).logits).numpy()
    return multilabel_metrics(scores, targets.numpy())["mAP"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--test", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mosaic"
        convert_mosaic(root, MosaicConfig(train=args.train, test=args.test, canvas=IMG), progress=False)
        vocabulary = read_manifest(root)["vocabulary"]
        x_train, y_train = load_split(root, "train", len(vocabulary))
        x_test, y_test = load_split(root, "test", len(vocabulary))
    cfg = preset("tiny")
    embeddings = label_embeddings(vocabulary, cfg.model.labels)
    model = build_model(cfg.model, num_labels=len(vocabulary), label_dim=embeddings.shape[1])
    load_label_embeddings(model, embeddings)
    emas = {warmup: ModelEma(model, EmaConfig(decay=0.9997, warmup=warmup)) for warmup in (True, False)}
    steps = len(x_train) // BATCH
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optim.lr, total_steps=args.epochs * steps, pct_start=cfg.optim.pct_start)
    print(f"before training: mAP {eval_map(model, x_test, y_test):.1f}")
    print("epoch  step  live mAP  EMA mAP warm-up  EMA mAP fixed  warm-up decay")
    step = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(steps):
            batch = order[i * BATCH : (i + 1) * BATCH]
            out = model(x_train[batch], y_train[batch])
            loss = salgl_loss(out.logits, out.scene_probs, y_train[batch], cfg.loss).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            for ema in emas.values():
                ema.update(model, step=step)
        maps = [eval_map(m, x_test, y_test) for m in (model, emas[True].module, emas[False].module)]
        print(f"{epoch:>5} {step:>5} {maps[0]:>9.1f} {maps[1]:>16.1f} {maps[2]:>14.1f} {emas[True].get_decay(step):>14.4f}")


if __name__ == "__main__":
    main()
