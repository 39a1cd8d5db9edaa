"""Checks of a loaded config that types alone cannot express, and of its sizes against a patch size."""

from __future__ import annotations

from typing import List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from vitpcm.crf_params import CRFParams
from vitpcm.errors import VitpcmError


def validate_config(cfg: DictConfig) -> None:
    """Check cross-field constraints that types alone cannot express."""
    inp = cfg.input
    for name in ("train_size", "et_crop", "et_scale"):
        if int(inp[name]) <= 0:
            raise VitpcmError(f"input.{name} must be positive, got {inp[name]}")
    if 2 * inp.et_scale != inp.train_size:
        raise VitpcmError(
            f"input.et_scale ({inp.et_scale}) must be half of input.train_size ({inp.train_size}):"
            " four ET views are tiled 2 x 2 into one training input"
        )
    if inp.et_crop > inp.train_size:
        raise VitpcmError(f"input.et_crop ({inp.et_crop}) must not exceed input.train_size ({inp.train_size})")
    if cfg.train.epochs < 1 or cfg.train.warmup_epochs < 0 or cfg.train.warmup_epochs > cfg.train.epochs:
        raise VitpcmError(
            f"need 1 <= train.epochs and 0 <= train.warmup_epochs <= train.epochs,"
            f" got epochs={cfg.train.epochs} warmup_epochs={cfg.train.warmup_epochs}"
        )
    if cfg.model.pos_embed_resize not in ("timm", "tf"):
        raise VitpcmError(f"model.pos_embed_resize must be timm or tf, got {cfg.model.pos_embed_resize!r}")
    if cfg.loss.et_merge not in ("after", "before"):
        raise VitpcmError(f"loss.et_merge must be after or before, got {cfg.loss.et_merge!r}")
    if cfg.train.schedule not in ("constant", "cosine"):
        raise VitpcmError(f"train.schedule must be constant or cosine, got {cfg.train.schedule!r}")
    if cfg.train.batch_size < 1:
        raise VitpcmError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if cfg.train.summed_replicas < 1:
        raise VitpcmError(
            f"train.summed_replicas must be >= 1 (1 = the mean gradient), got {cfg.train.summed_replicas}"
        )
    for key in ("checkpoint_every", "max_loss"):
        if cfg.train[key] < 0:
            raise VitpcmError(f"train.{key} must be >= 0 (0 = off), got {cfg.train[key]}")
    for key, allowed in (
        ("data.background_tag", ("always", "from_mask")),
        ("data.tags_from", ("original", "resized")),
        ("data.coco_gt", ("vitpcm", "authors")),
        ("data.transforms_on", ("auto", "loader", "device")),
        ("augment.jitter_space", ("clamped", "authors")),
        ("train.adam_epsilon", ("torch", "keras")),
        ("infer.probs_resize", ("mask", "skimage")),
        ("data.jpeg_decoder", ("pillow", "tf")),
    ):
        if str(OmegaConf.select(cfg, key)) not in allowed:
            raise VitpcmError(f"{key} must be {' or '.join(allowed)}, got {OmegaConf.select(cfg, key)!r}")
    for key in ("model.backbone_dropout", "model.lstm_dropout"):
        if not 0.0 <= float(OmegaConf.select(cfg, key)) < 1.0:
            raise VitpcmError(f"{key} must lie in [0, 1), got {OmegaConf.select(cfg, key)}")
    if cfg.train.global_batch < 0:
        raise VitpcmError(
            f"train.global_batch must be >= 0 (0 = batch_size x world size), got {cfg.train.global_batch}"
        )
    if cfg.data.format not in ("voc", "coco", "folder"):
        raise VitpcmError(f"data.format must be voc, coco or folder, got {cfg.data.format!r}")
    if not (cfg.loss.mce or cfg.loss.et):
        raise VitpcmError("at least one of loss.mce and loss.et must be true")
    if not cfg.infer.tta_scales or any(float(s) <= 0 for s in cfg.infer.tta_scales):
        raise VitpcmError(
            f"infer.tta_scales must be a non-empty list of positive factors, got {list(cfg.infer.tta_scales)}"
        )
    for key in ("mean", "std"):
        normalisation_values(cfg, key)  # raises on a bad value
    validate_bounds(cfg)
    validate_segment(cfg)


def validate_bounds(cfg: DictConfig) -> None:
    """Big-input bounds (``infer.max_side``, ``crf.max_pixels``, ``crf.memory_budget``)."""
    from vitpcm.utils.pools import parse_size  # numpy comes with it: `import vitpcm.config` stays light

    if int(cfg.infer.max_side) < 0 or 0 < int(cfg.infer.max_side) < 64:
        raise VitpcmError(f"infer.max_side must be 0 (no bound) or at least 64, got {cfg.infer.max_side}")
    for key in ("batch_size", "writers"):
        if int(cfg.infer[key]) < 0:
            raise VitpcmError(f"infer.{key} must be 0 (auto) or a positive count, got {cfg.infer[key]}")
    if int(cfg.crf.max_pixels) < 0 or 0 < int(cfg.crf.max_pixels) < 4096:
        raise VitpcmError(f"crf.max_pixels must be 0 (no bound) or at least 4096, got {cfg.crf.max_pixels}")
    parse_size(cfg.crf.memory_budget, "crf.memory_budget")  # raises on a bad value
    CRFParams.from_config(cfg.crf)  # raises on a bad crf.* value now, not after training


def validate_segment(cfg: DictConfig) -> None:
    """The ``segment`` section's cross-field checks (``vitpcm segment train``)."""
    seg = cfg.segment
    if seg.model not in ("deeplabv2", "deeplabv3plus"):
        raise VitpcmError(f"segment.model must be deeplabv2 or deeplabv3plus, got {seg.model!r}")
    if seg.loss not in ("ce", "balanced"):
        raise VitpcmError(f"segment.loss must be ce or balanced, got {seg.loss!r}")
    if seg.loss_at not in ("logits", "input"):
        raise VitpcmError(f"segment.loss_at must be logits or input, got {seg.loss_at!r}")
    if int(seg.warmup) < 0:
        raise VitpcmError(f"segment.warmup must be >= 0 (steps of the lr ramp), got {seg.warmup}")
    for key in ("crop", "batch_size", "accumulate", "iterations"):
        if int(seg[key]) < 1:
            raise VitpcmError(f"segment.{key} must be >= 1, got {seg[key]}")
    if seg.output_stride is not None and int(seg.output_stride) not in (8, 16):
        raise VitpcmError(f"segment.output_stride must be 8 or 16 (or null), got {seg.output_stride}")
    for key in ("train_scales", "test_scales"):
        if not seg[key] or any(float(s) <= 0 for s in seg[key]):
            raise VitpcmError(f"segment.{key} must be a non-empty list of positive factors, got {list(seg[key])}")
    if any(not 0 < float(s) for s in seg.msc_scales):
        raise VitpcmError(f"segment.msc_scales must hold positive factors, got {list(seg.msc_scales)}")
    if seg.rates is not None and (not seg.rates or any(int(r) < 1 for r in seg.rates)):
        raise VitpcmError(f"segment.rates must be positive dilation rates, got {list(seg.rates)}")
    for key in ("mean", "std"):
        if len(seg[key]) != 3 or (key == "std" and min(float(v) for v in seg[key]) <= 0):
            raise VitpcmError(f"segment.{key} must be three numbers for R, G, B on [0, 1] images, got {list(seg[key])}")
    if not 0.0 <= float(seg.keep_threshold) <= 1.0:
        raise VitpcmError(f"segment.keep_threshold must lie in [0, 1], got {seg.keep_threshold}")


def normalisation_values(cfg: DictConfig, key: str) -> Optional[List[float]]:
    """``input.mean`` or ``input.std`` as three floats, or ``None`` for ``auto``.

    Raises :class:`VitpcmError` for anything else (``auto`` or three numbers, std > 0).
    """
    value = cfg.input[key]
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        values = [float(v) for v in value] if isinstance(value, (list, tuple, ListConfig)) else None
    except (TypeError, ValueError):
        values = None
    if values is None or len(values) != 3:
        raise VitpcmError(
            f"input.{key} must be auto (the backbone's pretrained config) or three numbers for R, G, B on"
            f" [0, 1] images, e.g. input.{key}=[0.5,0.5,0.5]; got {OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value!r}"
        )
    if key == "std" and min(values) <= 0:
        raise VitpcmError(f"input.std must be positive, got {values}")
    return values


def resolved_normalisation(cfg: DictConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` of a prepared config, three floats each, for the transforms.

    Raises :class:`VitpcmError` when a value is still ``auto``: the backbone's values are
    filled in once, by :func:`vitpcm.stages.config.prepare_config`, before a task runs.
    """
    mean, std = normalisation_values(cfg, "mean"), normalisation_values(cfg, "std")
    if mean is None or std is None:
        raise VitpcmError(
            "input.mean / input.std are still auto: prepare the config first"
            " (vitpcm.stages.config.prepare_config fills in the backbone's values)"
        )
    return tuple(mean), tuple(std)


def _nearest_multiples(value: int, step: int) -> List[int]:
    below = value // step * step
    return [v for v in (below, below + step) if v > 0]


def check_sizes(cfg: DictConfig, patch_size: int, backbone: Optional[str] = None) -> None:
    """Check that every image side follows the backbone's patch size.

    ``input.train_size`` must be a multiple of 2 x patch (its half, ``input.et_scale``, is the
    side of an ET view), ``input.et_crop``, ``input.et_scale`` and ``infer.scale`` of the patch.
    Raises one :class:`VitpcmError` naming each wrong key and the nearest valid values, e.g.
    ``input.train_size=384 is not a multiple of 28 ...: use 364 or 392``.
    """
    d = int(patch_size)
    name = backbone or str(cfg.model.backbone)
    bad: List[Tuple[str, int, int]] = []  # (key, value, required step)
    for key, step in (("input.train_size", 2 * d), ("input.et_scale", d), ("input.et_crop", d), ("infer.scale", d)):
        value = int(OmegaConf.select(cfg, key))
        if value % step:
            bad.append((key, value, step))
    if not bad:
        return
    why = f"twice the patch size {d} of {name}, as input.et_scale = train_size / 2 must be a multiple of {d} too"

    def use(value: int, step: int) -> str:
        return "use " + " or ".join(map(str, _nearest_multiples(value, step)))

    if len(bad) == 1:
        key, value, step = bad[0]
        what = f"{step} ({why})" if step != d else f"the patch size {d} of {name}"
        raise VitpcmError(f"{key}={value} is not a multiple of {what}: {use(value, step)}")
    parts = [f"{key}={value}" + (f" (of {step}, as input.et_scale = train_size / 2)" if step != d else "") + f": {use(value, step)}"
             for key, value, step in bad]  # fmt: skip
    raise VitpcmError(f"sizes must be multiples of the patch size {d} of {name}: " + "; ".join(parts))
