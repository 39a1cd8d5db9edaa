"""The verification stage: a DeepLab trained on pseudo-masks, then DeepLab's test protocol.

* :func:`segment_train` (``vitpcm segment train CONFIG --pseudo DIR``): the images of
  ``data.train_split`` that have a mask in ``DIR`` (the others are counted and left out),
  every mask checked once before anything is written, then the DeepLab task
  (:class:`vitpcm.tasks.segment.SegmentTask`) on the generic engine: atomic checkpoints,
  ``--resume``, metrics.jsonl, TensorBoard, DDP under torchrun, bf16 on GPUs.
* :func:`segment_infer` (``vitpcm segment infer RUN --split S``): softmax averaged over
  input scales (and horizontal flips), argmax -> palette PNGs, the present classes'
  probabilities in ``vitpcm infer``'s npz format (so the dense CRF of
  :mod:`vitpcm.stages.crf` runs on them unchanged), and the mIoU when the split has
  ground truth. The layout is ``vitpcm infer``'s::

      RUN/pseudo/SPLIT/masks/NAME.png   DeepLab's masks
      RUN/pseudo/SPLIT/probs/NAME.npz   probs [P, H, W] float32, classes [P] int64
      RUN/pseudo/SPLIT/crf/NAME.png     with --crf: after the dense CRF (the paper's numbers)
      RUN/pseudo/SPLIT/summary.json     scales, flip, mIoU (and crf_miou)

  ``vitpcm evaluate --pred RUN/pseudo/val/crf --gt ...`` then works as on any folder.

  As ``vitpcm infer`` (the same loop, :func:`vitpcm.stages.mask_writer.write_masks`, with
  :class:`DeepLabMasks` for the batch; docs/reliability.md, docs/scaling.md): a rerun skips every image
  whose mask is finished (newer than the checkpoint, stamped by this stage with the same
  settings: checkpoint, scales, flip, keep_threshold, data; its npz, written atomically
  before the PNG, is there) and counts it into the mIoU; ``overwrite`` recomputes all.
  Under ``torchrun`` each rank takes ``names[rank::world]``, the confusion matrices are
  summed with ``all_reduce``, rank 0 writes the summary: the files of a one-process run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vitpcm.config import load_config, load_saved_config, to_yaml
from vitpcm.data import build_dataset
from vitpcm.data.base import MISSING_MASK
from vitpcm.data.pseudo import (
    PseudoMaskDataset,
    SegmentEvalTransform,
    check_pseudo_masks,
    list_pseudo_masks,
    segment_collate,
)
from vitpcm.engine.checkpoint import find_run_checkpoint
from vitpcm.engine.distributed import stage_group
from vitpcm.engine.task import autocast
from vitpcm.engine.trainer import Trainer, seed_everything
from vitpcm.errors import VitpcmError
from vitpcm.io import format_names
from vitpcm.models.deeplab import DeepLab, predict_probs
from vitpcm.runs import PseudoLayout, RunLayout, run_of_checkpoint
from vitpcm.stages.crf_pass import DeviceCRF
from vitpcm.stages.load import load_model
from vitpcm.stages.mask_writer import Loader, MaskOutput, MaskPass, finish_pseudo, write_masks
from vitpcm.tasks.segment import SegmentTask, build_deeplab, iterations_to_epochs, segment_settings
from vitpcm.utils.shard import Shard
from vitpcm.utils.stamps import digest, finished, stamp

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
DEMO_PRESET = "synthetic_segment"
STAMP_STAGE = "segment"  # the stage named in the stamp of its mask PNGs (`vitpcm infer` writes "infer")


def _train_dataset(cfg: DictConfig):
    """The train split's dataset for its names and images (its own masks are not needed)."""

    return build_dataset(cfg.data, cfg.data.train_split, require_masks=False, strict=False)


def _val_dataset(cfg: DictConfig):
    """The val split with ground truth for ``segment.val_every``, or None."""

    if int(cfg.segment.val_every) <= 0 or not cfg.data.val_split:
        return None
    try:
        val = build_dataset(cfg.data, cfg.data.val_split, require_masks=False)
    except VitpcmError as exc:
        log.warning("no validation: %s", exc)
        return None
    if not val.has_masks:
        log.warning("no validation: split '%s' has no ground truth; best.pt will be the last epoch", val.split)
        return None
    return val


def segment_train(
    cfg: DictConfig,
    run: PathLike,
    pseudo: Optional[PathLike] = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train the DeepLab of ``cfg.segment`` on the pseudo-masks in ``pseudo``, writing ``run``.

    Args:
        cfg: a loaded config (``vitpcm.load_config("voc12_segment", [...])``).
        run: the run folder; an existing run needs ``resume``.
        pseudo: folder of PNG masks named after the images (``segment.pseudo`` when None,
            e.g. on ``resume``: the run's config.yaml remembers it).
        resume: continue from ``RUN/checkpoints/last.pt``.
        progress: progress bars (rank 0 only).

    Returns:
        ``{"run", "best_miou" (None without validation), "epochs", "iterations" (optimizer
        steps), "images" (with a mask), "missing" (split images without one), "pseudo",
        "history"}``.

    Raises :class:`VitpcmError` (nothing written) for an empty mask folder, a folder of
    probabilities, a mask of the wrong size or with values beyond the class list.
    """

    if pseudo is not None:
        cfg.segment.pseudo = str(Path(pseudo).resolve())
    if not cfg.segment.pseudo:
        raise VitpcmError("no pseudo-masks given: pass --pseudo DIR (a folder of PNG masks, e.g. RUN/pseudo/train/crf)")
    base = _train_dataset(cfg)
    listing = list_pseudo_masks(cfg.segment.pseudo, base.names, str(cfg.data.train_split))
    broken = [p for n in listing.names for p in base.listing_problems.get(n, []) if p.kind != MISSING_MASK]
    if broken:
        raise VitpcmError(
            broken[0].line(str(cfg.data.train_split)) + (f" ({len(broken) - 1} more)" if len(broken) > 1 else "")
        )
    check_pseudo_masks(listing, base.image_path, base.num_classes, workers=0, progress=progress)
    if listing.missing:
        log.info("%d of %d images of split '%s' have no mask in %s and are left out: %s", len(listing.missing),
                 len(base.names), base.split, listing.folder, format_names(listing.missing))  # fmt: skip
    train_set = PseudoMaskDataset(base, listing)
    val_set = _val_dataset(cfg)
    if val_set is not None and val_set.classes != train_set.classes:
        raise VitpcmError("train and val splits use different class lists")

    s = cfg.segment
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it; the engine joins the group later
    epochs, steps = iterations_to_epochs(int(s.iterations), len(train_set), int(s.batch_size), world, int(s.accumulate))
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("%d images with pseudo-masks, %d per step on %d process(es): %d epochs = %d steps (segment.iterations=%d)",
                 len(train_set), int(s.batch_size) * int(s.accumulate) * world, world, epochs, steps,
                 int(s.iterations))  # fmt: skip
    # the model (and its backbone weights: a download, a file) before the run folder exists,
    # so a bad segment.backbone_weights leaves nothing behind; seeded as the engine seeds
    seed_everything(int(cfg.train.seed) + int(os.environ.get("RANK", "0")))
    model = build_deeplab(cfg, len(train_set.classes), pretrained=not resume)  # resume: last.pt has the weights
    task = SegmentTask(cfg, train_set, val_set, epochs, steps, model=model)
    trainer = Trainer(task, run, segment_settings(cfg, epochs), resume=resume, progress=progress,
                      config_text=to_yaml(cfg))  # fmt: skip
    result = trainer.fit()
    result.update(iterations=steps, images=len(train_set), missing=len(listing.missing), pseudo=str(listing.folder))
    return result


def segment_train_demo(
    demo_run: PathLike,
    run: Optional[PathLike] = None,
    *,
    overrides: Sequence[str] = (),
    config: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """``vitpcm segment train --demo-run DIR``: the demo's data (``DIR/data``) and the CRF
    pseudo-masks of its train split (``DIR/run/pseudo/train/crf``, made by ``vitpcm demo``),
    the ``synthetic_segment`` preset (or ``config``); the run goes to ``run`` (default
    ``DIR/segment``)."""

    demo = Path(demo_run)
    crf = PseudoLayout(RunLayout(demo / "run").pseudo("train")).crf
    if not (demo / "data").is_dir() or not crf.is_dir():
        raise VitpcmError(
            f"--demo-run {demo}: needs {demo / 'data'} and the train split's CRF masks {crf}"
            " (made by `vitpcm demo --out DIR`)"
        )
    cfg = load_config(config or DEMO_PRESET, [f"data.root={(demo / 'data').resolve()}", *overrides])
    return segment_train(cfg, run if run is not None else demo / "segment", crf, resume=resume, progress=progress)


def _keep_classes(probs: Any, mask: Any, threshold: float) -> Any:
    """Channels to save: every class that wins a pixel or reaches ``threshold`` somewhere."""

    keep = probs.flatten(1).amax(1) >= float(threshold)
    keep[mask.unique()] = True
    return torch.nonzero(keep).flatten()


def _settings(
    cfg: DictConfig, ckpt: Path, scales: Sequence[float], flip: bool, model: Any, amp: bool
) -> Dict[str, Any]:
    """Everything besides the image that decides its mask and probabilities (the stamp)."""

    st = ckpt.stat()
    mean, std = model.normalisation
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "num_workers"}
    settings: Dict[str, Any] = {
        "checkpoint": [str(ckpt.resolve()), st.st_size, st.st_mtime_ns],
        "scales": list(scales),
        "flip": flip,
        "keep_threshold": float(cfg.segment.keep_threshold),
        "input": {"mean": list(map(float, mean)), "std": list(map(float, std))},
        "data": data,
    }
    if amp:  # half precision on a GPU changes the numbers
        settings["amp"] = True
    return settings


def segment_infer(
    run: PathLike,
    split: str = "val",
    *,
    scales: Optional[Sequence[float]] = None,
    flip: Optional[bool] = None,
    crf: bool = False,
    out: Optional[PathLike] = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """DeepLab's masks (and probabilities) for one split of a ``segment train`` run.

    Args:
        run: the DeepLab run folder (or a checkpoint file in one).
        split: a split of the run's dataset (``data.*``; ``overrides`` may move it,
            e.g. ``data.root=...``).
        scales: input scale factors whose softmax is averaged (default
            ``segment.test_scales``, [1.0]; with MSC each scale is itself max-fused).
        flip: also average the horizontal mirrors (default ``segment.test_flip``).
        crf: then the dense CRF (the ``crf`` section) into ``OUT/crf``.
        out: output folder (default ``RUN/pseudo/SPLIT``).
        overwrite: recompute every image (default: keep the finished ones, module docstring).

    Returns the summary (also ``OUT/summary.json``, written by rank 0), with ``computed`` /
    ``resumed`` image counts and ``miou`` (and ``crf_miou``) when the split has ground truth.
    """

    shard = Shard.from_env()  # a wrong RANK / WORLD_SIZE fails here, before any work
    ckpt = find_run_checkpoint(run, "best")
    layout = run_of_checkpoint(ckpt) or RunLayout(ckpt.parent)
    cfg = load_saved_config(layout.config, overrides) if layout.config.is_file() else load_config(None, overrides)
    # strict=False: a missing file is one more problem of the check before any output, listed with the rest
    dataset = build_dataset(cfg.data, split, require_masks=False, strict=False)
    model, state = load_model(ckpt, expected_classes=dataset.classes)
    if not isinstance(model, DeepLab):
        raise VitpcmError(f"{ckpt} holds a {type(model).__name__}, not a DeepLab: use `vitpcm infer` for it")
    scales = [float(s) for s in (scales if scales else cfg.segment.test_scales)]
    if any(s <= 0 for s in scales):
        raise VitpcmError(f"--scales must be positive factors, got {scales}")
    flip = bool(cfg.segment.test_flip) if flip is None else bool(flip)

    with stage_group(device) as (dist_info, dev):
        return _segment_infer(cfg, layout, ckpt, state, dataset, model, split, scales, flip, dev, shard, dist_info,
                              out=out, crf=crf, progress=progress, overwrite=overwrite)  # fmt: skip


def _finished(name: str, files: PseudoLayout, key: str, ckpt_mtime: int) -> bool:
    """The image's mask and npz are there, made by this stage with these settings after the checkpoint."""
    return finished(files.masks / f"{name}.png", STAMP_STAGE, key, newer_than_ns=ckpt_mtime,
                    companions=[files.probs / f"{name}.npz"], probs=True)  # fmt: skip


def _segment_infer(
    cfg: DictConfig,
    layout: RunLayout,
    ckpt: Path,
    state: Dict[str, Any],
    dataset: Any,
    model: Any,
    split: str,
    scales: List[float],
    flip: bool,
    dev: Any,
    shard: Shard,
    dist_info: Any,
    *,
    out: Optional[PathLike],
    crf: bool,
    progress: bool,
    overwrite: bool,
) -> Dict[str, Any]:

    model.to(dev).eval()
    amp = bool(cfg.train.amp) and dev.type == "cuda"  # autocast is a no-op elsewhere
    files = PseudoLayout(out if out is not None else layout.pseudo(split))
    key = digest(_settings(cfg, ckpt, scales, flip, model, amp))
    stage = DeepLabMasks(model, files, dev, key=key, ckpt_mtime=ckpt.stat().st_mtime_ns, scales=scales, flip=flip,
                         threshold=float(cfg.segment.keep_threshold), amp=amp)  # fmt: skip
    crf_pass = None
    if crf and DeviceCRF.wanted(cfg.crf, dev):  # crf.backend resolves to torch: refine each image right here
        crf_pass = DeviceCRF(cfg.crf, dev, files.crf, dataset.image_path)
    loader = Loader(SegmentEvalTransform(*model.normalisation), 1, min(int(cfg.data.num_workers), 4), segment_collate,
                    f"segment infer {split} x{scales}{' +flip' if flip else ''}")  # fmt: skip

    def finish(done: MaskPass) -> Dict[str, Any]:
        summary: Dict[str, Any] = {
            "run": str(layout.root),
            "out": str(files.root),
            "checkpoint": str(ckpt),
            "model": dict(state["arch"]),
            "split": split,
            "images": len(dataset),
            "computed": done.computed,  # this call; the others were finished already
            "resumed": done.resumed,
            "scales": scales,
            "flip": flip,
            "seconds": round(done.seconds, 2),
            "classes": dataset.classes,
        }
        if shard.enabled:
            summary["ranks"] = shard.world
        if crf_pass is not None:
            summary["crf_pass"] = crf_pass.summary()
        # score, CRF, summary (rank 0); every rank returns once the summary exists (after the
        # one-pass CRF, the stage keeps its masks and refines what it left: vitpcm.stages.crf_pass)
        return finish_pseudo(cfg, dataset, files, summary, done.cm, main=shard.main, dist_info=dist_info, crf=crf,
                             overwrite=overwrite and crf_pass is None, progress=progress,
                             crf_device=str(dev))  # fmt: skip

    # no --skip-bad here: any broken item stops the stage before it writes
    return write_masks(stage, dataset, files, loader, label=f"segment infer {split}", split=split, shard=shard,
                       dist_info=dist_info, device=dev, finish=finish, crf_pass=crf_pass, overwrite=overwrite,
                       progress=progress)  # fmt: skip


class DeepLabMasks:
    """DeepLab's part of the pseudo-mask loop (:class:`vitpcm.stages.mask_writer.MaskStage`):
    one image's softmax ``[C, H, W]`` averaged over ``scales`` (and flips), argmax'ed; the
    classes kept in its npz are those that win a pixel or reach ``threshold``
    (``segment.keep_threshold``)."""

    def __init__(self, model: Any, files: PseudoLayout, device: Any, *, key: str, ckpt_mtime: int,
                 scales: Sequence[float], flip: bool, threshold: float, amp: bool) -> None:  # fmt: skip
        self.model, self.files, self.device = model, files, device
        self.key, self.ckpt_mtime = key, ckpt_mtime
        self.scales, self.flip, self.threshold, self.amp = list(scales), flip, threshold, amp
        self.text = stamp(STAMP_STAGE, key, probs=True)

    def finished(self, name: str) -> bool:
        return _finished(name, self.files, self.key, self.ckpt_mtime)

    def resumed(self, name: str, mask: Any) -> None:
        """Nothing beyond the score."""

    def predict(self, batch: Dict[str, Any]) -> List[Any]:

        out = []
        for i, name in enumerate(batch["name"]):
            with autocast(self.device, self.amp):
                probs = predict_probs(self.model, batch["image"][i].to(self.device), self.scales, self.flip).float()
            mask = probs.argmax(0)
            keep = _keep_classes(probs, mask, self.threshold)
            stored = {
                "probs": probs[keep].cpu().numpy().astype(np.float32),
                "classes": keep.cpu().numpy().astype(np.int64),
            }
            pred = mask.to(torch.uint8).cpu().numpy()
            out.append(MaskOutput(name, pred, stored, self.text, probs[keep], pred.shape))
        return out
