"""A toy task for the engine's fault tests, light enough to import in a torchrun worker
(torch and vitpcm.engine only)."""

from __future__ import annotations

import os
import signal

import torch
import torch.nn as nn

from vitpcm.engine.task import Phase, Task, cosine_lr
from vitpcm.engine.trainer import TrainSettings


class NoisyToy(Task):
    """Regression y = x . w by a tiny MLP, with noise from the global generator in every step
    (as dropout draws), and a signal sent to itself during step ``signal_at``."""

    metric = "score"

    def __init__(self, signal_at: int = 0, signum: int = signal.SIGTERM) -> None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=gen)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.items = [{"x": x[i], "y": y[i]} for i in range(64)]
        self.signal_at, self.signum, self.calls = signal_at, signum, 0

    def setup(self, ctx):
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(ctx.device)
        self.train_set = self.items

    def phases(self):
        return [Phase("head", 0, 0.05), Phase("all", 1, 0.02)]

    def param_groups(self, phase, model):
        for p in model[0].parameters():
            p.requires_grad_(phase.name == "all")
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def lr_at(self, phase, progress):
        return cosine_lr(phase.lr, progress / 3)

    def train_step(self, model, batch, ctx):
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.signum)  # arrives during the step, as a pre-emption does
        x = batch["x"] + 0.1 * torch.randn_like(batch["x"])
        loss = ((model(x).squeeze(-1) - batch["y"]) ** 2).mean()
        return loss, {"mse": float(loss.detach())}

    @property
    def has_validation(self):
        return True

    @torch.no_grad()
    def validate(self, ctx):
        x = torch.stack([i["x"] for i in self.items])
        y = torch.stack([i["y"] for i in self.items])
        return {"score": 1.0 / (1.0 + float(((self.model(x).squeeze(-1) - y) ** 2).mean()))}

    def checkpoint_extras(self):
        return {"arch": {"name": "noisy-toy"}}


def toy_settings(**kw) -> TrainSettings:
    return TrainSettings(epochs=3, batch_size=8, seed=0, device="cpu", **kw)
