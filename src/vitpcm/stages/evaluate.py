"""Stage ``evaluate``: score one or more folders of masks against one ground truth.

``vitpcm evaluate --pred [LABEL=]DIR ... --gt DIR --classes LIST [--out DIR] [--json FILE]``
is one call of :func:`evaluate`. numpy / PIL only: no torch, no timm; matplotlib is
imported only when ``out`` asks for the figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from vitpcm.atomic import write_json_atomic
from vitpcm.classes import class_list
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import (
    ConfusionMatrix,
    GroundTruth,
    evaluate_folders,
    format_comparison,
    format_full_table,
    names_from_split_file,
    published_row,
    published_table,
    write_evaluation,
)
from vitpcm.viz.figures import write_evaluation_figures

PathLike = Union[str, "os.PathLike[str]"]


def folder_labels(folders: Sequence[PathLike]) -> Dict[str, Path]:
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


def write_evaluation_files(
    cms: Mapping[str, ConfusionMatrix],
    class_names: Sequence[str],
    out_dir: PathLike,
    published: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Everything an evaluation folder holds: the figures (confusion heat maps, IoU bars;
    matplotlib) and the tables (:func:`vitpcm.evaluation.write_evaluation`). Returns what
    ``metrics.json`` holds. ``vitpcm evaluate --out`` and ``vitpcm report`` both write this."""
    figures = write_evaluation_figures(cms, class_names, out_dir, published=published)
    return write_evaluation(cms, class_names, out_dir, published=published, figures=figures)


def _classes(classes: Union[PathLike, Sequence[str]]) -> List[str]:
    if isinstance(classes, (str, os.PathLike)):
        return class_list(classes)
    return [str(c) for c in classes]


def evaluate(
    preds: Union[Sequence[PathLike], Mapping[str, PathLike]],
    gt: GroundTruth,
    classes: Union[PathLike, Sequence[str]],
    *,
    split_file: Optional[PathLike] = None,
    names: Optional[Sequence[str]] = None,
    out: Optional[PathLike] = None,
    json_path: Optional[PathLike] = None,
    compare: Optional[str] = None,
    split_name: Optional[str] = None,
    layout: str = "auto",
    progress: bool = True,
) -> Dict[str, Any]:
    """Evaluate prediction folders against one ground truth; write the files asked for.

    Args:
        preds: ``[LABEL=]DIR`` values (labels as :func:`folder_labels` makes them) or a
            mapping ``{label: folder}``; folders of ``NAME.png`` class-index masks.
        gt: folder of ground-truth ``NAME.png`` masks (255 = ignore), or a reader
            ``(name, (H, W)) -> [H, W]`` uint8 mask.
        classes: class list file, ``voc12`` / ``coco14``, or the list of names.
        split_file: score only the names in this list (``names`` gives them directly);
            default every PNG of the first folder.
        out: folder for ``metrics.json``, ``per_class.csv`` / ``.md``,
            ``confusion_<label>.npy`` / ``.png`` and ``iou_bars.png``.
        json_path: also write the summaries as JSON here (one folder: its summary; several:
            ``{label: summary}``).
        compare: published row id beside ours (default: ViT-PCM's Table S1 / S2 row for
            the voc12 / coco14 lists; ``none``: no row); ``all``: the paper's whole Table
            S1 / S2 of the split, in the paper's order, with ours added after it (the files
            get ViT-PCM's row).
        split_name: which split of the paper's tables (``val``, ``test`` for VOC); default
            the published row's (val).
        layout: ``auto``, ``wide`` (a row per method) or ``long`` (a row per class).

    Returns ``{"table": markdown text to print, "summaries": {label: summary}, "classes",
    "published": row or None, "published_table": the paper's table (``compare="all"``) or
    None, "out": str or None, "json": str or None, "written": [file paths], "evaluation":
    what metrics.json holds or None}``.
    """
    class_names = _classes(classes)
    if split_file is not None and names is None:
        names = names_from_split_file(split_file)
    folders = dict(preds) if isinstance(preds, Mapping) else folder_labels(list(preds))
    # the published rows are checked before the (long) evaluation
    whole = published_table(class_names, split_name) if compare == "all" else None
    published = whole["vitpcm"] if whole else published_row(class_names, compare, split_name)
    cms = evaluate_folders(folders, gt, class_names, names=names, progress=progress)
    summaries = {label: cm.summary(class_names) for label, cm in cms.items()}
    if whole:
        table = format_full_table(summaries, class_names, whole, layout=layout)
    else:
        table = format_comparison(summaries, class_names, published, layout=layout)
    written: List[str] = []
    evaluation = None
    if out is not None:
        evaluation = write_evaluation_files(cms, class_names, out, published=published)
        files = evaluation["files"]
        names_written = ["metrics.json", files["csv"], files["markdown"]]
        for entry in files["confusion"].values():
            names_written += [entry["npy"], *([entry["png"]] if "png" in entry else [])]
        if files.get("iou_bars"):
            names_written.append(files["iou_bars"])
        written += [str(Path(out) / n) for n in names_written]
    if json_path is not None:
        # one folder: its summary (as before); several: {label: summary}
        write_json_atomic(json_path, next(iter(summaries.values())) if len(summaries) == 1 else summaries)
        written.append(str(json_path))
    return {
        "table": table,
        "summaries": summaries,
        "classes": class_names,
        "published": published,
        "published_table": whole,
        "out": str(out) if out is not None else None,
        "json": str(json_path) if json_path is not None else None,
        "written": written,
        "evaluation": evaluation,
    }
