"""Small readers and the mask PNG: split lists, item names, image suffixes, masks, tags from masks."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from vitpcm.atomic import atomic_path
from vitpcm.classes import IGNORE_INDEX, pascal_palette
from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_PALETTE = pascal_palette().reshape(-1).tolist()


def save_mask_png(path: PathLike, mask: np.ndarray, text: Optional[Dict[str, str]] = None) -> None:
    """Write an ``[H, W]`` integer mask as a palette PNG (PASCAL colours), atomically.

    ``text``: PNG text chunks (``tEXt``), e.g. what made the mask, so a rerun can tell a
    finished mask from a stale one (:func:`read_png_text`); image readers ignore them."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("mask values must lie in 0..255")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE)
    buf = io.BytesIO()
    pnginfo = None
    if text:
        pnginfo = PngInfo()
        for key, value in text.items():
            pnginfo.add_text(key, value)
    img.save(buf, format="PNG", pnginfo=pnginfo)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_png_text(path: PathLike) -> Optional[Dict[str, str]]:
    """The text chunks of a PNG (header only, no pixel decoding); None when the file is
    missing or not a readable PNG."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                return None
            # img.info holds the chunks before the pixels (where save_mask_png puts them);
            # img.text would decode the whole image to look for chunks after them
            return {str(k): v for k, v in img.info.items() if isinstance(v, str)}
    except (OSError, SyntaxError, ValueError):
        return None


def read_mask_png(path: PathLike) -> np.ndarray:
    """Read a label PNG (palette or greyscale) as an ``[H, W]`` uint8 array of class indices."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                raise VitpcmError(
                    f"mask {path} has mode {img.mode}; expected a palette or greyscale PNG of class indices"
                )
            arr = np.asarray(img)
    except (OSError, SyntaxError) as exc:
        raise VitpcmError(f"cannot read mask {path}: {exc}") from None
    if arr.dtype != np.uint8:
        if arr.max() > 255 or arr.min() < 0:
            raise VitpcmError(f"mask {path} holds values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


# Image suffixes the package recognises (lower case; matched case-insensitively): the
# own-folder format picks them up in images/, the CRF and the report look for them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# Folders whose name may lead a list entry (``/JPEGImages/x.jpg`` in SBD's train_aug.txt).
_LIST_PREFIXES = ("images", "JPEGImages", "SegmentationClassAug", "SegmentationClass")


def item_name(token: str) -> str:
    """The item name of a list/tag-file entry: ``/JPEGImages/x.jpg``, ``images/a/x.png``,
    ``x.jpg`` and ``x`` -> ``x`` (``a/x`` keeps its sub-folder below ``images/``)."""
    p = PurePosixPath(token.strip().replace("\\", "/"))
    parts = [s for s in p.parts if s not in ("/", ".")]
    if parts and parts[0] in _LIST_PREFIXES and len(parts) > 1:
        parts = parts[1:]
    if parts and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS + (".mat",):
        parts[-1] = PurePosixPath(parts[-1]).stem
    return "/".join(parts)


def read_names(path: PathLike) -> List[str]:
    """Read a split list: one image per line. The first token of a line may be a bare name
    or a path (``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` -> ``x``); a second column
    (VOC's ``x  1`` class lists, SBD's mask path) is ignored. A UTF-8 byte-order mark is
    dropped; blank lines are skipped. A line whose rest is neither such a column (a number,
    a path) is most likely a name with a space, which names cannot hold: that is logged as a
    warning naming the line, as only its first word is used."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(f"split list {path} not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VitpcmError(f"cannot read split list {path}: {exc}") from None
    names, spaced = [], []
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        names.append(item_name(tokens[0]))
        if len(tokens) > 1 and not (len(tokens) == 2 and _second_column(tokens[1])):
            spaced.append((number, line.strip()))
    if spaced:
        number, line = spaced[0]
        log.warning(
            "split list %s: %d line(s) hold a space, e.g. line %d %r: only %r is used as the name (names"
            " cannot contain spaces; rename the files, or a second column must be a number or a path)",
            path, len(spaced), number, line, item_name(line.split()[0]),
        )  # fmt: skip
    return names


def _second_column(token: str) -> bool:
    """A second column of a known list format: VOC's ``-1`` / ``0`` / ``1``, SBD's mask path."""
    if token.lstrip("-").isdigit():
        return True
    return "/" in token or "\\" in token  # "my photo.jpg": a name with a space, not a column


def find_image(folder: PathLike, name: str) -> Path:
    """``folder/NAME.<ext>`` for any of :data:`IMAGE_EXTENSIONS` (either case), ``.jpg`` first."""
    folder = Path(folder)
    for suffix in IMAGE_EXTENSIONS:
        for variant in (suffix, suffix.upper()):
            path = folder / f"{name}{variant}"
            if path.is_file():
                return path
    raise VitpcmError(
        f"no image for {name} in {folder} (looked for {name}.jpg/.jpeg/.png/...): give the folder of the original images"
    )


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot ``[num_classes]`` float32 tags from a mask (255 ignored), background always on."""
    values = np.unique(mask)
    values = values[values != IGNORE_INDEX]
    if values.size and values.max() >= num_classes:
        raise ValueError(f"mask value {int(values.max())} outside the {num_classes} classes")
    tags = np.zeros(num_classes, dtype=np.float32)
    tags[values.astype(np.int64)] = 1.0
    tags[0] = 1.0
    return tags


def names_in(folder: PathLike, suffix: str) -> List[str]:
    """Item names of the ``NAME<suffix>`` files under ``folder``, sorted; names may hold
    sub-folders (``sub/c`` for ``folder/sub/c.png``, as the own-folder format makes them).
    Hidden files (atomic-write temporaries) are left out."""
    folder = Path(folder)
    names = []
    for path in folder.rglob(f"*{suffix}"):
        rel = path.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix()[: -len(suffix)])
    return sorted(names)


def format_names(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c (+N more)`` for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
