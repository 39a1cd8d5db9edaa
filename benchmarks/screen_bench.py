"""Start-up at scale: the pre-training screen (data/check.py) with and without its cache.

Usage::

    vitpcm synth --out /tmp/synth20k --train 20000 --val 0
    nice -n 10 python benchmarks/screen_bench.py --root /tmp/synth20k \\
        [--counts 1000,5000,20000] [--starts] [--out benchmarks/results/screen_bench.json]

What it measures (the cache lives in a fresh temporary folder, ``VITPCM_CACHE_DIR``):

* ``screen``: for each N in ``--counts`` (the first N names of the train split, written as
  split ``screenN``): listing the split (``VOCDataset(...)``: one ``stat`` per image and
  mask), then :func:`check_before_training`: ``first`` (empty cache: every image and mask
  decoded), ``second`` (unchanged: nothing decoded; three runs, median), ``touched`` (1 % of
  the images given a new mtime: those re-read). Reads are counted by wrapping the decoder.
* ``starts`` (``--starts``): the whole start of training before the first step, as fresh
  processes: Python start, imports, config, dataset listing, screen, model build, run
  folder (``Trainer(PcmTask(cfg), ...)`` of the synthetic preset, no validation split), on
  all train images; first with an empty cache, then again.

The files were just written, so they sit in the OS page cache: ``first`` is bound by
decoding, not by the disk; a cold disk adds its read time to ``first`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import vitpcm.data.base as base  # noqa: E402
from vitpcm.atomic import write_text_atomic  # noqa: E402
from vitpcm.data.check import check_before_training  # noqa: E402
from vitpcm.data.voc import VOCDataset  # noqa: E402
from vitpcm.io import read_names  # noqa: E402
from vitpcm.utils.system import cpu_count  # noqa: E402

_START = """
import sys, time
t0 = time.perf_counter()
from vitpcm.config import load_config
from vitpcm.engine.trainer import Trainer
from vitpcm.stages.config import resolve_config
from vitpcm.tasks.pcm import PcmTask, train_settings
t1 = time.perf_counter()
cfg = resolve_config(load_config("synthetic", ["data.root=" + sys.argv[1], "data.val_split=", "train.epochs=1"]))
Trainer(PcmTask(cfg), sys.argv[2], train_settings(cfg), progress=False)
print(f"{t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
"""


def _count_reads() -> Dict[str, int]:
    count = {"images": 0}
    decode = base.decode_image

    def counting(path):
        count["images"] += 1
        return decode(path)

    base.decode_image = counting
    return count


def screen_counts(root: Path, counts: List[int], workers: int) -> List[Dict[str, Any]]:
    names = read_names(root / "ImageSets" / "Segmentation" / "train.txt")
    reads = _count_reads()
    rows = []
    for n in counts:
        split = f"screen{n}"
        write_text_atomic(root / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{x}\n" for x in names[:n]))
        row: Dict[str, Any] = {"images": n}
        for label in ("first", "second", "second", "second", "touched"):
            if label == "touched":
                for x in names[:n:100]:  # 1 %: a new mtime, same bytes
                    p = root / "JPEGImages" / f"{x}.jpg"
                    st = p.stat()
                    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            t0 = time.perf_counter()
            ds = VOCDataset(root, split, strict=False)
            t1 = time.perf_counter()
            reads["images"] = 0
            with tempfile.TemporaryDirectory() as run:
                check_before_training([ds], Path(run), skip_bad=False, progress=False, workers=workers)
            t2 = time.perf_counter()
            rec = {"listing_seconds": round(t1 - t0, 3), "screen_seconds": round(t2 - t1, 3),
                   "images_decoded": reads["images"]}  # fmt: skip
            if label == "second":  # short: three runs (a shared machine adds pauses), median kept
                row.setdefault("second_runs", []).append(rec)
                runs = row["second_runs"]
                row["second"] = {k: statistics.median(r[k] for r in runs) for k in rec}
            else:
                row[label] = rec
            print(
                f"N={n} {label}: listing {t1 - t0:.2f}s, screen {t2 - t1:.2f}s, {reads['images']} decoded", flush=True
            )
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").unlink()
        rows.append(row)
    return rows


def starts(root: Path, work: Path) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for label in ("first", "second"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _START, str(root), str(work / f"run_{label}")],
                              capture_output=True, text=True, env=os.environ)  # fmt: skip
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        imports, setup = (float(v) for v in proc.stdout.split()[-2:])
        out[label] = {"process_seconds": round(wall, 2), "imports_seconds": imports, "setup_seconds": setup}
        print(f"start {label}: {wall:.1f}s (imports {imports:.1f}s, config + data + screen + model {setup:.1f}s)",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="a VOC-layout folder (vitpcm synth output)")
    parser.add_argument("--counts", default="1000,5000,20000", help="subset sizes (default 1000,5000,20000)")
    parser.add_argument("--workers", type=int, default=0, help="reader threads (default one per CPU)")
    parser.add_argument("--starts", action="store_true", help="also time whole training starts (fresh processes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "screen_bench.json"))
    args = parser.parse_args()
    root = Path(args.root).resolve()
    counts = [int(c) for c in args.counts.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="screen-cache-") as cache:
        os.environ["VITPCM_CACHE_DIR"] = cache
        result: Dict[str, Any] = {
            "what": "pre-training screen: first start (every item decoded) vs later starts (cache)",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python benchmarks/screen_bench.py " + " ".join(sys.argv[1:]),
            "machine": {
                "cpus_usable": cpu_count(),
                "platform": platform.platform(),
                "loadavg_1min_before": round(os.getloadavg()[0], 2),
            },  # fmt: skip
            "dataset": {"root": str(root), "train_images": len(read_names(root / "ImageSets/Segmentation/train.txt"))},
            "screen": screen_counts(root, counts, args.workers),
        }
        if args.starts:
            with tempfile.TemporaryDirectory(prefix="screen-runs-") as work:
                result["starts"] = starts(root, Path(work))
        result["machine"]["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
