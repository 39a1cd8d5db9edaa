"""The resumable, sharded CRF runner: ``probs/NAME.npz`` + images -> ``OUT/NAME.png`` (``vitpcm crf``).

``vitpcm crf --probs DIR --images DIR --out DIR`` reads every ``probs/NAME.npz`` written by
``vitpcm infer`` (:mod:`vitpcm.postprocess.probs_file`: ``probs`` [P, h, w] float32 of the P
present classes, ``classes`` [P], and ``size`` [2] = the image's (H, W) when the
probabilities were stored smaller, see ``infer.max_side``), the image ``NAME.jpg``, and
writes ``OUT/NAME.png`` (palette PNG of class indices at the image's size, as the masks of
``vitpcm infer``). Each image is refined by :func:`vitpcm.postprocess.crf.crf_labels_bounded`
(the maths); images are spread over ``workers`` processes
(:func:`vitpcm.utils.pools.process_pool`: they die with the parent, kill -9 included). With
``crf.backend`` torch on a GPU the images run in this process, one at a time; on the CPU in
the worker processes.

What a run guarantees (docs/reliability.md):

* Resumable: a rerun skips finished masks. A mask is finished when it is newer than its
  probabilities and was made with the same parameters (a key in the PNG's text chunk);
  every PNG is written atomically, so a killed run leaves complete files only.
* Bounded: an image of more than ``crf.max_pixels`` pixels is solved at that many pixels
  (``bilateral_sxy`` scaled with the image) and its marginals are upsampled; the worker
  count is lowered until the largest image fits ``crf.memory_budget``
  (:data:`CRF_BYTES_PER_PIXEL`, measured).
* Missing probabilities or images are listed together before any work starts.
* Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``) each rank refines ``names[rank::world]``
  and rank 0 writes the summary once every rank has left its marker
  (:mod:`vitpcm.utils.shard`); the masks are the same files as one process writes.

numpy, PIL and pydensecrf only at import (torch only when ``crf.backend`` resolves to torch).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from vitpcm.atomic import disk_error, write_json_atomic
from vitpcm.crf_params import DEFAULT_MAX_PIXELS, CRFParams
from vitpcm.errors import VitpcmError
from vitpcm.images import load_rgb
from vitpcm.io import find_image, format_names, names_in, save_mask_png
from vitpcm.postprocess.crf import crf_labels_bounded
from vitpcm.postprocess.probs_file import check_distributions, probs_shape, read_probs
from vitpcm.utils.folders import output_folders
from vitpcm.utils.pools import budget_workers, memory_budget, process_pool
from vitpcm.utils.shard import Shard, clear_done, wait_for_ranks, write_done
from vitpcm.utils.stamps import digest, read_stamp, stamp
from vitpcm.utils.system import cpu_count

__all__ = ["run_crf", "settings_key", "crf_memory", "CRF_BYTES_PER_PIXEL"]

log = logging.getLogger(__name__)


# Peak memory of one dense CRF, bytes per solved pixel: BASE + PER_LABEL x P. Measured with
# pydensecrf2 (peak RSS of one process, 1000 x 1000 pixels): P = 2 / 3 / 8 / 21 took 665 /
# 752 / 1036 / 2052 B/px on a noise image (the permutohedral lattice's worst case) and
# 561 (P = 3) / 1488 (P = 21) on a smooth one; docs/reliability.md.
CRF_BYTES_PER_PIXEL = (600, 80)
WORKER_OVERHEAD = 150 * 1024**2  # a forked worker's own pages, the PNG buffers
# The torch backend (crf.backend=torch, one thread, same 1000 x 1000 noise image): P = 3 / 8
# took 1705 / 2101 B/px above the process's own pages, and importing torch adds about
# 450 MB to each worker (541 vs 90 MB before the CRF).
TORCH_CRF_BYTES_PER_PIXEL = (1470, 80)
TORCH_WORKER_OVERHEAD = 600 * 1024**2


def crf_memory(shape: Tuple[int, int, int, int, int], max_pixels: int, backend: str = "pydensecrf") -> int:
    """Estimated peak bytes of one worker refining an image of ``shape`` = (P, h, w, H, W)
    (:func:`vitpcm.postprocess.probs_file.probs_shape`) under ``max_pixels`` with ``backend`` (resolved)."""
    p, h, w, big_h, big_w = shape
    solved = min(h * w, max_pixels) if max_pixels else h * w
    torch_backend = backend == "torch"
    base, per_label = TORCH_CRF_BYTES_PER_PIXEL if torch_backend else CRF_BYTES_PER_PIXEL
    crf = solved * (base + per_label * p) if p > 1 else 0
    inputs = h * w * p * 4 * 2 + big_h * big_w * (3 + 4 * 2 + 8 + 1)  # probs (+ resized), image, planes, index, mask
    return crf + inputs + (TORCH_WORKER_OVERHEAD if torch_backend else WORKER_OVERHEAD)


def settings_key(params: CRFParams, max_pixels: int, backend: str = "pydensecrf") -> str:
    """What decides a mask besides its inputs; stamped into each PNG (:mod:`vitpcm.utils.stamps`)
    so a rerun with other parameters recomputes instead of keeping stale masks.

    ``backend``: the resolved one. The torch backend's masks differ from pydensecrf's on a
    few pixels in 10^4, so it is part of the key; pydensecrf's key is the one it had before
    ``crf.backend`` existed (its finished masks stay finished). ``tolerance`` enters the key only
    when set (0, the authors' 10 steps, makes the masks it made before the key existed)."""
    values = params.as_dict()
    values.pop("backend")
    if not values.get("tolerance"):
        values.pop("tolerance", None)
    if backend != "pydensecrf":
        values["backend"] = backend
    return digest({"params": values, "max_pixels": int(max_pixels)})


def _refine_one(
    probs_path: Path,
    image_path: Path,
    out_path: Path,
    params: CRFParams,
    max_pixels: int,
    key: str,
    device: Optional[str] = None,
) -> Tuple[float, bool]:
    """Worker: CRF one image and write its mask atomically; returns the seconds it took and
    whether it was solved at a reduced size."""
    start = time.perf_counter()
    probs, classes, size = read_probs(probs_path)
    check_distributions(probs, probs_path)
    image = load_rgb(image_path)
    if image.shape[:2] != tuple(size):
        raise VitpcmError(
            f"{image_path} is {image.shape[1]}x{image.shape[0]} but {probs_path} is {size[1]}x{size[0]}:"
            " the CRF needs the original image that `vitpcm infer` saw"
        )
    mask, reduced = crf_labels_bounded(image, probs, classes, params, max_pixels, device)
    save_mask_png(out_path, mask, stamp("crf", key))
    return time.perf_counter() - start, reduced


def _one_torch_thread() -> None:
    """Pool initializer of the torch backend's CPU workers (as torch's DataLoader workers)."""
    from vitpcm.postprocess.crf_torch import use_threads

    use_threads(1)


def _pool_context():
    # fork: workers start in milliseconds and re-import nothing. They only run numpy /
    # pydensecrf / PIL, so torch's thread pools (loaded when the CRF is chained after
    # inference), which do not survive a fork, are never touched in a child.
    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def _is_done(out_path: Path, probs_path: Path, key: str) -> bool:
    # newer than its probabilities (a rerun of `vitpcm infer` makes the mask stale again)
    # and made with these parameters
    try:
        if out_path.stat().st_mtime_ns < probs_path.stat().st_mtime_ns:
            return False
    except FileNotFoundError:
        return False
    record = read_stamp(out_path)
    return record is not None and record.get("stage") == "crf" and record.get("key") == key


def _remove_own_temporaries(out_dir: Path, mine: set) -> None:
    """Delete ``.NAME.png.*.tmp`` left by a killed run, for this rank's masks only (another
    rank may be writing its own right now)."""
    for tmp in out_dir.rglob(".*.png.*.tmp"):
        target = tmp.parent / tmp.name[1 : tmp.name.rfind(".png.") + 4]
        if target in mine:
            tmp.unlink(missing_ok=True)


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
    *,
    max_pixels: Optional[int] = None,
    memory: Optional[Any] = None,
    shard: Optional[Shard] = None,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """Refine every ``probs_dir/NAME.npz`` with the dense CRF into ``out_dir/NAME.png``.

    Args:
        probs_dir: the ``probs/`` folder of ``vitpcm infer``.
        images_dir: the original images (``NAME.jpg``, or .jpeg / .png).
        out_dir: where the palette PNGs go (created).
        params: CRF parameters (:class:`CRFParams`, or the config's ``crf`` section, whose
            ``max_pixels`` and ``memory_budget`` then apply too); default the authors'.
        workers: processes (0 = one per CPU, shared among the ranks of this machine under
            torchrun; 1 = in this process); lowered to fit the memory budget.
        names: only these images (default: every npz in ``probs_dir``).
        overwrite: recompute masks that are already done.
        image_paths: ``{name: image file}`` instead of ``images_dir`` (a dataset that
            knows its files, e.g. COCO's ``val2014/COCO_val2014_....jpg``).
        max_pixels: the size bound (module docstring); default ``params.max_pixels`` or
            :data:`vitpcm.crf_params.DEFAULT_MAX_PIXELS`; 0 = none.
        memory: the workers' memory budget (``8G``, ``auto``); default ``params.memory_budget``
            or ``auto``.
        shard: this process's share (default from the environment: ``RANK`` / ``WORLD_SIZE``).
        device: where the torch backend computes (``cpu`` / ``cuda``; ``crf.backend=auto``
            picks torch on a CUDA device, pydensecrf otherwise). On a GPU the torch backend
            runs in this process, one image at a time; on the CPU in ``workers`` processes
            of one torch thread each, as pydensecrf.

    Returns a summary dict (written to ``out_dir/summary.json`` by rank 0).
    """
    if max_pixels is None:
        max_pixels = int(
            getattr(params, "max_pixels", DEFAULT_MAX_PIXELS) if params is not None else DEFAULT_MAX_PIXELS
        )
    if memory is None:
        memory = getattr(params, "memory_budget", "auto") if params is not None else "auto"
    if max_pixels < 0:
        raise VitpcmError(f"crf.max_pixels must be >= 0 (0 = no bound), got {max_pixels}")
    params = CRFParams.from_config(params)  # validated; drops crf.workers and the bounds
    shard = shard if shard is not None else Shard.from_env()
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
    names = list(names)
    missing = [n for n in names if not (probs_dir / f"{n}.npz").is_file()]
    if missing:
        raise VitpcmError(f"{len(missing)} probability file(s) missing from {probs_dir}: {format_names(missing)}")
    mine = shard.take(names)
    images = _find_images(mine, images_dir, image_paths)  # every missing image named at once
    backend = params.resolved_backend(device)
    if backend == "torch" and device is not None and str(device) != "cpu":
        from vitpcm.postprocess.crf_torch import torch_device

        device = str(torch_device(device))  # a missing CUDA device: one line now, not a traceback later
        workers = 1  # the GPU parallelises; a forked worker would not survive CUDA
    key = settings_key(params, max_pixels, backend)

    with output_folders(out_dir):
        if shard.enabled:
            clear_done(out_dir, shard)
        try:
            result = _refine_shard(mine, images, probs_dir, out_dir, params, max_pixels, key, workers, memory,
                                   shard, overwrite, progress, device)  # fmt: skip
        except BaseException as exc:
            if shard.enabled and not shard.main:
                _tell_rank0(out_dir, shard, exc)
            raise
        if shard.enabled and not shard.main:
            write_done(out_dir, shard, result)
            return _summary(probs_dir, images_dir, out_dir, names, [result], params, max_pixels, shard, backend)
        parts = [result] + (wait_for_ranks(out_dir, shard) if shard.enabled else [])
        summary = _summary(probs_dir, images_dir, out_dir, names, parts, params, max_pixels, shard, backend)
        write_json_atomic(out_dir / "summary.json", summary)
    return summary


class _NoBar:
    """What the runner calls on a progress bar, doing nothing (``vitpcm crf -q``)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, or a silent stand-in when off: tqdm is imported only when a bar is drawn
    (~25 ms of a torch-free command's start-up)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def _tell_rank0(out_dir: Path, shard: Shard, exc: BaseException) -> None:
    message = str(exc) if isinstance(exc, VitpcmError) else f"{type(exc).__name__}: {exc}"
    try:
        write_done(out_dir, shard, error=message or type(exc).__name__)
    except OSError:  # the disk that failed the rank may fail the marker too: torchrun still ends the job
        pass


def _find_images(
    names: Sequence[str], images_dir: Optional[Path], image_paths: Optional[Mapping[str, Path]]
) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    missing: List[str] = []
    for name in names:
        if image_paths is not None:
            path = image_paths.get(name)
            if path is None or not Path(path).is_file():
                missing.append(f"{path}" if path is not None else name)
                continue
            found[name] = Path(path)
            continue
        try:
            found[name] = find_image(images_dir, name)  # type: ignore[arg-type]
        except VitpcmError:
            missing.append(name)
    if missing:
        where = f"in {images_dir} (looked for NAME.jpg/.jpeg/.png/...)" if image_paths is None else "on disk"
        raise VitpcmError(
            f"no image for {len(missing)} name(s) {where}: {format_names(missing)}; give the folder of the original images"
        )
    return found


def _refine_shard(
    names: Sequence[str],
    images: Mapping[str, Path],
    probs_dir: Path,
    out_dir: Path,
    params: CRFParams,
    max_pixels: int,
    key: str,
    workers: int,
    memory: Any,
    shard: Shard,
    overwrite: bool,
    progress: bool,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """The CRF of this rank's images; returns its counts."""
    _remove_own_temporaries(out_dir, {out_dir / f"{n}.png" for n in names})
    jobs: List[Tuple[str, Path, Path, Path]] = []
    skipped = 0
    for name in names:
        probs_path, out_path = probs_dir / f"{name}.npz", out_dir / f"{name}.png"
        if not overwrite and _is_done(out_path, probs_path, key):
            skipped += 1
            continue
        jobs.append((name, probs_path, images[name], out_path))

    # cores: this machine's, shared among the ranks on it; then memory
    wanted = int(workers) if workers and int(workers) > 0 else max(1, cpu_count() // shard.local_world)
    wanted = max(1, min(wanted, len(jobs)))
    note = None
    if wanted > 1:
        shapes = {j[0]: probs_shape(j[1]) for j in jobs}
        backend = params.resolved_backend(device)
        need = max((crf_memory(s, max_pixels, backend) for s in shapes.values() if s is not None), default=0)
        budget = memory_budget(memory, share=shard.local_world, key="crf.memory_budget")
        n_workers, note = budget_workers(wanted, need, budget)
        # biggest first: a large image started last would run alone at the end
        jobs.sort(key=lambda j: -(shapes[j[0]][1] * shapes[j[0]][2]) if shapes[j[0]] else 0)
    else:
        n_workers = wanted
    if note:
        log.warning("crf: %s", note)

    start = time.perf_counter()
    busy, reduced = 0.0, 0
    bar = _progress_bar(len(jobs), "crf" if not shard.enabled else f"crf {shard.rank}/{shard.world}",
                        progress and bool(jobs))  # fmt: skip
    try:
        if n_workers == 1:
            for _, probs_path, image_path, out_path in jobs:
                seconds, small = _refine_one(probs_path, image_path, out_path, params, max_pixels, key, device)
                busy, reduced = busy + seconds, reduced + small
                bar.update()
        elif jobs:
            if params.gaussian == "exact":
                import scipy.ndimage  # noqa: F401  (0.2-0.3 s: once here, inherited by the forked workers)
            # the torch backend on the CPU: one process per core like pydensecrf, each with one
            # torch thread (threads of several processes on shared cores wait for each other at
            # every parallel region: 2 threads each made it 3-5x slower under load)
            init = _one_torch_thread if params.resolved_backend(device) == "torch" else None
            with process_pool(n_workers, mp_context=_pool_context(), initializer=init) as pool:
                pending: set[Future] = {
                    pool.submit(_refine_one, p, i, o, params, max_pixels, key) for _, p, i, o in jobs
                }
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        seconds, small = fut.result()  # re-raises a worker's error here
                        busy, reduced = busy + seconds, reduced + small
                        bar.update()
    except OSError as exc:  # a write failure (a DiskError, from atomic.atomic_path, is one line already)
        if isinstance(exc, VitpcmError):
            raise
        err = disk_error(exc, Path(exc.filename) if getattr(exc, "filename", None) else out_dir / "NAME.png")
        if err is None:
            raise
        raise err from None
    finally:
        bar.close()
    return {"computed": len(jobs), "skipped": skipped, "reduced": reduced, "workers": n_workers,
            "busy": busy, "seconds": time.perf_counter() - start, "memory_note": note}  # fmt: skip


def _summary(
    probs_dir: Path,
    images_dir: Optional[Path],
    out_dir: Path,
    names: Sequence[str],
    parts: Sequence[Mapping[str, Any]],
    params: CRFParams,
    max_pixels: int,
    shard: Shard,
    backend: str = "pydensecrf",
) -> Dict[str, Any]:
    computed = sum(int(p.get("computed", 0)) for p in parts)
    busy = sum(float(p.get("busy", 0.0)) for p in parts)
    summary: Dict[str, Any] = {
        "probs": str(probs_dir),
        "images": str(images_dir) if images_dir is not None else "from the dataset",
        "out": str(out_dir),
        "total": len(names),
        "computed": computed,
        "skipped": sum(int(p.get("skipped", 0)) for p in parts),
        "reduced": sum(int(p.get("reduced", 0)) for p in parts),  # solved at max_pixels, then upsampled
        "workers": sum(int(p.get("workers", 0)) for p in parts),
        "seconds": round(max(float(p.get("seconds", 0.0)) for p in parts), 3),
        "seconds_per_image": round(busy / computed, 4) if computed else None,
        "params": params.as_dict(),
        "max_pixels": int(max_pixels),
        "backend": backend,
    }
    if shard.enabled:
        summary["ranks"] = shard.world
    notes = [p["memory_note"] for p in parts if p.get("memory_note")]
    if notes:
        summary["memory_note"] = notes[0]
    return summary
