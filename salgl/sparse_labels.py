"""Label sets as sparse rows: the label mixture's input at OpenImages scale (issue #28).

Notation: N images, n labels, nnz entries listed.

A dense (N, n) multi-hot matrix takes 8 N n bytes in float64 (80 GB at N = 1M, n = 10k) where an
image holds a handful of labels. Here an image's observed positives are a row of a CSR matrix
(numpy ``indptr`` and ``indices``), and so are its observed negatives, in whichever form is shorter:

- listed: the labels verified absent, where most are unknown (OpenImages: every label an image's
  annotations do not list is unknown, so it is ignored);
- complement: every label except those listed (the image's positives and ignored entries), where
  all or most labels are observed (COCO: none ignored; VOC: a few "difficult" ones).

So both kinds of dataset take O(nnz) memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Csr(NamedTuple):
    """A 0/1 matrix by rows: row i holds columns ``indices[indptr[i]:indptr[i + 1]]``, sorted, unique."""

    indptr: np.ndarray  # (N + 1,) int64
    indices: np.ndarray  # (nnz,) int64

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)  # (N,)

    def row_ids(self) -> np.ndarray:
        """The row of each entry, (nnz,)."""
        return np.repeat(np.arange(self.num_rows), self.lengths)

    def keys(self, num_cols: int) -> np.ndarray:
        """Each entry as row * num_cols + column, (nnz,) sorted: the form set operations take."""
        return self.row_ids() * num_cols + self.indices

    def take(self, rows: np.ndarray) -> Csr:
        """The rows where the (N,) bool ``rows`` is True, in order."""
        lengths = self.lengths[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Csr(indptr, self.indices[np.repeat(rows, self.lengths)])

    def to_dense(self, num_cols: int) -> np.ndarray:
        matrix = np.zeros((self.num_rows, num_cols), dtype=bool)  # (N, n)
        matrix[self.row_ids(), self.indices] = True
        return matrix

    @staticmethod
    def from_keys(keys: np.ndarray, num_rows: int, num_cols: int) -> Csr:
        """From sorted unique row * num_cols + column keys (``keys``' inverse)."""
        rows = keys // num_cols
        indptr = np.searchsorted(rows, np.arange(num_rows + 1)).astype(np.int64)
        return Csr(indptr, (keys % num_cols).astype(np.int64))

    @staticmethod
    def from_lists(lengths: np.ndarray, flat: np.ndarray, num_cols: int) -> Csr:
        """From per-row lists (``lengths`` (N,), their entries back to back): sorted, repeats dropped."""
        rows = np.repeat(np.arange(len(lengths)), lengths)
        return Csr.from_keys(_sorted_unique(rows * num_cols + np.asarray(flat, dtype=np.int64)), len(lengths), num_cols)

    @staticmethod
    def from_dense(matrix: np.ndarray) -> Csr:
        rows, cols = np.nonzero(matrix)
        return Csr.from_lists(np.bincount(rows, minlength=len(matrix)), cols, matrix.shape[1])

    @staticmethod
    def concatenate(parts: Sequence[Csr]) -> Csr:
        offsets = np.cumsum([0] + [len(p.indices) for p in parts[:-1]])
        indptr = [parts[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)]
        return Csr(np.concatenate(indptr).astype(np.int64), np.concatenate([p.indices for p in parts]))


class SparseLabels(NamedTuple):
    """Observed positives and negatives of N images over n labels; an entry in neither is ignored.

    Row i's observed negatives are ``negatives``' row i, or, where ``complement[i]``, every label
    except that row's (which then holds the image's positives and ignored entries).
    """

    num_labels: int
    positives: Csr  # observed positives
    negatives: Csr  # observed negatives, or (complement rows) the labels that are not
    complement: np.ndarray  # (N,) bool

    @property
    def num_images(self) -> int:
        return self.positives.num_rows

    def take(self, rows: np.ndarray) -> SparseLabels:
        """The images where the (N,) bool ``rows`` is True, in order."""
        return SparseLabels(self.num_labels, self.positives.take(rows), self.negatives.take(rows), self.complement[rows])

    def observed_negatives(self) -> np.ndarray:
        """(N, n) bool: for tests and small data only."""
        listed = self.negatives.to_dense(self.num_labels)
        return np.where(self.complement[:, None], ~listed, listed)

    @staticmethod
    def build(labels: Csr, ignore: Csr | None, num_labels: int) -> SparseLabels:
        """From each image's labels and ignored entries (a label both listed and ignored is ignored),
        every row's negatives in the shorter form. Listing a row's negatives takes an n-wide
        temporary for the rows that need it: build from a bounded number of rows at a time."""
        num_rows = labels.num_rows
        label_keys = labels.keys(num_labels)
        ignore_keys = ignore.keys(num_labels) if ignore is not None else label_keys[:0]
        positives = Csr.from_keys(np.setdiff1d(label_keys, ignore_keys, assume_unique=True), num_rows, num_labels)
        unlisted_keys = _sorted_unique(np.concatenate([label_keys, ignore_keys]))  # positive or ignored: not a negative
        unlisted = Csr.from_keys(unlisted_keys, num_rows, num_labels)
        complement = unlisted.lengths <= num_labels / 2  # (N,)
        listed = _complements(unlisted.take(~complement), num_labels)
        keys = np.concatenate([_keys_of(unlisted.take(complement), complement, num_labels),
                               _keys_of(listed, ~complement, num_labels)])
        keys = np.sort(keys, kind="stable")  # two sorted runs: timsort merges them
        return SparseLabels(num_labels, positives, Csr.from_keys(keys, num_rows, num_labels), complement)

    @staticmethod
    def from_dense(labels: np.ndarray, ignore: np.ndarray | None = None) -> SparseLabels:
        """From (N, n) multi-hot labels and an optional (N, n) ignore mask, as ``build``."""
        labels = np.asarray(labels, dtype=bool)
        mask = None if ignore is None else Csr.from_dense(np.asarray(ignore, dtype=bool))
        return SparseLabels.build(Csr.from_dense(labels), mask, labels.shape[1])

    @staticmethod
    def concatenate(parts: Sequence[SparseLabels]) -> SparseLabels:
        """The images of ``parts`` one after the other (parts over the same labels)."""
        return SparseLabels(
            parts[0].num_labels,
            Csr.concatenate([p.positives for p in parts]),
            Csr.concatenate([p.negatives for p in parts]),
            np.concatenate([p.complement for p in parts]),
        )


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's hashing unique is several times slower on millions of keys),
    with no sort at all where the keys come sorted, as shards' label lists do."""
    if len(keys) and not (np.diff(keys) > 0).all():
        keys = np.sort(keys, kind="stable")  # timsort: merges the sorted runs concatenated lists leave
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return keys


def _complements(rows: Csr, num_cols: int) -> Csr:
    """Each row's missing columns, through a (rows, n) bool block."""
    block = np.ones((rows.num_rows, num_cols), dtype=bool)
    block[rows.row_ids(), rows.indices] = False
    return Csr.from_dense(block)


def _keys_of(part: Csr, rows: np.ndarray, num_cols: int) -> np.ndarray:
    """Keys of ``part``'s entries placed at the rows where the (N,) bool ``rows`` is True."""
    return np.flatnonzero(rows)[part.row_ids()] * num_cols + part.indices
