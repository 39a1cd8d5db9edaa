"""The ``train`` section: one training step with every loss against the bare backbone's
forward + backward.

One training step as the engine runs it (:class:`vitpcm.tasks.pcm.PcmTask`: the eval-mode
ET target forward, the forward of view 1 + the tiled ET views, L_MCE + L_ET + L_REG,
backward, Adam step) against the bare backbone doing the same work: the same extra
no-gradient forward of view 1, the forward of the same concatenated input, backward from
the mean of its tokens and an Adam step over the same trainable blocks; ``train_ratio`` =
floor time / step time (without the data wait, reported apart).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
from torch.utils.data import DataLoader

from vitpcm.data.transforms import tile_views
from vitpcm.engine.distributed import Dist, resolve_device
from vitpcm.engine.task import EngineContext, eval_mode
from vitpcm.engine.trainer import seed_everything
from vitpcm.models.backbone import resolve_config
from vitpcm.runs import RunLayout
from vitpcm.stages.bench.memory import PeakMemory
from vitpcm.stages.bench.timing import median, rounded, sync
from vitpcm.tasks.pcm import PcmTask


def bench_train(cfg: Any, work: Path, device: str, steps: int, warmup: int = 1) -> Dict[str, Any]:
    """One training step with every loss vs the bare backbone's forward + backward (module docstring)."""

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
        sync(dev)
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
        sync(dev)
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
        sync(dev)
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
    full, floor = median(fulls), median(floors)
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
        "step_seconds": rounded(full),
        "floor_seconds": rounded(floor),
        "train_ratio": rounded(floor / full),
        "step_cpu_seconds": rounded(median(cpu["full"])),
        "floor_cpu_seconds": rounded(median(cpu["floor"])),
        "train_ratio_cpu": rounded(median(cpu["floor"]) / median(cpu["full"])),
        "images_per_second": rounded(bs / (full + median(waits))),
        "images_per_second_without_data_wait": rounded(bs / full),
        "floor_images_per_second": rounded(bs / floor),
        "data_wait_seconds": rounded(median(waits)),
        "data_wait_fraction": rounded(wait_total / (wait_total + sum(fulls))),
        "peak_memory_mb": round(mem_full.peak_mb, 1),
        "floor_peak_memory_mb": round(mem_floor.peak_mb, 1),
        "memory_kind": mem_full.kind,
        "step_seconds_runs": [rounded(t) for t in fulls],
        "floor_seconds_runs": [rounded(t) for t in floors],
        "data_wait_seconds_runs": [rounded(t) for t in waits],
        "step_cpu_seconds_runs": [rounded(t) for t in cpu["full"]],
        "floor_cpu_seconds_runs": [rounded(t) for t in cpu["floor"]],
    }
