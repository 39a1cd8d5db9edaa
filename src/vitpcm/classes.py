"""Class lists (files and the built-in voc12 / coco14) and the PASCAL palette."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

import numpy as np

from vitpcm.errors import VitpcmError

PathLike = Union[str, os.PathLike]

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def pascal_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``[n, 3]`` uint8, index 0 black, 255 (ignore) cream."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def read_classes(path: PathLike) -> List[str]:
    """Read a class list: one name per line, background first, blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(
            f"class list {path} not found: give a file (one name per line, background first) or one of {BUILTIN_CLASS_LISTS}"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2:
        raise VitpcmError(f"class list {path} has {len(names)} names; it needs background plus at least one class")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise VitpcmError(f"class list {path} repeats names {dup}: each class must appear once")
    if len(names) > 255:
        raise VitpcmError(f"class list {path} has {len(names)} names; masks hold at most 255 classes (255 = ignore)")
    return names


BUILTIN_CLASS_LISTS = ("voc12", "coco14")


def class_list(spec: PathLike) -> List[str]:
    """Class names from a file, or from a built-in list: ``voc12`` (21) or ``coco14``
    (81, the authors' ``labels.txt`` order)."""
    if str(spec) in BUILTIN_CLASS_LISTS and not Path(spec).exists():
        return read_classes(Path(__file__).resolve().parent / "resources" / f"{spec}_classes.txt")
    return read_classes(spec)
