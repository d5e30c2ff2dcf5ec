"""Multi-label classification metrics with the field's conventions (SPEC section 5).

Shape notation: N images, n labels, K scenes. ``scores`` are ``(N, n)`` floats (probabilities or
logits; only their order and, for the threshold metrics, their relation to ``threshold`` matter),
``targets`` are ``(N, n)`` with a label positive where ``targets > 0`` (so ``{0, 1}`` and the
``{-1, 1}`` of ML-GCN's VOC loaders both work), and ``ignore`` is an optional ``(N, n)`` bool mask:
``True`` removes that image from that class's AP and from every count of that class (VOC
"difficult", NUS-WIDE's missing labels), as the released SALGL code does with its ignore file.

Everything here is numpy over whole arrays: one stable sort per class column, cumulative sums, no
Python loop over images or classes. Torch tensors are accepted and moved to CPU numpy.

Where the released code differs (``jasonseu/SALGL``, ``lib/metrics.py``):
- It ranks with ``np.argsort(pred)[::-1]``, so tied scores come out in an unspecified order; here
  ties are broken by image index (see :func:`average_precision`).
- Its mAP is ``np.mean`` over all classes, a class without positives scoring 0; here such a class is
  NaN and mAP averages over the classes that have positives (the count skipped is reported).
- It clamps the counts with ``eps`` before dividing, so a class never predicted has precision
  ``eps / eps = 1`` and a class without ground truth has recall 1; ML-GCN counts the first as 0 and
  leaves the second as NaN. Here precision follows ``empty_class_precision`` (0 by default, ML-GCN's
  rule; pass 1.0 for SALGL's) and recall of a class without ground truth is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _prepare(
    scores: Any, targets: Any, ignore: Any | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return float64 scores, bool positives and bool *valid* (= not ignored), all ``(N, n)``."""
    s = _to_numpy(scores).astype(np.float64, copy=False)
    t = _to_numpy(targets)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores and targets must both be (N, n); got {s.shape} and {t.shape}")
    valid = np.ones(s.shape, dtype=bool)
    if ignore is not None:
        ig = _to_numpy(ignore).astype(bool, copy=False)
        if ig.shape != s.shape:
            raise ValueError(f"ignore must be {s.shape}; got {ig.shape}")
        valid = ~ig
    return s, t > 0, valid


def _safe_div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """``num / den`` elementwise, ``empty`` where ``den == 0``; no warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, float(empty))
    np.divide(num, den, out=out, where=den != 0)
    return out


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def average_precision(
    scores: ArrayLike,
    targets: ArrayLike,
    ignore: ArrayLike | None = None,
    *,
    interpolated: bool = True,
) -> np.ndarray:
    """Per-class average precision, shape ``(n,)``, in ``[0, 1]``.

    Each class column is ranked by score, descending, with a *stable* sort: tied scores keep image
    order (lower image index ranks first). Ignored entries are dropped from the ranking of that
    class. With ``tp_r`` / ``fp_r`` the counts in the top ``r`` and ``P_r = tp_r / r``:

    - ``interpolated=True`` (default): all-point interpolated AP, the VOC 2010+ protocol that SALGL
      and Query2Label report. The precision envelope ``P*_r = max_{r' >= r} P_r'`` is made monotone
      non-increasing from the right and integrated over recall, which steps by ``1 / n_pos`` at each
      positive: ``AP = mean over positives of P*_rank``.
    - ``interpolated=False``: non-interpolated AP, ``mean over positives of P_rank`` (ASL, ML-GCN).
      Without ties this equals ``sklearn.metrics.average_precision_score``. With ties sklearn puts a
      whole tied block at one threshold, so each positive in it gets the precision at the block's
      end; the stable order here instead credits positives earlier in the block with the precision
      at their own position, and the two can differ (higher or lower, depending on where the
      positives sit inside the block).

    A class without positives (after ``ignore``) gets NaN; average with ``np.nanmean``.
    """
    s, pos, valid = _prepare(scores, targets, ignore)
    order = np.argsort(-s, axis=0, kind="stable")  # (N, n), ties by image index
    pos_sorted = np.take_along_axis(pos & valid, order, axis=0)
    neg_sorted = np.take_along_axis(~pos & valid, order, axis=0)
    tp = np.cumsum(pos_sorted, axis=0)  # (N, n)
    fp = np.cumsum(neg_sorted, axis=0)
    # An ignored row repeats the previous row's counts, so its precision equals that of the last
    # valid rank (or 0 before any) and cannot raise the envelope: no need to drop it.
    precision = _safe_div(tp, tp + fp, 0.0)
    if interpolated:
        precision = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    n_pos = pos_sorted.sum(axis=0)
    summed = np.where(pos_sorted, precision, 0.0).sum(axis=0)
    return _safe_div(summed, n_pos, np.nan)


def _topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """``(N, n)`` bool, True at each image's ``k`` highest scores; ties go to the lower label index.

    Ignored labels still take part in the ranking: the model does not know what is ignored.
    """
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def threshold_metrics(
    scores: ArrayLike,
    targets: ArrayLike,
    ignore: ArrayLike | None = None,
    *,
    threshold: float = 0.5,
    topk: int | None = None,
    empty_class_precision: float = 0.0,
) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 as fractions in ``[0, 1]`` (keys ``"CP"``, ... ``"OF1"``).

    A label is predicted when ``score >= threshold`` and, if ``topk`` is set, it is also among the
    image's ``topk`` highest scores (ties broken by lower label index). Counts skip ignored entries.

    - ``OP = sum tp / sum predicted``, ``OR = sum tp / sum gt``, ``OF1 = 2 OP OR / (OP + OR)``.
    - ``CP`` and ``CR`` are means over all n classes of per-class precision and recall, and
      ``CF1 = 2 CP CR / (CP + CR)`` is the F1 of those means (ML-GCN, SALGL), not a mean of F1s.
    - A class never predicted has precision ``empty_class_precision``: 0 is ML-GCN's rule (the
      default); the released SALGL code's ``eps`` clamp makes it 1, so pass 1.0 to match it.
    - A class without ground truth has recall 0 (ML-GCN gives NaN, SALGL's clamp gives 1).
    - Every other 0/0 (no predictions at all, no ground truth at all, P + R = 0) is 0.0.
    """
    s, pos, valid = _prepare(scores, targets, ignore)
    pred = s >= threshold
    if topk is not None:
        pred &= _topk_mask(s, topk)
    pred &= valid
    gt = pos & valid
    tp = (pred & gt).sum(axis=0)  # (n,)
    n_pred, n_gt = pred.sum(axis=0), gt.sum(axis=0)
    cp = float(_safe_div(tp, n_pred, empty_class_precision).mean()) if s.shape[1] else 0.0
    cr = float(_safe_div(tp, n_gt, 0.0).mean()) if s.shape[1] else 0.0
    op = float(_safe_div(tp.sum(), n_pred.sum(), 0.0))
    or_ = float(_safe_div(tp.sum(), n_gt.sum(), 0.0))
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": or_, "OF1": _f1(op, or_)}


def _scene_ids(scene_ids: ArrayLike) -> np.ndarray:
    ids = _to_numpy(scene_ids)
    if ids.ndim == 2:  # (N, K) scene scores: take the argmax scene of each image
        ids = ids.argmax(axis=1)
    if ids.ndim != 1:
        raise ValueError(f"scene_ids must be (N,) ids or (N, K) scores; got shape {ids.shape}")
    return ids.astype(np.int64, copy=False)


def scene_occupancy(scene_ids: ArrayLike, num_scenes: int) -> np.ndarray:
    """Fraction of images assigned to each scene, shape ``(K,)``; all zeros for an empty set.

    ``scene_ids`` are the argmax scene per image, ``(N,)``, or the ``(N, K)`` scene scores.
    """
    ids = _scene_ids(scene_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= num_scenes):
        raise ValueError(f"scene ids must lie in [0, {num_scenes}); got {ids.min()}..{ids.max()}")
    counts = np.bincount(ids, minlength=num_scenes).astype(np.float64)
    return counts / max(ids.size, 1)


def scene_entropy(scene_ids: ArrayLike, num_scenes: int) -> float:
    """Entropy in nats of the argmax-scene histogram over the test set (SPEC section 5).

    ``log K`` when every scene is used equally, 0 when one scene takes every image (collapse);
    ``0 log 0 = 0``.
    """
    p = scene_occupancy(scene_ids, num_scenes)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: one scene gives 0.0, not -0.0


def multilabel_metrics(
    scores: ArrayLike,
    targets: ArrayLike,
    ignore: ArrayLike | None = None,
    *,
    threshold: float = 0.5,
    topk: int = 3,
    empty_class_precision: float = 0.0,
) -> dict[str, float | list]:
    """Every reported number in one flat dict, in percent (0..100) like the paper tables.

    Keys: ``mAP`` (interpolated, over classes with positives; NaN if no class has one),
    ``mAP_noninterp``, ``ap`` (per-class interpolated AP, ``None`` for a class without positives),
    ``classes_without_positives``, the threshold metrics ``CP CR CF1 OP OR OF1`` and their top-k
    variants suffixed ``_top{topk}``.
    See :func:`average_precision` and :func:`threshold_metrics` for the conventions.
    """
    s, t = _to_numpy(scores), _to_numpy(targets)
    ig = None if ignore is None else _to_numpy(ignore)
    ap = average_precision(s, t, ig, interpolated=True)
    ap_plain = average_precision(s, t, ig, interpolated=False)
    has_pos = ~np.isnan(ap)
    out: dict[str, float | list] = {
        "mAP": 100.0 * float(ap[has_pos].mean()) if has_pos.any() else float("nan"),
        "mAP_noninterp": 100.0 * float(ap_plain[has_pos].mean()) if has_pos.any() else float("nan"),
        "ap": [100.0 * float(a) if ok else None for a, ok in zip(ap, has_pos)],
        "classes_without_positives": int((~has_pos).sum()),
    }
    kw = dict(threshold=threshold, empty_class_precision=empty_class_precision)
    for suffix, k in (("", None), (f"_top{topk}", topk)):
        for name, value in threshold_metrics(s, t, ig, topk=k, **kw).items():
            out[name + suffix] = 100.0 * value
    return out
