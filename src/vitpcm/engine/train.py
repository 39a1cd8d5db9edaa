"""Training: the authors' two-phase recipe, AMP, DDP under ``torchrun``, atomic checkpoints.

Phase 1 (``train.warmup_epochs``): backbone frozen, only HV-BiLSTM + classifier learn at
``train.warmup_lr``. Phase 2: the last ``train.unfreeze_blocks`` blocks and the final norm
join, with a fresh Adam at ``train.lr``. After every epoch: validation mIoU (when the val
split has masks), ``checkpoints/last.pt``, ``checkpoints/best.pt`` when the mIoU improves,
and one line in ``logs/metrics.jsonl``.

One training step (per batch of B images)::

    Z_sg   = model.eval()(view1)                     no gradient: ET targets
    out    = model(cat[view1, tile_2x2(ET views)])   one forward for both inputs
    L_MCE  = BCE(GMP(out[view1]), tags)
    L_ET   = CE(untile(out[tiled]), merge(T(Z_sg), tags))
    L_REG  = 0.01 * ||W||^2
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from vitpcm.config import to_yaml
from vitpcm.data import EvalTransform, TrainTransform, build_dataset, collate
from vitpcm.data.check import screen_for_training
from vitpcm.data.transforms import tile_views, untile_grid
from vitpcm.engine.checkpoint import init_from, read_checkpoint, save_checkpoint
from vitpcm.engine.distributed import all_reduce_sum, barrier, cleanup, init_distributed
from vitpcm.engine.infer import predict_grid, upsample
from vitpcm.errors import VitpcmError
from vitpcm.io import write_text_atomic
from vitpcm.losses import et_loss, et_targets, mce_loss, reg_loss
from vitpcm.metrics import ConfusionMatrix
from vitpcm.models.vitpcm import ViTPCM

log = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily switch off dropout (the authors take ET targets with training=False)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_model(cfg: DictConfig, num_classes: int) -> ViTPCM:
    m = cfg.model
    model = ViTPCM(
        backbone=m.backbone,
        num_classes=num_classes,
        pretrained=m.pretrained,
        img_size=cfg.input.train_size,
        hv_lstm=m.hv_lstm,
        lstm_hidden=m.lstm_hidden,
        dropout=m.dropout,
        classifier_init_std=m.classifier_init_std,
        backbone_kwargs=OmegaConf.to_container(m.backbone_kwargs, resolve=True),
    )
    if m.get("init_from"):
        init_from(model, m.init_from)
    d = model.patch_size
    for key in ("train_size", "et_crop", "et_scale"):
        value = int(cfg.input[key])
        if value % d:
            raise VitpcmError(f"input.{key}={value} is not a multiple of the backbone's patch size {d}")
    if cfg.infer.scale % d:
        raise VitpcmError(f"infer.scale={cfg.infer.scale} is not a multiple of the backbone's patch size {d}")
    return model


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class Trainer:
    """Owns the run folder, the model, the optimizer and the loop. Use :func:`train`."""

    def __init__(
        self, cfg: DictConfig, run_dir: Path, resume: bool = False, progress: bool = True, skip_bad: bool = False
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.dist, self.device = init_distributed(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(int(cfg.train.threads))
        seed_everything(int(cfg.train.seed) + self.dist.rank)

        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_dir = self.run_dir / "logs"
        last = self.ckpt_dir / "last.pt"
        if last.is_file() and not resume:
            raise VitpcmError(
                f"{self.run_dir} already holds a training run: pass --resume to continue it, or choose another --out"
            )
        if resume and not last.is_file():
            raise VitpcmError(f"--resume: {last} not found, nothing to resume")

        # Data first: a bad dataset should fail before a large model is built. Every item
        # is read once up front (data/check.py): broken ones stop the run, or with
        # --skip-bad are dropped and listed in RUN/skipped.txt.
        probe = build_dataset(cfg.data, cfg.data.train_split, strict=False)
        self.classes: List[str] = probe.classes
        self.val_set = self._build_val_set()
        screen_for_training([probe, self.val_set], self.run_dir, skip_bad, progress=progress and self.dist.main,
                            write=self.dist.main)  # fmt: skip
        self.model = build_model(cfg, len(self.classes)).to(self.device)
        d = self.model.patch_size
        self.train_set = probe
        self.train_set.transform = TrainTransform(
            cfg.input.train_size, cfg.input.et_crop, cfg.input.et_scale, d, cfg.augment
        )
        self.et_grid = cfg.input.et_scale // d
        self.use_amp = bool(cfg.train.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and not torch.cuda.is_bf16_supported()) if self.use_amp else None

        self.start_epoch = 0
        self.best_miou = -math.inf
        self.phase: Optional[str] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ddp: Optional[torch.nn.Module] = None
        self._resume_state: Optional[Dict[str, Any]] = None
        if resume:
            state = read_checkpoint(last)
            self.model.load_state_dict(state["model"])
            self.start_epoch = int(state["epoch"])
            self.best_miou = float(state.get("best_miou", -math.inf))
            self._resume_state = state

        if self.dist.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.yaml", to_yaml(cfg))
            write_text_atomic(self.run_dir / "classes.txt", "\n".join(self.classes) + "\n")
        self.writer = self._tensorboard()

    # ----------------------------------------------------------------- setup helpers
    def _build_val_set(self):
        cfg = self.cfg
        if not cfg.data.val_split or cfg.train.val_every <= 0:
            return None
        try:
            val = build_dataset(cfg.data, cfg.data.val_split, require_masks=False, strict=False)
        except VitpcmError as exc:
            if self.dist.main:
                log.warning("no validation: %s", exc)
            return None
        if not val.has_masks:
            if self.dist.main:
                log.warning("no validation: split '%s' lacks masks; best.pt will be the last epoch", cfg.data.val_split)
            return None
        if val.classes != self.classes:
            raise VitpcmError("train and val splits use different class lists")
        val.transform = EvalTransform(cfg.input.train_size)
        return val

    def _tensorboard(self):
        if not self.dist.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: metrics.jsonl still has everything
            log.info("tensorboard is not installed; logging to metrics.jsonl only")
            return None
        return SummaryWriter(log_dir=str(self.log_dir))

    def _loader(self, epoch: int) -> DataLoader:
        bs = int(self.cfg.train.batch_size)
        if self.dist.enabled:
            sampler = DistributedSampler(self.train_set, self.dist.world, self.dist.rank, shuffle=True, seed=int(self.cfg.train.seed))
            sampler.set_epoch(epoch)
        else:
            gen = torch.Generator().manual_seed(int(self.cfg.train.seed) + epoch)
            sampler = RandomSampler(self.train_set, generator=gen)
        per_rank = math.ceil(len(self.train_set) / self.dist.world)
        return DataLoader(
            self.train_set,
            batch_size=bs,
            sampler=sampler,
            num_workers=int(self.cfg.data.num_workers),
            collate_fn=collate,
            drop_last=per_rank >= 2 * bs,  # keep every image of a tiny set; else even batches
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=_seed_worker,
        )

    def _enter_phase(self, epoch: int) -> None:
        """Freeze/unfreeze and make a fresh Adam when the phase changes (the authors recompile)."""
        cfg = self.cfg.train
        phase = "warmup" if epoch < cfg.warmup_epochs else "finetune"
        if phase == self.phase:
            return
        self.phase = phase
        self.model.set_backbone_trainable(0 if phase == "warmup" else int(cfg.unfreeze_blocks))
        self.lr = float(cfg.warmup_lr if phase == "warmup" else cfg.lr)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.lr)
        if self._resume_state is not None and self._resume_state.get("phase") == phase and "optimizer" in self._resume_state:
            self.optimizer.load_state_dict(self._resume_state["optimizer"])
        self._resume_state = None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp = self.model
        if self.dist.main:
            n_train = sum(p.numel() for p in params)
            log.info("epoch %d: phase %s, lr %.2e, %d trainable parameters", epoch + 1, phase, self.lr, n_train)

    def _set_lr(self, progress: float) -> None:
        """Cosine decay over phase 2 when ``train.schedule=cosine``; ``progress`` in epochs."""
        cfg = self.cfg.train
        if cfg.schedule != "cosine" or self.phase != "finetune":
            return
        span = max(int(cfg.epochs) - int(cfg.warmup_epochs), 1)
        t = min(max((progress - int(cfg.warmup_epochs)) / span, 0.0), 1.0)
        lr = float(cfg.lr) * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr

    # ----------------------------------------------------------------- one step
    def _step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        lc = self.cfg.loss
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        b = images.shape[0]

        inputs = images
        if lc.et:
            with torch.no_grad(), eval_mode(self.model), _autocast(self.device, self.use_amp):
                probs_sg = self.model(images)["probs"]
            targets = et_targets(
                probs_sg, labels, batch["flips"], batch["et_box"], batch["et_flips"], self.model.patch_size, self.et_grid,
                merge=str(lc.et_merge),
            )
            tiled, count = tile_views(batch["image_et"].to(self.device, non_blocking=True))
            inputs = torch.cat([images, tiled], dim=0)

        with _autocast(self.device, self.use_amp):
            out = self.ddp(inputs)
        terms: Dict[str, torch.Tensor] = {}
        if lc.mce:
            terms["mce"] = mce_loss(out["pooled"][:b], labels)
        if lc.et:
            probs_et = untile_grid(out["probs"][b:], count)
            terms["et"] = float(lc.et_weight) * et_loss(probs_et, targets)
        if lc.reg:
            terms["reg"] = reg_loss(self.model.classifier.weight, float(lc.reg_weight))
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise VitpcmError(f"the loss became {loss.item()}: lower train.lr / train.warmup_lr or check the data")

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        record = {k: float(v.detach()) for k, v in terms.items()}
        record["loss"] = float(loss.detach())
        return record

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> Optional[float]:
        """Val mIoU of tag-merged predictions at the training size, upsampled to each mask."""
        if self.val_set is None:
            return None
        self.model.eval()
        cm = ConfusionMatrix(len(self.classes))
        indices = list(range(self.dist.rank, len(self.val_set), self.dist.world))
        subset = torch.utils.data.Subset(self.val_set, indices)
        loader = DataLoader(subset, batch_size=int(self.cfg.train.val_batch_size), shuffle=False,
                            num_workers=int(self.cfg.data.num_workers), collate_fn=collate)  # fmt: skip
        for batch in loader:
            with _autocast(self.device, self.use_amp):
                grid = predict_grid(self.model, batch["image"].to(self.device), batch["labels"].to(self.device))
            for i in range(grid.shape[0]):
                pred = upsample(grid[i].float(), batch["size"][i]).argmax(0).cpu().numpy()
                cm.update(pred, batch["mask"][i].numpy())
        total = torch.from_numpy(cm.matrix).to(self.device)
        cm.matrix = all_reduce_sum(total, self.dist).cpu().numpy()
        self.model.train()
        self.last_val = cm
        return cm.miou()

    # ----------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg.train
        from tqdm import tqdm

        metrics_path = self.log_dir / "metrics.jsonl"
        if self.dist.main:
            _truncate_metrics(metrics_path, self.start_epoch)
        history: List[Dict[str, Any]] = []
        global_step = self.start_epoch * max(1, len(self._loader(0)))
        for epoch in range(self.start_epoch, int(cfg.epochs)):
            self._enter_phase(epoch)
            self.model.train()
            loader = self._loader(epoch)
            sums: Dict[str, float] = {}
            n = 0
            t0 = time.time()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} ({self.phase})", unit="batch",
                       disable=not (self.progress and self.dist.main), leave=False)  # fmt: skip
            steps = len(loader)
            for it, batch in enumerate(bar):
                self._set_lr(epoch + it / max(steps, 1))
                record = self._step(batch)
                n += 1
                global_step += 1
                for k, v in record.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
                if self.writer is not None and global_step % max(1, int(cfg.log_every)) == 0:
                    for k, v in record.items():
                        self.writer.add_scalar(f"train/{k}", v, global_step)
            bar.close()
            train_time = time.time() - t0
            if self.dist.enabled:  # epoch means over every rank's batches
                keys = sorted(sums)
                packed = all_reduce_sum(torch.tensor([sums[k] for k in keys] + [n], dtype=torch.float64, device=self.device), self.dist)
                sums = dict(zip(keys, packed[:-1].tolist()))
                n = int(packed[-1].item())
            val_miou = None
            if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                val_miou = self.validate()
            row: Dict[str, Any] = {"epoch": epoch + 1, "phase": self.phase, "lr": self.lr}
            row.update({k: v / max(n, 1) for k, v in sums.items()})
            row["val_miou"] = val_miou
            row["seconds"] = round(train_time, 2)
            history.append(row)
            if self.dist.main:
                self._save(epoch, row, val_miou)
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                if self.writer is not None:
                    if val_miou is not None:
                        self.writer.add_scalar("val/miou", val_miou, epoch + 1)
                    self.writer.add_scalar("train/epoch_loss", row["loss"], epoch + 1)
                    self.writer.flush()
                shown = f", val mIoU {100 * val_miou:.2f}" if val_miou is not None else ""
                log.info("epoch %d/%d: loss %.4f%s (%.1fs)", epoch + 1, cfg.epochs, row["loss"], shown, train_time)
            barrier(self.dist)
        if self.writer is not None:
            self.writer.close()
        result = {
            "run": str(self.run_dir),
            "best_miou": None if self.best_miou == -math.inf else self.best_miou,
            "epochs": int(cfg.epochs),
            "history": history,
        }
        cleanup(self.dist)
        return result

    def _save(self, epoch: int, row: Dict[str, Any], val_miou: Optional[float]) -> None:
        improved = val_miou is not None and val_miou > self.best_miou
        if improved:
            self.best_miou = float(val_miou)
        state = {
            "arch": self.model.arch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "phase": self.phase,
            "epoch": epoch + 1,
            "best_miou": self.best_miou,
            "val_miou": val_miou,
            "classes": self.classes,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "metrics": row,
        }
        save_checkpoint(self.ckpt_dir / "last.pt", state)
        if improved or (self.val_set is None):
            state.pop("optimizer")
            save_checkpoint(self.ckpt_dir / "best.pt", state)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop lines of epochs that will be run again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= epochs_done:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def train(
    cfg: DictConfig, out: str | Path, resume: bool = False, progress: bool = True, skip_bad: bool = False
) -> Dict[str, Any]:
    """Train ViT-PCM as ``cfg`` says, writing the run to ``out``. Returns a summary dict.

    Broken data items stop training before it starts, unless ``skip_bad`` (then they are
    left out and listed in ``OUT/skipped.txt``)."""
    trainer = Trainer(cfg, Path(out), resume=resume, progress=progress, skip_bad=skip_bad)
    return trainer.fit()
