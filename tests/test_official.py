"""The official preset computes what the released module computes, from a released state dict."""

from __future__ import annotations

import pytest
import torch

from salgl.official import ReleasedFlags, convert_released_head, head_from_official_state_dict
from tests.bench.released_reference import ReleasedHead

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
