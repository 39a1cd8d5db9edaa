"""Dense CRF: vitpcm's path (present classes, parallel) vs the authors' path (all channels, joblib / one process).

Usage::

    PYTHONPATH=src python benchmarks/crf_bench.py [--n 16] [--authors-jobs N] [--out benchmarks/results/crf_bench.json]
        [--real-probs RUN/pseudo/val/probs --real-images DATA/JPEGImages --real-classes 6]

What it measures, on N synthetic VOC-sized images (500 x 375, half of them portrait):

The inputs, the authors' path and the agreement live in ``vitpcm.stages.bench.crf`` and ``.crf_authors`` (shared
with ``vitpcm bench``, which times both paths end to end with process start).

* ``authors_joblib``: the authors' CRF stage as their ``main.py test --crf`` runs it
  (``crf.py``): the probabilities scattered into all 21 VOC channels (absent classes 0),
  pydensecrf's ``unary_from_softmax``, ``DenseCRF2D(W, H, 21)``, argmax, PNG, spread over
  ``--authors-jobs`` processes (default one per CPU) by ``joblib.Parallel(pre_dispatch="all")``
  (joblib's worker start included). ``present_w2_vs_authors_joblib`` is the speed-up at
  equal cores when ``--authors-jobs`` is 2 (the default on a 2-CPU machine).
* ``authors``: the same one image after another in one process (the second column: a
  speed-up against it contains the cores). (Their resize of the patch grid to the image size is left out: vitpcm
  does it in ``vitpcm infer``, so both paths start from full-size probabilities.)
* ``present_w1`` / ``present_w2``: ``vitpcm.postprocess.crf_runner.run_crf`` (present classes only)
  with 1 and 2 worker processes, reading the same files and writing the same PNGs.
* agreement: share of pixels where the present-only mask equals the all-channel mask.

The images are the built-in synthetic shapes (``render_sample``) upscaled to VOC size, saved
as JPEG (quality 90) with mild sensor-like noise; the probabilities imitate baseline
pseudo-masks: the one-hot mask pooled to a 60 x 60 patch grid (ViT-PCM at 960 / 16),
noisy logits, softmax over background + 1-3 foreground classes (random VOC ids), bilinear
upsampling to the image size. ``--real-*`` adds the agreement (and timing) on the
probabilities of a trained run (e.g. the demo's), with all of that run's classes as the
"all channels".

The machine is shared: wall-clock times depend on what else runs; CPU seconds per image
(``process_time``) are reported beside them and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitpcm.io import save_mask_png  # noqa: E402
from vitpcm.postprocess.crf import CRFParams  # noqa: E402
from vitpcm.postprocess.crf_runner import run_crf  # noqa: E402
from vitpcm.stages.bench.crf import VOC_CLASSES, agreement  # noqa: E402
from vitpcm.stages.bench.crf import make_crf_inputs as make_dataset  # noqa: E402
from vitpcm.stages.bench.crf_authors import run_authors  # noqa: E402
from vitpcm.utils.system import cpu_count  # noqa: E402


def run_present(probs_dir: Path, images_dir: Path, out_dir: Path, names: List[str], workers: int) -> Dict[str, float]:
    cpu0 = time.process_time()
    start = time.perf_counter()
    summary = run_crf(probs_dir, images_dir, out_dir, workers=workers, names=names, overwrite=True, progress=False)
    wall = time.perf_counter() - start
    result = {"seconds": wall, "seconds_per_image": wall / len(names)}
    if workers == 1:
        result["cpu_seconds_per_image"] = (time.process_time() - cpu0) / len(names)
    else:
        result["worker_seconds_per_image"] = summary["seconds_per_image"]
    return result


def compare(
    probs_dir: Path, images_dir: Path, work: Path, names: List[str], num_classes: int, jobs: int
) -> Dict[str, object]:
    load0 = os.getloadavg()
    res: Dict[str, object] = {"images": len(names), "authors_jobs": jobs}
    res["authors_joblib"] = run_authors(probs_dir, images_dir, work / "authors_joblib", names, num_classes, jobs)
    res["authors"] = run_authors(probs_dir, images_dir, work / "authors", names, num_classes)
    res["present_w1"] = run_present(probs_dir, images_dir, work / "present_w1", names, 1)
    res["present_w2"] = run_present(probs_dir, images_dir, work / "present_w2", names, 2)
    res["agreement_present_vs_all_channels"] = agreement(work / "present_w1", work / "authors", names)
    res["workers_1_vs_2_identical"] = (
        agreement(work / "present_w1", work / "present_w2", names)["pixels_equal_pct"] == 100.0
    )
    a, p1, p2 = res["authors"]["seconds"], res["present_w1"]["seconds"], res["present_w2"]["seconds"]  # type: ignore[index]
    aj = res["authors_joblib"]["seconds"]  # type: ignore[index]
    res["speedup"] = {
        "present_w2_vs_authors_joblib": aj / p2,  # equal cores when authors_jobs is 2
        "present_w1_vs_authors": a / p1,
        "present_w2_vs_authors": a / p2,
        "workers_2_vs_1": p1 / p2,
        "cpu_present_vs_all_channels": res["authors"]["cpu_seconds_per_image"]
        / res["present_w1"]["cpu_seconds_per_image"],  # type: ignore[index]
    }
    probs_channels = [len(np.load(probs_dir / f"{n}.npz")["classes"]) for n in names]
    res["present_classes_mean"] = float(np.mean(probs_channels))
    res["loadavg_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    return res


def profile(probs_dir: Path, images_dir: Path, names: List[str], num_classes: int) -> Dict[str, Dict[str, float]]:
    """CPU milliseconds per image of each step, present classes vs all channels."""
    import pydensecrf.densecrf as dcrf

    from vitpcm.images import load_rgb
    from vitpcm.io import find_image
    from vitpcm.postprocess.crf import unary_energy
    from vitpcm.postprocess.probs_file import load_probs

    steps: Dict[str, Dict[str, float]] = {"present": {}, "all_channels": {}}

    def clock(path: str, step: str, t0: float) -> None:
        steps[path][step] = steps[path].get(step, 0.0) + 1000 * (time.process_time() - t0) / len(names)

    p = CRFParams()
    for n in names:
        t = time.process_time()
        probs, classes = load_probs(probs_dir / f"{n}.npz")
        image = load_rgb(find_image(images_dir, n))
        for path in steps:
            clock(path, "read npz + image", t)
        for path in steps:
            x = probs
            if path == "all_channels":
                x = np.zeros((num_classes, *probs.shape[1:]), dtype=np.float32)
                x[classes] = probs
            c, h, w = x.shape
            t = time.process_time()
            crf = dcrf.DenseCRF2D(w, h, c)
            crf.setUnaryEnergy(unary_energy(x, p.clip))
            clock(path, "unary", t)
            t = time.process_time()
            crf.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
            clock(path, "gaussian lattice", t)
            t = time.process_time()
            crf.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=image, compat=p.bilateral_compat)
            clock(path, "bilateral lattice", t)
            t = time.process_time()
            q = np.asarray(crf.inference(p.iterations))
            clock(path, f"{p.iterations} mean-field iterations", t)
            t = time.process_time()
            save_mask_png(probs_dir.parent / f"profile_{path}.png", q.reshape(c, h, w).argmax(0).astype(np.uint8))
            clock(path, "argmax + PNG", t)
    return {path: {k: round(v, 1) for k, v in d.items()} for path, d in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="synthetic VOC-sized images (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--authors-jobs", type=int, default=0, help="the authors' joblib processes (0 = one per CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crf_bench.json"))
    parser.add_argument("--real-probs", help="probs/ folder of a trained run (adds a real-model section)")
    parser.add_argument("--real-images", help="the images of that split")
    parser.add_argument("--real-classes", type=int, help="number of classes of that run (the 'all channels')")
    parser.add_argument("--real-n", type=int, default=0, help="only the first N real images (default all)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crfbench-"))
    try:
        t = time.perf_counter()
        names = make_dataset(work / "voc", args.n, args.seed)
        print(f"made {len(names)} VOC-sized images in {time.perf_counter() - t:.1f}s", flush=True)
        result: Dict[str, object] = {
            "what": "dense CRF stage: vitpcm (present classes, workers) vs authors (21 channels, joblib over"
            " authors_jobs processes as their main.py; and one process)",
            "params": CRFParams().__dict__,
            "machine": {
                "cpus": os.cpu_count(),
                "affinity": len(os.sched_getaffinity(0)),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "pydensecrf2": metadata.version("pydensecrf2"),
            },  # fmt: skip
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        jobs = args.authors_jobs or cpu_count()
        result["synthetic_voc_sized"] = compare(
            work / "voc" / "probs", work / "voc" / "images", work / "voc", names, VOC_CLASSES, jobs
        )
        result["synthetic_voc_sized"]["cpu_ms_per_image_by_step"] = profile(work / "voc" / "probs", work / "voc" / "images",
                                                                             names[:4], VOC_CLASSES)  # fmt: skip
        print(json.dumps(result["synthetic_voc_sized"], indent=2), flush=True)
        if args.real_probs:
            real = sorted(p.stem for p in Path(args.real_probs).glob("*.npz"))
            real = real[: args.real_n] if args.real_n else real
            result["real_run"] = {"probs": args.real_probs, "num_classes": args.real_classes,
                                  **compare(Path(args.real_probs), Path(args.real_images), work / "real", real, args.real_classes, jobs)}  # fmt: skip
            print(json.dumps(result["real_run"], indent=2), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
