"""Comparison tables of one or more evaluated folders: markdown, CSV and the files on disk.

Several prediction folders (BPM, CRF, DeepLab, ...) evaluated against one ground truth are
written as one table (:func:`write_evaluation`): CSV, markdown and JSON, plus each folder's
confusion matrix as ``.npy``. For the VOC and COCO class lists the table carries a
published ViT-PCM row (:mod:`vitpcm.evaluation.published`) and our difference to it.

No figures here (this package never imports matplotlib): the heat maps and IoU bars are
drawn by :func:`vitpcm.viz.figures.write_evaluation_figures`, and :func:`write_evaluation`
records their file names in ``metrics.json`` when it is given them.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vitpcm.atomic import atomic_path, write_json_atomic, write_text_atomic
from vitpcm.evaluation.confusion import ConfusionMatrix
from vitpcm.evaluation.published import VOC_SHORT, builtin_list_name

Table = Tuple[List[str], List[List[str]]]  # header, rows of cell texts


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join(":---" if i == 0 and align_first_left else "---:" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def overall_table(summaries: Mapping[str, Mapping[str, Any]]) -> Table:
    """mIoU, pixel accuracy, mean accuracy and fwIoU (percent, 2 decimals), a row per label."""
    rows = [[label, _pct(s["miou"], 2), _pct(s.get("pixel_acc"), 2), _pct(s.get("mean_acc"), 2), _pct(s.get("fw_iou"), 2)]
            for label, s in summaries.items()]  # fmt: skip
    return ["method", "mIoU", "pixel acc", "mean acc", "fwIoU"], rows


def comparison_tables(
    summaries: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    published: Optional[Mapping[str, Any]] = None,
    layout: str = "auto",
) -> Tuple[List[Table], Optional[str]]:
    """The tables of :func:`format_comparison` as ``(header, rows)`` pairs, and its note.

    ``summaries``: ``{label: ConfusionMatrix.summary(class_names)}``. The last table is
    the overall one (mIoU, pixel acc, mean acc, fwIoU).
    """
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
            ours = [summaries[lab]["miou"] if name == "mIoU" else _our_iou(summaries[lab], name) for lab in labels]
            row = [name, *(_pct(v) for v in ours)]
            if published:
                theirs = float(published["miou"]) / 100.0 if name == "mIoU" else _published_iou(published, name)
                row += [_pct(theirs), *(_diff(v, theirs) for v in ours)]
            rows.append(row)
        tables.append((header, rows))
    else:
        raise ValueError(f"layout must be auto, wide or long, got {layout!r}")
    tables.append(overall_table(summaries))
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
    parts = [markdown_table(header, rows) for header, rows in tables]
    if note:
        parts.append(note)
    return "\n\n".join(parts)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def full_tables(
    summaries: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    table: Mapping[str, Any],
    layout: str = "auto",
) -> Tuple[List[Table], str]:
    """The paper's whole Table S1 / S2 of one split with our rows inserted (``--compare all``).

    ``table``: :func:`vitpcm.evaluation.published_table`. The paper's rows keep the paper's
    order (and its groups); ours follow, then our difference to ViT-PCM's row (Δ). ``wide``
    (Table S1's layout, the default up to 25 classes): a row per method; ``long`` (Table S2's):
    a row per class, a column per method. The last table is the overall one. The note names
    the source and where each of our rows would rank by mIoU among the paper's.
    """
    labels = list(summaries)
    rows_p = list(table["rows"])
    vitpcm = table["vitpcm"]
    vit_miou = float(vitpcm["miou"]) / 100.0
    if layout == "auto":
        layout = "wide" if len(class_names) <= 25 else "long"
    tables: List[Table] = []
    if layout == "wide":
        short = VOC_SHORT if builtin_list_name(class_names) == "voc12" else {}
        header = ["method", "group", *(short.get(n, n) for n in class_names), "mIoU"]
        rows = [[r["method"], r["group"], *(_pct(_published_iou(r, n)) for n in class_names), _pct(float(r["miou"]) / 100)]
                for r in rows_p]  # fmt: skip
        for label in labels:
            s = summaries[label]
            rows.append([f"ours: {label}", "vitpcm", *(_pct(_our_iou(s, n)) for n in class_names), _pct(s["miou"])])
        for label in labels:
            s = summaries[label]
            rows.append([f"Δ {label} − {vitpcm['method']}", "", *(_diff(_our_iou(s, n), _published_iou(vitpcm, n))
                         for n in class_names), _diff(s["miou"], vit_miou)])  # fmt: skip
        tables.append((header, rows))
    elif layout == "long":
        header = ["class", *(r["method"] for r in rows_p), *(f"ours: {lab}" for lab in labels),
                  *(f"Δ {lab}" for lab in labels)]  # fmt: skip
        rows = []
        for name in [*class_names, "mIoU"]:
            theirs = [float(r["miou"]) / 100 if name == "mIoU" else _published_iou(r, name) for r in rows_p]
            ours = [summaries[lab]["miou"] if name == "mIoU" else _our_iou(summaries[lab], name) for lab in labels]
            ref = vit_miou if name == "mIoU" else _published_iou(vitpcm, name)
            rows.append([name, *(_pct(v) for v in theirs), *(_pct(v) for v in ours), *(_diff(v, ref) for v in ours)])
        tables.append((header, rows))
    else:
        raise ValueError(f"layout must be auto, wide or long, got {layout!r}")
    tables.append(overall_table(summaries))
    ranks = []
    for label in labels:
        miou = summaries[label]["miou"]
        if miou is None or math.isnan(miou):
            continue
        better = sum(1 for r in rows_p if float(r["miou"]) > round(100 * miou, 1))
        ranks.append(f"{label} {100 * miou:.1f} would rank {_ordinal(better + 1)} of {len(rows_p) + 1}")
    note = (f"Table {table['table']} of the ViT-PCM paper (supplementary), {table['classes']} {table['split']}:"
            f" {len(rows_p)} methods in the paper's order, each a DeepLabV2 trained on the method's pseudo-masks;"
            f" ours follow. Δ: ours minus {vitpcm['method']} ({vitpcm['id']}). By mIoU: {'; '.join(ranks) or '–'}.")  # fmt: skip
    return tables, note


def format_full_table(
    summaries: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    table: Mapping[str, Any],
    layout: str = "auto",
) -> str:
    """:func:`full_tables` as markdown text (what ``vitpcm evaluate --compare all`` prints)."""
    tables, note = full_tables(summaries, class_names, table, layout)
    return "\n\n".join([*(markdown_table(header, rows) for header, rows in tables), note])


def per_class_csv(
    summaries: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    published: Optional[Mapping[str, Any]] = None,
) -> str:
    """CSV text: one row per class (IoU in percent, empty = no value), then the overall metrics."""
    labels = list(summaries)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["class", *labels, *(["published", *(f"diff_{lab}" for lab in labels)] if published else [])]
    writer.writerow(header)

    def num(v: Optional[float]) -> str:
        return "" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    for name in class_names:
        ours = [_our_iou(summaries[lab], name) for lab in labels]
        row = [name, *(num(v) for v in ours)]
        if published:
            theirs = _published_iou(published, name)
            row += [num(theirs), *(num(None if v is None or theirs is None else v - theirs) for v in ours)]
        writer.writerow(row)
    for key in ("miou", "pixel_acc", "mean_acc", "fw_iou"):
        ours = [summaries[lab].get(key) for lab in labels]
        row = [key, *(num(v) for v in ours)]
        if published:
            theirs = float(published["miou"]) / 100.0 if key == "miou" else None
            row += [num(theirs), *(num(None if v is None or theirs is None else v - theirs) for v in ours)]
        writer.writerow(row)
    return buf.getvalue()


def confusion_stem(label: str) -> str:
    """File stem of a label's confusion matrix: ``confusion_<label>`` with a file-safe label."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "pred"
    return f"confusion_{safe}"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_evaluation(
    cms: Mapping[str, ConfusionMatrix],
    class_names: Sequence[str],
    out_dir: str | Path,
    published: Optional[Mapping[str, Any]] = None,
    figures: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Write the evaluation of one or more folders to ``out_dir``; returns what ``metrics.json`` holds.

    Files: ``metrics.json`` (every summary, the published row, the mIoU differences),
    ``per_class.csv``, ``per_class.md`` (:func:`format_comparison`), and per label
    ``confusion_<label>.npy`` (``[C, C]``: rows = ground truth, columns = prediction, pixel
    counts).

    ``figures``: the figures already drawn in ``out_dir``, as returned by
    :func:`vitpcm.viz.figures.write_evaluation_figures` (``{"confusion": {label:
    png name}, "iou_bars": png name}``); they are listed in ``metrics.json`` ``files``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = figures or {}
    summaries = {label: cm.summary(class_names) for label, cm in cms.items()}
    files: Dict[str, Any] = {"csv": "per_class.csv", "markdown": "per_class.md", "confusion": {}}
    for label, cm in cms.items():
        stem = confusion_stem(label)
        _save_npy_atomic(out_dir / f"{stem}.npy", cm.matrix)
        files["confusion"][label] = {"npy": f"{stem}.npy"}
        png = figures.get("confusion", {}).get(label)
        if png:
            files["confusion"][label]["png"] = png
    if figures.get("iou_bars"):
        files["iou_bars"] = figures["iou_bars"]
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
