"""Evaluation of folders of masks: several prediction folders against one ground truth.

Predictions are ``NAME.png`` class-index masks (what ``vitpcm infer`` and ``vitpcm crf``
write) at the original image size. The ground truth is a folder of ``NAME.png`` masks or a
dataset's reader (COCO masks drawn from annotations, SBD ``.mat`` files). Which names are
scored: every PNG of the first folder, or a split file (:func:`names_from_split_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from vitpcm.classes import IGNORE_INDEX
from vitpcm.errors import VitpcmError
from vitpcm.evaluation.confusion import ConfusionMatrix
from vitpcm.io import format_names, names_in, read_mask_png, read_names

GroundTruth = Union[str, Path, Callable[[str, Tuple[int, int]], np.ndarray]]


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


def evaluate_folders(
    preds: Mapping[str, str | Path],
    gt: GroundTruth,
    class_names: Sequence[str],
    names: Optional[Sequence[str]] = None,
    progress: bool = True,
    image_scores: Optional[Dict[str, Dict[str, Dict[str, Any]]]] = None,
) -> Dict[str, ConfusionMatrix]:
    """Evaluate several prediction folders ``{label: folder}`` against one ground truth.

    ``gt`` is a folder of ``NAME.png`` masks, or a reader ``(name, (H, W)) -> [H, W]``
    uint8 mask (a dataset's ``read_mask``: COCO masks drawn from annotations, SBD .mat).
    Every folder is scored on the same names: ``names``, or else the PNGs of the first
    folder (the others must have them all). Each ground-truth mask is read once.

    ``image_scores``: a dict to fill with each image's own score, ``{label: {name: {"miou":
    mIoU of that image alone (over the classes in its ground truth; NaN when all ignore),
    "gt_classes": [class indices in its ground truth]}}}`` (the report picks its best images
    with it).

    Returns ``{label: ConfusionMatrix}`` (``[C, C]``, C = ``len(class_names)``).
    """
    from tqdm import tqdm  # lazy (~50 ms): `vitpcm crf` imports this package, and only evaluating needs tqdm

    if not preds:
        raise VitpcmError("no prediction folder given")
    pred_dirs = {label: Path(folder) for label, folder in preds.items()}
    for folder in pred_dirs.values():
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
            raise VitpcmError(
                f"{len(missing_gt)} ground-truth mask(s) missing from {gt_dir}: {format_names(missing_gt)}"
            )
    cms = {label: ConfusionMatrix(len(class_names)) for label in pred_dirs}
    for name in tqdm(names, desc="evaluate", unit="img", disable=not progress):
        preds_of = {label: read_mask_png(folder / f"{name}.png") for label, folder in pred_dirs.items()}
        if gt_dir is not None:
            truth = read_mask_png(gt_dir / f"{name}.png")
        else:
            truth = gt(name, next(iter(preds_of.values())).shape)  # type: ignore[operator]
        _check_truth_values(truth, len(class_names), gt_dir / f"{name}.png" if gt_dir is not None else None, name)
        for label, folder in pred_dirs.items():
            pred = preds_of[label]
            if pred.shape != truth.shape:
                raise VitpcmError(
                    f"{folder / (name + '.png')} is {pred.shape[1]}x{pred.shape[0]} but its ground truth is"
                    f" {truth.shape[1]}x{truth.shape[0]}: predictions must be at the original image size"
                )
            # per image only when asked: one more bincount-sized matrix per image
            cm = ConfusionMatrix(len(class_names)) if image_scores is not None else cms[label]
            try:
                cm.update(pred, truth)
            except ValueError as exc:
                raise VitpcmError(f"{folder / (name + '.png')}: {exc}; check --classes") from None
            if image_scores is not None:
                cms[label].merge(cm)
                image_scores.setdefault(label, {})[name] = {
                    "miou": cm.miou(),
                    "gt_classes": np.flatnonzero(cm.present()).tolist(),
                }
    return cms


def _check_truth_values(truth: np.ndarray, num_classes: int, path: Optional[Path], name: str) -> None:
    """A ground-truth value beyond the class list is the ground truth's (or the list's)
    fault: name that file, not the prediction compared with it."""
    top = int(truth[truth != IGNORE_INDEX].max(initial=0))
    if top >= num_classes:
        where = str(path) if path is not None else f"the ground truth of {name}"
        raise VitpcmError(
            f"{where}: ground-truth value {top} outside the {num_classes} classes of the class list;"
            " give the class list the ground truth was made with (--classes)"
        )


def names_from_split_file(path: str | Path) -> List[str]:
    """The item names of a split list (:func:`vitpcm.io.read_names`); an empty list is an error."""
    names = read_names(path)
    if not names:
        raise VitpcmError(f"split file {path} lists no images")
    return names
