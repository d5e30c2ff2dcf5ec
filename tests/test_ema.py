"""The EMA's warm-up follows timm's ModelEmaV3 formula; without it the release's fixed decay holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from salgl.config import EmaConfig, preset
from salgl.ema import ModelEma


def timm_warmup_decay(step: int, decay: float, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """timm ModelEmaV3.get_decay with use_warmup, written out: ``step`` counts updates from 1."""
    s = max(0, step - 1)
    return 0.0 if s == 0 else min(decay, 1 - (1 + s / gamma) ** -power)


@pytest.mark.parametrize("step", [1, 2, 3, 10, 100, 1000, 10**6])
def test_warmup_decay_is_timms(step: int) -> None:
    ema = ModelEma(nn.Linear(2, 2), EmaConfig(decay=0.9997, warmup=True))
    assert ema.get_decay(step) == pytest.approx(timm_warmup_decay(step, 0.9997))


def test_warmup_reaches_the_configured_decay_and_no_further() -> None:
    ema = ModelEma(nn.Linear(2, 2), EmaConfig(decay=0.99, warmup=True))
    assert ema.get_decay(50) < 0.99 and ema.get_decay(10**5) == 0.99


def test_without_warmup_every_update_uses_the_fixed_decay() -> None:
    """The released EMA: even the first update averages (timm would copy the model at step 1)."""
    model = nn.Linear(2, 2)
    ema = ModelEma(model, EmaConfig(decay=0.5, warmup=False))
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    torch.testing.assert_close(ema.module.weight, 0.5 * before + 0.5 * model.weight)


def test_warmup_moves_the_ema_onto_the_model_at_first() -> None:
    model = nn.Linear(2, 2)
    ema = ModelEma(model, EmaConfig(decay=0.9997, warmup=True))
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    torch.testing.assert_close(ema.module.weight, model.weight)


def test_official_preset_keeps_the_released_fixed_decay() -> None:
    assert preset("official").ema.warmup is False
    assert preset("salgl").ema.warmup is True and preset("tiny").ema.warmup is True
    assert preset("paper").ema.warmup is False  # the paper as written: a plain EMA
