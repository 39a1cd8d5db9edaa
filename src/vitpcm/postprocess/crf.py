"""The dense CRF's maths (the paper's post-processing): mean-field marginals and masks of one image.

The runner that refines folders of probabilities files (resumable, parallel, sharded:
``vitpcm crf``) is :mod:`vitpcm.postprocess.crf_runner`; the files it reads are
:mod:`vitpcm.postprocess.probs_file`'s.

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
* ``crf.gaussian=exact`` (the default; the paper presets set ``lattice``): the smoothness
  kernel's messages come from a separable Gaussian filter, the kernel that pydensecrf's
  permutohedral lattice approximates (:func:`_mean_field_exact_smoothness`): 1.4x faster,
  99.99 % of the pixels as with the lattice (docs/reproduce.md, switch 9).
* ``crf.backend``: ``pydensecrf`` (pydensecrf2's C++), ``torch``
  (:mod:`vitpcm.postprocess.crf_torch`: the same lattice and mean field in PyTorch, on the
  CPU or a CUDA device; on a GPU in this process, one image at a time, on the CPU in the
  worker processes) or ``auto`` (torch on a CUDA device, pydensecrf otherwise). The torch backend's keys that cannot be packed fall
  back to pydensecrf with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from vitpcm.crf_params import DEFAULT_MAX_PIXELS, CRFParams
from vitpcm.errors import VitpcmError

__all__ = [
    "CRFParams",
    "unary_energy",
    "dense_crf",
    "crf_labels",
    "crf_labels_bounded",
    "resize_planes",
    "upsampled_argmax",
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
