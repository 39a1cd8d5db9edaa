"""The probabilities file of a pseudo-mask (``probs/NAME.npz``): written by the stages, read by the CRF.

One uncompressed npz per image (:func:`vitpcm.atomic.save_npz_atomic`), written before the
image's mask PNG (a PNG implies its npz)::

    probs    [P, h, w] float32   the P kept classes' probabilities
    classes  [P] int64           their class indices
    size     [2] int64           optional: the image's (H, W) when ``probs`` is stored smaller
                                 (``infer.max_side``); absent: (h, w) is the image's size
    pooled   [C] float32         optional (``vitpcm infer`` / ``predict``): every class's
                                 max-pooled score y_k

numpy only (Pillow for the optional upsampling of :func:`load_probs`); no torch.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from vitpcm.atomic import PathLike, save_npz_atomic
from vitpcm.errors import VitpcmError
from vitpcm.postprocess.crf import resize_planes

__all__ = [
    "write_probs",
    "read_probs",
    "load_probs",
    "read_pooled",
    "probs_shape",
    "check_distributions",
]


def write_probs(
    path: PathLike,
    probs: np.ndarray,
    classes: np.ndarray,
    size: Optional[np.ndarray] = None,
    pooled: Optional[np.ndarray] = None,
) -> None:
    """Write one image's probabilities file atomically (module docstring for the arrays).

    Args:
        probs: ``[P, h, w]`` float32; classes: ``[P]`` int64 (stored as given).
        size: ``[2]`` int64 (H, W) when ``probs`` is smaller than the image, else None.
        pooled: ``[C]`` float32 pooled scores, or None.
    """
    arrays = {"probs": probs, "classes": classes}
    if size is not None:
        arrays["size"] = size
    if pooled is not None:
        arrays["pooled"] = pooled
    save_npz_atomic(path, **arrays)


def read_probs(path: Path) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int]]:
    """Read a ``vitpcm infer`` npz as stored: ``probs`` [P, h, w] float32, ``classes`` [P]
    int64, and the image's (H, W) (``size``; the probabilities' own size when absent)."""
    try:
        with np.load(path) as data:
            probs, classes = data["probs"], data["classes"]
            size = tuple(int(v) for v in data["size"]) if "size" in data.files else None
    except KeyError:
        raise VitpcmError(
            f"{path} lacks the arrays 'probs' and 'classes': give the probs/ folder of `vitpcm infer`"
        ) from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise VitpcmError(f"cannot read {path}: {exc}; rerun `vitpcm infer` for it") from None
    if probs.ndim != 3 or classes.ndim != 1 or len(classes) != probs.shape[0] or len(classes) == 0:
        raise VitpcmError(
            f"{path}: probs {probs.shape} and classes {classes.shape} do not fit (want [P, H, W] and [P]);"
            " rerun `vitpcm infer` for it"
        )
    if size is None:
        size = (int(probs.shape[1]), int(probs.shape[2]))
    elif len(size) != 2 or size[0] < probs.shape[1] or size[1] < probs.shape[2]:
        raise VitpcmError(
            f"{path}: size {size} is smaller than its probabilities {probs.shape[1:]}; rerun `vitpcm infer`"
        )
    return probs.astype(np.float32, copy=False), classes.astype(np.int64, copy=False), size  # type: ignore[return-value]


def load_probs(path: Path, full_size: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Read ``probs`` [P, H, W] float32 and ``classes`` [P] int64 from a ``vitpcm infer`` npz.

    Probabilities stored smaller than their image (``infer.max_side``) are upsampled to
    the image's size unless ``full_size`` is False (:func:`read_probs` gives both)."""
    probs, classes, size = read_probs(path)
    if full_size and probs.shape[1:] != tuple(size):
        probs = resize_planes(probs, size)
    return probs, classes


def read_pooled(path: Path) -> Optional[np.ndarray]:
    """The ``pooled`` [C] float32 scores of a probabilities file; None when the file is
    missing, unreadable or older than the key (files of earlier versions lack it)."""
    if not Path(path).is_file():
        return None
    try:
        with np.load(path) as z:
            if "pooled" not in z.files:
                return None
            return z["pooled"].astype(np.float32)
    except (OSError, ValueError):
        return None


def probs_shape(path: Path) -> Optional[Tuple[int, int, int, int, int]]:
    """``(P, h, w, H, W)`` of a probabilities file from its headers only (nothing is
    decompressed beyond them); None when it cannot be read (the worker will say why)."""
    try:
        with zipfile.ZipFile(path) as zf:
            shape = _npy_shape(zf, "probs.npy")
            size = None
            if "size.npy" in zf.namelist():
                with zf.open("size.npy") as f:
                    size = np.lib.format.read_array(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if shape is None or len(shape) != 3:
        return None
    p, h, w = (int(v) for v in shape)
    big_h, big_w = (int(size[0]), int(size[1])) if size is not None and len(size) == 2 else (h, w)
    return p, h, w, big_h, big_w


def _npy_shape(zf: zipfile.ZipFile, member: str) -> Optional[Tuple[int, ...]]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
        else:
            return None
    return tuple(shape)


def check_distributions(probs: np.ndarray, path: Path) -> None:
    """A :class:`VitpcmError` naming ``path`` unless ``probs`` ``[P, H, W]`` holds finite
    probabilities in [0, 1] that sum to at most 1 per pixel (the kept channels of an untagged
    image may sum to less: ``vitpcm infer`` drops the negligible ones)."""
    problem = None
    if not np.isfinite(probs).all():
        problem = f"{int((~np.isfinite(probs)).sum())} values are NaN or infinite"
    elif probs.min() < -1e-6 or probs.max() > 1 + 1e-4:
        problem = f"values range over [{probs.min():.4g}, {probs.max():.4g}], not [0, 1] (logits?)"
    elif probs.sum(0).max() > 1 + 1e-3:
        problem = f"the channels sum to up to {probs.sum(0).max():.4g} per pixel, more than 1"
    if problem:
        raise VitpcmError(
            f"{path}: not probabilities ({problem}); the CRF wants softmax outputs: rerun `vitpcm infer` for it"
        )
