"""The ``infer`` section: the whole inference stage against the bare backbone forward.

The stage (:func:`vitpcm.stages.infer.infer`: read, resize, normalise, ViT + HV-BiLSTM +
classifier, tag merge, upsample to the image size, argmax, mask PNG, probabilities npz)
against the bare backbone forward (``forward_features``) at the same input side, batch and
autocast (``infer.batch_size``, ``infer.amp``); ``infer_ratio`` = backbone time / pipeline
time (1.0: the pipeline costs no more than its backbone).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from vitpcm.data import EvalTransform, build_dataset
from vitpcm.data.transforms import transforms_on_device
from vitpcm.engine.distributed import resolve_device
from vitpcm.stages.bench.fixtures import write_random_run
from vitpcm.stages.bench.memory import PeakMemory
from vitpcm.stages.bench.timing import median, rounded, sync
from vitpcm.stages.config import resolve_config
from vitpcm.stages.infer import infer, speed_settings


def bench_infer(cfg: Any, work: Path, device: str, images: int, repeats: int) -> Dict[str, Any]:
    """The inference stage vs the bare backbone forward at ``infer.scale`` (module docstring)."""
    cfg = resolve_config(cfg)
    dataset = build_dataset(cfg.data, "val", require_masks=False)
    seg = Path(cfg.data.root) / "ImageSets" / "Segmentation"
    (seg / "one.txt").write_text(dataset.names[0] + "\n")  # a one-image split: the stage's fixed cost
    run = work / "run"
    model = write_random_run(cfg, run, dataset.num_classes, dataset.classes)
    dev = resolve_device(device)
    model.to(dev).eval()
    scale = int(cfg.infer.scale)
    backbone = model.backbone

    batch, writers, amp = speed_settings(cfg, dev)  # the stage's own batch and autocast: the floor uses the same
    batch = min(batch, images)
    x = torch.randn(batch, 3, scale, scale, device=dev)
    overrides = [f"data.num_workers={int(cfg.data.num_workers)}"]
    mem_pipe, mem_bare = PeakMemory(dev), PeakMemory(dev)

    def bare() -> tuple:
        start, cpu = time.perf_counter(), time.process_time()
        n = -(-images // batch) * batch
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            for _ in range(n // batch):
                backbone.forward_features(x)
            sync(dev)
        return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n

    calls = [0]

    def stage(split: str) -> tuple:
        calls[0] += 1
        out = work / f"pseudo_{calls[0]}"  # a fresh folder: a rerun would skip finished images
        cpu = time.process_time()
        s = infer(run, split, out=out, scale=scale, device=device, overrides=overrides, progress=False)
        cpu = time.process_time() - cpu
        shutil.rmtree(out, ignore_errors=True)
        return float(s["seconds"]) / int(s["images"]), cpu

    def pipeline() -> tuple:
        """Wall: the stage's own loop time per image. CPU: (stage on N images - stage on 1
        image) / (N - 1), which removes the fixed part (checkpoint, dataset, loader)."""
        wall, cpu_n = stage("val")
        cpu_1 = stage("one")[1] if images > 1 else 0.0
        return wall, (cpu_n - cpu_1) / max(images - 1, 1)

    # warm-up (first-call allocations, kernel selection), which is also where the peak memory
    # is taken: the timed runs below run without the sampling thread
    with mem_bare.measure(), torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        backbone.forward_features(x)
    with mem_pipe.measure():
        stage("one")
    pipe_times: List[float] = []
    bare_times: List[float] = []
    pipe_cpu: List[float] = []
    bare_cpu: List[float] = []
    for _ in range(repeats):
        wall, cpu = pipeline()
        pipe_times.append(wall)
        pipe_cpu.append(cpu)
        wall, cpu = bare()
        bare_times.append(wall)
        bare_cpu.append(cpu)

    # what the loop waits for data: read + resize + normalise, timed alone (no loader workers
    # on the CPU: the loop waits exactly this long; with workers it is an upper bound)
    dataset.transform = EvalTransform(scale, mean=tuple(cfg.input.mean), std=tuple(cfg.input.std))
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    data_s = (time.perf_counter() - start) / len(dataset)

    pipe, floor = median(pipe_times), median(bare_times)
    pipe_c, floor_c = median(pipe_cpu), median(bare_cpu)
    return {
        "scale": scale,
        "tokens": (scale // model.patch_size) ** 2,
        "images": images,
        "repeats": repeats,
        "batch": batch,
        "amp": amp,
        "writer_threads": writers,
        "loader_workers": int(cfg.data.num_workers),
        "transforms_on_device": transforms_on_device(cfg, dev),
        "pipeline_seconds_per_image": rounded(pipe),
        "backbone_seconds_per_image": rounded(floor),
        "infer_ratio": rounded(floor / pipe),
        "pipeline_cpu_seconds_per_image": rounded(pipe_c),
        "backbone_cpu_seconds_per_image": rounded(floor_c),
        "infer_ratio_cpu": rounded(floor_c / pipe_c),
        "images_per_second": rounded(1.0 / pipe),
        "backbone_images_per_second": rounded(1.0 / floor),
        "data_seconds_per_image": rounded(data_s),
        "data_wait_fraction": rounded(min(1.0, data_s / pipe)),
        "data_wait_method": "read + transform timed alone"
        + (
            "; the loader has no workers, so the loop waits this long"
            if not int(cfg.data.num_workers)
            else "; loader workers overlap it, so this is an upper bound"
        ),  # fmt: skip
        "peak_memory_mb": round(mem_pipe.peak_mb, 1),
        "backbone_peak_memory_mb": round(mem_bare.peak_mb, 1),
        "memory_kind": mem_pipe.kind,
        "pipeline_seconds_per_image_runs": [rounded(t) for t in pipe_times],
        "backbone_seconds_per_image_runs": [rounded(t) for t in bare_times],
        "pipeline_cpu_seconds_per_image_runs": [rounded(t) for t in pipe_cpu],
        "backbone_cpu_seconds_per_image_runs": [rounded(t) for t in bare_cpu],
    }
