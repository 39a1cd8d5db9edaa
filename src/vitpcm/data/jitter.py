"""The colour jitter of training views: the authors' (TensorFlow's ``random_*`` steps on 0-255
floats, nothing clipped; ``augment.jitter_space=authors``) and vitpcm's clamped one, each
split into the draw of its factors (:func:`draw_jitter`, in the loader) and their
application (:func:`apply_jitter` to one image, :func:`apply_jitter_batch` to a batch on any
device), so the pixels can be made in the loader or on the GPU from the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
import torchvision.transforms.v2.functional as TF


@dataclass(frozen=True)
class JitterDraw:
    """One view's colour-jitter factors (None: the step is off in ``augment``; ``grey``:
    greyscale drawn). Drawn in the loader (:func:`draw_jitter`), applied there or on the
    model's device (:func:`apply_jitter`, :func:`apply_jitter_batch`)."""

    brightness: Optional[float] = None
    contrast: Optional[float] = None
    saturation: Optional[float] = None
    hue: Optional[float] = None
    grey: bool = False

    def steps(self) -> Tuple[bool, ...]:
        """Which steps run: images whose draws share this can be jittered as one batch."""
        return (self.brightness is not None, self.contrast is not None, self.saturation is not None,
                self.hue is not None)  # fmt: skip


def draw_jitter(aug: Any, gen: Optional[torch.Generator] = None) -> JitterDraw:
    """The factors of one colour jitter, drawn in the authors' order (brightness, contrast,
    saturation, hue, greyscale); a step whose range is the identity draws nothing."""

    def uniform(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=gen))

    lo_c, hi_c = aug.contrast
    lo_s, hi_s = aug.saturation
    return JitterDraw(  # keyword arguments are evaluated left to right: the draw order above
        brightness=uniform(-aug.brightness, aug.brightness) if aug.brightness > 0 else None,
        contrast=uniform(lo_c, hi_c) if (lo_c, hi_c) != (1.0, 1.0) else None,
        saturation=uniform(lo_s, hi_s) if (lo_s, hi_s) != (1.0, 1.0) else None,
        hue=uniform(-aug.hue, aug.hue) if aug.hue > 0 else None,
        grey=bool(aug.grayscale > 0 and uniform(0, 1) < aug.grayscale),
    )


def color_jitter(image: torch.Tensor, aug: Any, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """The authors' colour transform on float [0, 1] ``[3, H, W]``.

    Brightness is an additive delta (TensorFlow's ``random_brightness``); contrast,
    saturation and hue are factors; greyscale with probability ``aug.grayscale``.
    ``aug.jitter_space="authors"``: :func:`color_jitter_authors` instead (unclipped);
    otherwise ("clamped", vitpcm) each step stays in [0, 1].
    """
    return apply_jitter(image, draw_jitter(aug, gen), str(getattr(aug, "jitter_space", "clamped")))


def apply_jitter(image: torch.Tensor, draw: JitterDraw, space: str = "clamped") -> torch.Tensor:
    """Jitter ``[3, H, W]`` float [0, 1] with given factors; ``space``: ``augment.jitter_space``."""
    if space == "authors":
        return jitter_authors_with(image, draw.brightness, draw.contrast, draw.saturation, draw.hue, draw.grey)
    if draw.brightness is not None:
        image = (image + draw.brightness).clamp(0, 1)
    if draw.contrast is not None:
        image = TF.adjust_contrast(image, draw.contrast)
    if draw.saturation is not None:
        image = TF.adjust_saturation(image, draw.saturation)
    if draw.hue is not None:
        image = TF.adjust_hue(image, draw.hue)
    if draw.grey:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image.clamp(0, 1)


def apply_jitter_batch(images: torch.Tensor, draws: Sequence[JitterDraw], space: str = "clamped") -> torch.Tensor:
    """:func:`apply_jitter` over ``[B, 3, H, W]``, one draw per image, on the images' device.

    The authors' jitter runs as one batch (per-image factors broadcast; the same values as
    image by image, ``tests/data/test_device_transforms.py``); the clamped one, built on
    torchvision's scalar-factor functions, image by image.
    """
    if space == "authors" and len({d.steps() for d in draws}) == 1:
        dev, first = images.device, draws[0]

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(dev, non_blocking=True).view(-1, 1, 1, 1)

        return _jitter_authors(
            images,
            column([d.brightness / 255.0 for d in draws]) if first.brightness is not None else None,  # type: ignore[operator]
            column([d.contrast for d in draws]) if first.contrast is not None else None,  # type: ignore[misc]
            column([d.saturation for d in draws])[:, 0] if first.saturation is not None else None,  # type: ignore[misc]
            column([d.hue for d in draws])[:, 0] if first.hue is not None else None,  # type: ignore[misc]
            torch.tensor([d.grey for d in draws]).to(dev).view(-1, 1, 1, 1) if any(d.grey for d in draws) else None,
        )
    return torch.stack([apply_jitter(image, d, space) for image, d in zip(images, draws)])


def _tf_rgb_to_hsv(rgb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TensorFlow's RGB -> HSV of its AdjustSaturation / AdjustHue kernels, for any range
    (h in [0, 1); s = range / max, 0 where max <= 0; v = max); ``[..., 3, H, W]`` in,
    three ``[..., H, W]`` out."""
    r, g, b = rgb.unbind(-3)
    v = rgb.amax(-3)
    rng = v - rgb.amin(-3)
    s = torch.where(v > 0, rng / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    norm = 1.0 / (6.0 * torch.where(rng > 0, rng, torch.ones_like(rng)))
    h = torch.where(r == v, norm * (g - b), torch.where(g == v, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
    h = torch.where(rng > 0, h, torch.zeros_like(h))
    h = torch.where(h < 0, h + 1, h)
    return h, s, v


#: [channel, sextant] -> which of (c, x, 0) the channel takes (TF's HSV -> RGB switch; 6: outside)
_SEXTANT_PARTS = ((0, 1, 2, 2, 1, 0, 2), (1, 0, 0, 1, 2, 2, 2), (2, 2, 1, 0, 0, 1, 2))


def _tf_hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_tf_rgb_to_hsv`, as TensorFlow's kernels compute it: per pixel, the
    sextant ``int(6 h)`` picks which of (c, x, 0) goes to r, g and b; outside 0..5, all 0.
    ``[..., H, W]`` in, ``[..., 3, H, W]`` out."""
    c = s * v
    m = v - c
    dh = h * 6
    category = dh.to(torch.int64)  # truncation, as the kernel's static_cast<int>
    category = torch.where((category >= 0) & (category <= 5), category, 6)
    x = c * (1 - (torch.remainder(dh, 2.0) - 1).abs())
    parts = torch.stack([c, x, torch.zeros_like(c)], dim=-3)  # indices 0: c, 1: x, 2: zero
    # one gather per channel instead of a where per (sextant, channel): a selection, so the
    # values are exactly those of the kernel's switch
    table = torch.tensor(_SEXTANT_PARTS, device=h.device)
    index = table[:, category].movedim(0, -3)  # [..., 3, H, W]: which part each channel takes
    return parts.gather(-3, index) + m.unsqueeze(-3)


def color_jitter_authors(image: torch.Tensor, aug: Any, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """The authors' ``color_transform`` (TF ``random_*`` on float images in 0-255), on
    ``[3, H, W]`` floats in [0, 1] units (x / 255: every step is the same up to that scale).

    Nothing is clipped, so values may leave [0, 1] and reach the model outside [-1, 1], as
    theirs do. Brightness adds ``U(-b, b)`` on the 0-255 scale, i.e. ``U(-b, b) / 255`` here
    (almost no change at b = 0.2); contrast ``(x - mean_c) * f + mean_c`` with each channel's
    own mean; saturation scales HSV saturation (clipped to [0, 1] as TF's kernel does), hue
    shifts HSV hue; greyscale (TF's weights) with probability ``aug.grayscale``.
    """
    return apply_jitter(image, draw_jitter(aug, gen), "authors")


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
    delta = brightness / 255.0 if brightness is not None else None
    return _jitter_authors(image, delta, contrast, saturation, hue, True if grey else None)


def _jitter_authors(
    image: torch.Tensor, delta: Any, contrast: Any, saturation: Any, hue: Any, grey: Any
) -> torch.Tensor:
    """The steps of :func:`jitter_authors_with` on ``[..., 3, H, W]``; each factor a number or
    a tensor that broadcasts per image (brightness already on the [0, 1] scale; ``grey``:
    True or a bool tensor choosing the images made grey; None: step off)."""
    image = image.float()
    if delta is not None:
        image = image + delta
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
    if grey is not None:
        weights = torch.tensor([0.2989, 0.5870, 0.1140], device=image.device)[:, None, None]
        grey_map = (image * weights).sum(-3, keepdim=True).expand_as(image)
        image = grey_map.clone() if grey is True else torch.where(grey, grey_map, image)
    return image
