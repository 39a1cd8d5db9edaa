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

The same check runs before training (:func:`check_before_training`). There, what reading an
item found is cached (:class:`CheckCache`, in ``~/.cache/vitpcm/screen/`` or
``$VITPCM_CACHE_DIR/screen/``), keyed by the item's files (path, size, mtime, ctime), its tags
and expected size, the class list and the check's own code: a second start on an unchanged
dataset decodes no image, and a changed file is read again. ``vitpcm check-data`` always
reads everything.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from vitpcm.atomic import write_text_atomic
from vitpcm.data import build_dataset
from vitpcm.data.base import ItemReport, Problem, TaggedImageDataset
from vitpcm.data.check_cache import CheckCache, check_cache_dir
from vitpcm.data.check_report import DataReport, SplitReport, format_report
from vitpcm.errors import VitpcmError
from vitpcm.io import format_names
from vitpcm.utils.system import resolve_workers

log = logging.getLogger(__name__)


def check_dataset(
    ds: TaggedImageDataset,
    role: str = "extra",
    workers: int = 0,
    progress: bool = True,
    cache: Optional[CheckCache] = None,
) -> SplitReport:
    """Read every item of ``ds`` once, in ``workers`` threads (0 = one per CPU; Pillow and
    numpy release the GIL while decoding), with a progress bar. With ``cache``, an item whose
    files, tags and expected size are unchanged since it was cached is not read again
    (``SplitReport.from_cache`` counts them); call ``cache.save()`` afterwards."""
    report = SplitReport(ds.split, role, ds.format, str(ds.root), list(ds.classes), ds.has_masks, info=list(ds.info))

    def one(i: int) -> ItemReport:
        if cache is None:
            return ds.inspect(i)[1]  # drop the sample at once: only the report is kept
        return cache.read(i)

    n = len(ds)
    # cache hits first, in this thread (a stat and a hash each: threads would only add overhead)
    found = {i: r for i in range(n) if (r := cache.lookup(i)) is not None} if cache is not None else {}
    todo = [i for i in range(n) if i not in found]
    items: Dict[int, ItemReport] = dict(found)
    bar = tqdm(total=n, desc=f"check {ds.split}", unit="img", disable=not progress)
    bar.update(len(found))
    try:
        if resolve_workers(workers) > 1 and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=resolve_workers(workers)) as pool:
                for i, item in zip(todo, pool.map(one, todo)):
                    items[i] = item
                    bar.update()
        else:
            for i in todo:
                items[i] = one(i)
                bar.update()
    finally:
        bar.close()
    report.items = [items[i] for i in range(n)]
    if cache is not None:
        report.from_cache = cache.hits
    return report


def open_split(data_cfg: Any, split: str, role: str) -> Tuple[Optional[TaggedImageDataset], Optional[str]]:
    """Open a split without stopping at listing problems; ``(None, message)`` if impossible."""
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


def check_items(
    dataset: TaggedImageDataset, names: Sequence[str], *, full: bool, progress: bool = True
) -> List[Tuple[str, str, str, str]]:
    """The check before an inference stage: read each of ``names`` of ``dataset`` once
    (``vitpcm check-data``'s check) and return its problems as ``(name, kind, path, message)``.
    ``full``: ``names`` is the whole split, so the screening cache is read and updated (a
    subset would shrink it)."""
    sub = copy.copy(dataset)
    sub.names = list(names)
    sub.transform = None
    cache = None
    if full:
        folder = check_cache_dir()
        cache = CheckCache(sub, folder) if folder is not None else None
    report = check_dataset(sub, "extra", 0, progress, cache=cache)
    if cache is not None:
        cache.save()
    return [(p.name, p.kind, p.path, p.message) for p in report.problems]


def check_before_training(
    datasets: Sequence[Optional[TaggedImageDataset]],
    run_dir: Path,
    skip_bad: bool,
    progress: bool = True,
    write: bool = True,
    workers: int = 0,
    cache: bool = True,
) -> List[Tuple[str, Problem]]:
    """The check before training. Without ``skip_bad``, broken data raises a
    :class:`VitpcmError` with one line per problem. With it, broken items are dropped from
    their dataset and listed in ``RUN/skipped.txt`` (``split<TAB>name<TAB>kind<TAB>path<TAB>reason``).

    ``cache``: reuse what earlier starts found for unchanged items (:class:`CheckCache`,
    in :func:`check_cache_dir`); only a process with ``write`` (rank 0) updates the file.
    Returns the skipped problems."""
    present = [ds for ds in datasets if ds is not None]
    folder = check_cache_dir() if cache else None
    reports = []
    for i, ds in enumerate(present):
        sc = CheckCache(ds, folder) if folder is not None else None
        t0 = time.perf_counter()
        reports.append(check_dataset(ds, "train" if i == 0 else "val", workers, progress, cache=sc))
        if sc is not None and write:  # rank 0 speaks and writes for all
            log.info("split %s: %d item(s) screened in %.1fs, %d unchanged since the last start (%s)", ds.split,
                     len(ds), time.perf_counter() - t0, sc.hits, sc.path)  # fmt: skip
            sc.save()
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


# the older names of the check (they said "screen"); kept for code that uses them
screen_items = check_items
screen_for_training = check_before_training
ScreenCache = CheckCache
screen_cache_dir = check_cache_dir

__all__ = [
    "CheckCache", "DataReport", "SplitReport", "check_before_training", "check_cache_dir", "check_config",
    "check_dataset", "check_items", "format_report", "open_split",
    "ScreenCache", "screen_cache_dir", "screen_for_training", "screen_items",
]  # fmt: skip
