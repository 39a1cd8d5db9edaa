"""Small file helpers shared by every stage: class lists, palette PNGs, atomic writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, List, Sequence, Union

import numpy as np
from PIL import Image

from vitpcm.errors import VitpcmError

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

PathLike = Union[str, os.PathLike]

# mkstemp creates 0600 files; give written files the mode open() would (0666 minus the
# umask) so reports and masks stay readable by others. Read once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)


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


_PALETTE = pascal_palette().reshape(-1).tolist()


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


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash or kill while writing leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_mask_png(path: PathLike, mask: np.ndarray) -> None:
    """Write an ``[H, W]`` integer mask as a palette PNG (PASCAL colours), atomically."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("mask values must lie in 0..255")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def save_npz_atomic(path: PathLike, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` through a temporary file."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


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
    dropped; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(f"split list {path} not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VitpcmError(f"cannot read split list {path}: {exc}") from None
    return [item_name(line.split()[0]) for line in lines if line.strip()]


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
