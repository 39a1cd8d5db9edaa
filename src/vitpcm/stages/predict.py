"""Masks for new images with a trained run: ``vitpcm predict RUN INPUT...`` / ``vitpcm.predict``.

No dataset, split list or tags needed: INPUT is image files, folders (recursive) and globs
(:mod:`vitpcm.data.loose` names them). An image's classes are its tags when given
(``--tags`` for all images, ``--tags-file`` per image), else the classes whose max-pooled
score y_k (the image-level classifier trained by L_MCE) reaches the threshold (default:
the one that maximised mean F1 on the run's val split, recorded by ``vitpcm infer``;
:func:`vitpcm.stages.tag_quality.default_threshold`). Either way the patch distributions
are merged with those classes (as ``vitpcm infer`` does with tags), upsampled to the image
size and argmax'ed. ``OUT`` (default ``RUN/predict``) receives::

    OUT/masks/NAME.png        palette PNG at the original image size
    OUT/probs/NAME.npz        as `vitpcm infer` (probs [P, H, W] of the kept classes, classes [P]),
                              plus pooled [C]: every class's max-pooled score
    OUT/crf/NAME.png          with crf: after the dense CRF (the `crf` config section)
    OUT/overlays/NAME.jpg     with overlay: the image blended with the mask's class colours
                              (the CRF mask with crf) and a legend with each class's pixel share
    OUT/predictions.jsonl     one JSON object per image of this call, in input order (:func:`predict`
                              documents the fields); files of earlier calls' other images stay
    OUT/summary.json          settings, counts, seconds, images/s
    OUT/skipped.txt           with skip_bad: the images left out (name, kind, file, reason)

Guarantees as ``vitpcm infer`` (the same loop, :func:`vitpcm.stages.mask_writer.write_masks`;
docs/reliability.md): every image still to do is decoded
once and all problems are listed before the model runs (``skip_bad`` leaves them out);
nothing is written before the inputs, tags and threshold are checked; each file is written
atomically, the npz before its PNG; a rerun skips every image whose PNG is stamped
(:mod:`vitpcm.utils.stamps`) with the same settings (checkpoint, scale, TTA, its tags, the
threshold when its tags are predicted, its file's size and time); its record travels in
that stamp, so ``predictions.jsonl`` is complete after a resumed run too. Under
``torchrun`` each rank takes ``names[rank::world]``; rank 0 writes ``predictions.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from vitpcm.atomic import write_json_atomic, write_text_atomic
from vitpcm.classes import read_classes
from vitpcm.config import run_config
from vitpcm.data import EvalTransform, collate
from vitpcm.data.loose import LooseImages, collect_images, parse_tag_list, tags_from_file
from vitpcm.data.transforms import MultiScaleTransform, transforms_on_device
from vitpcm.engine.checkpoint import checkpoint_config, find_run_checkpoint
from vitpcm.engine.distributed import Dist, barrier, gather_objects, stage_group
from vitpcm.errors import VitpcmError
from vitpcm.images import load_rgb
from vitpcm.io import read_mask_png
from vitpcm.models.backbone import resolve_normalisation
from vitpcm.models.predict import image_outputs, predict_batch, tags_from_scores, tta_sizes
from vitpcm.models.vitpcm import merge_class_labels
from vitpcm.runs import PredictLayout, RunLayout, run_of_checkpoint
from vitpcm.stages.crf import crf_folders
from vitpcm.stages.infer import check_scale, speed_settings
from vitpcm.stages.load import load_model
from vitpcm.stages.mask_writer import Loader, MaskOutput, MaskPass, write_masks
from vitpcm.stages.tag_quality import default_threshold
from vitpcm.utils.shard import Shard
from vitpcm.utils.stamps import digest, finished, read_stamp, stamp
from vitpcm.viz.overlay import save_overlay

log = logging.getLogger(__name__)

STAGE = "predict"  # the stamp's stage name


def check_threshold(threshold: float) -> float:
    """A pooled-score threshold must lie strictly between 0 and 1 (0 keeps every class, 1 none)."""
    t = float(threshold)
    if not 0.0 < t < 1.0:
        raise VitpcmError(f"--threshold {threshold} lies outside (0, 1): give a score such as 0.5")
    return t


def run_classes(layout: RunLayout, state: Mapping[str, Any]) -> List[str]:
    """The class list a run was trained with: its checkpoint's (``state``), else ``RUN/classes.txt``."""
    classes = state.get("classes")
    if isinstance(classes, (list, tuple)) and classes:
        return [str(c) for c in classes]
    if layout.classes.is_file():
        return read_classes(layout.classes)
    raise VitpcmError(f"{layout.root} has no classes.txt and its checkpoint stores no class list: put classes.txt back")


def predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    out: Optional[str | Path] = None,
    tags: Optional[str] = None,
    tags_file: Optional[str | Path] = None,
    threshold: Optional[float] = None,
    crf: bool = False,
    overlay: bool = False,
    scale: Optional[int] = None,
    tta: Optional[bool] = None,
    device: str = "auto",
    overrides: Sequence[str] = (),
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> List[Dict[str, Any]]:
    """Masks for new images (module docstring); returns one record per image, in input order.

    Args:
        run: the training run folder (or a checkpoint file inside one).
        inputs: image files, folders (searched recursively) and glob patterns.
        out: output folder; default ``RUN/predict``.
        tags: class names for every image, ``"cat,person"``; or ``tags_file``: a CSV / JSON
            tag file (``data/tags.py`` format) for some images. Images without tags get
            the classes whose pooled score reaches ``threshold``.
        threshold: in (0, 1); default the run's recorded best (module docstring), else
            ``infer.present_threshold``.
        crf / overlay: also write ``crf/`` / ``overlays/``.
        scale: input side (multiple of the patch size); default ``infer.scale``.
        tta: test-time augmentation (``vitpcm infer --tta``); default ``infer.tta``.
        overrides: config ``key=value`` (``infer.*``, ``crf.*``).
        skip_bad: leave unreadable images out (``OUT/skipped.txt``) instead of stopping.
        overwrite: recompute every image.

    Each record: ``name``, ``image`` (the file), ``size`` [H, W], ``tags_from`` (``given``
    or ``scores``), ``threshold`` (when the tags were predicted), ``tags`` (the foreground
    classes the mask was made from), ``scores`` {class: pooled score y_k}, ``share``
    {class: fraction of the mask's pixels}, ``seconds`` (model + mask), ``time`` (UTC).
    """
    return predict_images(run, inputs, out=out, tags=tags, tags_file=tags_file, threshold=threshold, crf=crf,
                          overlay=overlay, scale=scale, tta=tta, device=device, overrides=overrides,
                          skip_bad=skip_bad, overwrite=overwrite, progress=progress)["records"]  # fmt: skip


def predict_images(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    out: Optional[str | Path] = None,
    tags: Optional[str] = None,
    tags_file: Optional[str | Path] = None,
    threshold: Optional[float] = None,
    crf: bool = False,
    overlay: bool = False,
    scale: Optional[int] = None,
    tta: Optional[bool] = None,
    device: str = "auto",
    overrides: Sequence[str] = (),
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """:func:`predict`, returning the summary (``OUT/summary.json``) with ``records`` added."""

    # 1. everything the user gave, checked before anything is read at length or written
    if threshold is not None:
        threshold = check_threshold(threshold)
    if tags is not None and tags_file is not None:
        raise VitpcmError("give --tags (the same for every image) or --tags-file (per image), not both")
    shard = Shard.from_env()
    ckpt_path = find_run_checkpoint(run, "best")
    layout = run_of_checkpoint(ckpt_path) or RunLayout(ckpt_path.parent)
    cfg = run_config(layout, overrides, stored=lambda: checkpoint_config(ckpt_path))
    scale = int(scale or cfg.infer.scale)
    tta = bool(cfg.infer.tta) if tta is None else bool(tta)
    files = collect_images(inputs)
    model, state = load_model(ckpt_path)
    check_scale(scale, model.patch_size)
    classes = run_classes(layout, state)
    given: Dict[str, np.ndarray] = {}
    if tags is not None:
        vec = parse_tag_list(tags, classes)
        given = {name: vec for name in files}
    elif tags_file is not None:
        given = tags_from_file(tags_file, classes, files)
        log.info("tags from %s for %d of %d images (the others: predicted)", tags_file, len(given), len(files))
    threshold_source = "given"
    if threshold is None:
        threshold, threshold_source = default_threshold(layout, ckpt_path, cfg)
    dataset = LooseImages(files, classes, given)
    dataset.jpeg_decoder = str(cfg.data.get("jpeg_decoder", "pillow") or "pillow")  # as the run's images were read

    with stage_group(device) as (dist_info, dev):
        target = PredictLayout(out if out is not None else layout.predict)
        flip = bool(cfg.infer.tta_flip) if tta else False
        sizes = tta_sizes(scale, cfg.infer.tta_scales, model.patch_size) if tta else [scale]
        model.to(dev).eval()
        mean, std = resolve_normalisation(cfg, model.adapter)
        ac = bool(cfg.input.align_corners)
        batch_size, writers, amp = speed_settings(cfg, dev)
        stage = NewImageMasks(model, dataset, target, dev, cfg=cfg, ckpt_path=ckpt_path, scale=scale, sizes=sizes,
                              tta=tta, flip=flip, threshold=threshold, given=given, files=files, align_corners=ac,
                              amp=amp)  # fmt: skip
        defer = transforms_on_device(cfg, dev)
        transform = (MultiScaleTransform(sizes, mean, std, align_corners=ac, defer=defer) if tta
                     else EvalTransform(scale, mean=mean, std=std, align_corners=ac, defer=defer))  # fmt: skip
        desc = f"predict@{scale}" + (f" tta {sizes}{' +flip' if flip else ''}" if tta else "")
        loader = Loader(transform, batch_size, min(int(cfg.data.num_workers), 8), collate, desc,
                        pin_memory=dev.type == "cuda", device_finish=True, writers=writers)  # fmt: skip
        # 2. every image still to do decoded once, all problems together, before the model runs; then the model
        done = write_masks(stage, dataset, target, loader, label="predict", split=None, shard=shard,
                           dist_info=dist_info, device=dev, finish=lambda done: done, skip_bad=skip_bad,
                           overwrite=overwrite, progress=progress)  # fmt: skip
        return _finish(cfg, layout, ckpt_path, dataset, target, stage.records, done, scale, sizes, tta, flip,
                       threshold, threshold_source, dist_info, shard, crf=crf, overlay=overlay, overwrite=overwrite,
                       progress=progress)  # fmt: skip


def _image_key(cfg: Any, ckpt_path: Path, scale: int, sizes: Sequence[int], tta: bool, flip: bool, threshold: float,
               tags: Optional[np.ndarray], image: Path) -> str:  # fmt: skip
    """Everything that decides one image's outputs (its stamp): the run's settings, its
    tags (or the threshold that predicts them) and its file's size and time."""

    st = ckpt_path.stat()
    image_stat = image.stat()
    settings = {
        "checkpoint": [str(ckpt_path.resolve()), st.st_size, st.st_mtime_ns],
        "scale": scale,
        "tta": [list(sizes), flip] if tta else None,
        "max_side": int(cfg.infer.max_side),
        "input": OmegaConf.to_container(cfg.input, resolve=True),
        "amp": bool(cfg.infer.amp),
        "probs_resize": str(cfg.infer.get("probs_resize", "mask")),
        "jpeg_decoder": str(cfg.data.get("jpeg_decoder", "pillow") or "pillow"),
        "tags": tags.astype(int).tolist() if tags is not None else None,
        "threshold": None if tags is not None else round(float(threshold), 6),
        "image": [str(image.resolve()), image_stat.st_size, image_stat.st_mtime_ns],
    }
    return digest(settings)


def _finished(target: PredictLayout, name: str, key: str, ckpt_mtime: int) -> bool:
    return finished(target.masks / f"{name}.png", STAGE, key, newer_than_ns=ckpt_mtime,
                    companions=[target.probs / f"{name}.npz"])  # fmt: skip


def _finish(
    cfg: Any,
    layout: RunLayout,
    ckpt_path: Path,
    dataset: LooseImages,
    target: PredictLayout,
    records: Dict[str, Dict[str, Any]],
    done: MaskPass,
    scale: int,
    sizes: List[int],
    tta: bool,
    flip: bool,
    threshold: float,
    threshold_source: str,
    dist_info: Dist,
    shard: Shard,
    *,
    crf: bool,
    overlay: bool,
    overwrite: bool,
    progress: bool,
) -> Dict[str, Any]:
    """After the masks: the CRF and the overlays, every rank's records in input order into
    ``predictions.jsonl`` and the summary (rank 0)."""
    names = [n for n in dataset.names if n in records]  # input order, this rank's share
    crf_info = None
    if crf:
        barrier(dist_info)
        all_names = dataset.names
        crf_info = crf_folders(target.probs, None, target.crf, params=cfg.crf, workers=int(cfg.crf.workers),
                               names=all_names, overwrite=overwrite, progress=progress,
                               image_paths={n: dataset.image_path(n) for n in all_names})  # fmt: skip
    if overlay:
        _write_overlays(dataset, names, target.crf if crf else target.masks, target.overlays, overwrite, progress)

    gathered = [r for part in gather_objects([records[n] for n in names], dist_info) for r in part]
    order = {n: i for i, n in enumerate(dataset.names)}
    gathered.sort(key=lambda r: order.get(r.get("name"), len(order)))
    summary: Dict[str, Any] = {
        "run": str(layout.root),
        "out": str(target.root),
        "checkpoint": str(ckpt_path),
        "images": len(gathered),
        "computed": done.computed,  # this call; the others were finished already
        "resumed": done.resumed,
        "skipped": len(done.problems),
        "scale": scale,
        "tta": {"sizes": sizes, "flip": flip} if tta else None,
        "threshold": threshold,
        "threshold_from": threshold_source,
        "seconds": round(done.seconds, 2),
        "images_per_second": round(done.computed / done.seconds, 3) if done.computed and done.seconds > 0 else None,
        "classes": dataset.classes,
    }
    if crf_info is not None:
        summary["crf"] = {k: crf_info[k] for k in ("out", "seconds", "workers", "computed", "skipped") if k in crf_info}
    if overlay:
        summary["overlays"] = str(target.overlays)
    if shard.main:
        write_text_atomic(target.records, "".join(_json_line(r) for r in gathered))
        write_json_atomic(target.summary, summary)
    barrier(dist_info)
    summary["records"] = gathered
    return summary


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(dict(record), sort_keys=False) + "\n"


class NewImageMasks:
    """predict's part of the mask loop (:class:`vitpcm.stages.mask_writer.MaskStage`): a
    batch's patch distributions ``[B, C, h, w]`` and pooled scores ``[B, C]``, the tags (given,
    else ``pooled >= threshold``), merged; per image its mask, npz and record (the PNG is
    stamped with the record: a resumed image's record comes back from it). Collects
    ``records`` ``{name: record}``."""

    def __init__(self, model: Any, dataset: LooseImages, target: PredictLayout, device: torch.device, *, cfg: Any,
                 ckpt_path: Path, scale: int, sizes: List[int], tta: bool, flip: bool, threshold: float,
                 given: Mapping[str, np.ndarray], files: Mapping[str, Path], align_corners: bool,
                 amp: bool) -> None:  # fmt: skip
        self.model, self.dataset, self.target, self.device = model, dataset, target, device
        self.cfg, self.ckpt_path, self.scale, self.sizes, self.tta, self.flip = cfg, ckpt_path, scale, sizes, tta, flip
        self.threshold, self.given, self.files = threshold, given, files
        self.align_corners, self.amp = align_corners, amp
        self.max_side = int(cfg.infer.max_side)
        self.probs_resize = str(cfg.infer.get("probs_resize", "mask"))
        self.ckpt_mtime = ckpt_path.stat().st_mtime_ns
        self.records: Dict[str, Dict[str, Any]] = {}
        self._keys: Dict[str, str] = {}

    def key(self, name: str) -> str:
        """The image's stamp key (:func:`_image_key`), computed once."""
        if name not in self._keys:
            self._keys[name] = _image_key(self.cfg, self.ckpt_path, self.scale, self.sizes, self.tta, self.flip,
                                          self.threshold, self.given.get(name), self.files[name])  # fmt: skip
        return self._keys[name]

    def finished(self, name: str) -> bool:
        return _finished(self.target, name, self.key(name), self.ckpt_mtime)

    def resumed(self, name: str, mask: Optional[np.ndarray]) -> None:
        self.records[name] = (read_stamp(self.target.masks / f"{name}.png") or {}).get("record", {"name": name})

    def predict(self, batch: Dict[str, Any]) -> List[MaskOutput]:
        t0 = time.time()
        dev = self.device
        grid, pooled = predict_batch(self.model, batch, dev, self.sizes if self.tta else (), self.flip, self.amp)
        tagged = torch.tensor(batch["tagged"], dtype=torch.bool, device=dev)
        tags = torch.where(tagged[:, None], batch["labels"].to(dev), tags_from_scores(pooled, self.threshold))
        grid = merge_class_labels(grid, tags)
        classes = self.dataset.classes
        per_image = []
        for i, name in enumerate(batch["name"]):
            height, width = (int(v) for v in batch["size"][i])
            mask, probs = image_outputs(grid[i], tags[i], pooled[i], (height, width), self.threshold,
                                        align_corners=self.align_corners, max_side=self.max_side,
                                        probs_resize=self.probs_resize)  # fmt: skip
            probs["pooled"] = pooled[i].cpu().numpy().astype(np.float32)
            counts = np.bincount(mask.ravel(), minlength=len(classes))
            kept = torch.nonzero(tags[i] > 0).flatten().tolist()
            record = {
                "name": name,
                "image": str(self.dataset.image_path(name)),
                "size": [height, width],
                "tags_from": "given" if bool(batch["tagged"][i]) else "scores",
                "threshold": None if bool(batch["tagged"][i]) else self.threshold,
                "tags": [classes[c] for c in kept if c != 0],
                "scores": {classes[c]: round(float(s), 4) for c, s in enumerate(pooled[i].tolist())},
                "share": {classes[c]: round(float(n) / mask.size, 4) for c, n in enumerate(counts.tolist()) if n},
            }
            per_image.append((name, mask, probs, record))
        seconds = (time.time() - t0) / max(1, len(per_image))
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        out: List[MaskOutput] = []
        for name, mask, probs, record in per_image:
            record["seconds"] = round(seconds, 4)
            record["time"] = now
            self.records[name] = record
            out.append(MaskOutput(name, mask, probs, stamp(STAGE, self.key(name), record=record)))
        return out


def _write_overlays(dataset: LooseImages, names: Sequence[str], masks: Path, overlays: Path, overwrite: bool,
                    progress: bool) -> None:  # fmt: skip
    """``overlays/NAME.jpg`` of each image from its mask in ``masks``; one newer than its
    mask is kept (unless ``overwrite``)."""

    for name in tqdm(names, desc="overlays", unit="img", disable=not progress or not names):
        mask_path, jpg = masks / f"{name}.png", overlays / f"{name}.jpg"
        if not overwrite and jpg.is_file() and jpg.stat().st_mtime_ns >= mask_path.stat().st_mtime_ns:
            continue
        save_overlay(jpg, load_rgb(dataset.image_path(name)), read_mask_png(mask_path), dataset.classes)
