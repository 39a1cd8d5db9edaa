"""The ViT-PCM task for the engine: the authors' two-phase recipe and the ET step.

Phase ``warmup`` (``train.warmup_epochs``): backbone frozen, only HV-BiLSTM + classifier
learn at ``train.warmup_lr``. Phase ``finetune``: the last ``train.unfreeze_blocks``
blocks and the final norm join, with a fresh Adam at ``train.lr`` (``train.schedule=cosine``
decays it to 1% by the last epoch). After every epoch: validation mIoU of the tag-merged
predictions at the training size (when the val split has masks).

One training step (per batch of B images)::

    Z_sg   = model.eval()(view1)                     no gradient: ET targets
    out    = model(cat[view1, tile_2x2(ET views)])   one forward for both inputs
    L_MCE  = BCE(GMP(out[view1]), tags)
    L_ET   = CE(untile(out[tiled]), merge(T(Z_sg), tags))
    L_REG  = 0.01 * ||W||^2
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vitpcm.config import batch_plan, resolved_normalisation
from vitpcm.data import EvalTransform, TrainTransform, build_dataset, collate
from vitpcm.data.check import check_before_training
from vitpcm.data.transforms import TagRule, map_to_et_grid, tile_views, transforms_on_device, untile_grid
from vitpcm.engine.checkpoint import init_from
from vitpcm.engine.distributed import all_reduce_sum, gather_objects
from vitpcm.engine.optim import build_adam
from vitpcm.engine.task import EngineContext, Phase, Task, cosine_lr, eval_mode, trainable_parameters
from vitpcm.engine.trainer import TrainSettings
from vitpcm.errors import VitpcmError
from vitpcm.evaluation.confusion import ConfusionMatrix
from vitpcm.evaluation.tags import tag_quality
from vitpcm.losses import et_loss, mce_loss, reg_loss
from vitpcm.models.predict import upsample
from vitpcm.models.registry import build_model, model_arch
from vitpcm.models.speed import compile_blocks
from vitpcm.models.vitpcm import merge_class_labels
from vitpcm.tasks.settings import engine_settings

log = logging.getLogger(__name__)

WARMUP, FINETUNE = "warmup", "finetune"


@torch.no_grad()
def et_targets(
    probs_view: torch.Tensor,
    labels: torch.Tensor,
    flips: torch.Tensor,
    et_box: torch.Tensor,
    et_flips: torch.Tensor,
    patch_size: int,
    et_grid: int,
    merge: str = "after",
    align_corners: bool = False,
) -> torch.Tensor:
    """Soft targets for L_ET (the authors' ``compute_cce_loss`` target side).

    The plain view's predictions (taken in eval mode, without gradient) are carried to each
    ET view's patch grid through the same transform and merged with the tags.

    ``merge="after"`` (the authors) merges on the transformed grid, so each present class
    is scaled to peak at 1 *inside the crop*, even when the crop misses the object.
    ``merge="before"`` merges on the whole view first (where the image tags hold) and then
    transforms, so a crop without the object keeps that class low.

    Args:
        probs_view: ``[B, C, G, G]`` predictions on view 1.
        labels: ``[B, C]`` tags.
        flips, et_box, et_flips: the transform records from :class:`TrainTransform`.
        et_grid: patch-grid side of one ET view.
        align_corners: of the bilinear resize onto the ET grid (``input.align_corners``).

    Returns ``[B, C, et_grid, et_grid]``.
    """
    if merge not in ("after", "before"):
        raise ValueError(f"merge must be 'after' or 'before', got {merge!r}")
    probs = probs_view.float()
    ac = bool(align_corners)
    if merge == "before":
        return map_to_et_grid(merge_class_labels(probs, labels), flips, et_box, et_flips, patch_size, et_grid, ac)
    return merge_class_labels(map_to_et_grid(probs, flips, et_box, et_flips, patch_size, et_grid, ac), labels)


def world_size() -> int:
    """Processes of this run: torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def train_batch_plan(cfg: DictConfig) -> Tuple[int, int]:
    """``(per-process batch, accumulation steps)``: ``train.batch_size`` and 1, or with
    ``train.global_batch`` > 0 what :func:`vitpcm.config.batch_plan` makes of it for this
    world size (global = batch x world x accumulate; docs/reproduce.md#global-batch)."""
    return batch_plan(int(cfg.train.get("global_batch", 0) or 0), world_size(), int(cfg.train.batch_size))


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The engine's settings from ``train.*`` (and ``data.num_workers``)."""
    t = cfg.train
    return engine_settings(cfg, epochs=int(t.epochs), batch_size=train_batch_plan(cfg)[0], val_every=int(t.val_every))


class PcmTask(Task):
    """ViT-PCM as an engine task (module docstring). ``cfg``: a prepared config
    (:func:`vitpcm.stages.config.prepare_config`: normalisation resolved, sizes checked).

    ``skip_bad``: broken data items are left out (listed in ``RUN/skipped.txt``) instead of
    stopping the run; every item is read once before training (``data/check.py``).
    """

    metric = "miou"
    metric_label = "mIoU"

    def __init__(self, cfg: DictConfig, skip_bad: bool = False) -> None:
        self.cfg = cfg
        self.skip_bad = skip_bad
        self.val_set = None
        self.collate_fn = collate
        self.last_val: Optional[ConfusionMatrix] = None

    # ----------------------------------------------------------------- setup
    def setup(self, ctx: EngineContext) -> None:
        cfg = self.cfg
        # Data first: a bad dataset should fail before a large model is built. Every item
        # is read once up front: broken ones stop the run, or with skip_bad are dropped.
        probe = build_dataset(cfg.data, cfg.data.train_split, strict=False)
        self.classes: List[str] = probe.classes
        self.val_set = self._build_val_set(ctx)
        check_before_training([probe, self.val_set], ctx.run.root, self.skip_bad, progress=ctx.show_progress,
                            write=ctx.dist.main)  # fmt: skip
        model = build_model(cfg, len(self.classes))
        if cfg.model.get("init_from"):
            init_from(model, cfg.model.init_from)
        self.model = model.to(ctx.device)
        if bool(cfg.train.get("compile", False)):  # in place, per block: state-dict keys unchanged
            compile_blocks(self.model)
        d = self.model.patch_size
        mean, std = resolved_normalisation(cfg)  # numbers: the config was prepared (stages/config.py)
        self.train_set = probe
        ac, tags = bool(cfg.input.align_corners), TagRule.from_config(cfg)  # fidelity switches (docs/reproduce.md)
        # on a GPU the loader workers only decode and draw; the pixels are made in train_step
        self.train_transform = TrainTransform(cfg.input.train_size, cfg.input.et_crop, cfg.input.et_scale, d,
                                              cfg.augment, mean=mean, std=std, align_corners=ac, tags=tags,
                                              defer=transforms_on_device(cfg, ctx.device))  # fmt: skip
        self.train_set.transform = self.train_transform
        if self.val_set is not None:
            self.val_set.transform = EvalTransform(
                cfg.input.train_size, mean=mean, std=std, align_corners=ac, tags=tags
            )
        self.et_grid = int(cfg.input.et_scale) // d

    def _build_val_set(self, ctx: EngineContext):
        cfg = self.cfg
        if not cfg.data.val_split or cfg.train.val_every <= 0:
            return None
        try:
            val = build_dataset(cfg.data, cfg.data.val_split, require_masks=False, strict=False)
        except VitpcmError as exc:
            if ctx.dist.main:
                log.warning("no validation: %s", exc)
            return None
        if not val.has_masks:
            if ctx.dist.main:
                log.warning("no validation: split '%s' lacks masks; best.pt will be the last epoch", cfg.data.val_split)
            return None
        if val.classes != self.classes:
            raise VitpcmError("train and val splits use different class lists")
        return val

    # ----------------------------------------------------------------- phases
    def phases(self) -> List[Phase]:
        t = self.cfg.train
        # warmup_epochs=0: both start at 0 and the later one (finetune) wins
        return [Phase(WARMUP, 0, float(t.warmup_lr)), Phase(FINETUNE, int(t.warmup_epochs), float(t.lr))]

    def param_groups(self, phase: Phase, model: nn.Module) -> List[Dict[str, Any]]:
        model.set_backbone_trainable(0 if phase.name == WARMUP else int(self.cfg.train.unfreeze_blocks))
        return [{"params": trainable_parameters(model)}]

    def make_optimizer(self, phase: Phase, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
        """A fresh Adam per phase (the authors recompile with a new one): ``train.adam_epsilon``
        picks torch's or Keras's epsilon, ``train.summed_replicas`` the gradient scale."""
        t = self.cfg.train
        return build_adam(groups, str(t.adam_epsilon), int(t.summed_replicas))

    def migrate_optimizer_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """An optimizer state saved before the LSTMs' ``bias_hh`` became fixed zero buffers
        held an entry for each, right after its ``bias_ih``: drop those, so ``--resume`` on
        such a checkpoint works (its ``bias_hh`` values are folded into ``bias_ih`` on load)."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        groups = state.get("param_groups", [])
        extra = sum(1 for n in names if ".conditioning." in f".{n}" and ".bias_ih_l0" in n)
        if len(groups) != 1 or not extra or len(groups[0]["params"]) != len(names) + extra:
            return state
        old_names: List[str] = []
        for n in names:
            old_names.append(n)
            if ".conditioning." in f".{n}" and ".bias_ih_l0" in n:
                old_names.append(n.replace(".bias_ih_l0", ".bias_hh_l0"))
        ids = groups[0]["params"]
        dropped = {i for i, n in zip(ids, old_names) if ".bias_hh_l0" in n}
        group = dict(groups[0], params=[i for i in ids if i not in dropped])
        kept = {i: v for i, v in state.get("state", {}).items() if i not in dropped}
        return dict(state, param_groups=[group], state=kept)

    def lr_at(self, phase: Phase, progress: float) -> Optional[float]:
        """Cosine decay over the finetune phase when ``train.schedule=cosine``; else constant."""
        t = self.cfg.train
        if t.schedule != "cosine" or phase.name != FINETUNE:
            return None
        span = max(int(t.epochs) - int(t.warmup_epochs), 1)
        return cosine_lr(float(t.lr), (progress - int(t.warmup_epochs)) / span)

    # ----------------------------------------------------------------- one step
    def train_step(
        self, model: nn.Module, batch: Mapping[str, Any], ctx: EngineContext
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        lc = self.cfg.loss
        device = ctx.device
        batch = self.train_transform.finish(batch, device)  # data.transforms_on=device: the pixels, here
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        b = images.shape[0]

        inputs = images
        if lc.et:
            # targets from the plain model in eval mode (no dropout, no DDP sync), no gradient
            with torch.no_grad(), eval_mode(self.model), ctx.autocast():
                probs_sg = self.model(images)["probs"]
            targets = et_targets(
                probs_sg,
                labels,
                batch["flips"],
                batch["et_box"],
                batch["et_flips"],
                self.model.patch_size,
                self.et_grid,
                merge=str(lc.et_merge),
                align_corners=bool(self.cfg.input.align_corners),
            )
            tiled, count = tile_views(batch["image_et"].to(device, non_blocking=True))
            inputs = torch.cat([images, tiled], dim=0)

        with ctx.autocast():
            out = model(inputs)
        if not bool(torch.isfinite(out["pooled"]).all()):
            # diverged: BCE would raise on NaN inputs; hand the engine a non-finite loss
            return torch.full((), float("nan"), device=device), {}
        terms: Dict[str, torch.Tensor] = {}
        if lc.mce:
            terms["mce"] = mce_loss(out["pooled"][:b], labels)
        if lc.et:
            probs_et = untile_grid(out["probs"][b:], count)
            terms["et"] = float(lc.et_weight) * et_loss(probs_et, targets)
        if lc.reg:
            terms["reg"] = reg_loss(self.model.classifier.weight, float(lc.reg_weight))
        loss = sum(terms.values())
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    def accumulate_steps(self) -> int:
        """Batches per optimizer step: 1, or what ``train.global_batch`` needs (:func:`train_batch_plan`)."""
        return train_batch_plan(self.cfg)[1]

    def divergence_hint(self) -> str:
        return "lower train.lr / train.warmup_lr or check the data"

    # ----------------------------------------------------------------- validation
    @property
    def has_validation(self) -> bool:
        return self.val_set is not None

    @torch.no_grad()
    def validate(self, ctx: EngineContext) -> Optional[Dict[str, float]]:
        """Val mIoU of tag-merged predictions at the training size, upsampled to each mask,
        and the tag quality of the pooled scores (``tag_f1``: mean F1 at
        ``infer.present_threshold``, ``tag_map``; metrics.jsonl's ``val_tag_*``). Each rank
        scores every world-th image; the confusion matrices are summed, the scores gathered."""
        if self.val_set is None:
            return None
        self.model.eval()
        cm = ConfusionMatrix(len(self.classes))
        dist = ctx.dist
        indices = list(range(dist.rank, len(self.val_set), dist.world))
        subset = torch.utils.data.Subset(self.val_set, indices)
        loader = DataLoader(subset, batch_size=int(self.cfg.train.val_batch_size), shuffle=False,
                            num_workers=int(self.cfg.data.num_workers), collate_fn=collate)  # fmt: skip
        pooled: List[np.ndarray] = []
        tags: List[np.ndarray] = []
        for batch in loader:
            with ctx.autocast():
                out = self.model(batch["image"].to(ctx.device))
            grid = merge_class_labels(out["probs"].float(), batch["labels"].to(ctx.device))  # as predict_grid
            pooled.append(out["pooled"].float().cpu().numpy())
            tags.append(batch["labels"].numpy())
            for i in range(grid.shape[0]):
                pred = upsample(grid[i].float(), batch["size"][i], bool(self.cfg.input.align_corners))
                pred = pred.argmax(0).cpu().numpy()
                cm.update(pred, batch["mask"][i].numpy())
        total = torch.from_numpy(cm.matrix).to(ctx.device)
        cm.matrix = all_reduce_sum(total, dist).cpu().numpy()
        self.model.train()
        self.last_val = cm
        parts = gather_objects((pooled, tags), dist)
        scores = np.concatenate([a for p, _ in parts for a in p]) if any(p for p, _ in parts) else None
        result = {"miou": cm.miou()}
        if scores is not None:
            truth = np.concatenate([a for _, t in parts for a in t])
            q = tag_quality(scores, truth, self.classes, float(self.cfg.infer.present_threshold))
            result.update(tag_f1=q["mean_f1"], **({"tag_map": q["map"]} if q["map"] is not None else {}))
        return result

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_extras(self) -> Dict[str, Any]:
        return {
            "arch": model_arch(self.model, "vitpcm"),
            "classes": self.classes,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
