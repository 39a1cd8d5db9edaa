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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vitpcm.data import EvalTransform, build_dataset, collate
from vitpcm.data.transforms import resize_image, to_model_input
from vitpcm.engine.checkpoint import find_run_checkpoint, load_model
from vitpcm.engine.distributed import resolve_device
from vitpcm.errors import VitpcmError
from vitpcm.io import save_mask_png, save_npz_atomic, write_json_atomic
from vitpcm.losses import merge_class_labels
from vitpcm.metrics import ConfusionMatrix
from vitpcm.models.vitpcm import ViTPCM

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_grid(model: ViTPCM, images: torch.Tensor, labels: Optional[torch.Tensor], merge: bool = True) -> torch.Tensor:
    """Patch-level class distributions ``[B, C, h, w]``, merged with ``labels`` when given."""
    probs = model(images)["probs"].float()
    if merge and labels is not None:
        probs = merge_class_labels(probs, labels.to(probs.device))
    return probs


def upsample(probs: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[C, h, w]`` patch maps to an image size ``(H, W)``."""
    return F.interpolate(probs[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def present_classes(probs_full: torch.Tensor, labels: Optional[torch.Tensor], pooled: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the channels to keep in ``probs/NAME.npz``.

    With tags: the tagged classes. Without: background, classes whose pooled score reaches
    ``threshold``, and any class that wins a pixel (so the argmax of the kept channels
    equals the mask).
    """
    if labels is not None:
        return torch.nonzero(labels > 0).flatten()
    keep = pooled >= threshold
    keep[0] = True
    keep[probs_full.argmax(0).unique()] = True
    return torch.nonzero(keep).flatten()


def tta_sizes(scale: int, factors: Sequence[float], patch_size: int) -> List[int]:
    """Input sides for TTA: ``scale * f`` snapped to the nearest multiple of the patch size
    (at least one patch), duplicates removed, ascending."""
    return sorted({max(patch_size, int(round(scale * float(f) / patch_size)) * patch_size) for f in factors})


class MultiScaleTransform:
    """Like :class:`EvalTransform`, for several square sides at once: ``image_<n>`` per side."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = [int(n) for n in sizes]

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(sample)
        image = out.pop("image")
        for n in self.sizes:
            out[f"image_{n}"] = to_model_input(resize_image(image, (n, n)))
        return out


@torch.inference_mode()
def predict_tta(model: ViTPCM, views: Sequence[torch.Tensor], flip: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average patch distributions over input sides (and horizontal flips).

    Args:
        views: ``[B, 3, n, n]`` inputs, one per side.
        flip: also predict each view mirrored left-right (and mirror the prediction back).

    Returns ``(probs [B, C, h, w], pooled [B, C])`` on the finest grid ``h x w`` of the
    views; ``pooled`` is the max over patches of the average.
    """
    grids: List[torch.Tensor] = []
    for x in views:
        b = x.shape[0]
        inp = torch.cat([x, x.flip(-1)]) if flip else x  # one forward for both
        probs = model(inp)["probs"].float()
        grids.append(probs[:b])
        if flip:
            grids.append(probs[b:].flip(-1))
    if len(grids) == 1:  # one view: exactly plain inference (same memory layout downstream)
        return grids[0], grids[0].amax(dim=(2, 3))
    h = max(g.shape[-2] for g in grids)
    w = max(g.shape[-1] for g in grids)
    resized = [g if g.shape[-2:] == (h, w) else F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)
               for g in grids]  # fmt: skip
    avg = torch.stack(resized).mean(0)
    return avg, avg.amax(dim=(2, 3))


def check_scale(scale: int, patch_size: int) -> None:
    if scale <= 0 or scale % patch_size:
        lower = max(patch_size, scale // patch_size * patch_size)
        raise VitpcmError(
            f"--scale {scale} is not a multiple of the patch size {patch_size}: use {lower} or {lower + patch_size}"
        )


def run_inference(
    run: str | Path,
    split: str,
    out: Optional[str | Path] = None,
    scale: Optional[int] = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    save_probs: bool = True,
    progress: bool = True,
    tta: Optional[bool] = None,
    crf: bool = False,
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
    from vitpcm.config import load_config

    ckpt_path = find_run_checkpoint(run, "best")
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    cfg_path = run_dir / "config.yaml"
    cfg = load_config(cfg_path if cfg_path.is_file() else None, overrides)
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

    out_dir = Path(out) if out is not None else run_dir / "pseudo" / split
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    if save_probs:
        (out_dir / "probs").mkdir(parents=True, exist_ok=True)
    dataset.transform = MultiScaleTransform(sizes) if tta else EvalTransform(scale)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=min(int(cfg.data.num_workers), 4), collate_fn=collate)
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
        merged += _infer_batch(model, batch, dev, merge, threshold, out_dir, save_probs, cm, sizes if tta else None, flip)
    bar.close()

    summary: Dict[str, Any] = {
        "run": str(run_dir),
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
        np.save(out_dir / "confusion.npy", cm.matrix)
    if crf:
        summary["crf"] = _chain_crf(cfg, dataset, out_dir, progress)
        if "miou" in summary["crf"]:
            summary["crf_miou"] = summary["crf"].pop("miou")
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _chain_crf(cfg: Any, dataset: Any, out_dir: Path, progress: bool) -> Dict[str, Any]:
    """``vitpcm infer --crf``: the dense CRF over this split's probabilities into ``OUT/crf/``."""
    from vitpcm.metrics import evaluate_folders
    from vitpcm.postprocess.crf import CRFParams, run_crf

    # overwrite: the probabilities were just rewritten, every mask is stale anyway
    result = run_crf(out_dir / "probs", None, out_dir / "crf", params=CRFParams.from_config(cfg.crf),
                     workers=int(cfg.crf.workers), names=dataset.names, overwrite=True, progress=progress,
                     image_paths={n: dataset.image_path(n) for n in dataset.names})  # fmt: skip
    info: Dict[str, Any] = {"out": str(out_dir / "crf"), "seconds": result["seconds"], "workers": result["workers"]}
    if dataset.has_masks:
        cm = evaluate_folders({"crf": out_dir / "crf"}, dataset.read_mask, dataset.classes, names=dataset.names,
                              progress=False)["crf"]  # fmt: skip
        info["miou"] = cm.miou()
    return info


@torch.inference_mode()
def _infer_batch(
    model: ViTPCM,
    batch: Dict[str, Any],
    dev: torch.device,
    merge: bool,
    threshold: float,
    out_dir: Path,
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
        save_mask_png(out_dir / "masks" / f"{name}.png", mask)
        if save_probs:
            tags = labels[i] if (merge and labels is not None) else None
            keep = present_classes(full, tags, pooled[i].float(), threshold)
            save_npz_atomic(
                out_dir / "probs" / f"{name}.npz",
                probs=full[keep].cpu().numpy().astype(np.float32),
                classes=keep.cpu().numpy().astype(np.int64),
            )
        if cm is not None:
            cm.update(mask, batch["mask"][i].numpy())
    return len(batch["name"]) if (merge and labels is not None) else 0
