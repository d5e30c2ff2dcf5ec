"""The presets are what their names say: `paper` the equations as written, `salgl` (the default)
the paper plus the departures listed in ``SALGL_DEPARTURES``, each switch doing what it claims."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from salgl.config import PRESETS, SALGL_DEPARTURES, ConfigError, load, preset, to_flat
from salgl.ema import ModelEma
from salgl.losses import salgl_loss
from salgl.model import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_the_default_is_salgl_and_differs_from_paper_exactly_in_the_listed_departures() -> None:
    assert load().run.preset == "salgl" and to_flat(load()) == to_flat(preset("salgl"))
    salgl, paper = to_flat(preset("salgl")), to_flat(preset("paper"))
    differing = {key for key in salgl if salgl[key] != paper[key] and key != "run.preset"}
    assert differing == set(SALGL_DEPARTURES)
    assert {key: paper[key] for key in differing} == {key: value for key, (value, _) in SALGL_DEPARTURES.items()}


def test_paper_is_the_equations_as_written() -> None:
    cfg = preset("paper")
    head = cfg.model.head
    assert cfg.model.backbone.batchnorm == "train" and not cfg.model.backbone.frozen_batchnorm
    assert head.scene_targets == "none" and not head.isolate_scenes and head.graph_trains_scenes
    assert head.selection == "soft" and head.message == "out" and not head.self_loops  # eq. 12, 13
    assert cfg.loss.reduction == "mean" and cfg.loss.balance_scale == 1.0 and cfg.loss.entropy_weight == 1.0
    assert cfg.ema.warmup is False


def test_a_preset_on_the_command_line_layers_over_the_files() -> None:
    tiny = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg = load(tiny, {"preset": "paper"})
    assert cfg.run.preset == "paper" and cfg.model.backbone.name == "test_resnet"  # tiny's sizes kept
    assert cfg.model.head.scene_targets == "none" and cfg.model.backbone.batchnorm == "train"
    assert cfg.optim.batch_size == 16  # the file's own keys still win over both presets
    with pytest.raises(ConfigError, match="unknown preset"):
        load(tiny, {"preset": "papr"})


def _model(name: str, **extra) -> torch.nn.Module:
    # The tiny sizes with a preset's switches; a pretrained backbone is stood in for by weights=timm
    # (never loaded here) so that `auto` BatchNorm resolves as it does for real runs.
    keys = {**PRESETS["tiny"], **PRESETS[name], "model.backbone.weights": "timm", "K": 3, **extra}
    torch.manual_seed(0)
    model = build_model(preset("salgl", keys).model, num_labels=6, label_dim=16)
    model.head.label_embeddings.normal_()
    return model.train()


def _step(model: torch.nn.Module, cfg_name: str, *, lam: float = 1.0) -> None:
    images, y = torch.randn(4, 3, 32, 32), (torch.rand(4, 6) < 0.5).float()
    model(images, y)  # counts first, so the graph carries signal
    out = model(images, y)
    q = model.head.scene_targets(y)
    loss_cfg = preset(cfg_name, {"lambda": lam}).loss
    salgl_loss(out.logits, out.scene_probs, y, loss_cfg, scene_targets=q).total.backward()


@pytest.mark.parametrize("name", ["salgl", "paper"])
def test_the_classification_loss_trains_the_scene_classifier_in_both(name: str) -> None:
    """graph_trains_scenes: L_cls reaches W through P^I (eq. 12), so lambda = 0 still trains pi."""
    model = _model(name)
    _step(model, name, lam=0.0)
    assert model.head.scenes.prototypes.weight.grad.abs().sum() > 0
    detached = _model(name, **{"model.head.graph_trains_scenes": False})
    _step(detached, name, lam=0.0)
    grad = detached.head.scenes.prototypes.weight.grad
    assert grad is None or grad.abs().sum() == 0


def test_isolated_scenes_keep_the_scene_losses_out_of_the_features() -> None:
    """isolate_scenes (salgl): the entropy and target terms reach W only; paper: the backbone too."""
    for name, reaches_backbone in (("salgl", False), ("paper", True)):
        model = _model(name, **{"model.head.graph_trains_scenes": False})  # the scene terms alone
        images = torch.randn(4, 3, 32, 32)
        out = model(images)
        salgl_loss(out.logits * 0, out.scene_probs, torch.zeros(4, 6), preset(name).loss).total.backward()
        grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
        assert (sum(float(g.abs().sum()) for g in grads) > 0) == reaches_backbone, name
        assert model.head.scenes.prototypes.weight.grad.abs().sum() > 0


def test_scene_targets_and_batchnorm_switches() -> None:
    salgl, paper = _model("salgl"), _model("paper")
    assert salgl.head.label_mixture is not None and paper.head.label_mixture is None
    norms = lambda m: [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]  # noqa: E731
    assert norms(salgl) and not any(b.training for b in norms(salgl))  # frozen statistics in training
    assert all(b.training for b in norms(paper))  # batch statistics


def test_ema_warmup_switch() -> None:
    for name, warm in (("salgl", True), ("paper", False)):
        model = torch.nn.Linear(2, 2)
        ema = ModelEma(model, preset(name).ema)
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, step=1)
        followed = float((ema.module.weight - (model.weight - 1.0)).mean().detach())  # share of the step the EMA took
        assert (followed > 0.5) == warm, name  # warm-up: early decay is small, so the EMA follows the model
