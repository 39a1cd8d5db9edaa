"""Eq. 16: the closed-form classifier gradient equals autograd's, in float64."""

import pytest
import torch

from vitpcm.theory import mce_loss_sum, mce_weight_gradient


@pytest.mark.parametrize("seed", range(8))
def test_closed_form_matches_autograd(seed):
    gen = torch.Generator().manual_seed(seed)
    s, e, c = 49, 24, 6
    features = torch.randn(s, e, generator=gen, dtype=torch.float64)
    weight = (0.3 * torch.randn(e, c, generator=gen, dtype=torch.float64)).requires_grad_(True)
    tags = (torch.rand(c, generator=gen) < 0.5).double()
    tags[0] = 1.0
    loss = mce_loss_sum(features, weight, tags)
    (auto,) = torch.autograd.grad(loss, weight)
    closed = mce_weight_gradient(features, weight.detach(), tags)
    assert closed.shape == (e, c)
    assert torch.max(torch.abs(auto - closed)).item() <= 1e-10
    # not trivially zero: the comparison has teeth
    assert auto.abs().max().item() > 1e-3


def test_gradient_moves_present_class_toward_its_best_patch():
    """Descending along -dL/dW^q raises the score of class q at its own arg-max patch."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    weight = 0.1 * torch.randn(8, 3, generator=gen, dtype=torch.float64)
    tags = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    grad = mce_weight_gradient(features, weight, tags)
    before = (features @ weight).softmax(1).amax(0)
    after = (features @ (weight - 0.05 * grad)).softmax(1).amax(0)
    assert after[1] > before[1]  # present class goes up
    assert after[2] < before[2]  # absent class goes down
