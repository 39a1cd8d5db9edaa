r"""Closed form of the classifier gradient under max pooling (the paper's Eq. 16).

For one image with patch features F (s x e), classifier W (e x C) and tags t:

.. math::

    A = F W,\quad Z_i = \mathrm{softmax}(A_i),\quad y_k = \max_i Z_i^k = Z_{i_k}^k,

    L = -\sum_k \big[t_k \log y_k + (1 - t_k)\log(1 - y_k)\big] \quad\text{(Eq. 4)}

    \frac{\partial L}{\partial W^q} = -F_{i_q}(t_q - y_q)
        + \sum_{k \ne q} F_{i_k} Z_{i_k}^q \frac{t_k - y_k}{1 - y_k}  \quad\text{(Eq. 16)}

Only the arg-max patch of each class carries gradient. Column q of W moves toward the
best patch of class q when q is present (t_q = 1) and away from it when absent; it is also
pushed away from the best patches of the *other* present classes in proportion to how
much class q competes there (Z_{i_k}^q). ``docs/theory.md`` walks through the derivation;
``tests/test_theory.py`` checks this function against autograd in float64.
"""

from __future__ import annotations

import torch


def mce_loss_sum(features: torch.Tensor, weight: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Eq. 4: the sum over classes of BCE(t_k, y_k) for one image (no clipping).

    Args:
        features: F, ``[s, e]``.
        weight: W, ``[e, C]``.
        tags: t, ``[C]`` in {0, 1}.
    """
    z = (features @ weight).softmax(dim=1)
    y = z.amax(dim=0)
    return -(tags * y.log() + (1 - tags) * (1 - y).log()).sum()


def mce_weight_gradient(features: torch.Tensor, weight: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """dL/dW by Eq. 16 for the loss of :func:`mce_loss_sum`.

    Args:
        features: F, ``[s, e]`` patch features.
        weight: W, ``[e, C]`` classifier.
        tags: t, ``[C]``.

    Returns ``[e, C]``; column q is dL/dW^q.
    """
    z = (features @ weight).softmax(dim=1)  # [s, C]
    peak = z.argmax(dim=0)  # i_k for every class k, [C]
    y = z[peak, torch.arange(z.shape[1])]  # y_k = Z_{i_k}^k, [C]
    f_peak = features[peak]  # F_{i_k}, [C, e]
    z_peak = z[peak]  # Z_{i_k}^q, [C (k), C (q)]
    coef = (tags - y) / (1 - y)  # (t_k - y_k) / (1 - y_k), [C]

    # sum over every k of F_{i_k} Z_{i_k}^q coef_k, then take the k = q term back out
    cross = f_peak.T @ (z_peak * coef[:, None])  # [e, C]
    cross = cross - f_peak.T * (y * coef)  # k = q term: F_{i_q} y_q coef_q
    own = -f_peak.T * (tags - y)  # -F_{i_q} (t_q - y_q)
    return own + cross
