"""DeepLab for the verification stage: a segmentation network trained on the pseudo-masks.

The paper's verification numbers (VOC val 70.3 / test 70.9, COCO val 45.0) come from a
DeepLabV2 trained on the BPM + CRF pseudo-masks with kazuto1011/deeplab-pytorch and an
ImageNet-1k initialised ResNet-101 (as in johnnylu305/deeplab-imagenet-pytorch). Built
here from torchvision parts:

* ``deeplabv2`` (default): torchvision's ResNet trunk dilated to output stride 8
  (``replace_stride_with_dilation=[False, True, True]``: layer3 at dilation 2, layer4 at
  4), then ASPP: four 3 x 3 convolutions with dilation rates 6 / 12 / 18 / 24 straight to
  class scores, **summed** (kazuto1011's ``_ASPP``; weights N(0, 0.01), biases 0). Batch
  norm is frozen in training (the task keeps it in eval mode, without gradients).
* ``deeplabv3plus``: the same trunk at output stride 16, torchvision's DeepLabV3 ASPP
  (``torchvision.models.segmentation.deeplabv3.ASPP``: 1 x 1, three atrous 3 x 3 at
  6 / 12 / 18, image pooling; 256 channels) and the V3+ decoder (48-channel projection of
  layer1, two 3 x 3 convolutions, 1 x 1 classifier) at output stride 4. torchvision has
  no V3+; segmentation-models-pytorch has one, but would add a dependency (and its own
  encoder/weights machinery) for a 30-line decoder, so it is written here.

Optional multi-scale inputs (``msc_scales``, kazuto1011's ``MSC``): the image is also fed
at e.g. 0.5 and 0.75 of its size; the logits are resized to the full-scale ones and fused
by an element-wise max. Training takes the loss on every scale and on the max.

``segment.backbone_weights``: ``true`` = torchvision's ImageNet-1k classification weights
(IMAGENET1K_V1, what ``resnet101(pretrained=True)`` gave johnnylu305), a local file of a
torchvision ResNet state dict, or ``false`` (random). Anything trained with pixel labels
(torchvision's ``COCO_WITH_VOC_LABELS`` segmentation weights, kazuto1011's COCO-init
DeepLab, a file holding a segmentation head) is refused: its pixel supervision on the VOC
classes breaks weak supervision.

This module imports torch and torchvision only (no data, engine or task code).
Shapes: B = batch, C = classes (background at 0), H x W = input size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.segmentation.deeplabv3 import ASPP

from vitpcm.errors import VitpcmError

MODELS = ("deeplabv2", "deeplabv3plus")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
#: output stride and ASPP rates of each model when the config leaves them out
DEFAULT_OUTPUT_STRIDE = {"deeplabv2": 8, "deeplabv3plus": 16}
DEFAULT_RATES = {"deeplabv2": (6, 12, 18, 24), "deeplabv3plus": (6, 12, 18)}
#: torchvision's ImageNet statistics (what its ResNet weights were trained with), on [0, 1] RGB
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WeightsSpec = Union[bool, str, None]


# ------------------------------------------------------------------------------ weights
# Names that betray a segmentation checkpoint (pixel labels): torchvision's segmentation
# weights (DeepLabV3_*, FCN_*, LRASPP_*, all COCO_WITH_VOC_LABELS), kazuto1011's COCO-init
# DeepLab files (deeplabv1_resnet101-coco.pth, deeplabv2_resnet101_COCO_init.pth), and
# anything trained on VOC masks.
_PIXEL_LABEL_NAME = re.compile(r"coco_with_voc|deeplab|fcn_|lraspp|(^|[^a-z])voc", re.IGNORECASE)
# State-dict keys of segmentation heads: torchvision (classifier / aux_classifier with a
# backbone. prefix), kazuto1011 / DeepLabV2 (aspp, layer5), mmseg (decode_head).
_SEG_HEAD_KEY = re.compile(r"(^|\.)(aspp|aux_classifier|decode_head|auxiliary_head)\.|^classifier\.\d|^layer5\.")

PIXEL_LABEL_HINT = (
    "weights trained with pixel labels on VOC's classes break weak supervision: use ImageNet-1k"
    " classification weights (segment.backbone_weights=true, or a local torchvision ResNet file) or"
    " segment.backbone_weights=false"
)


def refuse_pixel_label_weights(spec: WeightsSpec) -> None:
    """Raise :class:`VitpcmError` (one line) when ``spec`` names segmentation weights.

    ``spec``: ``segment.backbone_weights`` as given (a bool, a torchvision weights name such
    as ``IMAGENET1K_V2``, or a file path); a file is judged by its name here and by its keys
    when loaded (:func:`load_backbone_file`).
    """
    if isinstance(spec, bool) or spec is None:
        return
    text = str(spec)
    name = Path(text).name if ("/" in text or "\\" in text or Path(text).suffix) else text
    if _PIXEL_LABEL_NAME.search(name):
        raise VitpcmError(f"segment.backbone_weights={text}: {PIXEL_LABEL_HINT}")


def _torchvision_weights(backbone: str, spec: WeightsSpec):
    """The torchvision weights enum member for ``true`` (IMAGENET1K_V1) or a member name."""
    enum_name = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
                 "resnet101": "ResNet101_Weights", "resnet152": "ResNet152_Weights"}[backbone]  # fmt: skip
    enum = getattr(tvm, enum_name)
    member = "IMAGENET1K_V1" if spec is True else str(spec).split(".")[-1].upper()
    if member not in enum.__members__:
        raise VitpcmError(
            f"segment.backbone_weights={spec}: not a file and not one of {enum_name}'s"
            f" {', '.join(enum.__members__)} (or true / false)"
        )
    return enum[member]


def _download(backbone: str, weights: Any) -> Dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline (URLError), proxy (HTTPError), bad hash (RuntimeError)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        file = weights.url.rsplit("/", 1)[-1]
        raise VitpcmError(
            f"cannot fetch torchvision's ImageNet-1k weights for {backbone} ({weights.url}: {reason}):"
            f" without a network, download {file} elsewhere and set segment.backbone_weights=/path/to/{file},"
            f" or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}; segment.backbone_weights=false trains"
            " from scratch"
        ) from None


def load_backbone_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """A torchvision ResNet state dict from ``path`` (plain, or under ``state_dict`` /
    ``model``; a ``module.`` prefix of DataParallel is dropped). Refuses segmentation
    checkpoints (their keys hold a segmentation head)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VitpcmError(f"segment.backbone_weights: cannot read {path}: {first}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitpcmError(f"segment.backbone_weights: {path} is not a state dict of tensors (a torchvision ResNet's)")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    seg = [k for k in state if _SEG_HEAD_KEY.search(k)]
    if seg:
        raise VitpcmError(f"segment.backbone_weights={path} holds a segmentation head ({seg[0]}): {PIXEL_LABEL_HINT}")
    return state


# ------------------------------------------------------------------------------ trunk
def _dilate_basic_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a BasicBlock layer's stride into ``dilation`` (torchvision refuses dilation in
    BasicBlock): the first block keeps the previous dilation on its strided conv, as
    ``replace_stride_with_dilation`` does for Bottleneck layers; every later 3 x 3 conv gets
    ``dilation``."""
    for i, block in enumerate(layer):
        for j, conv in enumerate((block.conv1, block.conv2)):
            d = previous if (i == 0 and j == 0) else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool / fc, dilated to ``output_stride`` (8 or 16).

    ``forward(x)`` -> ``(low, high)``: layer1 features ``[B, c1, H/4, W/4]`` and layer4
    features ``[B, c4, H/os, W/os]``. Parameter names follow torchvision's (``conv1``,
    ``bn1``, ``layer1`` ...), so its state dicts load directly.
    """

    def __init__(self, name: str = "resnet101", output_stride: int = 8, zero_init_residual: bool = False) -> None:
        super().__init__()

        if name not in BACKBONES:
            raise VitpcmError(f"segment.backbone={name!r}: choose one of {', '.join(BACKBONES)} (torchvision ResNets)")
        if output_stride not in (8, 16):
            raise VitpcmError(f"segment.output_stride={output_stride}: DeepLab uses 8 or 16")
        dilate = [False, output_stride == 8, True]
        basic = name in ("resnet18", "resnet34")
        net = getattr(tvm, name)(
            weights=None, replace_stride_with_dilation=None if basic else dilate, zero_init_residual=zero_init_residual
        )
        if basic:  # same pattern by hand (layer3: 2, layer4: 4 at OS 8; layer4: 2 at OS 16)
            d = 1
            for layer, on in zip((net.layer2, net.layer3, net.layer4), dilate):
                if on:
                    _dilate_basic_layer(layer, d, d * 2)
                    d *= 2
        self.name = name
        self.output_stride = output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels = 64 if basic else 256
        self.out_channels = 512 if basic else 2048

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))

    def load_pretrained(self, spec: WeightsSpec) -> str:
        """Load ``segment.backbone_weights``; returns what was loaded (for the log)."""
        if spec is None or spec is False or str(spec).lower() in ("false", "none", ""):
            return "random initialisation"
        refuse_pixel_label_weights(spec)
        if spec is True or str(spec).lower() == "true":
            spec = True
        if spec is not True and Path(str(spec)).is_file():
            state, what = load_backbone_file(spec), str(spec)
        elif spec is not True and ("/" in str(spec) or Path(str(spec)).suffix in (".pth", ".pt", ".bin")):
            raise VitpcmError(f"segment.backbone_weights: file {spec} not found (or true / false / a torchvision name)")
        else:
            weights = _torchvision_weights(self.name, spec)
            state, what = _download(self.name, weights), f"torchvision {type(weights).__name__}.{weights.name}"
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches (another depth)
            first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "shapes differ")
            raise VitpcmError(
                f"segment.backbone_weights={what} does not fit {self.name} ({first}): give a torchvision {self.name} state dict"
            ) from None
        if missing or unexpected:
            shown = (missing or unexpected)[0]
            raise VitpcmError(
                f"segment.backbone_weights={what} does not fit {self.name} ({len(missing)} missing,"
                f" {len(unexpected)} unexpected tensors, e.g. {shown}): give a torchvision {self.name} state dict"
            )
        return what

    def batch_norms(self) -> List[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]


# ------------------------------------------------------------------------------ heads
class ASPPSum(nn.Module):
    """DeepLabV2's ASPP: one 3 x 3 conv per rate (dilation = padding = rate) from the trunk
    features straight to class scores; the branches' outputs are summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.constant_(conv.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class V3PlusHead(nn.Module):
    """DeepLabV3+: torchvision's ASPP on the trunk output, fused with projected layer1
    features at output stride 4, then a 1 x 1 classifier."""

    def __init__(self, high_channels: int, low_channels: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()

        self.rates = tuple(int(r) for r in rates)
        self.aspp = ASPP(high_channels, list(self.rates), 256)
        self.project = nn.Sequential(nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(True))
        self.fuse = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(True),
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([x, self.project(low)], dim=1)))


# ------------------------------------------------------------------------------ model
class DeepLab(nn.Module):
    """DeepLabV2 or V3+ on a torchvision ResNet (module docstring).

    Args:
        num_classes: C, background included.
        model: ``deeplabv2`` | ``deeplabv3plus``.
        backbone: ``resnet18`` ... ``resnet152``.
        output_stride: 8 or 16 (default 8 for V2, 16 for V3+).
        rates: ASPP rates (default 6/12/18/24 for V2, 6/12/18 for V3+).
        msc_scales: extra input scales fused by max (kazuto1011's MSC), e.g. (0.5, 0.75).
        backbone_weights: see :meth:`ResNetTrunk.load_pretrained` (never stored in ``arch``:
            a checkpoint brings its own weights).
        mean, std: the input normalisation on [0, 1] RGB the model is trained with (kept in
            ``arch`` so a loaded model knows its inputs).

    ``forward(x)``: ``[B, 3, H, W]`` normalised images -> logits ``[B, C, H/os', W/os']``
    (os' = the output stride for V2, 4 for V3+; with MSC the max over scales).
    ``forward(x, all_scales=True)``: the list the loss reads: ``[full]`` without MSC, else
    ``[full, *each extra scale, max]``.
    """

    def __init__(
        self,
        num_classes: int,
        model: str = "deeplabv2",
        backbone: str = "resnet101",
        output_stride: Optional[int] = None,
        rates: Optional[Sequence[int]] = None,
        msc_scales: Sequence[float] = (),
        backbone_weights: WeightsSpec = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if model not in MODELS:
            raise VitpcmError(f"segment.model={model!r}: choose one of {', '.join(MODELS)}")
        output_stride = int(output_stride or DEFAULT_OUTPUT_STRIDE[model])
        rates = tuple(int(r) for r in (rates or DEFAULT_RATES[model]))
        if model == "deeplabv2" and len(rates) < 1:
            raise VitpcmError("segment.rates: DeepLabV2's ASPP needs at least one rate")
        self.num_classes = int(num_classes)
        self.kind = model
        # from scratch, each residual branch starts at zero (its last BN's scale 0; Goyal et
        # al. 2017, torchvision's zero_init_residual): a steadier start; weights overwrite it
        scratch = backbone_weights is None or backbone_weights is False or str(backbone_weights).lower() == "false"
        self.trunk = ResNetTrunk(backbone, output_stride, zero_init_residual=scratch)
        self.loaded = self.trunk.load_pretrained(backbone_weights)
        if model == "deeplabv2":
            self.head: nn.Module = ASPPSum(self.trunk.out_channels, num_classes, rates)
        else:
            self.head = V3PlusHead(self.trunk.out_channels, self.trunk.low_channels, num_classes, rates)
        self.msc_scales = tuple(float(s) for s in msc_scales)
        self.normalisation = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self.arch: Dict[str, Any] = {
            "num_classes": self.num_classes,
            "model": model,
            "backbone": backbone,
            "output_stride": output_stride,
            "rates": list(rates),
            "msc_scales": list(self.msc_scales),
            "mean": list(self.normalisation[0]),
            "std": list(self.normalisation[1]),
        }

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any]) -> "DeepLab":
        """Rebuild an (untrained) model from the ``arch`` dict of a checkpoint."""
        return cls(**dict(arch), backbone_weights=None)

    # -- forward -----------------------------------------------------------------------
    def _single(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.trunk(x)
        return self.head(high) if self.kind == "deeplabv2" else self.head(low, high)

    def forward(self, x: torch.Tensor, all_scales: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        full = self._single(x)
        if not self.msc_scales:
            return [full] if all_scales else full
        size = full.shape[-2:]
        pyramid = [self._single(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in self.msc_scales]  # fmt: skip
        fused = torch.stack([full] + [F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                                      for p in pyramid]).amax(0)  # fmt: skip
        return [full, *pyramid, fused] if all_scales else fused

    # -- parameter groups (kazuto1011's lr_mult / decay_mult) ---------------------------
    def backbone_parameters(self) -> List[nn.Parameter]:
        return list(self.trunk.parameters())

    def head_parameters(self) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
        """``(weights, biases)`` of the head (biases: 20x lr, no weight decay in kazuto1011's
        recipe); head batch-norm parameters (V3+) count as biases."""
        weights, biases = [], []
        for name, p in self.head.named_parameters():
            (weights if name.endswith("weight") and p.ndim > 1 else biases).append(p)
        return weights, biases

    def freeze_batch_norm(self) -> None:
        """The trunk's batch norm in eval mode (running statistics kept) and without gradients:
        DeepLabV2's training with small batches. Call after every ``model.train()``."""
        for bn in self.trunk.batch_norms():
            bn.eval()
            for p in bn.parameters():
                p.requires_grad_(False)


def deeplab_from_arch(arch: Dict[str, Any]) -> DeepLab:
    """Registry builder (``arch["name"] == "deeplab"``)."""
    return DeepLab.from_arch(arch)


@torch.no_grad()
def predict_probs(
    model: DeepLab, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
) -> torch.Tensor:
    """DeepLab's test protocol on one normalised image ``[3, H, W]``: softmax at each input
    scale (bilinear resize of the image, logits resized back to H x W), averaged over the
    scales and, with ``flip``, their horizontal mirrors. Returns ``[C, H, W]`` float32."""
    h, w = image.shape[-2:]
    x = image[None]
    total = None
    count = 0
    for s in scales:
        size = (max(1, int(round(h * float(s)))), max(1, int(round(w * float(s)))))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        views = [xs, xs.flip(-1)] if flip else [xs]
        for i, v in enumerate(views):
            logits = model(v).float()
            if i == 1:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]
            total = probs if total is None else total + probs
            count += 1
    return total / count
