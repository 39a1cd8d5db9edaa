"""Where `vitpcm infer` spends its time on a GPU: the stage over N VOC-sized images under
cProfile (main thread), with and without the probability files, at a few batch / writer
settings. Prints images/s per variant and the top functions by cumulative time.

    python benchmarks/gpu_infer_profile.py --images 512 --json OUT.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", required=True)
    ap.add_argument("overrides", nargs="*", help="config key=value for every variant (e.g. a tiny model)")
    args = ap.parse_args()

    from vitpcm.stages.bench.fixtures import bench_config as _bench_config
    from vitpcm.stages.bench.fixtures import make_bench_data as _make_data
    from vitpcm.stages.bench.fixtures import write_random_run as _write_run
    from vitpcm.stages.infer import infer

    work = Path(tempfile.mkdtemp(prefix="vitpcm-iprof-"))
    _make_data(work / "data", 4, args.images, ((500, 375), (375, 500)))
    cfg = _bench_config("voc12", work / "data", args.device, 8, args.overrides)
    from vitpcm.data import build_dataset
    from vitpcm.stages.config import resolve_config

    cfg = resolve_config(cfg)
    ds = build_dataset(cfg.data, "val", require_masks=False)
    run = work / "run"
    _write_run(cfg, run, ds.num_classes, ds.classes)
    variants = {
        "bf16_b16_probs": (["infer.amp=true", "infer.batch_size=16"], True),
        "bf16_b16_masks_only": (["infer.amp=true", "infer.batch_size=16"], False),
        "bf16_b32_probs_w15": (["infer.amp=true", "infer.batch_size=32", "infer.writers=15"], True),
        # the same as the first two with resize + normalise in the loader workers (the former way)
        "bf16_b16_probs_loader": (["infer.amp=true", "infer.batch_size=16", "data.transforms_on=loader"], True),
        "bf16_b16_masks_only_loader": (["infer.amp=true", "infer.batch_size=16", "data.transforms_on=loader"], False),
    }
    infer(run, "val", out=work / "warm", overrides=["infer.amp=true", "infer.batch_size=16"], device=args.device,
          progress=False)  # fmt: skip
    out = {"command": " ".join(sys.argv), "images": args.images, "variants": {}}
    for name, (overrides, probs) in variants.items():
        overrides = [*args.overrides, *overrides]
        prof = cProfile.Profile()
        t = time.time()
        prof.enable()
        s = infer(run, "val", out=work / name, overrides=overrides, device=args.device, save_probs=probs,
                  progress=False)  # fmt: skip
        prof.disable()
        wall = time.time() - t
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
        out["variants"][name] = {"overrides": overrides, "probs": probs, "loop_seconds": s["seconds"],
                                 "images_per_second": round(args.images / s["seconds"], 1),
                                 "call_seconds": round(wall, 2), "profile": text.getvalue()}  # fmt: skip
        print(f"{name}: {args.images / s['seconds']:.1f} img/s (loop {s['seconds']} s, call {wall:.1f} s)", flush=True)
        shutil.rmtree(work / name, ignore_errors=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(out["variants"]["bf16_b16_probs"]["profile"][:6000])


if __name__ == "__main__":
    main()
