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

Guarantees as ``vitpcm infer`` (docs/reliability.md): every image still to do is decoded
once and all problems are listed before the model runs (``skip_bad`` leaves them out);
nothing is written before the inputs, tags and threshold are checked; each file is written
atomically, the npz before its PNG; a rerun skips every image whose PNG is stamped
(:mod:`vitpcm.utils.stamps`) with the same settings (checkpoint, scale, TTA, its tags, the
threshold when its tags are predicted, its file's size and time); its record travels in
that stamp, so ``predictions.jsonl`` is complete after a resumed run too. Under
``torchrun`` each rank takes ``names[rank::world]``; rank 0 writes ``predictions.jsonl``.
"""

from __future__ import annotations

import copy
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from vitpcm.data import EvalTransform, collate
from vitpcm.data.check import screen_items
from vitpcm.data.loose import LooseImages, collect_images, parse_tag_list, tags_from_file
from vitpcm.data.transforms import MultiScaleTransform, transforms_on_device
from vitpcm.engine.checkpoint import find_run_checkpoint
from vitpcm.engine.distributed import Dist, barrier, gather_objects, stage_group
from vitpcm.errors import VitpcmError
from vitpcm.io import read_classes, read_mask_png, save_mask_png, write_json_atomic, write_text_atomic
from vitpcm.models.backbone import resolve_normalisation
from vitpcm.models.predict import image_outputs, predict_tta, tags_from_scores, tta_sizes
from vitpcm.models.vitpcm import merge_class_labels
from vitpcm.postprocess.probs_file import write_probs
from vitpcm.runs import PredictLayout, RunLayout, run_of_checkpoint
from vitpcm.stages.infer import check_scale, speed_settings
from vitpcm.stages.load import load_model
from vitpcm.stages.tag_quality import default_threshold
from vitpcm.utils.folders import output_folders
from vitpcm.utils.pools import WriterThreads
from vitpcm.utils.shard import Shard
from vitpcm.utils.stamps import digest, finished, read_stamp, stamp

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
    from vitpcm.config import run_config
    from vitpcm.engine.checkpoint import checkpoint_config

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
        # 2. what is left to do: this rank's share, less the finished images
        target = PredictLayout(out if out is not None else layout.predict)
        ckpt_mtime = ckpt_path.stat().st_mtime_ns
        flip = bool(cfg.infer.tta_flip) if tta else False
        sizes = tta_sizes(scale, cfg.infer.tta_scales, model.patch_size) if tta else [scale]
        mine = shard.take(dataset.names)
        keys = {n: _image_key(cfg, ckpt_path, scale, sizes, tta, flip, threshold, given.get(n), files[n]) for n in mine}
        done = [] if overwrite else [n for n in mine if _finished(target, n, keys[n], ckpt_mtime)]
        todo = [n for n in mine if n not in set(done)]
        if done:
            log.info("predict: %d of %d images already done (same checkpoint and settings), %d to go",
                     len(done), len(mine), len(todo))  # fmt: skip

        # 3. every image still to do decoded once, all problems together, before the model runs
        problems = screen_items(dataset, todo, full=False, progress=progress) if todo else []
        problems = [p for part in gather_objects(problems, dist_info) for p in part]  # every rank stops, or none
        if problems and not skip_bad:
            raise VitpcmError(
                f"{len(problems)} unreadable image(s), nothing predicted; fix or remove them, or pass --skip-bad"
                " to leave them out:\n" + "\n".join(f"{path}: {message}" for _, _, path, message in problems)
            )
        bad = sorted({p[0] for p in problems})
        if bad:
            dataset.drop(bad)
            todo = [n for n in todo if n not in set(bad)]
            mine = [n for n in mine if n not in set(bad)]
            log.warning("predict: skipping %d unreadable image(s) of %d (list in %s)", len(bad), len(files),
                        target.skipped)  # fmt: skip
        if not dataset.names:
            raise VitpcmError("every input image is unreadable: nothing to predict")

        return _predict(cfg, layout, ckpt_path, dataset, model, target, todo, [n for n in mine if n in set(done)],
                        problems, scale, sizes, tta, flip, threshold, threshold_source, dev, shard, dist_info,
                        keys=keys, crf=crf, overlay=overlay, overwrite=overwrite, progress=progress)  # fmt: skip


def _image_key(cfg: Any, ckpt_path: Path, scale: int, sizes: Sequence[int], tta: bool, flip: bool, threshold: float,
               tags: Optional[np.ndarray], image: Path) -> str:  # fmt: skip
    """Everything that decides one image's outputs (its stamp): the run's settings, its
    tags (or the threshold that predicts them) and its file's size and time."""
    from omegaconf import OmegaConf

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


def _predict(
    cfg: Any,
    layout: RunLayout,
    ckpt_path: Path,
    dataset: LooseImages,
    model: Any,
    target: PredictLayout,
    todo: List[str],
    done: List[str],
    problems: List[Any],
    scale: int,
    sizes: List[int],
    tta: bool,
    flip: bool,
    threshold: float,
    threshold_source: str,
    dev: torch.device,
    shard: Shard,
    dist_info: Dist,
    *,
    keys: Mapping[str, str],
    crf: bool,
    overlay: bool,
    overwrite: bool,
    progress: bool,
) -> Dict[str, Any]:
    from tqdm import tqdm

    model.to(dev).eval()
    mean, std = resolve_normalisation(cfg, model.adapter)
    ac = bool(cfg.input.align_corners)
    max_side = int(cfg.infer.max_side)
    records: Dict[str, Dict[str, Any]] = {}
    start = time.time()
    with output_folders(target.masks, target.probs):
        if shard.main:
            if problems:
                write_text_atomic(target.skipped, "".join(f"{n}\t{k}\t{p}\t{m}\n" for n, k, p, m in problems))
            else:
                target.skipped.unlink(missing_ok=True)  # from an earlier run whose bad images are fixed now
        for name in done:
            records[name] = (read_stamp(target.masks / f"{name}.png") or {}).get("record", {"name": name})

        sub = copy.copy(dataset)
        sub.names = todo
        defer = transforms_on_device(cfg, dev)
        sub.transform = (MultiScaleTransform(sizes, mean, std, align_corners=ac, defer=defer) if tta
                         else EvalTransform(scale, mean=mean, std=std, align_corners=ac, defer=defer))  # fmt: skip
        batch_size, writers, amp = speed_settings(cfg, dev)
        loader = DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=min(int(cfg.data.num_workers), 8),
                            collate_fn=collate, pin_memory=dev.type == "cuda")  # fmt: skip
        desc = f"predict@{scale}" + (f" tta {sizes}{' +flip' if flip else ''}" if tta else "")
        desc += f" [{shard.rank}/{shard.world}]" if shard.enabled else ""
        bar = tqdm(loader, desc=desc, unit="img", disable=not progress or not todo)
        with WriterThreads(writers) as writer:
            for batch in bar:
                batch = sub.transform.finish(batch, dev)
                for record in _predict_batch(model, batch, dev, dataset, target, threshold, keys, sizes if tta else None,
                                             flip, ac, max_side, amp, writer,
                                             str(cfg.infer.get("probs_resize", "mask"))):  # fmt: skip
                    records[record["name"]] = record
        bar.close()
        model_seconds = time.time() - start

    names = [n for n in dataset.names if n in records]  # input order, this rank's share
    crf_info = None
    if crf:
        from vitpcm.stages.refine import refine_folders

        barrier(dist_info)
        all_names = dataset.names
        crf_info = refine_folders(target.probs, None, target.crf, params=cfg.crf, workers=int(cfg.crf.workers),
                                  names=all_names, overwrite=overwrite, progress=progress,
                                  image_paths={n: dataset.image_path(n) for n in all_names})  # fmt: skip
    if overlay:
        _write_overlays(dataset, names, target.crf if crf else target.masks, target.overlays, overwrite, progress)

    gathered = [r for part in gather_objects([records[n] for n in names], dist_info) for r in part]
    order = {n: i for i, n in enumerate(dataset.names)}
    gathered.sort(key=lambda r: order.get(r.get("name"), len(order)))
    computed = sum(gather_objects(len(todo), dist_info))
    summary: Dict[str, Any] = {
        "run": str(layout.root),
        "out": str(target.root),
        "checkpoint": str(ckpt_path),
        "images": len(gathered),
        "computed": computed,  # this call; the others were finished already
        "resumed": sum(gather_objects(len(done), dist_info)),
        "skipped": len(problems),
        "scale": scale,
        "tta": {"sizes": sizes, "flip": flip} if tta else None,
        "threshold": threshold,
        "threshold_from": threshold_source,
        "seconds": round(model_seconds, 2),
        "images_per_second": round(computed / model_seconds, 3) if computed and model_seconds > 0 else None,
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
    import json

    return json.dumps(dict(record), sort_keys=False) + "\n"


@torch.inference_mode()
def _predict_batch(
    model: Any,
    batch: Dict[str, Any],
    dev: torch.device,
    dataset: LooseImages,
    target: PredictLayout,
    threshold: float,
    keys: Mapping[str, str],
    sizes: Optional[Sequence[int]],
    flip: bool,
    align_corners: bool,
    max_side: int,
    amp: bool,
    writer: WriterThreads,
    probs_resize: str = "mask",
) -> List[Dict[str, Any]]:
    """One batch: patch distributions ``[B, C, h, w]`` and pooled scores ``[B, C]``, the tags
    (given, else ``pooled >= threshold``), merged; per image its mask, npz and record
    (written by ``writer``: the npz, then the PNG stamped with the record)."""
    t0 = time.time()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        if sizes:
            grid, pooled = predict_tta(model, [batch[f"image_{n}"].to(dev, non_blocking=True) for n in sizes], flip)
        else:
            outputs = model(batch["image"].to(dev, non_blocking=True))
            grid, pooled = outputs["probs"], outputs["pooled"]
    grid, pooled = grid.float(), pooled.float()
    tagged = torch.tensor(batch["tagged"], dtype=torch.bool, device=dev)
    tags = torch.where(tagged[:, None], batch["labels"].to(dev), tags_from_scores(pooled, threshold))
    grid = merge_class_labels(grid, tags)
    classes = dataset.classes
    out: List[Dict[str, Any]] = []
    per_image = []
    for i, name in enumerate(batch["name"]):
        height, width = (int(v) for v in batch["size"][i])
        mask, probs = image_outputs(grid[i], tags[i], pooled[i], (height, width), threshold,
                                    align_corners=align_corners, max_side=max_side, probs_resize=probs_resize)  # fmt: skip
        probs["pooled"] = pooled[i].cpu().numpy().astype(np.float32)
        counts = np.bincount(mask.ravel(), minlength=len(classes))
        kept = torch.nonzero(tags[i] > 0).flatten().tolist()
        record = {
            "name": name,
            "image": str(dataset.image_path(name)),
            "size": [height, width],
            "tags_from": "given" if bool(batch["tagged"][i]) else "scores",
            "threshold": None if bool(batch["tagged"][i]) else threshold,
            "tags": [classes[c] for c in kept if c != 0],
            "scores": {classes[c]: round(float(s), 4) for c, s in enumerate(pooled[i].tolist())},
            "share": {classes[c]: round(float(n) / mask.size, 4) for c, n in enumerate(counts.tolist()) if n},
        }
        per_image.append((name, mask, probs, record))
    seconds = (time.time() - t0) / max(1, len(per_image))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name, mask, probs, record in per_image:
        record["seconds"] = round(seconds, 4)
        record["time"] = now
        text = stamp(STAGE, keys[name], record=record)
        writer.submit(_write_outputs, target, name, mask, probs, text)
        out.append(record)
    return out


def _write_outputs(target: PredictLayout, name: str, mask: np.ndarray, probs: Dict[str, np.ndarray],
                   text: Dict[str, str]) -> None:  # fmt: skip
    """One image's files: the npz first, then the PNG (a PNG implies its npz)."""
    write_probs(target.probs / f"{name}.npz", **probs)
    save_mask_png(target.masks / f"{name}.png", mask, text)


def _write_overlays(dataset: LooseImages, names: Sequence[str], masks: Path, overlays: Path, overwrite: bool,
                    progress: bool) -> None:  # fmt: skip
    """``overlays/NAME.jpg`` of each image from its mask in ``masks``; one newer than its
    mask is kept (unless ``overwrite``)."""
    from tqdm import tqdm

    from vitpcm.images import load_rgb
    from vitpcm.viz.overlay import save_overlay

    for name in tqdm(names, desc="overlays", unit="img", disable=not progress or not names):
        mask_path, jpg = masks / f"{name}.png", overlays / f"{name}.jpg"
        if not overwrite and jpg.is_file() and jpg.stat().st_mtime_ns >= mask_path.stat().st_mtime_ns:
            continue
        save_overlay(jpg, load_rgb(dataset.image_path(name)), read_mask_png(mask_path), dataset.classes)
