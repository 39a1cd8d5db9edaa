"""Confusion matrix, IoU and the per-class tables; evaluation of folders of masks.

mIoU follows the authors (and deeplab-pytorch): the mean of the per-class IoU over the
classes that occur in the ground truth. Pixels labelled 255 in the ground truth are ignored.
Pixel accuracy, mean accuracy and frequency-weighted IoU are the authors' (deeplab-pytorch's)
definitions too (see :meth:`ConfusionMatrix.summary`).

Several prediction folders (BPM, CRF, DeepLab, ...) are evaluated against one ground truth
in one pass (:func:`evaluate_folders`) and written as one table (:func:`write_evaluation`):
CSV, markdown and JSON, plus each folder's confusion matrix as ``.npy`` and a PNG heat map.
For the VOC and COCO class lists the table carries a published ViT-PCM row
(``vitpcm/resources/published.json``, see ``docs/published.md``) and our difference to it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from vitpcm.errors import VitpcmError
from vitpcm.io import (
    IGNORE_INDEX,
    atomic_path,
    format_names,
    names_in,
    read_mask_png,
    read_names,
    write_json_atomic,
    write_text_atomic,
)


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
    return evaluate_folders({"pred": pred_dir}, gt_dir, class_names, names=names, progress=progress)["pred"]


GroundTruth = Union[str, Path, Callable[[str, Tuple[int, int]], np.ndarray]]


def evaluate_folders(
    preds: Mapping[str, str | Path],
    gt: GroundTruth,
    class_names: Sequence[str],
    names: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> Dict[str, ConfusionMatrix]:
    """Evaluate several prediction folders ``{label: folder}`` against one ground truth.

    ``gt`` is a folder of ``NAME.png`` masks, or a reader ``(name, (H, W)) -> [H, W]``
    uint8 mask (a dataset's ``read_mask``: COCO masks drawn from annotations, SBD .mat).
    Every folder is scored on the same names: ``names``, or else the PNGs of the first
    folder (the others must have them all). Each ground-truth mask is read once.
    """
    from tqdm import tqdm

    if not preds:
        raise VitpcmError("no prediction folder given")
    pred_dirs = {label: Path(folder) for label, folder in preds.items()}
    for label, folder in pred_dirs.items():
        if not folder.is_dir():
            raise VitpcmError(f"prediction folder {folder} not found")
    gt_dir = None if callable(gt) else Path(gt)
    if gt_dir is not None and not gt_dir.is_dir():
        raise VitpcmError(f"ground-truth folder {gt_dir} not found")
    if names is None:
        first = next(iter(pred_dirs.values()))
        names = names_in(first, ".png")
        if not names:
            raise VitpcmError(f"no PNG masks in {first}")
    for folder in pred_dirs.values():
        missing_pred = [n for n in names if not (folder / f"{n}.png").is_file()]
        if missing_pred:
            raise VitpcmError(f"{len(missing_pred)} prediction(s) missing from {folder}: {format_names(missing_pred)}")
    if gt_dir is not None:
        missing_gt = [n for n in names if not (gt_dir / f"{n}.png").is_file()]
        if missing_gt:
            raise VitpcmError(f"{len(missing_gt)} ground-truth mask(s) missing from {gt_dir}: {format_names(missing_gt)}")
    cms = {label: ConfusionMatrix(len(class_names)) for label in pred_dirs}
    for name in tqdm(names, desc="evaluate", unit="img", disable=not progress):
        preds_of = {label: read_mask_png(folder / f"{name}.png") for label, folder in pred_dirs.items()}
        if gt_dir is not None:
            truth = read_mask_png(gt_dir / f"{name}.png")
        else:
            truth = gt(name, next(iter(preds_of.values())).shape)  # type: ignore[operator]
        for label, folder in pred_dirs.items():
            pred = preds_of[label]
            if pred.shape != truth.shape:
                raise VitpcmError(
                    f"{folder / (name + '.png')} is {pred.shape[1]}x{pred.shape[0]} but its ground truth is"
                    f" {truth.shape[1]}x{truth.shape[0]}: predictions must be at the original image size"
                )
            try:
                cms[label].update(pred, truth)
            except ValueError as exc:
                raise VitpcmError(f"{folder / (name + '.png')}: {exc}; check --classes") from None
    return cms


def folder_labels(folders: Sequence[str]) -> Dict[str, Path]:
    """``{label: folder}`` from CLI values ``DIR`` or ``LABEL=DIR``.

    Default labels: ``bpm`` for a ``masks/`` folder (what ``vitpcm infer`` writes), else
    the folder name; a clash is resolved with the parent folder's name.
    """
    parsed: List[Tuple[Optional[str], Path]] = []
    for item in folders:
        label, sep, rest = str(item).partition("=")
        if sep and label and not Path(item).exists() and "/" not in label:
            parsed.append((label, Path(rest)))
        else:
            parsed.append((None, Path(item)))
    labels: Dict[str, Path] = {}
    for label, folder in parsed:
        if label is None:
            label = "bpm" if folder.name == "masks" else folder.name or str(folder)
            if label in labels:
                label = f"{folder.parent.name}/{label}"
        if label in labels:
            raise VitpcmError(f"two prediction folders are both labelled '{label}': name them as LABEL=DIR")
        labels[label] = folder
    return labels


# --- published numbers -------------------------------------------------------------------

VOC_SHORT = {
    "background": "bkg", "aeroplane": "aero", "bicycle": "bike", "diningtable": "table",
    "motorbike": "mbike", "pottedplant": "plant", "tvmonitor": "tv",
}  # fmt: skip  (the column heads of the paper's Table S1)


def load_published() -> Dict[str, Any]:
    """The published ViT-PCM rows shipped with the package (``resources/published.json``)."""
    path = Path(__file__).resolve().parent / "resources" / "published.json"
    return json.loads(path.read_text(encoding="utf-8"))


def builtin_list_name(class_names: Sequence[str]) -> Optional[str]:
    """``voc12`` / ``coco14`` when ``class_names`` is that built-in list, else None."""
    from vitpcm.io import BUILTIN_CLASS_LISTS, class_list

    for name in BUILTIN_CLASS_LISTS:
        if list(class_names) == class_list(name):
            return name
    return None


def published_row(class_names: Sequence[str], row_id: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The published row to show beside ours.

    ``row_id`` None: the default row for a VOC / COCO class list (Table S1 / S2), none for
    other lists; ``"none"``: no row; else the row with that id (its class list must match).
    """
    if row_id == "none":
        return None
    rows = load_published()["rows"]
    list_name = builtin_list_name(class_names)
    if row_id is None:
        return next((r for r in rows if r["classes"] == list_name and r.get("default")), None)
    row = next((r for r in rows if r["id"] == row_id), None)
    if row is None:
        raise VitpcmError(f"no published row '{row_id}': choose one of {', '.join(r['id'] for r in rows)} or none")
    if row["classes"] != list_name:
        raise VitpcmError(f"published row '{row_id}' is for the {row['classes']} classes, but --classes is not that list")
    return row


# --- tables ------------------------------------------------------------------------------


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def _our_iou(summary: Mapping[str, Any], name: str) -> Optional[float]:
    # a class that is not in the ground truth does not count in the mIoU: show no value
    if not summary.get("in_ground_truth", {}).get(name, True):
        return None
    return summary["iou"].get(name)


def _published_iou(published: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    if published is None:
        return None
    value = published.get("iou", {}).get(name)
    return None if value is None else float(value) / 100.0


def _diff(ours: Optional[float], theirs: Optional[float]) -> str:
    if ours is None or theirs is None:
        return "–"
    return f"{100 * (ours - theirs):+.1f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> str:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join(":---" if i == 0 and align_first_left else "---:" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


Table = Tuple[List[str], List[List[str]]]  # header, rows of cell texts


def comparison_tables(
    summaries: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    published: Optional[Mapping[str, Any]] = None,
    layout: str = "auto",
) -> Tuple[List[Table], Optional[str]]:
    """The tables of :func:`format_comparison` as ``(header, rows)`` pairs, and its note."""
    labels = list(summaries)
    if layout == "auto":
        layout = "wide" if len(class_names) <= 25 else "long"
    pub_name = f"published: {published['id']}" if published else None
    tables: List[Table] = []
    if layout == "wide":
        short = VOC_SHORT if builtin_list_name(class_names) == "voc12" else {}
        header = ["method", *(short.get(n, n) for n in class_names), "mIoU"]
        rows = []
        for label in labels:
            s = summaries[label]
            rows.append([label, *(_pct(_our_iou(s, n)) for n in class_names), _pct(s["miou"])])
        if published:
            pub_miou = float(published["miou"]) / 100.0
            rows.append([pub_name, *(_pct(_published_iou(published, n)) for n in class_names), _pct(pub_miou)])
            for label in labels:
                s = summaries[label]
                rows.append([f"Δ {label}", *(_diff(_our_iou(s, n), _published_iou(published, n)) for n in class_names),
                             _diff(s["miou"], pub_miou)])  # fmt: skip
        tables.append((header, rows))
    elif layout == "long":
        header = ["class", *labels]
        if published:
            header += [pub_name, *(f"Δ {label}" for label in labels)]
        rows = []
        for name in [*class_names, "mIoU"]:
            ours = [summaries[l]["miou"] if name == "mIoU" else _our_iou(summaries[l], name) for l in labels]
            row = [name, *(_pct(v) for v in ours)]
            if published:
                theirs = float(published["miou"]) / 100.0 if name == "mIoU" else _published_iou(published, name)
                row += [_pct(theirs), *(_diff(v, theirs) for v in ours)]
            rows.append(row)
        tables.append((header, rows))
    else:
        raise ValueError(f"layout must be auto, wide or long, got {layout!r}")
    overall = [[label, _pct(s["miou"], 2), _pct(s.get("pixel_acc"), 2), _pct(s.get("mean_acc"), 2), _pct(s.get("fw_iou"), 2)]
               for label, s in summaries.items()]  # fmt: skip
    tables.append((["method", "mIoU", "pixel acc", "mean acc", "fwIoU"], overall))
    note = None
    if published:
        has_per_class = any(_published_iou(published, n) is not None for n in class_names)
        note = f"published: {published['what']} ({published['source']}), mIoU {published['miou']:.2f}."
        if not has_per_class:
            note += " vitpcm has no published per-class values for it (docs/published.md): only the mIoU is compared."
    return tables, note


def format_comparison(
    summaries: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    published: Optional[Mapping[str, Any]] = None,
    layout: str = "auto",
) -> str:
    """Per-class IoU (percent) of one or more prediction folders as markdown tables.

    ``wide`` (the layout of the paper's Table S1; the default for up to 25 classes): one row
    per method, one column per class, mIoU last; the published row and our difference to
    it (Δ) follow. ``long`` (Table S2 style, the default for COCO's 81 classes): one row per
    class. Then a second table with mIoU, pixel accuracy, mean accuracy and fwIoU. "–"
    marks a class that is not in the ground truth (it does not count in the mIoU) or a
    published value that vitpcm does not have.
    """
    tables, note = comparison_tables(summaries, class_names, published, layout)
    parts = [_md_table(header, rows) for header, rows in tables]
    if note:
        parts.append(note)
    return "\n\n".join(parts)


def _safe(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "pred"


def per_class_csv(
    summaries: Mapping[str, Mapping[str, Any]], class_names: Sequence[str], published: Optional[Mapping[str, Any]] = None
) -> str:
    """CSV text: one row per class (IoU in percent, empty = no value), then the overall metrics."""
    labels = list(summaries)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["class", *labels, *(["published", *(f"diff_{l}" for l in labels)] if published else [])]
    writer.writerow(header)

    def num(v: Optional[float]) -> str:
        return "" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    for name in class_names:
        ours = [_our_iou(summaries[l], name) for l in labels]
        row = [name, *(num(v) for v in ours)]
        if published:
            theirs = _published_iou(published, name)
            row += [num(theirs), *(num(None if v is None or theirs is None else v - theirs) for v in ours)]
        writer.writerow(row)
    for key in ("miou", "pixel_acc", "mean_acc", "fw_iou"):
        ours = [summaries[l].get(key) for l in labels]
        row = [key, *(num(v) for v in ours)]
        if published:
            theirs = float(published["miou"]) / 100.0 if key == "miou" else None
            row += [num(theirs), *(num(None if v is None or theirs is None else v - theirs) for v in ours)]
        writer.writerow(row)
    return buf.getvalue()


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_evaluation(
    cms: Mapping[str, ConfusionMatrix],
    class_names: Sequence[str],
    out_dir: str | Path,
    published: Optional[Mapping[str, Any]] = None,
    figures: bool = True,
) -> Dict[str, Any]:
    """Write the evaluation of one or more folders to ``out_dir``; returns what ``metrics.json`` holds.

    Files: ``metrics.json`` (every summary, the published row, the mIoU differences),
    ``per_class.csv``, ``per_class.md`` (:func:`format_comparison`), and per label
    ``confusion_<label>.npy`` (rows = ground truth, columns = prediction, pixel counts)
    and with ``figures`` ``confusion_<label>.png`` and ``iou_bars.png``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {label: cm.summary(class_names) for label, cm in cms.items()}
    files: Dict[str, Any] = {"csv": "per_class.csv", "markdown": "per_class.md", "confusion": {}}
    for label, cm in cms.items():
        stem = f"confusion_{_safe(label)}"
        save_npy_atomic(out_dir / f"{stem}.npy", cm.matrix)
        files["confusion"][label] = {"npy": f"{stem}.npy"}
        if figures:
            from vitpcm.viz import plot_confusion

            plot_confusion(cm.matrix, class_names, out_dir / f"{stem}.png", title=f"{label}: confusion (row-normalised)")
            files["confusion"][label]["png"] = f"{stem}.png"
    if figures:
        from vitpcm.viz import plot_iou_bars

        plot_iou_bars(summaries, class_names, out_dir / "iou_bars.png", published=published)
        files["iou_bars"] = "iou_bars.png"
    write_text_atomic(out_dir / "per_class.csv", per_class_csv(summaries, class_names, published))
    write_text_atomic(out_dir / "per_class.md", format_comparison(summaries, class_names, published) + "\n")
    result = {
        "classes": list(class_names),
        "results": summaries,
        "published": dict(published) if published else None,
        "miou_minus_published": (
            {label: 100 * s["miou"] - float(published["miou"]) for label, s in summaries.items()} if published else None
        ),
        "files": files,
    }
    write_json_atomic(out_dir / "metrics.json", result)
    return result


def names_from_split_file(path: str | Path) -> List[str]:
    names = read_names(path)
    if not names:
        raise VitpcmError(f"split file {path} lists no images")
    return names
