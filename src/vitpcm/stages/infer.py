"""Pseudo-masks: predict at any scale, merge with the tags, upsample, argmax, write files.

``vitpcm infer RUN --split val`` writes, for every image NAME of the split::

    OUT/masks/NAME.png   palette PNG at the original image size (class indices)
    OUT/probs/NAME.npz   probs [P, H, W] float32 of the P present classes, classes [P] int64
    OUT/summary.json     what was run, and the mIoU when the split has masks
    OUT/crf/NAME.png     with --crf: the masks after the dense CRF (vitpcm.postprocess.crf)

With ``--tta`` (``infer.tta``; not in the paper) the per-patch distributions are averaged
over the scales ``infer.tta_scales`` (factors of the inference side, snapped to multiples
of the patch size) and, with ``infer.tta_flip``, their horizontal mirrors, each resized to
the finest of those patch grids; the average is merged with the tags and upsampled as
without TTA.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from vitpcm.data import EvalTransform, build_dataset, collate
from vitpcm.data.transforms import MultiScaleTransform
from vitpcm.engine.checkpoint import find_run_checkpoint
from vitpcm.engine.distributed import resolve_device
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import ConfusionMatrix
from vitpcm.io import save_mask_png, save_npz_atomic, write_json_atomic
from vitpcm.models.backbone import resolve_normalisation
from vitpcm.models.predict import predict_tta, present_classes, tta_sizes, upsample
from vitpcm.models.vitpcm import ViTPCM, merge_class_labels
from vitpcm.runs import PseudoLayout, RunLayout, run_of_checkpoint
from vitpcm.stages.load import load_model

log = logging.getLogger(__name__)


def check_scale(scale: int, patch_size: int) -> None:
    if scale <= 0 or scale % patch_size:
        lower = max(patch_size, scale // patch_size * patch_size)
        raise VitpcmError(
            f"--scale {scale} is not a multiple of the patch size {patch_size}: use {lower} or {lower + patch_size}"
        )


def infer(
    run: str | Path,
    split: str = "val",
    *,
    out: Optional[str | Path] = None,
    scale: Optional[int] = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    save_probs: bool = True,
    tta: Optional[bool] = None,
    crf: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Write pseudo-masks (and present-class probabilities) for one split of a trained run.

    Args:
        run: the training run folder (or a checkpoint file inside one).
        split: split name of the run's dataset (``data.*`` of the run's config, which
            ``overrides`` may change, e.g. ``data.root=...``).
        out: output folder; default ``RUN/pseudo/SPLIT``.
        scale: input side; default ``infer.scale`` of the config. Multiple of the patch size.
        tta: test-time augmentation (module docstring); default ``infer.tta``.
        crf: then refine the masks with the dense CRF (``crf`` config section) into
            ``OUT/crf/``; needs the probabilities.

    Returns the summary dict (also written to ``OUT/summary.json``); it holds ``miou``
    (and with ``crf`` ``crf_miou``) when the split has masks.
    """
    from vitpcm.config import load_config, load_saved_config

    ckpt_path = find_run_checkpoint(run, "best")
    layout = run_of_checkpoint(ckpt_path) or RunLayout(ckpt_path.parent)
    cfg = load_saved_config(layout.config, overrides) if layout.config.is_file() else load_config(None, overrides)
    scale = int(scale or cfg.infer.scale)

    tta = bool(cfg.infer.tta) if tta is None else bool(tta)
    if crf and not save_probs:
        raise VitpcmError("--crf needs the probabilities: drop --no-probs")

    dataset = build_dataset(cfg.data, split, require_masks=False)
    model, state = load_model(ckpt_path, expected_classes=dataset.classes)
    check_scale(scale, model.patch_size)
    sizes = tta_sizes(scale, cfg.infer.tta_scales, model.patch_size) if tta else [scale]
    dev = resolve_device(device)
    model.to(dev).eval()

    files = PseudoLayout(out if out is not None else layout.pseudo(split))
    files.masks.mkdir(parents=True, exist_ok=True)
    if save_probs:
        files.probs.mkdir(parents=True, exist_ok=True)
    mean, std = resolve_normalisation(cfg, model.adapter)
    dataset.transform = MultiScaleTransform(sizes, mean, std) if tta else EvalTransform(scale, mean=mean, std=std)
    loader = DataLoader(
        dataset, batch_size=1, shuffle=False, num_workers=min(int(cfg.data.num_workers), 4), collate_fn=collate
    )
    cm = ConfusionMatrix(dataset.num_classes) if dataset.has_masks else None
    merge = bool(cfg.infer.merge_labels)
    start = time.time()

    from tqdm import tqdm

    threshold = float(cfg.infer.present_threshold)
    flip = bool(cfg.infer.tta_flip) if tta else False
    desc = f"infer {split}@{scale}" + (f" tta {sizes}{' +flip' if flip else ''}" if tta else "")
    bar = tqdm(loader, desc=desc, unit="img", disable=not progress)
    merged = 0
    for batch in bar:
        merged += _infer_batch(model, batch, dev, merge, threshold, files, save_probs, cm, sizes if tta else None, flip)
    bar.close()

    summary: Dict[str, Any] = {
        "run": str(layout.root),
        "out": str(files.root),
        "checkpoint": str(ckpt_path),
        "split": split,
        "scale": scale,
        "images": len(dataset),
        "merged_with_tags": merged,  # images whose tags were folded in (0: none known, or infer.merge_labels=false)
        "seconds": round(time.time() - start, 2),
        "classes": dataset.classes,
        "tta": {"sizes": sizes, "flip": flip} if tta else None,
    }
    if cm is not None:
        result = cm.summary(dataset.classes)
        summary.update(miou=result["miou"], iou=result["iou"])
        np.save(files.confusion, cm.matrix)
    if crf:
        from vitpcm.stages.refine import refine_pseudo

        # overwrite: the probabilities were just rewritten, every CRF mask is stale anyway
        summary["crf"] = refine_pseudo(cfg, dataset, files.root, overwrite=True, progress=progress)
        if "miou" in summary["crf"]:
            summary["crf_miou"] = summary["crf"].pop("miou")
    write_json_atomic(files.summary, summary)
    return summary


run_inference = infer  # the name of this stage before vitpcm.stages existed (README, benchmarks)


@torch.inference_mode()
def _infer_batch(
    model: ViTPCM,
    batch: Dict[str, Any],
    dev: torch.device,
    merge: bool,
    threshold: float,
    files: PseudoLayout,
    save_probs: bool,
    cm: Optional[ConfusionMatrix],
    sizes: Optional[Sequence[int]] = None,
    flip: bool = False,
) -> int:
    """Predict one batch; write each image's mask (and probabilities); update ``cm``.
    Returns how many of its images were merged with their tags.

    ``sizes``: the TTA input sides (``image_<n>`` keys of the batch); None: plain ``image``.
    """
    labels = batch.get("labels")
    if sizes:
        grid, pooled = predict_tta(model, [batch[f"image_{n}"].to(dev) for n in sizes], flip)
    else:
        outputs = model(batch["image"].to(dev))
        grid, pooled = outputs["probs"].float(), outputs["pooled"]
    if merge and labels is not None:
        grid = merge_class_labels(grid, labels.to(dev))
    for i, name in enumerate(batch["name"]):
        full = upsample(grid[i], batch["size"][i])
        mask = full.argmax(0).to(torch.uint8).cpu().numpy()
        save_mask_png(files.masks / f"{name}.png", mask)
        if save_probs:
            tags = labels[i] if (merge and labels is not None) else None
            keep = present_classes(full, tags, pooled[i].float(), threshold)
            save_npz_atomic(
                files.probs / f"{name}.npz",
                probs=full[keep].cpu().numpy().astype(np.float32),
                classes=keep.cpu().numpy().astype(np.int64),
            )
        if cm is not None:
            cm.update(mask, batch["mask"][i].numpy())
    return len(batch["name"]) if (merge and labels is not None) else 0
