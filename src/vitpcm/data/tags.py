"""Tag files (image name -> class names, as CSV or JSON) and split lists.

CSV (``tags.csv``), one image per row; the first cell is the image (file name, relative
path under ``images/``, or bare name), every further cell is a class name, and a cell may
hold several names separated by ``;``. These rows are equivalent::

    cat_01.jpg,cat,person
    cat_01.jpg,"cat;person"
    cat_01,cat;person

A first row whose first cell is ``image``, ``name``, ``file`` or ``filename`` is a header
and skipped; lines starting with ``#`` are comments. ``background`` may appear and is
ignored (it is always on).

JSON (``tags.json``): ``{"cat_01.jpg": ["cat", "person"], ...}`` or a list of objects
``[{"image": "cat_01.jpg", "tags": ["cat", "person"]}, ...]`` (``tags`` may be a
``;``-separated string; ``name``/``file`` and ``labels``/``classes`` are accepted too).

A row with no class at all is an image without any tag: ``vitpcm check-data`` reports it
as broken (an image with nothing to learn from is almost always a forgotten row).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm.data.base import DUPLICATE_NAME, NO_TAGS, UNKNOWN_CLASS
from vitpcm.errors import VitpcmError
from vitpcm.io import item_name

_HEADER_KEYS = {"image", "images", "name", "file", "filename", "image_name", "img"}
_JSON_NAME_KEYS = ("image", "name", "file", "filename")
_JSON_TAG_KEYS = ("tags", "labels", "classes")
BACKGROUND = "background"


@dataclass
class TagTable:
    """A parsed tag file: ``tags[name]`` lists the class names of the first row for that
    name (background removed); ``rows[name]`` counts its rows (> 1 is a duplicate)."""

    path: Path
    tags: Dict[str, List[str]] = field(default_factory=dict)
    rows: Dict[str, int] = field(default_factory=dict)

    def add(self, key: str, classes: Sequence[str]) -> None:
        name = item_name(key)
        if not name:
            return
        self.rows[name] = self.rows.get(name, 0) + 1
        if name not in self.tags:
            names: List[str] = []
            for c in classes:
                for part in str(c).split(";"):
                    part = part.strip()
                    if part and part != BACKGROUND and part not in names:
                        names.append(part)
            self.tags[name] = names

    def class_names(self) -> List[str]:
        """Every class named in the file, sorted (for an inferred class list)."""
        return sorted({c for cs in self.tags.values() for c in cs})

    def lookup(self, name: str, classes: Sequence[str]) -> Tuple[Optional[np.ndarray], Optional[Tuple[str, str]]]:
        """Multi-hot ``[C]`` tags of ``name`` (background on), or ``(None, (kind, message))``
        saying why there are none: no row, several rows, no class, unknown class."""
        where = self.path.name
        if name not in self.tags:
            return None, (NO_TAGS, f"'{name}' has no row in {where}: add one (name,class;class) or remove the image")
        if self.rows[name] > 1:
            return None, (DUPLICATE_NAME, f"'{name}' has {self.rows[name]} rows in {where}: keep one row per image")
        names = self.tags[name]
        if not names:
            return None, (
                NO_TAGS,
                f"the row of '{name}' in {where} names no class: add its classes or remove the image",
            )
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in names if c not in index]
        if unknown:
            hints = []
            for c in unknown:
                close = difflib.get_close_matches(c, list(classes), n=1)
                hints.append(f"'{c}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            return None, (UNKNOWN_CLASS, f"tags {', '.join(hints)} of '{name}' in {where} are not in the class list:"
                                         " fix the tag or add the class to classes.txt / data.classes")  # fmt: skip
        vec = np.zeros(len(classes), dtype=np.float32)
        vec[0] = 1.0
        for c in names:
            vec[index[c]] = 1.0
        return vec, None


def read_tag_file(path: str | Path) -> TagTable:
    """Parse a ``.csv`` or ``.json`` tag file (module docstring). Raises :class:`VitpcmError`
    when the file is missing or cannot be parsed at all."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(f"tag file {path} not found: give a CSV or JSON file (see docs/datasets.md)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise VitpcmError(f"cannot read tag file {path}: {exc}") from None
    table = TagTable(path)
    if path.suffix.lower() == ".json":
        _parse_json(text, table)
    else:
        _parse_csv(text, table)
    if not table.rows:
        raise VitpcmError(f"tag file {path} lists no images")
    return table


def _parse_csv(text: str, table: TagTable) -> None:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    rows = [r for r in rows if not r[0].lstrip().startswith("#")]
    if rows and rows[0][0].strip().lower() in _HEADER_KEYS:
        rows = rows[1:]
    for row in rows:
        table.add(row[0], row[1:])


def _parse_json(text: str, table: TagTable) -> None:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VitpcmError(f"cannot parse tag file {table.path}: {exc}") from None

    def as_list(v: Any) -> List[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, (list, tuple)):
            return [str(x) for x in v]
        raise VitpcmError(f"tag file {table.path}: tags must be a list of class names or a string, got {v!r}")

    if isinstance(data, dict):
        for key, value in data.items():
            table.add(str(key), as_list(value))
    elif isinstance(data, list):
        for i, obj in enumerate(data):
            key = next((obj[k] for k in _JSON_NAME_KEYS if isinstance(obj, dict) and k in obj), None)
            tags = next((obj[k] for k in _JSON_TAG_KEYS if isinstance(obj, dict) and k in obj), None)
            if key is None or tags is None:
                raise VitpcmError(f"tag file {table.path}: entry {i} needs an 'image' and a 'tags' field, got {obj!r}")
            table.add(str(key), as_list(tags))
    else:
        raise VitpcmError(f"tag file {table.path}: expected an object or a list at the top level")
