"""The attention's custom autograd kernel (PyTorch tiles and the native C kernel) against plain
autograd on the same expression."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import Tensor

from salgl import native
from salgl.layers import SemanticAttention, _tiles, bilinear_tanh_scores
from tests._native import cpu_path, needs_compiler  # noqa: F401 (cpu_path is a fixture)

B, M, N, D1 = 3, 5, 4, 6


def _plain(regions: Tensor, labels: Tensor, direction: Tensor) -> Tensor:
    return torch.tanh(regions.unsqueeze(1) * labels[None, :, None, :]) @ direction  # (B, n, m)


def _inputs(dtype: torch.dtype, seed: int = 0, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: (scale * torch.randn(*shape, generator=gen, dtype=dtype)).requires_grad_()  # noqa: E731
    return make(B, M, D1), make(N, D1), make(D1)


def _row_bytes(dtype: torch.dtype) -> int:
    return M * D1 * torch.finfo(dtype).bits // 8


# Tile budgets: one (row, label) pair, a partial label block, one row of all labels, two rows, all.
TILE_PAIRS = [1, 3, N, 2 * N, B * N]


@pytest.mark.parametrize("pairs", TILE_PAIRS)
def test_gradcheck_float64(pairs: int) -> None:
    inputs = _inputs(torch.float64, scale=2.0)  # |x| up to ~20: saturated tanh included
    tile_bytes = pairs * _row_bytes(torch.float64)
    assert torch.autograd.gradcheck(lambda u, v, p: bilinear_tanh_scores(u, v, p, tile_bytes=tile_bytes), inputs)


@pytest.mark.parametrize("pairs", TILE_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_plain_autograd(pairs: int, dtype: torch.dtype, cpu_path: str) -> None:
    """float64: equal to rounding. float32: within 1e-5 of the magnitude of the float64 values.

    The kernel sums p . (2s - 1) as 2 p.s - sum p (and likewise dp), so its float32 rounding is of
    order eps * sum |p| rather than eps * sum |p t|: a few times plain autograd's, never more.
    """
    regions, labels, direction = _inputs(torch.float64, seed=1)
    grad = torch.randn(B, N, M, dtype=torch.float64)
    expected = _plain(regions, labels, direction)
    expected_grads = torch.autograd.grad(expected, (regions, labels, direction), grad)
    inputs = [x.detach().to(dtype).requires_grad_() for x in (regions, labels, direction)]
    got = bilinear_tanh_scores(*inputs, tile_bytes=pairs * _row_bytes(dtype))
    got_grads = torch.autograd.grad(got, inputs, grad.to(dtype))
    for g, e in zip((got, *got_grads), (expected, *expected_grads)):
        atol = 1e-12 if dtype == torch.float64 else 1e-5 * e.abs().max().item()
        torch.testing.assert_close(g.double(), e, atol=atol, rtol=0)


def test_one_label_per_tile_equals_one_tile() -> None:
    regions, labels, direction = _inputs(torch.float64, seed=2)
    grad = torch.randn(B, N, M, dtype=torch.float64)
    outs = []
    for tile_bytes in (_row_bytes(torch.float64), 2**30):
        scores = bilinear_tanh_scores(regions, labels, direction, tile_bytes=tile_bytes)
        outs.append((scores, *torch.autograd.grad(scores, (regions, labels, direction), grad)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-14)


def test_inputs_without_grad_and_no_grad_mode() -> None:
    regions, labels, direction = _inputs(torch.float64, seed=3)
    labels = labels.detach()
    scores = bilinear_tanh_scores(regions, labels, direction, tile_bytes=_row_bytes(torch.float64))
    d_regions, d_direction = torch.autograd.grad(scores.sum(), (regions, direction))
    plain = _plain(regions, labels, direction)
    torch.testing.assert_close(d_regions, torch.autograd.grad(plain.sum(), regions)[0])
    with torch.no_grad():
        assert not bilinear_tanh_scores(regions, labels, direction).requires_grad


@pytest.mark.parametrize("batch,labels,row_bytes,tile_bytes", [(3, 4, 10, 1), (3, 4, 10, 25), (3, 4, 10, 80), (5, 3, 8, 100), (2, 7, 1, 10**6)])
def test_tiles_cover_every_pair_once_within_budget(batch: int, labels: int, row_bytes: int, tile_bytes: int) -> None:
    regions = torch.empty(batch, row_bytes, 1, dtype=torch.uint8)  # an (m, d1) slice of row_bytes bytes
    seen = torch.zeros(batch, labels, dtype=torch.int64)
    for rows, cols in _tiles(regions, labels, tile_bytes):
        block = seen[rows, cols]
        assert block.numel() * row_bytes <= max(tile_bytes, row_bytes)
        block += 1
    assert (seen == 1).all()


def test_semantic_attention_uses_the_kernel_faithfully() -> None:
    """The module's scores are the released x_ij (P then Phi_a) up to a constant over regions."""
    torch.manual_seed(4)
    att = SemanticAttention(7, 5, attn_dim=D1, hidden_dim=4, chunk_mb=1).double()
    tokens, embeddings = torch.randn(B, M, 7, dtype=torch.float64), torch.randn(N, 5, dtype=torch.float64)
    _, alpha = att(tokens, embeddings)
    hidden = torch.tanh(att.region_proj(tokens).unsqueeze(1) * att.label_proj(embeddings)[None, :, None, :])
    expected = att.score(att.hidden(hidden)).squeeze(-1).softmax(-1)  # (B, n, m), as released
    torch.testing.assert_close(alpha, expected)


@pytest.mark.parametrize("shape", [(2, 7, 3, 1024), (1, 1, 1, 1), (3, 9, 2, 37)])  # vector body, scalar, both
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_native_matches_float64(shape: tuple[int, int, int, int], threads: int, cpu_path: str) -> None:
    """Either float32 path within 1e-5 (of the largest value) of float64, at attention widths the
    C compiler vectorises and at odd ones it finishes in scalar code, the regions split over threads."""
    batch, regions_n, labels_n, dim = shape
    gen = torch.Generator().manual_seed(7)
    regions, labels = torch.randn(batch, regions_n, dim, generator=gen), torch.randn(labels_n, dim, generator=gen)
    direction, grad = torch.randn(dim, generator=gen) / dim**0.5, torch.randn(batch, labels_n, regions_n, generator=gen)
    expected64 = [x.double().requires_grad_() for x in (regions, labels, direction)]
    expected = _plain(*expected64)
    expected_grads = torch.autograd.grad(expected, expected64, grad.double())
    inputs = [x.clone().requires_grad_() for x in (regions, labels, direction)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = bilinear_tanh_scores(*inputs)
        got_grads = torch.autograd.grad(got, inputs, grad)
    finally:
        torch.set_num_threads(before)
    for g, e in zip((got, *got_grads), (expected, *expected_grads)):
        torch.testing.assert_close(g.double(), e, atol=1e-5 * e.abs().max().item(), rtol=0)


def test_saturated_and_nan_inputs(cpu_path: str) -> None:
    """|u v| far beyond tanh's range gives +-1 exactly; a NaN region poisons its own scores only."""
    regions = torch.tensor([[[100.0, -100.0, 1e30], [0.5, float("nan"), 0.5]]])  # (1, 2, 3)
    labels, direction = torch.ones(1, 3), torch.ones(3)
    scores = bilinear_tanh_scores(regions, labels, direction)  # (1, 1, 2)
    assert scores[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert scores[0, 0, 1].isnan()


@needs_compiler
def test_native_build_failure_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SALGL_NATIVE_KERNELS", "1")
    monkeypatch.setenv("SALGL_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "false")  # a "compiler" that always fails
    native._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the native kernels failed"):
            assert not native.usable(torch.zeros(1))
        regions, labels, direction = _inputs(torch.float32, seed=4)
        torch.testing.assert_close(bilinear_tanh_scores(regions, labels, direction), _plain(regions, labels, direction))
        assert not list(tmp_path.iterdir())  # no half-built library left behind
    finally:
        native._library.cache_clear()


@needs_compiler
def test_native_kernel_runs_in_a_forked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread pool is per process: a child forked after the parent used it still computes."""
    import multiprocessing

    monkeypatch.setenv("SALGL_NATIVE_KERNELS", "1")
    regions, labels, direction = (x.detach() for x in _inputs(torch.float32, seed=5))
    torch.set_num_threads(2)  # as a 2-core machine has; the parent's pool then exists
    expected = bilinear_tanh_scores(regions, labels, direction)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_scores_on_two_threads, (regions, labels, direction)).get(timeout=60)
    torch.testing.assert_close(got, expected)


def _scores_on_two_threads(regions: Tensor, labels: Tensor, direction: Tensor) -> Tensor:
    torch.set_num_threads(2)  # a forked child starts with one
    return bilinear_tanh_scores(regions, labels, direction)


@pytest.mark.parametrize("batch, regions_n", [(0, 4), (2, 0)])
def test_empty_batch_or_regions(batch: int, regions_n: int, cpu_path: str) -> None:
    regions = torch.randn(batch, regions_n, 8, requires_grad=True)
    labels, direction = torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    scores = bilinear_tanh_scores(regions, labels, direction)
    assert scores.shape == (batch, 3, regions_n)
    d_regions, d_labels, d_direction = torch.autograd.grad(scores.sum(), (regions, labels, direction))
    assert d_regions.shape == regions.shape and not d_labels.any() and not d_direction.any()
