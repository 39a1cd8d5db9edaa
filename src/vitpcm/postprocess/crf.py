"""Dense CRF refinement of pseudo-masks (the paper's post-processing), parallel over images.

``vitpcm crf --probs DIR --images DIR --out DIR`` reads every ``probs/NAME.npz`` written by
``vitpcm infer`` (``probs`` [P, h, w] float32 of the P present classes, ``classes`` [P], and
``size`` [2] = the image's (H, W) when the probabilities were stored smaller, see
``infer.max_side``), the image ``NAME.jpg``, and writes ``OUT/NAME.png`` (palette PNG of
class indices at the image's size, as the masks of ``vitpcm infer``).

The CRF is Krähenbühl & Koltun's fully connected CRF (``pydensecrf2`` on PyPI) with the
authors' parameters (their ``configs/voc12.yaml``): 10 mean-field iterations, a Gaussian
kernel (sxy 1, compat 3), a bilateral kernel (sxy 67, srgb 3, compat 4), unary
``-log(max(p, 1e-5))`` (pydensecrf's ``unary_from_softmax``). The parameters are
defined once, in :class:`vitpcm.crf_params.CRFParams` (the config's ``crf`` section
extends it); every function here also takes that config section.

Differences from the authors' path, each measured (``docs/benchmarks.md``, ``docs/scaling.md``):

* The CRF runs over the present classes only (P labels, typically 2-3 on VOC) instead of
  all 21 / 81 channels. Absent classes enter the authors' CRF with p = 0, clipped to
  1e-5 (unary 11.5): they essentially never win a pixel, but every mean-field iteration
  pays for them.
* Images are spread over ``workers`` processes (:func:`vitpcm.utils.pools.process_pool`:
  they die with the parent, kill -9 included).
* ``crf.gaussian=exact`` (the default; the paper presets set ``lattice``): the smoothness
  kernel's messages come from a separable Gaussian filter, the kernel that pydensecrf's
  permutohedral lattice approximates (:func:`_mean_field_exact_smoothness`): 1.4x faster,
  99.99 % of the pixels as with the lattice (docs/reproduce.md, switch 9).
* ``crf.backend``: ``pydensecrf`` (pydensecrf2's C++), ``torch``
  (:mod:`vitpcm.postprocess.crf_torch`: the same lattice and mean field in PyTorch, on the
  CPU or a CUDA device; on a GPU in this process, one image at a time, on the CPU in the
  worker processes) or ``auto`` (torch on a CUDA device, pydensecrf otherwise). The torch backend's keys that cannot be packed fall
  back to pydensecrf with a warning.

What a run guarantees (docs/reliability.md):

* Resumable: a rerun skips finished masks. A mask is finished when it is newer than its
  probabilities and was made with the same parameters (a key in the PNG's text chunk);
  every PNG is written atomically, so a killed run leaves complete files only.
* Bounded: an image of more than ``crf.max_pixels`` pixels is solved at that many pixels
  (``bilateral_sxy`` scaled with the image) and its marginals are upsampled; the worker
  count is lowered until the largest image fits ``crf.memory_budget``
  (:data:`CRF_BYTES_PER_PIXEL`, measured).
* Missing probabilities or images are listed together before any work starts.
* Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``) each rank refines ``names[rank::world]``
  and rank 0 writes the summary once every rank has left its marker
  (:mod:`vitpcm.utils.shard`); the masks are the same files as one process writes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import multiprocessing
import sys
import time
import zipfile
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vitpcm.crf_params import DEFAULT_MAX_PIXELS, CRFParams
from vitpcm.errors import VitpcmError
from vitpcm.io import disk_error, find_image, format_names, names_in, save_mask_png, write_json_atomic
from vitpcm.utils.folders import output_folders
from vitpcm.utils.pools import budget_workers, memory_budget, process_pool
from vitpcm.utils.shard import Shard, clear_done, wait_for_ranks, write_done
from vitpcm.utils.stamps import digest, read_stamp, stamp
from vitpcm.utils.system import cpu_count

__all__ = [
    "CRFParams",
    "unary_energy",
    "dense_crf",
    "crf_labels",
    "crf_labels_bounded",
    "load_probs",
    "read_probs",
    "run_crf",
]

log = logging.getLogger(__name__)


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:  # pragma: no cover - a declared dependency
        raise VitpcmError(
            "the dense CRF needs pydensecrf2: pip install pydensecrf2 (builds with a C++ compiler)"
        ) from None
    return dcrf


def unary_energy(probs: np.ndarray, clip: float = 1e-5) -> np.ndarray:
    """``-log(max(p, clip))`` as a C-contiguous float32 ``[C, H * W]`` (pydensecrf's layout)."""
    c = probs.shape[0]
    p = np.maximum(probs.reshape(c, -1).astype(np.float32, copy=False), np.float32(clip))
    return np.ascontiguousarray(-np.log(p), dtype=np.float32)


def dense_crf(
    image: np.ndarray, probs: np.ndarray, params: Optional[CRFParams] = None, device: Optional[str] = None
) -> np.ndarray:
    """Mean-field marginals of the fully connected CRF.

    Args:
        image: ``[H, W, 3]`` uint8 RGB at the size of ``probs``.
        probs: ``[C, H, W]`` class probabilities (any C >= 1).
        params: kernel parameters and iterations (default the authors'); ``params.backend``
            picks pydensecrf2 or :mod:`vitpcm.postprocess.crf_torch` (same marginals up to
            float rounding).
        device: where the torch backend computes (``cpu``, ``cuda``, ``cuda:1``; default
            cpu); ``crf.backend=auto`` means torch on a CUDA device.

    Returns:
        ``Q`` ``[C, H, W]`` float32, a distribution over the C labels per pixel.
    """
    c, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image shape {image.shape} does not match probabilities {probs.shape} (want [H, W, 3])")
    params = params if params is not None else CRFParams()
    if params.resolved_backend(device) == "torch":
        q = _dense_crf_torch(image, probs, params, device)
        if q is not None:
            return q
    dcrf = _densecrf()
    crf = dcrf.DenseCRF2D(w, h, c)
    unary = unary_energy(probs, params.clip)
    rgb = np.require(image, dtype=np.uint8, requirements=["C", "W"])  # pydensecrf wants a writable buffer
    if params.gaussian == "exact":
        return _mean_field_exact_smoothness(crf, unary, rgb, params).reshape(c, h, w)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                             compat=params.bilateral_compat)  # fmt: skip
    if not params.tolerance:
        q = crf.inference(int(params.iterations))  # the authors' call
        return np.asarray(q, dtype=np.float32).reshape(c, h, w)
    q, energy, message = crf.startInference()
    labels = _argmax0(np.asarray(q))
    for _ in range(int(params.iterations)):
        crf.stepInference(q, energy, message)
        settled, labels = _labels_settled(np.asarray(q), labels, params.tolerance)
        if settled:
            break
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _labels_settled(q: np.ndarray, labels: np.ndarray, tolerance: float) -> Tuple[bool, np.ndarray]:
    """Whether mean field has settled (``crf.tolerance``): the labels of ``q`` ``[C, N]`` differ
    from the previous step's ``labels`` ``[N]`` on at most ``tolerance * N`` pixels; and the new labels."""
    new = _argmax0(q)
    return int(np.count_nonzero(new != labels)) <= tolerance * new.size, new


def _argmax0(q: np.ndarray) -> np.ndarray:
    """``q.argmax(0)`` of ``[C, ...]`` (the first of equal maxima), one pass per channel:
    numpy's argmax over the leading axis of a C-contiguous array strides (5.1 vs 3.2 ms
    for 3 x 187,500)."""
    best, labels = q[0].copy(), np.zeros(q.shape[1:], dtype=np.int64)
    for c in range(1, q.shape[0]):
        higher = q[c] > best
        labels[higher] = c
        np.maximum(best, q[c], out=best)
    return labels


def _dense_crf_torch(
    image: np.ndarray, probs: np.ndarray, params: CRFParams, device: Optional[str]
) -> Optional[np.ndarray]:
    """The torch backend on one image (``[C, H, W]`` float32 marginals), or None (with a
    warning) when its lattice keys cannot be packed: pydensecrf then computes the same CRF."""
    from vitpcm.postprocess.crf_torch import LatticeKeyError, dense_crf_batch

    try:
        q = dense_crf_batch([image], [probs], params, device=device or "cpu")[0]
    except LatticeKeyError as exc:
        log.warning("crf: %s; this image goes to pydensecrf", exc)
        return None
    return q.cpu().numpy()


def _mean_field_exact_smoothness(crf: Any, unary: np.ndarray, rgb: np.ndarray, params: CRFParams) -> np.ndarray:
    """pydensecrf's mean field (``inference``) with the smoothness kernel computed exactly.

    ``crf``: a fresh ``DenseCRF2D`` of the image's size; ``unary`` ``[C, N]``; returns ``Q``
    ``[C, N]``. Each iteration is pydensecrf's step, ``Q <- softmax(-unary + w_b K_b Q + w_g
    K_g Q)`` (Potts messages, kernels normalised symmetrically, ``n^-1/2 K (n^-1/2 Q)`` with
    ``n = K 1``). The appearance kernel ``K_b`` (5-D: position and colour) comes from
    pydensecrf's permutohedral lattice, read from its step (a CRF holding only that kernel,
    no unary: the step leaves ``-w_b K_b Q`` in its message buffer). The smoothness kernel
    ``K_g``, ``exp(-|p_i - p_j|^2 / (2 gauss_sxy^2))`` on pixel positions, is a separable
    Gaussian filter here: what the lattice approximates, at a fraction of its cost (its
    lattice has about a vertex per pixel at sxy 1). Masks agree with the lattice on
    99.99 % of the pixels (docs/reproduce.md). The filter runs on C - 1 channels: Q sums to
    1 over the labels, so the last channel's message is that of the constant 1 (computed
    once) minus the others'. ``params.tolerance`` > 0 stops early (:func:`_labels_settled`).
    """
    from pydensecrf import eigen
    from scipy.ndimage import gaussian_filter1d

    c, n = unary.shape
    h, w = rgb.shape[:2]
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                             compat=params.bilateral_compat)  # fmt: skip
    sigma = float(params.gauss_sxy)

    def smooth(x: np.ndarray) -> np.ndarray:  # [..., H, W], zero outside the image
        return gaussian_filter1d(gaussian_filter1d(x, sigma, axis=-2, mode="constant"), sigma, axis=-1, mode="constant")

    norm, of_one = _smoothness_normalisation(h, w, sigma)
    energy, message = eigen.matrixXf(np.zeros_like(unary)), eigen.matrixXf(np.zeros_like(unary))
    q = _softmax(-unary)
    labels = _argmax0(q) if params.tolerance else None
    gauss = np.empty((c, n), dtype=np.float32)
    for _ in range(int(params.iterations)):
        crf.stepInference(eigen.matrixXf(q), energy, message)  # message = -w_b K_b q
        gauss[:-1] = (norm * smooth(q[:-1].reshape(c - 1, h, w) * norm)).reshape(c - 1, n)
        np.subtract(of_one, gauss[:-1].sum(0), out=gauss[-1])
        q = _softmax(params.gauss_compat * gauss - unary - np.asarray(message))
        if labels is not None:
            settled, labels = _labels_settled(q, labels, params.tolerance)
            if settled:
                break
    return q


@functools.lru_cache(maxsize=8)
def _smoothness_normalisation(h: int, w: int, sigma: float) -> Tuple[np.ndarray, np.ndarray]:
    """The exact smoothness kernel's ``n^-1/2`` ``[H, W]`` (``n = K 1``) and its message of
    ``Q = 1`` ``[H * W]`` (read-only; cached: a dataset has few image sizes)."""
    from scipy.ndimage import gaussian_filter1d

    def smooth(x: np.ndarray) -> np.ndarray:
        return gaussian_filter1d(gaussian_filter1d(x, sigma, axis=-2, mode="constant"), sigma, axis=-1, mode="constant")

    norm = (1.0 / np.sqrt(smooth(np.ones((h, w), np.float32)) + np.float32(1e-20))).astype(np.float32)
    of_one = (norm * smooth(norm)).reshape(h * w)
    norm.flags.writeable = of_one.flags.writeable = False
    return norm, of_one


def _softmax(energy: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of ``[C, N]`` float32 (pydensecrf's ``expAndNormalize``), in place."""
    energy = np.asarray(energy, dtype=np.float32)
    energy -= energy.max(0, keepdims=True)
    np.exp(energy, out=energy)
    energy /= energy.sum(0, keepdims=True)
    return energy


def crf_labels(
    image: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[int],
    params: Optional[CRFParams] = None,
    device: Optional[str] = None,
) -> np.ndarray:
    """CRF over the given channels; returns the ``[H, W]`` uint8 mask of class indices.

    ``probs`` [P, H, W] holds the channels of ``classes`` [P] (the present classes). One
    channel needs no CRF: every pixel is that class. ``device``: :func:`dense_crf`'s.
    """
    classes = np.asarray(classes, dtype=np.int64)
    if classes.ndim != 1 or len(classes) != probs.shape[0]:
        raise ValueError(f"classes {classes.shape} must list one index per channel of probs {probs.shape}")
    if len(classes) == 1:
        return np.full(probs.shape[1:], classes[0], dtype=np.uint8)
    q = dense_crf(image, probs, params, device)
    return classes[_argmax0(q)].astype(np.uint8)


def crf_labels_bounded(
    image: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[int],
    params: Optional[CRFParams] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: Optional[str] = None,
) -> Tuple[np.ndarray, bool]:
    """:func:`crf_labels` for an image of any size, in bounded memory (``device``: :func:`dense_crf`'s).

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        probs: ``[P, h, w]`` probabilities at the image's size, or smaller with its aspect
            (``infer.max_side``).
        classes: ``[P]`` their class indices.
        max_pixels: solve at most this many pixels (0 = no bound); a larger problem is
            solved on the image and probabilities resized to it, with ``bilateral_sxy``
            scaled by the same factor (the appearance kernel keeps its reach in the picture;
            the one-pixel smoothness kernel stays one pixel), and the marginals are
            upsampled to ``H x W`` (bilinear) before the argmax.

    Returns the ``[H, W]`` uint8 mask and whether a reduced size was solved.
    """
    big_h, big_w = image.shape[:2]
    p, h, w = probs.shape
    classes = np.asarray(classes, dtype=np.int64)
    if len(classes) == 1:
        return np.full((big_h, big_w), classes[0], dtype=np.uint8), False
    th, tw = h, w
    if max_pixels and h * w > max_pixels:
        factor = math.sqrt(max_pixels / (h * w))
        th, tw = max(1, int(h * factor)), max(1, int(w * factor))
    if (th, tw) == (big_h, big_w):
        return crf_labels(image, probs, classes, params, device), False
    params = params if params is not None else CRFParams()
    if (th, tw) != (h, w):
        probs = resize_planes(probs, (th, tw))
        probs /= np.maximum(probs.sum(0, keepdims=True), np.float32(1e-12))
    from PIL import Image

    small = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((tw, th), Image.BILINEAR))
    scale = math.sqrt((th * tw) / (big_h * big_w))
    q = dense_crf(small, probs, dataclasses.replace(params, bilateral_sxy=params.bilateral_sxy * scale), device)
    return classes[upsampled_argmax(q, (big_h, big_w))].astype(np.uint8), True


def resize_planes(planes: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[C, h, w]`` float planes to ``[C, H, W]`` float32 (pixel centres
    aligned, antialiased when shrinking: Pillow's ``F`` mode)."""
    from PIL import Image

    out = np.empty((planes.shape[0], *size), dtype=np.float32)
    for c, plane in enumerate(planes):
        img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
        out[c] = np.asarray(img.resize((size[1], size[0]), Image.BILINEAR))
    return out


def upsampled_argmax(q: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Argmax over the channels of ``q`` [C, h, w] upsampled to ``size`` (bilinear), one
    channel at a time: two full-size float planes, never C."""
    from PIL import Image

    best = idx = None
    for c, plane in enumerate(q):
        up = np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F").resize(
            (size[1], size[0]), Image.BILINEAR))  # fmt: skip
        if best is None:
            best, idx = up.copy(), np.zeros(size, dtype=np.int64)
            continue
        better = up > best
        best[better] = up[better]
        idx[better] = c
    return idx


# ------------------------------------------------------------------------------ files
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


# Peak memory of one dense CRF, bytes per solved pixel: BASE + PER_LABEL x P. Measured with
# pydensecrf2 (peak RSS of one process, 1000 x 1000 pixels): P = 2 / 3 / 8 / 21 took 665 /
# 752 / 1036 / 2052 B/px on a noise image (the permutohedral lattice's worst case) and
# 561 (P = 3) / 1488 (P = 21) on a smooth one; docs/reliability.md.
CRF_BYTES_PER_PIXEL = (600, 80)
WORKER_OVERHEAD = 150 * 1024**2  # a forked worker's own pages, the PNG buffers
# The torch backend (crf.backend=torch, one thread, same 1000 x 1000 noise image): P = 3 / 8
# took 1705 / 2101 B/px above the process's own pages, and importing torch adds about
# 450 MB to each worker (541 vs 90 MB before the CRF).
TORCH_CRF_BYTES_PER_PIXEL = (1470, 80)
TORCH_WORKER_OVERHEAD = 600 * 1024**2


def crf_memory(shape: Tuple[int, int, int, int, int], max_pixels: int, backend: str = "pydensecrf") -> int:
    """Estimated peak bytes of one worker refining an image of ``shape`` = (P, h, w, H, W)
    (:func:`probs_shape`) under ``max_pixels`` with ``backend`` (resolved)."""
    p, h, w, big_h, big_w = shape
    solved = min(h * w, max_pixels) if max_pixels else h * w
    torch_backend = backend == "torch"
    base, per_label = TORCH_CRF_BYTES_PER_PIXEL if torch_backend else CRF_BYTES_PER_PIXEL
    crf = solved * (base + per_label * p) if p > 1 else 0
    inputs = h * w * p * 4 * 2 + big_h * big_w * (3 + 4 * 2 + 8 + 1)  # probs (+ resized), image, planes, index, mask
    return crf + inputs + (TORCH_WORKER_OVERHEAD if torch_backend else WORKER_OVERHEAD)


# ------------------------------------------------------------------------------ the run
def settings_key(params: CRFParams, max_pixels: int, backend: str = "pydensecrf") -> str:
    """What decides a mask besides its inputs; stamped into each PNG (:mod:`vitpcm.utils.stamps`)
    so a rerun with other parameters recomputes instead of keeping stale masks.

    ``backend``: the resolved one. The torch backend's masks differ from pydensecrf's on a
    few pixels in 10^4, so it is part of the key; pydensecrf's key is the one it had before
    ``crf.backend`` existed (its finished masks stay finished)."""
    values = params.as_dict()
    values.pop("backend")
    if backend != "pydensecrf":
        values["backend"] = backend
    return digest({"params": values, "max_pixels": int(max_pixels)})


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


def _refine_one(
    probs_path: Path,
    image_path: Path,
    out_path: Path,
    params: CRFParams,
    max_pixels: int,
    key: str,
    device: Optional[str] = None,
) -> Tuple[float, bool]:
    """Worker: CRF one image and write its mask atomically; returns the seconds it took and
    whether it was solved at a reduced size."""
    # the module itself is numpy / PIL only (the same reader as training: EXIF, 16-bit, ...)
    from vitpcm.images import load_rgb

    start = time.perf_counter()
    probs, classes, size = read_probs(probs_path)
    check_distributions(probs, probs_path)
    image = load_rgb(image_path)
    if image.shape[:2] != tuple(size):
        raise VitpcmError(
            f"{image_path} is {image.shape[1]}x{image.shape[0]} but {probs_path} is {size[1]}x{size[0]}:"
            " the CRF needs the original image that `vitpcm infer` saw"
        )
    mask, reduced = crf_labels_bounded(image, probs, classes, params, max_pixels, device)
    save_mask_png(out_path, mask, stamp("crf", key))
    return time.perf_counter() - start, reduced


def _one_torch_thread() -> None:
    """Pool initializer of the torch backend's CPU workers (as torch's DataLoader workers)."""
    from vitpcm.postprocess.crf_torch import use_threads

    use_threads(1)


def _pool_context():
    # fork: workers start in milliseconds and re-import nothing. They only run numpy /
    # pydensecrf / PIL, so torch's thread pools (loaded when the CRF is chained after
    # inference), which do not survive a fork, are never touched in a child.
    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def _is_done(out_path: Path, probs_path: Path, key: str) -> bool:
    # newer than its probabilities (a rerun of `vitpcm infer` makes the mask stale again)
    # and made with these parameters
    try:
        if out_path.stat().st_mtime_ns < probs_path.stat().st_mtime_ns:
            return False
    except FileNotFoundError:
        return False
    record = read_stamp(out_path)
    return record is not None and record.get("stage") == "crf" and record.get("key") == key


def _remove_own_temporaries(out_dir: Path, mine: set) -> None:
    """Delete ``.NAME.png.*.tmp`` left by a killed run, for this rank's masks only (another
    rank may be writing its own right now)."""
    for tmp in out_dir.rglob(".*.png.*.tmp"):
        target = tmp.parent / tmp.name[1 : tmp.name.rfind(".png.") + 4]
        if target in mine:
            tmp.unlink(missing_ok=True)


def run_crf(
    probs_dir: str | Path,
    images_dir: Optional[str | Path],
    out_dir: str | Path,
    params: Optional[Any] = None,
    workers: int = 0,
    names: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    progress: bool = True,
    image_paths: Optional[Mapping[str, Path]] = None,
    *,
    max_pixels: Optional[int] = None,
    memory: Optional[Any] = None,
    shard: Optional[Shard] = None,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """Refine every ``probs_dir/NAME.npz`` with the dense CRF into ``out_dir/NAME.png``.

    Args:
        probs_dir: the ``probs/`` folder of ``vitpcm infer``.
        images_dir: the original images (``NAME.jpg``, or .jpeg / .png).
        out_dir: where the palette PNGs go (created).
        params: CRF parameters (:class:`CRFParams`, or the config's ``crf`` section, whose
            ``max_pixels`` and ``memory_budget`` then apply too); default the authors'.
        workers: processes (0 = one per CPU, shared among the ranks of this machine under
            torchrun; 1 = in this process); lowered to fit the memory budget.
        names: only these images (default: every npz in ``probs_dir``).
        overwrite: recompute masks that are already done.
        image_paths: ``{name: image file}`` instead of ``images_dir`` (a dataset that
            knows its files, e.g. COCO's ``val2014/COCO_val2014_....jpg``).
        max_pixels: the size bound (module docstring); default ``params.max_pixels`` or
            :data:`vitpcm.crf_params.DEFAULT_MAX_PIXELS`; 0 = none.
        memory: the workers' memory budget (``8G``, ``auto``); default ``params.memory_budget``
            or ``auto``.
        shard: this process's share (default from the environment: ``RANK`` / ``WORLD_SIZE``).
        device: where the torch backend computes (``cpu`` / ``cuda``; ``crf.backend=auto``
            picks torch on a CUDA device, pydensecrf otherwise). On a GPU the torch backend
            runs in this process, one image at a time; on the CPU in ``workers`` processes
            of one torch thread each, as pydensecrf.

    Returns a summary dict (written to ``out_dir/summary.json`` by rank 0).
    """
    from tqdm import tqdm

    if max_pixels is None:
        max_pixels = int(
            getattr(params, "max_pixels", DEFAULT_MAX_PIXELS) if params is not None else DEFAULT_MAX_PIXELS
        )
    if memory is None:
        memory = getattr(params, "memory_budget", "auto") if params is not None else "auto"
    if max_pixels < 0:
        raise VitpcmError(f"crf.max_pixels must be >= 0 (0 = no bound), got {max_pixels}")
    params = CRFParams.from_config(params)  # validated; drops crf.workers and the bounds
    shard = shard if shard is not None else Shard.from_env()
    probs_dir, out_dir = Path(probs_dir), Path(out_dir)
    images_dir = Path(images_dir) if images_dir is not None else None
    if not probs_dir.is_dir():
        raise VitpcmError(
            f"probabilities folder {probs_dir} not found: give the probs/ folder written by `vitpcm infer`"
        )
    if image_paths is None and (images_dir is None or not images_dir.is_dir()):
        raise VitpcmError(f"image folder {images_dir} not found: give the folder of the original images")
    if names is None:
        names = names_in(probs_dir, ".npz")
        if not names:
            raise VitpcmError(f"no NAME.npz files in {probs_dir}: run `vitpcm infer` without --no-probs first")
    names = list(names)
    missing = [n for n in names if not (probs_dir / f"{n}.npz").is_file()]
    if missing:
        raise VitpcmError(f"{len(missing)} probability file(s) missing from {probs_dir}: {format_names(missing)}")
    mine = shard.take(names)
    images = _find_images(mine, images_dir, image_paths)  # every missing image named at once
    backend = params.resolved_backend(device)
    if backend == "torch" and device is not None and str(device) != "cpu":
        from vitpcm.postprocess.crf_torch import torch_device

        device = str(torch_device(device))  # a missing CUDA device: one line now, not a traceback later
        workers = 1  # the GPU parallelises; a forked worker would not survive CUDA
    key = settings_key(params, max_pixels, backend)

    with output_folders(out_dir):
        if shard.enabled:
            clear_done(out_dir, shard)
        try:
            result = _refine_shard(mine, images, probs_dir, out_dir, params, max_pixels, key, workers, memory,
                                   shard, overwrite, progress, tqdm, device)  # fmt: skip
        except BaseException as exc:
            if shard.enabled and not shard.main:
                _tell_rank0(out_dir, shard, exc)
            raise
        if shard.enabled and not shard.main:
            write_done(out_dir, shard, result)
            return _summary(probs_dir, images_dir, out_dir, names, [result], params, max_pixels, shard, backend)
        parts = [result] + (wait_for_ranks(out_dir, shard) if shard.enabled else [])
        summary = _summary(probs_dir, images_dir, out_dir, names, parts, params, max_pixels, shard, backend)
        write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _tell_rank0(out_dir: Path, shard: Shard, exc: BaseException) -> None:
    message = str(exc) if isinstance(exc, VitpcmError) else f"{type(exc).__name__}: {exc}"
    try:
        write_done(out_dir, shard, error=message or type(exc).__name__)
    except OSError:  # the disk that failed the rank may fail the marker too: torchrun still ends the job
        pass


def _find_images(
    names: Sequence[str], images_dir: Optional[Path], image_paths: Optional[Mapping[str, Path]]
) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    missing: List[str] = []
    for name in names:
        if image_paths is not None:
            path = image_paths.get(name)
            if path is None or not Path(path).is_file():
                missing.append(f"{path}" if path is not None else name)
                continue
            found[name] = Path(path)
            continue
        try:
            found[name] = find_image(images_dir, name)  # type: ignore[arg-type]
        except VitpcmError:
            missing.append(name)
    if missing:
        where = f"in {images_dir} (looked for NAME.jpg/.jpeg/.png/...)" if image_paths is None else "on disk"
        raise VitpcmError(
            f"no image for {len(missing)} name(s) {where}: {format_names(missing)}; give the folder of the original images"
        )
    return found


def _refine_shard(
    names: Sequence[str],
    images: Mapping[str, Path],
    probs_dir: Path,
    out_dir: Path,
    params: CRFParams,
    max_pixels: int,
    key: str,
    workers: int,
    memory: Any,
    shard: Shard,
    overwrite: bool,
    progress: bool,
    tqdm: Any,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """The CRF of this rank's images; returns its counts."""
    _remove_own_temporaries(out_dir, {out_dir / f"{n}.png" for n in names})
    jobs: List[Tuple[str, Path, Path, Path]] = []
    skipped = 0
    for name in names:
        probs_path, out_path = probs_dir / f"{name}.npz", out_dir / f"{name}.png"
        if not overwrite and _is_done(out_path, probs_path, key):
            skipped += 1
            continue
        jobs.append((name, probs_path, images[name], out_path))

    # cores: this machine's, shared among the ranks on it; then memory
    wanted = int(workers) if workers and int(workers) > 0 else max(1, cpu_count() // shard.local_world)
    wanted = max(1, min(wanted, len(jobs)))
    note = None
    if wanted > 1:
        shapes = {j[0]: probs_shape(j[1]) for j in jobs}
        backend = params.resolved_backend(device)
        need = max((crf_memory(s, max_pixels, backend) for s in shapes.values() if s is not None), default=0)
        budget = memory_budget(memory, share=shard.local_world, key="crf.memory_budget")
        n_workers, note = budget_workers(wanted, need, budget)
        # biggest first: a large image started last would run alone at the end
        jobs.sort(key=lambda j: -(shapes[j[0]][1] * shapes[j[0]][2]) if shapes[j[0]] else 0)
    else:
        n_workers = wanted
    if note:
        log.warning("crf: %s", note)

    start = time.perf_counter()
    busy, reduced = 0.0, 0
    bar = tqdm(total=len(jobs), desc="crf" if not shard.enabled else f"crf {shard.rank}/{shard.world}", unit="img",
               disable=not progress or not jobs)  # fmt: skip
    try:
        if n_workers == 1:
            for _, probs_path, image_path, out_path in jobs:
                seconds, small = _refine_one(probs_path, image_path, out_path, params, max_pixels, key, device)
                busy, reduced = busy + seconds, reduced + small
                bar.update()
        elif jobs:
            if params.gaussian == "exact":
                import scipy.ndimage  # noqa: F401  (0.2-0.3 s: once here, inherited by the forked workers)
            # the torch backend on the CPU: one process per core like pydensecrf, each with one
            # torch thread (threads of several processes on shared cores wait for each other at
            # every parallel region: 2 threads each made it 3-5x slower under load)
            init = _one_torch_thread if params.resolved_backend(device) == "torch" else None
            with process_pool(n_workers, mp_context=_pool_context(), initializer=init) as pool:
                pending: set[Future] = {
                    pool.submit(_refine_one, p, i, o, params, max_pixels, key) for _, p, i, o in jobs
                }
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        seconds, small = fut.result()  # re-raises a worker's error here
                        busy, reduced = busy + seconds, reduced + small
                        bar.update()
    except OSError as exc:  # a write failure (a DiskError, from io.atomic_path, is one line already)
        if isinstance(exc, VitpcmError):
            raise
        err = disk_error(exc, Path(exc.filename) if getattr(exc, "filename", None) else out_dir / "NAME.png")
        if err is None:
            raise
        raise err from None
    finally:
        bar.close()
    return {"computed": len(jobs), "skipped": skipped, "reduced": reduced, "workers": n_workers,
            "busy": busy, "seconds": time.perf_counter() - start, "memory_note": note}  # fmt: skip


def _summary(
    probs_dir: Path,
    images_dir: Optional[Path],
    out_dir: Path,
    names: Sequence[str],
    parts: Sequence[Mapping[str, Any]],
    params: CRFParams,
    max_pixels: int,
    shard: Shard,
    backend: str = "pydensecrf",
) -> Dict[str, Any]:
    computed = sum(int(p.get("computed", 0)) for p in parts)
    busy = sum(float(p.get("busy", 0.0)) for p in parts)
    summary: Dict[str, Any] = {
        "probs": str(probs_dir),
        "images": str(images_dir) if images_dir is not None else "from the dataset",
        "out": str(out_dir),
        "total": len(names),
        "computed": computed,
        "skipped": sum(int(p.get("skipped", 0)) for p in parts),
        "reduced": sum(int(p.get("reduced", 0)) for p in parts),  # solved at max_pixels, then upsampled
        "workers": sum(int(p.get("workers", 0)) for p in parts),
        "seconds": round(max(float(p.get("seconds", 0.0)) for p in parts), 3),
        "seconds_per_image": round(busy / computed, 4) if computed else None,
        "params": params.as_dict(),
        "max_pixels": int(max_pixels),
        "backend": backend,
    }
    if shard.enabled:
        summary["ranks"] = shard.world
    notes = [p["memory_note"] for p in parts if p.get("memory_note")]
    if notes:
        summary["memory_note"] = notes[0]
    return summary
