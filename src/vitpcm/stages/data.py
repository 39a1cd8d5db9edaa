"""Data stages: write the synthetic set, check a dataset, prepare COCO masks.

``check_data`` and ``prepare`` read files only; ``synth`` renders images. None of them
trains anything, but the dataset classes they use live in :mod:`vitpcm.data` (torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig

from vitpcm.atomic import write_json_atomic
from vitpcm.data.check import check_config
from vitpcm.data.coco import prepare_coco
from vitpcm.data.synthetic import generate
from vitpcm.errors import VitpcmError


def synth(
    out: str | Path,
    *,
    n_train: int = 300,
    n_val: int = 100,
    seed: int = 0,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Write the built-in synthetic dataset (VOC layout) to ``out``.

    Returns ``root``, ``classes`` (the class-list file), ``train`` and ``val`` (counts)."""
    root = generate(
        out, n_train=n_train, n_val=n_val, seed=seed, workers=workers, overwrite=overwrite, progress=progress
    )
    return {"root": str(root), "classes": str(Path(root) / "classes.txt"), "train": n_train, "val": n_val}


def check_data(
    cfg: DictConfig,
    *,
    splits: Optional[Sequence[str]] = None,
    workers: int = 0,
    json_path: Optional[str | Path] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Read every item of the config's train and val splits (and ``splits``) once.

    Returns ``ok`` (no broken item), ``text`` (the report for a person), ``report`` (the
    JSON-ready dict, also written to ``json_path`` when given)."""
    report = check_config(cfg, splits=splits, workers=workers, progress=progress)
    result = {"ok": report.ok, "text": report.format(), "report": report.to_dict()}
    if json_path:
        write_json_atomic(json_path, result["report"])
        result["json"] = str(json_path)
    return result


def prepare(
    fmt: str,
    root: str | Path,
    *,
    out: Optional[str | Path] = None,
    splits: Sequence[str] = ("train", "val"),
    classes: Optional[str] = None,
    workers: int = 0,
    progress: bool = True,
    gt: str = "vitpcm",
) -> Dict[str, Dict[str, int]]:
    """Convert a dataset once so training reads it fast (``coco``: rasterise the masks;
    ``gt``: ``vitpcm`` or ``authors`` ground truth, as ``data.coco_gt``).

    Returns ``{split: {written, kept, failed, problems}}`` (+ ``dropped`` with ``authors``)."""
    if fmt != "coco":
        raise VitpcmError(f"vitpcm prepare knows the coco format only, got {fmt!r}")
    return prepare_coco(root, out=out, splits=splits, classes=classes, workers=workers, progress=progress, gt=gt)
