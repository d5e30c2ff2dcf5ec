"""``model.head.recompute_propagation``: activation checkpointing of eq. 13-14's steps.

The head must compute the same outputs and gradients, and keep fewer bytes for the backward.
"""

from __future__ import annotations

import pytest
import torch

from salgl.config import HeadConfig
from salgl.head import SALGLHead

B, M, N, D, K = 3, 5, 12, 16, 2


def _heads(top_k: int) -> tuple[SALGLHead, SALGLHead]:
    torch.manual_seed(0)
    cfg = HeadConfig(num_scenes=K, attn_dim=8, attn_hidden=8, message="both", graph_top_k=top_k, steps=3)
    plain = SALGLHead(cfg, num_labels=N, token_dim=D, label_dim=6)
    recomputing = SALGLHead(HeadConfig(**{**cfg.__dict__, "recompute_propagation": True}), num_labels=N, token_dim=D, label_dim=6)
    recomputing.load_state_dict(plain.state_dict())
    plain.counts.copy_(torch.randint(0, 5, (K, N, N)).double())
    recomputing.counts.copy_(plain.counts)
    return plain.train(), recomputing.train()


def _step(head: SALGLHead, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits, parameter gradients, and the bytes autograd saved for the backward."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = head(tokens)
    (out.logits.square().sum() + out.scene_probs[:, 0].sum()).backward()
    grads = {name: p.grad.clone() for name, p in head.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, sum(saved)


@pytest.mark.parametrize("top_k", [0, 4], ids=["dense", "sparse"])
def test_recomputed_propagation_gives_the_same_step_and_keeps_less(top_k: int) -> None:
    plain, recomputing = _heads(top_k)
    tokens = torch.randn(B, M, D)
    logits, grads, kept = _step(plain, tokens)
    logits_r, grads_r, kept_r = _step(recomputing, tokens)
    torch.testing.assert_close(logits_r, logits, rtol=0, atol=0)
    assert grads.keys() == grads_r.keys() and "propagation.input_proj.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert kept_r < 0.8 * kept, (kept_r, kept)


def test_evaluation_does_not_recompute() -> None:
    plain, recomputing = _heads(0)
    tokens = torch.randn(B, M, D)
    with torch.no_grad():
        torch.testing.assert_close(recomputing.eval()(tokens).logits, plain.eval()(tokens).logits, rtol=0, atol=0)
