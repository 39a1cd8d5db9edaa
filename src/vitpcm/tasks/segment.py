"""The verification DeepLab as an engine task: kazuto1011/deeplab-pytorch's recipe.

One phase; SGD with momentum over three parameter groups (kazuto1011's ``lr_mult`` /
``decay_mult``): the trunk at ``segment.lr`` with weight decay, the head's weights at
``head_lr_scale`` x (10) with weight decay, the head's biases at ``head_bias_lr_scale`` x
(20) without. The learning rate follows the poly schedule ``lr * (1 - t) ** power`` over
the whole run, ``t`` = progress / epochs (per batch). The trunk's batch norm stays in eval
mode without gradients (``segment.freeze_bn``).

Iterations map onto the engine's epochs: one optimizer step takes ``batch_size`` images on
each of the ``world`` processes, ``accumulate`` times; an epoch of the ``N`` pseudo-masked
images has ``B = N / (batch_size x world)`` batches (whole batches only once a process has
at least two, as the engine's loader drops the last partial one; else rounded up) and
``ceil(B / accumulate)`` steps, and the run lasts ``iterations / steps per epoch`` epochs
rounded to the nearest whole number (:func:`iterations_to_epochs`; the summary and the log
say how many steps that makes). VOC trainaug (10,582 images) at 10 per step: 1,058 steps
per epoch, 19 epochs = 20,102 steps for the recipe's 20,000; COCO train (82,081) at 10:
8,208 per epoch, 12 epochs = 98,496 steps for 100,000.

One training step (kazuto1011's ``train``): logits at every MSC scale (full, 0.5, 0.75 and
their max), each against the labels resized to its own size with nearest neighbour
(255 ignored); the losses are summed. ``segment.loss_at=input`` instead upsamples every
logit map (bilinear) to the crop and scores it against the labels as they are: with small
crops (the CPU demo's 64 px: 8 x 8 logits) labels shrunk to the logits lose thin shapes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vitpcm.classes import IGNORE_INDEX
from vitpcm.data.pseudo import PseudoMaskDataset, SegmentEvalTransform, SegmentTrainTransform, segment_collate
from vitpcm.engine.distributed import all_reduce_sum
from vitpcm.engine.task import EngineContext, Phase, Task, poly_lr
from vitpcm.engine.trainer import TrainSettings
from vitpcm.evaluation.confusion import ConfusionMatrix
from vitpcm.models.deeplab import DeepLab
from vitpcm.models.registry import model_arch
from vitpcm.tasks.settings import engine_settings

log = logging.getLogger(__name__)

ARCH_NAME = "deeplab"  # the registry name stored in checkpoints


def steps_per_epoch(images: int, batch_size: int, world: int, accumulate: int) -> int:
    """Optimizer steps in one epoch of ``images`` (the engine's loader: each process gets
    ``ceil(images / world)``; the last partial batch is dropped once a process has two
    whole batches)."""
    per_rank = math.ceil(images / max(1, world))
    batches = per_rank // batch_size if per_rank >= 2 * batch_size else math.ceil(per_rank / batch_size)
    return max(1, math.ceil(max(1, batches) / max(1, accumulate)))


def iterations_to_epochs(iterations: int, images: int, batch_size: int, world: int, accumulate: int) -> Tuple[int, int]:
    """``(epochs, optimizer steps they make)``: the whole number of epochs nearest to
    ``iterations`` steps (at least one)."""
    per_epoch = steps_per_epoch(images, batch_size, world, accumulate)
    epochs = max(1, int(math.floor(int(iterations) / per_epoch + 0.5)))
    return epochs, epochs * per_epoch


def segment_settings(cfg: DictConfig, epochs: int) -> TrainSettings:
    """The engine's settings: ``segment.batch_size``, ``segment.val_every`` and the epochs; the
    rest from ``train.*`` as for ViT-PCM (:func:`vitpcm.tasks.settings.engine_settings`)."""
    s = cfg.segment
    return engine_settings(cfg, epochs=int(epochs), batch_size=int(s.batch_size), val_every=int(s.val_every))


def build_deeplab(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> DeepLab:
    """The DeepLab of ``cfg.segment`` (``pretrained=False``: ignore ``backbone_weights``)."""
    s = cfg.segment
    return DeepLab(
        num_classes,
        model=str(s.model),
        backbone=str(s.backbone),
        output_stride=None if s.output_stride is None else int(s.output_stride),
        rates=None if s.rates is None else [int(r) for r in s.rates],
        msc_scales=[float(v) for v in s.msc_scales],
        backbone_weights=OmegaConf.to_container(s, resolve=True)["backbone_weights"] if pretrained else None,
        mean=[float(v) for v in s.mean],
        std=[float(v) for v in s.std],
    )


def resize_labels(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` int64 labels -> ``size`` by nearest neighbour at pixel centres (as PIL's
    NEAREST, kazuto1011's ``resize_labels``)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[B, C, h, w]`` against ``labels`` ``[B, h, w]`` (255 ignored).

    ``ce``: the mean over labelled pixels. ``balanced``: each class present in the batch's
    labels contributes the mean loss of its own pixels, and those means are averaged, so
    large background areas do not drown small objects. A batch without a labelled pixel
    gives 0 (with a gradient path, so DDP stays in step).
    """
    logits = logits.float()
    if kind == "ce":
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    present = [c for c in labels.unique().tolist() if c != IGNORE_INDEX]
    if not present:
        return logits.sum() * 0.0
    return torch.stack([pixel[labels == c].mean() for c in present]).mean()


class SegmentTask(Task):
    """DeepLab trained on pseudo-masks (module docstring).

    Args:
        cfg: a loaded config (its ``segment``, ``data``, ``train`` sections).
        train_set: the :class:`PseudoMaskDataset` of the train split (its transform is set here).
        val_set: a dataset of the val split with ground truth (``data.val_split``), or None.
        epochs: the run's epochs (from :func:`iterations_to_epochs`), for the poly schedule.
        steps: the optimizer steps they make (for ``segment.warmup``).
        model: the DeepLab, when the caller built it (default: built in :meth:`setup`).
    """

    metric = "miou"
    metric_label = "mIoU"

    def __init__(
        self,
        cfg: DictConfig,
        train_set: PseudoMaskDataset,
        val_set: Any,
        epochs: int,
        steps: Optional[int] = None,
        model: Optional[DeepLab] = None,
    ) -> None:
        self.cfg = cfg
        self._built = model  # built by the stage before the run folder exists (weights checked first)
        self.train_set = train_set
        self.val_set = val_set
        self.epochs = int(epochs)
        self.steps = int(steps) if steps else None  # optimizer steps of the run (for segment.warmup)
        self.classes: List[str] = list(train_set.classes)
        self.collate_fn = segment_collate

    def setup(self, ctx: EngineContext) -> None:
        s = self.cfg.segment
        model = self._built if self._built is not None else build_deeplab(self.cfg, len(self.classes))
        self._built = None
        if ctx.dist.main:
            log.info("%s on %s (%s), output stride %d, %d classes", s.model, s.backbone, model.loaded,
                     model.arch["output_stride"], len(self.classes))  # fmt: skip
        self.model = model.to(ctx.device)
        mean, std = model.normalisation
        self.train_set.transform = SegmentTrainTransform(int(s.crop), list(s.train_scales), bool(s.flip), mean, std)
        if self.val_set is not None:
            self.val_set.transform = SegmentEvalTransform(mean, std)

    # -- optimisation --------------------------------------------------------------------
    def phases(self) -> List[Phase]:
        return [Phase("train", 0, float(self.cfg.segment.lr))]

    def param_groups(self, phase: Phase, model: nn.Module) -> List[Dict[str, Any]]:
        s = self.cfg.segment
        for p in model.parameters():
            p.requires_grad_(True)
        if s.freeze_bn:
            model.freeze_batch_norm()
        wd = float(s.weight_decay)
        trunk = [p for p in model.backbone_parameters() if p.requires_grad]
        # trainable trunk batch norm (freeze_bn=false) takes no weight decay, as usual
        trunk_w = [p for p in trunk if p.ndim > 1]
        trunk_b = [p for p in trunk if p.ndim <= 1]
        head_w, head_b = model.head_parameters()
        groups = [
            {"params": trunk_w, "lr_scale": 1.0, "weight_decay": wd},
            {"params": trunk_b, "lr_scale": 1.0, "weight_decay": 0.0},
            {"params": head_w, "lr_scale": float(s.head_lr_scale), "weight_decay": wd},
            {"params": head_b, "lr_scale": float(s.head_bias_lr_scale), "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, phase: Phase, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.SGD(groups, momentum=float(self.cfg.segment.momentum))

    def lr_at(self, phase: Phase, progress: float) -> Optional[float]:
        """Poly decay over the run; times a linear ramp over the first ``segment.warmup`` steps."""
        s = self.cfg.segment
        t = progress / max(self.epochs, 1)
        lr = poly_lr(float(s.lr), t, float(s.poly_power))
        warmup = int(s.warmup)
        if warmup > 0 and self.steps:
            lr *= min(1.0, (t * self.steps + 1.0) / warmup)
        return lr

    def accumulate_steps(self) -> int:
        return int(self.cfg.segment.accumulate)

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.cfg.segment.freeze_bn:
            model.freeze_batch_norm()

    # -- one step ------------------------------------------------------------------------
    def train_step(
        self, model: nn.Module, batch: Mapping[str, Any], ctx: EngineContext
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        images = batch["image"].to(ctx.device, non_blocking=True)
        labels = batch["mask"].to(ctx.device, non_blocking=True)
        kind = str(self.cfg.segment.loss)
        with ctx.autocast():
            outputs = model(images, all_scales=True)
        if str(self.cfg.segment.loss_at) == "input":  # logits up to the crop: fine labels for small crops
            size = labels.shape[-2:]
            outputs = [F.interpolate(o.float(), size=size, mode="bilinear", align_corners=False) for o in outputs]
        losses = [segmentation_loss(o, resize_labels(labels, o.shape[-2:]), kind) for o in outputs]
        loss = torch.stack(losses).sum()
        terms = {"ce_full": float(losses[0].detach())}
        if len(losses) > 1:
            terms["ce_max"] = float(losses[-1].detach())
        return loss, terms

    def divergence_hint(self) -> str:
        return "lower segment.lr or check the pseudo-masks"

    # -- validation ------------------------------------------------------------------------
    @property
    def has_validation(self) -> bool:
        return self.val_set is not None and int(self.cfg.segment.val_every) > 0

    @torch.no_grad()
    def validate(self, ctx: EngineContext) -> Optional[Dict[str, float]]:
        """Val mIoU at a single scale against the ground truth (each rank every world-th image)."""
        if not self.has_validation:
            return None
        self.model.eval()
        cm = ConfusionMatrix(len(self.classes))
        indices = list(range(ctx.dist.rank, len(self.val_set), ctx.dist.world))
        subset = torch.utils.data.Subset(self.val_set, indices)
        loader = DataLoader(subset, batch_size=1, shuffle=False, num_workers=int(self.cfg.data.num_workers),
                            collate_fn=segment_collate)  # fmt: skip
        for batch in loader:
            with ctx.autocast():
                logits = self.model(batch["image"].to(ctx.device))
            h, w = batch["mask"].shape[-2:]
            pred = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).argmax(1)
            cm.update(pred[0].cpu().numpy(), batch["mask"][0].numpy())
        total = torch.from_numpy(cm.matrix).to(ctx.device)
        cm.matrix = all_reduce_sum(total, ctx.dist).cpu().numpy()
        return {"miou": cm.miou()}

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {
            "arch": model_arch(self.model, ARCH_NAME),
            "classes": self.classes,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
