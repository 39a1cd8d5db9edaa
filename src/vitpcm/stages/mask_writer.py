"""The one loop of the stages that write masks (``infer``, ``segment infer``, ``predict``): share, resume, check, predict, write.

A stage supplies only what is its own (:class:`MaskStage`): which of its images are
finished, what a finished image still counts for, and how a batch becomes masks; and its
loader (:class:`Loader`). :func:`write_masks` does the rest, the same for every stage
(docs/reliability.md):

1. this rank's share (``names[rank::world]`` under ``torchrun``), less the finished images
   (unless ``overwrite``);
2. every image still to do read once (``vitpcm check-data``'s check, with its cache), the
   problems of all ranks together, before anything is written: an error listing them all,
   or, with ``skip_bad``, the broken items left out and listed in ``OUT/skipped.txt``;
3. the output folders (removed again when the stage fails before writing into them), the
   finished images counted (score, the stage's own records), the model over the rest;
4. per image the npz first (:mod:`vitpcm.postprocess.probs_file`), then the stamped PNG (a
   PNG implies its npz), then, with the one-pass CRF (:mod:`vitpcm.stages.crf_pass`), its
   ``crf/`` mask (newer than its npz: the CRF stage sees it finished); written on
   ``Loader.writers`` threads while the model runs on;
5. the confusion matrix and the counts of every rank summed, then the stage's ``finish``
   (still inside the folders' guard); :func:`finish_pseudo` is that of the pseudo-mask stages.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vitpcm.atomic import atomic_path, write_json_atomic, write_text_atomic
from vitpcm.data.check import check_items
from vitpcm.engine.distributed import Dist, all_reduce_sum, barrier, gather_objects
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import ConfusionMatrix
from vitpcm.io import read_mask_png, save_mask_png
from vitpcm.postprocess.probs_file import write_probs
from vitpcm.runs import PseudoLayout
from vitpcm.stages.crf import crf_pseudo
from vitpcm.stages.crf_pass import DeviceCRF
from vitpcm.utils.folders import output_folders
from vitpcm.utils.pools import WriterThreads
from vitpcm.utils.shard import Shard

log = logging.getLogger(__name__)

Problem = Tuple[str, str, str, str]  # (name, kind, file, reason): data.check.check_items
T = TypeVar("T")


@dataclass
class MaskOutput:
    """One image's outputs, as a stage's :meth:`MaskStage.predict` returns them.

    ``mask``: ``[H, W]`` uint8 class indices; ``probs``: the npz's arrays (the keywords of
    :func:`vitpcm.postprocess.probs_file.write_probs`) or None (no npz); ``text``: the PNG's
    stamp (:mod:`vitpcm.utils.stamps`); ``stored``: the stored probabilities ``[P, h, w]`` on
    the device, for the one-pass CRF (None: not refined in the pass); ``size``: the image's
    ``(H, W)``.
    """

    name: str
    mask: np.ndarray
    probs: Optional[Dict[str, np.ndarray]]
    text: Optional[Dict[str, str]]
    stored: Optional[torch.Tensor] = None
    size: Tuple[int, int] = (0, 0)


class MaskStage(Protocol):
    """What a stage supplies to :func:`write_masks`."""

    def finished(self, name: str) -> bool:
        """The image's files are complete and were made with the stage's current settings."""

    def resumed(self, name: str, mask: Optional[np.ndarray]) -> None:
        """A finished image, not recomputed: what it still counts for (tag scores, records).
        ``mask``: its ground truth when the dataset has masks (already in the score)."""

    def predict(self, batch: Dict[str, Any]) -> List[MaskOutput]:
        """One loader batch (on the device where the transform finishes there) -> one output
        per image, in the batch's order. Runs under ``torch.inference_mode``."""


@dataclass
class Loader:
    """How a stage's images are read: ``transform`` (its ``finish(batch, device)`` runs in the
    loop when ``device_finish``: the part made on the device), batch size, loader processes, collate, pinned memory, the progress bar's
    text, and the writer threads (<= 1: each image is written in the loop)."""

    transform: Any
    batch_size: int
    workers: int
    collate: Callable[[List[Any]], Dict[str, Any]]
    desc: str
    pin_memory: bool = False
    device_finish: bool = False
    writers: int = 1


@dataclass
class MaskPass:
    """What :func:`write_masks` did: this rank's ``done`` / ``todo`` names, every rank's
    ``problems`` and ``bad`` (items left out), the counts summed over ranks, the seconds of
    the check and of the model pass, and the confusion matrix summed over ranks (None
    without ground truth)."""

    done: List[str]
    todo: List[str]
    problems: List[Problem]
    bad: List[str]
    computed: int = 0
    resumed: int = 0
    seconds: float = 0.0
    screen_seconds: float = 0.0
    cm: Optional[ConfusionMatrix] = None


def write_masks(
    stage: MaskStage,
    dataset: Any,
    files: Any,
    loader: Loader,
    *,
    label: str,
    split: Optional[str],
    shard: Shard,
    dist_info: Dist,
    device: torch.device,
    finish: Callable[[MaskPass], T],
    save_probs: bool = True,
    skip_bad: Optional[bool] = None,
    crf_pass: Optional[DeviceCRF] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> T:
    """Run a stage's masks over ``dataset`` into ``files`` (module docstring); returns ``finish(pass)``.

    Args:
        stage: the stage's own part (:class:`MaskStage`).
        dataset: the images (a split's dataset, or :class:`vitpcm.data.loose.LooseImages`);
            broken items are dropped from it with ``skip_bad``.
        files: the output layout (``masks``, ``probs``, ``skipped``:
            :class:`vitpcm.runs.PseudoLayout` / ``PredictLayout``).
        label: the stage in log lines (``infer val``, ``segment infer val``, ``predict``).
        split: the split's name (in messages and ``skipped.txt``); None for loose images.
        finish: called inside the folders' guard on every rank, after the counts and the
            confusion matrix are summed; its value is returned.
        save_probs: write the npz of each image (``files.probs``).
        skip_bad: leave broken items out (``skipped.txt``) instead of stopping; None: the
            stage offers no such option (then it never writes or removes ``skipped.txt``).
        crf_pass: the one-pass CRF (writes ``crf_pass.out_dir`` too).
    """
    # 1. what is left to do: this rank's share, less the finished images
    mine = shard.take(list(dataset.names))
    done = [] if overwrite else [n for n in mine if stage.finished(n)]
    done_set = set(done)
    todo = [n for n in mine if n not in done_set]
    if done:
        log.info("%s: %d of %d images already done (same checkpoint and settings), %d to go",
                 label, len(done), len(mine), len(todo))  # fmt: skip

    # 2. every item still to do read once, all problems together, before anything is written
    t_screen = time.time()
    whole_split = split is not None and len(todo) == len(dataset.names)  # the check's cache keeps whole splits
    problems = check_items(dataset, todo, full=whole_split, progress=progress) if todo else []
    problems = [p for part in gather_objects(problems, dist_info) for p in part]  # every rank stops, or none
    screen_seconds = time.time() - t_screen
    if problems and not skip_bad:
        raise _problems_error(problems, split, skip_bad is not None)
    bad = sorted({p[0] for p in problems})
    if bad:
        total = len(dataset.names)
        dataset.drop(bad)
        bad_set = set(bad)
        todo = [n for n in todo if n not in bad_set]
        if split is not None:
            log.warning(
                "split %s: skipping %d broken item(s) of %d (list in %s)", split, len(bad), total, files.skipped
            )
        else:
            log.warning("%s: skipping %d unreadable image(s) of %d (list in %s)", label, len(bad), total, files.skipped)
    if not dataset.names:
        raise VitpcmError(
            f"every item of split '{split}' is broken: nothing to infer"
            if split is not None
            else "every input image is unreadable: nothing to predict"
        )

    result = MaskPass(done=done, todo=todo, problems=problems, bad=bad, screen_seconds=screen_seconds)
    result.cm = ConfusionMatrix(dataset.num_classes) if dataset.has_masks else None
    folders = [files.masks] + ([files.probs] if save_probs else []) + ([crf_pass.out_dir] if crf_pass else [])
    start = time.time()
    with output_folders(*folders):
        if shard.main and skip_bad is not None:
            if bad:
                write_text_atomic(files.skipped, "".join(_skipped_line(p, split) for p in problems))
            else:
                files.skipped.unlink(missing_ok=True)  # from an earlier run whose bad items are fixed now
        # 3. the finished images only count (in the score, in the stage's records)
        for name in done:
            mask = None
            if result.cm is not None:
                pred = read_mask_png(files.masks / f"{name}.png")
                mask = dataset.read_mask(name, pred.shape)
                result.cm.update(pred, mask)
            stage.resumed(name, mask)

        # 4. the model over the rest
        _predict_all(stage, dataset, todo, files, loader, result.cm, device, crf_pass, shard, progress)
        result.seconds = time.time() - start

        # 5. every rank's counts and score together
        if result.cm is not None and dist_info.enabled:
            # on the device: NCCL reduces CUDA tensors only (gloo: the CPU)
            result.cm.matrix = all_reduce_sum(torch.from_numpy(result.cm.matrix.copy()).to(device),
                                              dist_info).cpu().numpy()  # fmt: skip
        counts = gather_objects((len(todo), len(done)), dist_info)
        result.computed = sum(c[0] for c in counts)  # this call; the others were finished already
        result.resumed = sum(c[1] for c in counts)
        return finish(result)


def _problems_error(problems: Sequence[Problem], split: Optional[str], skip_offered: bool) -> VitpcmError:
    """One error listing every problem (``[split] file: reason`` per line)."""
    if split is None:
        return VitpcmError(
            f"{len(problems)} unreadable image(s), nothing predicted; fix or remove them, or pass --skip-bad"
            " to leave them out:\n" + "\n".join(f"{path}: {message}" for _, _, path, message in problems)
        )
    hint = "fix them or pass --skip-bad to leave these items out" if skip_offered else (
        "fix them (`vitpcm check-data` lists them too)")  # fmt: skip
    return VitpcmError(
        f"{len(problems)} problem(s) in split '{split}' ({len({p[0] for p in problems})} item(s)), nothing"
        f" inferred; {hint}:\n" + "\n".join(f"[{split}] {path}: {message}" for _, _, path, message in problems)
    )


def _skipped_line(problem: Problem, split: Optional[str]) -> str:
    """A line of ``skipped.txt``: ``[split\\t]name\\tkind\\tfile\\treason``."""
    name, kind, path, message = problem
    return (f"{split}\t" if split is not None else "") + f"{name}\t{kind}\t{path}\t{message}\n"


def _predict_all(
    stage: MaskStage,
    dataset: Any,
    todo: List[str],
    files: Any,
    loader: Loader,
    cm: Optional[ConfusionMatrix],
    device: torch.device,
    crf_pass: Optional[DeviceCRF],
    shard: Shard,
    progress: bool,
) -> None:
    """The stage's model over ``todo``, each image written as it comes (:func:`write_image`)."""
    sub = copy.copy(dataset)
    sub.names = todo
    sub.transform = loader.transform
    batches = DataLoader(sub, batch_size=loader.batch_size, shuffle=False, num_workers=loader.workers,
                         collate_fn=loader.collate, pin_memory=loader.pin_memory)  # fmt: skip
    desc = loader.desc + (f" [{shard.rank}/{shard.world}]" if shard.enabled else "")
    bar = tqdm(batches, desc=desc, unit="img", disable=not progress or not todo)
    with WriterThreads(loader.writers) as writer, torch.inference_mode():
        for batch in bar:
            if loader.device_finish:
                batch = loader.transform.finish(batch, device)
            outputs = stage.predict(batch)
            if cm is not None:
                for i, out in enumerate(outputs):
                    cm.update(out.mask, batch["mask"][i].numpy())
            crf_masks: Dict[str, np.ndarray] = {}
            if crf_pass is not None:
                crf_masks = crf_pass.masks([(o.name, o.stored, o.probs["classes"], o.size) for o in outputs
                                            if o.probs is not None and o.stored is not None])  # fmt: skip
            for out in outputs:
                writer.submit(write_image, files, out, crf_pass, crf_masks.get(out.name))
    bar.close()


def write_image(files: Any, out: MaskOutput, crf_pass: Optional[DeviceCRF] = None,
                crf_mask: Optional[np.ndarray] = None) -> None:  # fmt: skip
    """One image's files: the npz first, then the PNG (a PNG implies its npz), then the CRF
    mask of the one-pass CRF (newer than its npz: the CRF stage sees it finished)."""
    if out.probs is not None:
        write_probs(files.probs / f"{out.name}.npz", **out.probs)
    save_mask_png(files.masks / f"{out.name}.png", out.mask, out.text)
    if crf_pass is not None and crf_mask is not None:
        crf_pass.write(out.name, crf_mask)


def finish_pseudo(
    cfg: Any,
    dataset: Any,
    files: PseudoLayout,
    summary: Dict[str, Any],
    cm: Any,
    *,
    main: bool,
    dist_info: Any,
    crf: bool,
    overwrite: bool,
    progress: bool,
    crf_device: Optional[str] = None,
) -> Dict[str, Any]:
    """The common end of the stages that write pseudo-masks (``vitpcm infer``, ``vitpcm
    segment infer``): the score into ``summary`` (and ``files.confusion``, by rank 0; ``cm``
    None: no ground truth), the CRF chained when ``crf`` (once every rank's probabilities are
    on disk; finished CRF masks are kept unless ``overwrite``: a rewritten npz is newer than
    its mask, which makes it stale; ``crf_device``: the inference device, where
    ``crf.backend=auto`` runs torch if it is a GPU), ``files.summary`` written by rank 0. Every rank returns
    once it exists. Returns ``summary``."""
    if cm is not None:
        result = cm.summary(dataset.classes)
        summary.update(miou=result["miou"], iou=result["iou"])
        if main:
            with atomic_path(files.confusion) as tmp, open(tmp, "wb") as f:
                np.save(f, cm.matrix)
    if crf:
        barrier(dist_info)
        summary["crf"] = crf_pseudo(cfg, dataset, files.root, overwrite=overwrite, progress=progress,
                                    device=crf_device)  # fmt: skip
        if "miou" in summary["crf"]:
            summary["crf_miou"] = summary["crf"].pop("miou")
    if main:
        write_json_atomic(files.summary, summary)
    barrier(dist_info)
    return summary
