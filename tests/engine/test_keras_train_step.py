"""vitpcm's training step against the authors' Keras ``train_step``, without TensorFlow.

The fixture ``tests/fixtures/keras_train_tiny.h5`` is a narrow, shallow ViT-PCM of the
authors' architecture (width 32, 2 blocks, 2 heads, HV-BiLSTM 8, 21 classes, random weights)
that real Keras wrote with ``save_weights``; ``keras_train_tiny.npz`` holds a global batch of
16 images (uint8, enlarged to 384 by both sides), its transform records, and what the
authors' own ``VITPCM.train_step`` (deepplants/ViT-PCM ``model.py``, tf_keras 2.21, legacy
Keras Adam, ``MirroredStrategy`` over 4 replicas of 4 images, dropout 0) made of it in 5
consecutive steps: 2 of the warm-up phase (lr 1e-3, backbone frozen), then ``unfreeze()``
(last block + final norm) and a fresh Adam (lr 1e-4) for 3: each replica's loss terms and
the weights after every step. Written by
``benchmarks/keras_reference/train_step_check.py --archs tiny --fixture``.

The test replays vitpcm's steps with the trainer's own code (``Stepper.enter_phase`` /
``training_step`` of ``engine/step.py``, ``PcmTask.train_step`` and ``make_optimizer``; ``train.global_batch=16``
as 4 accumulated batches of 4, each one of the authors' replicas) and asserts, after every
step, every weight within 0.05 lr of Keras's and every loss term within 1e-5 relative
(measured: <= 0.003 lr, <= 2e-7), and that torch.optim.Adam's epsilon in place of Keras's
(``train.adam_epsilon=torch``) is caught (0.87 lr at step 1). It also fails when
``KerasAdam`` is swapped for ``torch.optim.Adam`` with the same epsilon (checked by hand:
0.66 lr at step 1), without ``train.summed_replicas`` (0.33 lr) and on vitpcm before issue
17 (LSTM bias learned twice: 1.02 lr). Single-threaded: the replay is ~2 s of CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = next(
    p / "fixtures" for p in Path(__file__).resolve().parents if (p / "fixtures" / "keras_train_tiny.h5").is_file()
)
H5 = FIXTURES / "keras_train_tiny.h5"
NPZ = FIXTURES / "keras_train_tiny.npz"
HARNESS = FIXTURES.parent.parent / "benchmarks" / "keras_reference" / "train_step_check.py"


def _harness():
    """The vitpcm side of the benchmark (replay + comparison), loaded from its file: one copy of
    the replay code for the benchmark and this test."""
    spec = importlib.util.spec_from_file_location("train_step_check", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return _harness()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The replay is ~1.6 s of CPU; on a busy machine several threads make it minutes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(NPZ))


@pytest.fixture(scope="module")
def run(tmp_path_factory, fixture):
    from vitpcm.stages.import_keras import import_keras

    out = tmp_path_factory.mktemp("keras_train") / "run"
    overrides = [str(s) for s in fixture["arch_overrides"]] + [str(s) for s in fixture["run_overrides"]]
    import_keras(H5, "voc12", overrides, out)
    return out


def _replay(harness, fixture, run, variant):
    overrides = [str(s) for s in fixture["run_overrides"]] + [str(s) for s in fixture["trainer_overrides"]]
    overrides += harness.VARIANTS[variant]
    records = {k: fixture[f"record_{k}"] for k in ("flips", "et_box", "et_flips")}
    keys = [str(k) for k in fixture["keys"]]
    torch.manual_seed(0)
    mine = harness.replay(run, overrides, fixture["images"], fixture["labels"], records,
                          int(fixture["warmup_steps"]), int(fixture["finetune_steps"]), keep=keys)  # fmt: skip
    rows = []
    for k, step in enumerate(mine["steps"], 1):
        keras_w = {name: torch.from_numpy(fixture[f"step{k}/{name}"]) for name in keys if f"step{k}/{name}" in fixture}
        losses = {key: fixture[key][k - 1] for key in ("bce_loss", "reg_loss", "cce_loss")}
        rows.append(harness.compare_step(step, keras_w, losses))
    return mine, rows


def test_fixture_is_what_the_test_expects(fixture):
    assert fixture["images"].shape == (16, 40, 56, 3) and fixture["images"].dtype == np.uint8
    assert int(fixture["warmup_steps"]) >= 1 and int(fixture["warmup_steps"]) + int(fixture["finetune_steps"]) >= 5
    assert int(fixture["replicas"]) == 4
    assert (fixture["record_et_box"] != [0, 0, 384, 384]).any(axis=1).any(), "no ET crop in the batch"
    assert H5.stat().st_size < 500_000


def test_steps_match_keras(harness, fixture, run):
    """Every element within 0.05 lr of Keras after every step (both phases, a fresh Adam at
    the phase change, 4 accumulated batches per step), every loss term within 1e-5 relative."""
    mine, rows = _replay(harness, fixture, run, "keras")
    assert mine["accumulate"] == 4 and mine["batch_size"] == 4
    assert [r["phase"] for r in rows] == ["warmup"] * int(fixture["warmup_steps"]) + ["finetune"] * int(
        fixture["finetune_steps"]
    )
    # the tensors each phase trains were compared (the LSTMs and the classifier; then a block and the norm)
    assert set(rows[0]["weights"]) >= {"lstm_weights", "lstm_biases", "classifier"}
    assert set(rows[-1]["weights"]) >= {"backbone_blocks", "final_norm"}
    bad = [
        (k, r["phase"], {g: round(v["max_dw_over_lr"], 4) for g, v in r["weights"].items()},
         {t: f"{v['max_rel_diff']:.1e}" for t, v in r["losses"].items()})
        for k, r in enumerate(rows, 1) if not r["pass"]
    ]  # fmt: skip
    assert not bad, f"vitpcm's update drifted from the authors' Keras step (max |dw| / lr, loss rel diff): {bad}"


def test_torch_epsilon_is_caught(harness, fixture, run):
    """The fixture has teeth: torch.optim.Adam's epsilon (1e-8 after bias correction) moves
    the small-gradient elements differently from Keras's by more than the tolerance."""
    _, rows = _replay(harness, fixture, run, "torch")
    assert max(r["max_dw_over_lr"] for r in rows) > harness.WEIGHT_TOL
