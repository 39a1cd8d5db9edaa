"""The dense CRF at equal cores (issue 19, item 6): where the time goes, and the candidates' agreement and speed.

Usage::

    PYTHONPATH=src python benchmarks/crf_speed.py profile   [--n 50] [--work DIR]
    PYTHONPATH=src python benchmarks/crf_speed.py agreement [--n 50] [--work DIR]
    PYTHONPATH=src python benchmarks/crf_speed.py time      [--n 50] [--work DIR] [--repeats 3] [--jobs 2]
    # -> benchmarks/results/crf_speed_{profile,agreement,time}.json

Inputs: the CRF bench's VOC-sized images (:func:`vitpcm.stages.bench.crf.make_crf_inputs`,
seed 0, 500 x 375 / 375 x 500, 21 classes), made once in ``--work`` (default
``/tmp/crfspeed/voc``); the authors' masks (their path, :func:`run_authors`: all 21
channels, ``crf.gaussian=lattice``, 10 iterations) made once in ``WORK/../authors``.

* ``profile``: CPU milliseconds per image of every step of ``vitpcm crf``'s work on one
  image with the default settings (npz read, checks, JPEG decode, unary, the bilateral
  lattice, each part of the 10 mean-field steps, argmax, PNG), in one process.
* ``agreement``: each candidate setting (``crf.iterations``, ``crf.tolerance``,
  ``crf.gaussian``) through :func:`vitpcm.postprocess.crf.crf_labels` in this process:
  pixels equal to the authors' masks (all images, worst image), CPU seconds per image.
* ``time``: fresh processes side by side, in alternating order per repeat: the authors'
  stage (``python -m vitpcm.stages.bench.crf_authors authors P I O 21 JOBS``: joblib over JOBS
  processes, process start included) and ``vitpcm crf`` (JOBS workers) with each
  candidate's overrides; median wall seconds, the ratio of the medians, agreement of the
  masks written, ``uptime``'s load average before and after each command.

The machine is shared (2 cores, other jobs): compare only figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitpcm.crf_params import CRFParams  # noqa: E402
from vitpcm.images import load_rgb  # noqa: E402
from vitpcm.io import names_in, read_mask_png, save_mask_png  # noqa: E402
from vitpcm.stages.bench.crf import VOC_CLASSES, agreement, make_crf_inputs  # noqa: E402
from vitpcm.stages.bench.crf_authors import authors_one, run_authors  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# (name, overrides): the authors' settings are crf.gaussian=lattice, 10 iterations, tolerance 0
CANDIDATES = {
    "lattice_10": ["crf.gaussian=lattice"],
    "exact_10": [],
    "exact_7": ["crf.iterations=7"],
    "exact_6": ["crf.iterations=6"],
    "exact_5": ["crf.iterations=5"],
    "exact_4": ["crf.iterations=4"],
    "exact_3": ["crf.iterations=3"],
    "exact_tol_1e-4": ["crf.tolerance=0.0001"],
    "exact_tol_3e-4": ["crf.tolerance=0.0003"],
    "exact_tol_1e-3": ["crf.tolerance=0.001"],
    "exact_tol_3e-3": ["crf.tolerance=0.003"],
    "exact_tol_1e-2": ["crf.tolerance=0.01"],
    "lattice_tol_1e-3": ["crf.gaussian=lattice", "crf.tolerance=0.001"],
}


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def inputs(work: Path, n: int, authors_masks: bool = True, num_classes: int = VOC_CLASSES) -> List[str]:
    """The bench's inputs in ``work`` and the authors' masks in ``work/../authors`` (made once)."""
    if not (work / "probs").is_dir() or len(names_in(work / "probs", ".npz")) < n:
        make_crf_inputs(work, n, seed=0)
    names = names_in(work / "probs", ".npz")[:n]
    authors = work.parent / "authors"
    if authors_masks and any(not (authors / f"{m}.png").is_file() for m in names):
        run_authors(work / "probs", work / "images", authors, names, num_classes)
    return names


def params_of(overrides: Sequence[str]) -> CRFParams:
    values: Dict[str, Any] = {"backend": "pydensecrf"}
    for item in overrides:
        key, value = item.split("=", 1)
        values[key.removeprefix("crf.")] = value
    return CRFParams.from_config(values)


def profile(work: Path, names: Sequence[str]) -> Dict[str, Any]:
    """CPU ms per image of each step of the default ``vitpcm crf`` work (exact smoothness, 10 steps)."""
    from pydensecrf import densecrf as dcrf
    from pydensecrf import eigen
    from scipy.ndimage import gaussian_filter1d

    from vitpcm.postprocess.crf import _softmax, unary_energy
    from vitpcm.postprocess.probs_file import check_distributions, read_probs

    steps: Dict[str, float] = defaultdict(float)
    p = CRFParams()

    def tick(step: str, t0: float) -> float:
        now = time.process_time()
        steps[step] += now - t0
        return now

    def smooth(x: np.ndarray) -> np.ndarray:
        return gaussian_filter1d(gaussian_filter1d(x, p.gauss_sxy, axis=-2, mode="constant"), p.gauss_sxy, axis=-1,
                                 mode="constant")  # fmt: skip

    load0 = loadavg()
    for name in names:
        t = time.process_time()
        probs, classes, _ = read_probs(work / "probs" / f"{name}.npz")
        t = tick("read npz", t)
        check_distributions(probs, work / "probs" / f"{name}.npz")
        t = tick("check probabilities", t)
        image = load_rgb(work / "images" / f"{name}.jpg")
        t = tick("decode JPEG", t)
        c, h, w = probs.shape
        unary = unary_energy(probs, p.clip)
        t = tick("unary", t)
        crf = dcrf.DenseCRF2D(w, h, c)
        crf.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=np.require(image, np.uint8, ["C", "W"]),
                                 compat=p.bilateral_compat)  # fmt: skip
        t = tick("bilateral lattice (build)", t)
        norm = (1.0 / np.sqrt(smooth(np.ones((h, w), np.float32)) + np.float32(1e-20))).astype(np.float32)
        of_one = (norm * smooth(norm)).reshape(-1)
        gauss = np.empty((c, h * w), dtype=np.float32)
        energy, message = eigen.matrixXf(np.zeros_like(unary)), eigen.matrixXf(np.zeros_like(unary))
        q = _softmax(-unary)
        t = tick("mean field set-up", t)
        for _ in range(p.iterations):
            mq = eigen.matrixXf(q)
            t = tick("10 steps: copy Q to Eigen", t)
            crf.stepInference(mq, energy, message)
            t = tick("10 steps: bilateral message (pydensecrf lattice)", t)
            gauss[:-1] = (norm * smooth(q[:-1].reshape(c - 1, h, w) * norm)).reshape(c - 1, h * w)
            np.subtract(of_one, gauss[:-1].sum(0), out=gauss[-1])  # as the package: C - 1 channels filtered
            t = tick("10 steps: smoothness message (separable Gaussian)", t)
            q = _softmax(p.gauss_compat * gauss - unary - np.asarray(message))
            t = tick("10 steps: softmax", t)
        mask = classes[q.argmax(0)].astype(np.uint8).reshape(h, w)
        t = tick("argmax", t)
        save_mask_png(work.parent / "profile.png", mask, {"stage": "profile"})
        tick("PNG write", t)
    total = sum(steps.values())
    authors = [authors_one(work / "probs" / f"{n}.npz", work / "images" / f"{n}.jpg", work.parent / "profile_authors.png",
                           VOC_CLASSES) for n in names]  # fmt: skip
    return {
        "images": len(names),
        "what": "CPU ms per image of each step of vitpcm crf's work (crf.gaussian=exact, 10 iterations), one process",
        "cpu_ms_per_image": {k: round(1000 * v / len(names), 1) for k, v in steps.items()},
        "share_pct": {k: round(100 * v / total, 1) for k, v in steps.items()},
        "total_cpu_ms_per_image": round(1000 * total / len(names), 1),
        "authors_cpu_ms_per_image": round(1000 * float(np.mean(authors)), 1),  # their whole image: 21 channels, lattice
        "loadavg_before_after": [load0, loadavg()],
    }


def study_agreement(work: Path, names: Sequence[str], which: Sequence[str]) -> Dict[str, Any]:
    """Each candidate in this process: pixels equal to the authors' masks, CPU s per image."""
    from vitpcm.postprocess.crf import crf_labels
    from vitpcm.postprocess.probs_file import read_probs

    data = []
    for name in names:
        probs, classes, _ = read_probs(work / "probs" / f"{name}.npz")
        data.append((probs, classes, load_rgb(work / "images" / f"{name}.jpg"),
                     read_mask_png(work.parent / "authors" / f"{name}.png")))  # fmt: skip
    out: Dict[str, Any] = {}
    for key in which:
        params = params_of(CANDIDATES[key])
        load0, cpu, same, total, worst = loadavg(), 0.0, 0, 0, 1.0
        for probs, classes, image, theirs in data:
            t = time.process_time()
            mask = crf_labels(image, probs, classes, params)
            cpu += time.process_time() - t
            eq = int((mask == theirs).sum())
            same, total, worst = same + eq, total + mask.size, min(worst, eq / mask.size)
        out[key] = {"overrides": CANDIDATES[key], "pixels_equal_pct": round(100 * same / total, 4),
                    "worst_image_pct": round(100 * worst, 4), "cpu_seconds_per_image": round(cpu / len(data), 4),
                    "loadavg_before_after": [load0, loadavg()]}  # fmt: skip
        print(key, out[key], flush=True)
    return out


def timed(command: List[str]) -> Dict[str, Any]:
    """Wall seconds, CPU seconds (the command and every process it started and waited for) and
    the load average before and after."""
    load0, before = loadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "loadavg_before_after": [load0, loadavg()]}


def study_time(
    work: Path, names: Sequence[str], which: Sequence[str], repeats: int, jobs: int, partial: Path, head: Dict[str, Any]
) -> Dict[str, Any]:
    """Fresh processes, side by side: the authors' joblib stage vs ``vitpcm crf`` per candidate.
    The summary so far is rewritten to ``partial`` after every command (a long run cut short
    keeps its finished repeats)."""
    probs, images, py = work / "probs", work / "images", sys.executable
    commands = {"authors_joblib": [py, "-m", "vitpcm.stages.bench.crf_authors", "authors", str(probs), str(images),
                                   str(work.parent / "t_authors"), str(VOC_CLASSES), str(jobs)]}  # fmt: skip
    for key in which:
        commands[key] = [py, "-m", "vitpcm", "crf", "--probs", str(probs), "--images", str(images), "--out",
                         str(work.parent / f"t_{key}"), "--overwrite", "-q", f"crf.workers={jobs}",
                         "crf.backend=pydensecrf", *CANDIDATES[key]]  # fmt: skip
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in commands}
    order = list(commands)

    def summary(complete: bool) -> Dict[str, Any]:
        out: Dict[str, Any] = {"images": len(names), "jobs": jobs, "repeats": repeats, "complete": complete}
        done = {k: v for k, v in runs.items() if v}
        med = {k: float(np.median([x["seconds"] for x in v])) for k, v in done.items()}
        cpu = {k: float(np.median([x["cpu_seconds"] for x in v])) for k, v in done.items()}
        for key in done:
            entry: Dict[str, Any] = {
                "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(commands[key])),
                "median_seconds": round(med[key], 3),
                "median_seconds_per_image": round(med[key] / len(names), 4),
                "seconds_runs": [round(x["seconds"], 3) for x in done[key]],
                "median_cpu_seconds": round(cpu[key], 3),
                "cpu_seconds_runs": [round(x["cpu_seconds"], 3) for x in done[key]],
                "loadavg_runs": [x["loadavg_before_after"] for x in done[key]],
            }
            if key != "authors_joblib" and "authors_joblib" in med:
                entry["speedup_vs_authors_joblib"] = round(med["authors_joblib"] / med[key], 3)
                entry["cpu_ratio_vs_authors_joblib"] = round(cpu["authors_joblib"] / cpu[key], 3)
                entry["agreement_vs_authors"] = agreement(work.parent / f"t_{key}", work.parent / "t_authors", names)
            out[key] = entry
        return out

    for r in range(repeats):
        for key in order if r % 2 == 0 else order[::-1]:
            runs[key].append(timed(commands[key]))
            last = runs[key][-1]
            print(
                key,
                r,
                round(last["seconds"], 2),
                round(last["cpu_seconds"], 2),
                last["loadavg_before_after"],
                flush=True,
            )
            partial.write_text(json.dumps({**head, **summary(False)}, indent=1) + "\n")
    return summary(True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("profile", "agreement", "time"))
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument(
        "--work",
        default="/tmp/crfspeed/voc",
        help="images/NAME.jpg + probs/NAME.npz (made when absent); the authors' masks go to WORK/../authors",
    )
    parser.add_argument("--classes", type=int, default=VOC_CLASSES, help="the authors' channel count (agreement)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="the authors' joblib processes = vitpcm's workers")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", help="default benchmarks/results/crf_speed_WHAT.json")
    args = parser.parse_args()
    work = Path(args.work)
    names = inputs(work, args.n, authors_masks=args.what == "agreement", num_classes=args.classes)
    result: Dict[str, Any] = {"command": "python benchmarks/crf_speed.py " + " ".join(sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "cpus": len(os.sched_getaffinity(0)), "loadavg_start": loadavg(),
                              "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}  # fmt: skip
    if args.what == "profile":
        result.update(profile(work, names))
    elif args.what == "agreement":
        result["candidates"] = study_agreement(work, names, args.candidates)
    else:
        out = Path(args.out or RESULTS / f"crf_speed_{args.what}.json")
        result.update(study_time(work, names, args.candidates, args.repeats, args.jobs, out, result))
    result["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = Path(args.out or RESULTS / f"crf_speed_{args.what}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
