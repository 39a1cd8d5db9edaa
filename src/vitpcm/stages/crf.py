"""Stage ``crf`` (``vitpcm crf``): the dense CRF over pseudo-masks (the paper's post-processing).

* :func:`crf_folders`: ``vitpcm crf --probs DIR --images DIR --out DIR`` (any folders).
* :func:`crf_pseudo` / :func:`crf_split`: the CRF of one split of a run
  (``RUN/pseudo/SPLIT/probs`` -> ``.../crf``), scored against the dataset's ground truth
  when it has masks; ``vitpcm infer --crf`` and the demo chain it this way.
* :func:`crf`: the same from a run folder and overrides (``vitpcm.crf``; ``vitpcm.refine``,
  its name before the stage was named as the command, stays an alias).

The work itself is :func:`vitpcm.postprocess.crf_runner.run_crf`. Importing this module
imports neither torch nor timm: the CRF is numpy and pydensecrf (torch only when
``crf.backend`` resolves to torch, inside the call). Only :func:`crf_split` / :func:`crf`
build the dataset (``vitpcm.data``), inside the call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from vitpcm.crf_params import CRFParams
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import evaluate_folders, names_from_split_file
from vitpcm.postprocess.crf_runner import run_crf
from vitpcm.runs import PseudoLayout, RunLayout
from vitpcm.utils.shard import Shard

PathLike = Union[str, "os.PathLike[str]"]


def crf_params_from_overrides(overrides: Sequence[str] = ()) -> Tuple[CRFParams, int]:
    """``crf.key=value`` overrides -> (validated parameters, ``crf.workers``).

    Any other key is an error: ``vitpcm crf`` has no dataset, model or run.
    """
    from vitpcm.config import load_config  # lazy: omegaconf + yaml (~80 ms) only when a config is read

    wrong = [o for o in overrides if not o.startswith("crf.")]
    if wrong:
        raise VitpcmError(f"vitpcm crf takes crf.* overrides only (e.g. crf.iterations=5), got {' '.join(wrong)}")
    cfg = load_config(None, overrides)
    return CRFParams.from_config(cfg.crf), int(cfg.crf.workers)


def crf_section_from_overrides(overrides: Sequence[str] = ()) -> Any:
    """``crf.key=value`` overrides -> the config's whole ``crf`` section (parameters,
    ``workers``, ``max_pixels``, ``memory_budget``), validated. Other keys are an error."""
    from vitpcm.config import load_config  # lazy, as above

    crf_params_from_overrides(overrides)  # the same check and message
    return load_config(None, overrides).crf


def crf_folders(
    probs: PathLike,
    images: Optional[PathLike],
    out: PathLike,
    *,
    params: Optional[Any] = None,
    overrides: Sequence[str] = (),
    workers: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    split_file: Optional[PathLike] = None,
    overwrite: bool = False,
    progress: bool = True,
    image_paths: Optional[Mapping[str, Path]] = None,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """Refine every ``probs/NAME.npz`` (of ``vitpcm infer``) into ``out/NAME.png``.

    Args:
        probs: the ``probs/`` folder (``probs`` [P, H, W] float32, ``classes`` [P]).
        images: the original images (``NAME.jpg``, .png, ...), at the size of the probabilities.
        out: where the palette PNGs go (created); finished masks are skipped on a rerun.
        params: :class:`CRFParams` or the config's ``crf`` section; default the authors'.
        overrides: instead of ``params``: ``crf.key=value`` strings (``vitpcm crf``'s
            arguments; :func:`crf_params_from_overrides`), ``crf.workers`` included.
        workers: processes (0 = one per CPU; 1 = in this process); None: ``crf.workers``
            of ``overrides`` / of ``params`` when it is a config section, else 0.
        names / split_file: only these images (default every npz in ``probs``).
        overwrite: recompute masks that are already done.
        image_paths: ``{name: image file}`` instead of ``images``.
        device: where ``crf.backend=torch`` computes (``cpu`` / ``cuda``); ``auto`` picks
            torch on a CUDA device (:func:`vitpcm.postprocess.crf_runner.run_crf`).

    Returns the summary (also written to ``out/summary.json``): ``computed``, ``skipped``,
    ``workers``, ``seconds``, ``params``, ...
    """
    if overrides:
        if params is not None:
            raise ValueError("give params or overrides, not both")
        params = crf_section_from_overrides(overrides)
    if workers is None:
        workers = int(getattr(params, "workers", 0) or 0)
    if split_file is not None and names is None:
        names = names_from_split_file(split_file)
    # params goes on as given: a config section also carries max_pixels and memory_budget
    return run_crf(probs, images, out, params=params, workers=workers, names=names,
                   overwrite=overwrite, progress=progress, image_paths=image_paths, device=device)  # fmt: skip


def crf_pseudo(
    cfg: Any,
    dataset: Any,
    pseudo: PathLike,
    *,
    overwrite: bool = True,
    progress: bool = True,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """The dense CRF of one inferred split: ``PSEUDO/probs`` -> ``PSEUDO/crf`` (``crf`` config section).

    ``dataset``: the split's dataset (its names, image files and, when it has masks, the
    ground truth the CRF masks are scored against). ``overwrite``: recompute every mask
    (right after inference: the probabilities were just rewritten). ``device``: the
    inference device (``crf.backend=auto`` means torch on a CUDA one).

    Under torchrun (``RANK`` / ``WORLD_SIZE``) each rank refines its share of the images
    (:func:`vitpcm.postprocess.crf_runner.run_crf`); rank 0 returns once all are done and scores
    the whole folder, the other ranks return their own counts without a score.

    Returns ``{"out", "seconds", "workers", "computed", "skipped", "reduced"}`` and ``miou``
    when the split has masks.
    """
    files = PseudoLayout(pseudo)
    result = crf_folders(files.probs, None, files.crf, params=cfg.crf, workers=int(cfg.crf.workers),
                         names=dataset.names, overwrite=overwrite, progress=progress,
                         image_paths={n: dataset.image_path(n) for n in dataset.names}, device=device)  # fmt: skip
    info: Dict[str, Any] = {"out": str(files.crf)}
    info.update({k: result[k] for k in ("seconds", "workers", "computed", "skipped", "reduced") if k in result})
    if dataset.has_masks and Shard.from_env().main:
        cm = evaluate_folders({"crf": files.crf}, dataset.read_mask, dataset.classes, names=dataset.names,
                              progress=False)["crf"]  # fmt: skip
        info["miou"] = cm.miou()
    return info


def crf_split(cfg: Any, run: PathLike, split: str, *, progress: bool = True, overwrite: bool = True) -> Dict[str, Any]:
    """:func:`crf_pseudo` of ``RUN/pseudo/SPLIT`` with the split's dataset (``cfg.data``).

    Builds the dataset (imports ``vitpcm.data``, hence torch) inside the call.
    """
    from vitpcm.data import build_dataset

    pseudo = RunLayout(run).pseudo(split)
    if not PseudoLayout(pseudo).probs.is_dir():
        raise VitpcmError(
            f"no probabilities in {PseudoLayout(pseudo).probs}: run `vitpcm infer {run} --split {split}` first"
        )
    dataset = build_dataset(cfg.data, split, require_masks=False)
    return crf_pseudo(cfg, dataset, pseudo, overwrite=overwrite, progress=progress)


def crf(
    run: PathLike, split: str = "val", *, overrides: Sequence[str] = (), overwrite: bool = False, progress: bool = True
) -> Dict[str, Any]:
    """The CRF of ``RUN/pseudo/SPLIT`` with the run's config (``overrides``: e.g. ``crf.iterations=5``,
    ``data.root=...``); finished masks are kept unless ``overwrite``. See :func:`crf_split`."""
    from vitpcm.config import load_config  # lazy, as above

    layout = RunLayout(run).require()
    cfg = load_config(layout.config, overrides)
    return crf_split(cfg, layout.root, split, progress=progress, overwrite=overwrite)


refine = crf  # the name of this stage before it was named as the command (vitpcm.refine)
