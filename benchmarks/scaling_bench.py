"""How a ViT backbone's time and memory grow with the input side (384 -> 960), on this CPU.

Usage::

    nice -n 10 python benchmarks/scaling_bench.py [--backbones vit_small_patch16_384,vit_base_patch16_384]
        [--sides 384,576,768,960] [--runs 3] [--out benchmarks/results/scaling_bench.json]

For every backbone, side and mode, in a fresh process (so the resident memory is that of
one configuration), with random weights and one torch thread (``--threads``):

* ``infer``: ``forward_features`` of one image under ``inference_mode`` (what ``vitpcm
  infer`` runs per image), and the share of its time spent in attention (SDPA) and in the
  matrix products, from one profiled run;
* ``train``: one forward + backward of one image with the recipe's trainable part (last 5
  blocks + final norm), gradients from the mean of the tokens.

Each: the rise of the resident set size over the model alone during the first run
(activations and workspace; sampled every 5 ms), then ``--runs`` timed runs: median wall
and CPU seconds. With one thread, CPU seconds are the work itself, which other processes
on the machine barely change; wall seconds include the time the process waited for a core.

Tokens grow with the square of the side (960 / 384 = 2.5: 6.25x the patches); the
attention matrix with the square of the tokens (39x). Timings on a shared machine carry
noise; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

_CHILD = r"""
import json, statistics, sys, time
import torch
from vitpcm.models.backbone import BackboneAdapter, create_backbone
from vitpcm.stages.bench.memory import PeakMemory
name, side, runs, train_blocks, mode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(0)
model = create_backbone(name, False).eval()
adapter = BackboneAdapter(model, name)
x = torch.randn(1, 3, side, side)
base = PeakMemory.rss_mb()
out = {"tokens": (side // adapter.patch_size) ** 2, "threads": torch.get_num_threads(), "model_rss_mb": round(base, 1),
       "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
if mode == "infer":
    def work():
        with torch.inference_mode():
            model.forward_features(x)
else:
    adapter.set_trainable(train_blocks)
    model.train()
    def work():
        model.zero_grad(set_to_none=True)
        model.forward_features(x).float().mean().backward()
mem = PeakMemory("cpu")
with mem.measure():  # the first run: memory (a sampling thread runs beside it), and warm-up
    work()
wall, cpu = [], []
for _ in range(runs):  # timed runs, nothing else in the process
    t, c = time.perf_counter(), time.process_time()
    work()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
out.update(seconds=round(statistics.median(wall), 3), cpu_seconds=round(statistics.median(cpu), 3),
           seconds_runs=[round(v, 3) for v in wall], cpu_seconds_runs=[round(v, 3) for v in cpu],
           rss_rise_mb=round(mem.peak_mb - base, 1))
if mode == "infer":
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    out["attention_share"] = round(sum(e.self_cpu_time_total for e in ev if "scaled_dot_product" in e.key or "attention" in e.key) / total, 3)
    out["matmul_share"] = round(sum(e.self_cpu_time_total for e in ev if e.key in ("aten::addmm", "aten::mm", "aten::bmm")) / total, 3)
else:
    out["trainable_blocks"] = train_blocks
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="vit_small_patch16_384,vit_base_patch16_384")
    parser.add_argument("--sides", default="384,576,768,960")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--train-blocks", type=int, default=5, help="trainable last blocks (the recipe: 5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine a second thread waits on the busy core)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling_bench.json"))
    args = parser.parse_args()
    from vitpcm.stages.bench.machine import machine_info

    rows: List[Dict[str, Any]] = []
    load0 = os.getloadavg()[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for name in args.backbones.split(","):
        for side in (int(v) for v in args.sides.split(",")):
            t0 = time.perf_counter()
            row: Dict[str, Any] = {"backbone": name, "side": side}
            for mode in ("infer", "train"):
                cmd = [sys.executable, "-c", _CHILD, name, str(side), str(args.runs), str(args.train_blocks), mode,
                       str(args.threads)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-3000:])
                part = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update({k: part.pop(k) for k in ("tokens", "threads", "model_rss_mb", "params_m")})
                row[mode] = part
            row["loadavg_1min"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            i, t = row["infer"], row["train"]
            print(f"{name} @{side} ({row['tokens']} tokens): infer {i['cpu_seconds']:.2f} s CPU ({i['seconds']:.2f} s wall)"
                  f" +{i['rss_rise_mb']:.0f} MiB, attention {100 * i['attention_share']:.0f}%; train {t['cpu_seconds']:.2f} s"
                  f" CPU +{t['rss_rise_mb']:.0f} MiB ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    for name in {r["backbone"] for r in rows}:
        ref = next((r for r in rows if r["backbone"] == name and r["side"] == 384), None)
        if ref is None:
            continue
        for r in rows:
            if r["backbone"] == name:
                r["vs_384"] = {"tokens": round(r["tokens"] / ref["tokens"], 2),
                               "infer_cpu_seconds": round(r["infer"]["cpu_seconds"] / ref["infer"]["cpu_seconds"], 2),
                               "train_cpu_seconds": round(r["train"]["cpu_seconds"] / ref["train"]["cpu_seconds"], 2),
                               "infer_rss_rise": round(r["infer"]["rss_rise_mb"] / max(ref["infer"]["rss_rise_mb"], 1e-9), 2),
                               "train_rss_rise": round(r["train"]["rss_rise_mb"] / max(ref["train"]["rss_rise_mb"], 1e-9), 2)}  # fmt: skip
    m = machine_info("cpu")
    result = {
        "what": "ViT backbone time and resident memory vs input side, batch 1, CPU",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/scaling_bench.py " + " ".join(sys.argv[1:]),
        "machine": {k: m[k] for k in ("cpu", "cpus_usable", "torch", "timm", "torch_threads", "timm_fused_attention")},
        "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "shared": "other jobs ran on this 2-core machine during the measurement",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
