"""``vitpcm bench``: the sections run in turn in one process, the targets, the printed lines."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from omegaconf import OmegaConf

from vitpcm.atomic import write_json_atomic
from vitpcm.errors import VitpcmError
from vitpcm.stages.bench.cli import bench_cli
from vitpcm.stages.bench.crf import bench_crf
from vitpcm.stages.bench.fixtures import bench_config, make_bench_data, no_screen_cache
from vitpcm.stages.bench.infer import bench_infer
from vitpcm.stages.bench.machine import load_average, machine_info
from vitpcm.stages.bench.train import bench_train

log = logging.getLogger(__name__)

TARGETS = {"infer_ratio": 0.85, "train_ratio": 0.85, "crf_speedup": 5.0, "crf_agreement_pct": 99.9}
SECTIONS = ("infer", "train", "crf", "cli")

# A ViT small enough for a test: 32 px inputs, 8 px patches, one block.
QUICK_OVERRIDES = [
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "model.lstm_hidden=8",
    "input.train_size=32",
    "input.et_crop=16",
    "input.et_scale=16",
    "infer.scale=32",
    "train.unfreeze_blocks=1",
]


def bench(
    preset: str = "voc12",
    *,
    device: str = "cpu",
    quick: bool = False,
    overrides: Sequence[str] = (),
    json_path: Optional[str | Path] = None,
    sections: Sequence[str] = SECTIONS,
    infer_images: Optional[int] = None,
    repeats: Optional[int] = None,
    train_steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    crf_images: Optional[int] = None,
    crf_repeats: int = 1,
    authors_jobs: Optional[int] = None,
    cli_runs: Optional[int] = None,
    workers: Optional[int] = None,
    threads: Optional[int] = None,
    note: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Measure the sections (``infer``, ``train``, ``crf``, ``cli``) side by side and return
    (and with ``json_path`` write) the results: the package docstring, and each section's
    module for what it measures.

    Args:
        preset: config preset (or YAML) whose model and sizes are measured; ``overrides`` on top.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        quick: tiny model and images, a few steps (seconds; for tests, not for numbers).
        infer_images / repeats: images per inference run, and runs of each side (default
            3 / 3 on the CPU, 20 / 5 on a GPU; quick 2 / 2).
        train_steps / batch_size: measured training steps (after one warm-up step), and the
            batch (default: 4 / 4 on the CPU, 20 / the preset's on a GPU; quick 2 / 4).
        crf_images / crf_repeats: VOC-sized images of the CRF section (default 50; quick 3).
        authors_jobs: processes of the authors' joblib CRF (default one per CPU, as theirs).
        cli_runs: runs of each ``--help`` (default 5; quick 1).
        workers: data-loader workers (default: 0 on the CPU, the preset's on a GPU).
        threads: torch CPU threads (default torch's). On a machine shared with other jobs,
            1 avoids a second thread waiting for a busy core at every parallel region.
        note: free text stored with the results (e.g. "machine shared with other jobs").
        progress: log each section as it starts.

    Returns ``{"machine", "config", "infer", "train", "crf", "cli", "targets", "met", ...}``.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise VitpcmError(f"unknown bench section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    gpu = device.startswith("cuda")
    if gpu:
        if not torch.cuda.is_available():
            raise VitpcmError(f"--device {device}: CUDA is not available here; use --device cpu")
    if quick:
        infer_images, repeats = infer_images or 2, repeats or 2
        train_steps, batch_size = train_steps or 2, batch_size or 4
        crf_images, cli_runs = crf_images or 3, cli_runs or 1
    else:
        infer_images, repeats = infer_images or (20 if gpu else 3), repeats or (5 if gpu else 3)
        train_steps = train_steps or (20 if gpu else 4)
        crf_images, cli_runs = crf_images or 50, cli_runs or 5
    old_threads = None
    if threads:
        old_threads = torch.get_num_threads()
        torch.set_num_threads(int(threads))  # restored at the end
    started = time.time()
    result: Dict[str, Any] = {
        "what": "vitpcm bench: each stage beside its floor, measured side by side in one process",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "vitpcm bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "preset": str(preset),
        "device": device,
        "quick": quick,
        "note": note,
    }
    say: Callable[[str], None] = log.info if progress else log.debug
    work = Path(tempfile.mkdtemp(prefix="vitpcm-bench-"))
    try:
        with no_screen_cache():
            result["machine"] = machine_info(device)
            if "infer" in sections or "train" in sections:
                w = workers if workers is not None else (None if gpu else 0)
                n_train = (batch_size or 4) * (train_steps + 1)
                sizes = None if quick else ((500, 375), (375, 500))
                make_bench_data(work / "data", n_train, infer_images, sizes)
                extra = [*(QUICK_OVERRIDES if quick else []), *overrides]
                if batch_size:
                    extra.append(f"train.batch_size={batch_size}")
                elif not gpu:
                    extra.append("train.batch_size=4")
                cfg = bench_config(preset, work / "data", device, w, extra)
                result["config"] = {
                    "backbone": str(cfg.model.backbone),
                    "backbone_kwargs": OmegaConf.to_container(cfg.model.backbone_kwargs),
                    "train_size": int(cfg.input.train_size),
                    "infer_scale": int(cfg.infer.scale),
                    "classes": str(cfg.data.classes),
                    "overrides": list(extra),
                }
                if "infer" in sections:
                    say(f"bench: inference at {cfg.infer.scale} ({infer_images} images x {repeats} runs)")
                    result["infer"] = bench_infer(cfg, work / "infer", device, infer_images, repeats)
                if "train" in sections:
                    say(f"bench: training at {cfg.input.train_size} ({train_steps} steps)")
                    result["train"] = bench_train(cfg, work / "train", device, train_steps)
            if "crf" in sections:
                say(f"bench: dense CRF on {crf_images} images")
                sizes = ((64, 48), (48, 64)) if quick else None
                result["crf"] = bench_crf(work, crf_images, crf_repeats, sizes, authors_jobs, device)
            if "cli" in sections:
                say("bench: CLI start-up")
                result["cli"] = bench_cli(cli_runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if old_threads is not None:
            torch.set_num_threads(old_threads)
    result["machine"]["loadavg_1min_after"] = load_average()
    result["seconds"] = round(time.time() - started, 1)
    result["targets"] = dict(TARGETS)
    met: Dict[str, bool] = {}
    if "infer" in result:
        met["infer_ratio"] = result["infer"]["infer_ratio"] >= TARGETS["infer_ratio"]
    if "train" in result:
        met["train_ratio"] = result["train"]["train_ratio"] >= TARGETS["train_ratio"]
    if "crf" in result:
        met["crf_speedup"] = result["crf"]["crf_speedup"] >= TARGETS["crf_speedup"]
        met["crf_agreement"] = result["crf"]["agreement_pct"] >= TARGETS["crf_agreement_pct"]
    result["met"] = met
    if json_path:
        write_json_atomic(json_path, result)
    return result


def format_bench(result: Dict[str, Any]) -> str:
    """The lines ``vitpcm bench`` prints."""
    m = result.get("machine", {})
    lines = [f"machine: {m.get('cpu')} ({m.get('cpus_usable')} usable CPUs), torch {m.get('torch')}"
             + (f", GPU {m['gpu']['name']}" if "gpu" in m else "") + f"; device {result['device']}"]  # fmt: skip
    if result.get("quick"):
        lines.append("quick mode: tiny shapes, the numbers say nothing about speed")
    if "infer" in result:
        i = result["infer"]
        lines.append(f"infer @{i['scale']}: pipeline {i['pipeline_seconds_per_image']:.3f} s/img"
                     f" ({i['images_per_second']:.2f} img/s), backbone {i['backbone_seconds_per_image']:.3f} s/img;"
                     f" infer_ratio {i['infer_ratio']:.3f} (CPU seconds: {i['infer_ratio_cpu']:.3f}); data wait {100 * i['data_wait_fraction']:.1f}%;"
                     f" peak {i['peak_memory_mb']:.0f} MiB ({i['memory_kind']})")  # fmt: skip
    if "train" in result:
        t = result["train"]
        lines.append(f"train @{t['size']} batch {t['batch_size']}: step {t['step_seconds']:.3f} s"
                     f" ({t['images_per_second']:.2f} img/s), floor {t['floor_seconds']:.3f} s;"
                     f" train_ratio {t['train_ratio']:.3f} (CPU seconds: {t['train_ratio_cpu']:.3f}); data wait {100 * t['data_wait_fraction']:.1f}%;"
                     f" peak {t['peak_memory_mb']:.0f} MiB ({t['memory_kind']})")  # fmt: skip
    if "crf" in result:
        c = result["crf"]
        lines.append(f"crf on {c['images']} images: vitpcm {c['vitpcm_seconds']:.2f} s ({c['vitpcm_workers']} workers),"
                     f" authors {c['authors_seconds']:.2f} s (joblib, {c['authors_jobs']} jobs; one process"
                     f" {c['authors_single_process_seconds']:.2f} s); crf_speedup {c['crf_speedup']:.2f} at equal cores"
                     f" ({c['crf_speedup_single_process']:.2f} vs one process; CPU seconds: {c['crf_cpu_ratio']:.2f}x);"
                     f" agreement {c['agreement_pct']:.3f}%; with crf.gaussian=lattice {c['crf_speedup_lattice']:.2f},"
                     f" agreement {c['agreement_lattice_pct']:.3f}%")  # fmt: skip
        lines.append(f"crf backends on {c['torch_device']}: torch {c['torch_images_per_second']:.2f} img/s,"
                     f" pydensecrf {c['pydensecrf_images_per_second']:.2f} img/s; masks equal on"
                     f" {c['agreement_torch_pct']:.3f}% of the pixels (worst image {c['agreement_torch_worst_image_pct']:.3f}%)")  # fmt: skip
    if "cli" in result:
        c = result["cli"]
        lines.append(f"cli: vitpcm --help {c['help_seconds']:.2f} s, vitpcm crf --help {c['crf_help_seconds']:.2f} s")
    met = result.get("met", {})
    if met:
        lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    return "\n".join(lines)
