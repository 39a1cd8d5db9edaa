"""Pseudo-masks: predict at any scale, merge with the tags, upsample, argmax, write files.

``vitpcm infer RUN --split val`` writes, for every image NAME of the split::

    OUT/masks/NAME.png   palette PNG at the original image size (class indices)
    OUT/probs/NAME.npz   probs [P, H, W] float32 of the P present classes, classes [P] int64,
                         pooled [C] float32: every class's max-pooled score y_k
                         (an image whose longer side exceeds infer.max_side: probs at a
                         reduced size, longer side = max_side, and size [2] = its (H, W))
    OUT/summary.json     what was run, and the mIoU when the split has masks
    OUT/skipped.txt      with --skip-bad: the items left out (split, name, kind, file, reason)
    OUT/crf/NAME.png     with --crf: the masks after the dense CRF (vitpcm.postprocess.crf)
    RUN/eval/SPLIT/tags.json  when the split's tags are known: how well the pooled scores
                         tell them (per-class precision / recall / F1 at infer.present_threshold,
                         AP, mAP, the threshold with the best mean F1; vitpcm.stages.tag_quality)

With ``--crf`` and ``crf.backend`` resolving to torch (``auto`` on a GPU), each batch is
refined on the device right after its forward (:mod:`vitpcm.stages.crf_pass`): the same
files and stamps, no npz read back, no process pool; the CRF stage that follows refines only
what that pass left out.

With ``--tta`` (``infer.tta``; not in the paper) the per-patch distributions are averaged
over the scales ``infer.tta_scales`` (factors of the inference side, snapped to multiples
of the patch size) and, with ``infer.tta_flip``, their horizontal mirrors, each resized to
the finest of those patch grids; the average is merged with the tags and upsampled as
without TTA.

Reliability (docs/reliability.md):

* Resumable: a rerun skips every image whose mask is finished: newer than the checkpoint
  and stamped (:mod:`vitpcm.utils.stamps`) with the same settings (checkpoint, scale, TTA,
  data, ...), with its npz when probabilities are written. Each image's npz is written
  (atomically) before its PNG, so a PNG implies its npz. ``overwrite`` recomputes all.
* Bad items are found before any model work: every item still to do is read once
  (``vitpcm check-data``'s check, with its cache) and all problems are reported together;
  ``skip_bad`` leaves them out and lists them in ``OUT/skipped.txt``.
* Nothing is created before that check passed; a stage that fails before its first
  output removes the folders it created.
* Under ``torchrun`` each rank takes ``names[rank::world]``; the confusion matrices are
  summed with ``all_reduce`` and rank 0 writes the summary. The files are those of a
  one-process run.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from vitpcm.data import EvalTransform, build_dataset, collate
from vitpcm.data.check import screen_items
from vitpcm.data.transforms import MultiScaleTransform, TagRule, transforms_on_device
from vitpcm.engine.checkpoint import find_run_checkpoint
from vitpcm.engine.distributed import Dist, all_reduce_sum, gather_objects, stage_group
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import ConfusionMatrix
from vitpcm.io import labels_from_mask, read_mask_png, save_mask_png, write_text_atomic
from vitpcm.models.backbone import resolve_normalisation
from vitpcm.models.predict import image_outputs, predict_tta, tta_sizes
from vitpcm.models.vitpcm import ViTPCM, merge_class_labels
from vitpcm.postprocess.probs_file import read_pooled, write_probs
from vitpcm.runs import PseudoLayout, RunLayout, run_of_checkpoint
from vitpcm.stages.crf_pass import DeviceCRF
from vitpcm.stages.load import load_model
from vitpcm.utils.folders import output_folders
from vitpcm.utils.pools import WriterThreads
from vitpcm.utils.shard import Shard
from vitpcm.utils.stamps import digest, finished, stamp
from vitpcm.utils.system import cpu_count

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
    skip_bad: bool = False,
    overwrite: bool = False,
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
        skip_bad: leave broken items out (listed in ``OUT/skipped.txt``) instead of stopping.
        overwrite: recompute every image (default: keep the finished ones, module docstring).

    Returns the summary dict (also written to ``OUT/summary.json`` by rank 0); it holds
    ``miou`` (and with ``crf`` ``crf_miou``) when the split has masks.
    """
    from vitpcm.config import run_config
    from vitpcm.engine.checkpoint import checkpoint_config

    shard = Shard.from_env()  # a wrong RANK / WORLD_SIZE fails here, before any work
    ckpt_path = find_run_checkpoint(run, "best")
    layout = run_of_checkpoint(ckpt_path) or RunLayout(ckpt_path.parent)
    # the run's own config: config.yaml, else the copy in the checkpoint (never library defaults)
    cfg = run_config(layout, overrides, stored=lambda: checkpoint_config(ckpt_path))
    scale = int(scale or cfg.infer.scale)

    tta = bool(cfg.infer.tta) if tta is None else bool(tta)
    if crf and not save_probs:
        raise VitpcmError("--crf needs the probabilities: drop --no-probs")

    # strict=False: a missing file is one more problem of the check below, listed with the rest
    dataset = build_dataset(cfg.data, split, require_masks=False, strict=False)
    model, state = load_model(ckpt_path, expected_classes=dataset.classes)
    check_scale(scale, model.patch_size)
    sizes = tta_sizes(scale, cfg.infer.tta_scales, model.patch_size) if tta else [scale]
    with stage_group(device) as (dist_info, dev):
        return _infer(cfg, layout, ckpt_path, dataset, model, split, scale, sizes, tta, dev, shard, dist_info,
                      out=out, save_probs=save_probs, crf=crf, progress=progress, skip_bad=skip_bad,
                      overwrite=overwrite)  # fmt: skip


run_inference = infer  # the name of this stage before vitpcm.stages existed (README, benchmarks)


def _settings(cfg: Any, ckpt_path: Path, scale: int, sizes: Sequence[int], tta: bool, flip: bool,
              mean: Any, std: Any) -> Dict[str, Any]:  # fmt: skip
    """Everything besides the image that decides its mask and probabilities (the stamp)."""
    from omegaconf import OmegaConf

    st = ckpt_path.stat()
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "num_workers"}
    settings = {
        "checkpoint": [str(ckpt_path.resolve()), st.st_size, st.st_mtime_ns],
        "scale": scale,
        "tta": [list(sizes), flip] if tta else None,
        "infer": {k: cfg.infer[k] for k in ("merge_labels", "present_threshold", "max_side")},
        "input": {
            "mean": list(map(float, mean)),
            "std": list(map(float, std)),
            "align_corners": bool(cfg.input.align_corners),
        },  # fmt: skip
        "data": data,
    }
    if bool(cfg.infer.amp):  # only when on: stamps written before the key existed stay valid
        settings["amp"] = True
    if str(cfg.infer.probs_resize) != "mask":  # likewise
        settings["probs_resize"] = str(cfg.infer.probs_resize)
    return settings


def _finished(name: str, files: PseudoLayout, key: str, save_probs: bool, ckpt_mtime: int) -> bool:
    """The image's outputs are complete and were made with these settings (module docstring)."""
    if not save_probs:
        return finished(files.masks / f"{name}.png", "infer", key, newer_than_ns=ckpt_mtime)
    return finished(files.masks / f"{name}.png", "infer", key, newer_than_ns=ckpt_mtime,
                    companions=[files.probs / f"{name}.npz"], probs=True)  # fmt: skip


def _infer(
    cfg: Any,
    layout: RunLayout,
    ckpt_path: Path,
    dataset: Any,
    model: ViTPCM,
    split: str,
    scale: int,
    sizes: List[int],
    tta: bool,
    dev: torch.device,
    shard: Shard,
    dist_info: Dist,
    *,
    out: Optional[str | Path],
    save_probs: bool,
    crf: bool,
    progress: bool,
    skip_bad: bool,
    overwrite: bool,
) -> Dict[str, Any]:
    from tqdm import tqdm

    model.to(dev).eval()
    files = PseudoLayout(out if out is not None else layout.pseudo(split))
    mean, std = resolve_normalisation(cfg, model.adapter)
    ac = bool(cfg.input.align_corners)  # fidelity switch: the authors' TF1 resampling (docs/reproduce.md)
    flip = bool(cfg.infer.tta_flip) if tta else False
    key = digest(_settings(cfg, ckpt_path, scale, sizes, tta, flip, mean, std))
    ckpt_mtime = ckpt_path.stat().st_mtime_ns

    # 1. what is left to do: this rank's share, less the finished images
    names = list(dataset.names)
    mine = shard.take(names)
    done = [] if overwrite else [n for n in mine if _finished(n, files, key, save_probs, ckpt_mtime)]
    done_set = set(done)
    todo = [n for n in mine if n not in done_set]
    if done:
        log.info("infer %s: %d of %d images already done (same checkpoint and settings), %d to go",
                 split, len(done), len(mine), len(todo))  # fmt: skip

    # 2. every item still to do read once, all problems together, before anything is written
    t_screen = time.time()
    problems = screen_items(dataset, todo, full=len(todo) == len(names), progress=progress) if todo else []
    problems = [p for part in gather_objects(problems, dist_info) for p in part]
    screen_seconds = time.time() - t_screen
    if problems and not skip_bad:
        raise VitpcmError(
            f"{len(problems)} problem(s) in split '{split}' ({len({p[0] for p in problems})} item(s)), nothing"
            " inferred; fix them or pass --skip-bad to leave these items out:\n"
            + "\n".join(f"[{split}] {path}: {message}" for _, _, path, message in problems)
        )
    bad = sorted({p[0] for p in problems})
    if bad:
        dataset.drop(bad)
        todo = [n for n in todo if n not in set(bad)]
        log.warning("split %s: skipping %d broken item(s) of %d (list in %s)", split, len(bad), len(names),
                    files.skipped)  # fmt: skip
    if not dataset.names:
        raise VitpcmError(f"every item of split '{split}' is broken: nothing to infer")

    cm = ConfusionMatrix(dataset.num_classes) if dataset.has_masks else None
    merge = bool(cfg.infer.merge_labels)
    threshold = float(cfg.infer.present_threshold)
    max_side = int(cfg.infer.max_side)
    folders = [files.masks] + ([files.probs] if save_probs else [])
    crf_pass = None
    if crf and DeviceCRF.wanted(cfg.crf, dev):  # crf.backend resolves to torch: refine each batch right here
        crf_pass = DeviceCRF(cfg.crf, dev, files.crf, dataset.image_path)
        folders.append(files.crf)
    start = time.time()
    merged = 0
    with output_folders(*folders):
        if shard.main:
            if bad:
                write_text_atomic(files.skipped, "".join(f"{split}\t{n}\t{k}\t{p}\t{m}\n" for n, k, p, m in problems))
            else:
                files.skipped.unlink(missing_ok=True)  # from an earlier run whose bad items are fixed now
        # 3. the finished images only count in the score (and, with their npz, in the tag quality)
        tag_scores: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for name in done:
            mask = None
            if cm is not None:
                pred = read_mask_png(files.masks / f"{name}.png")
                mask = dataset.read_mask(name, pred.shape)
                cm.update(pred, mask)
            _stored_tag_scores(dataset, name, files, mask, tag_scores)

        # 4. the model over the rest
        sub = copy.copy(dataset)
        sub.names = todo
        defer = transforms_on_device(cfg, dev)  # on a GPU the workers only decode; resize + normalise below
        sub.transform = (MultiScaleTransform(sizes, mean, std, align_corners=ac, defer=defer) if tta
                         else EvalTransform(scale, mean=mean, std=std, align_corners=ac, tags=TagRule.from_config(cfg),
                                            defer=defer))  # fmt: skip
        batch_size, writers, amp = speed_settings(cfg, dev)
        loader = DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=min(int(cfg.data.num_workers), 8),
                            collate_fn=collate, pin_memory=dev.type == "cuda")  # fmt: skip
        desc = f"infer {split}@{scale}" + (f" tta {sizes}{' +flip' if flip else ''}" if tta else "")
        desc += f" [{shard.rank}/{shard.world}]" if shard.enabled else ""
        bar = tqdm(loader, desc=desc, unit="img", disable=not progress or not todo)
        text = stamp("infer", key, probs=bool(save_probs))
        with WriterThreads(writers) as writer:
            for batch in bar:
                batch = sub.transform.finish(batch, dev)
                merged += _infer_batch(model, batch, dev, merge, threshold, files, save_probs, cm,
                                       sizes if tta else None, flip, align_corners=ac, max_side=max_side, text=text,
                                       amp=amp, writer=writer, tag_scores=tag_scores,
                                       probs_resize=str(cfg.infer.probs_resize), crf_pass=crf_pass)  # fmt: skip
        bar.close()
        seconds = time.time() - start

        # 5. one summary for all ranks
        if cm is not None and dist_info.enabled:
            # on the device: NCCL reduces CUDA tensors only (gloo: the CPU)
            cm.matrix = all_reduce_sum(torch.from_numpy(cm.matrix.copy()).to(dev), dist_info).cpu().numpy()
        counts = gather_objects((len(todo), len(done), merged), dist_info)
        summary: Dict[str, Any] = {
            "run": str(layout.root),
            "out": str(files.root),
            "checkpoint": str(ckpt_path),
            "split": split,
            "scale": scale,
            "images": len(dataset.names),
            "computed": sum(c[0] for c in counts),  # this call; the others were finished already
            "resumed": sum(c[1] for c in counts),
            "skipped": len(bad),  # broken items left out (--skip-bad; listed in skipped.txt)
            "merged_with_tags": sum(c[2] for c in counts),  # computed images whose tags were folded in
            "seconds": round(seconds, 2),
            "screen_seconds": round(screen_seconds, 2),
            "classes": dataset.classes,
            "tta": {"sizes": sizes, "flip": flip} if tta else None,
            "max_side": max_side,
        }
        if shard.enabled:
            summary["ranks"] = shard.world
        tags = _tag_quality(layout, split, ckpt_path, dataset, tag_scores, float(cfg.infer.present_threshold),
                            dist_info, shard.main)  # fmt: skip
        if tags is not None:
            summary["tags"] = tags
        if crf_pass is not None:
            summary["crf_pass"] = crf_pass.summary()
        from vitpcm.stages.refine import finish_pseudo

        # score, CRF, summary (rank 0); every rank returns once the summary exists. After the
        # pass, the CRF stage keeps the masks it wrote (same key, newer than their npz) and
        # refines the images it left (on the same backend: the key names it)
        return finish_pseudo(cfg, dataset, files, summary, cm, main=shard.main, dist_info=dist_info, crf=crf,
                             overwrite=overwrite and crf_pass is None, progress=progress,
                             crf_device=str(dev))  # fmt: skip


def _stored_tag_scores(dataset: Any, name: str, files: PseudoLayout, mask: Optional[np.ndarray],
                       into: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> None:  # fmt: skip
    """A finished image's ``(pooled [C], tags [C])`` for the tag quality: the scores from its
    npz (absent in files of older versions: then it is left out), the tags from the tag file
    or its mask."""
    pooled = read_pooled(files.probs / f"{name}.npz")
    if pooled is None:
        return
    tags = dataset.file_tags(name)
    if tags is None and mask is not None:
        tags = labels_from_mask(mask, dataset.num_classes)
    if tags is not None and len(tags) == len(pooled):
        into[name] = (pooled, np.asarray(tags, np.float32))


def _tag_quality(layout: RunLayout, split: str, ckpt_path: Path, dataset: Any,
                 tag_scores: Dict[str, Tuple[np.ndarray, np.ndarray]], threshold: float, dist_info: Dist,
                 main: bool) -> Optional[Dict[str, Any]]:  # fmt: skip
    """Every rank's pooled scores and known tags together; rank 0 writes ``RUN/eval/SPLIT/tags.json``.
    Returns its headline numbers (None when the split's tags are unknown)."""
    from vitpcm.stages.tag_quality import record_tag_quality

    parts = gather_objects(tag_scores, dist_info)
    merged = {name: v for part in parts for name, v in part.items()}
    if not merged or not main:
        return None
    names = [n for n in dataset.names if n in merged]
    scores = np.stack([merged[n][0] for n in names])
    truth = np.stack([merged[n][1] for n in names])
    q = record_tag_quality(layout, split, ckpt_path, scores, truth, dataset.classes, threshold)
    return {k: q[k] for k in ("images", "threshold", "mean_f1", "map", "best_threshold", "best_mean_f1")}


def speed_settings(cfg: Any, dev: torch.device) -> Tuple[int, int, bool]:
    """``(batch size, writer threads, bf16 autocast)`` from ``infer.batch_size / writers / amp``
    (0 = auto: batch 1 on a CPU and 8 on a GPU; min(8, CPUs) writers)."""
    batch_size = int(cfg.infer.batch_size) or (8 if dev.type == "cuda" else 1)
    writers = int(cfg.infer.writers) or min(8, cpu_count())
    return batch_size, writers, bool(cfg.infer.amp) and dev.type == "cuda"


def _write_outputs(files: PseudoLayout, name: str, mask: np.ndarray, probs: Optional[Dict[str, np.ndarray]],
                   text: Optional[Dict[str, str]], crf_pass: Optional[DeviceCRF] = None,
                   crf_mask: Optional[np.ndarray] = None) -> None:  # fmt: skip
    """One image's files: the npz first, then the PNG (a PNG implies its npz), then the CRF
    mask of the one-pass CRF (newer than its npz: the CRF stage sees it finished)."""
    if probs is not None:
        write_probs(files.probs / f"{name}.npz", **probs)
    save_mask_png(files.masks / f"{name}.png", mask, text)
    if crf_pass is not None and crf_mask is not None:
        crf_pass.write(name, crf_mask)


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
    align_corners: bool = False,
    max_side: int = 0,
    text: Optional[Dict[str, str]] = None,
    amp: bool = False,
    writer: Optional[WriterThreads] = None,
    tag_scores: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None,
    probs_resize: str = "mask",
    crf_pass: Optional[DeviceCRF] = None,
) -> int:
    """Predict one batch; write each image's probabilities, then its mask (so a mask implies
    its npz); update ``cm``. Returns how many of its images were merged with their tags.
    ``tag_scores``: where each image's ``(pooled [C], tags [C])`` go when its tags are known.

    ``sizes``: the TTA input sides (``image_<n>`` keys of the batch); None: plain ``image``.
    ``max_side``: an image whose longer side exceeds it keeps its probabilities at a reduced
    size (module docstring); 0 = never. ``text``: the stamp of the mask PNGs. ``amp``: bf16
    autocast of the forward (CUDA). ``writer``: where the file writes run (None: here).
    ``probs_resize``: ``mask`` or ``skimage`` (``infer.probs_resize``: how the stored
    probabilities are enlarged; the mask is the same either way).
    ``crf_pass``: refine the batch with the torch CRF on the device and write ``crf/`` too.
    """
    labels = batch.get("labels")
    written = []  # (name, mask, npz arrays, stored probabilities, size) per image
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        if sizes:
            grid, pooled = predict_tta(model, [batch[f"image_{n}"].to(dev, non_blocking=True) for n in sizes], flip)
        else:
            outputs = model(batch["image"].to(dev, non_blocking=True))
            grid, pooled = outputs["probs"], outputs["pooled"]
    grid, pooled = grid.float(), pooled.float()
    if merge and labels is not None:
        grid = merge_class_labels(grid, labels.to(dev))
    for i, name in enumerate(batch["name"]):
        tags = labels[i] if (merge and labels is not None) else None
        height, width = (int(v) for v in batch["size"][i])
        on_device: List[torch.Tensor] = []  # the stored probabilities, for the one-pass CRF
        mask, probs = image_outputs(grid[i], tags, pooled[i], (height, width), threshold, align_corners=align_corners,
                                    max_side=max_side, keep_probs=save_probs, probs_resize=probs_resize,
                                    stored_out=on_device)  # fmt: skip
        scores = pooled[i].cpu().numpy().astype(np.float32)
        if probs is not None:
            probs["pooled"] = scores
        if tag_scores is not None and labels is not None:
            tag_scores[name] = (scores, labels[i].numpy().astype(np.float32))
        written.append((name, mask, probs, on_device[0] if on_device else None, (height, width)))
        if cm is not None:
            cm.update(mask, batch["mask"][i].numpy())
    crf_masks: Dict[str, np.ndarray] = {}
    if crf_pass is not None:
        crf_masks = crf_pass.masks([(name, stored, probs["classes"], size)
                                    for name, _, probs, stored, size in written if probs is not None])  # fmt: skip
    for name, mask, probs, _, _ in written:
        if writer is None:
            _write_outputs(files, name, mask, probs, text, crf_pass, crf_masks.get(name))
        else:
            writer.submit(_write_outputs, files, name, mask, probs, text, crf_pass, crf_masks.get(name))
    return len(batch["name"]) if (merge and labels is not None) else 0
