"""The official preset computes what the released module computes, from a released state dict."""

from __future__ import annotations

import pytest
import torch

from salgl.official import ReleasedFlags, convert_released_head, head_from_official_state_dict
from tests.reference.released_reference import ReleasedHead

N, D, DL, K, M, B = 7, 32, 12, 3, 9, 5


def _pair(flags: ReleasedFlags, seed: int = 0):
    torch.manual_seed(seed)
    ref = ReleasedHead(
        num_labels=N, dim=D, label_dim=DL, num_scenes=K, steps=flags.num_steps, outmess=flags.outmess,
        soft=flags.soft, normalize=flags.normalize, ignore_self=flags.ignore_self, att_dim=16, ffn=48,
    ).double()
    ours = head_from_official_state_dict(ref.state_dict(), flags).double()
    return ref, ours


def _train_mode_without_dropout(*modules: torch.nn.Module) -> None:
    # Counting happens in training mode; dropout draws differ between implementations, so turn the
    # encoders' dropout off to compare the deterministic computation.
    for module in modules:
        module.train()
    modules[0].tb.eval()
    modules[1].token_encoder.eval()


FLAG_SETS = [
    ReleasedFlags(),
    ReleasedFlags(outmess=False, normalize=False),
    ReleasedFlags(soft=True),
    ReleasedFlags(ignore_self=True, num_steps=1),
    ReleasedFlags(num_steps=0, soft=True, normalize=False),
]


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: f"T{f.num_steps}-out{int(f.outmess)}-soft{int(f.soft)}-norm{int(f.normalize)}-noself{int(f.ignore_self)}")
def test_head_matches_released_over_training_steps(flags: ReleasedFlags) -> None:
    ref, ours = _pair(flags)
    _train_mode_without_dropout(ref, ours)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        tokens = torch.randn(B, M, D, generator=gen, dtype=torch.float64)
        targets = (torch.rand(B, N, generator=gen) < 0.4).double()
        expected = ref(tokens, targets)
        got = ours(tokens, targets)
        torch.testing.assert_close(got.logits, expected["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.scene_probs, expected["scene_probs"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.graph, expected["comat"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.counts, ref.comatrix.double(), atol=1e-9, rtol=0)
    assert ours.counts.sum() > 0
    ref.eval(), ours.eval()
    tokens = torch.randn(B, M, D, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ours(tokens).logits, ref(tokens)["logits"], atol=1e-5, rtol=1e-5)


def test_module_prefix_and_float32_counts_are_accepted() -> None:
    ref, _ = _pair(ReleasedFlags())
    ref.comatrix.add_(torch.randint(0, 5, ref.comatrix.shape).float())
    state = {f"module.{k}": v.float() for k, v in ref.state_dict().items()}
    head = head_from_official_state_dict(state, ReleasedFlags())
    assert head.counts.dtype == torch.float64
    torch.testing.assert_close(head.counts, ref.comatrix.double())
    assert head.cfg.attn_dim == 16 and head.cfg.encoder_ffn == 48 and head.cfg.num_scenes == K


def test_conversion_is_exhaustive() -> None:
    ref, ours = _pair(ReleasedFlags())
    converted = convert_released_head(ref.state_dict())
    assert set(converted) == set(ours.state_dict())


def test_released_full_checkpoint_loads_into_the_official_preset() -> None:
    import timm

    from salgl.config import preset
    from salgl.model import build_model
    from salgl.official import load_released_checkpoint

    torch.manual_seed(0)
    cnn = timm.create_model("resnet18", num_classes=0, global_pool="").eval()
    ref = ReleasedHead(num_labels=5, dim=512, label_dim=768, num_scenes=6, ffn=64, att_dim=32).eval()
    ref.comatrix.copy_(torch.randint(0, 4, ref.comatrix.shape).float())
    released = {f"backbone.{k}": v for k, v in cnn.state_dict().items()}
    released.update(ref.state_dict())
    released = {f"module.{k}": v for k, v in released.items()}  # as an EMA checkpoint stores it

    cfg = preset("official", {"model.backbone.name": "resnet18", "model.backbone.weights": "none"}).model
    cfg = type(cfg)(cfg.backbone, cfg.labels, type(cfg.head)(**{**cfg.head.__dict__, "attn_dim": 32, "attn_hidden": 32, "encoder_ffn": 64}))
    model = build_model(cfg, num_labels=5, label_dim=768).eval()
    report = load_released_checkpoint(model, released)
    assert all(k.startswith("backbone.model.fc") for k in report.missing + report.unexpected)

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = cnn.forward_features(images).flatten(2).transpose(1, 2)
        expected = ref(tokens)
        got = model(images)
    torch.testing.assert_close(got.logits, expected["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.scene_probs, expected["scene_probs"], atol=1e-5, rtol=1e-5)

    broken = dict(released)
    broken.pop("module.attention.linear1.weight")
    with pytest.raises(KeyError, match="attention.region_proj.weight"):
        load_released_checkpoint(build_model(cfg, num_labels=5, label_dim=768), broken)
