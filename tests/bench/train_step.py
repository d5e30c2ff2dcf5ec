"""Training-step benchmark: images/s with 1 and 2 Ray Train workers on the tiny config, the share of
step time spent in the count collective, and the Ray Train loop's overhead against a plain
single-process loop over the same batches.

    .venv/bin/python -m tests.bench.train_step [--out bench_out/train_step.json] [--steps 24]

The Ray runs execute the project's own worker code (``jobs.recipe.Recipe.train_epoch``: DDP,
count sync, checksums, EMA) fed by the project's Ray Data ingest; the count collective is timed by
wrapping the recipe's ``sync``. The plain loop runs the same model, loss, optimiser, schedule and
EMA in one process over batches decoded beforehand by the same transforms. Targets (issue 4):
collective under 2% of step time, Ray overhead under 10%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salgl.config import preset, to_flat

OVERRIDES = {"data.img_size": 64, "optim.batch_size": 16, "optim.epochs": 1, "ema.decay": 0.9}


def _dataset(root: Path, rows: int) -> str:
    from pipeline.mosaic import MosaicConfig, convert_mosaic

    out = root / "mosaic"
    convert_mosaic(out, MosaicConfig(train=rows, test=16, canvas=64), progress=False)
    return str(out)


def plain_loop(data_dir: str, steps: int, threads: int) -> dict[str, float]:
    """One process, the same model / loss / optimiser / EMA, batches decoded up front."""
    import pyarrow.parquet as pq

    from pipeline.shards import read_manifest, shard_paths
    from pipeline.transforms import transform_batch
    from salgl.ema import ModelEma
    from salgl.losses import salgl_loss
    from salgl.model import build_model

    torch.set_num_threads(threads)
    cfg = preset("tiny", OVERRIDES)
    n = len(read_manifest(data_dir)["vocabulary"])
    table = pq.read_table(shard_paths(data_dir, "train")[0])
    batch_size = cfg.optim.batch_size
    batches = []
    for i in range(steps):
        rows = table.slice(i * batch_size, batch_size).to_pydict()
        raw = {k: np.array(v, dtype=object) for k, v in rows.items()}
        out = transform_batch(raw, cfg=cfg.data, num_labels=n, train=True, seed=i)
        batches.append({k: torch.from_numpy(out[k]) for k in ("image", "target", "ignore")})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_labels=n, label_dim=16).train()
    ema = ModelEma(model, cfg.ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optim.lr, total_steps=steps)
    times = []
    for batch in batches:
        start = time.perf_counter()
        out = model(batch["image"], batch["target"])
        salgl_loss(out.logits, out.scene_probs, batch["target"], cfg.loss, mask=batch["ignore"]).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update(model)
        times.append(time.perf_counter() - start)
    step = float(np.median(times[2:]))
    return {"step_s": step, "images_per_s": batch_size / step}


def _bench_loop(spec: dict[str, Any]) -> None:
    """Ray Train worker: the recipe's own epoch, with the count collective timed."""
    import ray.train

    from jobs.recipe import Recipe, WorkerSpec
    from pipeline.ingest import iter_train_batches

    recipe = Recipe(WorkerSpec.from_dict(spec))
    recipe.setup(None)
    spent = []
    inner = recipe.sync

    def timed_sync(weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = inner(weights, targets)
        spent.append(time.perf_counter() - start)
        return out

    recipe.sync = timed_sync
    shard = ray.train.get_dataset_shard("train")
    results = []
    for epoch in range(2):  # the first epoch warms up Ray Data and the model
        start = time.perf_counter()
        recipe.train_epoch(iter_train_batches(shard, batch_size=recipe.per_worker_batch, epoch=epoch), epoch)
        results.append((time.perf_counter() - start, recipe.steps_per_epoch, sum(spent)))
        spent.clear()
    seconds, steps, collective = results[-1]
    metrics = {"epoch_s": seconds, "steps": steps, "collective_s": collective,
               "images": steps * recipe.per_worker_batch * recipe.world.size}
    # Result.metrics keeps only a report that carried a checkpoint (Ray 2.60): rank 0 attaches one.
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if recipe.world.is_main:
            Path(folder, "bench.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def ray_loop(data_dir: str, workers: int, rows: int) -> dict[str, float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.recipe import WorkerSpec
    from jobs.train import cluster_plan
    from pipeline.ingest import build_datasets, data_config
    from salgl.label_embeddings import label_embeddings

    cfg = preset("tiny", {**OVERRIDES, "run.workers": workers, "optim.epochs": 2})
    from pipeline.shards import read_manifest

    vocabulary = read_manifest(data_dir)["vocabulary"]
    plan = cluster_plan(workers)
    spec = WorkerSpec(
        config=to_flat(cfg), vocabulary=vocabulary,
        label_embeddings=label_embeddings(vocabulary, cfg.model.labels).tolist(),
        train_rows=rows, threads=plan.torch_threads,
    )
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _bench_loop,
            train_loop_config=spec.__dict__,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": plan.cpus_per_worker}),
            run_config=ray.train.RunConfig(name=f"bench-{workers}", storage_path=storage),
            datasets=build_datasets(data_dir, cfg.data, seed=0, num_workers=workers, eval_split=None, num_cpus=plan.data_task_cpus),
            dataset_config=data_config(["train"], cpu=plan.data_cpus),
        )
        m = trainer.fit().metrics
    step = m["epoch_s"] / m["steps"]
    return {"step_s": step, "images_per_s": m["images"] / m["epoch_s"],
            "collective_share": m["collective_s"] / m["epoch_s"], "threads": plan.torch_threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/train_step.json")
    parser.add_argument("--rows", type=int, default=512, help="training images per epoch")
    args = parser.parse_args()

    import ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _dataset(Path(tmp), args.rows)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            rows = {f"ray_{w}_worker": ray_loop(data_dir, w, args.rows) for w in (1, 2)}
        finally:
            ray.shutdown()
        one = rows["ray_1_worker"]
        rows["plain_1_process"] = plain_loop(data_dir, steps=min(32, args.rows // 16), threads=one["threads"])
    overhead = one["step_s"] / rows["plain_1_process"]["step_s"] - 1.0
    print(f"{'loop':<18}{'step (s)':>10}{'images/s':>10}{'collective %':>14}")
    for name, r in rows.items():
        share = f"{100 * r['collective_share']:.2f}" if "collective_share" in r else "-"
        print(f"{name:<18}{r['step_s']:>10.3f}{r['images_per_s']:>10.1f}{share:>14}")
    print(f"Ray Train overhead vs plain loop (1 worker, same threads): {100 * overhead:+.1f}% (target < 10%)")
    print(f"count collective share with 2 workers: {100 * rows['ray_2_worker']['collective_share']:.2f}% (target < 2%)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "ray_overhead": overhead, "machine_cores": torch.get_num_threads()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
