"""The label mixture on sparse labels (issue #28 item 3): the same fit as the dense EM, read from
the shards without an N x n matrix, in memory that does not grow with N n."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.training.scene_mixture import fit_run_mixture
from pipeline import shards
from pipeline.shards import read_label_matrices, read_sparse_labels
from salgl.config import preset
from salgl.scenes import fit_label_mixture
from salgl.sparse_labels import Csr, SparseLabels


def _scened(num_images: int, num_labels: int, seed: int = 0) -> np.ndarray:
    """Multi-hot labels from 3 planted scenes, each favouring its own third of the labels."""
    rng = np.random.default_rng(seed)
    theta = np.full((3, num_labels), 0.03)
    for k in range(3):
        theta[k, k * num_labels // 3:(k + 1) * num_labels // 3] = 0.4
    return rng.random((num_images, num_labels)) < theta[rng.choice(3, size=num_images)]


def _mixed_ignore(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    """Rows with no, a few, most and all but one entries ignored: both forms of a row's negatives."""
    rng = np.random.default_rng(seed)
    rate = rng.choice([0.0, 0.1, 0.9, 0.99], size=shape[0])[:, None]
    return rng.random(shape) < rate


IGNORES = {"none": None, "few": 0.2, "most": 0.9, "mixed": "mixed"}


def _ignore(kind: str, shape: tuple[int, int]) -> np.ndarray | None:
    rate = IGNORES[kind]
    if rate is None:
        return None
    if rate == "mixed":
        return _mixed_ignore(shape)
    return np.random.default_rng(2).random(shape) < rate


@pytest.mark.parametrize("kind", list(IGNORES))
def test_sparse_rows_hold_the_observed_positives_and_negatives(kind: str) -> None:
    labels = _scened(300, 30)
    ignore = _ignore(kind, labels.shape)
    observed = np.ones_like(labels) if ignore is None else ~ignore
    sparse = SparseLabels.from_dense(labels, ignore)
    assert (sparse.positives.to_dense(30) == (labels & observed)).all()
    assert (sparse.observed_negatives() == (~labels & observed)).all()
    # Each row's negatives in the shorter form: at most n / 2 entries listed.
    assert sparse.negatives.lengths.max() <= 15
    if kind == "mixed":
        assert sparse.complement.any() and not sparse.complement.all()


def test_csr_from_lists_sorts_and_drops_repeats() -> None:
    csr = Csr.from_lists(np.array([3, 0, 2]), np.array([4, 1, 4, 2, 2]), 6)
    assert csr.indptr.tolist() == [0, 2, 2, 3] and csr.indices.tolist() == [1, 4, 2]
    both = Csr.concatenate([csr, csr.take(np.array([False, False, True]))])
    assert both.to_dense(6).sum(1).tolist() == [2, 0, 1, 1]


@pytest.mark.parametrize("kind", list(IGNORES))
@pytest.mark.parametrize("max_iters", [5, 200])
def test_sparse_em_equals_the_dense_em(kind: str, max_iters: int) -> None:
    labels = _scened(400, 24, seed=3)
    labels[:20] = False  # images without a label: left out by both
    ignore = _ignore(kind, labels.shape)
    dense = fit_label_mixture(labels, 3, ignore=ignore, seed=5, restarts=4, max_iters=max_iters)
    sparse = fit_label_mixture(SparseLabels.from_dense(labels, ignore), 3, seed=5, restarts=4, max_iters=max_iters)
    np.testing.assert_allclose(sparse.theta, dense.theta, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(sparse.prior, dense.prior, rtol=1e-8)
    np.testing.assert_allclose(sparse.restart_log_likelihoods, dense.restart_log_likelihoods, rtol=1e-10)
    assert sparse.chosen_restart == dense.chosen_restart and sparse.images == dense.images
    assert sparse.log_likelihood == pytest.approx(dense.log_likelihood, rel=1e-10)


def test_sparse_fit_refuses_what_the_dense_one_refuses() -> None:
    empty = SparseLabels.from_dense(np.zeros((5, 6), bool))
    with pytest.raises(ValueError, match="no image has a label"):
        fit_label_mixture(empty, 2)
    labels = SparseLabels.from_dense(_scened(20, 6))
    with pytest.raises(ValueError, match="num_scenes"):
        fit_label_mixture(labels, 0)
    with pytest.raises(ValueError, match="carry their ignore mask"):
        fit_label_mixture(labels, 2, ignore=np.zeros((20, 6), bool))


def _openimages_like(num_images: int, num_labels: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Per image 3 positives and 5 verified negatives; every other label unknown (ignored)."""
    rng = np.random.default_rng(seed)
    labels, ignore = [], []
    for _ in range(num_images):
        known = rng.choice(num_labels, size=8, replace=False)
        labels.append(sorted(known[:3].tolist()))
        ignore.append(sorted(set(range(num_labels)) - set(known.tolist())))
    return labels, ignore


def _write_dataset(root: Path, labels: list[list[int]], ignore: list[list[int]], num_labels: int, shards: int = 2) -> str:
    """A dataset folder of ``shards`` shards holding these label and ignore lists (the fit reads no images)."""
    root.mkdir()
    bounds = np.linspace(0, len(labels), shards + 1).astype(int)
    entries = []
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table({"labels": pa.array(labels[a:b], pa.list_(pa.int32())),
                          "ignore": pa.array(ignore[a:b], pa.list_(pa.int32()))})
        pq.write_table(table, root / f"part-{s}.parquet", row_group_size=100)
        entries.append({"file": f"part-{s}.parquet", "rows": int(b - a)})
    manifest = {"schema_version": shards_schema(), "vocabulary": [f"l{i}" for i in range(num_labels)],
                "splits": {"train": {"rows": len(labels), "shards": entries}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def shards_schema() -> int:
    return shards.SCHEMA_VERSION


def test_the_sparse_reader_equals_the_dense_matrices(tmp_path: Path) -> None:
    labels, ignore = _openimages_like(700, 50)  # more rows than a read batch, in two shards
    ignore[3] = []  # a fully observed image among mostly-unknown ones
    labels[4] = [7, 7, 1]  # a repeated label
    ignore[5] = ignore[5] + labels[5][:1]  # a label both listed and ignored: ignored
    data = _write_dataset(tmp_path / "oi", labels, ignore, 50)
    sparse = read_sparse_labels(data, "train")
    dense_labels, dense_ignore = read_label_matrices(data, "train")
    assert sparse.num_images == 700 and sparse.complement[3] and not sparse.complement[0]
    assert (sparse.positives.to_dense(50) == (dense_labels & ~dense_ignore)).all()
    assert (sparse.observed_negatives() == (~dense_labels & ~dense_ignore)).all()
    assert len(sparse.negatives.indices) < 6 * 700  # about 5 verified negatives an image, not n


def test_the_run_fit_reads_sparse_rows_and_never_a_dense_matrix(tmp_path: Path, monkeypatch) -> None:
    labels, ignore = _openimages_like(500, 40)
    data = _write_dataset(tmp_path / "oi", labels, ignore, 40)
    dense_labels, dense_ignore = read_label_matrices(data, "train")

    def no_dense(*args, **kwargs):
        raise AssertionError("the run's fit built an N x n label matrix")

    monkeypatch.setattr(shards, "read_label_matrices", no_dense)
    monkeypatch.setattr(shards, "_multi_hot", no_dense)
    got = fit_run_mixture(data, preset("tiny", {"K": 3}))
    expected = fit_label_mixture(dense_labels, 3, ignore=dense_ignore, seed=0)
    np.testing.assert_allclose(np.array(got["theta"]), expected.theta, rtol=1e-8)
    assert got["images"] == expected.images == 500


def test_sparse_em_memory_does_not_grow_with_n_times_n() -> None:
    """N = 20k images, n = 5k labels, 3 positives each: the dense labels alone would be 800 MB
    in float64; the sparse fit's peak (9 MB) is a few float64s per listed entry and per entry of
    its (N + n) K state: O(nnz + (N + n) K)."""
    num_images, num_labels = 20_000, 5_000
    rng = np.random.default_rng(0)
    flat = np.concatenate([rng.choice(num_labels, 3, replace=False) for _ in range(num_images)])
    labels = SparseLabels.build(Csr.from_lists(np.full(num_images, 3), flat, num_labels), None, num_labels)
    tracemalloc.start()
    try:
        fit_label_mixture(labels, 6, restarts=1, max_iters=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    state = len(labels.positives.indices) + len(labels.negatives.indices) + (num_images + num_labels) * 6
    assert peak < 8 * 8 * state and peak < 0.02 * 8 * num_images * num_labels
