"""salgl.metrics: hand-computed cases, and reference implementations on random data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from salgl.metrics import (
    average_precision,
    multilabel_metrics,
    scene_entropy,
    scene_occupancy,
    threshold_metrics,
)

# ---------------------------------------------------------------- average precision, by hand


def test_ap_interpolated_and_not_differ_by_hand() -> None:
    # Ranked targets 0 1 0 1 1: precision at the positives is 1/2, 2/4, 3/5.
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    targets = np.array([[0], [1], [0], [1], [1]])
    plain = average_precision(scores, targets, interpolated=False)
    interp = average_precision(scores, targets, interpolated=True)
    assert plain[0] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    # Envelope from the right: max(1/2, 1/3, 2/4, 3/5) = 3/5 at every positive.
    assert interp[0] == pytest.approx(3 / 5)


def test_ap_class_without_positives_is_nan_and_skipped_in_map() -> None:
    scores = np.array([[0.9, 0.2, 0.1], [0.1, 0.8, 0.3]])
    targets = np.array([[1, 0, 0], [0, 1, 0]])
    ap = average_precision(scores, targets)
    assert ap[:2] == pytest.approx([1.0, 1.0])
    assert math.isnan(ap[2])
    m = multilabel_metrics(scores, targets)
    assert m["classes_without_positives"] == 1
    assert m["ap"] == [pytest.approx(100.0), pytest.approx(100.0), None]
    assert m["mAP"] == pytest.approx(100.0)  # a mean over all 3 classes would give 66.7 or NaN


def test_ap_ties_follow_stable_order_and_relation_to_sklearn() -> None:
    # All three scores tie, so the ranking is image order 0, 1, 2.
    scores = np.full((3, 2), 0.5)
    targets = np.array([[0, 1], [1, 1], [1, 0]])
    plain = average_precision(scores, targets, interpolated=False)
    interp = average_precision(scores, targets, interpolated=True)
    assert plain == pytest.approx([(1 / 2 + 2 / 3) / 2, 1.0])
    assert interp == pytest.approx([2 / 3, 1.0])
    # sklearn groups the tied block: each positive gets the block-end precision 2/3.
    sk = [average_precision_score(targets[:, c], scores[:, c]) for c in range(2)]
    assert sk == pytest.approx([2 / 3, 2 / 3])
    assert plain[0] < sk[0] and plain[1] > sk[1]


def test_ap_ignore_mask_by_hand() -> None:
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    targets = np.array([[0], [1], [0], [1], [1]])
    # Ignoring the top negative: ranked 1 0 1 1, precision 1, 2/3, 3/4.
    ignore = np.array([[True], [False], [False], [False], [False]])
    assert average_precision(scores, targets, ignore, interpolated=False)[0] == pytest.approx(
        (1 + 2 / 3 + 3 / 4) / 3
    )
    assert average_precision(scores, targets, ignore)[0] == pytest.approx((1 + 3 / 4 + 3 / 4) / 3)
    # Ignoring the last positive: positives at ranks 2 and 4, precision 1/2 both.
    ignore = np.array([[False], [False], [False], [False], [True]])
    assert average_precision(scores, targets, ignore)[0] == pytest.approx(0.5)
    # Ignoring every positive leaves a class without positives.
    ignore = targets.astype(bool)
    assert math.isnan(average_precision(scores, targets, ignore)[0])


# ---------------------------------------------------------------- average precision, random data


def _random_case(
    seed: int, n_img: int = 60, n_cls: int = 7, levels: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.random((n_img, n_cls))
    if levels is not None:  # quantise to force many ties
        scores = np.floor(scores * levels) / levels
    targets = (rng.random((n_img, n_cls)) < 0.3).astype(np.int64)
    targets[0] = 1  # every class has at least one positive
    ignore = rng.random((n_img, n_cls)) < 0.15
    ignore[0] = False
    return scores, targets, ignore


@pytest.mark.parametrize("seed", range(5))
def test_noninterpolated_ap_matches_sklearn_without_ties(seed: int) -> None:
    scores, targets, _ = _random_case(seed)
    assert all(np.unique(scores[:, c]).size == scores.shape[0] for c in range(scores.shape[1]))
    ours = average_precision(scores, targets, interpolated=False)
    sk = [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
    np.testing.assert_allclose(ours, sk, rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_interpolated_ap_at_least_noninterpolated(seed: int) -> None:
    scores, targets, ignore = _random_case(seed, levels=10)
    interp = average_precision(scores, targets, ignore)
    plain = average_precision(scores, targets, ignore, interpolated=False)
    assert np.all(interp >= plain - 1e-12)
    assert np.any(interp > plain + 1e-6)  # random rankings are not already monotone


def _voc_ap_loop(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Brute-force VOC 2010+ AP, one class at a time, in the VOC devkit's own formulation."""
    aps = []
    for c in range(scores.shape[1]):
        keep = ~ignore[:, c]
        s, t = scores[keep, c], targets[keep, c]
        t = t[np.argsort(-s, kind="stable")]
        if t.sum() == 0:
            aps.append(np.nan)
            continue
        tp, fp = np.cumsum(t == 1), np.cumsum(t == 0)
        rec, prec = tp / t.sum(), tp / (tp + fp)
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])))
    return np.array(aps)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [None, 8])
def test_interpolated_ap_matches_brute_force(seed: int, levels: int | None) -> None:
    scores, targets, ignore = _random_case(seed, levels=levels)
    targets[:, -1] = np.where(ignore[:, -1], targets[:, -1], 0)  # last class: positives all ignored
    ours = average_precision(scores, targets, ignore)
    ref = _voc_ap_loop(scores, targets, ignore)
    assert math.isnan(ours[-1]) and math.isnan(ref[-1])
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


# ---------------------------------------------------------------- threshold metrics, by hand

# 4 images x 3 classes. At 0.5: class 0 predicted on images 0, 1, 3 (tp 2, gt 2);
# class 1 on images 0, 2 (tp 2, gt 2); class 2 never (gt 2).
SCORES = np.array(
    [
        [0.9, 0.6, 0.1],
        [0.8, 0.4, 0.2],
        [0.3, 0.7, 0.3],
        [0.6, 0.2, 0.4],
    ]
)
TARGETS = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1]])


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("empty, cp", [(0.0, (2 / 3 + 1 + 0) / 3), (1.0, (2 / 3 + 1 + 1) / 3)])
def test_threshold_metrics_never_predicted_class(empty: float, cp: float) -> None:
    m = threshold_metrics(SCORES, TARGETS, empty_class_precision=empty)
    cr = (1 + 1 + 0) / 3
    op, or_ = 4 / 5, 4 / 6
    expected = {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": or_, "OF1": _f1(op, or_)}
    assert m == pytest.approx(expected)


def test_threshold_metrics_class_without_ground_truth_has_recall_zero() -> None:
    targets = TARGETS.copy()
    targets[:, 2] = 0  # class 2: no ground truth and never predicted
    m = threshold_metrics(SCORES, targets, empty_class_precision=1.0)
    assert m["CR"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["CP"] == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_threshold_metrics_ignore_changes_counts() -> None:
    ignore = np.zeros_like(TARGETS, dtype=bool)
    ignore[3, 0] = True  # drops class 0's false positive
    ignore[1, 2] = True  # drops one of class 2's ground truths
    m = threshold_metrics(SCORES, TARGETS, ignore)
    # precision 1, 1, 0; recall 1, 1, 0; tp 4 of 4 predicted, of 5 ground truths.
    cp, cr, op, or_ = 2 / 3, 2 / 3, 1.0, 4 / 5
    expected = {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": or_, "OF1": _f1(op, or_)}
    assert m == pytest.approx(expected)


def test_threshold_metrics_topk_by_hand() -> None:
    # top-1: image 0 keeps only class 0, so class 1 loses its true positive there.
    m = threshold_metrics(SCORES, TARGETS, topk=1)
    cp, cr, op, or_ = (2 / 3 + 1 + 0) / 3, (1 + 1 / 2 + 0) / 3, 3 / 4, 3 / 6
    expected = {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": or_, "OF1": _f1(op, or_)}
    assert m == pytest.approx(expected)


def test_top3_variant_and_tie_rule() -> None:
    # Image 0: five labels above 0.5, the true ones ranked 4th and 5th.
    # Image 1: four tied labels; top-3 keeps the lower indices 0, 1, 2, so label 3 is dropped.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.55], [0.7, 0.7, 0.7, 0.7, 0.1]])
    targets = np.array([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    m = multilabel_metrics(scores, targets, topk=3)
    assert m["OP"] == pytest.approx(100 * 3 / 9)
    assert m["OR"] == pytest.approx(100.0)
    for key in ("CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3"):
        assert m[key] == 0.0
    m1 = multilabel_metrics(scores, targets, topk=4)
    assert m1["OR_top4"] == pytest.approx(100 * 2 / 3)  # image 0 label 3 and image 1 label 3


def test_all_empty_ratios_are_zero_without_warnings() -> None:
    scores = np.zeros((3, 4))
    targets = np.zeros((3, 4), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = threshold_metrics(scores, targets, threshold=0.5, topk=2)
        full = multilabel_metrics(scores, targets)
    assert m == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}
    assert full["classes_without_positives"] == 4 and full["ap"] == [None] * 4


# ---------------------------------------------------------------- the summary dict


def test_multilabel_metrics_percent_keys_and_torch_input() -> None:
    scores, targets, ignore = _random_case(3, levels=10)
    m = multilabel_metrics(scores, targets, ignore)
    ap = average_precision(scores, targets, ignore)
    assert m["mAP"] == pytest.approx(100 * np.nanmean(ap))
    plain = average_precision(scores, targets, ignore, interpolated=False)
    assert m["mAP_noninterp"] == pytest.approx(100 * np.nanmean(plain))
    top3 = threshold_metrics(scores, targets, ignore, topk=3)
    assert m["OF1_top3"] == pytest.approx(100 * top3["OF1"])
    expected_keys = {"mAP", "mAP_noninterp", "ap", "classes_without_positives"}
    for suffix in ("", "_top3"):
        expected_keys |= {k + suffix for k in ("CP", "CR", "CF1", "OP", "OR", "OF1")}
    assert set(m) == expected_keys
    as_torch = [torch.from_numpy(a) for a in (scores.astype(np.float32), targets, ignore)]
    mt = multilabel_metrics(*as_torch)
    # Scores are multiples of 1/10, so float32 keeps their order and ties: the same numbers.
    assert mt["mAP"] == pytest.approx(m["mAP"])
    assert mt["CF1"] == pytest.approx(m["CF1"])


# ---------------------------------------------------------------- scenes


def test_scene_entropy_uniform_is_log_k_and_single_scene_is_zero() -> None:
    k = 6
    ids = np.tile(np.arange(k), 5)
    assert scene_entropy(ids, k) == pytest.approx(math.log(k))
    np.testing.assert_allclose(scene_occupancy(ids, k), np.full(k, 1 / k))
    single = scene_entropy(np.full(30, 2), k)
    assert single == 0.0 and math.copysign(1.0, single) == 1.0  # printed "0.000", never "-0.000"
    np.testing.assert_allclose(scene_occupancy(np.full(30, 2), k), np.eye(k)[2])


def test_scene_entropy_uneven_and_from_scores() -> None:
    ids = torch.tensor([0, 0, 0, 1])
    p = np.array([0.75, 0.25, 0.0])
    assert scene_entropy(ids, 3) == pytest.approx(-(p[:2] * np.log(p[:2])).sum())
    scene_scores = np.eye(3)[[0, 0, 0, 1]] + 0.1  # (N, K): argmax gives the same ids
    np.testing.assert_allclose(scene_occupancy(scene_scores, 3), p)
    with pytest.raises(ValueError):
        scene_occupancy(np.array([0, 3]), 3)
