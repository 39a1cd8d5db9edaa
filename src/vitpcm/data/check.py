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

The same check runs before training (:func:`screen_for_training`). There, what reading an
item found is cached (:class:`ScreenCache`, in ``~/.cache/vitpcm/screen/`` or
``$VITPCM_CACHE_DIR/screen/``), keyed by the item's files (path, size, mtime, ctime), its tags
and expected size, the class list and the check's own code: a second start on an unchanged
dataset decodes no image, and a changed file is read again. ``vitpcm check-data`` always
reads everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm.atomic import write_text_atomic
from vitpcm.data.base import ItemReport, Problem, SegmentationDataset
from vitpcm.errors import VitpcmError
from vitpcm.io import format_names
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
    from_cache: int = 0  # items whose result came from the screening cache (no file read)

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


def check_dataset(
    ds: SegmentationDataset,
    role: str = "extra",
    workers: int = 0,
    progress: bool = True,
    cache: Optional["ScreenCache"] = None,
) -> SplitReport:
    """Read every item of ``ds`` once, in ``workers`` threads (0 = one per CPU; Pillow and
    numpy release the GIL while decoding), with a progress bar. With ``cache``, an item whose
    files, tags and expected size are unchanged since it was cached is not read again
    (``SplitReport.from_cache`` counts them); call ``cache.save()`` afterwards."""
    from tqdm import tqdm

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


# ---------------------------------------------------------------------------- screening cache
CACHE_ENV = "VITPCM_CACHE_DIR"  # where the cache lives (its screen/ subfolder); off / none / 0 = no cache
CACHE_FORMAT = 2  # bump when the file layout below changes
CACHE_MAX_AGE_DAYS = 60  # cache files untouched this long are removed when another one is written
_CODE_FILES = ("data/base.py", "images.py", "io.py", "classes.py")  # the code whose verdicts are cached


def screen_cache_dir() -> Optional[Path]:
    """The folder of screening cache files: ``$VITPCM_CACHE_DIR/screen``, else
    ``$XDG_CACHE_HOME/vitpcm/screen``, else ``~/.cache/vitpcm/screen``; None when
    ``VITPCM_CACHE_DIR`` is ``off`` (or ``none``, ``0``, empty)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        if value.strip().lower() in ("", "0", "off", "none", "false", "no"):
            return None
        return Path(value).expanduser() / "screen"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vitpcm" / "screen"


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_key(path: Optional[Path]) -> Optional[List[Any]]:
    """``[path, size, mtime_ns, ctime_ns]``; ``[path, None]`` for a file that cannot be stat'ed."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _code_fingerprint(ds: SegmentationDataset) -> str:
    """Hash of the source that decides an item's verdict (base, images, io and the format's
    module): a vitpcm update that changes the check invalidates the cache by itself."""
    import inspect

    package = Path(__file__).resolve().parents[1]
    files = [package / f for f in _CODE_FILES]
    try:
        files.append(Path(inspect.getfile(type(ds))))
    except (TypeError, OSError):
        pass
    h = hashlib.sha1()
    for f in files:
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(str(f).encode())
    return h.hexdigest()


def _report_to_json(r: ItemReport) -> Dict[str, Any]:
    return {
        "size": list(r.size) if r.size else None,
        "tags": list(r.tags) if r.tags is not None else None,
        "bg": r.background_only,
        "problems": [[p.kind, p.path, p.message] for p in r.problems],
        "notes": list(r.notes),
        "warnings": list(r.warnings),
    }


def _report_from_json(name: str, d: Dict[str, Any]) -> ItemReport:
    return ItemReport(
        name,
        size=tuple(d["size"]) if d["size"] else None,  # type: ignore[arg-type]
        tags=tuple(d["tags"]) if d["tags"] is not None else None,
        background_only=bool(d["bg"]),
        problems=[Problem(name, kind, path, message) for kind, path, message in d["problems"]],
        notes=list(d["notes"]),
        warnings=list(d["warnings"]),
    )


class ScreenCache:
    """What :meth:`SegmentationDataset.inspect` found for each item of one split, kept across
    training starts so that an unchanged dataset is not decoded again.

    One file per (format, resolved root, split, class list, masks or not, check code),
    ``FOLDER/<sha1>.json``, two JSON lines: the ident, then ``{name: [key, report]}``. An item's
    ``key`` hashes the path, size, mtime and ctime of its image and mask files (COCO without
    prepared masks: the annotation file), its file tags and its expected size; any change
    and the item is read again. Items with listing problems (missing files, duplicates) are
    never cached: the dataset finds them without reading. The file is written atomically;
    an unwritable folder (read-only home, read-only dataset) only costs the cache.

    Args:
        ds: the dataset (its ``root`` may be read-only: nothing is written there).
        folder: where cache files live (:func:`screen_cache_dir`).
    """

    def __init__(self, ds: SegmentationDataset, folder: Path) -> None:
        self.ds = ds
        self.folder = Path(folder)
        self.ident = {
            "format": CACHE_FORMAT,
            "dataset": ds.format,
            "root": str(Path(ds.root).resolve()),
            "split": ds.split,
            "classes": list(ds.classes),
            "has_masks": bool(ds.has_masks),
            "code": _code_fingerprint(ds),
        }
        self.path = self.folder / f"{_digest(self.ident)[:24]}.json"
        self._old: Dict[str, List[Any]] = self._load()
        self._new: Dict[str, List[Any]] = {}
        self._keys: Dict[str, str] = {}  # keys computed by lookup() for the items read after it
        self._lock = threading.Lock()
        self.hits = 0
        self.reads = 0

    def _load(self) -> Dict[str, List[Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                ident = json.loads(f.readline())
                if ident != self.ident:
                    return {}
                items = json.loads(f.readline())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.info("screening cache %s unreadable (%s): reading every item", self.path, exc)
            return {}
        return items if isinstance(items, dict) else {}

    def item_key(self, name: str) -> str:
        """The hash an item's cached result must match (class docstring)."""
        ds = self.ds
        tags = ds.file_tags(name)
        size = ds.expected_size(name)
        parts = [
            name,
            _file_key(ds.image_path(name)),
            _file_key(ds.mask_path(name)) if ds.has_masks else None,
            None if tags is None else [int(i) for i in np.nonzero(np.asarray(tags))[0]],
            None if size is None else [int(v) for v in size],
        ]
        return _digest(parts)[:24]

    def lookup(self, index: int) -> Optional[ItemReport]:
        """The item's cached report when its key still matches, else None (nothing is read)."""
        name = self.ds.names[index]
        if name in self.ds.listing_problems:
            return None  # found without reading a file; never cached
        key = self.item_key(name)
        old = self._old.get(name)
        if old is None or old[0] != key:
            self._keys[name] = key
            return None
        try:
            report = _report_from_json(name, old[1])
        except (KeyError, TypeError, ValueError):
            self._keys[name] = key
            return None
        with self._lock:
            self._new[name] = old
            self.hits += 1
        return report

    def read(self, index: int) -> ItemReport:
        """Read the item (:meth:`SegmentationDataset.inspect`) and remember its report."""
        name = self.ds.names[index]
        report = self.ds.inspect(index)[1]
        if name in self.ds.listing_problems:
            return report
        key = self._keys.get(name) or self.item_key(name)
        with self._lock:
            self._new[name] = [key, _report_to_json(report)]
            self.reads += 1
        return report

    def inspect(self, index: int) -> ItemReport:
        """The item's report: from the cache when its key matches, else read (and remembered)."""
        report = self.lookup(index)
        return report if report is not None else self.read(index)

    def save(self) -> Optional[Path]:
        """Write the items seen since loading (atomically); returns the file, or None when
        nothing changed or the folder is not writable."""
        if self.reads == 0 and set(self._new) == set(self._old):
            return None
        try:
            # two lines: the ident alone first, so pruning reads one short line per file
            text = json.dumps(self.ident) + "\n" + json.dumps(self._new, separators=(",", ":")) + "\n"
            write_text_atomic(self.path, text)
        except OSError as exc:
            log.info("screening cache not written (%s): the next start reads every item again", exc)
            return None
        self._prune()
        return self.path

    def _prune(self) -> None:
        """Remove other cache files whose dataset folder is gone, or that were not used for
        ``CACHE_MAX_AGE_DAYS`` (a dataset on an unmounted disk keeps its file that long)."""
        limit = time.time() - CACHE_MAX_AGE_DAYS * 86400
        for f in self.folder.glob("*.json"):
            if f == self.path:
                continue
            try:
                with open(f, encoding="utf-8") as fh:
                    root = json.loads(fh.readline()).get("root")
                if f.stat().st_mtime < limit or (isinstance(root, str) and not Path(root).exists()):
                    f.unlink()
            except (OSError, ValueError, AttributeError):
                continue


def screen_items(
    dataset: SegmentationDataset, names: Sequence[str], *, full: bool, progress: bool = True
) -> List[Tuple[str, str, str, str]]:
    """The check before an inference stage: read each of ``names`` of ``dataset`` once
    (``vitpcm check-data``'s check) and return its problems as ``(name, kind, path, message)``.
    ``full``: ``names`` is the whole split, so the screening cache is read and updated (a
    subset would shrink it)."""
    import copy

    sub = copy.copy(dataset)
    sub.names = list(names)
    sub.transform = None
    cache = None
    if full:
        folder = screen_cache_dir()
        cache = ScreenCache(sub, folder) if folder is not None else None
    report = check_dataset(sub, "extra", 0, progress, cache=cache)
    if cache is not None:
        cache.save()
    return [(p.name, p.kind, p.path, p.message) for p in report.problems]


def screen_for_training(
    datasets: Sequence[Optional[SegmentationDataset]],
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

    ``cache``: reuse what earlier starts found for unchanged items (:class:`ScreenCache`,
    in :func:`screen_cache_dir`); only a process with ``write`` (rank 0) updates the file.
    Returns the skipped problems."""
    present = [ds for ds in datasets if ds is not None]
    folder = screen_cache_dir() if cache else None
    reports = []
    for i, ds in enumerate(present):
        sc = ScreenCache(ds, folder) if folder is not None else None
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
