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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from vitpcm.crf_params import DEFAULT_MAX_PIXELS, CRFParams
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
    # How JPEGs are decoded (vitpcm/images.py; docs/reproduce.md, switch 12): pillow (libjpeg's accurate
    # IDCT, EXIF orientation applied) | tf (TensorFlow's decode_jpeg, the authors': fast IDCT, no EXIF)
    jpeg_decoder: str = "pillow"
    tags: Optional[str] = None  # tag file (CSV / JSON); folder: default ROOT/tags.csv|json; voc: splits without masks
    masks: Optional[str] = None  # coco: output of `vitpcm prepare coco`, default ROOT/masks; folder: default ROOT/masks
    num_workers: int = 2
    # Where resize, colour jitter and normalisation run (training and `vitpcm infer`): "loader"
    # (the DataLoader workers, image by image), "device" (the model's device, a batch at a time
    # after the decoded uint8 images are uploaded; the workers only decode) or "auto" (device on
    # a GPU, loader on a CPU). The random draws stay in the loader: the same augmentations
    # either way, equal up to float rounding between devices (docs/scaling.md)
    transforms_on: str = "auto"
    # Fidelity switches (docs/reproduce.md). Image tags from the mask: the background tag
    # "always" on (vitpcm) or "from_mask": on only when a background pixel exists (the authors);
    # foreground tags read from the "original" mask (vitpcm) or the mask "resized" (nearest) to
    # input.train_size, where a sliver may vanish (the authors). Tag files are never changed.
    background_tag: str = "always"
    tags_from: str = "original"
    # coco: ground truth "vitpcm" (crowd = 255 ignore, smaller instances over larger ones, every
    # image with a non-crowd object) or "authors" (crowds painted with their class, the first
    # annotation wins where instances overlap, images with a side < 256 px or one mask value dropped)
    coco_gt: str = "vitpcm"


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
    # Bilinear resampling of images, ET targets and probability maps: False (vitpcm: pixel
    # centres, images antialiased when shrunk) or True (the authors' TF1 resize(align_corners=True),
    # corner pixels pinned to corners, no antialiasing)
    align_corners: bool = False


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
    # Colour jitter on "clamped" [0, 1] images, clipped after each step (vitpcm), or as the
    # "authors" do: float 0-255 images, never clipped (brightness +-0.2 is then +-0.2 / 255),
    # TF's per-channel contrast and HSV saturation / hue
    jitter_space: str = "clamped"


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
    # Dropout inside every backbone block while training, frozen blocks included (the authors'
    # vit-keras: 0.1 after attention and in the MLP; timm's proj_drop_rate). 0 = timm's default
    backbone_dropout: float = 0.0
    # Dropout on the inputs of each of the four LSTMs (the authors' Keras LSTM(dropout=0.2)):
    # an independent elementwise mask per direction, on top of model.dropout before the HV-BiLSTM
    lstm_dropout: float = 0.0
    classifier_init_std: float = 0.05
    init_from: Optional[str] = None  # a vitpcm checkpoint to start from (same classes)
    # How position embeddings are resampled to another grid: timm (PyTorch bicubic) | tf (TensorFlow's
    # bicubic, as the authors' Keras model; `vitpcm import-keras` sets it for imported runs)
    pos_embed_resize: str = "timm"


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
    batch_size: int = 16  # per process (global = batch_size x world size), or its cap with global_batch
    # Images per optimizer step over all processes (0 = batch_size x world size). Each process
    # then takes global_batch / world images per step in `accumulate` batches of at most
    # batch_size (batch_plan); one GPU with 64 reproduces the authors' 4 GPUs x 16.
    global_batch: int = 0
    val_batch_size: int = 16
    val_every: int = 1  # epochs between validations (0 = never)
    amp: bool = True  # autocast on CUDA (bf16 where supported, else fp16); false = fp32 (the authors); ignored on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1234
    threads: int = 0  # torch CPU threads (0 = torch default)
    log_every: int = 20  # iterations between TensorBoard scalars
    # torch.compile of each backbone block in place (models/speed.py; state-dict keys unchanged).
    # Pays off on GPUs for long runs; the first steps compile (seconds to minutes).
    compile: bool = False
    # Reliability (docs/reliability.md). deterministic: per-item seeded augmentation and
    # deterministic kernels, so a run stopped anywhere and resumed ends as an uninterrupted one
    # (CPU); off by default as it draws other augmentations than a plain run.
    deterministic: bool = False
    checkpoint_every: int = 0  # also save checkpoints/last.pt every N steps (batches) in an epoch; 0 = epoch ends only
    max_loss: float = 1.0e4  # a finite loss above this stops the run as diverged (0 = no limit)
    # Adam's epsilon (engine/optim.py; docs/reproduce.md, switch 10): torch (torch.optim.Adam, 1e-8
    # after bias correction) | keras (the authors' Keras Adam: 1e-7 on the uncorrected sqrt(v))
    adam_epsilon: str = "torch"
    # Take each step as on the sum of this many replicas' mean gradients: the authors' 4 GPUs
    # (MirroredStrategy sums them); with either epsilon the update depends on the gradient's
    # scale. 1 = the mean over the global batch (docs/reproduce.md#global-batch)
    summed_replicas: int = 1


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
    # Big images: probs/NAME.npz of an image whose longer side exceeds this holds the
    # probabilities at a reduced size (longer side = max_side) plus the original size; the mask
    # stays at the original size and the CRF upsamples. 0 = no bound (docs/reliability.md)
    max_side: int = 2048
    # How probs/NAME.npz (the CRF's input) is resized to the image: "mask" (as the mask: bilinear
    # per input.align_corners) | "skimage" (the authors' CRF input: scikit-image's resize of the
    # numpy array, half-pixel centres and mirrored edges; docs/reproduce.md, switch 11). The mask is
    # the same either way.
    probs_resize: str = "mask"
    # Speed (docs/scaling.md): images per forward (all are resized to scale x scale, so they
    # stack); 0 = auto: 1 on a CPU, 8 on a GPU. Does not change the results beyond float rounding.
    batch_size: int = 0
    # bf16 autocast of the forward on a GPU (not the authors': they ran fp32); part of the
    # resume stamp, since it changes the probabilities slightly
    amp: bool = False
    # threads that compress and write the npz / PNG files while the model runs; 0 = auto
    # (min(8, CPUs)); 1 = write in the main thread
    writers: int = 0


@dataclass
class CRFConfig(CRFParams):
    # Dense CRF (`vitpcm crf`, `vitpcm infer --crf`): the seven parameters, crf.gaussian and
    # crf.backend are CRFParams' (one definition, the authors' `CRF:` section as defaults;
    # vitpcm/crf_params.py), plus how to run it.
    workers: int = 0  # processes over images; 0 = one per CPU
    # Big images: one with more pixels is solved at this many (bilateral_sxy scaled with it) and
    # its marginals upsampled; 0 = no bound. Default vitpcm/crf_params.py (docs/reliability.md)
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Memory the CRF workers may use together: auto (80 % of MemAvailable, within the cgroup's
    # limit) or a size such as 8G / 512M; the worker count is lowered to fit the largest image
    memory_budget: str = "auto"


@dataclass
class SegmentConfig:
    # The verification stage (`vitpcm segment train / infer`): a DeepLab trained on pseudo-masks.
    # Defaults: kazuto1011/deeplab-pytorch configs/voc12.yaml (DeepLabV2, ResNet-101), the
    # sources of each value in configs/voc12_segment.yaml. The engine's other knobs come from
    # train.* (device, seed, threads, amp, log_every, deterministic, checkpoint_every, max_loss)
    # and data.num_workers.
    # the folder of PNG pseudo-masks of data.train_split it trains on (`--pseudo DIR` sets it;
    # kept in the run's config.yaml, so `--resume` finds it again)
    pseudo: Optional[str] = None
    model: str = "deeplabv2"  # deeplabv2 (ASPP 4 branches summed) | deeplabv3plus (torchvision ASPP + V3+ decoder)
    backbone: str = "resnet101"  # torchvision resnet18 / resnet34 / resnet50 / resnet101 / resnet152
    # true: torchvision ImageNet-1k weights (IMAGENET1K_V1; fetched once, needs a network) | a
    # torchvision weights name (IMAGENET1K_V2) | a local ResNet state-dict file | false (random).
    # Weights trained with pixel labels (COCO_WITH_VOC_LABELS, deeplab*/fcn_* files) are refused.
    backbone_weights: Any = True
    output_stride: Optional[int] = None  # null: 8 (deeplabv2) / 16 (deeplabv3plus)
    rates: Optional[List[int]] = None  # ASPP rates; null: 6,12,18,24 (deeplabv2) / 6,12,18 (deeplabv3plus)
    # extra input scales whose logits are fused by max (kazuto1011's MSC); [] = off
    msc_scales: List[float] = field(default_factory=lambda: [0.5, 0.75])
    freeze_bn: bool = True  # the trunk's batch norm in eval mode and without gradients
    crop: int = 321  # training crop side (pixels)
    train_scales: List[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])  # one drawn per image
    flip: bool = True  # random horizontal flip in training
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # [0, 1] RGB; torchvision's ImageNet
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: int = 10  # per process and batch; one optimizer step = batch_size x processes x accumulate images
    accumulate: int = 1  # batches summed per optimizer step (e.g. batch_size=5 accumulate=2 when memory is short)
    iterations: int = 20000  # optimizer steps, rounded up to whole epochs of the pseudo-mask set
    lr: float = 2.5e-4
    head_lr_scale: float = 10.0  # lr multiplier of the head's weights
    head_bias_lr_scale: float = 20.0  # ... of the head's biases (no weight decay on them)
    momentum: float = 0.9  # SGD
    weight_decay: float = 5.0e-4
    poly_power: float = 0.9  # lr = lr0 * (1 - step / steps) ** power
    warmup: int = 0  # steps of a linear lr ramp from 0 (kazuto1011: none; from scratch it steadies the start)
    loss: str = "ce"  # ce (pixel mean, 255 ignored) | balanced (mean over the classes present of each class's mean)
    # where the loss is taken: "logits" (kazuto1011: labels resized, nearest, to each logit map)
    # or "input" (logits upsampled to the crop; for small crops, whose labels would lose thin shapes)
    loss_at: str = "logits"
    val_every: int = 0  # epochs between val mIoU against the ground truth (0 = never; needs masks)
    test_scales: List[float] = field(default_factory=lambda: [1.0])  # `segment infer` --scales default
    test_flip: bool = False  # `segment infer` --flip default
    # probs/NAME.npz keeps the classes that win a pixel or reach this probability somewhere
    # (the CRF runs over them, as over the present classes of `vitpcm infer`)
    keep_threshold: float = 0.1


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
    segment: SegmentConfig = field(default_factory=SegmentConfig)


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


#: Top-level keys by which a YAML file names the preset(s) it builds on (``base: synthetic``;
#: ``_base_`` as in mmsegmentation; a name, a path relative to the file, or a list of them).
BASE_KEYS = ("base", "_base_")


def _read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in many types
        raise VitpcmError(f"cannot parse config {path}: {exc}") from None


def _preset_layers(
    preset: Union[str, Path, DictConfig, Dict[str, Any]], seen: Tuple[Path, ...] = ()
) -> List[Tuple[str, Any]]:
    """The YAML layers of ``preset`` in merge order: its base presets first (``base:``), then
    the file itself (without the base key). A dict / DictConfig is one layer (a saved config).

    A user's file that names no base is layered on the library defaults (VOC 2012 with the
    ViT-B/16 of the hub); one INFO line says which base was used, so a short file meant for
    the CPU preset does not silently try to fetch ViT-B weights.
    """
    if isinstance(preset, (dict, DictConfig)):
        return [("the saved config", OmegaConf.create(preset) if isinstance(preset, dict) else preset)]
    path = resolve_preset(preset) if not seen else Path(preset)
    if path.resolve() in seen:
        raise VitpcmError(f"config {path} names itself as a base (through {' -> '.join(map(str, seen))})")
    loaded = _read_yaml(path)
    bases: List[str] = []
    if isinstance(loaded, DictConfig):
        for key in BASE_KEYS:
            if key in loaded:
                value = loaded.pop(key)
                bases += [str(v) for v in value] if isinstance(value, ListConfig) else [str(value)] if value else []
    layers: List[Tuple[str, Any]] = []
    for name in bases:
        local = path.parent / name
        base_path = local if local.is_file() else resolve_preset(name)
        layers += _preset_layers(base_path, (*seen, path.resolve()))
    if not seen:  # the file given, not one of its bases: say what it stands on
        sections = set(Config.__dataclass_fields__)
        complete = isinstance(loaded, DictConfig) and sections <= set(loaded.keys())
        if bases:
            log.info("config %s: based on %s", path, ", ".join(bases))
        elif path.parent.resolve() != PRESET_DIR and not complete:
            log.info(
                "config %s names no base: its keys are layered on the library defaults (VOC 2012, %s with hub"
                " weights); write `base: synthetic` (or voc12, coco14, a YAML path) in it to start from a preset",
                path, ModelConfig.backbone,
            )  # fmt: skip
    layers.append((str(path), loaded))
    return layers


def load_config(
    preset: Union[str, Path, DictConfig, Dict[str, Any], None] = None, overrides: Sequence[str] = ()
) -> DictConfig:
    """Build the config: defaults <- preset YAML (after the presets it names as ``base``) <-
    ``key=value`` overrides. ``preset`` may also be a config dict (a run's saved config).

    Raises :class:`VitpcmError` for a missing preset, an unknown key or a badly typed value.
    """
    cfg = OmegaConf.structured(Config)
    if preset is not None:
        for where, loaded in _preset_layers(preset):
            try:
                cfg = OmegaConf.merge(cfg, loaded)
            except (ConfigKeyError, ConfigAttributeError) as exc:
                raise VitpcmError(_bad_key_message(exc, where)) from None
            except OmegaConfBaseException as exc:
                raise VitpcmError(_bad_value_message(exc, where)) from None
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
    from vitpcm.utils.pools import parse_size

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


def batch_plan(global_batch: int, world: int, max_batch: int) -> Tuple[int, int]:
    """``(per-process batch, accumulation steps)`` for ``global_batch`` images per optimizer step.

    Each of ``world`` processes takes ``global_batch / world`` images per step, split into the
    fewest equal batches of at most ``max_batch``: global = batch x world x accumulate, e.g.
    64 on 1 process with a cap of 16 -> (16, 4); on 4 processes -> (16, 1); on 2 with a cap of
    12 -> (8, 4). ``global_batch`` 0 means no plan: ``(max_batch, 1)``.
    Raises :class:`VitpcmError` when ``global_batch`` is not a multiple of ``world``.
    """
    if global_batch <= 0:
        return int(max_batch), 1
    if global_batch % world:
        raise VitpcmError(
            f"train.global_batch={global_batch} is not a multiple of the {world} processes: use"
            f" {global_batch // world * world or world} or {(global_batch // world + 1) * world}"
        )
    share = global_batch // world
    accumulate = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= max(1, int(max_batch)))
    return share // accumulate, accumulate


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


def load_saved_config(path: Union[str, Path, DictConfig, Dict[str, Any]], overrides: Sequence[str] = ()) -> DictConfig:
    """Load a run's saved ``config.yaml`` (or the config dict stored in a checkpoint), then
    ``overrides``, keeping the run's normalisation.

    A run saved before ``input.mean`` / ``input.std`` existed was trained on [-1, 1] inputs
    whatever its backbone; ``auto`` would now give e.g. DINOv2 ImageNet statistics, so such a
    file gets 0.5 / 0.5 pinned (the same values for the authors' ViT and the demo).
    """
    if isinstance(path, (dict, DictConfig)):
        saved: Any = OmegaConf.create(path) if isinstance(path, dict) else path
        where: Any = "the checkpoint's config"
        source: Any = saved
    else:
        source = where = resolve_preset(path)
        saved = _read_yaml(source)
    section = saved.get("input") if isinstance(saved, DictConfig) else None
    legacy = isinstance(section, DictConfig) and "train_size" in section and "mean" not in section
    if legacy:
        log.info("%s predates input.mean/std: the run was trained on [-1, 1] inputs, pinned as 0.5 / 0.5", where)
    return load_config(source, [*(LEGACY_NORMALISATION if legacy else []), *overrides])


def run_config(
    run: Any,
    overrides: Sequence[str] = (),
    stored: Union[Dict[str, Any], Callable[[], Optional[Dict[str, Any]]], None] = None,
) -> DictConfig:
    """The config a run was trained with, then ``overrides``: ``RUN/config.yaml``, else the
    copy its checkpoint stores (``stored``: that dict, or a function returning it or None,
    called only when the file is missing; e.g. ``lambda:
    vitpcm.engine.checkpoint.checkpoint_config(path)``). ``run``: a folder or a RunLayout.

    Raises :class:`VitpcmError` when neither exists (rather than falling back to the library
    defaults, which would silently change sizes and models).
    """
    from vitpcm.runs import RunLayout

    layout = run if isinstance(run, RunLayout) else RunLayout(run)
    if layout.config.is_file():
        return load_saved_config(layout.config, overrides)
    saved = stored() if callable(stored) else stored
    if saved:
        log.info("%s has no config.yaml: using the config stored in its checkpoint", layout.root)
        return load_saved_config(dict(saved), overrides)
    raise VitpcmError(
        f"{layout.root} has no config.yaml and its checkpoint stores no config: give the run folder of"
        " `vitpcm train` (or put the run's config.yaml back)"
    )


#: Keys an override may change on ``vitpcm train --resume``: none of them changes the model,
#: the data it trains on or the order the data comes in (docs/reliability.md). A trailing
#: ``.*`` takes a whole section. Every change is logged and kept in RUN/logs/resumes.jsonl.
RESUME_KEYS: Tuple[str, ...] = (
    "data.root",  # the same dataset, moved
    "data.num_workers",
    "data.transforms_on",  # the same draws either way (float rounding between devices)
    "train.epochs",  # train longer (with train.schedule=cosine the remaining lr curve changes)
    "train.lr",  # after a divergence: go on from the last good checkpoint more gently
    "train.warmup_lr",
    "train.max_loss",
    "train.checkpoint_every",
    "train.val_every",
    "train.val_batch_size",
    "train.log_every",
    "train.device",
    "train.threads",
    "train.amp",
    "infer.*",
    "crf.*",
)


def _leaves(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def config_changes(old: DictConfig, new: DictConfig) -> Dict[str, Tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs: ``{key: (old, new)}`` (lists
    compare whole; a key present on one side only counts as a change)."""
    a = _leaves(OmegaConf.to_container(old, resolve=True))
    b = _leaves(OmegaConf.to_container(new, resolve=True))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_allowed(key: str, allowed: Sequence[str] = RESUME_KEYS) -> bool:
    """Whether ``key`` may change on resume (:data:`RESUME_KEYS`)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in allowed)


def check_resume_changes(
    changes: Dict[str, Tuple[Any, Any]], allowed: Sequence[str] = RESUME_KEYS, hint: str = ""
) -> None:
    """Refuse, in one line, changes of keys that may not change on resume."""
    refused = [k for k in changes if not resume_allowed(k, allowed)]
    if not refused:
        return
    shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused[:4])
    more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
    raise VitpcmError(
        f"--resume: {shown}{more} cannot change on resume: {'it changes' if len(refused) == 1 else 'they change'}"
        f" the model or the data and its order. Only {', '.join(allowed)} may change;{hint} to train"
        " otherwise, start a new run with another --out"
    )
