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
colour jitter, :func:`vitpcm.data.jitter.color_jitter_authors`) and :class:`TagRule` (tags from
the resized mask, background tag only when background is visible). The colour jitter itself
lives in :mod:`vitpcm.data.jitter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vitpcm.data.jitter import apply_jitter_batch, draw_jitter

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
    m = _channels(mean, "mean").to(image.device, image.dtype)[:, None, None]
    s = _channels(std, "std").to(image.device, image.dtype)[:, None, None]
    return (image - m) / s


def from_model_input(image: torch.Tensor, mean: Triple = HALF, std: Triple = HALF) -> torch.Tensor:
    """Inverse of :func:`to_model_input`: ``[..., 3, H, W]`` model input -> float RGB in [0, 1] (not clamped)."""
    m = _channels(mean, "mean").to(image.device, image.dtype)[:, None, None]
    s = _channels(std, "std").to(image.device, image.dtype)[:, None, None]
    return image * s + m


def resize_image(image: torch.Tensor, size: Tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of ``[3, H, W]`` or a batch ``[B, 3, H, W]`` (any dtype) to ``size``;
    float [0, 1] out.

    ``align_corners=False``: pixel centres, antialiased when shrinking (vitpcm);
    ``True``: corner pixels on corners and no antialiasing, TF1's ``resize(align_corners=True)``
    that the authors use.
    """
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    down = (size[0] < image.shape[-2] or size[1] < image.shape[-1]) and not align_corners
    batch = image if image.dim() == 4 else image[None]
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=align_corners, antialias=down)
    return (out if image.dim() == 4 else out[0]).clamp_(0.0, 1.0)


def resize_images(images: Sequence[torch.Tensor], size: Tuple[int, int], align_corners: bool = False,
                  device: Optional[torch.device] = None) -> torch.Tensor:  # fmt: skip
    """:func:`resize_image` of ``[3, H_i, W_i]`` images of any sizes -> ``[B, 3, *size]`` on
    ``device`` (None: where they are). Images of one size are resized as one batch (a
    dataset has few sizes: VOC's are mostly 500 x 375 and 375 x 500), each uploaded as it is."""
    images = [im if device is None else im.to(device, non_blocking=True) for im in images]
    out: List[Optional[torch.Tensor]] = [None] * len(images)
    for shape in dict.fromkeys(tuple(im.shape) for im in images):
        rows = [i for i, im in enumerate(images) if tuple(im.shape) == shape]
        for i, resized in zip(rows, resize_image(torch.stack([images[i] for i in rows]), size, align_corners)):
            out[i] = resized
    return torch.stack(out)  # type: ignore[arg-type]


def resize_mask(mask: torch.Tensor, size: Tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Nearest-neighbour resize of an integer mask ``[H, W]`` to ``size``.

    Source index of output ``i``: ``floor(i * H / h)`` (``align_corners=False``, PyTorch's and
    TF1's default nearest) or ``round(i * (H - 1) / (h - 1))`` (TF1 with ``align_corners=True``,
    the authors' mask resize).
    """
    out = mask
    for dim, (n_in, n_out) in enumerate(zip(mask.shape[-2:], size)):
        if n_in != n_out:
            out = out.index_select(dim - 2 + out.dim(), _nearest_sources(n_in, n_out, align_corners))
    return out


def _nearest_sources(n_in: int, n_out: int, align_corners: bool) -> torch.Tensor:
    """Source index of each of ``n_out`` outputs along one axis (:func:`resize_mask`)."""
    i = torch.arange(n_out, dtype=torch.float64)
    idx = torch.round(i * ((n_in - 1) / max(n_out - 1, 1))) if align_corners else torch.floor(i * (n_in / n_out))
    return idx.long().clamp_(0, n_in - 1)


def sampled_by_resize(mask: torch.Tensor, size: Tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """The pixels of ``mask`` ``[H, W]`` that :func:`resize_mask` to ``size`` keeps, each once:
    the same set of values as the resized mask, without its size (enlarging keeps them all)."""
    out = mask
    for dim, (n_in, n_out) in enumerate(zip(mask.shape[-2:], size)):
        if n_in != n_out:
            out = out.index_select(dim - 2 + out.dim(), torch.unique(_nearest_sources(n_in, n_out, align_corners)))
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
            # only which values survive the resize matters, not how often: the pixels it samples
            mask = sampled_by_resize(mask, (size, size), self.align_corners)
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


def transforms_on_device(cfg: Any, device: Any) -> bool:
    """``data.transforms_on``: True when resize, colour jitter and normalisation run on the
    model's device after upload (``device``; ``auto``: on a GPU) rather than in the loader
    workers, which then only decode (a GPU's step outruns the workers' CPU otherwise)."""
    where = str(cfg.data.get("transforms_on", "auto"))
    return where == "device" or (where == "auto" and torch.device(device).type == "cuda")


def _small_mask(sample: Sample) -> Sample:
    """An evaluation sample's mask as uint8 (class indices and the ignore value 255 fit; it is
    only scored): a VOC-sized mask leaves the worker in 0.19 MB instead of int64's 1.5 MB."""
    if isinstance(sample.get("mask"), torch.Tensor):
        sample["mask"] = sample["mask"].to(torch.uint8)
    return sample


class EvalTransform:
    """Resize to ``size`` x ``size`` and normalise (``mean`` / ``std``, :func:`to_model_input`);
    the mask stays at the original size. ``align_corners``: :func:`resize_image`; ``tags``:
    a :class:`TagRule` applied to ``labels`` at ``size`` (default: tags unchanged).

    ``defer``: the sample keeps its decoded uint8 image as ``image_raw`` ``[3, H, W]`` (any
    size) and :meth:`finish` makes ``image`` for a whole batch on the model's device.
    """

    def __init__(
        self, size: int, mean: Triple = HALF, std: Triple = HALF, align_corners: bool = False,
        tags: Optional[TagRule] = None, defer: bool = False,
    ) -> None:  # fmt: skip
        self.size = int(size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.align_corners, self.tags, self.defer = bool(align_corners), tags, bool(defer)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """``[3, H, W]`` (uint8 or [0, 1] float) -> the model input ``[3, size, size]``."""
        return to_model_input(resize_image(image, (self.size, self.size), self.align_corners), self.mean, self.std)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        image = out.pop("image")
        if self.defer:
            out["image_raw"] = image
        else:
            out["image"] = self.prepare(image)
        if self.tags is not None and "labels" in out:
            out["labels"] = self.tags(out["labels"], out.get("mask"), self.size)
        return _small_mask(out)

    def finish(self, batch: Sample, device: Optional[torch.device] = None) -> Sample:
        """A collated batch of deferred samples -> the same batch with ``image`` ``[B, 3, size, size]``
        made on ``device`` (None: where the images are)."""
        if "image_raw" not in batch:
            return batch
        out = dict(batch)
        resized = resize_images(out.pop("image_raw"), (self.size, self.size), self.align_corners, device)
        out["image"] = to_model_input(resized, self.mean, self.std)
        return out


class MultiScaleTransform:
    """Like :class:`EvalTransform`, for several square sides at once (test-time augmentation):
    ``image_<n>`` ``[3, n, n]`` per side ``n``; the mask stays at the original size.
    ``defer``: as :class:`EvalTransform`'s."""

    def __init__(
        self, sizes: Sequence[int], mean: Triple = HALF, std: Triple = HALF, align_corners: bool = False,
        defer: bool = False,
    ) -> None:  # fmt: skip
        self.sizes = [int(n) for n in sizes]
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.align_corners, self.defer = bool(align_corners), bool(defer)

    def prepare(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``[3, H, W]`` -> ``{"image_<n>": [3, n, n]}`` for every side."""
        return {f"image_{n}": to_model_input(resize_image(image, (n, n), self.align_corners), self.mean, self.std)
                for n in self.sizes}  # fmt: skip

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        image = out.pop("image")
        if self.defer:
            out["image_raw"] = image
        else:
            out.update(self.prepare(image))
        return _small_mask(out)

    def finish(self, batch: Sample, device: Optional[torch.device] = None) -> Sample:
        """As :meth:`EvalTransform.finish`, for every ``image_<n>``."""
        if "image_raw" not in batch:
            return batch
        out = dict(batch)
        raw = out.pop("image_raw")
        for n in self.sizes:
            out[f"image_{n}"] = to_model_input(
                resize_images(raw, (n, n), self.align_corners, device), self.mean, self.std
            )
        return out


class TrainTransform:
    """Two augmented views per image plus the records that relate them (module docstring).

    Output keys: ``image`` [3, n, n], ``flips`` bool [3], ``image_et`` [3, s, s],
    ``et_box`` long [4] = (top, left, bottom, right) in view-1-free pixel coordinates of
    the n x n image, ``et_flips`` bool [3], plus ``labels``, ``name``, ``size``. Both
    images are normalised with ``mean`` / ``std`` (:func:`to_model_input`).
    ``align_corners``: of every resize (:func:`resize_image`); ``tags``: a :class:`TagRule`
    for ``labels`` (read at side n); ``aug.jitter_space``: :func:`vitpcm.data.jitter.color_jitter`.

    Every random choice is drawn in the loader (:meth:`draw`); the pixels are made by
    :meth:`finish`, on a batch. ``defer=False``: both in the loader, image by image.
    ``defer=True``: the sample carries its uint8 image (``image_raw``) and its draws
    (``jitter``, ``jitter_et``: :class:`JitterDraw`) instead of ``image`` / ``image_et``,
    and the training step calls :meth:`finish` on the model's device. The draws, hence the
    random stream, are the same either way.
    """

    def __init__(
        self, size: int, et_crop: int, et_scale: int, patch_size: int, aug: Any,
        mean: Triple = HALF, std: Triple = HALF, align_corners: bool = False, tags: Optional[TagRule] = None,
        defer: bool = False,
    ) -> None:  # fmt: skip
        if size % patch_size or et_crop % patch_size or et_scale % patch_size:
            raise ValueError("size, et_crop and et_scale must be multiples of the patch size")
        self.size, self.et_crop, self.et_scale, self.patch = size, et_crop, et_scale, patch_size
        self.aug = aug
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.align_corners, self.tags, self.defer = bool(align_corners), tags, bool(defer)
        self.space = str(getattr(aug, "jitter_space", "clamped"))
        # the authors' jitter leaves [0, 1]; clamping after the ET resize would undo it
        self.clamp = self.space != "authors"

    def __call__(self, sample: Sample) -> Sample:
        plan = self.draw(sample)
        if self.defer:
            return plan
        one = self.finish(collate([plan]))  # the batch path on a batch of one, then unstacked
        return {k: v[0] if isinstance(v, torch.Tensor) else plan[k] for k, v in one.items()}

    def draw(self, sample: Sample) -> Sample:
        """One sample's random choices, in the order they have always been drawn (view-1 flips,
        view-1 jitter, ET jitter, ET crop, ET flips), with its uint8 image as ``image_raw``."""
        gen = None  # torch's global RNG: seeded by the trainer, and per worker by DataLoader
        n = self.size
        flips = _random_flips(self.aug, gen)
        jitter, jitter_et = draw_jitter(self.aug, gen), draw_jitter(self.aug, gen)
        if torch.rand((), generator=gen) < self.aug.crop:
            starts = torch.arange(0, n - self.et_crop + 1, self.patch)
            top = int(starts[torch.randint(len(starts), (), generator=gen)])
            left = int(starts[torch.randint(len(starts), (), generator=gen)])
            box = (top, left, top + self.et_crop, left + self.et_crop)
        else:
            box = (0, 0, n, n)
        et_flips = _random_flips(self.aug, gen)
        return {
            "image_raw": sample["image"],
            "flips": flips,
            "jitter": jitter,
            "jitter_et": jitter_et,
            "et_box": torch.tensor(box, dtype=torch.long),
            "et_flips": et_flips,
            "labels": sample["labels"] if self.tags is None else self.tags(sample["labels"], sample.get("mask"), n),
            "name": sample["name"],
            "size": sample["size"],
        }

    def finish(self, batch: Sample, device: Optional[torch.device] = None) -> Sample:
        """A collated batch of :meth:`draw` outputs -> ``image`` ``[B, 3, n, n]`` and ``image_et``
        ``[B, 3, s, s]`` made on ``device`` (None: where the images are); the draws' keys go.
        A batch without ``image_raw`` (made in the loader) is returned as it is."""
        if "image_raw" not in batch:
            return batch
        out = dict(batch)
        n, s, ac = self.size, self.et_scale, self.align_corners
        base = resize_images(out.pop("image_raw"), (n, n), ac, device)
        view = apply_jitter_batch(base, out.pop("jitter"), self.space)
        view = torch.stack([apply_flips(v, f) for v, f in zip(view, out["flips"])])
        et_full = apply_jitter_batch(base, out.pop("jitter_et"), self.space)
        boxes = out["et_box"].tolist()
        views: List[Optional[torch.Tensor]] = [None] * len(boxes)
        for side in sorted({b[2] - b[0] for b in boxes}):  # one resize per crop side (crop, whole image)
            rows = [i for i, b in enumerate(boxes) if b[2] - b[0] == side]
            crops = torch.stack([et_full[i, :, boxes[i][0] : boxes[i][2], boxes[i][1] : boxes[i][3]] for i in rows])
            crops = F.interpolate(crops, size=(s, s), mode="bilinear", align_corners=ac, antialias=side > s and not ac)
            for i, crop in zip(rows, crops):
                views[i] = crop
        et = torch.stack(views)  # type: ignore[arg-type]
        if self.clamp:
            et = et.clamp(0, 1)
        et = torch.stack([apply_flips(v, f) for v, f in zip(et, out["et_flips"])])
        out["image"] = to_model_input(view, self.mean, self.std)
        out["image_et"] = to_model_input(et, self.mean, self.std)
        return out


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
        if key in ("name", "size", "mask", "image_raw"):  # image_raw: decoded images of any size
            out[key] = values
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
