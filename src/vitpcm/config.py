"""Typed configuration: one dataclass tree, YAML presets on top, dotted overrides last.

Every key has a default here, so a preset only says what differs. Unknown keys are an
error (a typo must not silently fall back to a default). Load with :func:`load_config`::

    cfg = load_config("synthetic", ["train.epochs=3", "data.root=/data/shapes"])

A preset is a YAML path or the name of a file in ``vitpcm/configs/`` (``voc12``,
``coco14``, ``synthetic``).

This module imports neither torch nor timm (``vitpcm crf`` / ``evaluate`` load configs).
What needs the backbone itself, ``input.mean`` / ``input.std: auto`` and the patch size,
is resolved by :func:`vitpcm.models.backbone.resolve_config`, which checks the sizes with
:func:`check_sizes` from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from vitpcm.crf_params import CRFParams
from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DataConfig:
    # Dataset layouts, with their folder trees: docs/datasets.md.
    # voc: VOC 2012 layout (+ SBD trainaug; also the synthetic set) | coco: COCO 2014 | folder: own images + tags
    format: str = "voc"
    root: Optional[str] = None  # voc: holds JPEGImages/; coco: annotations/ + train2014/; folder: images/ + tags.csv
    # file (one name per line, background first) or voc12 / coco14; default ROOT/classes.txt, else
    # voc: the 21 VOC names, coco: the annotation file's categories, folder: inferred from the tags
    classes: Optional[str] = None
    # voc: train | trainval | trainaug; coco: train | val; folder: all | ROOT/splits/NAME.txt
    train_split: str = "train"
    val_split: Optional[str] = "val"  # empty (data.val_split=) = no validation
    # voc trainaug: SBD release (benchmark_RELEASE) or a SegmentationClassAug folder; default ROOT/SegmentationClassAug
    sbd: Optional[str] = None
    tags: Optional[str] = None  # tag file (CSV / JSON); folder: default ROOT/tags.csv|json; voc: splits without masks
    masks: Optional[str] = None  # coco: output of `vitpcm prepare coco`, default ROOT/masks; folder: default ROOT/masks
    num_workers: int = 2


@dataclass
class InputConfig:
    # Sides are multiples of the backbone's patch size (train_size of twice it, as et_scale = n / 2).
    train_size: int = 384  # n: square side fed to the ViT in training and validation
    et_crop: int = 128  # ET view: side of the patch-aligned crop (pixels)
    et_scale: int = 192  # ET view: side after resizing; 4 views are tiled 2 x 2 into one n x n input
    # Per-channel normalisation of [0, 1] RGB, (x - mean) / std: auto = the timm model's pretrained
    # config (the authors' ViT: 0.5 / 0.5, i.e. [-1, 1]; DINO/DINOv2/DeiT: ImageNet's; CLIP/EVA-02:
    # OpenAI CLIP's), or three floats, e.g. input.mean=[0.5,0.5,0.5]. `vitpcm config` shows the values.
    mean: Any = "auto"
    std: Any = "auto"


@dataclass
class AugmentConfig:
    flip_lr: float = 0.5
    flip_ud: float = 0.5
    transpose: float = 0.5  # rot90-like: swap H and W
    crop: float = 0.3  # probability that the ET view is a crop rather than the whole image
    brightness: float = 0.2  # additive, on [0, 1] images
    contrast: List[float] = field(default_factory=lambda: [0.5, 2.0])
    saturation: List[float] = field(default_factory=lambda: [0.5, 1.5])
    hue: float = 0.1
    grayscale: float = 0.1  # probability


@dataclass
class ModelConfig:
    # A timm ViT (vit_*: original/augreg, DINO, DINOv2 incl. registers, CLIP), DeiT (deit_*) or EVA-02 (eva02_*)
    backbone: str = "vit_base_patch16_384"
    pretrained: Any = True  # True: timm weights (needs a hub); False: random; "path": local checkpoint
    # Passed to timm.create_model. An override of model.backbone drops the preset's kwargs
    # (they describe the preset's backbone) unless model.backbone_kwargs is overridden too.
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    hv_lstm: bool = True  # False: the patch classifier reads the ViT tokens directly
    lstm_hidden: int = 192  # per direction; 4 x hidden features per patch
    dropout: float = 0.2
    classifier_init_std: float = 0.05
    init_from: Optional[str] = None  # a vitpcm checkpoint to start from (same classes)


@dataclass
class LossConfig:
    mce: bool = True  # Eq. 1, BCE on the max-pooled predictions
    et: bool = True  # equivariant-transformation consistency on the tiled view
    reg: bool = True  # L2 on the patch classifier
    et_weight: float = 1.0
    # ET targets: merge the tags "after" mapping view 1 onto the crop (the authors) or
    # "before" (on the whole view, where image tags hold; a crop missing an object keeps it low)
    et_merge: str = "after"
    reg_weight: float = 0.01  # the authors' keras L2(0.01): 0.01 * sum(W ** 2)


@dataclass
class TrainConfig:
    epochs: int = 80  # total, warm-up included
    warmup_epochs: int = 1  # backbone frozen, only HV-BiLSTM + classifier train
    warmup_lr: float = 1.0e-3
    lr: float = 1.0e-4
    unfreeze_blocks: int = 5  # after warm-up: last N blocks + final norm; -1 = whole backbone
    schedule: str = "constant"  # constant (the authors) | cosine: phase-2 lr decays to 1% by the last epoch
    batch_size: int = 16  # per process (global = batch_size x world size)
    val_batch_size: int = 16
    val_every: int = 1  # epochs between validations (0 = never)
    amp: bool = True  # autocast on CUDA (bf16 where supported); ignored on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1234
    threads: int = 0  # torch CPU threads (0 = torch default)
    log_every: int = 20  # iterations between TensorBoard scalars
    # torch.compile of each backbone block in place (models/speed.py; state-dict keys unchanged).
    # Pays off on GPUs for long runs; the first steps compile (seconds to minutes).
    compile: bool = False


@dataclass
class InferConfig:
    scale: int = 960  # square side fed to the model; multiple of the patch size
    merge_labels: bool = True  # use the image tags where they are known
    present_threshold: float = 0.5  # with no tags: a class is present if its pooled score >= this
    # Test-time augmentation (`vitpcm infer --tta`; not in the paper): per-patch class
    # distributions averaged over these scales (factors of `scale`, each snapped to a
    # multiple of the patch size) and, with tta_flip, their horizontal mirrors; the views
    # are resized to the finest grid before averaging and merged with the tags after it.
    tta: bool = False
    tta_scales: List[float] = field(default_factory=lambda: [0.75, 1.0, 1.25])
    tta_flip: bool = True


@dataclass
class CRFConfig(CRFParams):
    # Dense CRF (`vitpcm crf`, `vitpcm infer --crf`): the seven parameters are CRFParams' (one
    # definition, the authors' `CRF:` section as defaults; vitpcm/crf_params.py), plus how to run it.
    workers: int = 0  # processes over images; 0 = one per CPU


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)


def preset_names() -> List[str]:
    """Names of the presets shipped with the package (``vitpcm/configs/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(preset: Union[str, Path]) -> Path:
    """Path of a YAML preset given as a file path or a shipped preset name."""
    path = Path(preset)
    if path.is_file():
        return path
    named = PRESET_DIR / f"{preset}.yaml"
    if named.is_file() and path.suffix == "":
        return named
    raise VitpcmError(f"config '{preset}' not found: give a YAML file or one of the presets {preset_names()}")


def _bad_key_message(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    parent = str(key).rsplit(".", 1)[0] if "." in str(key) else ""
    node = OmegaConf.structured(Config)
    valid: Sequence[str] = []
    try:
        sub = OmegaConf.select(node, parent) if parent else node
        if isinstance(sub, DictConfig):
            valid = list(sub.keys())
    except OmegaConfBaseException:
        pass
    hint = f"; valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}" if valid else ""
    return f"unknown config key '{key}' in {where}{hint}"


def _bad_value_message(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    return f"bad value for '{key}' in {where}: {str(exc).splitlines()[0]}"


def load_config(preset: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the config: defaults <- preset YAML <- ``key=value`` overrides.

    Raises :class:`VitpcmError` for a missing preset, an unknown key or a badly typed value.
    """
    cfg = OmegaConf.structured(Config)
    if preset is not None:
        path = resolve_preset(preset)
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in many types
            raise VitpcmError(f"cannot parse config {path}: {exc}") from None
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            raise VitpcmError(_bad_key_message(exc, str(path))) from None
        except OmegaConfBaseException as exc:
            raise VitpcmError(_bad_value_message(exc, str(path))) from None
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise VitpcmError(f"override '{item}' is not of the form key=value (e.g. train.epochs=3)")
    if overrides:
        try:
            given = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as exc:
            raise VitpcmError(_bad_value_message(exc, "the overrides")) from None
        _reset_backbone_kwargs(cfg, given)
        try:
            cfg = OmegaConf.merge(cfg, given)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            raise VitpcmError(_bad_key_message(exc, "the overrides")) from None
        except OmegaConfBaseException as exc:
            raise VitpcmError(_bad_value_message(exc, "the overrides")) from None
    validate_config(cfg)
    return cfg


def _reset_backbone_kwargs(cfg: DictConfig, given: DictConfig) -> None:
    """Drop the preset's ``model.backbone_kwargs`` when the overrides switch ``model.backbone``.

    The kwargs describe the preset's backbone (the synthetic preset's patch-8, 4-block ViT);
    on another backbone they would silently change its shape. Kept when the overrides also
    touch ``model.backbone_kwargs`` (then the preset's kwargs are still dropped and only the
    overridden ones apply), or when the backbone does not change.
    """
    model = given.get("model") if isinstance(given, DictConfig) else None
    if not isinstance(model, DictConfig) or "backbone" not in model:
        return
    new, old = str(model.backbone), str(cfg.model.backbone)
    kwargs = OmegaConf.to_container(cfg.model.backbone_kwargs, resolve=True)
    if new == old or not kwargs:
        return
    cfg.model.backbone_kwargs = {}
    if "backbone_kwargs" in model:
        log.info(
            "model.backbone %s -> %s: the preset's model.backbone_kwargs %s dropped; the overridden ones apply",
            old,
            new,
            kwargs,
        )
    else:
        log.info(
            "model.backbone %s -> %s: the preset's model.backbone_kwargs %s dropped (they describe %s;"
            " set model.backbone_kwargs.KEY=VALUE to pass some to the new backbone)", old, new, kwargs, old,
        )  # fmt: skip


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
    if cfg.loss.et_merge not in ("after", "before"):
        raise VitpcmError(f"loss.et_merge must be after or before, got {cfg.loss.et_merge!r}")
    if cfg.train.schedule not in ("constant", "cosine"):
        raise VitpcmError(f"train.schedule must be constant or cosine, got {cfg.train.schedule!r}")
    if cfg.train.batch_size < 1:
        raise VitpcmError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
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


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (saved in every run folder)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


#: Runs saved before ``input.mean`` / ``input.std`` existed were fed [-1, 1] whatever the backbone.
LEGACY_NORMALISATION = ["input.mean=[0.5,0.5,0.5]", "input.std=[0.5,0.5,0.5]"]


def load_saved_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Load a run's saved ``config.yaml`` (then ``overrides``), keeping the run's normalisation.

    A run saved before ``input.mean`` / ``input.std`` existed was trained on [-1, 1] inputs
    whatever its backbone; ``auto`` would now give e.g. DINOv2 ImageNet statistics, so such a
    file gets 0.5 / 0.5 pinned (the same values for the authors' ViT and the demo).
    """
    path = resolve_preset(path)
    try:
        saved = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in many types
        raise VitpcmError(f"cannot parse config {path}: {exc}") from None
    section = saved.get("input") if isinstance(saved, DictConfig) else None
    legacy = isinstance(section, DictConfig) and "train_size" in section and "mean" not in section
    if legacy:
        log.info("%s predates input.mean/std: the run was trained on [-1, 1] inputs, pinned as 0.5 / 0.5", path)
    return load_config(path, [*(LEGACY_NORMALISATION if legacy else []), *overrides])
