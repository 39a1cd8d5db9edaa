"""The engine is task-agnostic: a toy task (a linear model on random tensors) trains through
the same Trainer as ViT-PCM, with checkpoints, resume, phases, schedules, accumulation and
the divergence stop."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from vitpcm.engine.checkpoint import non_finite_tensors, read_checkpoint
from vitpcm.engine.task import EngineContext, Phase, Task, poly_lr
from vitpcm.engine.trainer import Trainer, TrainSettings
from vitpcm.errors import VitpcmError
from vitpcm.models.registry import create_model, register_model
from vitpcm.runs import RunLayout
from vitpcm.stages.load import load_model


class Linear(nn.Module):
    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.arch = {"features": features}
        self.body = nn.Linear(features, features)
        self.head = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x))).squeeze(-1)


register_model("toy-linear", lambda arch: Linear(**arch))


class ToyTask(Task):
    """Regression y = x . w; two phases (head only, then all), 10x lr on the head in phase 2,
    poly decay, optional gradient accumulation and injected faults."""

    metric = "score"
    metric_label = "score"

    def __init__(self, n: int = 64, accumulate: int = 1, nan_at_epoch: int = 0, poison_at_epoch: int = 0) -> None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=gen)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.items = [{"x": x[i], "y": y[i]} for i in range(n)]
        self.accumulate = accumulate
        self.nan_at_epoch, self.poison_at_epoch = nan_at_epoch, poison_at_epoch
        self.epochs_seen = set()
        self.steps = 0
        self.classes = ["value"]

    def setup(self, ctx: EngineContext) -> None:
        self.model = Linear().to(ctx.device)
        self.train_set = self.items
        self.epoch = 0

    def phases(self):
        return [Phase("head", 0, 0.05), Phase("all", 1, 0.02)]

    def param_groups(self, phase, model):
        for p in model.body.parameters():
            p.requires_grad_(phase.name == "all")
        groups = [{"params": list(model.head.parameters()), "lr_scale": 10.0 if phase.name == "all" else 1.0}]
        if phase.name == "all":
            groups.append({"params": list(model.body.parameters())})
        return groups

    def make_optimizer(self, phase, groups):
        opt = torch.optim.SGD(groups, momentum=0.9)
        step = opt.step

        def counted(*args, **kwargs):
            self.steps += 1
            return step(*args, **kwargs)

        opt.step = counted
        return opt

    def lr_at(self, phase, progress):
        self.epoch = int(progress)
        return poly_lr(phase.lr, progress / 4) if phase.name == "all" else None

    def accumulate_steps(self):
        return self.accumulate

    def train_step(self, model, batch, ctx):
        loss = ((model(batch["x"].to(ctx.device)) - batch["y"].to(ctx.device)) ** 2).mean()
        if self.nan_at_epoch and self.epoch + 1 >= self.nan_at_epoch:
            loss = loss * float("nan")
        if self.poison_at_epoch and self.epoch + 1 >= self.poison_at_epoch:
            with torch.no_grad():
                self.model.body.weight[0, 0] = float("inf")  # loss finite now, weights not
        return loss, {"mse": float(loss.detach())}

    @property
    def has_validation(self):
        return True

    @torch.no_grad()
    def validate(self, ctx):
        self.model.eval()
        x = torch.stack([i["x"] for i in self.items])
        y = torch.stack([i["y"] for i in self.items])
        mse = float(((self.model(x) - y) ** 2).mean())
        return {"score": 1.0 / (1.0 + mse), "mse": mse}

    def checkpoint_extras(self):
        return {"arch": {"name": "toy-linear", **self.model.arch}, "classes": self.classes}


def settings(epochs: int = 3, **kw) -> TrainSettings:
    return TrainSettings(epochs=epochs, batch_size=8, seed=0, device="cpu", **kw)


def test_toy_task_trains_and_writes_the_run(tmp_path):
    run = tmp_path / "run"
    result = Trainer(ToyTask(), run, settings(4), progress=False, config_text="toy: 1\n").fit()
    layout = RunLayout(run)
    rows = layout.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["phase"] for r in rows] == ["head", "all", "all", "all"]
    assert rows[-1]["mse"] < rows[0]["mse"] and rows[-1]["loss"] == rows[-1]["mse"]
    assert rows[-1]["val_score"] > rows[0]["val_score"] and "val_mse" in rows[-1]
    assert result["best_score"] == max(r["val_score"] for r in rows)
    assert layout.config.read_text() == "toy: 1\n" and layout.classes.read_text() == "value\n"
    state = read_checkpoint(layout.checkpoint("last"))
    assert state["epoch"] == 4 and state["phase"] == "all" and "optimizer" in state
    best = read_checkpoint(layout.checkpoint("best"))
    assert best["best_score"] == result["best_score"] and "optimizer" not in best
    # the registry rebuilds the toy model from its arch: the engine never names a class
    model, _ = load_model(layout.checkpoint("last"))
    assert isinstance(model, Linear) and torch.equal(model.head.weight, torch.as_tensor(state["model"]["head.weight"]))


def test_phases_lr_scale_and_poly_schedule(tmp_path):
    task = ToyTask()
    trainer = Trainer(task, tmp_path / "run", settings(4), progress=False)
    trainer.fit()
    head, body = trainer.optimizer.param_groups
    # last batch of epoch 4: progress = 3 + 7/8; poly over 4 epochs; head at 10x
    expected = poly_lr(0.02, (3 + 7 / 8) / 4)
    assert body["lr"] == pytest.approx(expected) and head["lr"] == pytest.approx(10 * expected)
    rows = RunLayout(tmp_path / "run").read_metrics()
    assert rows[0]["lr"] == 0.05 and rows[-1]["lr"] == pytest.approx(expected)


def test_gradient_accumulation_steps_once_per_window(tmp_path):
    one = ToyTask()
    Trainer(one, tmp_path / "a", settings(1), progress=False).fit()
    two = ToyTask(accumulate=3)
    Trainer(two, tmp_path / "b", settings(1), progress=False).fit()
    assert one.steps == 8 and two.steps == math.ceil(8 / 3)  # last, partial window steps too


def test_existing_run_needs_resume_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    Trainer(ToyTask(), run, settings(2), progress=False).fit()
    with pytest.raises(VitpcmError, match="--resume"):
        Trainer(ToyTask(), run, settings(2), progress=False)
    with pytest.raises(VitpcmError, match="nothing to resume"):
        Trainer(ToyTask(), tmp_path / "empty", settings(2), resume=True, progress=False)
    result = Trainer(ToyTask(), run, settings(4), resume=True, progress=False).fit()
    assert [r["epoch"] for r in result["history"]] == [3, 4]
    assert [r["epoch"] for r in RunLayout(run).read_metrics()] == [1, 2, 3, 4]
    assert read_checkpoint(RunLayout(run).checkpoint("last"))["epoch"] == 4


def test_resume_is_exact_at_epoch_boundaries(tmp_path):
    """2 + 2 epochs give the weights of 4 uninterrupted ones (same phase: optimizer restored)."""
    Trainer(ToyTask(), tmp_path / "full", settings(4), progress=False).fit()
    Trainer(ToyTask(), tmp_path / "cut", settings(2), progress=False).fit()
    Trainer(ToyTask(), tmp_path / "cut", settings(4), resume=True, progress=False).fit()
    a = read_checkpoint(RunLayout(tmp_path / "full").checkpoint("last"))["model"]
    b = read_checkpoint(RunLayout(tmp_path / "cut").checkpoint("last"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_before_backward_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    task = ToyTask(nan_at_epoch=2)
    trainer = Trainer(task, run, settings(3), progress=False)
    with pytest.raises(VitpcmError) as info:
        trainer.fit()
    message = str(info.value)
    assert "the loss became nan at epoch 2, batch 1/8 (step 9)" in message
    assert str(RunLayout(run).checkpoint("last")) in message and "\n" not in message
    state = read_checkpoint(RunLayout(run).checkpoint("last"))
    assert state["epoch"] == 1 and non_finite_tensors(state["model"]) == []
    assert non_finite_tensors(trainer.model.state_dict()) == []  # no backward of the NaN loss


def test_nan_in_the_first_epoch_says_no_checkpoint_yet(tmp_path):
    with pytest.raises(VitpcmError, match="no checkpoint was written yet"):
        Trainer(ToyTask(nan_at_epoch=1), tmp_path / "run", settings(2), progress=False).fit()
    assert not RunLayout(tmp_path / "run").checkpoint("last").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(VitpcmError, match="weights became non-finite .* at epoch 2 \\(not saved\\)"):
        Trainer(ToyTask(poison_at_epoch=2), run, settings(3), progress=False).fit()
    state = read_checkpoint(RunLayout(run).checkpoint("last"))
    assert state["epoch"] == 1 and non_finite_tensors(state) == []
    # and a checkpoint with NaN weights is refused by the loader
    state["model"]["body.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(VitpcmError, match="non-finite weights"):
        load_model(tmp_path / "bad.pt")


def test_registry_defaults_to_vitpcm_and_refuses_unknown_names():
    with pytest.raises(VitpcmError, match="model 'nope' is unknown"):
        create_model({"name": "nope"})
    model = create_model({"backbone": "vit_tiny_patch16_224", "num_classes": 3, "img_size": 32, "lstm_hidden": 4,
                          "backbone_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}})  # fmt: skip
    assert type(model).__name__ == "ViTPCM" and model.num_classes == 3


def test_engine_imports_no_model_data_or_task_code():
    code = (
        "import sys, vitpcm.engine.trainer, vitpcm.engine.task, vitpcm.engine.checkpoint\n"
        "bad = [m for m in sys.modules if m.startswith(('vitpcm.models.vitpcm', 'vitpcm.data', 'vitpcm.tasks',"
        " 'vitpcm.stages', 'timm'))]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_torchrun_nan_on_one_rank_stops_every_rank(tmp_path):
    """Under DDP a NaN on rank 1 alone stops both ranks with the message (no hang in all-reduce),
    and rank 0 has written epoch 1 only."""
    import os
    from pathlib import Path

    script = tmp_path / "toy_ddp.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.engine.test_engine import ToyTask, settings\n"
        "from vitpcm.engine.trainer import Trainer\n"
        "from vitpcm.errors import VitpcmError\n"
        "rank = int(os.environ['RANK'])\n"
        "try:\n"
        f"    Trainer(ToyTask(nan_at_epoch=2 if rank == 1 else 0), {str(tmp_path / 'run')!r}, settings(3), progress=False).fit()\n"
        "except VitpcmError as exc:\n"
        "    print(f'rank {rank}: {exc}', flush=True)\n"
        "    time.sleep(3 if rank == 1 else 0)  # rank 0 must get there by itself, not be killed first\n"
        "    sys.exit(3)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode != 0
    shown = proc.stdout + proc.stderr[-2000:]
    assert "rank 1: the loss became nan at epoch 2, batch 1/" in proc.stdout, shown
    assert "rank 0: the loss became non-finite on another rank at epoch 2, batch 1/" in proc.stdout, shown
    assert read_checkpoint(RunLayout(tmp_path / "run").checkpoint("last"))["epoch"] == 1
