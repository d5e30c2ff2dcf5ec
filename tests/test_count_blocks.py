"""Eq. 7's delta as blocks over the labels that occur (issue #28, counts that scale).

``BlockDelta`` must add exactly what the dense (K, n, n) delta adds, so a vocabulary large enough
to count in blocks holds the counts that the equation gives.
"""

from __future__ import annotations

import pytest
import torch

import salgl.graph as graph
from jobs.training.distributed import counts_fingerprint, delta_from_payloads, padded_payload
from salgl.config import HeadConfig
from salgl.graph import BlockDelta, batch_count_delta, count_delta, count_delta_blocks, scene_weights_for_counting
from salgl.head import SALGLHead

K, N = 4, 40


def _batch(rows: int, seed: int, labels_per_image: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pi = torch.softmax(torch.randn(rows, K, generator=gen), -1)
    y = torch.zeros(rows, N, dtype=torch.float64)
    for b in range(rows):
        y[b, torch.randperm(N, generator=gen)[:labels_per_image]] = 1.0
    return pi, y


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_blocks_add_what_the_dense_delta_adds(mode: str) -> None:
    pi, y = _batch(12, seed=0)
    weights = scene_weights_for_counting(pi, mode)
    blocks = count_delta_blocks(weights, y)
    dense = count_delta(weights, y)
    if mode == "hard":  # integers: exact
        assert torch.equal(blocks.dense(K, N), dense)
        assert all(b.scenes.numel() == 1 for b in blocks.blocks), "hard counting: one block per scene, no one-hot"
        assert sum(b.values.numel() for b in blocks.blocks) < dense.numel() / 4
    else:
        torch.testing.assert_close(blocks.dense(K, N), dense, rtol=1e-12, atol=1e-12)
    counts = torch.rand(K, N, N, dtype=torch.float64).round()
    expected = counts + dense
    blocks.add_to(counts)
    torch.testing.assert_close(counts, expected, rtol=1e-12, atol=1e-12)


def test_padded_rows_and_images_without_labels_count_nothing() -> None:
    pi, y = _batch(5, seed=1)
    y[2] = 0.0
    weights = scene_weights_for_counting(pi, "hard")
    flat = padded_payload(weights, y, max_batch=9).reshape(-1)  # four zero rows, as a short last batch
    blocks = count_delta_blocks(flat.reshape(9, K + N)[:, :K], flat.reshape(9, K + N)[:, K:])
    assert torch.equal(blocks.dense(K, N), count_delta(weights, y))
    assert count_delta_blocks(torch.zeros(3, K, dtype=torch.float64), torch.zeros(3, N, dtype=torch.float64)).blocks == ()


def test_the_form_follows_the_size_of_the_dense_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    pi, y = _batch(6, seed=2)
    weights = scene_weights_for_counting(pi, "hard")
    assert isinstance(batch_count_delta(weights, y), torch.Tensor)  # 4 x 40 x 40 float64: dense, as before
    monkeypatch.setattr(graph, "DENSE_DELTA_BYTES", 8 * K * N * N - 1)
    assert isinstance(batch_count_delta(weights, y), BlockDelta)
    summed = delta_from_payloads(padded_payload(weights, y, 8).reshape(-1), K, N)  # what workers gather
    assert isinstance(summed, BlockDelta) and torch.equal(summed.dense(K, N), count_delta(weights, y))


@pytest.mark.parametrize("counting", ["hard", "soft"])
def test_a_head_counting_in_blocks_holds_the_counts_of_eq7(monkeypatch: pytest.MonkeyPatch, counting: str) -> None:
    monkeypatch.setattr(graph, "DENSE_DELTA_BYTES", 0)  # every batch in blocks
    head = SALGLHead(HeadConfig(num_scenes=K, attn_dim=4, attn_hidden=4, counting=counting), num_labels=N, token_dim=8, label_dim=6)
    head.train()
    expected = torch.zeros(K, N, N, dtype=torch.float64)
    for step in range(3):
        pi, y = _batch(7, seed=10 + step)
        head.update_counts(pi, y)
        expected += count_delta(scene_weights_for_counting(pi, counting), y)
    torch.testing.assert_close(head.counts, expected, rtol=1e-12, atol=1e-12)
    head(torch.randn(5, 3, 8), _batch(5, seed=20)[1])  # a training forward counts in blocks too
    assert head.counts.sum() > expected.sum()


def test_the_fingerprint_reads_in_blocks_and_sees_any_entry() -> None:
    counts = torch.randint(0, 50, (K, N, N)).double()
    whole = counts_fingerprint(counts, block=counts.numel())
    assert torch.equal(counts_fingerprint(counts, block=37), whole)  # small integers: exact in any order
    assert whole[0] == counts.sum()
    for index in [(0, 0, 0), (K - 1, N - 1, N - 1), (1, 5, 6)]:
        moved = counts.clone()
        moved[index] += 1
        assert not torch.equal(counts_fingerprint(moved, block=37), whole)


def _head(count_dtype: str, **overrides) -> SALGLHead:
    cfg = HeadConfig(num_scenes=K, attn_dim=4, attn_hidden=4, count_dtype=count_dtype, **overrides)
    return SALGLHead(cfg, num_labels=N, token_dim=8, label_dim=6)


@pytest.mark.parametrize("top_k", [0, 5])
def test_float32_counts_give_the_float64_graph_and_load_either_way(top_k: int) -> None:
    torch.manual_seed(0)
    wide, narrow = _head("float64", graph_top_k=top_k), _head("float32", graph_top_k=top_k)
    narrow.load_state_dict(wide.state_dict())  # a float64 checkpoint into float32 counts
    for step in range(4):
        pi, y = _batch(9, seed=30 + step)
        wide.update_counts(pi, y)
        narrow.update_counts(pi, y)
    assert narrow.counts.dtype == torch.float32 and narrow.counts.element_size() * 2 == wide.counts.element_size()
    assert torch.equal(narrow.counts.double(), wide.counts)
    pi = _batch(3, seed=40)[0]
    for a, b in zip(wide.label_graph(pi), narrow.label_graph(pi)) if top_k else [(wide.label_graph(pi), narrow.label_graph(pi))]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    wide.load_state_dict(narrow.state_dict())  # and back
    assert wide.counts.dtype == torch.float64 and torch.equal(wide.counts, narrow.counts.double())


def test_float32_counts_warn_once_past_two_to_the_24() -> None:
    head = _head("float32")
    head.counts[1, 3, 3] = 2.0**24
    head.counts[1, 3, 3] += 1.0
    assert head.counts[1, 3, 3] == 2.0**24  # 2^24 + 1 is not a float32: an increment there is lost
    pi, y = _batch(2, seed=50)
    with pytest.warns(RuntimeWarning, match="count_dtype=float64"):
        head.update_counts(pi, y)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head.update_counts(pi, y)  # once per head


def test_unknown_count_dtype_is_refused_by_name() -> None:
    from salgl.config import ConfigError

    with pytest.raises(ConfigError, match="count_dtype"):
        HeadConfig(count_dtype="float16").validate()
