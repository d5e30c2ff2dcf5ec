"""The token encoder against torch's own post-norm ``nn.TransformerEncoder``, which it replaces."""

from __future__ import annotations

import pytest
import torch

from salgl.layers import build_token_encoder
from tests.reference.released_reference import released_encoder

DIM, HEADS, FFN = 16, 4, 24


def test_same_parameters_and_initial_weights() -> None:
    torch.manual_seed(0)
    expected = released_encoder(DIM, HEADS, FFN, dropout=0.1).state_dict()
    torch.manual_seed(0)
    got = build_token_encoder(DIM, heads=HEADS, ffn=FFN, dropout=0.1).state_dict()
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_same_function_and_gradients(training: bool) -> None:
    """Dropout 0 in training mode: the training code path, deterministic."""
    torch.manual_seed(1)
    reference = released_encoder(DIM, HEADS, FFN, dropout=0.0).train(training)
    ours = build_token_encoder(DIM, heads=HEADS, ffn=FFN, dropout=0.0).train(training)
    ours.load_state_dict(reference.state_dict())
    tokens = torch.randn(3, 7, DIM, requires_grad=True)
    grad = torch.randn(3, 7, DIM)
    results = []
    for module in (reference, ours):
        out = module(tokens)
        results.append((out, *torch.autograd.grad(out, (tokens, *module.parameters()), grad)))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(2)
    encoder = build_token_encoder(DIM, heads=HEADS, ffn=FFN, dropout=0.5)
    tokens = torch.randn(2, 5, DIM)
    encoder.train()
    assert not torch.equal(encoder(tokens), encoder(tokens))
    encoder.eval()
    torch.testing.assert_close(encoder(tokens), encoder(tokens), atol=0, rtol=0)
