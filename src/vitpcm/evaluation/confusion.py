"""Confusion matrix and the scores computed from it (numpy only).

mIoU follows the authors (and deeplab-pytorch): the mean of the per-class IoU over the
classes that occur in the ground truth. Pixels labelled 255 in the ground truth are ignored.
Pixel accuracy, mean accuracy and frequency-weighted IoU are the authors' (deeplab-pytorch's)
definitions too (see :meth:`ConfusionMatrix.summary`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm.classes import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a ``[C, C]`` int64 matrix; rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image (or a batch): ``pred`` and ``gt`` integer arrays of the same shape."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
        keep = gt != IGNORE_INDEX
        p = pred[keep].astype(np.int64)
        g = gt[keep].astype(np.int64)
        c = self.num_classes
        if g.size and (g.max() >= c or g.min() < 0):
            raise ValueError(f"ground truth value {int(g.max())} outside the {c} classes")
        if p.size and (p.max() >= c or p.min() < 0):
            raise ValueError(f"predicted value {int(p.max())} outside the {c} classes")
        self.matrix += np.bincount(g * c + p, minlength=c * c).reshape(c, c)

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add another matrix of the same classes (e.g. from another process)."""
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        """Per-class IoU ``[C]``; NaN for classes absent from both prediction and ground truth."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def present(self) -> np.ndarray:
        """``[C]`` bool: classes with ground-truth pixels (those that count in the mean)."""
        return self.matrix.sum(1) > 0

    def miou(self) -> float:
        """Mean IoU over the classes in the ground truth; NaN when nothing was counted."""
        iou = self.iou()
        valid = self.present()
        return float(np.nanmean(iou[valid])) if valid.any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct pixels / all counted pixels."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall ``[C]``: correct / ground-truth pixels; NaN where a class has none."""
        m = self.matrix.astype(np.float64)
        rows = m.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows > 0, np.diag(m) / rows, np.nan)

    def mean_accuracy(self) -> float:
        """Mean of :meth:`class_accuracy` over the classes in the ground truth."""
        acc = self.class_accuracy()
        valid = self.present()
        return float(np.mean(acc[valid])) if valid.any() else float("nan")

    def fw_iou(self) -> float:
        """Frequency-weighted IoU: sum over classes of (ground-truth share) x IoU."""
        total = self.matrix.sum()
        if not total:
            return float("nan")
        freq = self.matrix.sum(1) / total
        valid = freq > 0
        return float((freq[valid] * self.iou()[valid]).sum())

    def summary(self, class_names: Sequence[str]) -> Dict[str, object]:
        """A JSON-ready dict (fractions, not percent).

        ``miou``, ``pixel_acc``, ``mean_acc``, ``fw_iou``; ``iou`` and ``accuracy``
        {name: value or None (None: class in neither prediction nor ground truth, resp. not
        in the ground truth)}; ``in_ground_truth`` {name: bool}; ``pixels`` counted.
        """
        iou = self.iou()
        acc = self.class_accuracy()
        present = self.present()
        return {
            "miou": self.miou(),
            "pixel_acc": self.pixel_accuracy(),
            "mean_acc": self.mean_accuracy(),
            "fw_iou": self.fw_iou(),
            "iou": {name: _none_if_nan(v) for name, v in zip(class_names, iou)},
            "accuracy": {name: _none_if_nan(v) for name, v in zip(class_names, acc)},
            "in_ground_truth": {name: bool(p) for name, p in zip(class_names, present)},
            "pixels": int(self.matrix.sum()),
        }


def _none_if_nan(value: float) -> Optional[float]:
    return None if math.isnan(value) else float(value)


def confused_pairs(matrix: np.ndarray, k: int = 5) -> List[Tuple[int, int, float, int]]:
    """The ``k`` most confused class pairs of a confusion matrix ``[C, C]`` (rows: ground
    truth, columns: prediction): ``(true class, predicted class, share of the true class's
    pixels predicted as the other, pixel count)``, largest share first; pairs with no pixel
    are left out."""
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(1, keepdims=True)
    share = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    np.fill_diagonal(share, 0.0)
    order = np.argsort(-share, axis=None, kind="stable")
    pairs = []
    for flat in order[:k]:
        g, p = divmod(int(flat), m.shape[1])
        if share[g, p] <= 0:
            break
        pairs.append((g, p, float(share[g, p]), int(m[g, p])))
    return pairs
