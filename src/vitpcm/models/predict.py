"""Model-level prediction: patch distributions merged with the tags, test-time augmentation,
upsampling to the image size, and which channels to keep. No files, no datasets.

Shapes: B = batch, C = classes (background at 0), h x w = patch grid, H x W = image size.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vitpcm.models.vitpcm import ViTPCM, merge_class_labels


@torch.no_grad()
def predict_grid(
    model: ViTPCM, images: torch.Tensor, labels: Optional[torch.Tensor], merge: bool = True
) -> torch.Tensor:
    """Patch-level class distributions ``[B, C, h, w]``, merged with ``labels`` when given."""
    probs = model(images)["probs"].float()
    if merge and labels is not None:
        probs = merge_class_labels(probs, labels.to(probs.device))
    return probs


def upsample(probs: torch.Tensor, size: Tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of ``[C, h, w]`` patch maps to an image size ``(H, W)``.

    ``align_corners=False``: patch centres at ``d * i + d / 2`` (vitpcm); ``True``: the corner
    patches pinned to the image corners, TF1's ``resize(align_corners=True)`` (the authors,
    ``input.align_corners``)."""
    return F.interpolate(probs[None], size=tuple(size), mode="bilinear", align_corners=align_corners)[0]


def upsample_skimage(probs: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``[C, h, w]`` -> ``[C, H, W]`` as scikit-image's ``resize(order=1)`` of a numpy array
    enlarges it (the authors' CRF input: ``utils.py`` ``resize`` of ``dict2preds``): pixel
    centres at ``(o + 0.5) h / H - 0.5`` (half-pixel), mirrored about the edge samples
    outside ``[0, h - 1]`` (its default ``mode="reflect"``, SciPy's ``mirror``), bilinear.
    Unlike :func:`upsample` with ``align_corners=False``, which holds the edge values.
    (scikit-image also anti-aliases a side it shrinks; probabilities are only enlarged here.)"""
    rows = _mirrored_linear_weights(probs.shape[1], size[0], probs)
    cols = _mirrored_linear_weights(probs.shape[2], size[1], probs)
    return torch.einsum("Hh,chw,Ww->cHW", rows, probs, cols)


def _mirrored_linear_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """``[n_out, n_in]`` linear-interpolation weights at half-pixel sources, mirrored edges."""
    x = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    if n_in > 1:
        period = 2 * (n_in - 1)
        x = torch.remainder(x, period)  # mirror: ... 2 1 0 1 2 ... n-1 n-2 ...
        x = torch.where(x > n_in - 1, period - x, x)
    else:
        x = torch.zeros_like(x)
    lo = x.floor().long().clamp(max=max(n_in - 2, 0))
    frac = x - lo
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights[rows, lo] += 1.0 - frac
    if n_in > 1:
        weights[rows, lo + 1] += frac
    return weights.to(device=like.device, dtype=like.dtype)


def present_classes(
    probs_full: torch.Tensor, labels: Optional[torch.Tensor], pooled: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Indices of the channels to keep in ``probs/NAME.npz``.

    With tags: the tagged classes. Without: background, classes whose pooled score reaches
    ``threshold``, and any class that wins a pixel (so the argmax of the kept channels
    equals the mask).
    """
    if labels is not None:
        return torch.nonzero(labels > 0).flatten()
    keep = pooled >= threshold
    keep[0] = True
    keep[probs_full.argmax(0).unique()] = True
    return torch.nonzero(keep).flatten()


def tags_from_scores(pooled: torch.Tensor, threshold: float) -> torch.Tensor:
    """Predicted tags: ``pooled`` ``[..., C]`` max-pooled class scores -> multi-hot ``[..., C]``
    float, a class on where its score reaches ``threshold``; background (0) always on."""
    tags = (pooled >= threshold).float()
    tags[..., 0] = 1.0
    return tags


def image_outputs(
    grid: torch.Tensor,
    tags: Optional[torch.Tensor],
    pooled: torch.Tensor,
    size: Tuple[int, int],
    threshold: float,
    *,
    align_corners: bool = False,
    max_side: int = 0,
    keep_probs: bool = True,
    probs_resize: str = "mask",
    stored_out: Optional[List[torch.Tensor]] = None,
) -> Tuple[np.ndarray, Optional[Dict[str, np.ndarray]]]:
    """One image's mask and stored probabilities from its (already merged) patch distributions.

    Args:
        grid: ``[C, h, w]`` patch distributions (merged with ``tags`` by the caller when known).
        tags: ``[C]`` multi-hot, or None (then the kept channels follow :func:`present_classes`).
        pooled: ``[C]`` max-pooled scores; ``threshold``: :func:`present_classes`'s.
        size: the image's ``(H, W)``.
        max_side: an image whose longer side exceeds it keeps its probabilities at a reduced
            size (longer side = ``max_side``) plus ``size`` [2]; 0 = never.
        keep_probs: also return the probabilities (else None).
        probs_resize: ``mask`` (the probabilities the mask is the argmax of) or ``skimage``
            (stored ones enlarged by :func:`upsample_skimage`, the authors' CRF input;
            ``infer.probs_resize``); the mask is the same either way.
        stored_out: when given, the stored probabilities are also appended to it as a tensor
            on ``grid``'s device (the one-pass CRF refines them there).

    Returns ``(mask [H, W] uint8, {"probs": [P, H', W'] float32, "classes": [P] int64
    (, "size": [2] int64)} or None)``: the files of ``vitpcm infer``.
    """
    height, width = size
    extra: Dict[str, np.ndarray] = {}
    if max_side and max(height, width) > max_side:
        # big image: probabilities at a reduced size; the mask at full size over the kept classes
        f = max_side / max(height, width)
        small_size = (max(1, round(height * f)), max(1, round(width * f)))
        small = upsample(grid, small_size, align_corners)
        keep = present_classes(small, tags, pooled.float(), threshold)
        stored = small[keep]
        mask = keep[upsample(grid[keep], (height, width), align_corners).argmax(0)].to(torch.uint8).cpu().numpy()
        extra["size"] = np.array([height, width], dtype=np.int64)
    else:
        full = upsample(grid, (height, width), align_corners)
        mask = full.argmax(0).to(torch.uint8).cpu().numpy()
        keep = present_classes(full, tags, pooled.float(), threshold) if keep_probs else None
        stored = full[keep] if keep_probs else None
        if keep_probs and probs_resize == "skimage":  # the authors' CRF input (infer.probs_resize)
            stored = upsample_skimage(grid[keep], (height, width))
    if not keep_probs:
        return mask, None
    if stored_out is not None:
        stored_out.append(stored)
    probs = {"probs": stored.cpu().numpy().astype(np.float32, copy=False), "classes": keep.cpu().numpy().astype(np.int64),
             **extra}  # fmt: skip
    return mask, probs


def tta_sizes(scale: int, factors: Sequence[float], patch_size: int) -> List[int]:
    """Input sides for TTA: ``scale * f`` snapped to the nearest multiple of the patch size
    (at least one patch), duplicates removed, ascending."""
    return sorted({max(patch_size, int(round(scale * float(f) / patch_size)) * patch_size) for f in factors})


@torch.inference_mode()
def predict_batch(
    model: ViTPCM,
    batch: Dict[str, torch.Tensor],
    device: torch.device,
    sizes: Sequence[int] = (),
    flip: bool = False,
    amp: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch distributions and pooled scores of a loader batch, as float32: plain inference on
    ``batch["image"]`` ``[B, 3, n, n]``, or, with ``sizes``, :func:`predict_tta` over the views
    ``batch["image_{side}"]``. ``amp``: bf16 autocast. Returns ``(probs [B, C, h, w], pooled [B, C])``.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        if sizes:
            views = [batch[f"image_{n}"].to(device, non_blocking=True) for n in sizes]
            grid, pooled = predict_tta(model, views, flip)
        else:
            outputs = model(batch["image"].to(device, non_blocking=True))
            grid, pooled = outputs["probs"], outputs["pooled"]
    return grid.float(), pooled.float()


def predict_tta(model: ViTPCM, views: Sequence[torch.Tensor], flip: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average patch distributions over input sides (and horizontal flips).

    Args:
        views: ``[B, 3, n, n]`` inputs, one per side.
        flip: also predict each view mirrored left-right (and mirror the prediction back).

    Returns ``(probs [B, C, h, w], pooled [B, C])`` on the finest grid ``h x w`` of the
    views; ``pooled`` is the max over patches of the average.
    """
    grids: List[torch.Tensor] = []
    for x in views:
        b = x.shape[0]
        inp = torch.cat([x, x.flip(-1)]) if flip else x  # one forward for both
        probs = model(inp)["probs"].float()
        grids.append(probs[:b])
        if flip:
            grids.append(probs[b:].flip(-1))
    if len(grids) == 1:  # one view: exactly plain inference (same memory layout downstream)
        return grids[0], grids[0].amax(dim=(2, 3))
    h = max(g.shape[-2] for g in grids)
    w = max(g.shape[-1] for g in grids)
    resized = [g if g.shape[-2:] == (h, w) else F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)
               for g in grids]  # fmt: skip
    avg = torch.stack(resized).mean(0)
    return avg, avg.amax(dim=(2, 3))
