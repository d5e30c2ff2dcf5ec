"""The five parts of the GPU check (``tests/bench/gpu_check.py``), one function each.

A part is ``part(args, record)``: ``args`` has ``device`` ("cuda" or "cpu"), ``tiny`` and
``budget_s``; ``record(result)`` writes what the part has measured so far, so a part cut off by its
budget still leaves the rows it finished. Each runs in a fresh process (``gpu_check.run_part``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# Timing


class StepTimer:
    """Wall time of GPU work: CUDA events recorded around the step, read after a synchronize (the
    host returns from a CUDA call long before the kernels finish). On CPU, perf_counter."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def time(self, step: Callable[[], Any]) -> float:
        """Seconds one call of ``step`` takes, its queued kernels included."""
        torch = self.torch
        if not self.cuda:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1000.0

    def peak_mib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()


def timed(timer: StepTimer, step: Callable[[], Any], *, warmup: int, repeats: int) -> dict[str, Any]:
    """Warm-up calls (kernel selection, allocator growth), then the timed ones: min, median, peak memory."""
    import statistics

    for _ in range(warmup):
        timer.time(step)
    timer.reset_peak()
    times = [timer.time(step) for _ in range(repeats)]
    return {"min_s": min(times), "median_s": statistics.median(times), "times_s": times, "peak_mib": timer.peak_mib()}


# ---------------------------------------------------------------------------------------------
# Part: the tests marked gpu


class _Outcomes:
    """A pytest plugin counting outcomes of the call phase (and of setups that skip or fail)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.counts[report.outcome] = self.counts.get(report.outcome, 0) + 1
            if report.outcome == "failed":
                self.failures.append(f"{report.nodeid}: {str(report.longrepr)[-800:]}")


def part_gpu_tests(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    import pytest

    outcomes = _Outcomes()
    with tempfile.TemporaryDirectory() as tmp:
        code = pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp}", str(ROOT / "tests")],
                           plugins=[outcomes])
    record({"exit_code": int(code), **outcomes.counts, "failures": outcomes.failures})
    if int(code) not in (0, 5):  # 5: no test collected
        raise RuntimeError(f"pytest -m gpu exited {int(code)}: {outcomes.failures[:3]}")


# ---------------------------------------------------------------------------------------------
# Part: the head step, ours against the released computation


def _head_pair(tiny: bool, device: Any) -> tuple[Any, Any, dict[str, Any], Any]:
    """(released head, ours with the same weights and counts, inputs, sizes), on ``device``,
    in training mode with the token encoders' dropout off (deterministic: tests/bench/head_step.py)."""
    from salgl.official import ReleasedFlags, head_from_official_state_dict
    from tests.bench.head_step import QUICK, Sizes, make_inputs, released_head

    sizes = QUICK if tiny else Sizes()
    released = released_head(sizes, seed=0)
    ours = head_from_official_state_dict(released.state_dict(), ReleasedFlags(num_steps=sizes.steps))
    for head, encoder in ((released, released.tb), (ours, ours.token_encoder)):
        head.to(device).train()
        encoder.eval()
    inputs = {k: v.to(device) for k, v in make_inputs(sizes, seed=0).items()}
    return released, ours, inputs, sizes


def _head_outputs(name: str, head: Any, inputs: dict[str, Any]) -> tuple[Any, Any]:
    if name == "released":
        out = head(inputs["tokens"], inputs["targets"])
        return out["logits"], out["scene_probs"]
    out = head(inputs["tokens"], inputs["targets"])
    return out.logits, out.scene_probs


def _head_step(name: str, head: Any, counts_name: str, start: Any, inputs: dict[str, Any], precision: Any) -> dict[str, Any]:
    """One step from the starting counts: forward with counting, a fixed linear loss, backward."""
    head.zero_grad(set_to_none=True)
    getattr(head, counts_name).copy_(start)
    with precision.autocast():
        logits, scene_probs = _head_outputs(name, head, inputs)
    loss = (logits.float() * inputs["grad_logits"]).sum() + (scene_probs.float() * inputs["grad_scenes"]).sum()
    loss.backward()
    return {"logits": logits.detach().double(), "scene_probs": scene_probs.detach().double(),
            "counts": getattr(head, counts_name).detach().double()}


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for key in b:
        diff = (a[key] - b[key]).abs().max().item()
        scale = b[key].abs().max().item()
        out[key] = {"max_abs_diff": diff, "relative": diff / max(scale, 1e-30)}
    return out


def part_head_step(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    import torch

    from jobs.training.acceleration import StepPrecision

    device = torch.device(args.device)
    timer = StepTimer(device)
    released, ours, inputs, sizes = _head_pair(args.tiny, device)
    start = {"released": released.comatrix.clone(), "ours": ours.counts.clone()}
    heads = {"released": (released, "comatrix"), "ours": (ours, "counts")}
    result: dict[str, Any] = {"sizes": sizes.__dict__, "rows": {}}
    outputs: dict[str, dict[str, Any]] = {}
    for precision_name in ("fp32", "bf16"):
        precision = StepPrecision(precision_name, device)
        for name, (head, counts_name) in heads.items():
            step = lambda: _head_step(name, head, counts_name, start[name], inputs, precision)  # noqa: E731
            row = timed(timer, step, warmup=1, repeats=2 if args.tiny else 5)
            outputs[f"{name}/{precision_name}"] = step()
            result["rows"][f"{name}/{precision_name}"] = row
            record(result)  # what has finished survives a timeout
        pair = (outputs[f"ours/{precision_name}"], outputs[f"released/{precision_name}"])
        result[f"ours_vs_released/{precision_name}"] = _max_diff(*pair)
        result[f"counts_identical/{precision_name}"] = bool(torch.equal(pair[0]["counts"], pair[1]["counts"]))
    result["ours_bf16_vs_fp32"] = _max_diff(outputs["ours/bf16"], outputs["ours/fp32"])
    for precision_name in ("fp32", "bf16"):
        rows = result["rows"]
        result[f"speedup/{precision_name}"] = rows[f"released/{precision_name}"]["min_s"] / rows[f"ours/{precision_name}"]["min_s"]
    record(result)


# ---------------------------------------------------------------------------------------------
# Part: the training step, full model against a linear head on the same backbone


def _train_config(tiny: bool) -> Any:
    from salgl.config import preset

    size = {"model.backbone.name": "test_resnet", "model.labels.random_dim": 16, "model.head.attn_dim": 16,
            "model.head.attn_hidden": 16, "data.img_size": 64, "optim.batch_size": 4} if tiny else {
            "model.backbone.name": "resnet101", "model.labels.random_dim": 768, "data.img_size": 448, "optim.batch_size": 32}
    return preset("paper", {"model.backbone.weights": "none", "model.labels.encoder": "random", "K": 6, "T": 3, **size})


class LinearHeadModel:
    """The baseline: the same timm backbone, mean-pooled tokens, one linear layer (n outputs)."""

    def __init__(self, cfg: Any, num_labels: int, device: Any) -> None:
        import torch

        from salgl.backbone import Backbone

        self.backbone = Backbone(cfg.model.backbone).to(device).train()
        self.linear = torch.nn.Linear(self.backbone.token_dim, num_labels).to(device)
        self.parameters = [*self.backbone.parameters(), *self.linear.parameters()]

    def loss(self, images: Any, targets: Any) -> Any:
        import torch

        logits = self.linear(self.backbone(images).mean(1))  # (B, m, d) -> (B, d) -> (B, n)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)


class SalglModel:
    """The full model with the recipe's loss (ASL + lambda L_en, scene targets)."""

    def __init__(self, cfg: Any, num_labels: int, device: Any) -> None:
        import torch

        from salgl.model import build_model, load_label_embeddings

        self.cfg = cfg
        self.model = build_model(cfg.model, num_labels=num_labels, label_dim=cfg.model.labels.random_dim)
        load_label_embeddings(self.model, torch.randn(num_labels, cfg.model.labels.random_dim))
        self.model.to(device).train()
        self.parameters = list(self.model.parameters())

    def loss(self, images: Any, targets: Any) -> Any:
        from salgl.losses import salgl_loss

        out = self.model(images, targets)
        scene_targets = self.model.head.scene_targets(targets)
        return salgl_loss(out.logits.float(), out.scene_probs.float(), targets, self.cfg.loss, scene_targets=scene_targets).total


def _training_step(model: Any, optimizer: Any, precision: Any, images: Any, targets: Any) -> None:
    with precision.autocast():
        loss = model.loss(images, targets)
    precision.backward(loss)
    precision.optimizer_step(optimizer, model.parameters, clip_grad_norm=0.0)
    optimizer.zero_grad(set_to_none=True)


def part_train_step(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    import torch

    from jobs.training.acceleration import StepPrecision, channels_last_images, to_channels_last

    device = torch.device(args.device)
    timer = StepTimer(device)
    cfg = _train_config(args.tiny)
    num_labels, batch, size = 80, cfg.optim.batch_size, cfg.data.img_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)  # (B, 3, S, S)
    targets = (torch.rand(batch, num_labels, generator=gen) < 0.05).float().to(device)  # (B, n)
    result: dict[str, Any] = {"backbone": cfg.model.backbone.name, "img_size": size, "batch": batch, "rows": {},
                              "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}
    low = "bf16"
    variants = [("salgl", "fp32", False), ("linear", "fp32", False), ("salgl", low, False), ("linear", low, False),
                ("salgl", low, True)]
    for kind, precision_name, channels_last in variants:
        torch.manual_seed(0)
        model = (SalglModel if kind == "salgl" else LinearHeadModel)(cfg, num_labels, device)
        if channels_last:
            to_channels_last(model.model)
        optimizer = torch.optim.AdamW(model.parameters, lr=1e-4)
        precision = StepPrecision(precision_name, device)
        x = channels_last_images(images) if channels_last else images
        row = timed(timer, lambda: _training_step(model, optimizer, precision, x, targets), warmup=1 if args.tiny else 3,
                    repeats=2 if args.tiny else 8)
        row["images_per_s"] = batch / row["min_s"]
        result["rows"][f"{kind}/{precision_name}{'/channels_last' if channels_last else ''}"] = row
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record(result)
    for precision_name in ("fp32", low):
        full, plain = result["rows"][f"salgl/{precision_name}"]["min_s"], result["rows"][f"linear/{precision_name}"]["min_s"]
        result[f"head_share_pct/{precision_name}"] = 100.0 * (full - plain) / full
    record(result)


# ---------------------------------------------------------------------------------------------
# Part: ingest decode rate at 448 px


def part_decode(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    """The training ingest (``pipeline.ingest``) as a 1-GPU run sizes it on this machine: data tasks
    on the CPUs the worker leaves, batches copied to the device and normalised there. The timed
    pass is the dataset's second (the first starts the data processes)."""
    import ray
    import torch

    from jobs.resources import plan_resources
    from pipeline import ingest
    from salgl.config import DataConfig
    from tests.bench.ingest import write_synthetic_dataset

    rows, size, batch, width = (64, 64, 8, 160) if args.tiny else (1536, 448, 32, 640)
    cpus = os.cpu_count() or 1
    plan = plan_resources(1, {"CPU": float(cpus), "GPU": 1.0 if args.device == "cuda" else 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_dataset(tmp, {"train": rows}, width=width, height=width * 3 // 4, unique_images=min(rows, 128))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            ds = ingest.train_dataset(tmp, DataConfig(img_size=size), seed=0, num_cpus=plan.data_task_cpus)
            ds.context.execution_options = ingest.execution_options(cpu=plan.data_cpus)
            iterator = ds.iterator()
            passes = []
            for epoch in range(2):
                start, images = time.perf_counter(), 0
                for out in ingest.iter_train_batches(iterator, batch_size=batch, epoch=epoch, normalize="imagenet", device=args.device):
                    images += out["image"].shape[0]
                if args.device == "cuda":
                    torch.cuda.synchronize()  # the last batch's copy and normalisation
                passes.append({"images": images, "seconds": time.perf_counter() - start})
            timed_pass = passes[-1]
            record({"img_size": size, "rows": rows, "cpus": cpus, "data_cpus": plan.data_cpus, "data_task_cpus": plan.data_task_cpus,
                    "passes": passes, "images_per_s": timed_pass["images"] / timed_pass["seconds"]})
        finally:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Part: tiny salgl train runs through Ray Train


def _train_runs(args: argparse.Namespace) -> list[dict[str, str]]:
    """fp32 first (what a default run does), then the options' paths: fp16 (the gradient scaler)
    with channels-last, and a compiled backbone last (the slowest to start, so a cut budget loses
    only it). On CPU, bf16 stands in for fp16 (refused there)."""
    if args.device == "cuda":
        return [{"run.name": "gpu-check-fp32"},
                {"run.name": "gpu-check-fp16", "optim.precision": "fp16", "run.channels_last": "true"},
                {"run.name": "gpu-check-compiled", "optim.precision": "bf16", "run.compile": "true"}]
    return [{"run.name": "gpu-check-bf16", "optim.precision": "bf16", "run.channels_last": "true"}]


def _salgl_train(overrides: dict[str, str], *, data: str, root: Path, device: str, timeout: float) -> dict[str, Any]:
    """One ``salgl train tiny`` in a subprocess; its start line, exit code, metrics and MLflow params."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{root / 'mlflow.db'}"
    argv = [sys.executable, "-m", "jobs.cli", "train", "tiny", f"data.path={data}", f"run.storage={root / 'runs'}",
            f"run.tracking_uri={store}", f"run.device={device}", "run.workers=1", *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    # Its own process group: on a timeout the Ray instance it started is killed with it.
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        proc.returncode = -1
    out: dict[str, Any] = {"overrides": overrides, "exit_code": proc.returncode, "seconds": time.perf_counter() - start,
                           "start_line": next((line for line in stderr.splitlines() if f"run {overrides['run.name']}:" in line), None)}
    if proc.returncode != 0:
        out["stderr_tail"] = stderr[-3000:]
        return out
    record = json.loads((root / "runs" / overrides["run.name"] / "salgl_run.json").read_text())
    run = MlflowClient(store).get_run(record["mlflow_run_id"])
    out["params"] = {k: v for k, v in run.data.params.items() if k.startswith("resources.") or k in ("run.device", "optim.precision")}
    out["metrics"] = {k: run.data.metrics.get(k) for k in ("loss", "mAP", "ema_mAP", "images_per_s")}
    out["status"] = run.info.status
    return out


def part_ray_train(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    from tests._tiny_checkpoint import make_mosaic

    result: dict[str, Any] = {"runs": []}
    deadline = time.monotonic() + args.budget_s - 5
    with tempfile.TemporaryDirectory() as tmp:
        data = make_mosaic(Path(tmp) / "data")
        for overrides in _train_runs(args):
            left = deadline - time.monotonic()
            if left < 20:
                result["runs"].append({"overrides": overrides, "exit_code": None, "seconds": 0.0, "start_line": None,
                                       "error": "not started: the part's budget is spent"})
                continue
            run = _salgl_train(overrides, data=data, root=Path(tmp), device=args.device, timeout=left)
            result["runs"].append(run)
            record(result)
    failed = [r["overrides"]["run.name"] for r in result["runs"] if r["exit_code"] not in (0, None)]
    if failed:
        raise RuntimeError(f"salgl train failed: {', '.join(failed)} (stderr_tail in the JSON)")


PARTS: dict[str, Callable[[argparse.Namespace, Callable[[dict[str, Any]], None]], None]] = {
    "gpu_tests": part_gpu_tests, "head_step": part_head_step, "train_step": part_train_step,
    "decode": part_decode, "ray_train": part_ray_train,
}
