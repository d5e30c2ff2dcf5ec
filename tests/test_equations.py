"""Each equation of the paper against a direct loop-based computation on tiny random inputs,
for every switch of SPEC section 2 that it governs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from salgl.config import HeadConfig, LossConfig
from salgl.graph import conditional_probabilities, count_delta, scene_weights_for_counting, select_graph
from salgl.head import SALGLHead
from salgl.layers import GatedPropagation, SemanticAttention
from salgl.losses import asymmetric_loss, balance_entropy, sample_entropy

B, M, N, K, D, DL = 3, 5, 4, 3, 6, 7


@pytest.fixture(autouse=True)
def _float64_and_seed():
    # float64 so the loop references agree to tight tolerances; restored for the other modules.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def test_eq1_3_semantic_attention_matches_loop() -> None:
    att = SemanticAttention(D, DL, attn_dim=5, hidden_dim=4, chunk_mb=1)
    tokens, labels = torch.randn(B, M, D), torch.randn(N, DL)
    feats, alpha = att(tokens, labels)
    U, V = att.region_proj.weight, att.label_proj.weight  # (d1, d), (d1, d_L)
    P, b = att.hidden.weight, att.hidden.bias
    wa, ca = att.score.weight[0], att.score.bias[0]
    for bi in range(B):
        for i in range(N):
            scores = torch.stack(
                [wa @ (P @ torch.tanh((U @ tokens[bi, j]) * (V @ labels[i])) + b) + ca for j in range(M)]
            )
            expected_alpha = torch.softmax(scores, 0)
            torch.testing.assert_close(alpha[bi, i], expected_alpha)
            torch.testing.assert_close(feats[bi, i], sum(expected_alpha[j] * tokens[bi, j] for j in range(M)))


def test_attention_chunking_does_not_change_values_or_gradients() -> None:
    big = SemanticAttention(D, DL, attn_dim=8, hidden_dim=8, chunk_mb=1024)
    small = SemanticAttention(D, DL, attn_dim=8, hidden_dim=8, chunk_mb=1)
    small.load_state_dict(big.state_dict())
    small.chunk_bytes = B * M * 8 * 8  # exactly one label per chunk
    tokens = torch.randn(B, M, D, requires_grad=True)
    labels = torch.randn(N, DL)
    (big(tokens, labels)[0].square().sum()).backward()
    grad_big = tokens.grad.clone()
    tokens.grad = None
    (small(tokens, labels)[0].square().sum()).backward()
    torch.testing.assert_close(tokens.grad, grad_big)
    for p_big, p_small in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p_small.grad, p_big.grad)


def test_eq4_6_scene_probabilities_match_loop() -> None:
    head = SALGLHead(HeadConfig(num_scenes=K, attn_dim=4, attn_hidden=4), num_labels=N, token_dim=D, label_dim=DL)
    tokens = torch.randn(B, M, D)
    pi = head.scenes(tokens)
    W = head.scenes.prototypes.weight
    for bi in range(B):
        vbar = sum(tokens[bi, j] for j in range(M)) / M
        torch.testing.assert_close(pi[bi], torch.softmax(W @ vbar, 0))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_eq7_count_delta_matches_loop(mode: str) -> None:
    pi = torch.softmax(torch.randn(B, K), -1)
    y = (torch.rand(B, N) < 0.5).double()
    delta = count_delta(scene_weights_for_counting(pi, mode), y)
    expected = torch.zeros(K, N, N)
    for bi in range(B):
        for k in range(K):
            weight = float(k == int(pi[bi].argmax())) if mode == "hard" else float(pi[bi, k])
            for i in range(N):
                for j in range(N):
                    expected[k, i, j] += weight * y[bi, i] * y[bi, j]
    assert delta.dtype == torch.float64
    torch.testing.assert_close(delta, expected)


@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("row_normalize", [True, False])
def test_eq8_conditional_probabilities_match_loop(self_loops: bool, row_normalize: bool) -> None:
    y = (torch.rand(20, N) < 0.5).double()
    y[:, -1] = 0  # an unseen label: its row must be all zeros (released diag + 1e-8)
    counts = count_delta(torch.nn.functional.one_hot(torch.randint(0, K, (20,)), K).double(), y)
    probs = conditional_probabilities(counts, self_loops=self_loops, row_normalize=row_normalize)
    for k in range(K):
        for i in range(N):
            row = torch.tensor([counts[k, i, j] / (counts[k, i, i] + 1e-8) for j in range(N)])
            if not self_loops:
                row[i] = 0.0
            if row_normalize:
                row = row / (row.sum() + 1e-8)
            torch.testing.assert_close(probs[k, i], row)
    assert torch.all(probs[:, -1] == 0)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_eq12_graph_selection_matches_loop(mode: str) -> None:
    probs = torch.rand(K, N, N)
    pi = torch.softmax(torch.randn(B, K), -1)
    graph = select_graph(probs, pi, mode)
    for bi in range(B):
        if mode == "hard":
            expected = probs[int(pi[bi].argmax())]
        else:
            expected = sum(pi[bi, k] * probs[k] for k in range(K))
        torch.testing.assert_close(graph[bi], expected)


def _loop_gru(prop: GatedPropagation, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    W1, W2, W3 = prop.input_proj.weight.chunk(3, 0)
    bw1, bw2, bw3 = prop.input_proj.bias.chunk(3, 0)
    U1, U2 = prop.hidden_gates.weight.chunk(2, 0)
    bu1, bu2 = prop.hidden_gates.bias.chunk(2, 0)
    U3, bu3 = prop.hidden_candidate.weight, prop.hidden_candidate.bias
    z = torch.sigmoid(W1 @ x + bw1 + U1 @ h + bu1)
    r = torch.sigmoid(W2 @ x + bw2 + U2 @ h + bu2)
    c = torch.tanh(W3 @ x + bw3 + U3 @ (r * h) + bu3)
    return (1 - z) * h + z * c


@pytest.mark.parametrize("message", ["in", "out", "both"])
def test_eq13_14_messages_and_gated_update_match_loop(message: str) -> None:
    prop = GatedPropagation(D, steps=2, message=message)
    h0, graph = torch.randn(B, N, D), torch.rand(B, N, N)
    out = prop(h0, graph)
    for bi in range(B):
        h = h0[bi].clone()
        for _ in range(2):
            incoming = [sum(graph[bi, i, j] * h[j] for j in range(N)) for i in range(N)]  # sum_j P_ij h_j
            outgoing = [sum(graph[bi, j, i] * h[j] for j in range(N)) for i in range(N)]  # sum_j P_ji h_j
            msgs = {"in": incoming, "out": outgoing, "both": [torch.cat([a, o]) for a, o in zip(incoming, outgoing)]}
            h = torch.stack([_loop_gru(prop, msgs[message][i], h[i]) for i in range(N)])
        torch.testing.assert_close(out[bi], h)


@pytest.mark.parametrize("phi_c", ["mlp", "linear_tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("steps", [0, 2])
def test_eq15_16_fusion_and_per_label_classifier_match_loop(phi_c: str, bias: bool, steps: int) -> None:
    cfg = HeadConfig(num_scenes=K, steps=steps, attn_dim=4, attn_hidden=4, phi_c=phi_c, classifier_bias=bias)
    head = SALGLHead(cfg, num_labels=N, token_dim=D, label_dim=DL).eval()
    head.label_embeddings.normal_()
    tokens = torch.randn(B, M, D)
    out = head(tokens)
    feats, _ = head.attention(tokens, head.label_embeddings)
    assert (head.propagation is None) == (steps == 0)  # T = 0 builds no propagation weights
    h = head.propagation(feats, out.graph) if steps > 0 else None
    for bi in range(B):
        for i in range(N):
            fused = torch.cat([feats[bi, i], h[bi, i]]) if steps > 0 else feats[bi, i]
            o = head.phi_c(fused)
            expected = head.classifier.weight[i] @ o + (head.classifier.bias[i] if bias else 0.0)
            torch.testing.assert_close(out.logits[bi, i], expected)


def test_eq9_11_entropy_terms_match_loop() -> None:
    pi = torch.softmax(torch.randn(B, K), -1)
    eps = 1e-7
    h = [-sum(float(p) * math.log(float(p) + eps) for p in pi[bi]) for bi in range(B)]
    assert sample_entropy(pi, eps).item() == pytest.approx(sum(h) / B, rel=1e-12)
    mean = [sum(float(pi[bi, k]) for bi in range(B)) / B for k in range(K)]
    h_mean = -sum(p * math.log(p + eps) for p in mean)
    h_max = -sum((1 / K) * math.log(1 / K + eps) for _ in range(K))
    assert balance_entropy(pi, eps).item() == pytest.approx(h_max - h_mean, rel=1e-9, abs=1e-12)
    uniform = torch.full((B, K), 1.0 / K)
    assert balance_entropy(uniform, eps).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "released"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_eq17_asymmetric_loss_matches_loop(reduction: str, clip: float) -> None:
    cfg = LossConfig(gamma_pos=1.0, gamma_neg=2.0, clip=clip, eps=1e-5, reduction=reduction)
    logits, y = torch.randn(B, N) * 3, (torch.rand(B, N) < 0.5).double()
    total = 0.0
    for bi in range(B):
        for i in range(N):
            p = 1 / (1 + math.exp(-float(logits[bi, i])))
            if y[bi, i] == 1:
                total += (1 - p) ** 1.0 * math.log(max(p, 1e-5))
            else:
                q = min(1 - p + clip, 1.0)
                total += (1 - q) ** 2.0 * math.log(max(q, 1e-5))
    expected = -total / (B * N) * (1000.0 if reduction == "released" else 1.0)
    assert asymmetric_loss(logits, y, cfg).item() == pytest.approx(expected, rel=1e-9)


def test_asymmetric_loss_focal_weights_carry_no_gradient_unless_asked() -> None:
    logits, y = torch.randn(B, N, requires_grad=True), (torch.rand(B, N) < 0.5).double()
    grads = []
    for focal_grad in (False, True):
        logits.grad = None
        asymmetric_loss(logits, y, LossConfig(focal_grad=focal_grad)).backward()
        grads.append(logits.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("before", [True, False])
def test_count_update_order(before: bool) -> None:
    cfg = HeadConfig(num_scenes=K, attn_dim=4, attn_hidden=4, count_before_use=before, self_loops=True)
    head = SALGLHead(cfg, num_labels=N, token_dim=D, label_dim=DL).train()
    y = torch.zeros(B, N)
    y[:, 0] = y[:, 1] = 1
    out = head(torch.randn(B, M, D), y)
    # Starting from zero counts, only a graph built after counting can link labels 0 and 1.
    assert bool((out.graph[:, 0, 1] > 0).all()) == before
    assert head.counts.sum() == 4 * B  # counted exactly once either way
