"""``vitpcm check-data``: read every item once, report what is there and what is broken.

Broken (the item cannot be used; ``--skip-bad`` leaves it out of training):

* a name listed in a split whose image (or, where the split has masks, mask) is missing;
* an image that cannot be decoded, or is truncated (the whole file is decoded);
* a mask whose size differs from its image as displayed (after EXIF orientation);
* mask values outside the class list (other than 255 = ignore);
* an image without any tag: a tag-file row that names no class, an image with no row,
  or a class name not in the class list;
* a name that occurs twice (split list, tag file, two files ``a.jpg`` / ``a.png``);
* COCO: an image whose size differs from the annotation file's, an annotation whose
  category is unknown, a segmentation pycocotools cannot rasterise.

Not broken, converted silently and counted in the report: greyscale, palette, CMYK,
transparency, 16-bit, other format behind a ``.jpg`` name, EXIF orientation; and masks that
hold only background (kept: they still teach the background class).

The same check runs before training (:func:`screen_for_training`).
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm.data.base import ItemReport, Problem, SegmentationDataset
from vitpcm.errors import VitpcmError
from vitpcm.io import format_names, write_text_atomic
from vitpcm.utils.system import resolve_workers

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    """The result of checking one split. ``error`` is set when the split could not be
    opened at all (then ``items`` is empty)."""

    split: str
    role: str  # "train", "val" or "extra": how the config uses it
    format: str = ""
    root: str = ""
    classes: List[str] = field(default_factory=list)
    has_masks: bool = False
    items: List[ItemReport] = field(default_factory=list)
    info: List[str] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def problems(self) -> List[Problem]:
        return [p for item in self.items for p in item.problems]

    @property
    def broken(self) -> List[str]:
        return [item.name for item in self.items if item.problems]

    def class_counts(self) -> List[int]:
        """Images per class (background counts every image with tags)."""
        counts = [0] * len(self.classes)
        for item in self.items:
            if item.tags is not None and not item.problems:
                counts[0] += 1
                for c in item.tags:
                    counts[c] += 1
        return counts

    def to_dict(self) -> Dict[str, Any]:
        ok = [i for i in self.items if not i.problems]
        sizes = [i.size for i in ok if i.size]
        return {
            "split": self.split,
            "role": self.role,
            "format": self.format,
            "root": self.root,
            "error": self.error,
            "listed": len(self.items),
            "ok": len(ok),
            "broken": len(self.items) - len(ok),
            "has_masks": self.has_masks,
            "images_per_class": dict(zip(self.classes, self.class_counts())),
            "background_only": sum(i.background_only for i in ok),
            "sizes": _size_stats(sizes),
            "conversions": dict(Counter(n for i in self.items for n in i.notes)),
            "warnings": {i.name: i.warnings for i in self.items if i.warnings},
            "info": self.info,
            "problems": [{"name": p.name, "kind": p.kind, "path": p.path, "message": p.message} for p in self.problems],
        }


@dataclass
class DataReport:
    """All checked splits of one config, plus what concerns several splits."""

    splits: List[SplitReport]
    cross: List[str] = field(default_factory=list)  # e.g. names shared by train and val

    @property
    def ok(self) -> bool:
        return all(s.error is None and not s.problems for s in self.splits)

    def problem_lines(self) -> List[str]:
        lines = []
        for s in self.splits:
            if s.error:
                lines.append(f"[{s.split}] {s.error}")
            lines.extend(p.line(s.split) for p in s.problems)
        return lines

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "splits": [s.to_dict() for s in self.splits], "cross_split": self.cross}

    def format(self) -> str:
        return format_report(self)


def check_dataset(ds: SegmentationDataset, role: str = "extra", workers: int = 0, progress: bool = True) -> SplitReport:
    """Read every item of ``ds`` once, in ``workers`` threads (0 = one per CPU; Pillow and
    numpy release the GIL while decoding), with a progress bar."""
    from tqdm import tqdm

    report = SplitReport(ds.split, role, ds.format, str(ds.root), list(ds.classes), ds.has_masks, info=list(ds.info))

    def one(i: int) -> ItemReport:
        return ds.inspect(i)[1]  # drop the sample at once: only the report is kept

    n = len(ds)
    bar = tqdm(total=n, desc=f"check {ds.split}", unit="img", disable=not progress)
    try:
        if resolve_workers(workers) > 1 and n > 1:
            with ThreadPoolExecutor(max_workers=resolve_workers(workers)) as pool:
                for item in pool.map(one, range(n)):
                    report.items.append(item)
                    bar.update()
        else:
            for i in range(n):
                report.items.append(one(i))
                bar.update()
    finally:
        bar.close()
    return report


def open_split(data_cfg: Any, split: str, role: str) -> Tuple[Optional[SegmentationDataset], Optional[str]]:
    """Open a split without stopping at listing problems; ``(None, message)`` if impossible."""
    from vitpcm.data import build_dataset

    try:
        return build_dataset(data_cfg, split, require_masks=(role == "train"), strict=False), None
    except VitpcmError as exc:
        return None, str(exc)


def check_config(
    cfg: Any, splits: Optional[Sequence[str]] = None, workers: int = 0, progress: bool = True
) -> DataReport:
    """Check the splits a config trains and validates on (``data.train_split``,
    ``data.val_split``) plus ``splits``. Never raises for broken data: see ``DataReport.ok``."""
    roles: Dict[str, str] = {}
    if cfg.data.train_split:
        roles[cfg.data.train_split] = "train"
    if cfg.data.val_split:
        roles.setdefault(cfg.data.val_split, "val")
    for s in splits or ():
        roles.setdefault(s, "extra")
    if not cfg.data.root:
        raise VitpcmError("no dataset given: set data.root=PATH")
    if not Path(cfg.data.root).is_dir():
        raise VitpcmError(f"dataset folder {cfg.data.root} not found: set data.root to the dataset's folder")
    reports: List[SplitReport] = []
    name_sets: Dict[str, set] = {}
    for split, role in roles.items():
        ds, error = open_split(cfg.data, split, role)
        if ds is None:
            reports.append(SplitReport(split, role, str(cfg.data.format), str(cfg.data.root), error=error))
            continue
        reports.append(check_dataset(ds, role, workers, progress))
        name_sets[split] = set(ds.names)
    cross = []
    order = list(name_sets)
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            shared = sorted(name_sets[a] & name_sets[b])
            if shared and {roles[a], roles[b]} == {"train", "val"}:
                cross.append(f"{a} and {b} share {len(shared)} images ({format_names(shared)}):"
                             " the val score will flatter the model")  # fmt: skip
    return DataReport(reports, cross)


def _size_stats(sizes: Sequence[Tuple[int, int]]) -> Dict[str, Any]:
    if not sizes:
        return {}
    arr = np.asarray(sizes)
    common = Counter(f"{w}x{h}" for h, w in sizes).most_common(5)
    return {
        "height": {"min": int(arr[:, 0].min()), "median": float(np.median(arr[:, 0])), "max": int(arr[:, 0].max())},
        "width": {"min": int(arr[:, 1].min()), "median": float(np.median(arr[:, 1])), "max": int(arr[:, 1].max())},
        "most_common_wxh": dict(common),
    }


def format_report(report: DataReport) -> str:
    """The human-readable report ``vitpcm check-data`` prints."""
    out: List[str] = []
    first = next((s for s in report.splits if s.error is None), report.splits[0] if report.splits else None)
    if first is not None:
        out.append(f"dataset: {first.format} at {first.root}, {len(first.classes)} classes")
    out.append("")
    out.append(f"{'split':<12} {'role':<6} {'listed':>7} {'ok':>7} {'broken':>7}  masks")
    for s in report.splits:
        if s.error:
            out.append(f"{s.split:<12} {s.role:<6} {'-':>7} {'-':>7} {'-':>7}  cannot be opened")
            continue
        n_ok = sum(1 for i in s.items if not i.problems)
        masks = "yes" if s.has_masks else "no"
        out.append(f"{s.split:<12} {s.role:<6} {len(s.items):>7} {n_ok:>7} {len(s.items) - n_ok:>7}  {masks}")
    opened = [s for s in report.splits if s.error is None]
    if opened and any(any(i.tags is not None for i in s.items) for s in opened):
        classes = opened[0].classes
        width = max(len("class"), *(len(c) for c in classes))
        out += ["", "images per class (items without problems):"]
        out.append(f"  {'class':<{width}} " + " ".join(f"{s.split:>10}" for s in opened))
        # a split without tags (VOC test) shows "-", not zeros
        counts = [s.class_counts() if len(s.classes) == len(classes) and any(i.tags is not None for i in s.items)
                  else None for s in opened]  # fmt: skip
        for c, name in enumerate(classes):
            row = [cs[c] if cs is not None else None for cs in counts]
            flag = "   <- no image" if c > 0 and not any(row) else ""
            out.append(f"  {name:<{width}} " + " ".join(f"{'-' if v is None else v:>10}" for v in row) + flag)
    out += ["", "image sizes (as displayed):"]
    for s in opened:
        st = _size_stats([i.size for i in s.items if i.size and not i.problems])
        if not st:
            out.append(f"  {s.split}: no readable image")
            continue
        h, w = st["height"], st["width"]
        common = ", ".join(f"{k} ({v})" for k, v in st["most_common_wxh"].items())
        out.append(
            f"  {s.split}: height {h['min']}..{h['max']} (median {h['median']:g}), width {w['min']}..{w['max']}"
            f" (median {w['median']:g}); most common WxH: {common}"
        )
    notes: List[str] = []
    for s in opened:
        conv = Counter(n for i in s.items for n in i.notes)
        if conv:
            notes.append(
                f"{s.split}: converted on reading (fine): " + ", ".join(f"{k} {v}" for k, v in sorted(conv.items()))
            )
        bg = sum(1 for i in s.items if i.background_only and not i.problems)
        if bg:
            notes.append(f"{s.split}: {bg} masks hold only background (kept)")
        warned = [i for i in s.items if i.warnings]
        if warned:
            example = f"{warned[0].name}: {warned[0].warnings[0]}"
            notes.append(f"{s.split}: {len(warned)} items look odd but are usable, e.g. {example}")
        notes += [f"{s.split}: {line}" for line in s.info]
    notes += report.cross
    if notes:
        out += ["", "notes:"] + [f"  {n}" for n in notes]
    lines = report.problem_lines()
    out.append("")
    if lines:
        out.append(f"problems ({len(lines)}):")
        out += [f"  {line}" for line in lines]
        n_items = sum(len(s.broken) for s in opened)
        unopened = [s.split for s in report.splits if s.error]
        parts = []
        if n_items:
            parts.append(f"{n_items} item(s) cannot be used: fix them, or train with --skip-bad to leave them out")
        if unopened:
            parts.append(f"split(s) {', '.join(unopened)} cannot be opened: fix that first")
        out += ["", "BROKEN: " + "; ".join(parts)]
    else:
        out.append("OK: no problems")
    return "\n".join(out)


def screen_for_training(
    datasets: Sequence[Optional[SegmentationDataset]],
    run_dir: Path,
    skip_bad: bool,
    progress: bool = True,
    write: bool = True,
    workers: int = 0,
) -> List[Tuple[str, Problem]]:
    """The check before training. Without ``skip_bad``, broken data raises a
    :class:`VitpcmError` with one line per problem. With it, broken items are dropped from
    their dataset and listed in ``RUN/skipped.txt`` (``split<TAB>name<TAB>kind<TAB>path<TAB>reason``).
    Returns the skipped problems."""
    present = [ds for ds in datasets if ds is not None]
    reports = [check_dataset(ds, "train" if i == 0 else "val", workers, progress) for i, ds in enumerate(present)]
    problems = [(r.split, p) for r in reports for p in r.problems]
    if problems and not skip_bad:
        raise VitpcmError(
            f"{len(problems)} problem(s) in the data, training not started; fix them or pass --skip-bad to leave"
            " these items out:\n" + "\n".join(p.line(split) for split, p in problems)
        )
    if skip_bad and write:
        text = "".join(f"{split}\t{p.name}\t{p.kind}\t{p.path}\t{p.message}\n" for split, p in problems)
        write_text_atomic(Path(run_dir) / "skipped.txt", text)
    for ds, r in zip(present, reports):
        if r.broken:
            ds.drop(r.broken)
            log.warning("split %s: skipping %d broken item(s) of %d (list in %s)", r.split, len(r.broken), len(r.items),
                        Path(run_dir) / "skipped.txt")  # fmt: skip
        if len(ds) == 0:
            raise VitpcmError(
                f"every item of split '{r.split}' is broken: nothing left (see {Path(run_dir) / 'skipped.txt'})"
            )
    return problems
