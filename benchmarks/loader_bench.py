"""What the data-loader workers cost per item, with the pixels made in the loader
(``data.transforms_on=loader``) or on the device (``device``: the workers decode and draw).

On a GPU the training step of ViT-B/16 at 384 outruns the workers (docs/scaling.md, "GPU:
measured on one H100"); this measures, on whatever CPU runs it, the workers' side of both
modes side by side, for the preset's training transform and for inference at ``infer.scale``:

* CPU milliseconds per item in one process (``dataset[i]``: decode + transform), median;
* bytes per item handed from a worker to the main process;
* items/s of a DataLoader with ``--workers`` workers consumed as fast as it can (nothing
  else runs), i.e. the loader's ceiling on this machine;
* the device side's cost on this CPU (``finish`` of one batch), for information: on a GPU
  it runs as a few kernels per image.

    python benchmarks/loader_bench.py --json benchmarks/results/loader_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _nbytes(sample: dict) -> int:
    import torch

    total = 0
    for value in sample.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="voc12")
    ap.add_argument("--images", type=int, default=64, help="VOC-sized synthetic images (500 x 375 / 375 x 500)")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the images per measurement")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from vitpcm.data import build_dataset
    from vitpcm.data.transforms import EvalTransform, TagRule, TrainTransform, collate
    from vitpcm.stages.bench.fixtures import bench_config as _bench_config
    from vitpcm.stages.bench.fixtures import make_bench_data as _make_data
    from vitpcm.stages.bench.machine import machine_info
    from vitpcm.stages.config import resolve_config

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="vitpcm-loader-"))
    _make_data(work / "data", args.images, 0, ((500, 375), (375, 500)))
    cfg = resolve_config(_bench_config(args.preset, work / "data", "cpu", 0, []))
    dataset = build_dataset(cfg.data, "train", require_masks=False)
    mean, std = tuple(cfg.input.mean), tuple(cfg.input.std)
    ac, tags = bool(cfg.input.align_corners), TagRule.from_config(cfg)

    def train_transform(defer: bool) -> TrainTransform:
        return TrainTransform(cfg.input.train_size, cfg.input.et_crop, cfg.input.et_scale, 16, cfg.augment,
                              mean=mean, std=std, align_corners=ac, tags=tags, defer=defer)  # fmt: skip

    def eval_transform(defer: bool) -> EvalTransform:
        return EvalTransform(int(cfg.infer.scale), mean=mean, std=std, align_corners=ac, tags=tags, defer=defer)

    results: dict = {}
    for stage, make in (("train", train_transform), ("infer", eval_transform)):
        for mode in ("loader", "device"):
            dataset.transform = make(mode == "device")
            cpu_ms = []
            for _ in range(args.repeats):
                for i in range(len(dataset)):
                    start = time.process_time()
                    dataset[i]
                    cpu_ms.append(1000 * (time.process_time() - start))
            sample = dataset[0]
            loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                collate_fn=collate, persistent_workers=True)  # fmt: skip
            for _ in loader:  # start the workers, warm their caches
                break
            passes = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                count = sum(len(batch["name"]) for batch in loader)
                passes.append(count / (time.perf_counter() - start))
            del loader
            row = {
                "cpu_ms_per_item": round(statistics.median(cpu_ms), 2),
                "bytes_per_item": _nbytes(sample),
                "loader_items_per_second": round(statistics.median(passes), 1),
                "loader_items_per_second_runs": [round(p, 1) for p in passes],
            }
            if mode == "device":
                batch = collate([dataset[i] for i in range(min(args.batch, len(dataset)))])
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    dataset.transform.finish(dict(batch), torch.device("cpu"))
                    times.append(time.perf_counter() - start)
                row["finish_ms_per_item_on_this_cpu"] = round(1000 * statistics.median(times) / len(batch["name"]), 2)
            results[f"{stage}_{mode}"] = row
            print(stage, mode, row, flush=True)
        lo, de = results[f"{stage}_loader"], results[f"{stage}_device"]
        results[f"{stage}_worker_cpu_ratio"] = round(lo["cpu_ms_per_item"] / de["cpu_ms_per_item"], 2)
        results[f"{stage}_loader_throughput_ratio"] = round(
            de["loader_items_per_second"] / lo["loader_items_per_second"], 2
        )

    out = {
        "command": " ".join(sys.argv),
        "preset": args.preset,
        "train_size": int(cfg.input.train_size),
        "infer_scale": int(cfg.infer.scale),
        "jitter_space": str(cfg.augment.jitter_space),
        "align_corners": ac,
        "images": args.images,
        "workers": args.workers,
        "batch": args.batch,
        "machine": {**machine_info("cpu"), "loadavg_before": load_before},
        "results": results,
    }
    out["machine"]["loadavg_after"] = os.getloadavg()[0]
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if "ratio" in k}))


if __name__ == "__main__":
    main()
