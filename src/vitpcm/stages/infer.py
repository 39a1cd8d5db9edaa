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

The loop (share, resume, check, write, sum over ranks) is :func:`vitpcm.stages.mask_writer.write_masks`'s;
this module supplies ViT-PCM's batch (:class:`PseudoMasks`) and the summary.

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

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from vitpcm.config import run_config
from vitpcm.data import EvalTransform, build_dataset, collate
from vitpcm.data.transforms import MultiScaleTransform, TagRule, transforms_on_device
from vitpcm.engine.checkpoint import checkpoint_config, find_run_checkpoint
from vitpcm.engine.distributed import Dist, gather_objects, stage_group
from vitpcm.errors import VitpcmError
from vitpcm.io import labels_from_mask
from vitpcm.models.backbone import resolve_normalisation
from vitpcm.models.predict import image_outputs, predict_batch, tta_sizes
from vitpcm.models.vitpcm import ViTPCM, merge_class_labels
from vitpcm.postprocess.probs_file import read_pooled
from vitpcm.runs import PseudoLayout, RunLayout, run_of_checkpoint
from vitpcm.stages.crf_pass import DeviceCRF
from vitpcm.stages.load import load_model
from vitpcm.stages.mask_writer import Loader, MaskOutput, MaskPass, finish_pseudo, write_masks
from vitpcm.stages.tag_quality import record_tag_quality
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
    model.to(dev).eval()
    files = PseudoLayout(out if out is not None else layout.pseudo(split))
    mean, std = resolve_normalisation(cfg, model.adapter)
    ac = bool(cfg.input.align_corners)  # fidelity switch: the authors' TF1 resampling (docs/reproduce.md)
    flip = bool(cfg.infer.tta_flip) if tta else False
    key = digest(_settings(cfg, ckpt_path, scale, sizes, tta, flip, mean, std))
    batch_size, writers, amp = speed_settings(cfg, dev)
    stage = PseudoMasks(model, dataset, files, dev, key=key, ckpt_mtime=ckpt_path.stat().st_mtime_ns,
                        save_probs=save_probs, merge=bool(cfg.infer.merge_labels),
                        threshold=float(cfg.infer.present_threshold), sizes=sizes if tta else None, flip=flip,
                        align_corners=ac, max_side=int(cfg.infer.max_side), amp=amp,
                        probs_resize=str(cfg.infer.probs_resize))  # fmt: skip
    crf_pass = None
    if crf and DeviceCRF.wanted(cfg.crf, dev):  # crf.backend resolves to torch: refine each batch right here
        crf_pass = DeviceCRF(cfg.crf, dev, files.crf, dataset.image_path)
    defer = transforms_on_device(cfg, dev)  # on a GPU the workers only decode; resize + normalise in the loop
    transform = (MultiScaleTransform(sizes, mean, std, align_corners=ac, defer=defer) if tta
                 else EvalTransform(scale, mean=mean, std=std, align_corners=ac, tags=TagRule.from_config(cfg),
                                    defer=defer))  # fmt: skip
    desc = f"infer {split}@{scale}" + (f" tta {sizes}{' +flip' if flip else ''}" if tta else "")
    loader = Loader(transform, batch_size, min(int(cfg.data.num_workers), 8), collate, desc,
                    pin_memory=dev.type == "cuda", device_finish=True, writers=writers)  # fmt: skip

    def finish(done: MaskPass) -> Dict[str, Any]:
        summary: Dict[str, Any] = {
            "run": str(layout.root),
            "out": str(files.root),
            "checkpoint": str(ckpt_path),
            "split": split,
            "scale": scale,
            "images": len(dataset.names),
            "computed": done.computed,  # this call; the others were finished already
            "resumed": done.resumed,
            "skipped": len(done.bad),  # broken items left out (--skip-bad; listed in skipped.txt)
            "merged_with_tags": sum(
                gather_objects(stage.merged, dist_info)
            ),  # computed images whose tags were folded in
            "seconds": round(done.seconds, 2),
            "screen_seconds": round(done.screen_seconds, 2),
            "classes": dataset.classes,
            "tta": {"sizes": sizes, "flip": flip} if tta else None,
            "max_side": int(cfg.infer.max_side),
        }
        if shard.enabled:
            summary["ranks"] = shard.world
        tags = _tag_quality(layout, split, ckpt_path, dataset, stage.tag_scores, float(cfg.infer.present_threshold),
                            dist_info, shard.main)  # fmt: skip
        if tags is not None:
            summary["tags"] = tags
        if crf_pass is not None:
            summary["crf_pass"] = crf_pass.summary()
        # score, CRF, summary (rank 0); every rank returns once the summary exists. After the
        # pass, the CRF stage keeps the masks it wrote (same key, newer than their npz) and
        # refines the images it left (on the same backend: the key names it)
        return finish_pseudo(cfg, dataset, files, summary, done.cm, main=shard.main, dist_info=dist_info, crf=crf,
                             overwrite=overwrite and crf_pass is None, progress=progress,
                             crf_device=str(dev))  # fmt: skip

    return write_masks(stage, dataset, files, loader, label=f"infer {split}", split=split, shard=shard,
                       dist_info=dist_info, device=dev, finish=finish, save_probs=save_probs, skip_bad=skip_bad,
                       crf_pass=crf_pass, overwrite=overwrite, progress=progress)  # fmt: skip


class PseudoMasks:
    """ViT-PCM's part of the pseudo-mask loop (:class:`vitpcm.stages.mask_writer.MaskStage`):
    a batch's patch distributions ``[B, C, h, w]`` (and pooled scores ``[B, C]``), merged
    with the tags when known, upsampled, argmax'ed; each image's probabilities and mask.

    ``sizes``: the TTA input sides (``image_<n>`` keys of the batch); None: plain ``image``.
    ``max_side``: an image whose longer side exceeds it keeps its probabilities at a reduced
    size (module docstring); 0 = never. ``amp``: bf16 autocast of the forward (CUDA).
    ``probs_resize``: ``mask`` or ``skimage`` (``infer.probs_resize``: how the stored
    probabilities are enlarged; the mask is the same either way).

    Collects ``tag_scores`` (each image's ``(pooled [C], tags [C])`` when its tags are known,
    finished images' from their npz) and ``merged`` (computed images merged with their tags).
    """

    def __init__(self, model: ViTPCM, dataset: Any, files: PseudoLayout, device: torch.device, *, key: str,
                 ckpt_mtime: int, save_probs: bool, merge: bool, threshold: float, sizes: Optional[Sequence[int]],
                 flip: bool, align_corners: bool, max_side: int, amp: bool, probs_resize: str) -> None:  # fmt: skip
        self.model, self.dataset, self.files, self.device = model, dataset, files, device
        self.key, self.ckpt_mtime, self.save_probs = key, ckpt_mtime, save_probs
        self.merge, self.threshold, self.sizes, self.flip = merge, threshold, sizes, flip
        self.align_corners, self.max_side, self.amp, self.probs_resize = align_corners, max_side, amp, probs_resize
        self.text = stamp("infer", key, probs=bool(save_probs))
        self.tag_scores: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.merged = 0

    def finished(self, name: str) -> bool:
        return _finished(name, self.files, self.key, self.save_probs, self.ckpt_mtime)

    def resumed(self, name: str, mask: Optional[np.ndarray]) -> None:
        _stored_tag_scores(self.dataset, name, self.files, mask, self.tag_scores)

    def predict(self, batch: Dict[str, Any]) -> List[MaskOutput]:
        dev = self.device
        labels = batch.get("labels")
        grid, pooled = predict_batch(self.model, batch, dev, self.sizes, self.flip, self.amp)
        merged = self.merge and labels is not None
        if merged:
            grid = merge_class_labels(grid, labels.to(dev))
        out: List[MaskOutput] = []
        for i, name in enumerate(batch["name"]):
            height, width = (int(v) for v in batch["size"][i])
            on_device: List[torch.Tensor] = []  # the stored probabilities, for the one-pass CRF
            mask, probs = image_outputs(grid[i], labels[i] if merged else None, pooled[i], (height, width),
                                        self.threshold, align_corners=self.align_corners, max_side=self.max_side,
                                        keep_probs=self.save_probs, probs_resize=self.probs_resize,
                                        stored_out=on_device)  # fmt: skip
            scores = pooled[i].cpu().numpy().astype(np.float32)
            if probs is not None:
                probs["pooled"] = scores
            if labels is not None:
                self.tag_scores[name] = (scores, labels[i].numpy().astype(np.float32))
            out.append(MaskOutput(name, mask, probs, self.text, on_device[0] if on_device else None, (height, width)))
        if merged:
            self.merged += len(batch["name"])
        return out


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
