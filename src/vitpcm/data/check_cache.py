"""The check's cache: what reading each item found, kept across training starts (CheckCache).

One JSON file per split in :func:`check_cache_dir` (``~/.cache/vitpcm/screen/`` or
``$VITPCM_CACHE_DIR/screen/``), keyed per item by its files (path, size, mtime, ctime), its
tags and expected size, the class list and the check's own code: a second start on an
unchanged dataset decodes no image, and a changed file is read again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from vitpcm.atomic import write_text_atomic
from vitpcm.data.base import ItemReport, Problem, TaggedImageDataset

log = logging.getLogger(__name__)

CACHE_ENV = "VITPCM_CACHE_DIR"  # where the cache lives (its screen/ subfolder); off / none / 0 = no cache
CACHE_FORMAT = 2  # bump when the file layout below changes
CACHE_MAX_AGE_DAYS = 60  # cache files untouched this long are removed when another one is written
_CODE_FILES = ("data/base.py", "images.py", "io.py", "classes.py")  # the code whose verdicts are cached


def check_cache_dir() -> Optional[Path]:
    """The folder of the check's cache files: ``$VITPCM_CACHE_DIR/screen``, else
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


def _code_fingerprint(ds: TaggedImageDataset) -> str:
    """Hash of the source that decides an item's verdict (base, images, io and the format's
    module): a vitpcm update that changes the check invalidates the cache by itself."""
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


class CheckCache:
    """What :meth:`TaggedImageDataset.inspect` found for each item of one split, kept across
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
        folder: where cache files live (:func:`check_cache_dir`).
    """

    def __init__(self, ds: TaggedImageDataset, folder: Path) -> None:
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
        """Read the item (:meth:`TaggedImageDataset.inspect`) and remember its report."""
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
