"""Devices and precision (issue 22, item 2): where the workers run, the start line, the options of
a step, and counts that stay float64 and unchanged under autocast. CPU only, seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.resources import check_precision, elastic_plan, plan_devices, plan_resources, scaling_workers
from salgl.config import HeadConfig, preset
from salgl.errors import EXIT_USAGE, BadValue, UsageError


# ---------------------------------------------------------------------------------------------
# The device decision


@pytest.mark.parametrize(("requested", "workers", "gpus", "use_gpu", "planned"), [
    ("auto", 2, 0, False, 2),  # no GPUs: CPUs, as asked
    ("auto", 2, 4, True, 2),  # enough GPUs: one each
    ("cuda", 2, 2, True, 2),
    ("cpu", 2, 8, False, 2),  # CPUs on a GPU cluster, because asked
])
def test_the_plan_follows_the_request_and_the_cluster_silently_when_it_can(requested, workers, gpus, use_gpu, planned) -> None:
    plan = plan_devices(requested=requested, workers=workers, cluster_gpus=gpus)
    assert (plan.use_gpu, plan.num_workers, plan.note) == (use_gpu, planned, "")


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_fewer_gpus_than_workers_run_one_worker_per_gpu_and_say_so(requested: str) -> None:
    plan = plan_devices(requested=requested, workers=4, cluster_gpus=2.5)
    assert (plan.use_gpu, plan.num_workers) == (True, 2)
    assert "run.workers=4" in plan.note and "2 GPUs" in plan.note and "one per GPU" in plan.note


def test_less_than_a_gpu_per_worker_runs_on_cpus_and_says_so() -> None:
    plan = plan_devices(requested="auto", workers=2, cluster_gpus=0.5)
    assert (plan.use_gpu, plan.num_workers) == (False, 2)
    assert "0.5 GPUs" in plan.note and "CPUs" in plan.note


def test_cuda_without_gpus_is_refused_with_the_fix() -> None:
    with pytest.raises(UsageError) as err:
        plan_devices(requested="cuda", workers=1, cluster_gpus=0)
    assert err.value.exit_code == EXIT_USAGE
    assert str(err.value).startswith("run.device=cuda but the Ray cluster has 0 GPUs")
    assert "run.device=auto" in str(err.value) and "run.device=cpu" in str(err.value)


def test_the_resource_plan_sizes_from_the_device_plan() -> None:
    plan = plan_resources(4, {"CPU": 16.0, "GPU": 2.0}, device="auto")
    assert (plan.num_workers, plan.use_gpu, plan.device, plan.gpus_per_worker) == (2, True, "cuda", 1)
    assert plan.note and plan.data_cpus == 16.0 - 2 * plan.cpus_per_worker
    cpu = plan_resources(2, {"CPU": 2.0, "GPU": 1.0}, device="cpu")
    assert (cpu.num_workers, cpu.use_gpu, cpu.device, cpu.gpus_per_worker, cpu.note) == (2, False, "cpu", 0, "")


def test_min_workers_makes_the_worker_count_elastic_where_every_size_splits_the_batch() -> None:
    assert scaling_workers(0, 4, 48) == 4  # fixed: today's runs
    assert scaling_workers(4, 4, 48) == 4  # min = max is fixed too
    assert scaling_workers(2, 4, 48) == (2, 4)
    assert scaling_workers(1, 2, 16) == (1, 2)
    with pytest.raises(BadValue, match=r"optim.batch_size=16 must split evenly .* from 2 to 4 \(not 3\)"):
        scaling_workers(2, 4, 16)


@pytest.mark.parametrize("workers, nodes, per_worker", [
    (2, [1.0, 1.0], 0.51),  # one a node: two would fit in a 1-CPU node at the plan's 0.49
    (2, [2.0, 2.0], 1.01),
    (4, [32.0], 6.41),  # four on the one node, a fifth does not fit
    (4, [8.0, 8.0], 2.67),
])
def test_an_elastic_cpu_run_sizes_its_workers_so_no_node_takes_more_than_planned(workers, nodes, per_worker) -> None:
    plan = elastic_plan(plan_resources(workers, {"CPU": sum(nodes)}), nodes)
    assert plan.cpus_per_worker == per_worker
    per_node = -(-workers // len(nodes))
    assert all(node // plan.cpus_per_worker == per_node for node in nodes)
    assert plan.data_cpus >= 0 and plan.num_workers == workers


def test_an_elastic_gpu_run_keeps_its_plan() -> None:
    plan = plan_resources(2, {"CPU": 16.0, "GPU": 2.0})
    assert elastic_plan(plan, [8.0, 8.0]) == plan


def test_min_workers_above_workers_is_refused() -> None:
    with pytest.raises(BadValue, match="run.min_workers: must be at most run.workers=2, got 3"):
        preset("tiny", {"run.workers": 2, "run.min_workers": 3})


def test_fp16_is_refused_on_cpus_only() -> None:
    with pytest.raises(UsageError, match="optim.precision=fp16 needs GPUs"):
        check_precision("fp16", use_gpu=False)
    check_precision("fp16", use_gpu=True)
    check_precision("bf16", use_gpu=False)


def test_the_start_line_names_the_device_and_the_precision() -> None:
    from jobs.training.ray_setup import plan_params, start_line

    cfg = preset("tiny", {"optim.precision": "bf16"})
    line = start_line("r1", cfg, plan_resources(1, {"CPU": 2.0}, device="auto"))
    assert line == "run r1: 1 worker on cpu, precision bf16"
    gpu_cfg = preset("tiny", {"run.workers": 2, "run.channels_last": True, "run.compile": True})
    gpu = plan_resources(2, {"CPU": 8.0, "GPU": 2.0}, device="cuda")
    assert start_line("r2", gpu_cfg, gpu) == "run r2: 2 workers on cuda (1 GPU each), precision fp32, channels_last, compiled backbone"
    assert plan_params(gpu) == {"resources.device": "cuda", "resources.workers": 2, "resources.gpus_per_worker": 1,
                                "resources.cpus_per_worker": gpu.cpus_per_worker}


def test_salgl_train_with_cuda_on_a_cluster_without_gpus_exits_2_before_the_run_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI path end to end, with the cluster stubbed: one line, exit 2, no run folder, no MLflow store."""
    import ray

    import jobs.training.run_start
    from jobs.cli import main
    from tests._tiny_checkpoint import make_mosaic

    monkeypatch.setattr(jobs.training.run_start, "init_ray", lambda address=None: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    data = make_mosaic(tmp_path / "data")
    store = tmp_path / "mlflow.db"
    argv = ["train", "tiny", f"data.path={data}", f"run.storage={tmp_path / 'runs'}", f"run.tracking_uri=sqlite:///{store}",
            "run.device=cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("salgl train: error: run.device=cuda but the Ray cluster has 0 GPUs") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not store.exists()


# ---------------------------------------------------------------------------------------------
# The step's options on CPU


def test_step_precision_refuses_fp16_on_cpu_and_autocasts_bf16() -> None:
    from jobs.training.acceleration import StepPrecision

    with pytest.raises(UsageError):
        StepPrecision("fp16", torch.device("cpu"))
    bf16 = StepPrecision("bf16", torch.device("cpu"))
    with bf16.autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    with StepPrecision("fp32", torch.device("cpu")).autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32
    assert bf16.scaler is None and bf16.state_dict() is None


def test_the_scaled_step_clips_the_true_gradients_and_keeps_its_scale_in_its_state() -> None:
    """fp16's path (a GradScaler around backward and step), exercised on CPU with a CPU scaler."""
    from jobs.training.acceleration import StepPrecision

    step = StepPrecision("fp32", torch.device("cpu"))
    step.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    step.backward((weight * torch.tensor([3.0, 4.0, 0.0])).sum())
    assert weight.grad.tolist() == [3072.0, 4096.0, 0.0]  # scaled
    step.optimizer_step(optimizer, [weight], clip_grad_norm=1.0)
    assert weight.detach().tolist() == pytest.approx([1 - 0.6, 1 - 0.8, 1.0])  # unscaled norm 5, clipped to 1
    state = step.state_dict()
    assert state["scale"] == 1024.0
    fresh = StepPrecision("fp32", torch.device("cpu"))
    fresh.scaler = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(state)
    assert fresh.scaler.get_scale() == 1024.0


def _tiny_model(seed: int = 0):
    from salgl.model import build_model

    torch.manual_seed(seed)
    return build_model(preset("tiny").model, num_labels=6, label_dim=16).eval()


def test_channels_last_and_a_compiled_backbone_keep_outputs_and_checkpoint_keys() -> None:
    from jobs.training.acceleration import channels_last_images, compile_backbone, to_channels_last

    model = _tiny_model()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(images).logits
    keys = list(model.state_dict())
    to_channels_last(model)
    compile_backbone(model, backend="eager")  # inductor would need a compiler and minutes; the wiring is the same
    with torch.no_grad():
        fast = model(channels_last_images(images)).logits
    assert channels_last_images(images).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == keys  # in place: no _orig_mod. prefix in checkpoints


# ---------------------------------------------------------------------------------------------
# Counts under autocast


def _head_step(head, tokens, targets, precision: str):
    """One training step of the head alone (forward with counting, loss, backward)."""
    from jobs.training.acceleration import StepPrecision

    with StepPrecision(precision, torch.device("cpu")).autocast():
        out = head(tokens, targets)
    (out.logits.float().sum() + out.scene_probs.float().square().sum()).backward()
    return out


@pytest.mark.parametrize("counting", ["hard", "soft"])
def test_a_bf16_step_leaves_the_counts_float64_and_equal_to_an_fp32_step(counting: str) -> None:
    """Autocast lowers the step's matmuls, never the scene decision or the count update: the
    counts after a bfloat16 step are float64 and bit-identical to those after a float32 step."""
    from salgl.head import SALGLHead

    cfg = HeadConfig(num_scenes=4, steps=2, attn_dim=16, attn_hidden=16, counting=counting, scene_targets="none")
    heads = {}
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(8, 9, 32, generator=gen)  # (B, m, d)
    targets = (torch.rand(8, 6, generator=gen) < 0.4).float()  # (B, n)
    start = torch.randint(0, 5, (4, 6, 6), generator=gen).double()  # counts seen before
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        head = SALGLHead(cfg, num_labels=6, token_dim=32, label_dim=16).train()
        head.label_embeddings.normal_(generator=torch.Generator().manual_seed(1))
        head.counts.copy_(start)
        out = _head_step(head, tokens, targets, precision)
        heads[precision] = (head, out)
    low, full = heads["bf16"], heads["fp32"]
    assert low[0].counts.dtype == torch.float64
    assert not torch.equal(low[0].counts, start)  # the step counted
    assert torch.equal(low[0].counts, full[0].counts)
    assert not torch.equal(low[1].logits.float(), full[1].logits)  # the rest of the step did run in bf16


def test_a_bf16_training_step_of_the_whole_model_runs_on_cpu_and_counts_in_float64() -> None:
    from jobs.training.acceleration import StepPrecision
    from salgl.losses import salgl_loss

    model = _tiny_model().train()
    images = torch.randn(4, 3, 64, 64)
    targets = (torch.rand(4, 6) < 0.4).float()

    with StepPrecision("bf16", torch.device("cpu")).autocast():
        out = model(images, targets)
    terms = salgl_loss(out.logits.float(), out.scene_probs.float(), targets, preset("tiny").loss)
    terms.total.backward()
    assert torch.isfinite(terms.total)
    assert model.head.counts.dtype == torch.float64 and model.head.counts.sum() > 0
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
