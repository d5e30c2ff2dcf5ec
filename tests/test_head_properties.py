"""Head and model properties: gradients, exact counts, checkpoints, parameter count, EMA."""

from __future__ import annotations

import pytest
import torch

from salgl.config import EmaConfig, HeadConfig, preset
from salgl.ema import ModelEma
from salgl.head import SALGLHead
from salgl.losses import salgl_loss
from salgl.model import build_model

N, D, DL, K = 6, 16, 8, 3


def _head(**overrides) -> SALGLHead:
    cfg = HeadConfig(num_scenes=K, steps=2, attn_dim=8, attn_hidden=8, **overrides)
    head = SALGLHead(cfg, num_labels=N, token_dim=D, label_dim=DL)
    head.label_embeddings.normal_()
    return head


def test_gradients_reach_every_trainable_parameter_and_counts_take_none() -> None:
    torch.manual_seed(0)
    head = _head(token_encoder=True, encoder_heads=2, encoder_ffn=32, message="both", selection="soft").train()
    tokens, y = torch.randn(4, 5, D), (torch.rand(4, N) < 0.5).float()
    for _ in range(2):  # second step: counts are non-zero, so the graph carries signal
        out = head(tokens, y)
    salgl_loss(out.logits, out.scene_probs, y, preset("paper").loss).total.backward()
    # P's bias and Phi_a's bias shift every region's score equally, so softmax makes their gradient
    # exactly zero (in the released module too); every other parameter must get a signal.
    constant_shift = {"attention.hidden.bias", "attention.score.bias"}
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        if name not in constant_shift:
            assert param.grad.abs().sum() > 0, name
    assert not head.counts.requires_grad and head.counts.grad_fn is None


def test_counts_stay_exact_integers_over_many_updates() -> None:
    head = _head().train()
    gen = torch.Generator().manual_seed(0)
    expected = torch.zeros(K, N, N, dtype=torch.int64)
    with torch.no_grad():
        for _ in range(300):
            y = (torch.rand(32, N, generator=gen) < 0.5).float()
            pi = torch.softmax(torch.randn(32, K, generator=gen), -1)
            head.update_counts(pi, y)
            scene = pi.argmax(-1)
            for k in range(K):
                yk = y[scene == k].long()
                expected[k] += yk.T @ yk
    assert head.counts.dtype == torch.float64
    assert torch.equal(head.counts, expected.double())


def test_eval_mode_never_counts() -> None:
    head = _head().eval()
    head(torch.randn(2, 5, D), torch.ones(2, N))
    assert head.counts.sum() == 0


def test_state_dict_round_trip_keeps_counts_and_embeddings() -> None:
    head = _head().train()
    head(torch.randn(3, 5, D), (torch.rand(3, N) < 0.5).float())
    clone = _head()
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone.counts, head.counts) and clone.counts.dtype == torch.float64
    assert torch.equal(clone.label_embeddings, head.label_embeddings)
    assert "counts" in head.state_dict() and "label_embeddings" in head.state_dict()


def test_sync_callable_receives_payload_and_its_sum_is_applied() -> None:
    head = _head().train()
    seen = {}

    def doubled(weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen["shapes"] = (tuple(weights.shape), tuple(targets.shape), weights.dtype)
        return 2 * torch.einsum("bk,bi,bj->kij", weights, targets, targets)  # as if two workers

    y = torch.ones(3, N)
    head(torch.randn(3, 5, D), y, sync=doubled)
    assert seen["shapes"] == ((3, K), (3, N), torch.float64)
    assert head.counts.sum() == 2 * 3 * N * N


@pytest.mark.parametrize("before_use", [True, False])
def test_a_pending_sync_gives_what_an_immediate_one_gives_and_is_waited_for_once(before_use: bool) -> None:
    """A distributed sync may only start its collective (``PendingDelta``): the head waits for it
    before P is built (counting before use) or by the end of the forward (after use), once."""
    torch.manual_seed(0)
    tokens, y = torch.randn(4, 5, D), (torch.rand(4, N) < 0.5).float()
    immediate, deferred = _head(count_before_use=before_use).train(), _head(count_before_use=before_use).train()
    deferred.load_state_dict(immediate.state_dict())
    waits = []

    def started(weights: torch.Tensor, targets: torch.Tensor):
        delta = torch.einsum("bk,bi,bj->kij", weights, targets, targets)
        return lambda: waits.append(1) or delta

    for _ in range(3):  # from the second step on, P depends on the counts
        a, b = immediate(tokens, y), deferred(tokens, y, sync=started)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
        torch.testing.assert_close(a.graph, b.graph, rtol=0, atol=0)
    assert len(waits) == 3 and torch.equal(immediate.counts, deferred.counts)



def test_a_deferred_count_update_waits_until_settled_and_changes_nothing_else() -> None:
    """``defer_count_update`` (counting after use) leaves the collective in flight after the
    forward, so it runs behind the backward; settling applies it. The next forward and
    ``state_dict`` settle it themselves, so no step and no checkpoint sees stale counts."""
    torch.manual_seed(0)
    tokens, y = torch.randn(4, 5, D), (torch.rand(4, N) < 0.5).float()
    immediate, deferred = _head().train(), _head().train()
    deferred.load_state_dict(immediate.state_dict())
    waits = []

    def started(weights: torch.Tensor, targets: torch.Tensor):
        delta = torch.einsum("bk,bi,bj->kij", weights, targets, targets)
        return lambda: waits.append(1) or delta

    for step in range(3):
        a, b = immediate(tokens, y), deferred(tokens, y, sync=started, defer_count_update=True)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)  # settled by this forward
        assert len(waits) == step  # this step's collective is still pending
    assert not torch.equal(immediate.counts, deferred.counts)
    deferred.settle_counts()
    deferred.settle_counts()  # a second settle applies nothing twice
    assert len(waits) == 3 and torch.equal(immediate.counts, deferred.counts)

    deferred(tokens, y, sync=started, defer_count_update=True)
    immediate(tokens, y)
    torch.testing.assert_close(deferred.state_dict()["counts"], immediate.counts, rtol=0, atol=0)
    assert len(waits) == 4

    before_use = _head(count_before_use=True).train()  # needs the delta inside the forward
    before_use(tokens, y, sync=started, defer_count_update=True)
    assert len(waits) == 5 and before_use.counts.sum() > 0

def test_official_resnet101_has_the_released_parameter_count() -> None:
    cfg = preset("official", {"model.backbone.weights": "none"}).model
    model = build_model(cfg, num_labels=80, label_dim=768)
    assert sum(p.numel() for p in model.parameters()) == 117_948_561


def test_ema_count_policies() -> None:
    torch.manual_seed(0)
    model = build_model(preset("tiny").model, num_labels=N, label_dim=16)
    images, y = torch.randn(2, 3, 64, 64), torch.ones(2, N)
    emas = {policy: ModelEma(model, EmaConfig(decay=0.5, counts=policy)) for policy in ("ema", "live")}
    model.train()
    model(images, y)
    for ema in emas.values():
        ema.update(model)
    live = model.head.counts
    assert torch.equal(emas["live"].module.head.counts, live)
    torch.testing.assert_close(emas["ema"].module.head.counts, 0.5 * live)
    ema_weight = emas["ema"].module.head.classifier.weight
    assert torch.allclose(ema_weight, model.head.classifier.weight)  # weights unchanged by a forward
