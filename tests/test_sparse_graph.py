"""Sparse scene graphs (``model.head.graph_top_k``): each row of P^k keeps its top-k entries.

With k = n the sparse head computes the dense head's function; with k < n it computes the dense
head on P^k whose rows keep only their k largest entries (eq. 8, then the released options).
"""

from __future__ import annotations

import pytest
import torch

from salgl.config import ConfigError, HeadConfig, validate
from salgl.graph import (
    SparseGraph,
    conditional_probabilities,
    select_graph,
    select_sparse_graph,
    sparse_conditional_probabilities,
)
from salgl.head import SALGLHead
from salgl.layers import sparse_messages

N, D, DL, K, B, M = 9, 16, 8, 3, 4, 5
OPTIONS = [(False, False), (True, False), (False, True), (True, True)]  # (self_loops, row_normalize)


def _counts(seed: int = 0) -> torch.Tensor:
    """Continuous, symmetric counts: no ties between a row's entries, so top-k is unambiguous."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(K, N, N, generator=gen, dtype=torch.float64) * 10
    return c + c.transpose(1, 2)  # (K, n, n)


def _masked_dense(counts: torch.Tensor, top_k: int, *, self_loops: bool, row_normalize: bool) -> torch.Tensor:
    """The reference: dense eq. 8 with all but each row's top-k entries zeroed, then row-normalised."""
    probs = conditional_probabilities(counts, self_loops=self_loops, row_normalize=False)  # (K, n, n)
    keep = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    probs = probs * keep
    return probs / (probs.sum(-1, keepdim=True) + 1e-8) if row_normalize else probs


def _densify(graph: SparseGraph, n: int) -> torch.Tensor:
    """A SparseGraph as the (B, n, n) matrix it stands for (repeated columns add up)."""
    dense = graph.weight.new_zeros(graph.weight.shape[0], n, n)
    return dense.scatter_add_(-1, graph.index.contiguous(), graph.weight)


@pytest.mark.parametrize("self_loops,row_normalize", OPTIONS)
@pytest.mark.parametrize("top_k", [1, 4, N])
def test_sparse_probabilities_are_the_top_k_entries_of_eq8(top_k: int, self_loops: bool, row_normalize: bool) -> None:
    counts = _counts()
    # A block of 2 rows at a time: the result must not depend on the blocking.
    index, values = sparse_conditional_probabilities(
        counts, top_k, self_loops=self_loops, row_normalize=row_normalize, block_bytes=2 * 8 * K * N
    )
    assert index.shape == values.shape == (K, N, top_k)
    got = torch.zeros(K, N, N, dtype=torch.float64).scatter_add_(-1, index, values)
    expected = _masked_dense(counts, top_k, self_loops=self_loops, row_normalize=row_normalize)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_sparse_selection_is_eq12_on_the_kept_entries(mode: str) -> None:
    counts = _counts()
    index, values = sparse_conditional_probabilities(counts, 4, self_loops=False, row_normalize=True)
    pi = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1)
    expected = select_graph(_masked_dense(counts, 4, self_loops=False, row_normalize=True), pi, mode)
    torch.testing.assert_close(_densify(select_sparse_graph(index, values, pi, mode), N), expected)


@pytest.mark.parametrize("transpose", [False, True])
def test_sparse_messages_and_their_gradients_match_the_dense_product(transpose: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(N, (B, N, 5), generator=gen)  # repeats included
    weight = torch.rand(B, N, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(B, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    got = sparse_messages(h, SparseGraph(index, weight), transpose=transpose)
    got_grads = torch.autograd.grad((got * g).sum(), (h, weight))
    dense = _densify(SparseGraph(index, weight), N)
    expected = (dense.transpose(1, 2) if transpose else dense) @ h
    expected_grads = torch.autograd.grad((expected * g).sum(), (h, weight))
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


def _head(top_k: int = 0, **overrides) -> SALGLHead:
    cfg = HeadConfig(num_scenes=K, steps=2, attn_dim=8, attn_hidden=8, scene_targets="none", graph_top_k=top_k, **overrides)
    torch.manual_seed(0)
    head = SALGLHead(cfg, num_labels=N, token_dim=D, label_dim=DL)
    head.label_embeddings.normal_(generator=torch.Generator().manual_seed(1))
    head.counts.copy_(_counts())
    return head.train()


class _MaskedDenseHead(SALGLHead):
    """The dense head on P^k whose rows keep their top-k entries: the sparse head's reference."""

    def __init__(self, cfg: HeadConfig, top_k: int, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.reference_top_k = top_k

    def label_graph(self, scene_probs: torch.Tensor) -> torch.Tensor:
        probs = _masked_dense(self.counts, self.reference_top_k, self_loops=self.cfg.self_loops, row_normalize=self.cfg.row_normalize)
        return select_graph(probs, scene_probs, self.cfg.selection)


def _step(head: SALGLHead) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Two training steps (the second uses counts the first updated); outputs and gradients of the second."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        head.zero_grad(set_to_none=True)
        tokens = torch.randn(B, M, D, generator=gen, requires_grad=True)
        targets = (torch.rand(B, N, generator=gen) < 0.4).float()
        out = head(tokens, targets)
        loss = (out.logits * torch.randn(B, N, generator=gen)).sum() + (out.scene_probs * torch.randn(B, K, generator=gen)).sum()
        loss.backward()
    grads = {name: p.grad for name, p in head.named_parameters() if p.grad is not None}
    return [out.logits, out.scene_probs, head.counts, tokens.grad], grads


def _assert_same(sparse: SALGLHead, dense: SALGLHead) -> None:
    outputs, grads = _step(sparse)
    expected_outputs, expected_grads = _step(dense)
    for got, expected in zip(outputs, expected_outputs):
        torch.testing.assert_close(got.to(expected.dtype), expected, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)


HEAD_CASES = [
    {"selection": "soft", "message": "out"},
    {"selection": "hard", "message": "in"},
    {"selection": "soft", "message": "both", "counting": "soft"},
    {"selection": "hard", "message": "both", "count_before_use": True},
]


@pytest.mark.parametrize("self_loops,row_normalize", OPTIONS)
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_sparse_head_with_every_neighbour_equals_the_dense_head(case: dict, self_loops: bool, row_normalize: bool) -> None:
    options = dict(case, self_loops=self_loops, row_normalize=row_normalize)
    sparse = _head(**options)
    sparse.graph_top_k = N  # the sparse form holding all n neighbours (graph_top_k = n builds the dense one)
    dense = _head(**options)
    assert isinstance(sparse.label_graph(torch.full((1, K), 1 / K)), SparseGraph)
    _assert_same(sparse, dense)


@pytest.mark.parametrize("self_loops,row_normalize", [(False, False), (True, True)])
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_sparse_head_equals_the_dense_head_on_top_k_rows(case: dict, self_loops: bool, row_normalize: bool) -> None:
    options = dict(case, self_loops=self_loops, row_normalize=row_normalize)
    sparse = _head(top_k=3, **options)
    cfg = HeadConfig(num_scenes=K, steps=2, attn_dim=8, attn_hidden=8, scene_targets="none", **options)
    torch.manual_seed(0)
    dense = _MaskedDenseHead(cfg, 3, num_labels=N, token_dim=D, label_dim=DL)
    dense.load_state_dict(sparse.state_dict())
    dense.train()
    _assert_same(sparse, dense)


def test_default_and_k_at_least_n_keep_the_dense_graph() -> None:
    assert HeadConfig().graph_top_k == 0
    pi = torch.full((2, K), 1 / K)
    for top_k in (0, N, N + 5):
        graph = _head(top_k=top_k).label_graph(pi)
        assert isinstance(graph, torch.Tensor) and graph.shape == (2, N, N)
    assert isinstance(_head(top_k=N - 1).label_graph(pi), SparseGraph)


def test_negative_top_k_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="graph_top_k"):
        validate(HeadConfig(graph_top_k=-1))


def test_a_shared_index_is_sorted_once_and_gives_the_per_image_order() -> None:
    from salgl.layers import _column_order

    shared = torch.randint(0, N, (N, 7)).expand(4, N, 7)  # soft selection's index: one view for the batch
    order, sizes = _column_order(shared, 4, N)
    expected_order, expected_sizes = _column_order(shared.contiguous(), 4, N)
    assert torch.equal(order, expected_order) and torch.equal(sizes, expected_sizes)
