"""Images without a dataset: what ``vitpcm predict`` reads.

The inputs are image files, folders (searched recursively) and glob patterns. Each image
gets a *name*, the key of its output files (``masks/NAME.png``, ...):

* a file: its file name without the suffix (``photos/cat.jpg`` -> ``cat``);
* a folder: the path below the folder, without the suffix (``photos/`` holding
  ``trip/cat.jpg`` -> ``trip/cat``);
* a glob: the path below the folder before its first wildcard (``photos/*/cat*.jpg`` ->
  ``trip/cat``); a folder a glob matches counts as a folder input.

Two different files that would get the same name are an error before any work, as is an
input that matches no image. Tags are optional: the same tags for every image
(``--tags``), or per image from a tag file (``--tags-file``, the CSV / JSON format of
``data/tags.py``); an image without tags is left to the model's own class scores.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from vitpcm.data.base import Sample, TaggedImageDataset
from vitpcm.data.tags import BACKGROUND, read_tag_file
from vitpcm.errors import VitpcmError
from vitpcm.io import IMAGE_EXTENSIONS, item_name

_GLOB_CHARS = ("*", "?", "[")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _folder_images(folder: Path) -> List[Tuple[str, Path]]:
    """``(name, path)`` of every image below ``folder`` (hidden files and folders left out), sorted."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or not _is_image(path):
            continue
        found.append((rel.with_suffix("").as_posix(), path))
    return sorted(found)


def _glob_base(pattern: str) -> Path:
    """The folder before the first wildcard of ``pattern`` (names are taken below it)."""
    parts = Path(pattern).parts
    literal = []
    for part in parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def collect_images(inputs: Sequence[str | os.PathLike]) -> Dict[str, Path]:
    """Expand files, folders and globs into ``{name: image file}`` in input order (module
    docstring for the names). The same file given twice counts once.

    Raises :class:`VitpcmError` (one line) for an input that matches no image and for two
    different files that would write the same name.
    """
    if not inputs:
        raise VitpcmError("give at least one INPUT: an image file, a folder of images or a glob such as 'photos/*.jpg'")
    found: Dict[str, Path] = {}
    clashes: List[str] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text).expanduser()
        if path.is_file():
            items = [(path.stem, path)]
        elif path.is_dir():
            items = _folder_images(path)
        elif any(c in text for c in _GLOB_CHARS):
            base = _glob_base(str(path))
            items = []
            for match in sorted(glob.glob(str(path), recursive=True)):
                m = Path(match)
                if m.is_dir():
                    items += _folder_images(m)  # names below the folder matched, as for a folder input
                elif m.is_file() and _is_image(m):
                    items.append((m.relative_to(base).with_suffix("").as_posix() if m.is_relative_to(base)
                                  else m.stem, m))  # fmt: skip
        else:
            raise VitpcmError(f"input {text} not found: give an image file, a folder of images or a glob")
        if not items:
            raise VitpcmError(
                f"input {text} matches no image (looked for {' '.join(IMAGE_EXTENSIONS)}): check the path or pattern"
            )
        for name, p in items:
            old = found.get(name)
            if old is None:
                found[name] = p
            elif old.resolve() != p.resolve():
                clashes.append(f"{old} and {p} -> {name}")
    if clashes:
        more = f" (+{len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise VitpcmError(
            f"two inputs would write the same output name: {clashes[0]}{more}; rename one or give their common folder"
        )
    return found


def parse_tag_list(text: str, classes: Sequence[str], source: str = "--tags") -> np.ndarray:
    """``"cat,person"`` (commas or ``;``) -> multi-hot ``[C]`` float32, background on.

    Raises :class:`VitpcmError` naming the unknown classes and listing the known ones."""
    names = [t.strip() for t in text.replace(";", ",").split(",") if t.strip() and t.strip() != BACKGROUND]
    return _vector(names, classes, source)


def _vector(names: Sequence[str], classes: Sequence[str], source: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise VitpcmError(
            f"{source} names {', '.join(repr(u) for u in unknown)}, unknown to this run; its classes are:"
            f" {', '.join(classes[1:])}"
        )
    vec = np.zeros(len(classes), dtype=np.float32)
    vec[0] = 1.0
    for n in names:
        vec[index[n]] = 1.0
    return vec


def tags_from_file(path: str | os.PathLike, classes: Sequence[str], names: Mapping[str, Path]) -> Dict[str, np.ndarray]:
    """Per-image tags from a CSV / JSON tag file, for the images of ``names`` it has a row
    for (matched by name, by the file name, or by the file name without its suffix).

    Returns ``{name: multi-hot [C]}``; images without a row are absent (the model's own
    scores decide their classes). An unknown class anywhere is an error (before any work)."""
    table = read_tag_file(path)
    by_key: Dict[str, np.ndarray] = {}
    for key, tag_names in table.tags.items():
        by_key[key] = _vector(tag_names, classes, f"tag file {table.path} (row '{key}')")
    out: Dict[str, np.ndarray] = {}
    for name, file in names.items():
        for key in (name, item_name(file.name), file.stem):
            if key in by_key:
                out[name] = by_key[key]
                break
    return out


class LooseImages(TaggedImageDataset):
    """Image files as a dataset without masks (what :func:`collect_images` found).

    Every sample carries ``labels`` (multi-hot ``[C]``: the given tags, or all zeros when
    the image has none: a real tag vector always has background on) and ``tagged`` (bool).
    ``tags``: ``{name: multi-hot [C]}`` of the images whose tags are known.
    """

    format = "images"

    def __init__(
        self,
        files: Mapping[str, Path],
        classes: Sequence[str],
        tags: Optional[Mapping[str, np.ndarray]] = None,
        transform=None,
    ) -> None:
        super().__init__(Path("."), "predict", classes, transform)
        self.files: Dict[str, Path] = dict(files)
        self.names = list(self.files)
        self.tags: Dict[str, np.ndarray] = dict(tags or {})

    def image_path(self, name: str) -> Path:
        return self.files[name]

    def file_tags(self, name: str) -> Optional[np.ndarray]:
        return self.tags.get(name)

    def raw(self, index: int) -> Sample:
        sample = super().raw(index)
        sample["tagged"] = "labels" in sample
        if not sample["tagged"]:  # one key set for every sample: a batch mixes both kinds
            sample["labels"] = torch.zeros(self.num_classes, dtype=torch.float32)
        return sample
