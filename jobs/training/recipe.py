"""The per-worker training recipe that Ray Train runs: setup, train, evaluate, report.

Every rank runs the same steps (the same number of batches per epoch, the same collectives and
the same ``report`` calls); rank 0 alone attaches a checkpoint. Metrics go to MLflow and the
console from the driver side (``jobs.training.epoch_report``), so the loop never checks ranks to log;
within an epoch, rank 0 alone writes a progress line now and then (``jobs.training.progress``).
Per step: forward (the batch's count delta summed across workers in one collective, inside the
head), ASL + lambda L_en, backward with DDP's gradient all-reduce, optimiser, schedule, EMA.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from jobs.logs import FILE_ONLY, LOG_FILE, configure_worker_logging
from jobs.storage import Folder
from jobs.training.acceleration import StepPrecision, channels_last_images, compile_backbone, to_channels_last
from jobs.training.checkpoints import DIVERGED_FILE, TrainingState, read_checkpoint, write_checkpoint
from jobs.training.distributed import check_counts_consistent, count_sync_for, gather_objects, world
from jobs.training.progress import STATUS_FILE, StepProgress
from jobs.training.progress import log as progress_log
from jobs.scene_metrics import PROBE_IMAGES, PROBES, augmented_probe, probe_pairs, scene_metrics
from jobs.training.worker_spec import WorkerSpec
from pipeline.seeding import derive_seed
from salgl.config import Config, from_flat
from salgl.ema import ModelEma
from salgl.losses import salgl_loss
from salgl.metrics import multilabel_metrics
from salgl.model import SALGL, build_model, load_label_embeddings


# The epoch's loss terms by name, in the order of salgl.losses.LossTerms.
LOSS_TERMS = ("loss", "loss_cls", "loss_sample_entropy", "loss_balance_entropy", "loss_scene_target")


class Recipe:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.cfg: Config = from_flat(spec.config)
        self.world = world()
        self.num_labels = len(spec.vocabulary)
        self.per_worker_batch = max(1, self.cfg.optim.batch_size // self.world.size)
        rows_per_worker = spec.train_rows // self.world.size
        self.steps_per_epoch = rows_per_worker // self.per_worker_batch  # micro-batches
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"optim.batch_size={self.cfg.optim.batch_size} is larger than a worker's share of the "
                f"{spec.train_rows} training images; lower it or use fewer workers"
            )

    # ------------------------------------------------------------------ setup
    def setup(self, checkpoint_dir: str | None) -> None:
        import ray.train.torch

        torch.set_num_threads(self.spec.threads)
        torch.manual_seed(self.cfg.run.seed)  # same init everywhere (DDP also broadcasts it)
        embeddings = torch.tensor(self.spec.label_embeddings, dtype=torch.float32)
        model = build_model(self.cfg.model, num_labels=self.num_labels, label_dim=embeddings.shape[1])
        load_label_embeddings(model, embeddings)
        restored = read_checkpoint(checkpoint_dir) if checkpoint_dir else None
        if restored is None:
            from salgl.backbone import load_backbone_weights

            load_backbone_weights(model.backbone, self.cfg.model.backbone.weights)
            if model.head.label_mixture is not None and self.spec.scene_mixture is not None:
                model.head.label_mixture.load_fit(self.spec.scene_mixture["prior"], self.spec.scene_mixture["theta"])
        else:
            model.load_state_dict(restored["model"])
        self.device = ray.train.torch.get_device()
        self.precision = StepPrecision(self.cfg.optim.precision, self.device)
        if self.cfg.run.channels_last:
            to_channels_last(model)
        # The counts are summed across workers explicitly; DDP must never overwrite them from rank 0.
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
        self.ema = ModelEma(self.unwrapped, self.cfg.ema) if self.cfg.ema.enabled else None
        if self.cfg.run.compile:  # after the EMA's copy, which stays eager (it only evaluates)
            compile_backbone(self.unwrapped)
        self.optimizer = torch.optim.AdamW(
            self.unwrapped.parameters(), lr=self.cfg.optim.lr, weight_decay=self.cfg.optim.weight_decay
        )
        total_steps = self.cfg.optim.epochs * self.optimizer_steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=self.cfg.optim.lr, total_steps=total_steps, pct_start=self.cfg.optim.pct_start
        )
        self.sync = count_sync_for(self.model, self.per_worker_batch, count_before_use=self.cfg.model.head.count_before_use)
        self.state = TrainingState(epoch=0, step=0)
        if restored is not None:
            self._restore(restored)
        # The first training images this worker sees, kept for the scene-stability probes
        # (jobs.scene_metrics), with their ids, to augment them twice more for scene_stability_augment.
        self.probe: torch.Tensor | None = None
        self.probe_ids: list[str] = []
        self.probe_views: tuple[torch.Tensor, torch.Tensor] | None = None  # uint8, on the host
        self.non_finite: dict[str, float] | None = None  # this rank's first non-finite loss: epoch, step, terms

    @property
    def unwrapped(self) -> SALGL:
        return getattr(self.model, "module", self.model)

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return self.steps_per_epoch // self.cfg.optim.grad_accum

    def _restore(self, restored: Mapping[str, Any]) -> None:
        if self.ema is not None and restored.get("ema") is not None:
            self.ema.load_state_dict(restored["ema"])
        self.optimizer.load_state_dict(restored["optimizer"])
        self.scheduler.load_state_dict(restored["scheduler"])
        self.precision.load_state_dict(restored.get("grad_scaler"))
        self.state = TrainingState(restored["epoch"], restored["step"])  # a data_seed key (older checkpoints) is ignored

    # ------------------------------------------------------------------ train
    def train_epoch(self, batches: Iterator[dict[str, Any]], epoch: int) -> dict[str, float]:
        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.run.seed, "dropout", self.world.rank, epoch))
        self.model.train()
        totals = np.zeros(5)
        images_seen, start = 0, time.perf_counter()
        accum = cfg.optim.grad_accum
        total = self.optimizer_steps_per_epoch * accum
        progress = StepProgress(
            total, epoch=epoch + 1, epochs=cfg.optim.epochs, world_size=self.world.size, enabled=self.world.is_main,
            **self.progress_bar_options(),
        )
        diverged = False
        for micro, batch in enumerate(_take(batches, total)):
            self._maybe_inject_failure(epoch, micro)
            last_micro = (micro + 1) % accum == 0
            if self.probe is None:
                self.probe = batch["image"][:PROBE_IMAGES].to(self.device).clone()
                self.probe_ids = list(batch["id"][:PROBE_IMAGES])
            terms = self._forward_backward(batch, sync_grads=last_micro)
            values = [t.item() for t in terms]
            totals += values
            if self.non_finite is None and not np.isfinite(values).all():
                self.non_finite = {"epoch": epoch + 1, "step": self.state.step + 1, **dict(zip(LOSS_TERMS, values))}
            images_seen += batch["image"].shape[0]
            progress.update(micro + 1, images_seen, totals[0] / (micro + 1))
            if last_micro:
                self._optimizer_step()
                if self.state.step % cfg.run.checksum_every == 0:
                    check_counts_consistent(self.unwrapped.head.counts, step=self.state.step)
                    if not self.parameters_finite():
                        diverged = True
                        break
        check_counts_consistent(self.unwrapped.head.counts, step=self.state.step)
        diverged = diverged or not self.parameters_finite()
        seconds = time.perf_counter() - start
        n = max(1, micro + 1)
        if diverged:  # the first non-finite loss on this rank, else the last loss before the weights broke
            last = {"epoch": epoch + 1, "step": self.state.step, **dict(zip(LOSS_TERMS, values))}
            return {"diverged": 1.0, **(self.non_finite or last), "non_finite_loss": float(self.non_finite is not None)}
        return {
            **{name: total / n for name, total in zip(LOSS_TERMS, totals)},
            "images_per_s": images_seen * self.world.size / max(seconds, 1e-9),
            "lr": self.scheduler.get_last_lr()[0],
        }

    def progress_bar_options(self) -> dict[str, Any]:
        """With the driver's bar (``WorkerSpec.progress_bar``): the status file it reads, and the
        30 s lines kept off the console (the bar says the same)."""
        if not (self.spec.progress_bar and self.spec.local_dir):
            return {}
        return {"status_file": Path(self.spec.local_dir) / STATUS_FILE,
                "emit": lambda line: progress_log.info(line, extra=FILE_ONLY)}

    def parameters_finite(self) -> bool:
        """Whether every weight is finite. DDP keeps the replicas identical, so every rank gives the
        same answer without a collective: a non-finite loss on any rank reaches every replica's
        weights through the gradient all-reduce, and all ranks stop at the same step."""
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(list(self.unwrapped.parameters()))))

    def _maybe_inject_failure(self, epoch: int, micro: int) -> None:
        """``run.inject_failure=EPOCH:RANK``: that rank's process dies half-way through that epoch,
        once per run, as a crashed machine would (tests of FailureConfig recovery)."""
        spec = self.cfg.run.inject_failure
        if not spec or micro != self.steps_per_epoch // 2:
            return
        fail_epoch, fail_rank = (int(p) for p in spec.split(":"))
        marker = Path(self.spec.local_dir or tempfile.gettempdir()) / ".salgl_failure_injected"
        if (epoch, self.world.rank) == (fail_epoch, fail_rank) and not marker.exists():
            marker.touch()
            os._exit(1)

    def _images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        images = batch["image"].to(self.device)  # (B, 3, S, S)
        return channels_last_images(images) if self.cfg.run.channels_last else images

    def _forward_backward(self, batch: dict[str, Any], *, sync_grads: bool) -> tuple[torch.Tensor, ...]:
        images = self._images(batch)
        targets = batch["target"].to(self.device)
        ignore = batch["ignore"].to(self.device)
        no_sync = getattr(self.model, "no_sync", None)
        grad_ctx = nullcontext() if sync_grads or no_sync is None else no_sync()
        with grad_ctx:
            with self.precision.autocast():
                # The count payload rides the backward's gradient all-reduce (or, unwrapped, its
                # own collective); settled before the optimiser step, EMA, checksum or checkpoint.
                out = self.model(images, targets, sync=self.sync, defer_count_update=True)
            scene_targets = self.unwrapped.head.scene_targets(targets, ignore)
            terms = salgl_loss(
                out.logits.float(), out.scene_probs.float(), targets, self.cfg.loss, mask=ignore, scene_targets=scene_targets
            )
            self.precision.backward(terms.total / self.cfg.optim.grad_accum)
        self.unwrapped.head.settle_counts()
        return tuple(t.detach() for t in terms)

    def _optimizer_step(self) -> None:
        self.precision.optimizer_step(self.optimizer, self.unwrapped.parameters(), clip_grad_norm=self.cfg.optim.clip_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.unwrapped, step=self.state.step + 1)
        self.state = TrainingState(self.state.epoch, self.state.step + 1)

    # ------------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Score the test split with the live and the EMA model; gather every rank's rows.

        Scene metrics too: NMI / ARI against the data's true ``scene`` column where it has one, and
        each model's scene-stability probes (``jobs.scene_metrics.PROBES``) on this worker's probe batch.
        """
        models = {"live": self.unwrapped}
        if self.ema is not None:
            models["ema"] = self.ema.module
        parts: dict[str, list[np.ndarray]] = {f"{k}_{v}": [] for k in models for v in ("scores", "scenes")}
        if self.probe_views is None and self.probe_ids:  # made on first use (not in the training loop), then kept
            seed = derive_seed(self.cfg.run.seed, "probe", self.world.rank)
            self.probe_views = augmented_probe(self.cfg.data.path, self.cfg.data, num_labels=self.num_labels, seed=seed, ids=self.probe_ids)
        for name, model in models.items():
            pairs = probe_pairs(model, self.probe, self.probe_views, normalize=self.cfg.data.normalize) if self.probe is not None else {}
            for probe in PROBES:  # every rank gathers every key, empty where it has no such probe
                first, second = pairs.get(probe, (np.zeros(0), np.zeros(0)))
                parts[f"{name}_{probe}_a"], parts[f"{name}_{probe}_b"] = [first], [second]
            model.eval()
        targets, ignores, truths = [], [], []
        for batch in batches:
            keep = _host(batch["valid"]).astype(bool) if "valid" in batch else np.ones(len(batch["id"]), bool)
            images = self._images(batch)
            for name, model in models.items():
                with self.precision.autocast():
                    out = model(images)
                parts[f"{name}_scores"].append(torch.sigmoid(out.logits.float()).cpu().numpy()[keep])
                parts[f"{name}_scenes"].append(out.scene_probs.argmax(-1).cpu().numpy()[keep])
            targets.append(_host(batch["target"])[keep])
            ignores.append(_host(batch["ignore"])[keep])
            if "scene" in batch:
                truths.append(_host(batch["scene"])[keep])
        local = {k: _concat(v) for k, v in parts.items()}
        local.update(target=_concat(targets), ignore=_concat(ignores), truth=_concat(truths))
        gathered = gather_objects(local)
        merged = {k: np.concatenate([g[k] for g in gathered if len(g[k])] or [np.zeros(0)]) for k in local}
        num_scenes = self.cfg.model.head.num_scenes
        truth = merged["truth"] if len(merged["truth"]) else None
        results = {}
        for name in models:
            metrics = multilabel_metrics(merged[f"{name}_scores"], merged["target"], merged["ignore"])
            pairs = {probe: (merged[f"{name}_{probe}_a"], merged[f"{name}_{probe}_b"]) for probe in PROBES}
            metrics.update(scene_metrics(merged[f"{name}_scenes"], num_scenes, truth=truth, **pairs))
            results[name] = metrics
        return results

    # ------------------------------------------------------------------ report
    def epoch_metrics(self, epoch: int, train: Mapping[str, float], evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        metrics: dict[str, Any] = {"epoch": epoch, "step": self.state.step, **train}
        for name, values in evals.items():
            prefix = "" if name == "live" else f"{name}_"
            for key, value in values.items():
                if key == "occupancy":
                    metrics.update({f"{prefix}occupancy_{k}": v for k, v in enumerate(value)})
                elif isinstance(value, (int, float)):
                    metrics[f"{prefix}{key}"] = value
        metrics.setdefault("ema_mAP", metrics.get("mAP"))
        return metrics

    @staticmethod
    def per_class_ap(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
        """Each model's per-class AP (``ap``, ``ema_ap``; None for a class without positives): kept
        in the checkpoint's meta.json for the run's per-class table, not in the report (lists)."""
        return {("" if name == "live" else f"{name}_") + "ap": list(values["ap"]) for name, values in evals.items() if "ap" in values}

    def write_checkpoint(self, folder: str, metrics: Mapping[str, Any]) -> None:
        write_checkpoint(
            folder,
            model=self.unwrapped,
            ema=self.ema,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
            config=self.spec.config,
            vocabulary=self.spec.vocabulary,
            metrics=metrics,
            grad_scaler=self.precision.state_dict(),
        )

    def finish_epoch(self, epoch: int) -> None:
        self.state = TrainingState(epoch + 1, self.state.step)


def _take(iterator: Iterator[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """Exactly ``count`` batches: every rank runs the same number of steps (or collectives hang)."""
    taken = 0
    for batch in iterator:
        if taken == count:
            break
        taken += 1
        yield batch
    if taken < count:
        raise RuntimeError(f"the data shard ended after {taken} of {count} batches; ranks would fall out of step")


def _quiet_report_log() -> None:
    """Ray Train logs each report's whole metrics dict, per rank, at INFO, from a logger that
    ``LoggingConfig`` does not reach; the epoch line already says it."""
    from pipeline.ray_compat import train_report_logger_name

    name = train_report_logger_name()
    if name is not None:  # else another Ray version: its logging is left as it is
        logging.getLogger(name).setLevel(logging.WARNING)


def _restore_point(spec: WorkerSpec) -> Any:
    """A context giving the checkpoint folder to continue from (None: start afresh).

    The run folder's newest complete checkpoint, the one ``jobs.training.trainer``'s data stream starts
    its epochs from (``jobs.training.checkpoints.newest_checkpoint``); Ray's own restore point only where no
    run folder is known.
    """
    import ray.train

    from jobs.storage import local_copy
    from jobs.training.checkpoints import newest_checkpoint

    if spec.run_dir:
        newest = newest_checkpoint(spec.run_dir)
        return local_copy(newest[0]) if newest else nullcontext(None)
    checkpoint = ray.train.get_checkpoint()
    return checkpoint.as_directory() if checkpoint else nullcontext()


def _host(values: Any) -> np.ndarray:
    """A batch column as a host numpy array (on a GPU every tensor of the batch is on the device)."""
    return values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0,))


def train_loop_per_worker(spec_dict: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    import ray.train

    from pipeline.ingest import iter_eval_batches, iter_train_batches

    _quiet_report_log()
    spec = WorkerSpec.from_dict(spec_dict)
    configure_worker_logging(spec.log_level, Path(spec.local_dir) / LOG_FILE if spec.local_dir else None)
    recipe = Recipe(spec)
    with _restore_point(spec) as ckpt_dir:
        recipe.setup(ckpt_dir)
    cfg = recipe.cfg
    stop_after = cfg.run.stop_after_epoch or cfg.optim.epochs
    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    for epoch in range(recipe.state.epoch, min(cfg.optim.epochs, stop_after)):
        # On a GPU the batches arrive there as uint8 and are normalised on it (4x less to copy).
        batches = iter_train_batches(
            train_shard, batch_size=recipe.per_worker_batch, epoch=epoch, seed=cfg.run.seed, rank=recipe.world.rank,
            normalize=cfg.data.normalize, device=recipe.device,
        )
        train_metrics = recipe.train_epoch(batches, epoch)
        if "diverged" in train_metrics:  # every rank alike (see Recipe.parameters_finite): no checkpoint, stop
            if recipe.world.is_main and spec.run_dir:
                Folder(spec.run_dir).write_text(DIVERGED_FILE, json.dumps(train_metrics))
            ray.train.report({k: float(v) for k, v in train_metrics.items()})
            return
        recipe.finish_epoch(epoch)
        evals = recipe.evaluate(
            iter_eval_batches(test_shard, batch_size=recipe.per_worker_batch, normalize=cfg.data.normalize, device=recipe.device)
        )
        metrics = recipe.epoch_metrics(epoch + 1, train_metrics, evals)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint_out = None
            if recipe.world.is_main:
                recipe.write_checkpoint(folder, {**metrics, **recipe.per_class_ap(evals)})
                checkpoint_out = ray.train.Checkpoint.from_directory(folder)
            # Every rank reports (the same metrics); only rank 0 attaches the checkpoint.
            ray.train.report(dict(metrics), checkpoint=checkpoint_out)
