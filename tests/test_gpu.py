"""On a CUDA device: the head computes there what it computes on CPU, with identical float64 counts,
and the step's precision options run. Skipped without CUDA (``python -m tests.bench.gpu_check``
runs them where a GPU is)."""

from __future__ import annotations

import copy

import pytest
import torch

from salgl.config import HeadConfig, PRESETS, preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# The official preset's head flags at a small size; dropout off, so CPU and GPU draw nothing.
OFFICIAL_HEAD = {k.removeprefix("model.head."): v for k, v in PRESETS["official"].items() if k.startswith("model.head.")}


def _head(**flags: object):
    from salgl.head import SALGLHead

    cfg = HeadConfig(**{"num_scenes": 4, "steps": 2, "attn_dim": 32, "attn_hidden": 32, "encoder_ffn": 64,
                        "encoder_heads": 2, "encoder_dropout": 0.0, "scene_targets": "none", **flags})
    torch.manual_seed(0)
    head = SALGLHead(cfg, num_labels=10, token_dim=64, label_dim=24).train()
    head.label_embeddings.normal_(generator=torch.Generator().manual_seed(1))
    return head


def _batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 12, 64, generator=gen), (torch.rand(8, 10, generator=gen) < 0.3).float()) for _ in range(steps)]


@pytest.mark.parametrize("flags", [{}, OFFICIAL_HEAD], ids=["paper", "official"])
def test_the_head_on_cuda_matches_the_cpu_with_identical_counts(flags: dict) -> None:
    cpu = _head(**flags)
    gpu = copy.deepcopy(cpu).to(CUDA)
    for tokens, targets in _batches():
        for head, device in ((cpu, "cpu"), (gpu, CUDA)):
            head.zero_grad(set_to_none=True)
            out = head(tokens.to(device), targets.to(device))
            (out.logits.sum() + out.scene_probs.square().sum()).backward()
            if device == "cpu":
                expected = out.logits.detach()
            else:
                torch.testing.assert_close(out.logits.detach().cpu(), expected, rtol=1e-4, atol=1e-4)
    assert gpu.counts.dtype == torch.float64 and gpu.counts.device.type == CUDA.type
    assert torch.equal(gpu.counts.cpu(), cpu.counts) and cpu.counts.sum() > 0


def test_a_bf16_step_on_cuda_leaves_the_counts_float64_and_equal_to_an_fp32_step() -> None:
    from jobs.training.acceleration import StepPrecision

    counts = {}
    for precision in ("fp32", "bf16"):
        head = _head().to(CUDA)
        for tokens, targets in _batches():
            with StepPrecision(precision, CUDA).autocast():
                out = head(tokens.to(CUDA), targets.to(CUDA))
            out.logits.float().sum().backward()
        counts[precision] = head.counts
    assert counts["bf16"].dtype == torch.float64
    assert torch.equal(counts["bf16"], counts["fp32"])


def test_an_fp16_step_with_the_gradient_scaler_trains_the_tiny_model_on_cuda() -> None:
    from jobs.training.acceleration import StepPrecision, channels_last_images, to_channels_last
    from salgl.losses import salgl_loss
    from salgl.model import build_model

    cfg = preset("tiny", {"model.head.scene_targets": "none"})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_labels=6, label_dim=16).to(CUDA).train()
    to_channels_last(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = StepPrecision("fp16", CUDA)
    images = channels_last_images(torch.randn(4, 3, 64, 64, device=CUDA))
    targets = (torch.rand(4, 6, device=CUDA) < 0.4).float()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        with step.autocast():
            out = model(images, targets)
        terms = salgl_loss(out.logits.float(), out.scene_probs.float(), targets, cfg.loss)
        step.backward(terms.total)
        step.optimizer_step(optimizer, model.parameters(), clip_grad_norm=1.0)
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(terms.total)
    assert model.head.counts.dtype == torch.float64 and model.head.counts.sum() == 3 * targets.sum(1).square().sum()  # y y^T per image
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not every step skipped
    assert step.state_dict()["scale"] > 0
