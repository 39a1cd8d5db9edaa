"""How well the pooled class scores y_k tell an image's tags: multi-label classification
quality (numpy only).

ViT-PCM's max-pooled patch scores are trained as image-level classifiers (L_MCE), so
``y_k >= threshold`` predicts the tags of an image nobody tagged (``vitpcm predict``). This
module measures that on images whose tags are known: per-class precision, recall, F1 and
average precision, their means, and the threshold that maximises the mean F1.

Shapes: N images, C classes (background at 0, which is always on and never scored).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

#: thresholds searched for the best mean F1 (0.05 steps: finer would fit the noise of a val split)
CANDIDATES = tuple(round(0.05 * i, 2) for i in range(1, 20))


def average_precision(scores: np.ndarray, truth: np.ndarray) -> Optional[float]:
    """AP of one class: ``scores`` ``[N]``, ``truth`` ``[N]`` bool -> the mean over the
    positives of the precision at their rank (scikit-learn's non-interpolated AP; tied
    scores enter together). None when there is no positive."""
    truth = np.asarray(truth, bool)
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, t = np.asarray(scores, np.float64)[order], truth[order]
    # one step per distinct score: ties are counted together, as a threshold sees them
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(t)[last]
    predicted = last + 1
    precision = tp / predicted
    recall_step = np.diff(np.r_[0, tp]) / positives
    return float(np.sum(precision * recall_step))


def _counts(scores: np.ndarray, truth: np.ndarray, threshold: float):
    pred = scores >= threshold
    tp = (pred & truth).sum(0).astype(np.float64)
    fp = (pred & ~truth).sum(0).astype(np.float64)
    fn = (~pred & truth).sum(0).astype(np.float64)
    return tp, fp, fn


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def mean_f1(scores: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Mean F1 over the foreground classes that occur in ``truth`` (``[N, C]`` each)."""
    scores, truth = np.asarray(scores)[:, 1:], np.asarray(truth, bool)[:, 1:]
    support = truth.sum(0) > 0
    if not support.any():
        return float("nan")
    return float(_f1(*_counts(scores, truth, threshold))[support].mean())


def best_threshold(scores: np.ndarray, truth: np.ndarray, candidates: Sequence[float] = CANDIDATES) -> float:
    """The candidate threshold with the highest :func:`mean_f1` (ties: the one nearest 0.5)."""
    values = [(mean_f1(scores, truth, t), -abs(t - 0.5), t) for t in candidates]
    values = [v for v in values if not np.isnan(v[0])]
    if not values:
        return 0.5
    return float(max(values)[2])


def tag_quality(scores: np.ndarray, truth: np.ndarray, classes: Sequence[str], threshold: float) -> Dict[str, Any]:
    """Multi-label quality of ``scores`` ``[N, C]`` (pooled y_k) against ``truth`` ``[N, C]``
    (multi-hot tags) at ``threshold``.

    Returns ``{"images", "threshold", "mean_f1", "map", "best_threshold", "best_mean_f1",
    "per_class": {class: {"precision", "recall", "f1", "ap", "support"}}}``: foreground
    classes only; means over the classes that occur (``support`` > 0); precision is None
    for a class never predicted, AP None for a class that never occurs.
    """
    scores = np.asarray(scores, np.float64)
    truth = np.asarray(truth) > 0
    if scores.shape != truth.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} must both be [N, C]")
    fg_scores, fg_truth = scores[:, 1:], truth[:, 1:]
    tp, fp, fn = _counts(fg_scores, fg_truth, threshold)
    f1 = _f1(tp, fp, fn)
    per_class: Dict[str, Dict[str, Any]] = {}
    aps = []
    for k, name in enumerate(classes[1:]):
        support = int(fg_truth[:, k].sum())
        ap = average_precision(fg_scores[:, k], fg_truth[:, k])
        if ap is not None:
            aps.append(ap)
        per_class[name] = {
            "precision": float(tp[k] / (tp[k] + fp[k])) if tp[k] + fp[k] > 0 else None,
            "recall": float(tp[k] / support) if support else None,
            "f1": float(f1[k]),
            "ap": ap,
            "support": support,
        }
    best = best_threshold(scores, truth)
    return {
        "images": int(scores.shape[0]),
        "threshold": float(threshold),
        "mean_f1": mean_f1(scores, truth, threshold),
        "map": float(np.mean(aps)) if aps else None,
        "best_threshold": best,
        "best_mean_f1": mean_f1(scores, truth, best),
        "per_class": per_class,
    }
