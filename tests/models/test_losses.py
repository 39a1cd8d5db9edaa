"""Losses and the class-label merge follow the authors' definitions."""

import numpy as np
import torch
import torch.nn.functional as F

from vitpcm.losses import et_loss, mce_loss, reg_loss
from vitpcm.models.vitpcm import merge_class_labels


def test_merge_class_labels_hand_example():
    # B=1, C=3, 1 x 2 patches
    probs = torch.tensor([[[[0.6, 0.2]], [[0.3, 0.4]], [[0.1, 0.4]]]])
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    merged = merge_class_labels(probs, labels)
    # zero absent class 2; divide class 0 by 0.6 and class 1 by 0.4; renormalise patches
    p0 = torch.tensor([1.0, 0.75, 0.0])
    p1 = torch.tensor([0.2 / 0.6, 1.0, 0.0])
    expected = torch.stack([p0 / p0.sum(), p1 / p1.sum()], dim=1).reshape(1, 3, 1, 2)
    assert torch.allclose(merged, expected)


def test_merge_class_labels_zero_over_zero_is_zero():
    probs = torch.zeros(1, 3, 2, 2)
    probs[0, 0] = 1.0  # class 1 never predicted, class 2 absent
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    merged = merge_class_labels(probs, labels)
    assert torch.isfinite(merged).all()
    assert torch.all(merged[0, 1] == 0) and torch.all(merged[0, 2] == 0)
    assert torch.allclose(merged[0, 0], torch.ones(2, 2))
    # a patch where every present class is 0 stays all-zero rather than NaN
    probs = torch.zeros(1, 2, 1, 2)
    probs[0, 0, 0, 0] = 1.0
    merged = merge_class_labels(probs, torch.tensor([[1.0, 0.0]]))
    assert merged[0, :, 0, 1].sum() == 0 and merged[0, 0, 0, 0] == 1


def test_merge_rows_are_distributions_and_present_classes_peak():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 5, 4, 4, generator=gen).softmax(1)
    labels = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    merged = merge_class_labels(probs, labels)
    assert torch.allclose(merged.sum(1), torch.ones(2, 4, 4), atol=1e-6)
    assert torch.all(merged[labels == 0] == 0)


def test_mce_is_mean_bce_over_classes_and_batch():
    pooled = torch.tensor([[0.9, 0.2, 0.7], [0.8, 0.6, 0.1]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    manual = -(labels * pooled.log() + (1 - labels) * (1 - pooled).log()).mean()
    assert torch.allclose(mce_loss(pooled, labels), manual)


def test_mce_is_keras_binary_crossentropy_with_epsilon_inside_the_log():
    # tf_keras backend.binary_crossentropy: clip to [eps, 1 - eps], then log(y + eps), log(1 - y + eps)
    eps = np.float32(1e-7)
    pooled = np.array([[0.9, 0.2, 1e-9], [1.0, 0.6, 0.1]], dtype=np.float32)
    labels = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    y = np.clip(pooled, eps, np.float32(1.0) - eps)
    keras = -(labels * np.log(y + eps) + (1 - labels) * np.log(1 - y + eps)).mean()
    ours = mce_loss(torch.from_numpy(pooled), torch.from_numpy(labels))
    assert abs(float(ours) - float(keras)) <= 1e-6 * abs(float(keras))
    # without the epsilon inside the log (the former mce_loss) the saturated terms differ visibly
    plain = -(labels * np.log(y) + (1 - labels) * np.log(1 - y)).mean()
    assert abs(float(plain) - float(keras)) > 1e-3


def test_mce_is_finite_at_saturation():
    pooled = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = mce_loss(pooled, torch.tensor([[0.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pooled.grad).all()


def test_et_loss_is_categorical_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 2, 2, generator=gen, requires_grad=True)
    targets = torch.rand(3, 4, 2, 2, generator=gen).softmax(1)
    loss = et_loss(logits.softmax(1), targets)
    manual = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_reg_loss_is_keras_l2():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert torch.isclose(reg_loss(w, 0.01), torch.tensor(0.01 * (1 + 4 + 0.25)))


def test_et_target_merge_before_or_after_the_crop():
    """'after' (the authors) rescales a class inside the crop; 'before' keeps the whole-view scale."""
    from vitpcm.tasks.pcm import et_targets

    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 1] = 0.1
    probs[0, 1, 3, 3] = 0.9  # class 1 peaks outside the crop below
    probs[0, 0] = 1 - probs[0, 1]
    labels = torch.tensor([[1.0, 1.0]])
    no_flips = torch.zeros(1, 3, dtype=torch.bool)
    box = torch.tensor([[0, 0, 2, 2]])  # top-left 2 x 2 patches (patch size 1)
    after = et_targets(probs, labels, no_flips, box, no_flips, patch_size=1, et_grid=2, merge="after")
    before = et_targets(probs, labels, no_flips, box, no_flips, patch_size=1, et_grid=2, merge="before")
    # after: class 1 peaks at 1 inside the crop -> 0.1/0.1 = 1 vs bg 0.9/0.9 = 1 -> 0.5 each
    assert torch.allclose(after[0, 1], torch.full((2, 2), 0.5))
    # before: class 1 scaled by its whole-view max 0.9 -> 0.111 vs bg 1 -> about 0.1
    assert torch.allclose(before[0, 1], torch.full((2, 2), (0.1 / 0.9) / (0.1 / 0.9 + 1.0)), atol=1e-6)
