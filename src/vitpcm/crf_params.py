"""The dense CRF's parameters, defined once (standard library only).

:class:`CRFParams` is the single definition of the seven parameters of the paper's dense
CRF (and of how its smoothness kernel is computed, and by which implementation), with the
authors' values (the ``CRF:`` section of their ``configs/voc12.yaml``) as defaults. The config's ``crf`` section (:class:`vitpcm.config.CRFConfig`) subclasses it
and adds ``workers``; :mod:`vitpcm.postprocess.crf` runs it. This module imports neither
numpy nor OmegaConf, so the config can build on it.

Why not frozen: OmegaConf structured configs are built from (mutable) dataclasses, and a
mutable dataclass cannot subclass a frozen one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from vitpcm.errors import VitpcmError

# How big an image the CRF solves at full resolution (pixels, H x W): a larger one is solved
# at a reduced size and its marginals upsampled (vitpcm.postprocess.crf). One dense CRF needs
# roughly (600 + 80 P) bytes per pixel for P labels (docs/reliability.md), so 4 MP bounds a
# worker near 3 GiB, while VOC (0.19 MP) and COCO (0.31 MP) images are never reduced.
DEFAULT_MAX_PIXELS = 4_000_000

BACKENDS = ("auto", "pydensecrf", "torch")  # crf.backend
TEXT_FIELDS = ("gaussian", "backend")


@dataclass
class CRFParams:
    """Parameters of the dense CRF; the defaults are the authors' (``CRF:`` of their config)."""

    iterations: int = 10  # ITER_MAX: mean-field iterations
    gauss_sxy: float = 1.0  # POS_XY_STD: spatial std (pixels) of the smoothness kernel
    gauss_compat: float = 3.0  # POS_W: its Potts weight
    bilateral_sxy: float = 67.0  # BI_XY_STD: spatial std (pixels) of the appearance kernel
    bilateral_srgb: float = 3.0  # BI_RGB_STD: its colour std (0..255 units)
    bilateral_compat: float = 4.0  # BI_W: its Potts weight
    clip: float = 1.0e-5  # unary = -log(max(p, clip)), as pydensecrf's unary_from_softmax
    # How the smoothness (Gaussian) kernel's messages are computed: "exact" (vitpcm: the
    # kernel itself, a separable Gaussian of std gauss_sxy; ~1.4x faster on VOC-sized images)
    # or "lattice" (pydensecrf's permutohedral approximation of it, as the authors ran it; a
    # fidelity switch). They agree on 99.99 % of the pixels (docs/reproduce.md)
    gaussian: str = "exact"
    # Which implementation runs the mean field: "pydensecrf" (pydensecrf2's C++, CPU, one image
    # per process), "torch" (vitpcm.postprocess.crf_torch: the same lattice and mean field in
    # PyTorch, batched, CPU or CUDA) or "auto" (torch where the CRF is asked to run on a CUDA
    # device, pydensecrf otherwise). They agree on >= 99.9 % of the pixels
    # (benchmarks/results/crf_torch_agreement.json)
    backend: str = "auto"
    # When mean field stops: 0 (the authors') = after ``iterations`` steps, always; a fraction
    # (e.g. 0.001) = also as soon as one step changes the label of at most that share of the
    # image's pixels (labels compared with the previous step's; at most ``iterations`` steps).
    # Fewer steps, a few pixels in 10^4 different (docs/benchmarks.md#dense-crf)
    tolerance: float = 0.0

    @classmethod
    def names(cls) -> tuple:
        """The parameter names, in order (not ``workers``: that is how, not what, to compute)."""
        return tuple(f.name for f in fields(CRFParams))

    @classmethod
    def from_config(cls, crf_cfg: Any) -> "CRFParams":
        """Plain, validated parameters from anything that has them.

        ``crf_cfg``: the ``crf`` section of a :mod:`vitpcm.config` config (an OmegaConf
        node or :class:`vitpcm.config.CRFConfig`), a ``CRFParams``, or a mapping. Missing
        fields keep the authors' values; other fields (``workers``) are ignored.
        """
        if crf_cfg is None:
            return CRFParams()
        values = {}
        for name in CRFParams.names():
            if isinstance(crf_cfg, Mapping):
                present = name in crf_cfg
                value = crf_cfg[name] if present else None
            else:
                present = hasattr(crf_cfg, name)
                value = getattr(crf_cfg, name, None)
            if present:
                values[name] = (
                    int(value) if name == "iterations" else str(value) if name in TEXT_FIELDS else float(value)
                )
        return CRFParams(**values).validated()

    def validated(self) -> "CRFParams":
        """This object, or a :class:`VitpcmError` naming the ``crf.*`` key that is out of range."""
        if self.iterations < 0:
            raise VitpcmError(f"crf.iterations must be >= 0, got {self.iterations}")
        for key in ("gauss_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, key) <= 0:
                raise VitpcmError(f"crf.{key} must be positive, got {getattr(self, key)}")
        for key in ("gauss_compat", "bilateral_compat"):
            if getattr(self, key) < 0:
                raise VitpcmError(f"crf.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.tolerance < 1:
            raise VitpcmError(
                f"crf.tolerance must lie in [0, 1) (0 = every iteration, the authors'), got {self.tolerance}"
            )
        if not 0 < self.clip < 1:
            raise VitpcmError(f"crf.clip must lie in (0, 1), got {self.clip}")
        if self.gaussian not in ("exact", "lattice"):
            raise VitpcmError(f"crf.gaussian must be exact or lattice, got {self.gaussian!r}")
        if self.backend not in BACKENDS:
            raise VitpcmError(f"crf.backend must be one of {' | '.join(BACKENDS)}, got {self.backend!r}")
        return self

    def resolved_backend(self, device: Any = None) -> str:
        """``pydensecrf`` or ``torch``: what ``crf.backend`` means for a CRF computed on
        ``device`` (``auto``: torch on a CUDA device, pydensecrf otherwise)."""
        if self.backend == "auto":
            return "torch" if device is not None and str(device).startswith("cuda") else "pydensecrf"
        return self.backend

    def as_dict(self) -> dict:
        """``{name: value}`` of the parameters (also for a subclass with more fields)."""
        return {name: getattr(self, name) for name in CRFParams.names()}
