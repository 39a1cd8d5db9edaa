"""The run folder: every path under a run, in one place, and its ``metrics.jsonl``.

A run folder (``vitpcm train --out RUN``) holds::

    config.yaml               the resolved config
    classes.txt               the class list the model was trained with
    skipped.txt               with --skip-bad: the items left out
    .lock                     PID and host of the process training it (one writer at a time)
    checkpoints/last.pt       every epoch (and train.checkpoint_every steps); best.pt: best val mIoU
    logs/metrics.jsonl        one JSON object per epoch; logs/events.*: TensorBoard
    logs/resumes.jsonl        one JSON object per --resume (position, changed keys)
    pseudo/SPLIT/masks/       BPM palette PNGs; probs/NAME.npz; crf/NAME.png; summary.json
    predict/                  `vitpcm predict` without --out (see PredictLayout)
    eval/SPLIT/               per_class.csv/.md, metrics.json, confusion_*.npy/.png;
                              tags.json: how well the pooled scores tell the tags (`vitpcm infer`);
                              per_image.csv: each image's own mIoU (`vitpcm report`)
                              verification/ the same for BPM / CRF / DeepLab (report --segment)
    figures/                  training_curves.png, SPLIT/NAME_*.png
    report.html               the run report

Nothing else in the package spells these names: ask a :class:`RunLayout`. This module
imports neither torch nor numpy (the CLI's light commands use it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from vitpcm.errors import VitpcmError

PathLike = Union[str, Path]


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder ``root``. Creating the object touches no file."""

    root: Path

    def __init__(self, root: PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # --- files at the top -------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def classes(self) -> Path:
        return self.root / "classes.txt"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.txt"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def lock(self) -> Path:
        """``.lock``: PID and host of the process writing the run (one writer at a time)."""
        return self.root / ".lock"

    # --- checkpoints and logs ---------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, which: str = "last") -> Path:
        """``checkpoints/<which>.pt`` (``last`` or ``best``)."""
        return self.checkpoints / f"{which}.pt"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        return self.logs / "metrics.jsonl"

    @property
    def resumes(self) -> Path:
        """``logs/resumes.jsonl``: one JSON object per ``--resume``: when, from where, what changed."""
        return self.logs / "resumes.jsonl"

    # --- per-split outputs ------------------------------------------------------------
    def pseudo(self, split: str) -> Path:
        """``pseudo/SPLIT``: what ``vitpcm infer`` writes (see :class:`PseudoLayout`)."""
        return self.pseudo_root / split

    def pseudo_splits(self) -> List[str]:
        """Splits that have BPM masks, sorted."""
        return sorted(p.parent.name for p in self.pseudo_root.glob("*/masks") if p.is_dir())

    def eval(self, split: str) -> Path:
        return self.eval_root / split

    def tag_quality(self, split: str) -> Path:
        """``eval/SPLIT/tags.json``: the multi-label quality of the pooled class scores on a
        split with known tags, and the threshold with the best mean F1 (``vitpcm infer``
        writes it; ``vitpcm predict`` takes its default threshold from the val split's)."""
        return self.eval(split) / "tags.json"

    def per_image(self, split: str) -> Path:
        """``eval/SPLIT/per_image.csv``: every image's own mIoU per mask folder (``vitpcm report``)."""
        return self.eval(split) / "per_image.csv"

    def verification(self, split: str) -> Path:
        """``eval/SPLIT/verification``: ``vitpcm report --segment``'s BPM / CRF / DeepLab evaluation."""
        return self.eval(split) / "verification"

    @property
    def predict(self) -> Path:
        """``predict/``: the default output folder of ``vitpcm predict`` (:class:`PredictLayout`)."""
        return self.root / "predict"

    @property
    def pseudo_root(self) -> Path:
        """``pseudo/``: one folder per split (the report links it)."""
        return self.root / "pseudo"

    @property
    def eval_root(self) -> Path:
        """``eval/``: one folder per split (the report links it)."""
        return self.root / "eval"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def training_curves(self) -> Path:
        """``figures/training_curves.png`` (drawn by ``vitpcm report``)."""
        return self.figures / "training_curves.png"

    # --- checks -----------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.config.is_file()

    def require(self) -> "RunLayout":
        """This layout, or a clear error when ``root`` is not a run folder."""
        if not self.root.is_dir():
            raise VitpcmError(f"run folder {self.root} not found: give the --out folder of `vitpcm train`")
        if not self.is_run():
            raise VitpcmError(
                f"{self.root} is not a run folder (no config.yaml): give the --out folder of `vitpcm train`"
            )
        return self

    # --- metrics.jsonl ----------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Add one JSON line to ``logs/metrics.jsonl``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(row)) + "\n")

    def read_metrics(self) -> List[Dict[str, Any]]:
        """The rows of ``logs/metrics.jsonl`` ([] when absent; a torn last line of a killed
        run is skipped)."""
        return read_metrics_file(self.metrics)

    def truncate_metrics(self, keep_epochs: int, key: str = "epoch") -> None:
        """On resume: keep the rows whose ``key`` is at most ``keep_epochs``."""
        from vitpcm.atomic import write_text_atomic  # lazy: atomic imports numpy, this module must not

        if not self.metrics.is_file():
            return
        kept = [row for row in self.read_metrics() if row.get(key, 0) <= keep_epochs]
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))


@dataclass(frozen=True)
class PseudoLayout:
    """Paths of one ``pseudo/SPLIT`` folder (or any ``vitpcm infer --out`` folder)."""

    root: Path

    def __init__(self, root: PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def probs(self) -> Path:
        return self.root / "probs"

    @property
    def crf(self) -> Path:
        return self.root / "crf"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def confusion(self) -> Path:
        return self.root / "confusion.npy"

    @property
    def skipped(self) -> Path:
        """``skipped.txt``: with ``vitpcm infer --skip-bad``, the items left out (as the run's)."""
        return self.root / "skipped.txt"


@dataclass(frozen=True)
class PredictLayout(PseudoLayout):
    """Paths of a ``vitpcm predict`` output folder: :class:`PseudoLayout`'s ``masks/``,
    ``probs/``, ``crf/``, ``summary.json``, ``skipped.txt``, plus ``overlays/NAME.jpg`` and
    ``predictions.jsonl`` (one JSON object per image)."""

    def __init__(self, root: PathLike) -> None:
        super().__init__(root)

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @property
    def records(self) -> Path:
        """``predictions.jsonl``: per image its classes, scores, kept tags, pixel shares, size, time."""
        return self.root / "predictions.jsonl"


def read_metrics_file(path: PathLike) -> List[Dict[str, Any]]:
    """JSON lines of a metrics file; unreadable lines (a torn last write) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def run_of_checkpoint(path: PathLike) -> Optional[RunLayout]:
    """The run a checkpoint file belongs to (``RUN/checkpoints/X.pt`` -> RUN), else None."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        return RunLayout(path.parent.parent)
    return None
