"""The config's schema: one dataclass per section, every key with its default and its comment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from vitpcm.crf_params import DEFAULT_MAX_PIXELS, CRFParams


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
