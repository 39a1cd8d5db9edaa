"""The HV-BiLSTM's LSTMs are Keras's: one bias (``bias_hh`` a zero buffer, never trained), the
kernels drawn as Keras draws them, and checkpoints from before the single bias still work."""

from __future__ import annotations

import math

import torch

from vitpcm.config import load_config
from vitpcm.engine.checkpoint import read_checkpoint
from vitpcm.models.vitpcm import HVBiLSTM
from vitpcm.stages.load import load_run
from vitpcm.stages.train import train

LSTM_BIASES = [f"{d}.bias_{k}_l0{s}" for d in ("rows", "cols") for k in ("ih", "hh") for s in ("", "_reverse")]


def test_bias_hh_is_a_zero_buffer_that_training_never_moves():
    torch.manual_seed(0)
    head = HVBiLSTM(12, hidden=4, dropout=0.0)
    names = {n for n, _ in head.named_parameters()}
    assert not any("bias_hh" in n for n in names) and all(f"{d}.bias_ih_l0" in names for d in ("rows", "cols"))
    assert set(LSTM_BIASES) <= set(head.state_dict())  # the keys of every checkpoint stay
    before = {k: v.clone() for k, v in head.state_dict().items()}
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(2, 3, 5, 12)).square().mean().backward()
        opt.step()
    after = head.state_dict()
    for key in LSTM_BIASES:
        if "bias_hh" in key:
            assert not after[key].any()
        else:
            assert not torch.equal(after[key], before[key])  # the single bias does learn


def test_lstm_kernels_are_drawn_whole_as_keras_draws_them():
    torch.manual_seed(1)
    e, u = 96, 24
    head = HVBiLSTM(e, hidden=u)
    for lstm in (head.rows, head.cols):
        for suffix in ("", "_reverse"):
            w_ih = getattr(lstm, f"weight_ih_l0{suffix}").detach()  # Keras kernel [e, 4u], transposed
            limit = math.sqrt(6.0 / (e + 4 * u))  # glorot_uniform over the whole [e, 4u] matrix
            assert w_ih.abs().max() <= limit and w_ih.abs().max() > 0.95 * limit
            w_hh = getattr(lstm, f"weight_hh_l0{suffix}").detach()  # Keras recurrent kernel [u, 4u], transposed
            # Keras: one orthogonal [u, 4u] matrix, rows orthonormal across all four gates
            assert torch.allclose(w_hh.T @ w_hh, torch.eye(u), atol=1e-5)
            # not each gate on its own: a gate's block has columns of norm about 1/2, not 1
            block = w_hh[:u]
            assert (block.norm(dim=0) < 0.8).all()
            bias = getattr(lstm, f"bias_ih_l0{suffix}").detach()
            assert torch.equal(bias, torch.cat([torch.zeros(u), torch.ones(u), torch.zeros(2 * u)]))


def test_a_checkpoint_with_a_trained_bias_hh_predicts_as_before_and_resumes(tmp_path, tiny_overrides):
    """A run trained before the single bias has non-zero ``bias_hh`` parameters, and Adam state
    for each. Made here from a new run: the bias split in two (the sum unchanged) and an
    optimizer entry for each ``bias_hh`` put back after its ``bias_ih``, as the old layout had."""
    run = tmp_path / "run"
    train(load_config("synthetic", [*tiny_overrides, "train.epochs=2"]), run, progress=False)
    last = run / "checkpoints" / "last.pt"
    state = read_checkpoint(last)
    model, _ = load_run(run, "last")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)["probs"]

    torch.manual_seed(2)
    weights = state["model"]
    for key in [k for k in weights if ".bias_hh_l0" in k]:
        ih = key.replace("bias_hh", "bias_ih")
        part = 0.5 * torch.randn_like(weights[ih])
        weights[ih], weights[key] = weights[ih] - part, part
    model.set_backbone_trainable(int(state["config"]["train"]["unfreeze_blocks"]))  # the saved (finetune) phase
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = state["optimizer"]
    ids, old_ids, old_state = opt["param_groups"][0]["params"], [], {}
    for i, name in zip(ids, names):
        old_ids.append(len(old_ids))
        old_state[old_ids[-1]] = opt["state"][i]
        if "conditioning." in name and ".bias_ih_l0" in name:
            old_ids.append(len(old_ids))  # its bias_hh, trained beside it
            old_state[old_ids[-1]] = {k: v.clone() for k, v in opt["state"][i].items()}
    opt["param_groups"][0]["params"], opt["state"] = old_ids, old_state
    torch.save(state, last)

    old, _ = load_run(run, "last")
    for key in [k for k in old.state_dict() if ".bias_hh_l0" in k]:
        assert not old.state_dict()[key].any()  # folded into bias_ih on load
    with torch.no_grad():
        assert torch.allclose(old(images)["probs"], expected, atol=1e-6)
    result = train(None, run, resume=True, overrides=["train.epochs=3"], progress=False)
    assert result["epochs"] == 3 and result["history"][-1]["epoch"] == 3
    resumed = read_checkpoint(last)["model"]
    assert all(not resumed[k].any() for k in resumed if ".bias_hh_l0" in k)
