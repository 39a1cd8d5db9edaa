"""Adam as the authors' Keras code computes it, and the one place that builds ViT-PCM's Adam.

Keras's Adam (the legacy ``OptimizerV2`` of the authors' TF 2.9.1, kernel ``ApplyAdam``;
tf-keras's newer ``Adam`` computes the same) adds epsilon to the *uncorrected* ``sqrt(v)``::

    m <- m + (g - m) (1 - beta1)          v <- v + (g^2 - v) (1 - beta2)
    p <- p - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)        eps = 1e-7

``torch.optim.Adam`` adds its epsilon (1e-8) *after* bias correction, ``m_hat / (sqrt(v_hat)
+ eps)``; in torch's terms Keras's epsilon is ``1e-7 / sqrt(1 - beta2^t)``: 3.2e-6 at step 1,
still 2.6e-7 after 165 steps. Elements with small gradients move differently by up to about
one learning rate at the first steps (docs/reproduce.md, switch 10).

Neither update is invariant to the scale of the gradient, because of epsilon. The authors'
gradient is the sum of their 4 replicas' mean gradients (``MirroredStrategy``), 4x vitpcm's
mean over the same global batch; :func:`build_adam` takes the step as on that sum by dividing
epsilon by the factor instead: with ``g' = R g``, ``m' = R m`` and ``sqrt(v') = R sqrt(v)``, so
``m' / (sqrt(v') + eps) = m / (sqrt(v) + eps / R)`` (for R = 4, a power of two, bit for bit).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Tuple

import torch

#: ``train.adam_epsilon`` values: torch.optim.Adam's, or Keras's (the authors')
ADAM_EPSILONS = ("torch", "keras")
TORCH_EPS = 1e-8
KERAS_EPS = 1e-7


class KerasAdam(torch.optim.Optimizer):
    """Adam with Keras's epsilon placement (module docstring). Same state as
    ``torch.optim.Adam`` (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter).

    Args:
        params: parameters or parameter groups (each may carry its own ``lr``).
        lr: learning rate.
        betas: ``(beta1, beta2)``; Keras's defaults 0.9 / 0.999.
        eps: added to ``sqrt(v)`` before bias correction; Keras's default 1e-7.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = KERAS_EPS,
    ) -> None:
        if lr < 0 or eps < 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid Adam settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # parameters that have taken the same number of steps share one bias correction
            by_step: Dict[int, List[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("KerasAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step[int(state["step"].item())].append(p)
            for t, params in by_step.items():
                grads = [p.grad for p in params]
                ms = [self.state[p]["exp_avg"] for p in params]
                vs = [self.state[p]["exp_avg_sq"] for p in params]
                torch._foreach_lerp_(ms, grads, 1.0 - beta1)  # m + (g - m)(1 - beta1)
                torch._foreach_lerp_(vs, torch._foreach_mul(grads, grads), 1.0 - beta2)
                alpha = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_add_(denom, group["eps"])
                torch._foreach_addcdiv_(params, ms, denom, value=-alpha)
        return loss


def build_adam(groups: List[Dict[str, Any]], epsilon: str = "torch", summed_replicas: int = 1) -> torch.optim.Optimizer:
    """ViT-PCM's Adam over ``groups`` (each with its ``lr``).

    Args:
        epsilon: ``torch`` (``torch.optim.Adam``, eps 1e-8 after bias correction) or ``keras``
            (:class:`KerasAdam`, eps 1e-7 on the uncorrected ``sqrt(v)``, the authors').
        summed_replicas: take the step as on the sum of this many replicas' mean gradients
            (the authors': 4), by dividing epsilon by it (module docstring); 1 = the mean.
    """
    if epsilon not in ADAM_EPSILONS:
        raise ValueError(f"train.adam_epsilon must be {' or '.join(ADAM_EPSILONS)}, got {epsilon!r}")
    if summed_replicas < 1:
        raise ValueError(f"train.summed_replicas must be >= 1, got {summed_replicas}")
    if epsilon == "keras":
        return KerasAdam(groups, eps=KERAS_EPS / summed_replicas)
    return torch.optim.Adam(groups, eps=TORCH_EPS / summed_replicas)


__all__ = ["KerasAdam", "build_adam", "ADAM_EPSILONS"]
