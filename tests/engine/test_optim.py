"""ViT-PCM's Adam: Keras's epsilon placement, the authors' summed replicas, and the config keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitpcm.config import load_config
from vitpcm.engine.optim import KerasAdam, build_adam
from vitpcm.errors import VitpcmError


def _keras_adam_numpy(w, grads, lr, eps=1e-7, b1=0.9, b2=0.999):
    """Keras's ApplyAdam written out in float64: alpha = lr sqrt(1 - b2^t) / (1 - b1^t),
    m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), w -= alpha m / (sqrt(v) + eps)."""
    w, m, v = w.astype(np.float64), np.zeros_like(w, np.float64), np.zeros_like(w, np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w = w - alpha * m / (np.sqrt(v) + eps)
        out.append(w.copy())
    return out


def _run(opt_factory, w0, grads):
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = opt_factory([p])
    out = []
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        out.append(p.detach().numpy().astype(np.float64).copy())
    return out


def _gradients(steps=6, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    # a wide range of magnitudes: where epsilon matters (|g| ~ 1e-7..1e-5) and where it does not
    scale = 10.0 ** rng.uniform(-8, -1, n)
    return [(rng.standard_normal(n) * scale).astype(np.float32) for _ in range(steps)]


def test_keras_adam_is_keras_update_over_several_steps():
    lr = 1e-3
    w0 = np.random.default_rng(1).standard_normal(2000).astype(np.float32)
    grads = _gradients()
    ours = _run(lambda ps: KerasAdam(ps, lr=lr), w0, grads)
    keras = _keras_adam_numpy(w0, grads, lr)
    for a, b in zip(ours, keras):
        assert np.abs(a - b).max() / lr < 1e-3  # float32 rounding only
    # torch.optim.Adam (eps 1e-8 after bias correction) differs by a large part of lr on small gradients
    torch_adam = _run(lambda ps: torch.optim.Adam(ps, lr=lr), w0, grads)
    assert np.abs(torch_adam[0] - keras[0]).max() / lr > 0.3


def test_keras_epsilon_in_torch_terms_is_rescaled_each_step():
    # Keras's eps on the uncorrected sqrt(v) = torch's eps of 1e-7 / sqrt(1 - b2^t) after correction
    lr, w0, grads = 1e-3, np.zeros(2000, np.float32), _gradients(steps=4, seed=2)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.Adam([p], lr=lr)
    keras = _keras_adam_numpy(w0, grads, lr)
    for t, g in enumerate(grads, start=1):
        opt.param_groups[0]["eps"] = 1e-7 / math.sqrt(1 - 0.999**t)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        assert np.abs(p.detach().numpy() - keras[t - 1]).max() / lr < 1e-3


@pytest.mark.parametrize("epsilon", ["keras", "torch"])
def test_summed_replicas_equals_a_step_on_the_summed_gradient(epsilon):
    # the authors' gradient is the sum of 4 replicas' means = 4 x the mean; eps / 4 is the same step
    w0 = np.random.default_rng(3).standard_normal(2000).astype(np.float32)
    grads = _gradients(seed=4)
    scaled = _run(lambda ps: build_adam([{"params": ps, "lr": 1e-3}], epsilon, 4), w0, grads)
    summed = _run(lambda ps: build_adam([{"params": ps, "lr": 1e-3}], epsilon, 1), w0, [4 * g for g in grads])
    for a, b in zip(scaled, summed):
        np.testing.assert_array_equal(a, b)  # powers of two: bit for bit
    plain = _run(lambda ps: build_adam([{"params": ps, "lr": 1e-3}], epsilon, 1), w0, grads)
    assert np.abs(plain[0] - summed[0]).max() > 1e-5  # and the scale does matter


def test_keras_adam_state_survives_a_state_dict_round_trip():
    w0, grads = np.ones(50, np.float32), _gradients(steps=4, n=50, seed=5)
    straight = _run(lambda ps: KerasAdam(ps, lr=1e-2), w0, grads)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = KerasAdam([p], lr=1e-2)
    for g in grads[:2]:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    saved = opt.state_dict()
    opt = KerasAdam([p], lr=1e-2)
    opt.load_state_dict(saved)
    for g in grads[2:]:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    np.testing.assert_array_equal(p.detach().numpy(), straight[-1].astype(np.float32))


def test_presets_use_the_authors_adam_and_the_library_default_is_torch():
    for preset in ("voc12", "coco14"):
        cfg = load_config(preset)
        assert (cfg.train.adam_epsilon, cfg.train.summed_replicas) == ("keras", 4)
    cfg = load_config("synthetic")
    assert (cfg.train.adam_epsilon, cfg.train.summed_replicas) == ("torch", 1)


@pytest.mark.parametrize("override", ["train.adam_epsilon=tf", "train.summed_replicas=0"])
def test_bad_adam_settings_are_one_line(override):
    with pytest.raises(VitpcmError, match=override.split("=")[0]):
        load_config("synthetic", [override])


def test_the_training_run_uses_the_configured_adam(tmp_path, tiny_overrides):
    from vitpcm.engine.checkpoint import read_checkpoint
    from vitpcm.stages.train import train

    run = tmp_path / "run"
    cfg = load_config("synthetic", [*tiny_overrides, "train.adam_epsilon=keras", "train.summed_replicas=4"])
    train(cfg, run, progress=False)
    saved = read_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]
    assert saved["param_groups"][0]["eps"] == pytest.approx(1e-7 / 4)
    assert "foreach" not in saved["param_groups"][0]  # KerasAdam's groups, not torch.optim.Adam's
