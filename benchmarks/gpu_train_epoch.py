"""Training throughput of the real loop (`vitpcm.train`): whole epochs, data loading included.

`vitpcm bench --section train` times single steps on prefetched batches; this times what a
run does: the engine's loop over a VOC-sized dataset (500 x 375 / 375 x 500 synthetic shapes,
random init), with the preset's augmentation in the loader workers, one epoch per phase
and more. Writes one JSON with each variant's epochs (seconds, images/s) and the arithmetic
for the paper's recipe (1 frozen epoch + 79 fine-tuning epochs of 10,582 images).

    python benchmarks/gpu_train_epoch.py --images 2048 --json OUT.json \
        --variant bf16 train.amp=true --variant fp32 train.amp=false

Each ``--variant NAME key=value ...`` is one training run (the preset plus these keys).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VOC_SIZES = ((500, 375), (375, 500))
TRAINAUG = 10582


def _resize(args: tuple) -> None:
    from PIL import Image

    root, name, size = args
    img = root / "JPEGImages" / f"{name}.jpg"
    Image.open(img).convert("RGB").resize(size, Image.BICUBIC).save(img, quality=92)
    mask = root / "SegmentationClass" / f"{name}.png"
    with Image.open(mask) as m:
        m.resize(size, Image.NEAREST).save(mask)


def make_data(root: Path, n_train: int, n_val: int, workers: int) -> None:
    from vitpcm.data.synthetic import generate
    from vitpcm.io import read_names

    generate(root, n_train=n_train, n_val=n_val, seed=0, workers=workers, progress=False)
    seg = root / "ImageSets" / "Segmentation"
    names = read_names(seg / "train.txt") + read_names(seg / "val.txt")
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_resize, [(root, n, VOC_SIZES[i % 2]) for i, n in enumerate(names)], chunksize=32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="voc12")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=3, help="1 frozen (warm-up) epoch, then fine-tuning ones")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", required=True)
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [key=value ...]")
    args = ap.parse_args()

    import torch

    import vitpcm
    from vitpcm.config import load_config

    work = Path(tempfile.mkdtemp(prefix="vitpcm-epoch-"))
    t = time.time()
    make_data(work / "data", args.images, 16, workers=max(1, (os.cpu_count() or 2)))
    data_seconds = time.time() - t
    out = {
        "what": "vitpcm.train over a VOC-sized synthetic set: whole epochs, data loading included",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "images": args.images,
        "make_data_seconds": round(data_seconds, 1),
        "variants": {},
    }
    for name, *overrides in args.variant:
        base = [
            "model.pretrained=false", "data.format=voc", f"data.root={work / 'data'}", "data.train_split=train",
            "data.val_split=val", "data.sbd=null", "data.tags=null", "data.masks=null", f"train.device={args.device}",
            f"train.epochs={args.epochs}", "train.val_every=0", f"data.num_workers={max(1, (os.cpu_count() or 2) - 1)}",
        ]  # fmt: skip
        cfg = load_config(args.preset, [*base, *overrides])
        run = work / f"run_{name}"
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        summary = vitpcm.train(cfg, run, progress=False)
        wall = time.time() - t
        epochs = []
        for row in summary["history"]:
            images = args.images // int(cfg.train.batch_size) * int(cfg.train.batch_size)
            epochs.append({"epoch": row["epoch"], "phase": row["phase"], "seconds": row["seconds"],
                           "images_per_second": round(images / row["seconds"], 1), "loss": round(row["loss"], 4)})  # fmt: skip
        tune = [e for e in epochs if e["phase"] != "warmup"] or epochs
        rate = statistics.median(e["images_per_second"] for e in tune)
        warm = epochs[0]["images_per_second"]
        recipe_h = (TRAINAUG / warm + 79 * TRAINAUG / rate) / 3600
        out["variants"][name] = {
            "overrides": overrides,
            "batch_size": int(cfg.train.batch_size),
            "global_batch": cfg.train.get("global_batch"),
            "amp": bool(cfg.train.amp),
            "compile": bool(cfg.train.get("compile", False)),
            "loader_workers": int(cfg.data.num_workers),
            "epochs": epochs,
            "finetune_images_per_second_median": rate,
            "wall_seconds": round(wall, 1),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "voc_recipe_hours": round(recipe_h, 2),
        }
        print(f"{name}: fine-tuning {rate:.1f} img/s, warm-up {warm:.1f} img/s; the paper's 80 epochs of "
              f"trainaug: {recipe_h:.2f} h; peak {out['variants'][name]['peak_memory_gb']} GiB", flush=True)  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
