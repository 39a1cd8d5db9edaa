"""Proof that vitpcm's training step is the authors' Keras ``train_step``, step after step.

For each architecture (``tiny``: the CI fixture's; ``s``: ViT-PCM/S) this

1. makes a fixed global batch (smooth random uint8 images of a VOC-like size, multi-hot
   tags) and draws its transform records with vitpcm's :class:`TrainTransform` (the preset's
   flip probabilities, crop probability 0.5, colour jitter off), converted to the authors'
   AFFINE layout ``[fliplr, flipud, transpose, y1, x1, y2, x2, resize_h, resize_w]``;
2. runs ``keras_train_step.py`` in a TensorFlow environment: the authors' own
   ``VITPCM.train_step`` (their ``model.py`` / ``utils.py`` from ``--authors``, never copied
   here) on 4 replicas of a ``MirroredStrategy``, ``--warmup-steps`` steps of their warm-up
   phase then ``--finetune-steps`` after their ``unfreeze()`` with a fresh Adam, dropout 0;
3. imports its initial ``.h5`` with the import stage (``vitpcm import-keras``) and runs
   vitpcm's step on the same batch with the trainer's own code, ``engine.step.Stepper``:
   ``enter_phase`` (``PcmTask.param_groups`` + ``PcmTask.make_optimizer``, a fresh one per
   phase) and ``training_step`` (``PcmTask.train_step``, loss / accumulate, backward, the
   optimizer step at the end of the window), ``train.global_batch`` = the authors' global
   batch on 1 process, ``train.batch_size`` = their per-replica batch, so each accumulated
   batch is one of their replicas;
4. compares the inputs (view, ET view, the 2 x 2 tiles, the plain view's predictions, the
   ET targets), per step the loss terms of each replica / accumulated batch (relative
   difference), the gradients (vitpcm's mean x replicas vs the sum Keras applies: max
   |difference| / max |Keras|, per tensor group), and the weights after each step in units
   of that step's lr: max over elements of |w_vitpcm - w_keras| / lr, per tensor group.
   Targets: every element within 0.05 lr after every step, losses within 1e-5 relative.
   ``max_dw_over_peak_lr`` measures the same difference in units of the largest lr the
   group has been stepped with (a warm-up difference carried into fine-tuning, lr 10x
   smaller, counts 10x in that phase's lr). The floor: Adam's first step moves an element by
   lr g / (|g| + 1e-7 / sqrt(1 - beta2)), so float32 noise dg in the (summed) gradient moves
   an element with |g| << 3.2e-6 by up to lr dg / 3.2e-6; on ViT-S, |dg| ~ 2e-7 (6e-7 of the
   largest gradient) gives 0.009 to 0.066 lr at step 1 depending on torch's thread count.

Variants (``--variants``): ``keras`` (the presets: ``train.adam_epsilon=keras
train.summed_replicas=4``), ``torch`` (``adam_epsilon=torch``), ``mean`` (Keras's epsilon
on the mean gradient: ``summed_replicas=1``), ``preset`` (no train.* override: for a run on
another vitpcm version, ``PYTHONPATH=<its checkout>/src``); only the first decides the exit
status. ``--two-processes`` replays the first variant once more on 2 processes (torchrun,
gloo, DDP; 2 accumulated batches each, ``train.global_batch`` unchanged).

Writes ``benchmarks/results/keras_train_step.json`` and prints a table. Run from the
repository root in vitpcm's environment, with a TensorFlow environment and a checkout of
the authors' repository beside it::

    /tmp/tfvenv/bin/pip install -r benchmarks/keras_reference/requirements.txt
    git clone https://github.com/deepplants/ViT-PCM /tmp/authors    # at 1fea66f
    .venv/bin/python benchmarks/keras_reference/train_step_check.py --tf-python /tmp/tfvenv/bin/python \\
        --authors /tmp/authors --archs tiny s --variants keras torch mean
    # the committed CI fixture (tests/fixtures/keras_train_tiny.h5 + keras_train_tiny.npz):
    .venv/bin/python benchmarks/keras_reference/train_step_check.py --tf-python /tmp/tfvenv/bin/python \\
        --authors /tmp/authors --archs tiny --variants keras --fixture
    # keep the Keras side's files (--keep DIR) and reuse them (--reuse) for further variants:
    .venv/bin/python benchmarks/keras_reference/train_step_check.py --archs tiny --variants keras \\
        --keep /tmp/tsc --reuse --two-processes --out benchmarks/results/keras_train_step_2proc.json
    # vitpcm before issue 17 (1feac98) against the same Keras steps:
    mkdir -p /tmp/old && git archive 1feac98 src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/keras_reference/train_step_check.py --archs tiny \\
        --variants preset --keep /tmp/tsc --reuse --out benchmarks/results/keras_train_step_before_1feac98.json

On 2 busy CPU cores: the Keras side ~5 min (tiny) / ~25 min (s), mostly tracing the replicated
step once per phase; vitpcm's replay seconds (tiny) / minutes (s) per variant.

``tests/engine/test_keras_train_step.py`` imports :func:`replay` and :func:`compare_step`
from this file (no TensorFlow needed there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WEIGHT_TOL = 0.05  # in units of the step's lr
LOSS_TOL = 1e-5  # relative
REPLICAS = 4

#: vitpcm overrides that build each architecture of keras_vitpcm.ARCHS on the voc12 preset (check.py's)
ARCH_OVERRIDES = {
    "tiny": [
        "model.backbone=vit_small_patch16_384", "model.backbone_kwargs.embed_dim=32",
        "model.backbone_kwargs.depth=2", "model.backbone_kwargs.num_heads=2",
        "model.backbone_kwargs.mlp_ratio=2", "model.lstm_hidden=8",
    ],
    "s": ["model.backbone=vit_small_patch16_384"],
}  # fmt: skip
#: blocks unfrozen in the fine-tuning phase (the preset's 5; the tiny model has 2 blocks)
UNFREEZE = {"tiny": 1, "s": 5}
#: the run: dropout off (the Keras side builds every rate as 0), colour jitter off, records with crops
RUN_OVERRIDES = [
    "model.dropout=0", "model.backbone_dropout=0", "model.lstm_dropout=0",
    "augment.brightness=0", "augment.contrast=[1.0,1.0]", "augment.saturation=[1.0,1.0]",
    "augment.hue=0", "augment.grayscale=0", "augment.crop=0.5", "train.device=cpu", "train.threads=0",
]  # fmt: skip
VARIANTS = {
    "keras": ["train.adam_epsilon=keras", f"train.summed_replicas={REPLICAS}"],
    "torch": ["train.adam_epsilon=torch", f"train.summed_replicas={REPLICAS}"],
    "mean": ["train.adam_epsilon=keras", "train.summed_replicas=1"],
    "preset": [],  # whatever the voc12 preset says (for a run on an older vitpcm: PYTHONPATH=<old>/src)
}
GROUPS = ("backbone_other", "backbone_blocks", "final_norm", "lstm_weights", "lstm_biases", "classifier")


def group_of(key: str) -> str:
    if key.startswith("backbone.blocks."):
        return "backbone_blocks"
    if key.startswith("backbone.norm."):
        return "final_norm"
    if key.startswith("backbone."):
        return "backbone_other"
    if key.startswith("classifier."):
        return "classifier"
    return "lstm_biases" if ".bias_" in key else "lstm_weights"


# --------------------------------------------------------------------------- the batch
def make_batch(seed: int, n: int, hw: Tuple[int, int], classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images ``[n, H, W, 3]`` (colour blobs: a coarse grid bilinearly enlarged, a
    little noise) and multi-hot tags ``[n, classes]`` (background + 1 or 2 classes)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (n, 3, 5, 6)).astype(np.float32))
    up = torch.nn.functional.interpolate(coarse, size=hw, mode="bilinear", align_corners=False).numpy()
    images = np.clip(np.rint(up + rng.normal(0, 6, up.shape)), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    labels = np.zeros((n, classes), np.float32)
    labels[:, 0] = 1.0
    for i in range(n):
        labels[i, rng.choice(np.arange(1, classes), size=1 + i % 2, replace=False)] = 1.0
    return np.ascontiguousarray(images), labels


def build_transform(cfg: Any, patch: int, mean: Sequence[float], std: Sequence[float]):
    """The training transform exactly as ``PcmTask.setup`` builds it (deferred: pixels in ``finish``)."""
    from vitpcm.data.transforms import TagRule, TrainTransform

    ac, tags = bool(cfg.input.align_corners), TagRule.from_config(cfg)
    return TrainTransform(cfg.input.train_size, cfg.input.et_crop, cfg.input.et_scale, patch, cfg.augment,
                          mean=mean, std=std, align_corners=ac, tags=tags, defer=True)  # fmt: skip


def samples(images: np.ndarray, labels: np.ndarray) -> List[Dict[str, Any]]:
    return [
        {"image": torch.from_numpy(im).permute(2, 0, 1).contiguous(), "labels": torch.from_numpy(lab),
         "name": f"img{i:02d}", "size": (im.shape[0], im.shape[1]), "mask": None}
        for i, (im, lab) in enumerate(zip(images, labels))
    ]  # fmt: skip


def draw_records(transform: Any, images: np.ndarray, labels: np.ndarray, seed: int) -> Dict[str, np.ndarray]:
    """vitpcm's records for each image: ``flips`` [n, 3], ``et_box`` [n, 4], ``et_flips`` [n, 3]."""
    torch.manual_seed(seed)
    drawn = [transform.draw(s) for s in samples(images, labels)]
    return {k: torch.stack([d[k] for d in drawn]).numpy() for k in ("flips", "et_box", "et_flips")}


def authors_affine(records: Dict[str, np.ndarray], size: int, scale: int, crop: int) -> Tuple[np.ndarray, np.ndarray]:
    """vitpcm's records -> the authors' AFFINE / AFFINE_ET (``utils.affine_transform``): view 1
    has no box and no resize; the ET view's box is (y1, x1, y2, x2) when cropped, else zeros,
    and its resize is (scale, scale) unless a crop is already at the scale."""
    n = len(records["flips"])
    affine = np.zeros((n, 9), np.float32)
    affine[:, :3] = records["flips"]
    affine_et = np.zeros((n, 9), np.float32)
    affine_et[:, :3] = records["et_flips"]
    for i, box in enumerate(records["et_box"]):
        cropped = tuple(int(v) for v in box) != (0, 0, size, size)
        if cropped:
            affine_et[i, 3:7] = box
        if not (cropped and crop == scale):
            affine_et[i, 7:] = scale
    return affine, affine_et


# --------------------------------------------------------------------------- vitpcm's steps
def _stepper(task: Any, cfg: Any, ctx: Any) -> Any:
    """The trainer's own step (``engine.step.Stepper``, its loss guard included) on
    ``task.model``, without a data loader or a run folder."""
    from vitpcm.engine.guards import DivergenceGuard
    from vitpcm.engine.step import Stepper

    return Stepper(task, ctx, DivergenceGuard(task, ctx, float(cfg.train.max_loss)))


def replay(
    run: Path,
    overrides: Sequence[str],
    images: np.ndarray,
    labels: np.ndarray,
    records: Dict[str, np.ndarray],
    warmup_steps: int,
    finetune_steps: int,
    keep: Optional[Sequence[str]] = None,
    probe: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Dict[str, Any]:
    """vitpcm's training steps on the imported run ``run`` (config + ``overrides``), the global
    batch ``images`` / ``labels`` with ``records``. Returns per step: ``terms`` (per accumulated
    batch), ``lr``, ``phase``, ``grads`` (the summed mean gradient of the window) and ``weights``
    (state dict after the step; only ``keep`` keys when given). ``probe``: also the inputs,
    the plain view's predictions and the ET targets before step 1. ``rank`` / ``world``: one of
    ``world`` processes (``torch.distributed`` initialised, ``WORLD_SIZE`` set, as under
    torchrun), which takes its share of the global batch as the trainer's sampler would
    (process r: accumulated batches r * accumulate ...) and trains through DDP."""
    import vitpcm
    from vitpcm.config import load_saved_config
    from vitpcm.data.transforms import collate, tile_views
    from vitpcm.engine.distributed import Dist
    from vitpcm.engine.task import EngineContext
    from vitpcm.models.backbone import resolve_normalisation
    from vitpcm.runs import RunLayout
    from vitpcm.tasks.pcm import PcmTask, et_targets, train_batch_plan

    model, info = vitpcm.load_run(run)
    cfg = load_saved_config(Path(run) / "config.yaml", list(overrides))
    ctx = EngineContext(device=torch.device("cpu"), dist=Dist(rank=rank, world=world, local_rank=rank),
                        run=RunLayout(Path(run)), progress=False)  # fmt: skip
    task = PcmTask(cfg)
    task.model, task.classes = model, list(info["classes"])
    mean, std = resolve_normalisation(cfg, model.adapter)
    task.train_transform = build_transform(cfg, model.patch_size, mean, std)
    task.et_grid = int(cfg.input.et_scale) // model.patch_size
    batch_size, accumulate = train_batch_plan(cfg)

    drawn = []
    for i, s in enumerate(samples(images, labels)):
        d = task.train_transform.draw(s)  # jitter draws (off), tags; the records are set below
        d["flips"] = torch.as_tensor(records["flips"][i]).bool()
        d["et_box"] = torch.as_tensor(records["et_box"][i]).long()
        d["et_flips"] = torch.as_tensor(records["et_flips"][i]).bool()
        drawn.append(d)
    n = len(drawn)
    if n != batch_size * accumulate * world:
        raise ValueError(f"{n} images, but train.global_batch plans {batch_size} x {accumulate} x {world} processes")
    first = rank * accumulate  # this process's accumulated batches (the authors' replicas first .. first + accumulate)
    batches = [collate(drawn[r * batch_size : (r + 1) * batch_size]) for r in range(first, first + accumulate)]

    out: Dict[str, Any] = {"batch_size": batch_size, "accumulate": accumulate, "world": world, "steps": []}
    if probe:
        with torch.no_grad():
            fin = task.train_transform.finish(collate(drawn))
            probs = model(fin["image"])["probs"]
            out["image"] = fin["image"].permute(0, 2, 3, 1).numpy()
            out["image_et"] = fin["image_et"].permute(0, 2, 3, 1).numpy()
            out["merged"] = torch.cat([tile_views(fin["image_et"][r * batch_size : (r + 1) * batch_size])[0]
                                       for r in range(accumulate)]).permute(0, 2, 3, 1).numpy()  # fmt: skip
            out["preds"] = probs.permute(0, 2, 3, 1).numpy()
            tg = et_targets(probs, fin["labels"], fin["flips"], fin["et_box"], fin["et_flips"], model.patch_size,
                            task.et_grid, merge=str(cfg.loss.et_merge), align_corners=bool(cfg.input.align_corners))  # fmt: skip
            out["et_targets"] = tg.permute(0, 2, 3, 1).numpy()
        out["bias_hh_trainable"] = any(p.requires_grad for k, p in model.named_parameters() if ".bias_hh" in k)
        out["optimizer"] = None

    stepper = _stepper(task, cfg, ctx)
    plan = [(0, k) for k in range(warmup_steps)] + [(int(cfg.train.warmup_epochs), k) for k in range(finetune_steps)]
    global_step = 0
    epoch_now = None
    for epoch, k in plan:
        if epoch != epoch_now:
            stepper.enter_phase(epoch)  # param groups + a fresh optimizer (make_optimizer)
            task.train_mode(model)
            epoch_now = epoch
            steps_in_phase = (warmup_steps if epoch == 0 else finetune_steps) * accumulate
            if probe:
                out["optimizer"] = type(stepper.optimizer).__name__
        terms = []
        for r in range(accumulate):
            global_step += 1
            rec = stepper.training_step(batches[r], epoch, k * accumulate + r, steps_in_phase, global_step)
            terms.append(rec)
        grads = {n_: p.grad.detach().clone() for n_, p in model.named_parameters() if p.grad is not None}
        state = {k_: v.detach().clone() for k_, v in model.state_dict().items() if keep is None or k_ in keep}
        out["steps"].append({"terms": terms, "lr": float(stepper.lr), "phase": stepper.phase.name,
                             "grads": grads, "weights": state,
                             "trainable": sum(1 for p in model.parameters() if p.requires_grad)})  # fmt: skip
    return out


# --------------------------------------------------------------------------- comparisons
def _effective(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The LSTM bias the cell uses (``bias_ih + bias_hh``) under the ``bias_ih`` key; ``bias_hh`` dropped."""
    out = {}
    for k, v in state.items():
        if ".bias_hh_l0" in k:
            continue
        if ".bias_ih_l0" in k:
            hh = state.get(k.replace(".bias_ih_l0", ".bias_hh_l0"))
            v = v if hh is None else v + hh
        out[k] = v
    return out


def compare_step(
    mine: Dict[str, Any], keras_weights: Dict[str, torch.Tensor], keras_losses: Dict[str, np.ndarray],
    keras_grads: Optional[Dict[str, torch.Tensor]] = None, replicas: int = REPLICAS,
) -> Dict[str, Any]:  # fmt: skip
    """One step of :func:`replay` against Keras's (weights mapped to vitpcm keys, per-replica losses)."""
    lr = mine["lr"]
    row: Dict[str, Any] = {"phase": mine["phase"], "lr": lr}
    losses = {}
    for ours, theirs in (("mce", "bce_loss"), ("reg", "reg_loss"), ("et", "cce_loss")):
        a = np.array([t[ours] for t in mine["terms"]], np.float64)
        b = np.asarray(keras_losses[theirs], np.float64)
        losses[ours] = {
            "vitpcm": a.tolist(),
            "keras": b.tolist(),
            "max_rel_diff": float(np.max(np.abs(a - b) / np.abs(b))),
        }
    row["losses"] = losses
    row["loss_max_rel_diff"] = max(v["max_rel_diff"] for v in losses.values())
    ours_w, theirs_w = _effective(mine["weights"]), _effective(keras_weights)
    weights: Dict[str, Dict[str, float]] = {}
    for k, w in ours_w.items():
        if k not in theirs_w:
            continue
        d = (w.double() - theirs_w[k].double()).abs()
        g = weights.setdefault(group_of(k), {"max_dw_over_lr": 0.0, "elements": 0, "over_tol": 0, "over_0.01lr": 0})
        g["max_dw_over_lr"] = max(g["max_dw_over_lr"], float(d.max()) / lr)
        g["elements"] += d.numel()
        g["over_tol"] += int((d > WEIGHT_TOL * lr).sum())
        g["over_0.01lr"] += int((d > 0.01 * lr).sum())
    row["weights"] = weights
    row["max_dw_over_lr"] = max(g["max_dw_over_lr"] for g in weights.values())
    if keras_grads is not None:
        grads: Dict[str, Dict[str, float]] = {}
        # a tensor vitpcm trains that the authors' model does not have (before 598bb12: bias_hh)
        row["trained_not_in_keras"] = sorted(k for k in mine["grads"] if ".bias_hh_l0" in k or k not in keras_grads)
        for k, gv in mine["grads"].items():
            if k not in keras_grads or ".bias_hh_l0" in k:
                continue
            theirs = keras_grads[k].double()
            d = float((gv.double() * replicas - theirs).abs().max())
            g = grads.setdefault(group_of(k), {"max_abs_diff": 0.0, "max_abs_keras": 0.0, "tensors": 0})
            g["max_abs_diff"] = max(g["max_abs_diff"], d)
            g["max_abs_keras"] = max(g["max_abs_keras"], float(theirs.abs().max()))
            g["tensors"] += 1
        for g in grads.values():
            g["rel_diff"] = g["max_abs_diff"] / max(g["max_abs_keras"], 1e-30)
        row["grads"] = grads
        row["grad_max_rel_diff"] = max((g["rel_diff"] for g in grads.values()), default=0.0)
    row["pass"] = bool(row["max_dw_over_lr"] <= WEIGHT_TOL and row["loss_max_rel_diff"] <= LOSS_TOL)
    return row


#: groups trained from the first (warm-up) step; the others only after unfreeze()
WARMUP_GROUPS = ("lstm_weights", "lstm_biases", "classifier")


def add_peak_lr(rows: List[Dict[str, Any]]) -> None:
    """Each row's ``max_dw_over_peak_lr`` per group: max |w_vitpcm - w_keras| in units of the
    largest lr that group has been stepped with so far. A difference made at a warm-up step
    (lr 1e-3) and carried, unchanged, into the fine-tuning phase counts 10x in that phase's lr
    (``max_dw_over_lr``) but the same here. Also ``pass_peak_lr``."""
    peak: Dict[str, float] = {}
    for r in rows:
        for g in r["weights"]:
            if g in WARMUP_GROUPS or r["phase"] != "warmup":
                peak[g] = max(peak.get(g, 0.0), r["lr"])
        r["max_dw_over_peak_lr"] = {
            g: v["max_dw_over_lr"] * r["lr"] / peak[g] for g, v in r["weights"].items() if g in peak
        }  # fmt: skip
        r["pass_peak_lr"] = bool(max(r["max_dw_over_peak_lr"].values(), default=0.0) <= WEIGHT_TOL
                                 and r["loss_max_rel_diff"] <= LOSS_TOL)  # fmt: skip


def keras_state(h5: Path) -> Dict[str, torch.Tensor]:
    from vitpcm.models.keras_import import keras_to_state_dict, read_keras_h5

    return keras_to_state_dict(read_keras_h5(h5))


def compare_inputs(mine: Dict[str, Any], ref: Dict[str, np.ndarray]) -> Dict[str, float]:
    return {k: float(np.abs(mine[k] - ref[k]).max()) for k in ("image", "image_et", "merged", "preds", "et_targets")}


# --------------------------------------------------------------------------- driver
def keras_side(args: Any, arch: str, batch_npz: Path, out: Path, size: int, scale: int) -> float:
    start = time.time()
    cmd = [args.tf_python, str(HERE / "keras_train_step.py"), "--authors", args.authors, "--arch", arch,
           "--batch-npz", str(batch_npz), "--out", str(out), "--replicas", str(REPLICAS),
           "--warmup-steps", str(args.warmup_steps), "--finetune-steps", str(args.finetune_steps),
           "--lr-warmup", str(args.lr_warmup), "--lr", str(args.lr), "--unfreeze", str(UNFREEZE[arch]),
           "--size", str(size), "--scale", str(scale), "--seed", str(args.seed)]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"Keras side failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    print("\n".join("  keras " + line for line in done.stdout.splitlines() if line.startswith("step")))
    return time.time() - start


def trainer_overrides(arch: str, args: Any) -> List[str]:
    return [f"train.unfreeze_blocks={UNFREEZE[arch]}", f"train.warmup_lr={args.lr_warmup}", f"train.lr={args.lr}",
            f"train.batch_size={args.per_replica}", f"train.global_batch={args.per_replica * REPLICAS}",
            "train.schedule=constant"]  # fmt: skip


def print_table(arch: str, variant: str, rows: List[Dict[str, Any]]) -> None:
    print(f"\n{arch} / {variant}: per step, loss rel diff (mce, et, reg), grad rel diff, max |dw| / lr per group")
    head = "step phase     lr      L_MCE    L_ET     L_REG    grad     " + " ".join(f"{g[:14]:>14}" for g in GROUPS)
    print(head)
    for k, r in enumerate(rows, 1):
        ls = r["losses"]
        cells = " ".join(
            f"{r['weights'][g]['max_dw_over_lr']:14.4f}" if g in r["weights"] else f"{'-':>14}" for g in GROUPS
        )
        grad = f"{r.get('grad_max_rel_diff', float('nan')):.1e}"
        peak = max(r.get("max_dw_over_peak_lr", {}).values(), default=float("nan"))
        print(f"{k:4d} {r['phase']:9s} {r['lr']:.0e} {ls['mce']['max_rel_diff']:.1e}  {ls['et']['max_rel_diff']:.1e}  "
              f"{ls['reg']['max_rel_diff']:.1e}  {grad:8s} {cells} {'PASS' if r['pass'] else 'FAIL'}"
              f"  (peak-lr units {peak:.4f})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description="Keras train_step vs vitpcm train step, side by side")
    p.add_argument("--tf-python", default=os.environ.get("VITPCM_TF_PYTHON", "/tmp/tfvenv/bin/python"))
    p.add_argument("--authors", default=os.environ.get("VITPCM_AUTHORS", "/tmp/authors"),
                   help="a checkout of deepplants/ViT-PCM (model.py, utils.py), put on the TF side's sys.path")  # fmt: skip
    p.add_argument("--archs", nargs="+", default=["tiny", "s"], choices=sorted(ARCH_OVERRIDES))
    p.add_argument("--variants", nargs="+", default=["keras", "torch", "mean"], choices=sorted(VARIANTS))
    p.add_argument(
        "--per-replica", type=int, default=4, help="images per replica (a multiple of 4: the 2 x 2 ET tiles)"
    )
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=3)
    p.add_argument("--lr-warmup", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--raw-size", type=int, nargs=2, default=[375, 500], help="H W of the images before the resize to 384"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixture", action="store_true", help="(with --archs tiny) write tests/fixtures/keras_train_tiny.*")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "keras_train_step.json"))
    p.add_argument("--keep", help="keep the working folder here (the Keras .h5 files)")
    p.add_argument("--reuse", action="store_true", help="(with --keep) reuse the Keras side's output found there")
    p.add_argument(
        "--two-processes",
        action="store_true",
        help="also the first variant on 2 processes (torchrun, gloo, DDP; 2 accumulated batches each)",
    )
    p.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_worker:
        ddp_worker(Path(args.ddp_worker), "", args.warmup_steps, args.finetune_steps)
        return
    if args.fixture and args.archs != ["tiny"]:
        sys.exit("--fixture writes the tiny model only: use --archs tiny")
    if not Path(args.tf_python).exists():
        sys.exit(f"{args.tf_python} not found: create the TensorFlow environment (see this file's docstring)")
    if not (Path(args.authors) / "model.py").is_file():
        sys.exit(f"{args.authors}/model.py not found: check out deepplants/ViT-PCM there (see this file's docstring)")
    if args.fixture:
        args.raw_size = [40, 56]  # a small fixture: the resize to 384 enlarges, both sides alike

    from vitpcm.config import load_config
    from vitpcm.stages.import_keras import import_keras

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    versions = subprocess.run([args.tf_python, "-c", "import tensorflow as tf, tf_keras; print(tf.__version__, tf_keras.__version__)"],
                              capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout.split()  # fmt: skip
    results: Dict[str, Any] = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "targets": {"max_dw_over_lr": WEIGHT_TOL, "loss_max_rel_diff": LOSS_TOL},
        "versions": {"tensorflow": versions[0] if versions else None,
                     "tf_keras": versions[1] if len(versions) > 1 else None, "torch": torch.__version__},
        "vitpcm_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip(),
        "vitpcm_worktree_dirty": bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"],
                                                     capture_output=True, text=True).stdout.strip()),
        "vitpcm_source": str(Path(__import__("vitpcm").__file__).parent),  # PYTHONPATH=<old>/src: another version
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "setup": {"replicas": REPLICAS, "per_replica": args.per_replica, "warmup_steps": args.warmup_steps,
                  "finetune_steps": args.finetune_steps, "lr_warmup": args.lr_warmup, "lr": args.lr,
                  "raw_size": args.raw_size, "run_overrides": RUN_OVERRIDES},
        "archs": {},
    }  # fmt: skip
    ok = True
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="keras_train_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for arch in args.archs:
            cfg = load_config("voc12", ARCH_OVERRIDES[arch] + RUN_OVERRIDES)
            n = args.per_replica * REPLICAS
            images, labels = make_batch(args.seed, n, tuple(args.raw_size), 21)
            transform = build_transform(cfg, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # records only: no pixels
            records = draw_records(transform, images, labels, args.seed)
            size, scale, crop = int(cfg.input.train_size), int(cfg.input.et_scale), int(cfg.input.et_crop)
            affine, affine_et = authors_affine(records, size, scale, crop)
            work = tmp / arch
            work.mkdir(exist_ok=True)
            batch_npz = work / "batch.npz"
            np.savez(batch_npz, images=images, labels=labels, affine=affine, affine_et=affine_et,
                     **{f"record_{k}": v for k, v in records.items()})  # fmt: skip
            print(
                f"{arch}: {n} images {tuple(args.raw_size)}, ET crops on {int((affine_et[:, 3:7] > 0).any(1).sum())}; Keras side ..."
            )
            if args.reuse and (work / "keras" / "steps.npz").is_file():
                keras_seconds = 0.0
            else:
                keras_seconds = keras_side(args, arch, batch_npz, work / "keras", size, scale)
            ref = dict(np.load(work / "keras" / "steps.npz"))
            run = work / "run"
            if run.exists():
                shutil.rmtree(run)
            import_keras(work / "keras" / "init.h5", "voc12", ARCH_OVERRIDES[arch] + RUN_OVERRIDES, run)
            steps = args.warmup_steps + args.finetune_steps
            kw = [keras_state(work / "keras" / f"weights_{k}.h5") for k in range(1, steps + 1)]
            kg = [keras_state(work / "keras" / f"grads_{k}.h5") for k in range(1, steps + 1)]
            entry: Dict[str, Any] = {"keras_seconds": round(keras_seconds, 1), "records": {k: v.tolist() for k, v in records.items()},
                                     "keras_losses_mean": {k: ref[k].mean(1).tolist() for k in ("bce_loss", "cce_loss", "reg_loss", "loss")},
                                     "variants": {}}  # fmt: skip
            for i, variant in enumerate(args.variants):
                start = time.time()
                overrides = RUN_OVERRIDES + trainer_overrides(arch, args) + VARIANTS[variant]
                mine = replay(
                    run, overrides, images, labels, records, args.warmup_steps, args.finetune_steps, probe=True
                )
                rows = [compare_step(s, kw[k], {key: ref[key][k] for key in ("bce_loss", "reg_loss", "cce_loss")}, kg[k])
                        for k, s in enumerate(mine["steps"])]  # fmt: skip
                add_peak_lr(rows)
                v = {"overrides": VARIANTS[variant], "optimizer": mine["optimizer"],
                     "bias_hh_trainable": mine["bias_hh_trainable"], "accumulate": mine["accumulate"],
                     "inputs_max_abs_diff": compare_inputs(mine, ref), "steps": rows,
                     "pass": all(r["pass"] for r in rows), "seconds": round(time.time() - start, 1)}  # fmt: skip
                entry["variants"][variant] = v
                if i == 0:
                    ok &= v["pass"]
                print(f"\n{arch} / {variant}: optimizer {v['optimizer']}, bias_hh trainable {v['bias_hh_trainable']}, "
                      f"inputs " + ", ".join(f"{k} {d:.1e}" for k, d in v["inputs_max_abs_diff"].items()))  # fmt: skip
                print_table(arch, variant, rows)
                if args.fixture and variant == "keras":
                    write_fixture(work, arch, images, labels, records, args, kw, ref, mine)
            if args.two_processes:
                start = time.time()
                variant = args.variants[0]
                mine = replay_two_processes(
                    work, RUN_OVERRIDES + trainer_overrides(arch, args) + VARIANTS[variant], args
                )
                rows = [compare_step(s, kw[k], {key: ref[key][k] for key in ("bce_loss", "reg_loss", "cce_loss")}, kg[k])
                        for k, s in enumerate(mine["steps"])]  # fmt: skip
                add_peak_lr(rows)
                v = {"overrides": VARIANTS[variant], "processes": 2, "accumulate": mine["accumulate"], "steps": rows,
                     "pass": all(r["pass"] for r in rows), "seconds": round(time.time() - start, 1)}  # fmt: skip
                entry["variants"][f"{variant}_2proc"] = v
                ok &= v["pass"]
                print_table(arch, f"{variant}, 2 processes (torchrun, gloo) x {mine['accumulate']} accumulated", rows)
            results["archs"][arch] = entry
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["pass"] = bool(ok)
    if not args.fixture:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    sys.exit(0 if ok else 1)


def ddp_worker(work: Path, variant: str, warmup_steps: int, finetune_steps: int) -> None:
    """One process of the 2-process replay (under torchrun, gloo): writes ``ddp_rank<r>.pt``."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    b = dict(np.load(work / "batch.npz"))
    records = {k: b[f"record_{k}"] for k in ("flips", "et_box", "et_flips")}
    overrides = json.loads((work / "ddp_overrides.json").read_text())
    mine = replay(work / "run", overrides, b["images"], b["labels"], records, warmup_steps, finetune_steps,
                  rank=rank, world=world)  # fmt: skip
    torch.save(mine, work / f"ddp_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def replay_two_processes(work: Path, overrides: List[str], args: Any) -> Dict[str, Any]:
    """:func:`replay` on 2 processes (torchrun, gloo, DDP): rank 0's weights and gradients; the
    loss terms of both ranks in replica order."""
    (work / "ddp_overrides.json").write_text(json.dumps(overrides))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(Path(__file__).resolve()), "--ddp-worker", str(work), "--warmup-steps", str(args.warmup_steps),
           "--finetune-steps", str(args.finetune_steps)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if done.returncode:
        raise RuntimeError(f"2-process replay failed:\n{done.stderr[-4000:]}")
    ranks = [torch.load(work / f"ddp_rank{r}.pt", weights_only=False) for r in range(2)]
    mine = ranks[0]
    for k, step in enumerate(mine["steps"]):
        step["terms"] = step["terms"] + ranks[1]["steps"][k]["terms"]
    return mine


def write_fixture(work: Path, arch: str, images, labels, records, args, kw, ref, mine) -> None:
    """``tests/fixtures/keras_train_tiny.h5`` (the initial Keras weights) and ``.npz``: the batch,
    the records, the settings, per step Keras's per-replica losses and the weights after the step
    (vitpcm keys, only the tensors some phase trains)."""
    fixtures = ROOT / "tests" / "fixtures"
    fixtures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "keras" / "init.h5", fixtures / "keras_train_tiny.h5")
    trained = sorted({k for s in mine["steps"] for k in s["grads"]} | {k.replace(".bias_ih_l0", ".bias_hh_l0")
                      for s in mine["steps"] for k in s["grads"] if ".bias_ih_l0" in k})  # fmt: skip
    keep: Dict[str, Any] = {
        "images": images, "labels": labels, **{f"record_{k}": v for k, v in records.items()},
        "arch_overrides": np.array(ARCH_OVERRIDES[arch]), "run_overrides": np.array(RUN_OVERRIDES),
        "trainer_overrides": np.array(trainer_overrides(arch, args)),
        "warmup_steps": np.array(args.warmup_steps), "finetune_steps": np.array(args.finetune_steps),
        "replicas": np.array(REPLICAS), "keys": np.array(trained),
    }  # fmt: skip
    for key in ("bce_loss", "reg_loss", "cce_loss"):
        keep[key] = ref[key]
    for k, state in enumerate(kw, 1):
        for name in trained:
            if name in state:
                keep[f"step{k}/{name}"] = state[name].numpy()
    np.savez_compressed(fixtures / "keras_train_tiny.npz", **keep)
    size = (fixtures / "keras_train_tiny.npz").stat().st_size
    print(
        f"wrote {fixtures / 'keras_train_tiny.h5'} ({(work / 'keras' / 'init.h5').stat().st_size} bytes) and keras_train_tiny.npz ({size} bytes)"
    )


if __name__ == "__main__":
    main()
