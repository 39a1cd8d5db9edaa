"""Confusion matrix, IoU and the per-class table; evaluation of a folder of masks.

mIoU follows the authors (and deeplab-pytorch): the mean of the per-class IoU over the
classes that occur in the ground truth. Pixels labelled 255 in the ground truth are ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from vitpcm.errors import VitpcmError
from vitpcm.io import IGNORE_INDEX, format_names, read_mask_png, read_names


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
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        """Per-class IoU ``[C]``; NaN for classes absent from both prediction and ground truth."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def present(self) -> np.ndarray:
        """Classes with ground-truth pixels (those that count in the mean)."""
        return self.matrix.sum(1) > 0

    def miou(self) -> float:
        iou = self.iou()
        valid = self.present()
        return float(np.nanmean(iou[valid])) if valid.any() else float("nan")

    def summary(self, class_names: Sequence[str]) -> Dict[str, object]:
        """A JSON-ready dict: ``miou`` (fraction), ``iou`` {name: value or None}, pixel counts."""
        iou = self.iou()
        present = self.present()
        return {
            "miou": self.miou(),
            "iou": {name: (None if math.isnan(v) else float(v)) for name, v in zip(class_names, iou)},
            "in_ground_truth": {name: bool(p) for name, p in zip(class_names, present)},
            "pixels": int(self.matrix.sum()),
        }


def format_table(summary: Dict[str, object], class_names: Sequence[str], title: str = "IoU") -> str:
    """A plain-text per-class table with the mIoU as the last row (percent)."""
    iou: Dict[str, Optional[float]] = summary["iou"]  # type: ignore[assignment]
    present: Dict[str, bool] = summary.get("in_ground_truth", {})  # type: ignore[assignment]
    width = max(len("mIoU"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {title:>7}", "-" * (width + 9)]
    for name in class_names:
        value = iou.get(name)
        text = "    n/a" if value is None else f"{100 * value:7.2f}"
        if value is not None and not present.get(name, True):
            text += "  (not in ground truth)"
        lines.append(f"{name:<{width}}  {text}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * float(summary['miou']):7.2f}")  # type: ignore[arg-type]
    return "\n".join(lines)


def evaluate_folder(
    pred_dir: str | Path,
    gt_dir: str | Path,
    class_names: Sequence[str],
    names: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> ConfusionMatrix:
    """Compare ``pred_dir/NAME.png`` with ``gt_dir/NAME.png`` for every name.

    ``names`` default to the PNGs in ``pred_dir``. A missing file, a size mismatch or a
    value outside the class list raises :class:`VitpcmError` naming the file.
    """
    from tqdm import tqdm

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for label, folder in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not folder.is_dir():
            raise VitpcmError(f"{label} folder {folder} not found")
    if names is None:
        names = sorted(p.stem for p in pred_dir.glob("*.png"))
        if not names:
            raise VitpcmError(f"no PNG masks in {pred_dir}")
    missing_pred = [n for n in names if not (pred_dir / f"{n}.png").is_file()]
    if missing_pred:
        raise VitpcmError(f"{len(missing_pred)} prediction(s) missing from {pred_dir}: {format_names(missing_pred)}")
    missing_gt = [n for n in names if not (gt_dir / f"{n}.png").is_file()]
    if missing_gt:
        raise VitpcmError(f"{len(missing_gt)} ground-truth mask(s) missing from {gt_dir}: {format_names(missing_gt)}")
    cm = ConfusionMatrix(len(class_names))
    for name in tqdm(names, desc="evaluate", unit="img", disable=not progress):
        pred = read_mask_png(pred_dir / f"{name}.png")
        gt = read_mask_png(gt_dir / f"{name}.png")
        if pred.shape != gt.shape:
            raise VitpcmError(
                f"{pred_dir / (name + '.png')} is {pred.shape[1]}x{pred.shape[0]} but its ground truth is"
                f" {gt.shape[1]}x{gt.shape[0]}: predictions must be at the original image size"
            )
        try:
            cm.update(pred, gt)
        except ValueError as exc:
            raise VitpcmError(f"{name}.png: {exc}; check --classes") from None
    return cm


def names_from_split_file(path: str | Path) -> List[str]:
    names = read_names(path)
    if not names:
        raise VitpcmError(f"split file {path} lists no images")
    return names
