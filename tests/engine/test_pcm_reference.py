"""ViT-PCM through the engine trains exactly as the loop it replaced (``engine/train.py`` of
5bfc033) did: the reference below is that loop written out by hand, around the task's own
setup and training step. A run is chaotic (an ulp of difference in one step shows in the
val mIoU a few epochs later), so anything the loop adds must leave the numbers alone:

* the random generators: the training loader draws one torch seed per epoch, the val
  loader one per validation, nothing else does (not the checks before a save, not a
  mid-epoch ``last.pt``, not ``best.pt``); augmentation and dropout draw from them;
* the phases: backbone frozen in ``warmup`` at ``warmup_lr``, then a *fresh* Adam over the
  trainable parameters at ``lr``, cosine over the finetune epochs, the lr set before
  every batch at ``epoch + batch / batches``;
* the model back in train mode after the ET-target forward and after validation.

The demo's 30 epochs were compared the same way, the 5bfc033 code against the engine on the
demo's data: every metrics.jsonl value and every weight of last.pt and best.pt equal.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Subset

from vitpcm.config import load_config
from vitpcm.data import collate
from vitpcm.engine.checkpoint import read_checkpoint
from vitpcm.engine.distributed import init_distributed
from vitpcm.engine.task import EngineContext
from vitpcm.evaluation.confusion import ConfusionMatrix
from vitpcm.models.predict import predict_grid, upsample
from vitpcm.runs import RunLayout
from vitpcm.stages.config import resolve_config
from vitpcm.stages.train import train
from vitpcm.tasks.pcm import PcmTask

# TINY of conftest with two blocks and three epochs: one frozen (warm-up), two fine-tuning the
# last block under the cosine; dropout on, so the forward draws from torch's generator too
OVERRIDES = [
    "model.backbone=vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.lstm_hidden=8",
    "model.dropout=0.2",
    "input.train_size=32",
    "input.et_crop=16",
    "input.et_scale=16",
    "infer.scale=32",
    "train.epochs=3",
    "train.warmup_epochs=1",
    "train.warmup_lr=2e-3",
    "train.lr=1e-3",
    "train.unfreeze_blocks=1",
    "train.schedule=cosine",
    "train.batch_size=4",
    "train.val_batch_size=4",
    "data.num_workers=0",
]


def reference_run(cfg, folder: Path):
    """The 5bfc033 loop (``Trainer.fit``), one process on the CPU: weights and metric rows."""
    t = cfg.train
    seed = int(t.seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    dist, device = init_distributed("cpu")
    ctx = EngineContext(device=device, dist=dist, run=RunLayout(folder), progress=False)
    folder.mkdir(parents=True)
    task = PcmTask(cfg)
    task.setup(ctx)  # datasets, then the model: the draws of the old Trainer.__init__
    model, data, bs = task.model, task.train_set, int(t.batch_size)
    epochs, warmup = int(t.epochs), int(t.warmup_epochs)
    rows, phase, optimizer = [], None, None
    for epoch in range(epochs):
        now = "warmup" if epoch < warmup else "finetune"
        if now != phase:
            phase = now
            model.set_backbone_trainable(0 if phase == "warmup" else int(t.unfreeze_blocks))
            lr = float(t.warmup_lr if phase == "warmup" else t.lr)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed + epoch))
        loader = DataLoader(data, batch_size=bs, sampler=sampler, num_workers=0, collate_fn=collate,
                            drop_last=len(data) >= 2 * bs)  # fmt: skip
        steps, sums = len(loader), {}
        for it, batch in enumerate(loader):
            if t.schedule == "cosine" and phase == "finetune":
                progress = (epoch + it / steps - warmup) / max(epochs - warmup, 1)
                progress = min(max(progress, 0.0), 1.0)
                lr = float(t.lr) * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss, terms = task.train_step(model, batch, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {**terms, "loss": float(loss.detach())}.items():
                sums[k] = sums.get(k, 0.0) + v
        # validation: tag-merged predictions at the training size, one loader (one torch draw)
        model.eval()
        cm = ConfusionMatrix(len(task.classes))
        val = Subset(task.val_set, list(range(len(task.val_set))))
        with torch.no_grad():
            for vb in DataLoader(val, batch_size=int(t.val_batch_size), shuffle=False, num_workers=0,
                                 collate_fn=collate):  # fmt: skip
                grid = predict_grid(model, vb["image"], vb["labels"])
                for i in range(grid.shape[0]):
                    pred = upsample(grid[i].float(), vb["size"][i], bool(cfg.input.align_corners)).argmax(0)
                    cm.update(pred.numpy(), vb["mask"][i].numpy())
        model.train()
        rows.append({"epoch": epoch + 1, "phase": phase, "lr": lr, **{k: v / steps for k, v in sums.items()},
                     "val_miou": cm.miou()})  # fmt: skip
    return model.state_dict(), rows


def test_engine_trains_pcm_as_the_old_loop(tmp_path, synth_root):
    # last.pt after every step as well as at epoch ends (the demo saves at epoch ends only)
    cfg = resolve_config(load_config("synthetic", [*OVERRIDES, f"data.root={synth_root}", "train.checkpoint_every=1"]))
    assert float(cfg.train.max_loss) > 0  # the engine's forward check before each save is on
    weights, rows = reference_run(cfg, tmp_path / "reference")

    result = train(cfg, tmp_path / "run", progress=False)
    last = read_checkpoint(RunLayout(tmp_path / "run").checkpoint("last"))
    keys = ["epoch", "phase", "lr", "mce", "et", "reg", "loss", "val_miou"]
    assert [{k: r[k] for k in keys} for r in result["history"]] == [{k: r[k] for k in keys} for r in rows]
    assert last["model"].keys() == weights.keys()
    differ = [k for k in weights if not torch.equal(last["model"][k], weights[k])]
    assert not differ, f"{len(differ)} tensors differ from the old loop's, e.g. {differ[0]}"


def test_transforms_on_the_device_train_the_same_model(tmp_path, synth_root):
    """data.transforms_on=device (the GPU default): the loader draws, train_step makes the
    pixels; on the CPU every weight equals the loader-made run's (the authors' jitter: the
    batched path)."""
    base = [*OVERRIDES, f"data.root={synth_root}", "augment.jitter_space=authors", "train.epochs=1"]
    results = {}
    for where in ("loader", "device"):
        cfg = resolve_config(load_config("synthetic", [*base, f"data.transforms_on={where}"]))
        results[where] = train(cfg, tmp_path / where, progress=False)["history"]
    keys = ["epoch", "phase", "lr", "mce", "et", "reg", "loss", "val_miou"]
    assert [{k: r[k] for k in keys} for r in results["loader"]] == [{k: r[k] for k in keys} for r in results["device"]]
    a, b = (read_checkpoint(RunLayout(tmp_path / w).checkpoint("last"))["model"] for w in ("loader", "device"))
    assert all(torch.equal(a[k], b[k]) for k in a)
