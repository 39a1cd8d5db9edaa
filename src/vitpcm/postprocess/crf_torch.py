"""The dense CRF in PyTorch (``crf.backend=torch``): pydensecrf's mean field, batched, on any device.

What it computes is what :func:`vitpcm.postprocess.crf.dense_crf` computes with pydensecrf2
(Krähenbühl & Koltun's ``densecrf``, v2): ``Q <- softmax(-unary + w_g K_g Q + w_b K_b Q)``
for ``iterations`` steps (an image stops sooner under ``crf.tolerance``) from
``Q = softmax(-unary)``, ``unary = -log(max(p, clip))``, Potts messages, each kernel
normalised symmetrically (``NORMALIZE_SYMMETRIC``, pydensecrf's default:
``n^-1/2 K (n^-1/2 Q)`` with ``n = K 1``), the self-term kept.

* The appearance (bilateral) kernel, on the 5-D features ``(x / sxy, y / sxy, r / srgb,
  g / srgb, b / srgb)``, is filtered on a permutohedral lattice (:class:`PermutohedralLattice`)
  built as pydensecrf builds it: the same elevation, rounding, simplex ranks, barycentric
  weights, ``[1/2, 1, 1/2]`` blur along each of the d + 1 lattice directions and the slicing
  constant ``1 / (1 + 2^-d)``. Its hash table is replaced by tensors: the vertex keys are
  packed into int64, deduplicated by ``torch.unique``, their neighbours found by
  ``searchsorted``; splatting is ``index_add_``.
* The smoothness kernel (``crf.gaussian``): ``lattice`` = the same lattice on ``(x / sxy,
  y / sxy)`` (the authors'); ``exact`` = the separable Gaussian it approximates, zero
  outside the image, a 4-sigma window (scipy's ``gaussian_filter1d``, as the pydensecrf
  backend's exact path).

Images of a batch share one lattice: each pixel's image index is packed into its vertex
keys, so no vertex (hence no message) is shared between images. Images of other sizes and
class counts are padded (:func:`dense_crf_batch`): padded pixels are left out of the
lattice and are zero in the smoothness filter (as outside an image), padded classes have
an infinite unary (Q = 0, they send no message).

This module is the only one of ``postprocess/`` that imports torch; ``crf.py`` imports it
only when the torch backend runs (``vitpcm crf`` stays torch-free otherwise).
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vitpcm.crf_params import CRFParams
from vitpcm.errors import VitpcmError

__all__ = [
    "PermutohedralLattice",
    "LatticeKeyError",
    "dense_crf_batch",
    "dense_crf_tensor",
    "smooth_exact",
    "torch_device",
    "use_threads",
]


def use_threads(threads: int) -> None:
    """torch's CPU threads in this process (the CRF's worker processes take one each)."""
    torch.set_num_threads(max(1, int(threads)))


def torch_device(device: Optional[str | torch.device]) -> torch.device:
    """``device`` (default cpu) as a ``torch.device``, or a :class:`VitpcmError` saying how to
    fix a CUDA device this machine does not have."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise VitpcmError(
            f"the CRF's torch backend was asked for {dev} but this machine has"
            f" {torch.cuda.device_count()} CUDA device(s): give --device cpu (or crf.backend=pydensecrf)"
        )
    return dev


class LatticeKeyError(ValueError):
    """The lattice's vertex keys do not fit into 62 bits (features spread too far)."""


class PermutohedralLattice:
    """Krähenbühl's permutohedral lattice (pydensecrf's ``Permutohedral``) over ``N`` points.

    Args:
        features: ``[N, d]`` float32, already divided by the kernel's standard deviations.
        segments: ``[N]`` int64 image index of each point (points of different segments
            never share a vertex); None = one image.

    :meth:`filter` maps ``[N, C]`` values to ``[N, C]``: approximately ``sum_j exp(-|f_i -
    f_j|^2 / 2) v_j`` times a constant (the self-term included), as pydensecrf's
    ``Permutohedral::compute`` (forward direction).
    """

    def __init__(self, features: torch.Tensor, segments: Optional[torch.Tensor] = None) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be [N, d], got {tuple(features.shape)}")
        n, d = features.shape
        self.d = d
        device = features.device
        features = features.to(torch.float32)
        # E's diagonal (Adams et al. 2010, p. 5), computed as the C++ code does: a float
        # inv_std_dev times a double 1/sqrt((i+2)(i+1)), stored as float
        inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
        scale = torch.tensor(
            [np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev) for i in range(d)],
            dtype=torch.float32,
            device=device,
        )
        # elevate onto the plane x_0 + ... + x_d = 0, same operation order as the C++ loop
        elevated = torch.empty(n, d + 1, dtype=torch.float32, device=device)
        running = torch.zeros(n, dtype=torch.float32, device=device)
        for j in range(d, 0, -1):
            cf = features[:, j - 1] * scale[j - 1]
            elevated[:, j] = running - float(j) * cf
            running = running + cf
        elevated[:, 0] = running
        # the nearest 0-coloured lattice point (round half to even, as SSE's rounding)
        down = torch.tensor(np.float32(1.0 / (d + 1)), device=device)
        rounded = torch.round(elevated * down)
        rem0 = rounded * float(d + 1)
        total = rounded.sum(1, keepdim=True)
        # rank of each coordinate of the remainder (a tie ranks the later coordinate higher, as the C++ loop)
        diff = elevated - rem0
        later_bigger = diff[:, :, None] < diff[:, None, :]  # [n, i, j]: diff_i < diff_j
        upper = torch.triu(torch.ones(d + 1, d + 1, dtype=torch.bool, device=device), diagonal=1)
        rank = (later_bigger & upper).sum(2) + (~later_bigger & upper).sum(1)
        rank = rank.to(torch.float32) + total
        below, above = rank < 0, rank >= d + 1
        shift = below.to(torch.float32) - above.to(torch.float32)
        rank, rem0 = rank + shift * (d + 1), rem0 + shift * (d + 1)
        # barycentric weights (p. 10): v_i added at d - rank_i, subtracted at d - rank_i + 1
        v = (elevated - rem0) * down
        slot = (d - rank).to(torch.int64)
        bary = torch.zeros(n, d + 2, dtype=torch.float32, device=device)
        bary.scatter_add_(1, slot, v)
        bary.scatter_add_(1, slot + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, : d + 1].contiguous()  # [N, d+1]
        packed, deltas = self._pack(rem0[:, :d].to(torch.int64), rank[:, :d].to(torch.int64), segments)
        # the vertices: the distinct keys, sorted (torch.unique's way, with the sort kept: it
        # also orders the splatting matrix by vertex)
        sorted_keys, order = torch.sort(packed.reshape(-1), stable=True)
        self.vertices, inverse_sorted, counts = torch.unique_consecutive(
            sorted_keys, return_inverse=True, return_counts=True
        )
        self.num_vertices = int(self.vertices.numel())
        inverse = torch.empty_like(inverse_sorted)
        inverse[order] = inverse_sorted
        self.offsets = inverse.view(n, d + 1)  # [N, d+1] vertex index per point
        self._splat, self._slice = self._sparse_maps(n, order, counts)
        # blur neighbours along each direction j: n1 = key - 1 except key_j + d (n2 = -that);
        # a missing neighbour points at row M, which stays zero
        self.neighbours: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for delta in deltas:
            self.neighbours.append((self._find(self.vertices + delta), self._find(self.vertices - delta)))

    def _pack(
        self, rem0: torch.Tensor, rank: torch.Tensor, segments: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, List[int]]:
        """The keys of each point's d + 1 simplex vertices, packed: int64 ``[N, d+1]``.

        Vertex r of a point has the coordinates ``key_i = rem0_i + canonical[r, rank_i]`` (i < d;
        the last one follows from the sum 0), with ``canonical[r, k] = r`` for ``k <= d - r``,
        else ``r - (d + 1)``. Each coordinate gets a bit field wide enough for every vertex and
        its blur neighbours (+-d); the image index takes the bits above. Computed from
        ``rem0`` and ``rank`` ``[N, d]`` without materialising the ``[N, d+1, d]`` keys.
        Also returns the packed step to each direction's first blur neighbour.
        """
        d = self.d
        margin = 2 * (d + 1)  # canonical adds -d..d, a blur neighbour another -d..d
        low = rem0.amin(0) - margin
        widths = (rem0.amax(0) - low + margin + 1).tolist()
        bits = [max(1, int(w).bit_length()) for w in widths]
        n_segments = int(segments.max()) + 1 if segments is not None and segments.numel() else 1
        seg_bits = max(1, n_segments.bit_length())
        if sum(bits) + seg_bits > 62:
            raise LatticeKeyError(
                f"the lattice keys need {sum(bits) + seg_bits} bits (> 62): the features spread too far"
                " (an image too large for this kernel's std, or too many images in one batch)"
            )
        offsets, at = [], 0
        for b in bits:
            offsets.append(at)
            at += b
        fields = torch.tensor([1 << o for o in offsets], dtype=torch.int64, device=rem0.device)
        base = ((rem0 - low) * fields).sum(1)  # [N]
        if segments is not None:
            base = base + (segments.to(torch.int64) << at)
        all_fields = int(fields.sum())
        packed = torch.empty(rem0.shape[0], d + 1, dtype=torch.int64, device=rem0.device)
        for r in range(d + 1):
            wrapped = ((rank > d - r).to(torch.int64) * fields).sum(1)  # coordinates where canonical is r - (d+1)
            packed[:, r] = base + r * all_fields - (d + 1) * wrapped
        deltas = []
        for j in range(d + 1):
            step = [-1] * d
            if j < d:
                step[j] = d
            deltas.append(sum(s * (1 << o) for s, o in zip(step, offsets)))
        return packed, deltas

    def _sparse_maps(self, n: int, order: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Splatting as a CSR matrix ``[M, N]`` (barycentric weights) and slicing as its
        transpose ``[N, M]``: a sparse product is several times faster than ``index_add_`` and
        gathers over ``N (d + 1)`` entries, on the CPU as on CUDA. ``order``: the entries
        ``[N (d+1)]`` sorted by vertex; ``counts``: entries per vertex ``[M]``."""
        d, m, device = self.d, self.num_vertices, self.offsets.device
        weight = self.weights.reshape(-1)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are stable
            warnings.simplefilter("ignore", UserWarning)
            per_pixel = torch.arange(0, n * (d + 1) + 1, d + 1, device=device)
            slice_map = torch.sparse_csr_tensor(per_pixel, self.offsets.reshape(-1), weight, (n, m),
                                                check_invariants=False)  # fmt: skip
            per_vertex = torch.zeros(m + 1, dtype=torch.int64, device=device)
            per_vertex[1:] = torch.cumsum(counts, 0)
            splat_map = torch.sparse_csr_tensor(per_vertex, order // (d + 1), weight[order], (m, n),
                                                check_invariants=False)  # fmt: skip
        return splat_map, slice_map

    def _find(self, wanted: torch.Tensor) -> torch.Tensor:
        """Index of each packed key in ``self.vertices``, or M where absent."""
        m = self.num_vertices
        at = torch.searchsorted(self.vertices, wanted).clamp_(max=m - 1)
        return torch.where(self.vertices[at] == wanted, at, torch.full_like(at, m))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat, blur, slice: ``values`` ``[N, C]`` float32 -> ``[N, C]`` float32."""
        d, m = self.d, self.num_vertices
        zero = values.new_zeros(1, values.shape[1])  # row M: the missing neighbour
        grid = torch.cat([self._splat @ values, zero])
        for n1, n2 in self.neighbours:
            grid = torch.cat([grid[:m] + 0.5 * (grid[n1] + grid[n2]), zero])
        alpha = float(np.float32(1.0 / (1.0 + 2.0**-d)))
        return (self._slice @ grid[:m]) * alpha


def smooth_exact(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of std ``sigma`` over the last two axes of ``[..., H, W]``, zero
    outside, radius ``int(4 sigma + 0.5)``, weights summing to 1 (scipy's ``gaussian_filter1d``
    with ``mode="constant"``)."""
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / float(sigma)) ** 2)
    taps = torch.tensor(taps / taps.sum(), dtype=torch.float32, device=planes.device)
    shape = planes.shape
    flat = planes.reshape(-1, 1, shape[-2], shape[-1])
    flat = F.conv2d(flat, taps.view(1, 1, -1, 1), padding=(radius, 0))
    flat = F.conv2d(flat, taps.view(1, 1, 1, -1), padding=(0, radius))
    return flat.reshape(shape)


def _position_features(valid: torch.Tensor, sxy: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x / sxy, y / sxy)`` ``[N, 2]`` float32 and image index ``[N]`` of the valid pixels of
    ``valid`` ``[B, H, W]`` (pixel order: image, row, column)."""
    b, h, w = valid.shape
    device = valid.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    sxy32 = torch.tensor(np.float32(sxy), device=device)
    pos = torch.stack([xs.to(torch.float32) / sxy32, ys.to(torch.float32) / sxy32], -1)  # [H, W, 2]
    pos = pos.expand(b, h, w, 2)[valid]
    segments = torch.arange(b, device=device).view(b, 1, 1).expand(b, h, w)[valid]
    return pos, segments


def dense_crf_tensor(
    images: torch.Tensor,
    probs: torch.Tensor,
    params: Optional[CRFParams] = None,
    valid: Optional[torch.Tensor] = None,
    classes_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean-field marginals of a batch of fully connected CRFs (pydensecrf's, see the module).

    Args:
        images: ``[B, H, W, 3]`` uint8 RGB, on the device that computes.
        probs: ``[B, C, H, W]`` class probabilities (float), same device.
        params: the CRF's parameters (default the authors').
        valid: ``[B, H, W]`` bool, the pixels that belong to each image (padding False);
            None = all.
        classes_valid: ``[B, C]`` bool, the channels that belong to each image (padding
            False: Q stays 0 there); None = all.

    Returns:
        ``Q`` ``[B, C, H, W]`` float32 (0 on padded pixels and channels).
    """
    params = params if params is not None else CRFParams()
    b, c, h, w = probs.shape
    if images.shape != (b, h, w, 3):
        raise ValueError(
            f"images {tuple(images.shape)} do not match probabilities {tuple(probs.shape)} (want [B, H, W, 3])"
        )
    device = probs.device
    if not bool(torch.isfinite(probs).all()):  # NaN would come back as a mask, not as an error
        raise ValueError("the probabilities hold NaN or infinite values: the CRF wants softmax outputs")
    if valid is None:
        valid = torch.ones(b, h, w, dtype=torch.bool, device=device)
    clip = torch.tensor(np.float32(params.clip), device=device)
    unary = -torch.log(torch.maximum(probs.to(torch.float32), clip))  # [B, C, H, W]
    if classes_valid is not None:
        unary = unary.masked_fill(~classes_valid[:, :, None, None], math.inf)
    unary = unary.masked_fill(~valid[:, None], 0.0)
    keep = valid.reshape(-1)  # [B*H*W] pixels in the lattices

    # appearance kernel: one lattice over every image's valid pixels
    pos, segments = _position_features(valid, params.bilateral_sxy)
    srgb = torch.tensor(np.float32(params.bilateral_srgb), device=device)
    rgb = images[valid].to(torch.float32) / srgb  # [N, 3]
    bilateral = PermutohedralLattice(torch.cat([pos, rgb], 1), segments)
    norm_b = (bilateral.filter(pos.new_ones(pos.shape[0], 1)) + 1e-20).rsqrt()  # [N, 1]

    if params.gaussian == "lattice":
        gpos, gseg = _position_features(valid, params.gauss_sxy)
        smooth_lattice = PermutohedralLattice(gpos, gseg)
        norm_g = (smooth_lattice.filter(gpos.new_ones(gpos.shape[0], 1)) + 1e-20).rsqrt()
    else:
        mask = valid.to(torch.float32)[:, None]  # [B, 1, H, W]
        norm_g = (smooth_exact(mask, params.gauss_sxy) + 1e-20).rsqrt() * mask

    def pixels(q: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [N, C] of the valid pixels
        return q.permute(0, 2, 3, 1).reshape(-1, c)[keep]

    def planes(values: torch.Tensor) -> torch.Tensor:  # [N, C] -> [B, C, H, W], zero elsewhere
        full = values.new_zeros(b * h * w, c)
        full[keep] = values
        return full.view(b, h, w, c).permute(0, 3, 1, 2)

    q = torch.softmax(-unary, 1)
    # crf.tolerance: an image whose step changed at most that share of its labels keeps its Q
    labels = q.argmax(1) if params.tolerance else None  # [B, H, W]
    settled = torch.zeros(b, dtype=torch.bool, device=device)
    allowed = params.tolerance * valid.sum((1, 2))  # [B] pixels each image may change
    for _ in range(int(params.iterations)):
        if params.gaussian == "lattice":
            smooth = planes(norm_g * smooth_lattice.filter(norm_g * pixels(q)))
        else:
            smooth = norm_g * smooth_exact(q * norm_g, params.gauss_sxy)
        appearance = planes(norm_b * bilateral.filter(norm_b * pixels(q)))
        step = torch.softmax(params.gauss_compat * smooth + params.bilateral_compat * appearance - unary, 1)
        if labels is None:
            q = step
            continue
        q = torch.where(settled[:, None, None, None], q, step)
        new = q.argmax(1)
        settled |= ((new != labels) & valid).sum((1, 2)) <= allowed
        labels = new
        if bool(settled.all()):
            break
    q = q * valid[:, None]
    if classes_valid is not None:
        q = q * classes_valid[:, :, None, None]
    return q


def _tensor(array: np.ndarray | torch.Tensor, dtype: type) -> torch.Tensor:
    """A tensor of ``array`` (numpy arrays copied only when read-only, e.g. from PIL)."""
    if isinstance(array, torch.Tensor):
        return array
    return torch.from_numpy(np.require(array, dtype=dtype, requirements=["C", "W"]))


def dense_crf_batch(
    images: Sequence[np.ndarray | torch.Tensor],
    probs: Sequence[np.ndarray | torch.Tensor],
    params: Optional[CRFParams] = None,
    device: Optional[torch.device | str] = None,
) -> List[torch.Tensor]:
    """:func:`dense_crf_tensor` over images of any sizes and class counts, in one batch.

    Args:
        images: B arrays ``[H_i, W_i, 3]`` uint8 RGB.
        probs: B arrays ``[C_i, H_i, W_i]`` of probabilities.
        device: where to compute (default: that of the first probabilities tensor, else CPU).

    Returns the B marginals ``[C_i, H_i, W_i]`` float32 on ``device``.
    """
    if len(images) != len(probs) or not images:
        raise ValueError(f"give as many images as probabilities (got {len(images)} and {len(probs)}), at least one")
    if device is None:
        device = probs[0].device if isinstance(probs[0], torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    shapes = [tuple(p.shape) for p in probs]
    for i, (image, shape) in enumerate(zip(images, shapes)):
        if len(shape) != 3 or tuple(image.shape) != (shape[1], shape[2], 3):
            raise ValueError(f"image {i}: shape {tuple(image.shape)} does not match probabilities {shape}")
    bsz = len(images)
    cmax = max(s[0] for s in shapes)
    hmax = max(s[1] for s in shapes)
    wmax = max(s[2] for s in shapes)
    img = torch.zeros(bsz, hmax, wmax, 3, dtype=torch.uint8, device=device)
    prob = torch.zeros(bsz, cmax, hmax, wmax, dtype=torch.float32, device=device)
    valid = torch.zeros(bsz, hmax, wmax, dtype=torch.bool, device=device)
    classes_valid = torch.zeros(bsz, cmax, dtype=torch.bool, device=device)
    for i, ((c, h, w), image, p) in enumerate(zip(shapes, images, probs)):
        img[i, :h, :w] = _tensor(image, np.uint8).to(device)
        prob[i, :c, :h, :w] = _tensor(p, np.float32).to(device)
        valid[i, :h, :w] = True
        classes_valid[i, :c] = True
    q = dense_crf_tensor(img, prob, params, valid, classes_valid)
    return [q[i, :c, :h, :w] for i, (c, h, w) in enumerate(shapes)]
