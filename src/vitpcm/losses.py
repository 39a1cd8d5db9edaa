"""The ViT-PCM losses (torch only).

* :func:`mce_loss` — L_MCE (Eq. 1): mean BCE between the max-pooled scores and the tags.
* :func:`et_loss` — L_ET: categorical cross-entropy between the patch predictions on the
  tiled, transformed view and stop-gradient targets made from the plain view
  (:func:`vitpcm.tasks.pcm.et_targets`, which needs the view transforms of ``data``).
* :func:`reg_loss` — L_REG: ``weight * sum(W ** 2)`` on the patch classifier.

The class-label merge lives with the model (:func:`vitpcm.models.vitpcm.merge_class_labels`).
Maps are channel-first ``[B, C, h, w]`` with C = classes including background.
"""

from __future__ import annotations

import torch

EPS = 1e-7  # Keras' clipping epsilon, which the authors' losses use


def mce_loss(pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_MCE: mean over batch and classes (background included) of BCE(t_k, y_k), as Keras's
    ``binary_crossentropy`` computes it: y clipped to [1e-7, 1 - 1e-7], then
    ``-(t log(y + 1e-7) + (1 - t) log(1 - y + 1e-7))`` (the epsilon inside the log too).

    Args:
        pooled: ``[B, C]`` max-pooled probabilities y.
        labels: ``[B, C]`` multi-hot tags t (background at 0).

    Returns a scalar.
    """
    y = pooled.float().clamp(EPS, 1.0 - EPS)
    t = labels.to(y.dtype)
    return -(t * (y + EPS).log() + (1.0 - t) * (1.0 - y + EPS).log()).mean()


def et_loss(probs_et: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_ET: mean over views and patches of ``-sum_c target_c * log(p_c)``.

    Args:
        probs_et: ``[B, C, g, g]`` predictions on the ET views (cut out of the tiled input).
        targets: ``[B, C, g, g]`` from :func:`vitpcm.tasks.pcm.et_targets` (no gradient).
    """
    p = probs_et.float()
    p = p / p.sum(dim=1, keepdim=True)
    p = p.clamp(EPS, 1.0 - EPS)
    return -(targets.detach() * p.log()).sum(dim=1).mean()


def reg_loss(weight: torch.Tensor, coefficient: float = 0.01) -> torch.Tensor:
    """L_REG: ``coefficient * sum(W ** 2)`` (Keras ``L2(0.01)``)."""
    return coefficient * weight.float().pow(2).sum()
