"""The ``train`` section: the engine's own training step against the bare backbone doing the
same tensor work.

* ``step``: one step of :class:`vitpcm.engine.trainer.Trainer` (its
  :class:`~vitpcm.engine.step.Stepper`), the very method ``vitpcm train`` runs per batch
  (:func:`engine_step`), on a trainer built as ``vitpcm train`` builds it (settings,
  seeding, :class:`vitpcm.tasks.pcm.PcmTask` set-up, AMP scaler) and put in its last phase
  (the one with unfrozen blocks): zero the gradients, ``PcmTask.train_step`` (the eval-mode
  ET target forward, the forward of view 1 + the tiled ET views, L_MCE + L_ET + L_REG), the
  divergence check (a device sync), backward, the Adam step, the loss terms read back as
  floats. Each measured step is a whole optimizer step
  on one batch (with ``train.global_batch`` the engine would accumulate several batches
  before the Adam step; here every batch ends its window).
* ``floor``: what such a step cannot do without, written here since the engine has no such
  step: the bare backbone with the same extra no-gradient forward of view 1, the forward of
  the same concatenated input, backward from the mean of its tokens and an Adam step over
  the same trainable blocks, with the trainer's autocast and scaler; no head, no losses, no
  checks.

``train_ratio`` = floor time / step time (without the data wait, reported apart). Both
sides get the same finished batch (``data.transforms_on=device``: its pixels are made
before the clocks start, counted in the data wait).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from vitpcm.data.transforms import tile_views
from vitpcm.engine.task import Phase, eval_mode
from vitpcm.engine.trainer import Trainer
from vitpcm.stages.bench.memory import PeakMemory
from vitpcm.stages.bench.timing import median, rounded, sync
from vitpcm.stages.config import resolve_config
from vitpcm.tasks.pcm import PcmTask, train_settings


# The engine's API is used in the next two functions only (the trainer's step and phase
# methods): adapt them when the engine renames its methods.
def enter_last_phase(trainer: Trainer) -> Phase:
    """Put ``trainer`` in its last phase as its loop does at that phase's first epoch
    (trainable parameters, a fresh optimizer) and the model in training mode."""
    phase = trainer.stepper.phases[-1]
    trainer.stepper.enter_phase(phase.start_epoch)
    trainer.task.train_mode(trainer.model)
    return phase


def engine_step(trainer: Trainer, batch: Any, step: int) -> Dict[str, float]:
    """One training step on ``batch``, the trainer's own method, as one whole accumulation
    window (batch 0 of 1: zero_grad, forward, divergence check, backward, optimizer step).
    ``step``: the global step named in a divergence error. Returns the float loss terms."""
    return trainer.stepper.training_step(batch, trainer.stepper.phase.start_epoch, 0, 1, step)


@contextlib.contextmanager
def engine_trainer(cfg: DictConfig, run: Path, device: str) -> Iterator[Trainer]:
    """A :class:`Trainer` of ``PcmTask(cfg)`` on ``device`` and the run folder ``run`` (locked,
    as in ``vitpcm train``) in its last phase; its TensorBoard writer and the lock are
    released on leaving. The torch threads stay the bench's (``--threads``), whatever
    ``train.threads`` says."""
    settings = dataclasses.replace(train_settings(cfg), device=device, threads=0)
    trainer = Trainer(PcmTask(cfg), run, settings, progress=False)
    try:
        enter_last_phase(trainer)
        yield trainer
    finally:
        if trainer.writer is not None:
            trainer.writer.close()
        trainer.close()


def bench_train(cfg: Any, work: Path, device: str, steps: int, warmup: int = 1) -> Dict[str, Any]:
    """The engine's training step vs the bare backbone's forward + backward (module docstring).

    ``cfg``: the bench config; ``device``: where both sides run; ``work``: a scratch folder
    (the trainer's run folder goes there); ``steps``: measured steps of each side after
    ``warmup`` (where the peak memory is taken). Returns the section's JSON
    (``step_seconds``, ``floor_seconds``, ``train_ratio``, ...)."""
    with engine_trainer(resolve_config(cfg), work / "trainrun", device) as trainer:
        return _measure(trainer, steps, warmup)


def _measure(trainer: Trainer, steps: int, warmup: int) -> Dict[str, Any]:
    """The interleaved steps of :func:`bench_train` on a trainer in its last phase."""
    task, cfg, dev, ctx = trainer.task, trainer.task.cfg, trainer.device, trainer.ctx
    model = trainer.model  # with train.compile=true its blocks are compiled (PcmTask.setup)
    backbone = model.backbone
    floor_params = [p for p in backbone.parameters() if p.requires_grad]
    phase, lr = trainer.stepper.phase, trainer.stepper.lr
    opt_floor = task.make_optimizer(phase, [{"params": floor_params, "lr": lr}])  # the same Adam
    scaler = trainer.stepper.scaler

    bs = int(trainer.settings.batch_size)  # the engine's batch per process (train.global_batch split)
    workers = int(cfg.data.num_workers)
    loader = DataLoader(task.train_set, batch_size=bs, shuffle=True, num_workers=workers,
                        collate_fn=task.collate_fn, drop_last=True, pin_memory=dev.type == "cuda",
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))  # fmt: skip

    def batches() -> Iterator[Any]:
        while True:
            yield from loader

    def full_step(batch: Any, step: int) -> float:
        start = time.perf_counter()
        cpu0[0] = time.process_time()
        engine_step(trainer, batch, step)
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
        loss = tokens.float().mean()
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(opt_floor)
            scaler.update()
        else:
            loss.backward()
            opt_floor.step()
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
                    times["full"] = full_step(batch, i + 1)
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
        "amp": trainer.ctx.amp,
        "accumulation_steps_of_a_run": trainer.stepper.accumulate,  # here every measured step is a whole window
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
