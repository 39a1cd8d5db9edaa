"""The ``crf`` section: ``vitpcm crf`` against the authors' stage, and the inputs both read.

``vitpcm crf`` on N VOC-sized images (present classes, one worker per CPU) against the
authors' stage as their ``main.py test --crf`` runs it: all channels, ``joblib.Parallel``
over every CPU (or ``authors_jobs``) (:mod:`vitpcm.stages.bench.crf_authors`), all as fresh
processes, start-up included; ``crf_speedup`` = authors' wall time / vitpcm's at equal
cores, and the pixel agreement of the masks; the same for ``crf.gaussian=lattice``
(``crf_speedup_lattice``: the paper presets' CRF). The authors' path in one process is the
second column (``*_single_process``: the figure earlier versions reported as the speed-up,
which contained the cores). ``crf.backend=torch`` (``vitpcm crf --backend torch``, on
``device``) beside pydensecrf: images per second of each, and the agreement of their masks.

Shared with ``benchmarks/crf_bench.py``, ``coco_crf_bench.py`` and others, so the inputs
and the comparison exist once:

* :func:`make_crf_inputs`: N images with ``probs/NAME.npz`` as ``vitpcm infer`` writes them
  (present classes only, at the image size), VOC-sized (500 x 375, every other one
  portrait) or any other size and class count (COCO: 640 x 480, 81 classes).
* :func:`agreement`: share of pixels where two mask folders agree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitpcm.atomic import save_npz_atomic
from vitpcm.data.synthetic import render_sample
from vitpcm.io import names_in, read_mask_png
from vitpcm.stages.bench.timing import median, rounded, timed_process, vitpcm_command
from vitpcm.utils.system import cpu_count

VOC_CLASSES = 21
COCO_CLASSES = 81
GRID = 60  # patch grid of ViT-PCM at 960 with 16 px patches
VOC_SIZES = ((500, 375), (375, 500))  # (W, H), alternating: VOC's common landscape / portrait
COCO_SIZES = ((640, 480),)


def make_crf_inputs(
    folder: Path,
    n: int,
    seed: int = 0,
    num_classes: int = VOC_CLASSES,
    sizes: Sequence[Tuple[int, int]] = VOC_SIZES,
    grid: int = GRID,
) -> List[str]:
    """Write ``folder/images/NAME.jpg`` and ``folder/probs/NAME.npz`` for ``n`` images.

    The images are the built-in synthetic shapes (``render_sample``: 1-3 objects) upscaled
    to ``sizes[i % len(sizes)]`` (W, H), saved as JPEG (quality 90) with mild sensor-like
    noise. The probabilities imitate baseline pseudo-masks: the one-hot mask pooled to a
    ``grid x grid`` patch grid, noisy logits, softmax over background + the 1-3 present
    classes (random ids in 1..num_classes-1), bilinear upsampling to the image size;
    ``probs`` [P, H, W] float32 and ``classes`` [P] int64 as ``vitpcm infer`` writes them.
    Returns the names.
    """

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "probs").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        image, mask = render_sample(seed * 1000 + i)
        img = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC)).astype(np.float32)
        img = np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)  # sensor-like noise
        name = f"img_{i:03d}"
        Image.fromarray(img).save(folder / "images" / f"{name}.jpg", quality=90)
        label = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST)).copy()
        label[label == 255] = 0
        synthetic = [int(c) for c in np.unique(label) if c != 0]
        ids = rng.choice(np.arange(1, num_classes), size=len(synthetic), replace=False)
        classes = np.array([0, *sorted(int(v) for v in ids)], dtype=np.int64)
        index = {0: 0, **{c: 1 + sorted(ids.tolist()).index(int(v)) for c, v in zip(synthetic, ids)}}
        local = np.vectorize(index.get)(label)  # [H, W] in 0..P-1
        onehot = torch.from_numpy(np.eye(len(classes), dtype=np.float32)[local]).permute(2, 0, 1)[None]
        pooled = F.adaptive_avg_pool2d(onehot, (grid, grid))
        logits = 4.0 * pooled + torch.from_numpy(rng.normal(0, 0.8, pooled.shape).astype(np.float32))
        probs = F.interpolate(logits.softmax(1), size=(h, w), mode="bilinear", align_corners=False)[0]
        save_npz_atomic(folder / "probs" / f"{name}.npz", probs=probs.numpy().astype(np.float32), classes=classes)
        names.append(name)
    return names


def agreement(dir_a: Path, dir_b: Path, names: Sequence[str]) -> Dict[str, float]:
    """Pixels where the masks ``dir_a/NAME.png`` and ``dir_b/NAME.png`` agree."""
    same = total = 0
    per_image = []
    for n in names:
        a, b = read_mask_png(dir_a / f"{n}.png"), read_mask_png(dir_b / f"{n}.png")
        eq = int((a == b).sum())
        same, total = same + eq, total + a.size
        per_image.append(eq / a.size)
    return {"pixels_equal_pct": 100.0 * same / total, "worst_image_pct": 100.0 * min(per_image),
            "images_identical": int(sum(p == 1.0 for p in per_image)), "images": len(names)}  # fmt: skip


def bench_crf(
    work: Path,
    images: int,
    repeats: int = 1,
    sizes: Optional[Sequence[tuple]] = None,
    authors_jobs: Optional[int] = None,
    device: str = "cpu",
) -> Dict[str, Any]:
    """``vitpcm crf`` (fresh process, present classes, one worker per CPU) vs the authors'
    path (fresh process, all 21 channels, joblib over ``authors_jobs`` processes, default
    one per CPU; and in one process) on VOC-sized images; the stage twice: as it runs by
    default (``crf.gaussian=exact``) and with the authors' lattice for the smoothness kernel
    (``crf.gaussian=lattice``, the paper presets); and with ``crf.backend=torch`` on
    ``device``."""
    folder = work / "crf"
    names = make_crf_inputs(folder, images, seed=0, num_classes=VOC_CLASSES, sizes=sizes or VOC_SIZES)
    probs, imgs = folder / "probs", folder / "images"

    def ours(out: str, *keys: str) -> List[str]:
        return [*vitpcm_command(), "crf", "--probs", str(probs), "--images", str(imgs), "--out", str(folder / out),
                "--overwrite", "-q", *keys]  # fmt: skip

    jobs = int(authors_jobs) if authors_jobs else cpu_count()
    authors = [sys.executable, "-m", "vitpcm.stages.bench.crf_authors", "authors", str(probs), str(imgs)]
    commands = {
        "ours": ours("vitpcm"),
        "lattice": ours("vitpcm_lattice", "crf.gaussian=lattice"),
        "torch": ours("vitpcm_torch", "--backend", "torch", "--device", device),
        "authors": [*authors, str(folder / "authors"), str(VOC_CLASSES), str(jobs)],
        "authors_single": [*authors, str(folder / "authors_single"), str(VOC_CLASSES), "1"],
    }  # fmt: skip
    walls: Dict[str, List[float]] = {k: [] for k in commands}
    cpu: Dict[str, List[float]] = {k: [] for k in commands}
    order = list(commands)
    for r in range(repeats):
        for which in order if r % 2 == 0 else order[::-1]:  # alternate: drift hits every command alike
            wall, used = timed_process(commands[which])
            walls[which].append(wall)
            cpu[which].append(used)
    agree = agreement(folder / "vitpcm", folder / "authors", names)
    agree_lattice = agreement(folder / "vitpcm_lattice", folder / "authors", names)
    agree_torch = agreement(folder / "vitpcm_torch", folder / "vitpcm", names)

    present = [len(np.load(probs / f"{n}.npz")["classes"]) for n in names_in(probs, ".npz")]
    a, a1, o, lat, tor = (median(walls[k]) for k in ("authors", "authors_single", "ours", "lattice", "torch"))
    a_cpu, o_cpu, lat_cpu = (median(cpu[k]) for k in ("authors", "ours", "lattice"))
    return {
        "images": images,
        "sizes_wxh": [list(s) for s in (sizes or VOC_SIZES)],
        "classes": VOC_CLASSES,
        "present_classes_mean": round(float(np.mean(present)), 2),
        "repeats": repeats,
        "vitpcm_workers": cpu_count(),
        "authors_jobs": jobs,
        "vitpcm_seconds": rounded(o, 3),
        "authors_seconds": rounded(a, 3),
        "crf_speedup": rounded(a / o, 3),
        "authors_single_process_seconds": rounded(a1, 3),
        "crf_speedup_single_process": rounded(a1 / o, 3),
        "vitpcm_cpu_seconds": rounded(o_cpu, 3),
        "authors_cpu_seconds": rounded(a_cpu, 3),
        "crf_cpu_ratio": rounded(a_cpu / o_cpu, 3),
        "agreement_pct": rounded(agree["pixels_equal_pct"], 4),
        "agreement_worst_image_pct": rounded(agree["worst_image_pct"], 4),
        "images_identical": agree["images_identical"],
        "lattice_seconds": rounded(lat, 3),
        "crf_speedup_lattice": rounded(a / lat, 3),
        "crf_speedup_lattice_single_process": rounded(a1 / lat, 3),
        "lattice_cpu_seconds": rounded(lat_cpu, 3),
        "crf_cpu_ratio_lattice": rounded(a_cpu / lat_cpu, 3),
        "agreement_lattice_pct": rounded(agree_lattice["pixels_equal_pct"], 4),
        "images_identical_lattice": agree_lattice["images_identical"],
        "torch_device": device,
        "torch_seconds": rounded(tor, 3),
        "torch_images_per_second": rounded(images / tor, 3),
        "pydensecrf_images_per_second": rounded(images / o, 3),
        "agreement_torch_pct": rounded(agree_torch["pixels_equal_pct"], 4),
        "agreement_torch_worst_image_pct": rounded(agree_torch["worst_image_pct"], 4),
        "vitpcm_seconds_runs": [rounded(t, 3) for t in walls["ours"]],
        "lattice_seconds_runs": [rounded(t, 3) for t in walls["lattice"]],
        "torch_seconds_runs": [rounded(t, 3) for t in walls["torch"]],
        "authors_seconds_runs": [rounded(t, 3) for t in walls["authors"]],
        "authors_single_process_seconds_runs": [rounded(t, 3) for t in walls["authors_single"]],
        "command_vitpcm": "vitpcm crf --probs P --images I --out O --overwrite -q",
        "command_lattice": "vitpcm crf --probs P --images I --out O --overwrite -q crf.gaussian=lattice",
        "command_torch": f"vitpcm crf --probs P --images I --out O --overwrite -q --backend torch --device {device}",
        "command_authors": f"python -m vitpcm.stages.bench.crf_authors authors P I O 21 {jobs}",
        "command_authors_single_process": "python -m vitpcm.stages.bench.crf_authors authors P I O 21 1",
        "process_start_included": True,
    }
