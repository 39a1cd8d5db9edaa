"""The verification stage: a DeepLab trained on pseudo-masks, then DeepLab's test protocol.

* :func:`segment_train` (``vitpcm segment train CONFIG --pseudo DIR``): the images of
  ``data.train_split`` that have a mask in ``DIR`` (the others are counted and left out),
  every mask checked once before anything is written, then the DeepLab task
  (:class:`vitpcm.tasks.segment.SegmentTask`) on the generic engine: atomic checkpoints,
  ``--resume``, metrics.jsonl, TensorBoard, DDP under torchrun, bf16 on GPUs.
* :func:`segment_infer` (``vitpcm segment infer RUN --split S``): softmax averaged over
  input scales (and horizontal flips), argmax -> palette PNGs, the present classes'
  probabilities in ``vitpcm infer``'s npz format (so the dense CRF of
  :mod:`vitpcm.stages.refine` runs on them unchanged), and the mIoU when the split has
  ground truth. The layout is ``vitpcm infer``'s::

      RUN/pseudo/SPLIT/masks/NAME.png   DeepLab's masks
      RUN/pseudo/SPLIT/probs/NAME.npz   probs [P, H, W] float32, classes [P] int64
      RUN/pseudo/SPLIT/crf/NAME.png     with --crf: after the dense CRF (the paper's numbers)
      RUN/pseudo/SPLIT/summary.json     scales, flip, mIoU (and crf_miou)

  ``vitpcm evaluate --pred RUN/pseudo/val/crf --gt ...`` then works as on any folder.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from omegaconf import DictConfig

from vitpcm.config import to_yaml
from vitpcm.errors import VitpcmError
from vitpcm.io import format_names
from vitpcm.runs import PseudoLayout, RunLayout

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
DEMO_PRESET = "synthetic_segment"


def _train_dataset(cfg: DictConfig):
    """The train split's dataset for its names and images (its own masks are not needed)."""
    from vitpcm.data import build_dataset

    return build_dataset(cfg.data, cfg.data.train_split, require_masks=False, strict=False)


def _val_dataset(cfg: DictConfig):
    """The val split with ground truth for ``segment.val_every``, or None."""
    from vitpcm.data import build_dataset

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
    from vitpcm.data.base import MISSING_MASK
    from vitpcm.data.pseudo import PseudoMaskDataset, list_pseudo_masks, screen_pseudo_masks
    from vitpcm.engine.trainer import Trainer, seed_everything
    from vitpcm.tasks.segment import SegmentTask, build_deeplab, iterations_to_epochs, segment_settings

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
    screen_pseudo_masks(listing, base.image_path, base.num_classes, workers=0, progress=progress)
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
    from vitpcm.config import load_config

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
    import torch

    keep = probs.flatten(1).amax(1) >= float(threshold)
    keep[mask.unique()] = True
    return torch.nonzero(keep).flatten()


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

    Returns the summary (also ``OUT/summary.json``), with ``miou`` (and ``crf_miou``) when
    the split has ground truth.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from vitpcm.config import load_config, load_saved_config
    from vitpcm.data import build_dataset
    from vitpcm.data.pseudo import SegmentEvalTransform, segment_collate
    from vitpcm.engine.checkpoint import find_run_checkpoint
    from vitpcm.engine.distributed import resolve_device
    from vitpcm.engine.task import autocast
    from vitpcm.evaluation import ConfusionMatrix
    from vitpcm.io import save_mask_png, save_npz_atomic, write_json_atomic
    from vitpcm.models.deeplab import DeepLab, predict_probs
    from vitpcm.runs import run_of_checkpoint
    from vitpcm.stages.load import load_model

    ckpt = find_run_checkpoint(run, "best")
    layout = run_of_checkpoint(ckpt) or RunLayout(ckpt.parent)
    cfg = load_saved_config(layout.config, overrides) if layout.config.is_file() else load_config(None, overrides)
    dataset = build_dataset(cfg.data, split, require_masks=False)
    model, state = load_model(ckpt, expected_classes=dataset.classes)
    if not isinstance(model, DeepLab):
        raise VitpcmError(f"{ckpt} holds a {type(model).__name__}, not a DeepLab: use `vitpcm infer` for it")
    scales = [float(s) for s in (scales if scales else cfg.segment.test_scales)]
    if any(s <= 0 for s in scales):
        raise VitpcmError(f"--scales must be positive factors, got {scales}")
    flip = bool(cfg.segment.test_flip) if flip is None else bool(flip)
    dev = resolve_device(device)
    model.to(dev).eval()
    mean, std = model.normalisation
    dataset.transform = SegmentEvalTransform(mean, std)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=min(int(cfg.data.num_workers), 4),
                        collate_fn=segment_collate)  # fmt: skip

    files = PseudoLayout(out if out is not None else layout.pseudo(split))
    files.masks.mkdir(parents=True, exist_ok=True)
    files.probs.mkdir(parents=True, exist_ok=True)
    cm = ConfusionMatrix(dataset.num_classes) if dataset.has_masks else None
    threshold = float(cfg.segment.keep_threshold)
    start = time.time()

    from tqdm import tqdm

    desc = f"segment infer {split} x{scales}{' +flip' if flip else ''}"
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="img", disable=not progress):
            with autocast(dev, bool(cfg.train.amp)):
                probs = predict_probs(model, batch["image"][0].to(dev), scales, flip)
            mask = probs.argmax(0)
            name = batch["name"][0]
            save_mask_png(files.masks / f"{name}.png", mask.to(torch.uint8).cpu().numpy())
            keep = _keep_classes(probs, mask, threshold)
            save_npz_atomic(files.probs / f"{name}.npz", probs=probs[keep].cpu().numpy().astype(np.float32),
                            classes=keep.cpu().numpy().astype(np.int64))  # fmt: skip
            if cm is not None:
                cm.update(mask.cpu().numpy(), batch["mask"][0].numpy())

    summary: Dict[str, Any] = {
        "run": str(layout.root),
        "out": str(files.root),
        "checkpoint": str(ckpt),
        "model": dict(state["arch"]),
        "split": split,
        "images": len(dataset),
        "scales": scales,
        "flip": flip,
        "seconds": round(time.time() - start, 2),
        "classes": dataset.classes,
    }
    if cm is not None:
        result = cm.summary(dataset.classes)
        summary.update(miou=result["miou"], iou=result["iou"])
        np.save(files.confusion, cm.matrix)
    if crf:
        from vitpcm.stages.refine import refine_pseudo

        summary["crf"] = refine_pseudo(cfg, dataset, files.root, overwrite=True, progress=progress)
        if "miou" in summary["crf"]:
            summary["crf_miou"] = summary["crf"].pop("miou")
    write_json_atomic(files.summary, summary)
    return summary
