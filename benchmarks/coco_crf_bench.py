"""COCO-sized dense CRF: vitpcm's per-image cost (present classes) vs all 81 channels.

Usage::

    nice -n 10 python benchmarks/coco_crf_bench.py [--n 20] [--out benchmarks/results/coco_crf.json]

On N COCO-like inputs (640 x 480, 81 classes, background + 1-3 present: the synthetic shapes
of :func:`vitpcm.stages.bench.crf.make_crf_inputs`, probabilities from a 60 x 60 patch grid)
it times, image by image and in alternating order:

* ``present``: what one ``vitpcm crf`` worker does per image: read the npz and the JPEG,
  the dense CRF over the present classes, argmax, palette PNG
  (:func:`vitpcm.postprocess.crf.crf_labels`; the default ``crf.gaussian=exact``);
* ``present_lattice``: the same with ``crf.gaussian=lattice`` (the paper presets: the
  smoothness kernel through pydensecrf's lattice, as the authors);
* ``all_81``: the authors' path (:func:`vitpcm.stages.bench.crf_authors.authors_one`): the same with
  the probabilities scattered into all 81 channels (absent = 0, clipped to 1e-5).

CPU seconds (``process_time``) and wall seconds per image, medians; peak resident memory of
one worker for each path; pixel agreement of the two masks; ``vitpcm crf`` with 1 and 2
workers over the N images (how it scales over this machine's cores); and the authors' stage
as their ``main.py`` runs it, ``joblib.Parallel`` over every CPU, beside ``vitpcm crf`` with
one worker per CPU (``at_equal_cores``).

The COCO val projection (40,504 images on 16 cores) is an EXTRAPOLATION: measured median
CPU seconds per image x 40,504 / 16, assuming the cost is linear in images and the
16 processes scale linearly (images are independent; each worker holds one image).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitpcm.images import load_rgb  # noqa: E402
from vitpcm.io import save_mask_png  # noqa: E402
from vitpcm.postprocess.crf import CRFParams, crf_labels  # noqa: E402
from vitpcm.postprocess.crf_runner import run_crf  # noqa: E402
from vitpcm.postprocess.probs_file import load_probs  # noqa: E402
from vitpcm.stages.bench.crf import COCO_CLASSES, COCO_SIZES, agreement, make_crf_inputs  # noqa: E402
from vitpcm.stages.bench.crf_authors import authors_one, run_authors  # noqa: E402
from vitpcm.stages.bench.machine import machine_info  # noqa: E402
from vitpcm.stages.bench.memory import PeakMemory  # noqa: E402
from vitpcm.utils.system import cpu_count  # noqa: E402

COCO_VAL = 40_504
CORES = 16
PEERS_HOURS = 30.0  # reported by peers' users: the CRF over COCO val with 16 processes


def present_one(probs_path: Path, image_path: Path, out_path: Path, params: CRFParams) -> float:
    """One image as a ``vitpcm crf`` worker does it; returns CPU seconds."""
    start = time.process_time()
    probs, classes = load_probs(probs_path)
    image = load_rgb(image_path)
    save_mask_png(out_path, crf_labels(image, probs, classes, params))
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="COCO-sized images (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coco_crf.json"))
    parser.add_argument("--note", default="", help="how the machine was used meanwhile, stored with the results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cococrf-"))
    try:
        names = make_crf_inputs(work, args.n, args.seed, num_classes=COCO_CLASSES, sizes=COCO_SIZES)
        probs, images = work / "probs", work / "images"
        paths = ("present", "present_lattice", "all_81")
        for path in paths:
            (work / path).mkdir()
        times: Dict[str, Dict[str, List[float]]] = {p: {"cpu": [], "wall": []} for p in paths}
        memory = {p: PeakMemory("cpu") for p in paths}
        load0 = os.getloadavg()[0]
        for i, n in enumerate(names):
            jobs = {
                "present": lambda n=n: present_one(probs / f"{n}.npz", images / f"{n}.jpg", work / "present" / f"{n}.png",
                                                   CRFParams()),
                "present_lattice": lambda n=n: present_one(probs / f"{n}.npz", images / f"{n}.jpg",
                                                           work / "present_lattice" / f"{n}.png",
                                                           CRFParams(gaussian="lattice")),
                "all_81": lambda n=n: authors_one(probs / f"{n}.npz", images / f"{n}.jpg", work / "all_81" / f"{n}.png",
                                                  COCO_CLASSES),
            }  # fmt: skip
            order = list(paths) if i % 2 == 0 else list(paths)[::-1]
            for path in order:
                t0 = time.perf_counter()
                with memory[path].measure():
                    cpu = jobs[path]()
                times[path]["wall"].append(time.perf_counter() - t0)
                times[path]["cpu"].append(cpu)
            print(f"{n}: " + ", ".join(f"{p} {times[p]['cpu'][-1]:.2f}s cpu" for p in paths), flush=True)
        load1 = os.getloadavg()[0]
        scaling = {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            run_crf(probs, images, work / f"w{workers}", workers=workers, overwrite=True, progress=False)
            scaling[f"workers_{workers}_seconds"] = round(time.perf_counter() - t0, 2)
        scaling["speedup_2_vs_1"] = round(scaling["workers_1_seconds"] / scaling["workers_2_seconds"], 2)
        cores = cpu_count()
        t0 = time.perf_counter()
        run_crf(probs, images, work / "w_all", workers=cores, overwrite=True, progress=False)
        ours_all = time.perf_counter() - t0
        theirs = run_authors(probs, images, work / "authors_joblib", names, COCO_CLASSES, cores)["seconds"]
        at_equal_cores = {"cores": cores, "vitpcm_crf_seconds": round(ours_all, 2),
                          "authors_joblib_seconds": round(theirs, 2), "speedup": round(theirs / ours_all, 2)}  # fmt: skip

        present_classes = [len(load_probs(probs / f"{n}.npz")[1]) for n in names]
        npz_bytes = [(probs / f"{n}.npz").stat().st_size for n in names]
        med = {p: {k: statistics.median(v) for k, v in d.items()} for p, d in times.items()}
        projection = {}
        for path in paths:
            for basis in ("cpu", "wall"):
                projection[f"{path}_{basis}_hours"] = round(med[path][basis] * COCO_VAL / CORES / 3600, 2)
        result: Dict[str, Any] = {
            "what": "dense CRF per image on COCO-like inputs: present classes (vitpcm; smoothness kernel exact, the"
            " default, or through pydensecrf's lattice) vs all 81 channels (authors)",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python benchmarks/coco_crf_bench.py " + " ".join(sys.argv[1:]),
            "machine": {
                **{
                    k: v
                    for k, v in machine_info("cpu").items()
                    if k in ("cpu", "cpus_usable", "platform", "python", "processes_running")
                },
                "loadavg_1min_before_after": [round(load0, 2), round(load1, 2)],
                "note": args.note,
            },  # fmt: skip
            "inputs": {
                "images": len(names),
                "size_wxh": list(COCO_SIZES[0]),
                "classes": COCO_CLASSES,
                "present_classes_mean": round(statistics.mean(present_classes), 2),
                "present_classes_range": [min(present_classes), max(present_classes)],
                "probs_npz_bytes_median": int(statistics.median(npz_bytes)),
            },  # fmt: skip
            "per_image_median": {p: {f"{k}_seconds": round(v, 3) for k, v in d.items()} for p, d in med.items()},
            "per_image_runs": {
                p: {f"{k}_seconds": [round(x, 3) for x in v] for k, v in d.items()} for p, d in times.items()
            },  # fmt: skip
            "all_81_vs_present_cpu": round(med["all_81"]["cpu"] / med["present"]["cpu"], 2),
            "all_81_vs_present_lattice_cpu": round(med["all_81"]["cpu"] / med["present_lattice"]["cpu"], 2),
            "peak_rss_mb_one_worker": {p: round(m.peak_mb, 1) for p, m in memory.items()},
            "agreement_present_vs_all_81": agreement(work / "present", work / "all_81", names),
            "agreement_present_lattice_vs_all_81": agreement(work / "present_lattice", work / "all_81", names),
            "vitpcm_crf_workers": scaling,
            "at_equal_cores": at_equal_cores,
            "coco_val_projection": {
                "EXTRAPOLATION": f"median seconds per image x {COCO_VAL} images / {CORES} processes / 3600, assuming"
                " cost linear in images and linear scaling over 16 cores; not measured on a 16-core machine",
                "images": COCO_VAL,
                "cores": CORES,
                **projection,
                "peers_reported_hours": PEERS_HOURS,
            },
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("per_image_median", "coco_val_projection", "vitpcm_crf_workers")},
                         indent=2))  # fmt: skip
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
