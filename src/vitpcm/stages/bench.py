"""``vitpcm bench``: what the pipeline costs next to what it cannot avoid, measured side by side.

In one process, on one device, each part beside its floor:

* ``infer``: the whole inference stage (:func:`vitpcm.stages.infer.infer`: read, resize,
  normalise, ViT + HV-BiLSTM + classifier, tag merge, upsample to the image size, argmax,
  mask PNG, probabilities npz) against the bare backbone forward (``forward_features``)
  at the same input side, batch and autocast (``infer.batch_size``, ``infer.amp``);
  ``infer_ratio`` = backbone time / pipeline time
  (1.0: the pipeline costs no more than its backbone).
* ``train``: one training step as the engine runs it (:class:`vitpcm.tasks.pcm.PcmTask`:
  the eval-mode ET target forward, the forward of view 1 + the tiled ET views, L_MCE +
  L_ET + L_REG, backward, Adam step) against the bare backbone doing the same work: the
  same extra no-gradient forward of view 1, the forward of the same concatenated input,
  backward from the mean of its tokens and an Adam step over the same trainable blocks;
  ``train_ratio`` = floor time / step time (without the data wait, reported apart).
* ``crf``: ``vitpcm crf`` on N VOC-sized images (present classes, one worker per CPU)
  against the authors' stage as their ``main.py test --crf`` runs it: all channels,
  ``joblib.Parallel`` over every CPU (or ``authors_jobs``) (:mod:`vitpcm.stages.bench_crf`),
  all as fresh processes, start-up included; ``crf_speedup`` = authors' wall time / vitpcm's
  at equal cores, and the pixel agreement of the masks; the same for
  ``crf.gaussian=lattice`` (``crf_speedup_lattice``: the paper presets' CRF). The authors'
  path in one process is the second column (``*_single_process``: the figure earlier
  versions reported as the speed-up, which contained the cores). ``crf.backend=torch``
  (``vitpcm crf --backend torch``, on ``device``) beside pydensecrf: images per second of
  each, and the agreement of their masks.
* ``cli``: wall time of ``vitpcm --help`` and ``vitpcm crf --help`` (median of runs).

Each pair runs interleaved (pipeline, floor, pipeline, floor, ...; the order alternates per
training step) so that load from other processes hits both alike; the medians and ratios
come from the same run. Memory: the peak of the CUDA allocator on a GPU, else the peak
resident set size of this process (sampled every 5 ms), taken on the warm-up run of each
side (the timed runs run without the sampling thread).

The data are the built-in synthetic shapes upscaled to VOC sizes (500 x 375 / 375 x 500);
the model is the preset's architecture with random weights (the cost does not depend on
the weights). ``quick`` uses a tiny ViT and tiny images: seconds, for the test suite (its
numbers say nothing about speed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

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


# ------------------------------------------------------------------------------ machine
def machine_info(device: str = "cpu") -> Dict[str, Any]:
    """CPU model, cores, memory, library versions, load, and the GPU when there is one."""
    import numpy as np
    import timm
    import torch
    from timm.layers import use_fused_attn

    from vitpcm.utils.system import cpu_count

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "timm_fused_attention": bool(use_fused_attn()),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "processes_running": _running_processes(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
    return info


def _running_processes() -> Optional[int]:
    """Processes in state R (running or runnable) right now, this one included (Linux)."""
    try:
        text = Path("/proc/loadavg").read_text().split()
        return int(text[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


# ------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory during ``with tracker.measure():`` blocks, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (the allocator's peak, reset at each block).
    CPU: the resident set size of this process, sampled every 5 ms by a thread.
    ``peak_mb`` is the largest value over all blocks; ``kind`` says which was measured.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak"
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the lifetime peak

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                torch.cuda.synchronize(self.device)
                self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)
            return
        stop = threading.Event()
        peak = [self.rss_mb()]

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], self.rss_mb())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak_mb = max(self.peak_mb, peak[0], self.rss_mb())


# ------------------------------------------------------------------------------ data and run
def _voc_sized(root: Path, names: Sequence[str], sizes: Sequence[tuple]) -> None:
    """Resize the synthetic images (bicubic) and masks (nearest) in place to VOC sizes."""
    from PIL import Image

    for i, name in enumerate(names):
        w, h = sizes[i % len(sizes)]
        img = root / "JPEGImages" / f"{name}.jpg"
        Image.open(img).convert("RGB").resize((w, h), Image.BICUBIC).save(img, quality=92)
        mask = root / "SegmentationClass" / f"{name}.png"
        with Image.open(mask) as m:
            m.resize((w, h), Image.NEAREST).save(mask)


def _make_data(root: Path, n_train: int, n_val: int, sizes: Optional[Sequence[tuple]]) -> Path:
    from vitpcm.data.synthetic import generate
    from vitpcm.io import read_names

    generate(root, n_train=n_train, n_val=n_val, seed=0, workers=1, progress=False)
    if sizes:
        seg = root / "ImageSets" / "Segmentation"
        names = read_names(seg / "train.txt") + (read_names(seg / "val.txt") if n_val else [])
        _voc_sized(root, names, sizes)
    return root


def _bench_config(preset: str, root: Path, device: str, workers: Optional[int], overrides: Sequence[str]):
    """The preset with random weights, pointed at the synthetic set (VOC layout) and kept to
    the preset's class list (the synthetic masks use indices 1..5, valid in any list).
    ``workers``: data-loader workers (None: the preset's)."""
    from vitpcm.config import load_config

    base = [
        "model.pretrained=false",
        "data.format=voc",
        f"data.root={root}",
        "data.train_split=train",
        "data.val_split=val",
        "data.sbd=null",
        "data.tags=null",
        "data.masks=null",
        f"train.device={device}",
        "train.val_every=0",
    ]
    if workers is not None:
        base.append(f"data.num_workers={int(workers)}")
    return load_config(preset, [*base, *overrides])


def _write_run(cfg: Any, run: Path, num_classes: int, classes: List[str]):
    """A run folder holding the config's model with random weights (``best.pt``), as
    ``vitpcm infer`` reads it. Returns the model."""
    from omegaconf import OmegaConf

    from vitpcm.config import to_yaml
    from vitpcm.engine.checkpoint import save_checkpoint
    from vitpcm.io import write_text_atomic
    from vitpcm.models.registry import build_model, model_arch
    from vitpcm.runs import RunLayout

    model = build_model(cfg, num_classes)
    layout = RunLayout(run)
    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.config, to_yaml(cfg))
    state = {"arch": model_arch(model, "vitpcm"), "classes": classes, "epoch": 0,
             "config": OmegaConf.to_container(cfg, resolve=True), "model": model.state_dict()}  # fmt: skip
    save_checkpoint(layout.checkpoint("best"), state)
    return model


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


@contextlib.contextmanager
def _no_screen_cache() -> Iterator[None]:
    """The bench's throw-away datasets leave nothing in the user's screening cache."""
    old = os.environ.get("VITPCM_CACHE_DIR")
    os.environ["VITPCM_CACHE_DIR"] = "off"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VITPCM_CACHE_DIR", None)
        else:
            os.environ["VITPCM_CACHE_DIR"] = old


# ------------------------------------------------------------------------------ inference
def bench_infer(cfg: Any, work: Path, device: str, images: int, repeats: int) -> Dict[str, Any]:
    """The inference stage vs the bare backbone forward at ``infer.scale`` (module docstring)."""
    import torch

    from vitpcm.data import EvalTransform, build_dataset
    from vitpcm.engine.distributed import resolve_device
    from vitpcm.stages.config import resolve_config
    from vitpcm.stages.infer import infer

    cfg = resolve_config(cfg)
    dataset = build_dataset(cfg.data, "val", require_masks=False)
    seg = Path(cfg.data.root) / "ImageSets" / "Segmentation"
    (seg / "one.txt").write_text(dataset.names[0] + "\n")  # a one-image split: the stage's fixed cost
    run = work / "run"
    model = _write_run(cfg, run, dataset.num_classes, dataset.classes)
    dev = resolve_device(device)
    model.to(dev).eval()
    scale = int(cfg.infer.scale)
    backbone = model.backbone
    from vitpcm.data.transforms import transforms_on_device
    from vitpcm.stages.infer import speed_settings

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
            _sync(dev)
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

    pipe, floor = _median(pipe_times), _median(bare_times)
    pipe_c, floor_c = _median(pipe_cpu), _median(bare_cpu)
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
        "pipeline_seconds_per_image": _r(pipe),
        "backbone_seconds_per_image": _r(floor),
        "infer_ratio": _r(floor / pipe),
        "pipeline_cpu_seconds_per_image": _r(pipe_c),
        "backbone_cpu_seconds_per_image": _r(floor_c),
        "infer_ratio_cpu": _r(floor_c / pipe_c),
        "images_per_second": _r(1.0 / pipe),
        "backbone_images_per_second": _r(1.0 / floor),
        "data_seconds_per_image": _r(data_s),
        "data_wait_fraction": _r(min(1.0, data_s / pipe)),
        "data_wait_method": "read + transform timed alone"
        + (
            "; the loader has no workers, so the loop waits this long"
            if not int(cfg.data.num_workers)
            else "; loader workers overlap it, so this is an upper bound"
        ),  # fmt: skip
        "peak_memory_mb": round(mem_pipe.peak_mb, 1),
        "backbone_peak_memory_mb": round(mem_bare.peak_mb, 1),
        "memory_kind": mem_pipe.kind,
        "pipeline_seconds_per_image_runs": [_r(t) for t in pipe_times],
        "backbone_seconds_per_image_runs": [_r(t) for t in bare_times],
        "pipeline_cpu_seconds_per_image_runs": [_r(t) for t in pipe_cpu],
        "backbone_cpu_seconds_per_image_runs": [_r(t) for t in bare_cpu],
    }


# ------------------------------------------------------------------------------ training
def bench_train(cfg: Any, work: Path, device: str, steps: int, warmup: int = 1) -> Dict[str, Any]:
    """One training step with every loss vs the bare backbone's forward + backward (module docstring)."""
    import torch
    from torch.utils.data import DataLoader

    from vitpcm.data.transforms import tile_views
    from vitpcm.engine.distributed import Dist, resolve_device
    from vitpcm.engine.task import EngineContext, eval_mode
    from vitpcm.engine.trainer import seed_everything
    from vitpcm.runs import RunLayout
    from vitpcm.stages.config import resolve_config
    from vitpcm.tasks.pcm import PcmTask

    cfg = resolve_config(cfg)
    dev = resolve_device(device)
    seed_everything(int(cfg.train.seed))
    amp = bool(cfg.train.amp) and dev.type == "cuda"
    ctx = EngineContext(device=dev, dist=Dist(), run=RunLayout(work / "trainrun"), progress=False, amp=amp)
    task = PcmTask(cfg)
    task.setup(ctx)
    model = task.model  # with train.compile=true its blocks are compiled (PcmTask.setup)
    phase = task.phases()[-1]  # the phase with unfrozen blocks (finetune)
    groups = task.param_groups(phase, model)
    for g in groups:
        g["lr"] = float(phase.lr)
    opt = task.make_optimizer(phase, groups)
    task.train_mode(model)
    backbone = model.backbone
    floor_params = [p for p in backbone.parameters() if p.requires_grad]
    opt_floor = task.make_optimizer(phase, [{"params": floor_params, "lr": float(phase.lr)}])  # the same Adam
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported()) if amp else None

    bs = int(cfg.train.batch_size)
    workers = int(cfg.data.num_workers)
    loader = DataLoader(task.train_set, batch_size=bs, shuffle=True, num_workers=workers,
                        collate_fn=task.collate_fn, drop_last=True, pin_memory=dev.type == "cuda",
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))  # fmt: skip

    def batches() -> Iterator[Any]:
        while True:
            yield from loader

    def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def full_step(batch: Any) -> float:
        start = time.perf_counter()
        cpu0[0] = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss, _ = task.train_step(model, batch, ctx)
        if not bool(torch.isfinite(loss.detach())):  # the engine's check before backward (a sync)
            raise RuntimeError("non-finite loss in the benchmark step")
        backward(loss, opt)
        _sync(dev)
        cpu0[0] = time.process_time() - cpu0[0]
        return time.perf_counter() - start

    def floor_step(batch: Any) -> float:
        start = time.perf_counter()
        cpu0[0] = time.process_time()
        images = batch["image"].to(dev, non_blocking=True)
        opt_floor.zero_grad(set_to_none=True)
        inputs = images
        if cfg.loss.et:
            with torch.no_grad(), eval_mode(backbone), ctx.autocast():
                backbone.forward_features(images)  # the extra ET forward
            tiled, _ = tile_views(batch["image_et"].to(dev, non_blocking=True))
            inputs = torch.cat([images, tiled], dim=0)
        with ctx.autocast():
            tokens = backbone.forward_features(inputs)
        backward(tokens.float().mean(), opt_floor)
        _sync(dev)
        cpu0[0] = time.process_time() - cpu0[0]
        return time.perf_counter() - start

    cpu0 = [0.0]  # CPU seconds of the last step (set by full_step / floor_step)
    cpu: Dict[str, List[float]] = {"full": [], "floor": []}
    mem_full, mem_floor = PeakMemory(dev), PeakMemory(dev)
    it = batches()
    waits: List[float] = []
    fulls: List[float] = []
    floors: List[float] = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(it)
        # data.transforms_on=device: the batch's pixels are made on the device here, counted as
        # data preparation (the wait), so both steps below start from the same finished batch
        batch = task.train_transform.finish(batch, dev)
        _sync(dev)
        wait = time.perf_counter() - start
        order = ("full", "floor") if i % 2 == 0 else ("floor", "full")  # alternate: drift hits both
        times = {}
        for which in order:
            # peak memory on the warm-up steps; the timed steps run without the sampling thread
            if which == "full":
                with mem_full.measure() if i < warmup else contextlib.nullcontext():
                    times["full"] = full_step(batch)
                times["full_cpu"] = cpu0[0]
            else:
                with mem_floor.measure() if i < warmup else contextlib.nullcontext():
                    times["floor"] = floor_step(batch)
                times["floor_cpu"] = cpu0[0]
        if i >= warmup:
            cpu["full"].append(times["full_cpu"])
            cpu["floor"].append(times["floor_cpu"])
            waits.append(wait)
            fulls.append(times["full"])
            floors.append(times["floor"])
    del it
    full, floor = _median(fulls), _median(floors)
    wait_total = sum(waits)
    return {
        "size": int(cfg.input.train_size),
        "tokens": (int(cfg.input.train_size) // model.patch_size) ** 2,
        "batch_size": bs,
        "forward_inputs": bs + (-(-bs // 4) if cfg.loss.et else 0),  # view 1 + tiled ET inputs (4 views each)
        "trainable_blocks": int(cfg.train.unfreeze_blocks),
        "trainable_backbone_parameters": int(sum(p.numel() for p in floor_params)),
        "steps": steps,
        "warmup_steps": warmup,
        "loader_workers": workers,
        "transforms_on_device": bool(task.train_transform.defer),
        "amp": amp,
        "compile": bool(cfg.train.get("compile", False)),
        "step_seconds": _r(full),
        "floor_seconds": _r(floor),
        "train_ratio": _r(floor / full),
        "step_cpu_seconds": _r(_median(cpu["full"])),
        "floor_cpu_seconds": _r(_median(cpu["floor"])),
        "train_ratio_cpu": _r(_median(cpu["floor"]) / _median(cpu["full"])),
        "images_per_second": _r(bs / (full + _median(waits))),
        "images_per_second_without_data_wait": _r(bs / full),
        "floor_images_per_second": _r(bs / floor),
        "data_wait_seconds": _r(_median(waits)),
        "data_wait_fraction": _r(wait_total / (wait_total + sum(fulls))),
        "peak_memory_mb": round(mem_full.peak_mb, 1),
        "floor_peak_memory_mb": round(mem_floor.peak_mb, 1),
        "memory_kind": mem_full.kind,
        "step_seconds_runs": [_r(t) for t in fulls],
        "floor_seconds_runs": [_r(t) for t in floors],
        "data_wait_seconds_runs": [_r(t) for t in waits],
        "step_cpu_seconds_runs": [_r(t) for t in cpu["full"]],
        "floor_cpu_seconds_runs": [_r(t) for t in cpu["floor"]],
    }


# ------------------------------------------------------------------------------ CRF and CLI
def _vitpcm_command() -> List[str]:
    """The installed ``vitpcm`` script beside this Python, else ``python -m vitpcm``."""
    script = Path(sys.executable).with_name("vitpcm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vitpcm"]


def _timed(cmd: Sequence[str]) -> float:
    return _timed_cpu(cmd)[0]


def _timed_cpu(cmd: Sequence[str]) -> tuple:
    """Run ``cmd``; (wall seconds, CPU seconds of it and every process it started)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


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
    from vitpcm.io import names_in
    from vitpcm.stages.bench_crf import VOC_CLASSES, VOC_SIZES, agreement, make_crf_inputs
    from vitpcm.utils.system import cpu_count

    folder = work / "crf"
    names = make_crf_inputs(folder, images, seed=0, num_classes=VOC_CLASSES, sizes=sizes or VOC_SIZES)
    probs, imgs = folder / "probs", folder / "images"

    def ours(out: str, *keys: str) -> List[str]:
        return [*_vitpcm_command(), "crf", "--probs", str(probs), "--images", str(imgs), "--out", str(folder / out),
                "--overwrite", "-q", *keys]  # fmt: skip

    jobs = int(authors_jobs) if authors_jobs else cpu_count()
    authors = [sys.executable, "-m", "vitpcm.stages.bench_crf", "authors", str(probs), str(imgs)]
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
            wall, used = _timed_cpu(commands[which])
            walls[which].append(wall)
            cpu[which].append(used)
    agree = agreement(folder / "vitpcm", folder / "authors", names)
    agree_lattice = agreement(folder / "vitpcm_lattice", folder / "authors", names)
    agree_torch = agreement(folder / "vitpcm_torch", folder / "vitpcm", names)
    import numpy as np

    present = [len(np.load(probs / f"{n}.npz")["classes"]) for n in names_in(probs, ".npz")]
    a, a1, o, lat, tor = (_median(walls[k]) for k in ("authors", "authors_single", "ours", "lattice", "torch"))
    a_cpu, o_cpu, lat_cpu = (_median(cpu[k]) for k in ("authors", "ours", "lattice"))
    return {
        "images": images,
        "sizes_wxh": [list(s) for s in (sizes or VOC_SIZES)],
        "classes": VOC_CLASSES,
        "present_classes_mean": round(float(np.mean(present)), 2),
        "repeats": repeats,
        "vitpcm_workers": cpu_count(),
        "authors_jobs": jobs,
        "vitpcm_seconds": _r(o, 3),
        "authors_seconds": _r(a, 3),
        "crf_speedup": _r(a / o, 3),
        "authors_single_process_seconds": _r(a1, 3),
        "crf_speedup_single_process": _r(a1 / o, 3),
        "vitpcm_cpu_seconds": _r(o_cpu, 3),
        "authors_cpu_seconds": _r(a_cpu, 3),
        "crf_cpu_ratio": _r(a_cpu / o_cpu, 3),
        "agreement_pct": _r(agree["pixels_equal_pct"], 4),
        "agreement_worst_image_pct": _r(agree["worst_image_pct"], 4),
        "images_identical": agree["images_identical"],
        "lattice_seconds": _r(lat, 3),
        "crf_speedup_lattice": _r(a / lat, 3),
        "crf_speedup_lattice_single_process": _r(a1 / lat, 3),
        "lattice_cpu_seconds": _r(lat_cpu, 3),
        "crf_cpu_ratio_lattice": _r(a_cpu / lat_cpu, 3),
        "agreement_lattice_pct": _r(agree_lattice["pixels_equal_pct"], 4),
        "images_identical_lattice": agree_lattice["images_identical"],
        "torch_device": device,
        "torch_seconds": _r(tor, 3),
        "torch_images_per_second": _r(images / tor, 3),
        "pydensecrf_images_per_second": _r(images / o, 3),
        "agreement_torch_pct": _r(agree_torch["pixels_equal_pct"], 4),
        "agreement_torch_worst_image_pct": _r(agree_torch["worst_image_pct"], 4),
        "vitpcm_seconds_runs": [_r(t, 3) for t in walls["ours"]],
        "lattice_seconds_runs": [_r(t, 3) for t in walls["lattice"]],
        "torch_seconds_runs": [_r(t, 3) for t in walls["torch"]],
        "authors_seconds_runs": [_r(t, 3) for t in walls["authors"]],
        "authors_single_process_seconds_runs": [_r(t, 3) for t in walls["authors_single"]],
        "command_vitpcm": "vitpcm crf --probs P --images I --out O --overwrite -q",
        "command_lattice": "vitpcm crf --probs P --images I --out O --overwrite -q crf.gaussian=lattice",
        "command_torch": f"vitpcm crf --probs P --images I --out O --overwrite -q --backend torch --device {device}",
        "command_authors": f"python -m vitpcm.stages.bench_crf authors P I O 21 {jobs}",
        "command_authors_single_process": "python -m vitpcm.stages.bench_crf authors P I O 21 1",
        "process_start_included": True,
    }


def bench_cli(runs: int) -> Dict[str, Any]:
    """Wall time of ``vitpcm --help`` and ``vitpcm crf --help`` (fresh processes)."""
    cmd = _vitpcm_command()
    out: Dict[str, Any] = {"runs": runs, "command": " ".join(Path(c).name for c in cmd)}
    for key, args in (("help_seconds", ["--help"]), ("crf_help_seconds", ["crf", "--help"])):
        times = [_timed([*cmd, *args]) for _ in range(runs)]
        out[key] = _r(_median(times), 3)
        out[f"{key}_runs"] = [_r(t, 3) for t in times]
    return out


# ------------------------------------------------------------------------------ the stage
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
    (and with ``json_path`` write) the results: module docstring.

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
    from vitpcm.errors import VitpcmError
    from vitpcm.io import write_json_atomic

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise VitpcmError(f"unknown bench section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    gpu = device.startswith("cuda")
    if gpu:
        import torch

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
        import torch

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
        with _no_screen_cache():
            result["machine"] = machine_info(device)
            if "infer" in sections or "train" in sections:
                from omegaconf import OmegaConf

                w = workers if workers is not None else (None if gpu else 0)
                n_train = (batch_size or 4) * (train_steps + 1)
                sizes = None if quick else ((500, 375), (375, 500))
                _make_data(work / "data", n_train, infer_images, sizes)
                extra = [*(QUICK_OVERRIDES if quick else []), *overrides]
                if batch_size:
                    extra.append(f"train.batch_size={batch_size}")
                elif not gpu:
                    extra.append("train.batch_size=4")
                cfg = _bench_config(preset, work / "data", device, w, extra)
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
            import torch

            torch.set_num_threads(old_threads)
    result["machine"]["loadavg_1min_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
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
