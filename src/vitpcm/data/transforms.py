"""Resize / normalise, the authors' training augmentation, and the ET view with its record.

Training makes two views of each image (the authors' ``affine_transform``):

* view 1 (``image``, n x n): colour jitter, then flip left-right, flip up-down and
  transpose, each with its own probability;
* view 2 (``image_et``, s x s with s = n / 2): its own colour jitter; with probability
  ``augment.crop`` a crop of side c at patch-aligned offsets (else the whole image); resize
  to s; its own flips. Four such views are later tiled 2 x 2 into one n x n input.

Both records travel with the sample, so the loss can map view 1's patch predictions onto
view 2's patch grid (:func:`map_to_et_grid`).

Normalisation: every transform ends in :func:`to_model_input` with the backbone's per-channel
``mean`` / ``std`` on [0, 1] RGB (``input.mean`` / ``input.std``; ``auto`` resolves to timm's
pretrained config, e.g. CLIP's). The default 0.5 / 0.5 maps to [-1, 1], the authors' ViT,
bit-identical to the former ``x * 2 - 1``.

Fidelity switches (docs/reproduce.md), each off by default: ``align_corners`` (the authors'
TF1 bilinear resize, no antialiasing), ``jitter_space="authors"`` (their unclipped 0-255
colour jitter, :func:`color_jitter_authors`) and :class:`TagRule` (tags from the resized mask,
background tag only when background is visible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

Sample = Dict[str, Any]
Triple = Sequence[float]

#: The authors' ViT (and every augreg/original ViT): [0, 1] -> [-1, 1].
HALF: Tuple[float, float, float] = (0.5, 0.5, 0.5)


def _channels(values: Triple, name: str) -> torch.Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3:
        raise ValueError(f"{name} needs 3 values (R, G, B), got {list(values)}")
    return t


def to_model_input(image: torch.Tensor, mean: Triple = HALF, std: Triple = HALF) -> torch.Tensor:
    """uint8 ``[3, H, W]`` (0..255) or float (0..1) -> float ``[3, H, W]``, ``(x - mean) / std``.

    ``mean`` / ``std`` are per channel on [0, 1]; the defaults give [-1, 1] (bit-identical to
    ``x * 2 - 1``: subtracting 0.5 and halving by 0.5 round exactly as doubling and
    subtracting 1, since the scale is a power of two).
    """
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    m = _channels(mean, "mean").to(image.dtype)[:, None, None]
    s = _channels(std, "std").to(image.dtype)[:, None, None]
    return (image - m) / s


def from_model_input(image: torch.Tensor, mean: Triple = HALF, std: Triple = HALF) -> torch.Tensor:
    """Inverse of :func:`to_model_input`: ``[..., 3, H, W]`` model input -> float RGB in [0, 1] (not clamped)."""
    m = _channels(mean, "mean").to(image.dtype)[:, None, None]
    s = _channels(std, "std").to(image.dtype)[:, None, None]
    return image * s + m


def resize_image(image: torch.Tensor, size: Tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of ``[3, H, W]`` (any dtype) to ``size``; float [0, 1] out.

    ``align_corners=False``: pixel centres, antialiased when shrinking (vitpcm);
    ``True``: corner pixels on corners and no antialiasing, TF1's ``resize(align_corners=True)``
    that the authors use.
    """
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    down = (size[0] < image.shape[-2] or size[1] < image.shape[-1]) and not align_corners
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=align_corners, antialias=down)[0]
    return out.clamp_(0.0, 1.0)


def resize_mask(mask: torch.Tensor, size: Tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Nearest-neighbour resize of an integer mask ``[H, W]`` to ``size``.

    Source index of output ``i``: ``floor(i * H / h)`` (``align_corners=False``, PyTorch's and
    TF1's default nearest) or ``round(i * (H - 1) / (h - 1))`` (TF1 with ``align_corners=True``,
    the authors' mask resize).
    """
    out = mask
    for dim, (n_in, n_out) in enumerate(zip(mask.shape[-2:], size)):
        if n_in == n_out:
            continue
        i = torch.arange(n_out, dtype=torch.float64)
        if align_corners:
            idx = torch.round(i * ((n_in - 1) / max(n_out - 1, 1)))
        else:
            idx = torch.floor(i * (n_in / n_out))
        out = out.index_select(dim - 2 + out.dim(), idx.long().clamp_(0, n_in - 1))
    return out


@dataclass(frozen=True)
class TagRule:
    """Where a training image's tags come from when its mask is known (``data.*`` keys).

    ``background``: ``"always"`` on (vitpcm) or ``"from_mask"``: on only when the mask shows
    a background pixel (the authors' ``seg2multihot``). ``source``: keep the dataset's tags
    (``"original"``: the full-size mask, or the tag file) or read all of them from the mask
    resized (nearest) to the input side (``"resized"``, the authors: a sliver of an object
    can vanish, and its tag with it). Samples without a mask keep their tags.
    """

    background: str = "always"
    source: str = "original"
    align_corners: bool = False  # of the nearest resize for source="resized"

    @classmethod
    def from_config(cls, cfg: Any) -> "TagRule":
        """From a config's ``data.background_tag``, ``data.tags_from``, ``input.align_corners``."""
        return cls(
            str(cfg.data.get("background_tag", "always")),
            str(cfg.data.get("tags_from", "original")),
            bool(cfg.input.get("align_corners", False)),
        )

    @property
    def identity(self) -> bool:
        return self.background == "always" and self.source == "original"

    def __call__(self, labels: torch.Tensor, mask: Optional[torch.Tensor], size: int) -> torch.Tensor:
        """``labels`` ``[C]`` -> tags under this rule, ``mask`` ``[H, W]`` (255 = ignore),
        ``size`` the square side the image is fed at."""
        if self.identity or mask is None:
            return labels
        if self.source == "resized":
            mask = resize_mask(mask, (size, size), self.align_corners)
            values = torch.bincount(mask.flatten().long()).nonzero().flatten()  # torch.unique's values, 30x faster
            values = values[(values != 255) & (values < labels.numel())]
            labels = torch.zeros_like(labels)
            labels[values.long()] = 1.0
            labels[0] = 1.0  # the background rule below decides
        else:
            labels = labels.clone()
        if self.background == "from_mask":
            labels[0] = float(bool((mask == 0).any()))
        return labels


def color_jitter(image: torch.Tensor, aug: Any, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """The authors' colour transform on float [0, 1] ``[3, H, W]``.

    Brightness is an additive delta (TensorFlow's ``random_brightness``); contrast,
    saturation and hue are factors; greyscale with probability ``aug.grayscale``.
    ``aug.jitter_space="authors"``: :func:`color_jitter_authors` instead (unclipped);
    otherwise ("clamped", vitpcm) each step stays in [0, 1].
    """
    if str(getattr(aug, "jitter_space", "clamped")) == "authors":
        return color_jitter_authors(image, aug, gen)

    def uniform(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=gen))

    if aug.brightness > 0:
        image = (image + uniform(-aug.brightness, aug.brightness)).clamp(0, 1)
    lo, hi = aug.contrast
    if (lo, hi) != (1.0, 1.0):
        image = TF.adjust_contrast(image, uniform(lo, hi))
    lo, hi = aug.saturation
    if (lo, hi) != (1.0, 1.0):
        image = TF.adjust_saturation(image, uniform(lo, hi))
    if aug.hue > 0:
        image = TF.adjust_hue(image, uniform(-aug.hue, aug.hue))
    if aug.grayscale > 0 and uniform(0, 1) < aug.grayscale:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image.clamp(0, 1)


def _tf_rgb_to_hsv(rgb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TensorFlow's RGB -> HSV of its AdjustSaturation / AdjustHue kernels, for any range
    (h in [0, 1); s = range / max, 0 where max <= 0; v = max)."""
    r, g, b = rgb.unbind(0)
    v = rgb.amax(0)
    rng = v - rgb.amin(0)
    s = torch.where(v > 0, rng / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    norm = 1.0 / (6.0 * torch.where(rng > 0, rng, torch.ones_like(rng)))
    h = torch.where(r == v, norm * (g - b), torch.where(g == v, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
    h = torch.where(rng > 0, h, torch.zeros_like(h))
    h = torch.where(h < 0, h + 1, h)
    return h, s, v


def _tf_hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_tf_rgb_to_hsv`, as TensorFlow's kernels compute it: per pixel, the
    sextant ``int(6 h)`` picks which of (c, x, 0) goes to r, g and b; outside 0..5, all 0."""
    c = s * v
    m = v - c
    dh = h * 6
    category = dh.to(torch.int64)  # truncation, as the kernel's static_cast<int>
    category = torch.where((category >= 0) & (category <= 5), category, 6)
    x = c * (1 - (torch.remainder(dh, 2.0) - 1).abs())
    parts = torch.stack([c, x, torch.zeros_like(c)])  # indices 0: c, 1: x, 2: zero
    # one gather per channel instead of a where per (sextant, channel): a selection, so the
    # values are exactly those of the kernel's switch
    table = torch.tensor([[0, 1, 2, 2, 1, 0, 2], [1, 0, 0, 1, 2, 2, 2], [2, 2, 1, 0, 0, 1, 2]])  # [channel, sextant]
    index = table[:, category]  # [3, H, W]: which part each channel takes
    return parts.gather(0, index) + m


def color_jitter_authors(image: torch.Tensor, aug: Any, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """The authors' ``color_transform`` (TF ``random_*`` on float images in 0-255), on
    ``[3, H, W]`` floats in [0, 1] units (x / 255: every step is the same up to that scale).

    Nothing is clipped, so values may leave [0, 1] and reach the model outside [-1, 1], as
    theirs do. Brightness adds ``U(-b, b)`` on the 0-255 scale, i.e. ``U(-b, b) / 255`` here
    (almost no change at b = 0.2); contrast ``(x - mean_c) * f + mean_c`` with each channel's
    own mean; saturation scales HSV saturation (clipped to [0, 1] as TF's kernel does), hue
    shifts HSV hue; greyscale (TF's weights) with probability ``aug.grayscale``.
    """

    def uniform(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=gen))

    lo_c, hi_c = aug.contrast
    lo_s, hi_s = aug.saturation
    return jitter_authors_with(
        image,
        brightness=uniform(-aug.brightness, aug.brightness) if aug.brightness > 0 else None,
        contrast=uniform(lo_c, hi_c) if (lo_c, hi_c) != (1.0, 1.0) else None,
        saturation=uniform(lo_s, hi_s) if (lo_s, hi_s) != (1.0, 1.0) else None,
        hue=uniform(-aug.hue, aug.hue) if aug.hue > 0 else None,
        grey=bool(aug.grayscale > 0 and uniform(0, 1) < aug.grayscale),
    )


def jitter_authors_with(
    image: torch.Tensor,
    brightness: Optional[float] = None,
    contrast: Optional[float] = None,
    saturation: Optional[float] = None,
    hue: Optional[float] = None,
    grey: bool = False,
) -> torch.Tensor:
    """:func:`color_jitter_authors` with given factors (None: step skipped), in TF's order:
    ``adjust_brightness`` (delta on the 0-255 scale), ``adjust_contrast``, ``adjust_saturation``,
    ``adjust_hue``, ``rgb_to_grayscale``; ``[3, H, W]`` in x / 255 units, nothing clipped.
    Matches TensorFlow 2 to ~1e-6 (``benchmarks/fidelity_tf_check.py``)."""
    image = image.float()
    if brightness is not None:
        image = image + brightness / 255.0
    if contrast is not None:
        mean = image.mean(dim=(-2, -1), keepdim=True)
        image = (image - mean) * contrast + mean
    if saturation is not None or hue is not None:
        # TF converts to HSV and back once for saturation and once more for hue; one round
        # trip with both changes is the same map (HSV -> RGB -> HSV gives back h, s, v up to
        # float rounding, ~1e-7) at half the cost: the loader workers' largest item
        h, s, v = _tf_rgb_to_hsv(image)
        if saturation is not None:
            s = (s * saturation).clamp(0, 1)
        if hue is not None:
            h = torch.remainder(h + hue, 1.0)
        image = _tf_hsv_to_rgb(h, s, v)
    if grey:
        grey_map = (image * torch.tensor([0.2989, 0.5870, 0.1140])[:, None, None]).sum(0, keepdim=True)
        image = grey_map.expand(3, -1, -1).clone()
    return image


def apply_flips(x: torch.Tensor, flips: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Flip left-right, flip up-down, then transpose (in that order) the last two dims."""
    lr, ud, tr = (bool(f) for f in flips)
    if lr:
        x = x.flip(-1)
    if ud:
        x = x.flip(-2)
    if tr:
        x = x.transpose(-1, -2)
    return x


def invert_flips(x: torch.Tensor, flips: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_flips` (each step is its own inverse; reverse order)."""
    lr, ud, tr = (bool(f) for f in flips)
    if tr:
        x = x.transpose(-1, -2)
    if ud:
        x = x.flip(-2)
    if lr:
        x = x.flip(-1)
    return x


def _random_flips(aug: Any, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    probs = torch.tensor([aug.flip_lr, aug.flip_ud, aug.transpose])
    return torch.rand(3, generator=gen) < probs


class EvalTransform:
    """Resize to ``size`` x ``size`` and normalise (``mean`` / ``std``, :func:`to_model_input`);
    the mask stays at the original size. ``align_corners``: :func:`resize_image`; ``tags``:
    a :class:`TagRule` applied to ``labels`` at ``size`` (default: tags unchanged)."""

    def __init__(
        self, size: int, mean: Triple = HALF, std: Triple = HALF, align_corners: bool = False,
        tags: Optional[TagRule] = None,
    ) -> None:  # fmt: skip
        self.size = int(size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.align_corners, self.tags = bool(align_corners), tags

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        image = resize_image(sample["image"], (self.size, self.size), self.align_corners)
        out["image"] = to_model_input(image, self.mean, self.std)
        if self.tags is not None and "labels" in out:
            out["labels"] = self.tags(out["labels"], out.get("mask"), self.size)
        return out


class MultiScaleTransform:
    """Like :class:`EvalTransform`, for several square sides at once (test-time augmentation):
    ``image_<n>`` ``[3, n, n]`` per side ``n``; the mask stays at the original size."""

    def __init__(
        self, sizes: Sequence[int], mean: Triple = HALF, std: Triple = HALF, align_corners: bool = False
    ) -> None:
        self.sizes = [int(n) for n in sizes]
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.align_corners = bool(align_corners)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        image = out.pop("image")
        for n in self.sizes:
            out[f"image_{n}"] = to_model_input(resize_image(image, (n, n), self.align_corners), self.mean, self.std)
        return out


class TrainTransform:
    """Two augmented views per image plus the records that relate them (module docstring).

    Output keys: ``image`` [3, n, n], ``flips`` bool [3], ``image_et`` [3, s, s],
    ``et_box`` long [4] = (top, left, bottom, right) in view-1-free pixel coordinates of
    the n x n image, ``et_flips`` bool [3], plus ``labels``, ``name``, ``size``. Both
    images are normalised with ``mean`` / ``std`` (:func:`to_model_input`).
    ``align_corners``: of every resize (:func:`resize_image`); ``tags``: a :class:`TagRule`
    for ``labels`` (read at side n); ``aug.jitter_space``: :func:`color_jitter`.
    """

    def __init__(
        self, size: int, et_crop: int, et_scale: int, patch_size: int, aug: Any,
        mean: Triple = HALF, std: Triple = HALF, align_corners: bool = False, tags: Optional[TagRule] = None,
    ) -> None:  # fmt: skip
        if size % patch_size or et_crop % patch_size or et_scale % patch_size:
            raise ValueError("size, et_crop and et_scale must be multiples of the patch size")
        self.size, self.et_crop, self.et_scale, self.patch = size, et_crop, et_scale, patch_size
        self.aug = aug
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.align_corners, self.tags = bool(align_corners), tags
        # the authors' jitter leaves [0, 1]; clamping after the ET resize would undo it
        self.clamp = str(getattr(aug, "jitter_space", "clamped")) != "authors"

    def __call__(self, sample: Sample) -> Sample:
        gen = None  # torch's global RNG: seeded by the trainer, and per worker by DataLoader
        n, s = self.size, self.et_scale
        base = resize_image(sample["image"], (n, n), self.align_corners)

        flips = _random_flips(self.aug, gen)
        view = apply_flips(color_jitter(base, self.aug, gen), flips)

        et = color_jitter(base, self.aug, gen)
        if torch.rand((), generator=gen) < self.aug.crop:
            starts = torch.arange(0, n - self.et_crop + 1, self.patch)
            top = int(starts[torch.randint(len(starts), (), generator=gen)])
            left = int(starts[torch.randint(len(starts), (), generator=gen)])
            box = (top, left, top + self.et_crop, left + self.et_crop)
        else:
            box = (0, 0, n, n)
        et = et[:, box[0] : box[2], box[1] : box[3]]
        ac = self.align_corners
        et = F.interpolate(et[None], size=(s, s), mode="bilinear", align_corners=ac,
                           antialias=et.shape[-1] > s and not ac)[0]  # fmt: skip
        if self.clamp:
            et = et.clamp(0, 1)
        et_flips = _random_flips(self.aug, gen)
        et = apply_flips(et, et_flips)

        return {
            "image": to_model_input(view, self.mean, self.std),
            "flips": flips,
            "image_et": to_model_input(et, self.mean, self.std),
            "et_box": torch.tensor(box, dtype=torch.long),
            "et_flips": et_flips,
            "labels": sample["labels"] if self.tags is None else self.tags(sample["labels"], sample.get("mask"), n),
            "name": sample["name"],
            "size": sample["size"],
        }


def map_to_et_grid(
    grid: torch.Tensor,
    flips: torch.Tensor,
    et_box: torch.Tensor,
    et_flips: torch.Tensor,
    patch_size: int,
    et_grid: int,
    align_corners: bool = False,
) -> torch.Tensor:
    """Carry view-1 patch maps onto the ET views' patch grids.

    Args:
        grid: ``[B, C, G, G]`` maps predicted on view 1 (G = n / patch_size).
        flips, et_flips: ``[B, 3]`` bool records of the two views.
        et_box: ``[B, 4]`` (top, left, bottom, right) pixel box of the ET crop.
        et_grid: side of an ET view's patch grid (s / patch_size).
        align_corners: of the bilinear resize (the authors: True, TF1's ``resize``).

    Returns ``[B, C, et_grid, et_grid]``: undo view 1's flips, crop the box at patch level,
    resize bilinearly to the ET grid, apply the ET flips.
    """
    out: List[torch.Tensor] = []
    for b in range(grid.shape[0]):
        g = invert_flips(grid[b], flips[b])
        top, left, bottom, right = (int(v) // patch_size for v in et_box[b])
        g = g[:, top:bottom, left:right]
        if g.shape[-1] != et_grid or g.shape[-2] != et_grid:
            g = F.interpolate(g[None], size=(et_grid, et_grid), mode="bilinear", align_corners=align_corners)[0]
        out.append(apply_flips(g, et_flips[b]))
    return torch.stack(out)


def tile_views(views: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Tile ET views ``[B, 3, s, s]`` 2 x 2 into ``[ceil(B / 4), 3, 2s, 2s]``.

    View 4t + 0 goes top-left, + 1 top-right, + 2 bottom-left, + 3 bottom-right. When B is
    not a multiple of 4 the last input is padded by repeating views; the padded tiles are
    dropped again by :func:`untile_grid`. Returns the tiled batch and B.
    """
    b = views.shape[0]
    t = -(-b // 4)
    if t * 4 != b:
        views = torch.cat([views, views[torch.arange(t * 4 - b) % b]], dim=0)
    c, s = views.shape[1], views.shape[-1]
    tiled = views.reshape(t, 2, 2, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(t, c, 2 * s, 2 * s)
    return tiled, b


def untile_grid(grid: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`tile_views` on prediction maps: ``[T, C, 2g, 2g]`` -> ``[count, C, g, g]``."""
    t, c, h, w = grid.shape
    g = h // 2
    views = grid.reshape(t, c, 2, g, 2, g).permute(0, 2, 4, 1, 3, 5).reshape(t * 4, c, g, g)
    return views[:count]


def collate(samples: List[Sample]) -> Sample:
    """Stack what has one shape across the batch; keep names, sizes and masks as lists."""
    out: Sample = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("name", "size", "mask"):
            out[key] = values
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
