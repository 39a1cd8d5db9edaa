"""Dense CRF refinement of pseudo-masks (the paper's post-processing), parallel over images.

``vitpcm crf --probs DIR --images DIR --out DIR`` reads every ``probs/NAME.npz`` written by
``vitpcm infer`` (``probs`` [P, H, W] float32 of the P present classes, ``classes`` [P]),
the image ``NAME.jpg`` at the same size, and writes ``OUT/NAME.png`` (palette PNG of class
indices, as the masks of ``vitpcm infer``).

The CRF is Krähenbühl & Koltun's fully connected CRF (``pydensecrf2`` on PyPI) with the
authors' parameters (their ``configs/voc12.yaml``): 10 mean-field iterations, a Gaussian
kernel (sxy 1, compat 3), a bilateral kernel (sxy 67, srgb 3, compat 4), unary
``-log(max(p, 1e-5))`` (pydensecrf's ``unary_from_softmax``). The parameters are
defined once, in :class:`vitpcm.crf_params.CRFParams` (the config's ``crf`` section
extends it); every function here also takes that config section.

Differences from the authors' path, both measured in ``docs/benchmarks.md``:

* The CRF runs over the present classes only (P labels, typically 2-3 on VOC) instead of
  all 21 / 81 channels. Absent classes enter the authors' CRF with p = 0, clipped to
  1e-5 (unary 11.5): they essentially never win a pixel, but every mean-field iteration
  pays for them.
* Images are spread over ``workers`` processes; finished masks are skipped on a rerun
  (a mask is "finished" when it is newer than its probabilities file), and every PNG is
  written atomically, so a killed run leaves complete files only.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vitpcm.crf_params import CRFParams
from vitpcm.errors import VitpcmError
from vitpcm.io import find_image, format_names, names_in, save_mask_png, write_json_atomic
from vitpcm.utils.system import resolve_workers

__all__ = ["CRFParams", "unary_energy", "dense_crf", "crf_labels", "load_probs", "run_crf"]

log = logging.getLogger(__name__)


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:  # pragma: no cover - a declared dependency
        raise VitpcmError(
            "the dense CRF needs pydensecrf2: pip install pydensecrf2 (builds with a C++ compiler)"
        ) from None
    return dcrf


def unary_energy(probs: np.ndarray, clip: float = 1e-5) -> np.ndarray:
    """``-log(max(p, clip))`` as a C-contiguous float32 ``[C, H * W]`` (pydensecrf's layout)."""
    c = probs.shape[0]
    p = np.maximum(probs.reshape(c, -1).astype(np.float32, copy=False), np.float32(clip))
    return np.ascontiguousarray(-np.log(p), dtype=np.float32)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: Optional[CRFParams] = None) -> np.ndarray:
    """Mean-field marginals of the fully connected CRF.

    Args:
        image: ``[H, W, 3]`` uint8 RGB at the size of ``probs``.
        probs: ``[C, H, W]`` class probabilities (any C >= 1).
        params: kernel parameters and iterations (default the authors').

    Returns:
        ``Q`` ``[C, H, W]`` float32, a distribution over the C labels per pixel.
    """
    c, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image shape {image.shape} does not match probabilities {probs.shape} (want [H, W, 3])")
    params = params if params is not None else CRFParams()
    dcrf = _densecrf()
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary_energy(probs, params.clip))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.require(image, dtype=np.uint8, requirements=["C", "W"]),  # pydensecrf wants a writable buffer
        compat=params.bilateral_compat,
    )
    q = crf.inference(int(params.iterations))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def crf_labels(
    image: np.ndarray, probs: np.ndarray, classes: Sequence[int], params: Optional[CRFParams] = None
) -> np.ndarray:
    """CRF over the given channels; returns the ``[H, W]`` uint8 mask of class indices.

    ``probs`` [P, H, W] holds the channels of ``classes`` [P] (the present classes). One
    channel needs no CRF: every pixel is that class.
    """
    classes = np.asarray(classes, dtype=np.int64)
    if classes.ndim != 1 or len(classes) != probs.shape[0]:
        raise ValueError(f"classes {classes.shape} must list one index per channel of probs {probs.shape}")
    if len(classes) == 1:
        return np.full(probs.shape[1:], classes[0], dtype=np.uint8)
    q = dense_crf(image, probs, params)
    return classes[q.argmax(0)].astype(np.uint8)


def load_probs(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read ``probs`` [P, H, W] float32 and ``classes`` [P] int64 from a ``vitpcm infer`` npz."""
    try:
        with np.load(path) as data:
            probs, classes = data["probs"], data["classes"]
    except KeyError:
        raise VitpcmError(
            f"{path} lacks the arrays 'probs' and 'classes': give the probs/ folder of `vitpcm infer`"
        ) from None
    except (OSError, ValueError) as exc:
        raise VitpcmError(f"cannot read {path}: {exc}; rerun `vitpcm infer` for it") from None
    if probs.ndim != 3 or classes.ndim != 1 or len(classes) != probs.shape[0] or len(classes) == 0:
        raise VitpcmError(
            f"{path}: probs {probs.shape} and classes {classes.shape} do not fit (want [P, H, W] and [P]);"
            " rerun `vitpcm infer` for it"
        )
    return probs.astype(np.float32, copy=False), classes.astype(np.int64, copy=False)


def _refine_one(probs_path: Path, image_path: Path, out_path: Path, params: CRFParams) -> float:
    """Worker: CRF one image and write its mask atomically; returns the seconds it took."""
    # the module itself is numpy / PIL only (the same reader as training: EXIF, 16-bit, ...)
    from vitpcm.images import load_rgb

    start = time.perf_counter()
    probs, classes = load_probs(probs_path)
    image = load_rgb(image_path)
    if image.shape[:2] != probs.shape[1:]:
        raise VitpcmError(
            f"{image_path} is {image.shape[1]}x{image.shape[0]} but {probs_path} is {probs.shape[2]}x{probs.shape[1]}:"
            " the CRF needs the original image that `vitpcm infer` saw"
        )
    save_mask_png(out_path, crf_labels(image, probs, classes, params))
    return time.perf_counter() - start


def _pool_context():
    # fork: workers start in milliseconds and re-import nothing. They only run numpy /
    # pydensecrf / PIL, so torch's thread pools (loaded when the CRF is chained after
    # inference), which do not survive a fork, are never touched in a child.
    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def _is_done(out_path: Path, probs_path: Path) -> bool:
    # newer than its probabilities: a rerun of `vitpcm infer` makes the mask stale again
    try:
        return out_path.stat().st_mtime_ns >= probs_path.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def run_crf(
    probs_dir: str | Path,
    images_dir: Optional[str | Path],
    out_dir: str | Path,
    params: Optional[Any] = None,
    workers: int = 0,
    names: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    progress: bool = True,
    image_paths: Optional[Mapping[str, Path]] = None,
) -> Dict[str, Any]:
    """Refine every ``probs_dir/NAME.npz`` with the dense CRF into ``out_dir/NAME.png``.

    Args:
        probs_dir: the ``probs/`` folder of ``vitpcm infer``.
        images_dir: the original images (``NAME.jpg``, or .jpeg / .png).
        out_dir: where the palette PNGs go (created).
        params: CRF parameters (:class:`CRFParams`, or the config's ``crf`` section);
            default the authors'.
        workers: processes (0 = one per CPU; 1 = in this process).
        names: only these images (default: every npz in ``probs_dir``).
        overwrite: recompute masks that are already done.
        image_paths: ``{name: image file}`` instead of ``images_dir`` (a dataset that
            knows its files, e.g. COCO's ``val2014/COCO_val2014_....jpg``).

    Returns a summary dict (also written to ``out_dir/summary.json``).
    """
    from tqdm import tqdm

    params = CRFParams.from_config(params)  # validated; drops crf.workers
    probs_dir, out_dir = Path(probs_dir), Path(out_dir)
    images_dir = Path(images_dir) if images_dir is not None else None
    if not probs_dir.is_dir():
        raise VitpcmError(
            f"probabilities folder {probs_dir} not found: give the probs/ folder written by `vitpcm infer`"
        )
    if image_paths is None and (images_dir is None or not images_dir.is_dir()):
        raise VitpcmError(f"image folder {images_dir} not found: give the folder of the original images")
    if names is None:
        names = names_in(probs_dir, ".npz")
        if not names:
            raise VitpcmError(f"no NAME.npz files in {probs_dir}: run `vitpcm infer` without --no-probs first")
    missing = [n for n in names if not (probs_dir / f"{n}.npz").is_file()]
    if missing:
        raise VitpcmError(f"{len(missing)} probability file(s) missing from {probs_dir}: {format_names(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.png.*.tmp"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)

    jobs: List[Tuple[str, Path, Path, Path]] = []
    skipped = 0
    for name in names:
        probs_path, out_path = probs_dir / f"{name}.npz", out_dir / f"{name}.png"
        if not overwrite and _is_done(out_path, probs_path):
            skipped += 1
            continue
        image_path = Path(image_paths[name]) if image_paths is not None else find_image(images_dir, name)  # type: ignore[arg-type]
        jobs.append((name, probs_path, image_path, out_path))

    workers = max(1, min(resolve_workers(workers), len(jobs)))
    start = time.perf_counter()
    busy = 0.0
    bar = tqdm(total=len(jobs), desc="crf", unit="img", disable=not progress or not jobs)
    if workers == 1:
        for _, probs_path, image_path, out_path in jobs:
            busy += _refine_one(probs_path, image_path, out_path, params)
            bar.update()
    elif jobs:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
        try:
            pending: set[Future] = {pool.submit(_refine_one, p, i, o, params) for _, p, i, o in jobs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    busy += fut.result()  # re-raises a worker's VitpcmError here
                    bar.update()
        finally:
            # on an error or Ctrl-C: drop what has not started; finished PNGs are complete
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    seconds = time.perf_counter() - start
    summary = {
        "probs": str(probs_dir),
        "images": str(images_dir) if images_dir is not None else "from the dataset",
        "out": str(out_dir),
        "total": len(names),
        "computed": len(jobs),
        "skipped": skipped,
        "workers": workers,
        "seconds": round(seconds, 3),
        "seconds_per_image": round(busy / len(jobs), 4) if jobs else None,
        "params": params.as_dict(),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
