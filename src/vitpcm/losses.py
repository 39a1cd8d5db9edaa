"""The ViT-PCM losses and the class-label merge.

* :func:`mce_loss` — L_MCE (Eq. 1): mean BCE between the max-pooled scores and the tags.
* :func:`et_loss` — L_ET: categorical cross-entropy between the patch predictions on the
  tiled, transformed view and stop-gradient targets made from the plain view
  (:func:`et_targets`).
* :func:`reg_loss` — L_REG: ``weight * sum(W ** 2)`` on the patch classifier.
* :func:`merge_class_labels` — fold the image tags into patch distributions (used for ET
  targets and for pseudo-masks).

All take channel-first maps ``[B, C, h, w]`` with C = classes including background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitpcm.data.transforms import map_to_et_grid

EPS = 1e-7  # Keras' clipping epsilon, which the authors' losses use


def mce_loss(pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_MCE: mean over batch and classes (background included) of BCE(t_k, y_k).

    Args:
        pooled: ``[B, C]`` max-pooled probabilities y.
        labels: ``[B, C]`` multi-hot tags t (background at 0).
    """
    y = pooled.float().clamp(EPS, 1.0 - EPS)
    return F.binary_cross_entropy(y, labels.to(y.dtype))


def merge_class_labels(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fold the image tags into patch distributions (the authors' ``merge_class_labels``).

    Absent classes are zeroed; each present class map is divided by its own maximum over
    patches (so it peaks at 1); each patch is renormalised to sum 1. 0 / 0 gives 0.

    Args:
        probs: ``[B, C, h, w]`` per-patch class distributions.
        labels: ``[B, C]`` multi-hot tags.

    Returns ``[B, C, h, w]``.
    """
    merged = probs * labels.to(probs.dtype)[:, :, None, None]
    peak = merged.amax(dim=(2, 3), keepdim=True)
    merged = torch.where(peak > 0, merged / peak.clamp_min(torch.finfo(merged.dtype).tiny), torch.zeros_like(merged))
    total = merged.sum(dim=1, keepdim=True)
    return torch.where(total > 0, merged / total.clamp_min(torch.finfo(merged.dtype).tiny), torch.zeros_like(merged))


@torch.no_grad()
def et_targets(
    probs_view: torch.Tensor,
    labels: torch.Tensor,
    flips: torch.Tensor,
    et_box: torch.Tensor,
    et_flips: torch.Tensor,
    patch_size: int,
    et_grid: int,
    merge: str = "after",
) -> torch.Tensor:
    """Soft targets for L_ET (the authors' ``compute_cce_loss`` target side).

    The plain view's predictions (taken in eval mode, without gradient) are carried to each
    ET view's patch grid through the same transform and merged with the tags.

    ``merge="after"`` (the authors) merges on the transformed grid, so each present class
    is scaled to peak at 1 *inside the crop*, even when the crop misses the object.
    ``merge="before"`` merges on the whole view first (where the image tags hold) and then
    transforms, so a crop without the object keeps that class low.

    Args:
        probs_view: ``[B, C, G, G]`` predictions on view 1.
        labels: ``[B, C]`` tags.
        flips, et_box, et_flips: the transform records from :class:`TrainTransform`.
        et_grid: patch-grid side of one ET view.

    Returns ``[B, C, et_grid, et_grid]``.
    """
    if merge not in ("after", "before"):
        raise ValueError(f"merge must be 'after' or 'before', got {merge!r}")
    probs = probs_view.float()
    if merge == "before":
        return map_to_et_grid(merge_class_labels(probs, labels), flips, et_box, et_flips, patch_size, et_grid)
    return merge_class_labels(map_to_et_grid(probs, flips, et_box, et_flips, patch_size, et_grid), labels)


def et_loss(probs_et: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_ET: mean over views and patches of ``-sum_c target_c * log(p_c)``.

    Args:
        probs_et: ``[B, C, g, g]`` predictions on the ET views (cut out of the tiled input).
        targets: ``[B, C, g, g]`` from :func:`et_targets` (no gradient).
    """
    p = probs_et.float()
    p = p / p.sum(dim=1, keepdim=True)
    p = p.clamp(EPS, 1.0 - EPS)
    return -(targets.detach() * p.log()).sum(dim=1).mean()


def reg_loss(weight: torch.Tensor, coefficient: float = 0.01) -> torch.Tensor:
    """L_REG: ``coefficient * sum(W ** 2)`` (Keras ``L2(0.01)``)."""
    return coefficient * weight.float().pow(2).sum()
